"""Copy-on-write exports (`--cow`, `[[images]] cow`, `export-add cow=true`), as qemu-nbd -s gives them.

Real clients (libnbd's Python binding and nbdsh, qemu-io, nbdcopy) write to a cow export of raw and qcow2
images; what they read back is what a bytearray model of the same writes holds, and what qemu-nbd -s
answers after the same writes. The image file's checksum never changes, a new connection after the last
one left sees the original data, concurrent clients share one overlay, and the overlay (an unlinked file
in $TMPDIR) is gone from the server's open files once the export closes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import nbd
import pytest

from nbdsrv.admin.client import AdminClient, AdminError
from tests.interop.nbdsrv_fixture import NbdServer, disk_path, free_port, make_pool, start_server, volid
from tests.peers import peer, run

SIZE = 8 * 1024 * 1024
NBDSH_ENV = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_image(path: Path, fmt: str) -> bytes:
    """An 8 MiB image: 0x11 over the first 3 MiB and 0x5a at 5 MiB (qcow2 leaves the rest unallocated)."""
    run(peer("qemu-img"), "create", "-q", "-f", fmt, path, str(SIZE))
    run(peer("qemu-io"), "-f", fmt, "-c", "write -P 0x11 0 3M", "-c", "write -P 0x5a 5M 64k", path)
    data = bytearray(SIZE)
    data[0:3 << 20] = b"\x11" * (3 << 20)
    data[5 << 20:(5 << 20) + 65536] = b"\x5a" * 65536
    return bytes(data)


def overlay_fds(pid: int, tmpdir: Path) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(tmpdir)):
            out.append(target)
    return out


def cow_server(tmp_path: Path, img: Path, *extra: str) -> tuple[NbdServer, Path]:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    srv = start_server(tmp_path / "srv", "--image", str(img), "--cow", *extra, use_pool=False,
                       env={"TMPDIR": str(tmpdir)})
    return srv, tmpdir


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.add_meta_context("qemu:allocation-depth")
    h.connect_uri(uri)
    return h


# The writes every differential test applies: partial blocks at odd offsets, a write across a block
# boundary, an aligned and an unaligned zero, a write into a range that qcow2 leaves unallocated.
OPS: list[tuple[str, int, int, int]] = [
    ("write", 1000, 3000, 0x22),
    ("write", 65000, 70000, 0x33),
    ("zero", 2 << 20, 1 << 20, 0),
    ("zero", 100_001, 7777, 0),
    ("write", (6 << 20) + 12345, 200_000, 0x44),
    ("write", SIZE - 1, 1, 0x55),
]


def apply(h: nbd.NBD, model: bytearray | None) -> None:
    for op, off, n, pat in OPS:
        if op == "write":
            h.pwrite(bytes([pat]) * n, off)
        else:
            h.zero(n, off)
        if model is not None:
            model[off:off + n] = bytes([pat]) * n


def read_all(h: nbd.NBD) -> bytes:
    step = 4 << 20
    return b"".join(h.pread(min(step, SIZE - o), o) for o in range(0, SIZE, step))


def statuses(h: nbd.NBD, ctx: str) -> list[tuple[int, int]]:
    """(offset, flags) per 64 KiB block of the whole export for one meta context."""
    runs: list[tuple[int, int]] = []
    off = 0
    while off < SIZE:
        got: list[int] = []

        def cb(metacontext: str, offset: int, entries: list[int], err: int, got: list[int] = got) -> int:
            if metacontext == ctx:
                got.extend(entries)
            return 0

        h.block_status(SIZE - off, off, cb)
        assert got, f"the server sent no {ctx} extents at {off}"
        for i in range(0, len(got), 2):
            runs.append((off, got[i + 1]))
            off += got[i]
    out = []
    for blk in range(0, SIZE, 65536):
        flags = [f for o, f in runs if o <= blk][-1]
        out.append((blk, flags))
    return out


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_writes_read_back_and_never_reach_the_image(tmp_path: Path, fmt: str) -> None:
    img = tmp_path / f"d.{fmt}"
    original = make_image(img, fmt)
    before = sha(img)
    model = bytearray(original)
    srv, tmpdir = cow_server(tmp_path, img)
    try:
        h = connect(srv.uri(""))
        assert not h.is_read_only() and h.can_zero() and h.can_flush()
        apply(h, model)
        h.flush()
        assert read_all(h) == bytes(model)
        assert len(overlay_fds(srv.proc.pid, tmpdir)) == 1
        # block status of the merged view: written ranges are data in the top layer
        alloc = dict(statuses(h, "base:allocation"))
        depth = dict(statuses(h, "qemu:allocation-depth"))
        assert alloc[0] == 0 and depth[0] == 1
        assert alloc[6 << 20] == 0 and depth[6 << 20] == 1
        assert alloc[2 << 20] == 3 and depth[2 << 20] == 1  # zeroed whole blocks: hole, zero, on top
        # below the overlay: the image one layer down (raw: allocated; qcow2: data or unallocated)
        assert depth[4 << 20] == (2 if fmt == "raw" else 0)
        assert depth[5 << 20] == 2
        h.shutdown()
        time.sleep(0.3)
        assert overlay_fds(srv.proc.pid, tmpdir) == []
        # the last client left, so the overlay went with it: a new connection sees the image
        h = connect(srv.uri(""))
        assert read_all(h) == original
        h.shutdown()
    finally:
        assert srv.stop() == 0
    assert sha(img) == before
    assert "Traceback" not in srv.log()
    assert os.listdir(tmpdir) == []
    if fmt == "qcow2":
        run(peer("qemu-img"), "check", img)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_same_reads_as_qemu_nbd_snapshot(tmp_path: Path, fmt: str) -> None:
    img = tmp_path / f"d.{fmt}"
    make_image(img, fmt)
    before = sha(img)
    srv, _ = cow_server(tmp_path, img)
    try:
        h = connect(srv.uri(""))
        apply(h, None)
        ours = read_all(h)
        ours_depth = statuses(h, "qemu:allocation-depth")
        h.shutdown()
    finally:
        srv.stop()
    sock = tmp_path / "qemu.sock"
    # -A: qemu-nbd offers qemu:allocation-depth only when asked
    q = subprocess.Popen([peer("qemu-nbd"), "-s", "-A", "-f", fmt, "-k", str(sock), str(img)],
                         stderr=subprocess.PIPE, env=dict(os.environ, TMPDIR=str(tmp_path)))
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        h = connect(f"nbd+unix:///?socket={sock}")
        apply(h, None)
        theirs = read_all(h)
        theirs_depth = statuses(h, "qemu:allocation-depth")
        h.shutdown()
    finally:
        q.wait(10)
    assert ours == theirs
    assert ours_depth == theirs_depth
    assert sha(img) == before


def test_concurrent_clients_share_one_overlay(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    original = make_image(img, "raw")
    srv, tmpdir = cow_server(tmp_path, img)
    try:
        a, b = connect(srv.uri("")), connect(srv.uri(""))
        a.pwrite(b"A" * 5000, 70_000)
        assert b.pread(5000, 70_000) == b"A" * 5000
        b.zero(65536, 0)
        assert a.pread(65536, 0) == bytes(65536)
        assert len(overlay_fds(srv.proc.pid, tmpdir)) == 1
        a.shutdown()
        # one client is still there: the overlay stays
        assert b.pread(5000, 70_000) == b"A" * 5000
        # nbdsh, as a third client at the same time, sees the shared overlay too
        out = subprocess.run(["nbdsh", "-u", srv.uri(""), "-c", "print(h.pread(4, 70000).decode())"],
                             capture_output=True, env=NBDSH_ENV, check=True).stdout
        assert out.strip() == b"AAAA"
        b.shutdown()
        time.sleep(0.3)
        assert overlay_fds(srv.proc.pid, tmpdir) == []
        c = connect(srv.uri(""))
        assert c.pread(70_000, 5000) == original[5000:75_000]
        c.shutdown()
    finally:
        assert srv.stop() == 0


def test_many_partial_writes_in_flight(tmp_path: Path) -> None:
    """Unaligned writes to disjoint bytes of the same blocks, all in flight at once, then random ops."""
    img = tmp_path / "d.qcow2"
    original = make_image(img, "qcow2")
    before = sha(img)
    model = bytearray(original)
    srv, _ = cow_server(tmp_path, img)
    rng = random.Random(7)
    try:
        h = connect(srv.uri(""))
        cookies = []
        bufs = []
        for i in range(64):  # 64 slices of 1000 bytes at 3 MiB - 30000: one block boundary among them
            off = (3 << 20) - 30_000 + i * 1000 + 1
            data = bytes([i + 1]) * 999
            model[off:off + 999] = data
            buf = nbd.Buffer.from_bytearray(bytearray(data))
            bufs.append(buf)
            cookies.append(h.aio_pwrite(buf, off))
        # aio_command_completed answers true once and retires the cookie: keep the ones still pending
        pending = cookies
        while pending:
            pending = [c for c in pending if not h.aio_command_completed(c)]
            if pending:
                h.poll(-1)
        for _ in range(300):
            off = rng.randrange(SIZE - 1)
            n = rng.randrange(1, min(300_000, SIZE - off) + 1)
            if rng.random() < 0.75:
                data = rng.randbytes(n)
                h.pwrite(data, off)
                model[off:off + n] = data
            else:
                h.zero(n, off)
                model[off:off + n] = bytes(n)
            if rng.random() < 0.1:
                o = rng.randrange(SIZE - 1)
                m = rng.randrange(1, min(500_000, SIZE - o) + 1)
                assert h.pread(m, o) == bytes(model[o:o + m])
        assert read_all(h) == bytes(model)
        h.shutdown()
    finally:
        assert srv.stop() == 0
    assert sha(img) == before


def test_qemu_io_and_nbdcopy(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    make_image(img, "raw")
    before = sha(img)
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(3).randbytes(SIZE))
    srv, _ = cow_server(tmp_path, img, "--name", "scratch")
    try:
        # qemu-io writes and verifies in one connection (the overlay lives as long as it)
        out = run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x66 4095 65539", "-c",
                  "read -P 0x66 4095 65539", "-c", "read -P 0x11 0 4095", "-c", "read -P 0x11 69634 100",
                  "-c", "aio_write -P 0x67 1048577 3", "-c", "aio_flush", "-c", "read -P 0x67 1048577 3",
                  srv.uri("scratch")).stdout
        assert b"Pattern verification failed" not in out and out.count(b"read ") == 4
        # nbdcopy fills the export while nbdsh holds it open, then copies it back out
        holder = subprocess.Popen(["nbdsh", "-u", srv.uri("scratch"), "-c", "import sys; sys.stdin.read()"],
                                  stdin=subprocess.PIPE, env=NBDSH_ENV)
        try:
            time.sleep(0.5)
            run("nbdcopy", src, srv.uri("scratch"))
            back = tmp_path / "back.raw"
            run("nbdcopy", srv.uri("scratch"), back)
            assert back.read_bytes() == src.read_bytes()
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(10)
    finally:
        assert srv.stop() == 0
    assert sha(img) == before


def test_image_is_locked_as_qemu_nbd_s_locks_it(tmp_path: Path) -> None:
    """The image is held as qemu-nbd -s holds it: as a backing file whose parent lets others write, so
    qemu-io may read it and may even open it read-write, exactly as while qemu-nbd -s holds it."""
    img = tmp_path / "d.raw"
    make_image(img, "raw")

    def probe() -> tuple[int, int]:
        r = run(peer("qemu-io"), "-r", "-f", "raw", "-c", "read 0 512", img, check=False)
        w = run(peer("qemu-io"), "-f", "raw", "-c", "write 0 512", img, check=False)
        return r.returncode, int(b"lock" in w.stderr + w.stdout)

    srv, _ = cow_server(tmp_path, img)
    try:
        h = connect(srv.uri(""))
        h.pwrite(b"x", 0)
        ours = probe()
        h.shutdown()
    finally:
        srv.stop()
    sock = tmp_path / "q.sock"
    q = subprocess.Popen([peer("qemu-nbd"), "-s", "-t", "-f", "raw", "-k", str(sock), str(img)],
                         env=dict(os.environ, TMPDIR=str(tmp_path)))
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        theirs = probe()
    finally:
        q.terminate()
        q.wait(10)
    assert ours == theirs


def test_config_and_export_add(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    disk = disk_path(pool, "disk-0", "qcow2")
    original = make_image(disk, "qcow2")
    tmpl = disk_path(pool, "tmpl", "raw", base=True)
    tmpl_data = make_image(tmpl, "raw")
    single = tmp_path / "single.raw"
    single_data = make_image(single, "raw")
    sums = {p: sha(p) for p in (disk, tmpl, single)}
    cfg = tmp_path / "nbdsrv.toml"
    cfg.write_text(f'[[images]]\npath = "{single}"\nname = "single"\ncow = true\n')
    admin = tmp_path / "admin.sock"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    srv = start_server(tmp_path / "srv", "--admin-socket", str(admin), "--config", str(cfg), pool=pool,
                       env={"TMPDIR": str(tmpdir)})
    try:
        async def add() -> dict[str, dict[str, object]]:
            async with await AdminClient.connect(str(admin)) as c:
                r = await c.execute("export-add", {"volume": volid(disk), "name": "scratch", "cow": True})
                assert r["read-only"] is False
                # a template is read-only, but its overlay is not
                r = await c.execute("export-add", {"volume": volid(tmpl), "name": "tmpl-cow", "cow": True})
                assert r["read-only"] is False
                with pytest.raises(AdminError):
                    await c.execute("export-add", {"volume": volid(disk), "name": "x", "cow": True,
                                                   "snapshot": "s"})
                return {e["name"]: e for e in await c.execute("query-exports")}

        exports = asyncio.run(add())
        assert exports["scratch"].get("cow") is True and exports["tmpl-cow"].get("cow") is True
        assert exports["single"].get("cow") is True and "cow" not in exports[volid(disk)]
        for name, data in (("scratch", original), ("tmpl-cow", tmpl_data), ("single", single_data)):
            h = connect(srv.uri(name))
            h.pwrite(b"\xee" * 777, 12_345)
            assert h.pread(2000, 12_000) == data[12_000:12_345] + b"\xee" * 777 + data[13_122:14_000]
            # the plain export of the same volume is its own instance and shows the image
            if name == "scratch":
                p = connect(srv.uri(volid(disk)))
                assert p.pread(2000, 12_000) == original[12_000:14_000]
                p.shutdown()
            h.shutdown()
        # the template itself stays read-only under its own name
        w = run(peer("qemu-io"), "-f", "raw", "-c", "write 0 4k", srv.uri(volid(tmpl)), check=False)
        assert w.returncode != 0 or b"Operation not permitted" in w.stdout + w.stderr
    finally:
        assert srv.stop() == 0
    assert {p: sha(p) for p in sums} == sums
    assert os.listdir(tmpdir) == []


def test_flags_need_an_image(tmp_path: Path) -> None:
    serve = [sys.executable, "-m", "nbdsrv", "serve", "--listen", f"127.0.0.1:{free_port()}"]
    r = subprocess.run([*serve, "--cow"], capture_output=True, timeout=30)
    assert r.returncode == 1 and b"--cow need an --image" in r.stderr
    img = tmp_path / "d.qcow2"
    make_image(img, "qcow2")
    r = subprocess.run([*serve, "--image", str(img), "--snapshot", "x", "--cow"], capture_output=True,
                       timeout=30)
    assert r.returncode == 1 and b"--cow and --snapshot cannot be combined" in r.stderr
