"""Listing a large pool through the handshake: LIST and INFO of every volume complete however long the
listing takes, because the handshake timeout counts idleness, not the handshake's length; INFO answers
come from what was last worked out for an unchanged image file, and never outlive a change to it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.interop.nbdsrv_fixture import create_image, disk_path, make_pool, start_server, volid
from tests.peers import peer, run

nbd = pytest.importorskip("nbd")

VMIDS, DISKS = 200, 10  # 2,000 volumes


def _big_pool(root: Path) -> Path:
    pool = make_pool(root)
    for v in range(1000, 1000 + VMIDS):
        d = pool / "images" / str(v)
        d.mkdir(parents=True, exist_ok=True)
        for n in range(DISKS):
            with open(d / f"vm-{v}-disk-{n}.raw", "wb") as f:
                f.truncate((n + 1) << 20)
    return pool


def test_list_and_info_of_every_volume_outlast_the_handshake_timeout(tmp_path: Path) -> None:
    pool = _big_pool(tmp_path / "pool")
    srv = start_server(tmp_path / "srv", "--handshake-timeout", "2", pool=pool)
    try:
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_uri(srv.uri(""))
        t0 = time.monotonic()
        names: list[str] = []
        h.opt_list(lambda name, _desc: names.append(name) or 0)
        assert len(names) == VMIDS * DISKS
        sizes = {}
        for _round in range(2):  # the second round is answered from what the first worked out
            for name in names:
                h.set_export_name(name)
                h.opt_info()
                sizes[name] = h.get_size()
            # past the handshake timeout in all, never idle for that long: still in the handshake
            time.sleep(1.5)
        took = time.monotonic() - t0
        print(f"LIST + 2 x INFO of {len(names)} volumes in {took:.2f} s")
        assert all(sizes[f"local:{v}/vm-{v}-disk-{n}.raw"] == (n + 1) << 20
                   for v in range(1000, 1000 + VMIDS) for n in range(DISKS))
        h.set_export_name(names[0])
        h.opt_go()
        assert h.pread(4096, 0) == bytes(4096)
        h.shutdown()
    finally:
        assert srv.stop() == 0
    assert "handshake timed out" not in srv.log()


def test_an_idle_client_still_meets_the_handshake_timeout(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    img = create_image(disk_path(pool, "disk-0", "raw"), "raw", "1M")
    srv = start_server(tmp_path / "srv", "--handshake-timeout", "1", pool=pool)
    try:
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_uri(srv.uri(volid(img)))
        for _ in range(4):  # 2 s of steady progress
            h.opt_info()
            time.sleep(0.5)
        time.sleep(1.8)  # then idle past the timeout
        with pytest.raises(nbd.Error):
            h.opt_info()
    finally:
        assert srv.stop() == 0
    assert "handshake timed out" in srv.log()


def test_info_follows_every_change_to_the_image_file(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    raw = create_image(disk_path(pool, "disk-0", "raw"), "raw", "1M")
    qcow2 = create_image(disk_path(pool, "disk-1", "qcow2"), "qcow2", "1M")
    srv = start_server(tmp_path / "srv", pool=pool)

    def info(name: str) -> tuple[int, bool]:
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_uri(srv.uri(name))
        h.opt_info()
        out = (h.get_size(), h.is_read_only() != 0)
        h.opt_abort()
        return out

    try:
        assert info(volid(raw)) == (1 << 20, False)
        assert info(volid(qcow2)) == (1 << 20, False)
        assert info(volid(qcow2)) == (1 << 20, False)
        run(peer("qemu-img"), "resize", "-f", "raw", raw, "3M")
        run(peer("qemu-img"), "resize", "-f", "qcow2", qcow2, "5M")
        assert info(volid(raw)) == (3 << 20, False)
        assert info(volid(qcow2)) == (5 << 20, False)
        # another file under the name
        run(peer("qemu-img"), "create", "-q", "-f", "qcow2", tmp_path / "other.qcow2", "3M")
        os.replace(tmp_path / "other.qcow2", qcow2)
        assert info(volid(qcow2)) == (3 << 20, False)
        # a writer that has the image open is described from its instance, then the image as it left it
        h = nbd.NBD()
        h.connect_uri(srv.uri(volid(raw)))
        assert info(volid(raw)) == (3 << 20, False)
        h.shutdown()
    finally:
        assert srv.stop() == 0
