"""Data safety of pool exports with real clients: read-only follows symlinks, listing takes no write
lock, and a refused export says why instead of looking missing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.interop.nbdsrv_fixture import NbdServer, create_image, disk_path, nbdsrv, pool, volid
from tests.peers import peer, run

__all__ = ["nbdsrv", "pool"]


def test_vm_symlink_to_template_or_iso_is_read_only(nbdsrv: NbdServer, pool: Path) -> None:
    base = create_image(disk_path(pool, "disk-0", "raw", vmid=9000, base=True), "raw", "1M")
    iso = pool / "template" / "iso" / "test.iso"
    iso.write_bytes(b"\0" * 1024 * 1024)
    to_base = disk_path(pool, "disk-3", "raw")
    to_base.symlink_to("../9000/base-9000-disk-0.raw")
    to_iso = disk_path(pool, "disk-4", "raw")
    to_iso.symlink_to("../../template/iso/test.iso")
    for link, target in ((to_base, base), (to_iso, iso)):
        p = run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x55 0 4k", nbdsrv.uri(volid(link)),
                check=False)
        assert p.returncode != 0 or b"failed" in p.stdout + p.stderr, p
        assert target.read_bytes()[:4096] == b"\0" * 4096


def test_list_while_qemu_holds_image_rw(nbdsrv: NbdServer, pool: Path) -> None:
    img = create_image(disk_path(pool, "disk-0", "qcow2"), "qcow2", "1M")
    holder = subprocess.Popen([peer("qemu-io"), "-f", "qcow2", str(img)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert holder.stdin is not None
        holder.stdin.write(b"read 0 512\n")
        holder.stdin.flush()
        assert holder.stdout is not None
        holder.stdout.readline()
        p = run(peer("nbdinfo"), "--list", f"nbd://127.0.0.1:{nbdsrv.port}")
        assert volid(img) in p.stdout.decode()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.xfail(strict=False, reason="a qemu-io read-write open still meets a lock now and then while "
                   "nbdinfo --list loops: some request of the listing still opens the image with an "
                   "export's locks; not yet traced")
def test_list_loop_does_not_block_rw_opens(nbdsrv: NbdServer, pool: Path) -> None:
    img = create_image(disk_path(pool, "disk-0", "qcow2"), "qcow2", "1M")
    lister = subprocess.Popen(["sh", "-c", f"while :; do nbdinfo --list nbd://127.0.0.1:{nbdsrv.port} "
                               ">/dev/null 2>&1; done"], start_new_session=True)
    failures: list[bytes] = []
    try:
        for _ in range(30):
            p = run(peer("qemu-io"), "-f", "qcow2", "-c", "write 0 512", img, check=False)
            if p.returncode != 0 or b"lock" in p.stderr:
                failures.append(p.stderr)
    finally:
        os.killpg(lister.pid, 9)
        lister.wait()
    assert failures == [], failures


def test_locked_export_reports_reason(nbdsrv: NbdServer, pool: Path) -> None:
    img = create_image(disk_path(pool, "disk-0", "qcow2"), "qcow2", "1M")
    holder = subprocess.Popen([peer("qemu-io"), "-f", "qcow2", str(img)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.write(b"read 0 512\n")
        holder.stdin.flush()
        holder.stdout.readline()
        p = run(peer("qemu-img"), "info", nbdsrv.uri(volid(img)), check=False)
        assert p.returncode == 1
        err = p.stderr.decode()
        assert "lock" in err and "not present" not in err, err
        p = run(peer("nbdinfo"), nbdsrv.uri(volid(img)), check=False)
        err = p.stderr.decode()
        # libnbd prints no server message for GO; the errno it derives must not be "no such export".
        assert p.returncode != 0 and "No such" not in err and "not present" not in err, err
    finally:
        holder.kill()
        holder.wait()
