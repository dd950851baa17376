"""Data safety of pool exports with real clients: read-only follows symlinks, listing takes no write
lock, and a refused export says why instead of looking missing."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.interop.nbdsrv_fixture import (
    NbdServer,
    create_image,
    disk_path,
    nbdsrv,
    pool,
    qemu_io_holding,
    volid,
)
from tests.peers import REPO, peer, run

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
    with qemu_io_holding(img, "qcow2"):
        p = run(peer("nbdinfo"), "--list", f"nbd://127.0.0.1:{nbdsrv.port}")
        assert volid(img) in p.stdout.decode()


# QEMU's lock bytes (block/file-posix.c): 100 + bit marks a permission held, 200 + bit one not shared;
# bits: 0 consistent read, 1 write, 2 write unchanged, 3 resize.
LOCK_BYTES = (100, 101, 102, 103, 200, 201, 202, 203)


def held_lock_bytes(path: Path) -> set[int]:
    """The QEMU lock bytes some other open file description holds on ``path`` (F_OFD_GETLK)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        held = set()
        for byte in LOCK_BYTES:
            arg = struct.pack("hhxxxxqqixxxx", fcntl.F_WRLCK, 0, byte, 1, 0)
            if struct.unpack("hhxxxxqqixxxx", fcntl.fcntl(fd, F_OFD_GETLK, arg))[0] != fcntl.F_UNLCK:
                held.add(byte)
        return held
    finally:
        os.close(fd)


F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
# What an export or qemu holds on a read-write image: read, write and resize held; write and resize
# not shared.
WRITER_BYTES = {100, 101, 103, 201, 203}


def test_list_info_and_meta_context_hold_no_lock(nbdsrv: NbdServer, pool: Path) -> None:
    """The requests `nbdinfo --list` sends (LIST, then INFO and LIST_META_CONTEXT per export) take no
    lock byte while they are answered or after, on a connection still in its handshake; only GO does."""
    nbd = pytest.importorskip("nbd")
    img = create_image(disk_path(pool, "disk-0", "qcow2"), "qcow2", "1M")
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(nbdsrv.sock)
    try:
        names: list[str] = []
        h.opt_list(lambda name, desc: names.append(name))
        assert volid(img) in names
        assert held_lock_bytes(img) == set()
        h.set_export_name(volid(img))
        h.opt_info()
        assert not h.is_read_only()
        assert held_lock_bytes(img) == set()
        contexts: list[str] = []
        h.opt_list_meta_context(lambda ctx: contexts.append(ctx))
        assert "base:allocation" in contexts
        assert held_lock_bytes(img) == set()
        # A VM (here qemu-io) starts on the image while the listing connection is still open.
        run(peer("qemu-io"), "-f", "qcow2", "-c", "write 0 512", img)
        h.opt_go()
        assert held_lock_bytes(img) == WRITER_BYTES  # the check sees the locks GO does take
    finally:
        h.shutdown()


def test_healthcheck_passes_while_qemu_holds_pool_disk(nbdsrv: NbdServer, pool: Path) -> None:
    """The Docker HEALTHCHECK command, run as it is written in docker/Dockerfile, while qemu-io holds
    a pool disk read-write (a running VM): it succeeds, and the holder's locks are the only ones."""
    line = next(x for x in (REPO / "docker" / "Dockerfile").read_text().splitlines()
                if x.startswith("HEALTHCHECK"))
    command = json.loads(line.split(" CMD ", 1)[1])  # exec form: no shell
    assert command[0] == "nbdsrv"
    img = create_image(disk_path(pool, "disk-0", "qcow2"), "qcow2", "1M")
    create_image(disk_path(pool, "disk-1", "raw"), "raw", "1M")
    # the image's environment: the venv's bin on PATH, the listening address in NBDSRV_LISTEN
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(REPO), NBDSRV_LISTEN=f"0.0.0.0:{nbdsrv.port}")
    with qemu_io_holding(img, "qcow2", "write 0 512") as holder:
        assert held_lock_bytes(img) == WRITER_BYTES
        p = subprocess.run(command, capture_output=True, timeout=30, env=env)
        assert p.returncode == 0, p
        assert held_lock_bytes(img) == WRITER_BYTES
        assert holder.poll() is None and holder.stdin is not None and holder.stdout is not None
        # qemu-io can still write: nothing of the probe stayed behind.
        holder.stdin.write(b"write 512 512\n")
        holder.stdin.flush()
        assert b"wrote" in holder.stdout.readline() + holder.stdout.readline()
    assert held_lock_bytes(img) == set()
    # the server's log shows no export opened or listed by the probe
    assert "export opened" not in nbdsrv.log()
    # and it follows the address it is given: the server's unix socket too, and nothing where none listens
    assert subprocess.run([*command, f"unix:{nbdsrv.sock}"], env=env, timeout=30).returncode == 0
    p = subprocess.run(command, capture_output=True, env=dict(env, NBDSRV_LISTEN="127.0.0.1:1"), timeout=30)
    assert p.returncode == 1 and p.stderr.startswith(b"nbdsrv health: 127.0.0.1:1: "), p


def test_health_refuses_a_server_that_is_not_nbd(tmp_path: Path) -> None:
    """A listener that greets with anything but NBD's newstyle magic is unhealthy (exit 1, one line)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.Popen([sys.executable, "-m", "nbdsrv", "health", f"127.0.0.1:{port}",
                              "--timeout", "5"],
                             stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO)))
        conn, _ = s.accept()
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n" + b"x" * 20)
        _, err = p.communicate(timeout=30)
        conn.close()
    assert p.returncode == 1 and err.count(b"\n") == 1 and b"not an NBD newstyle greeting" in err, err


def test_locked_export_reports_reason(nbdsrv: NbdServer, pool: Path) -> None:
    img = create_image(disk_path(pool, "disk-0", "qcow2"), "qcow2", "1M")
    with qemu_io_holding(img, "qcow2"):
        p = run(peer("qemu-img"), "info", nbdsrv.uri(volid(img)), check=False)
        assert p.returncode == 1
        err = p.stderr.decode()
        assert "lock" in err and "not present" not in err, err
        p = run(peer("nbdinfo"), nbdsrv.uri(volid(img)), check=False)
        err = p.stderr.decode()
        # libnbd prints no server message for GO; the errno it derives must not be "no such export".
        assert p.returncode != 0 and "No such" not in err and "not present" not in err, err


def listed(nbdsrv: NbdServer) -> dict[str, str]:
    """Export name -> description, as NBD_OPT_LIST answers them (libnbd's opt_list)."""
    nbd = pytest.importorskip("nbd")
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(nbdsrv.sock)
    try:
        out: dict[str, str] = {}
        h.opt_list(lambda name, desc: out.__setitem__(name, desc))
        return out
    finally:
        h.opt_abort()


def test_unopenable_volumes_say_why_in_list_and_go(nbdsrv: NbdServer, pool: Path, tmp_path: Path) -> None:
    """A backing file outside the pool and a corrupt qcow2: listed with the reason as description, and GO
    answered NBD_REP_ERR_POLICY with the reason, which qemu prints, instead of "no such export"."""
    outside = create_image(tmp_path / "outside.qcow2", "qcow2", "1M")
    escaped = create_image(disk_path(pool, "disk-0", "qcow2"), "qcow2", "1M",
                           "-b", str(outside), "-F", "qcow2")
    corrupt = create_image(disk_path(pool, "disk-1", "qcow2"), "qcow2", "1M")
    with open(corrupt, "r+b") as f:  # the "corrupt" incompatible feature bit, as qemu sets it
        f.seek(72)
        f.write((2).to_bytes(8, "big"))
    good = create_image(disk_path(pool, "disk-2", "raw"), "raw", "1M")
    described = listed(nbdsrv)
    assert described[volid(good)] == "raw disk"
    for img in (escaped, corrupt):
        assert described[volid(img)].startswith("cannot be opened: "), described
    for img, why in ((escaped, "outside"), (corrupt, "corrupt")):
        p = run(peer("qemu-img"), "info", nbdsrv.uri(volid(img)), check=False)
        err = p.stderr.decode()
        assert p.returncode == 1 and why in err.lower() and "not present" not in err, err
    # The reasons are cached by file identity only: repairing the image is seen by the next listing.
    run(peer("qemu-img"), "rebase", "-u", "-b", "", escaped)
    assert listed(nbdsrv)[volid(escaped)] == "qcow2 disk"
