"""The backup flow end to end, with real peers: a persistent dirty bitmap (added by imagecore, or by
qemu-img), the image served by nbdsrv, clients writing through it (qemu-io, nbdsh), the
``qemu:dirty-bitmap:NAME`` context showing exactly the written ranges at the bitmap's granularity to
nbdinfo and to QEMU's own NBD client (``x-dirty-bitmap``), and after the server stops: qemu-img info
shows the bitmap consistent, qemu-img check is clean, and qemu-nbd -B answers the same map."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.bitmaps_util import (
    check_clean,
    crash_qemu_writer,
    expected,
    flags_of,
    nbd_map,
    qemu_client_map,
    qemu_map,
    wait_released,
)
from tests.interop.nbdsrv_fixture import NbdServer, disk_path, make_pool, start_server, volid
from tests.peers import imagecore_cmd, peer, run

KiB, MiB = 1 << 10, 1 << 20
SIZE = 64 * MiB


def nbdsh(uri: str, code: str) -> None:
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    subprocess.run([peer("nbdsh"), "-u", uri, "-c", code], check=True, env=env, capture_output=True,
                   timeout=60)


def contexts(uri: str) -> list[str]:
    out = json.loads(run(peer("nbdinfo"), "--json", uri).stdout)
    return list(out["exports"][0]["contexts"])


def served(tmp_path: Path, maker: str, *, base: bool = False) -> tuple[Path, Path]:
    pool = make_pool(tmp_path / "pool")
    img = disk_path(pool, "disk-0", "qcow2", base=base)
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", img, "64M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 7 0 8M", img)  # data from before the bitmap
    tool = [*imagecore_cmd()] if maker == "imagecore" else [peer("qemu-img")]
    run(*tool, "bitmap", "--add", img, "b0")
    run(*tool, "bitmap", "--add", "-g", "4k", img, "fine")
    run(*tool, "bitmap", "--add", "--disable", img, "frozen")
    return pool, img


def hold(uri: str, command: str) -> subprocess.Popen[bytes]:
    """qemu-io connected to ``uri`` after running ``command``, until :func:`release`."""
    proc = subprocess.Popen([peer("qemu-io"), "-f", "raw", uri], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(command.encode() + b"\n")
    proc.stdin.flush()
    assert b"wrote" in proc.stdout.readline()
    return proc


def release(proc: subprocess.Popen[bytes]) -> None:
    """Let qemu-io leave as a client does (it disconnects cleanly on EOF)."""
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(30)


def stop(srv: NbdServer) -> None:
    assert srv.stop() == 0, srv.log()
    assert "Traceback" not in srv.log(), srv.log()


@pytest.mark.parametrize("maker", ["imagecore", "qemu-img"])
def test_backup_flow(tmp_path: Path, maker: str) -> None:
    pool, img = served(tmp_path, maker)
    srv = start_server(tmp_path / "srv", pool=pool)
    uri = srv.uri(volid(img))
    written = [(100 * KiB, 4 * KiB), (3 * MiB, MiB), (20 * MiB + 5, 10), (40 * MiB, 192 * KiB),
               (63 * MiB, MiB), (50 * MiB, 4 * KiB)]
    holder = None
    try:
        assert contexts(uri) == ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0",
                                 "qemu:dirty-bitmap:fine", "qemu:dirty-bitmap:frozen"]
        assert nbd_map(uri, "b0") == [(0, SIZE, False)]
        run(peer("qemu-io"), "-f", "raw", "-c", "write -P 1 100k 4k", "-c", "write -P 2 3M 1M", uri)
        nbdsh(uri, "h.pwrite(b'x' * 10, 20 * 1024 * 1024 + 5); h.zero(192 * 1024, 40 * 1024 * 1024); "
                   "h.trim(1024 * 1024, 63 * 1024 * 1024)")
        # a client that stays: its write is in the bitmaps the other clients read, not yet on disk
        holder = hold(uri, "write 50M 4k")
        for name, gran in (("b0", 65536), ("fine", 4096)):
            assert nbd_map(uri, name) == expected(SIZE, gran, written), name
            assert qemu_client_map("127.0.0.1", srv.port, volid(img), name) == expected(SIZE, gran, written)
        assert nbd_map(uri, "frozen") == [(0, SIZE, False)]
        # while a writer has it open, the bitmaps it tracks are in use on disk; the disabled one is not
        assert flags_of(img) == {"b0": ["in-use", "auto"], "fine": ["in-use", "auto"], "frozen": []}
    finally:
        if holder is not None:
            release(holder)
        stop(srv)
    assert flags_of(img) == {"b0": ["auto"], "fine": ["auto"], "frozen": []}
    check_clean(img)
    for name, gran in (("b0", 65536), ("fine", 4096)):
        assert qemu_map(img, name) == expected(SIZE, gran, written), name
    assert qemu_map(img, "frozen") == [(0, SIZE, False)]


def test_bitmaps_survive_reconnects_and_serve_many_connections(tmp_path: Path) -> None:
    pool, img = served(tmp_path, "imagecore")
    srv = start_server(tmp_path / "srv", pool=pool)
    uri = srv.uri(volid(img))
    try:
        run(peer("qemu-io"), "-f", "raw", "-c", "write 0 4k", uri)  # the image is closed when it leaves
        wait_released(img)
        assert flags_of(img)["b0"] == ["auto"]
        holder = hold(uri, "write 8M 4k")
        try:
            # another connection of the same instance sees the first one's write, and its own
            run(peer("qemu-io"), "-f", "raw", "-c", "write 16M 4k", uri)
            assert nbd_map(uri, "b0") == expected(SIZE, 65536, [(0, 4096), (8 * MiB, 4096), (16 * MiB, 4096)])
        finally:
            release(holder)
    finally:
        stop(srv)
    assert qemu_map(img, "b0") == expected(SIZE, 65536, [(0, 4096), (8 * MiB, 4096), (16 * MiB, 4096)])
    check_clean(img)


def test_read_only_exports_offer_bitmaps_and_leave_the_image_alone(tmp_path: Path) -> None:
    pool, img = served(tmp_path, "qemu-img", base=True)  # a template: served read-only
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write 1M 64k", img)
    before = img.read_bytes()
    srv = start_server(tmp_path / "srv", pool=pool)
    try:
        uri = srv.uri(volid(img))
        assert "qemu:dirty-bitmap:b0" in contexts(uri)
        assert nbd_map(uri, "fine") == expected(SIZE, 4096, [(MiB, 64 * KiB)])
    finally:
        stop(srv)
    assert img.read_bytes() == before


def test_image_bitmap_option_and_inconsistent_bitmaps(tmp_path: Path) -> None:
    img = tmp_path / "i.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", img, "16M")
    run(peer("qemu-img"), "bitmap", "--add", img, "lost")
    crash_qemu_writer(img, "write 0 64k")
    run(peer("qemu-img"), "bitmap", "--add", img, "b0")
    run(peer("qemu-img"), "bitmap", "--add", img, "b1")
    # by default every consistent bitmap; never the inconsistent one
    srv = start_server(tmp_path / "a", "--image", str(img), use_pool=False)
    try:
        assert contexts(srv.uri("")) == ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0",
                                         "qemu:dirty-bitmap:b1"]
    finally:
        stop(srv)
    # --bitmap: only those, as qemu-nbd -B
    srv = start_server(tmp_path / "b", "--image", str(img), "--bitmap", "b1", use_pool=False)
    try:
        assert contexts(srv.uri(""))[2:] == ["qemu:dirty-bitmap:b1"]
        run(peer("qemu-io"), "-f", "raw", "-c", "write 2M 4k", srv.uri(""))
        assert nbd_map(srv.uri(""), "b1") == expected(16 * MiB, 65536, [(2 * MiB, 4096)])
    finally:
        stop(srv)
    assert qemu_map(img, "b0") == expected(16 * MiB, 65536, [(2 * MiB, 4096)])  # tracked, though not offered
    assert flags_of(img) == {"lost": ["in-use", "auto"], "b0": ["auto"], "b1": ["auto"]}
    # a missing or inconsistent bitmap named on the command line: the server does not start
    for name, why in (("nope", "Bitmap 'nope' is not found"), ("lost", "Bitmap 'lost' is inconsistent")):
        proc = subprocess.run([*_nbdsrv(), "serve", "--listen", "127.0.0.1:0", "--image", str(img),
                               "--bitmap", name], capture_output=True, timeout=60, env=_env())
        assert proc.returncode == 1 and why.encode() in proc.stderr, proc.stderr


def test_a_server_killed_leaves_its_bitmaps_in_use_never_silently_wrong(tmp_path: Path) -> None:
    pool, img = served(tmp_path, "imagecore")
    srv = start_server(tmp_path / "srv", pool=pool)
    uri = srv.uri(volid(img))
    holder = hold(uri, "write 8M 4k")
    try:
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait()
        srv.stopped = True
    finally:
        holder.kill()
        holder.wait()
    assert flags_of(img) == {"b0": ["in-use", "auto"], "fine": ["in-use", "auto"], "frozen": []}
    # on a socket of its own: qemu-nbd's default port may be taken by another server on the machine
    p = run(peer("qemu-nbd"), "-r", "-f", "qcow2", "-k", tmp_path / "q.sock", "-B", "b0", img, check=False)
    assert p.returncode == 1 and b"inconsistent" in p.stderr
    # the disabled one is intact and usable
    assert qemu_map(img, "frozen") == [(0, SIZE, False)]
    srv = start_server(tmp_path / "srv2", pool=pool)
    try:
        assert contexts(srv.uri(volid(img)))[2:] == ["qemu:dirty-bitmap:frozen"]
    finally:
        stop(srv)


def _nbdsrv() -> list[str]:
    import sys

    return [sys.executable, "-m", "nbdsrv"]


def _env() -> dict[str, str]:
    from tests.peers import REPO

    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
