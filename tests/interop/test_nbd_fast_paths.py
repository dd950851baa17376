"""The server's fast paths against real clients: the bytes they read and write are the image's.

Writes without FUA start without a task (``BlockDriver.write_started``), and small page-aligned ones into
cached pages are done on the loop's thread (``HostFile.pwrite_inline``); they are checked with fio's
verify=crc32c, qemu-io's patterns and ``qemu-img compare``, and a write that was flushed must be in the
file after the server is killed with SIGKILL.

Large reads answered from the page cache by sendfile(2):

The server sends reads of 64 KiB and more whose data is in the page cache straight from the file
(``RawDriver.host_runs_nowait``): structured replies with hole chunks, simple replies, DF reads, the
partial-page end of a file whose size is not a multiple of 512, replies that the socket cannot take at
once (a client that does not read for a while), and reads after writes not yet flushed. Each is checked
against the file's bytes with libnbd, qemu-io's patterns, nbdcopy and fio's verify=crc32c.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from imagecore.formats.raw import RawDriver
from imagecore.hostio import HostFile
from tests.interop.nbdsrv_fixture import (
    NbdServer,
    create_image,
    disk_path,
    nbdsrv,
    pool,
    start_server,
    volid,
)
from tests.peers import in_ci, peer, run

__all__ = ["nbdsrv", "pool"]

try:
    import nbd
except ImportError:
    if in_ci():
        raise
    pytest.skip("python nbd (libnbd) is not installed", allow_module_level=True)

MiB = 1024 * 1024


def _image(pool: Path, name: str, size: int) -> tuple[Path, bytes]:
    """A raw image of random data with two holes (one at the end), cached by the write."""
    path = disk_path(pool, name, "raw")
    data = bytearray(os.urandom(size))
    data[MiB:MiB + 192 * 1024] = bytes(192 * 1024)
    with open(path, "wb") as f:
        f.write(data[:MiB])
        f.seek(MiB + 192 * 1024)
        f.write(data[MiB + 192 * 1024:size - 256 * 1024])
        f.truncate(size)
    data[size - 256 * 1024:] = bytes(256 * 1024)
    return path, bytes(data)


def _connect(srv: NbdServer, name: str, *, structured: bool) -> nbd.NBD:
    h = nbd.NBD()
    h.set_export_name(name)
    h.set_request_structured_replies(structured)
    h.connect_uri(srv.uri(name))  # TCP, where sendfile goes through the TCP stack
    return h


def test_driver_locates_cached_runs(tmp_path: Path) -> None:
    path, _ = _image(tmp_path, "d", 4 * MiB)

    async def main() -> None:
        drv = RawDriver(HostFile.open(str(path), read_only=True), str(path))
        try:
            runs = drv.host_runs_nowait(0, 2 * MiB)
            assert runs is not None
            assert runs[0] == (MiB, drv.hf.fd, 0)
            assert runs[1] == (192 * 1024, -1, 0)  # the hole
            assert runs[2][1:] == (drv.hf.fd, MiB + 192 * 1024)
            assert sum(r[0] for r in runs) == 2 * MiB
            # evicted pages are not promised: the reply is read through the driver instead
            os.fsync(drv.hf.fd)
            os.posix_fadvise(drv.hf.fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if drv.hf.in_page_cache(0, MiB):
                pytest.skip("the page cache kept the pages (dirty or locked)")
            assert drv.host_runs_nowait(0, MiB) is None
        finally:
            await drv.close()

    asyncio.run(main())


@pytest.mark.parametrize("structured", [True, False])
def test_large_reads_match_the_file(nbdsrv: NbdServer, pool: Path, structured: bool) -> None:
    size = 8 * MiB + 3 * 512  # a size the guest sees rounded to whole sectors
    path, data = _image(pool, "disk-0", size)
    with open(path, "r+b") as f:
        f.truncate(size - 100)  # the file ends inside its last sector: the rest reads as zeroes
    data = data[:size - 100] + bytes(100)
    h = _connect(nbdsrv, volid(path), structured=structured)
    try:
        assert h.get_size() == size
        for off, n in ((0, 64 * 1024), (0, MiB), (MiB - 4096, 256 * 1024), (MiB, 192 * 1024),
                       (3 * MiB + 512, 2 * MiB), (size - MiB, MiB), (size - 64 * 1024, 64 * 1024),
                       (0, 8 * MiB)):
            assert h.pread(n, off) == data[off:off + n], (off, n)
            if structured:
                # DF: one data chunk, the holes spelt out as zeroes
                got: list[tuple[int, bytes]] = []

                def chunk(sub: bytes, o: int, status: int, err: int,
                          got: list[tuple[int, bytes]] = got) -> int:
                    assert status == nbd.READ_DATA
                    got.append((o, bytes(sub)))
                    return 0
                buf = h.pread_structured(n, off, chunk, nbd.CMD_FLAG_DF)
                assert buf == data[off:off + n], (off, n)
                assert got == [(off, data[off:off + n])], (off, n)
    finally:
        h.shutdown()


def test_replies_the_socket_cannot_take_at_once(nbdsrv: NbdServer, pool: Path) -> None:
    """48 MiB of 1 MiB reads in flight while the client reads nothing: most replies meet a full socket,
    and each must still arrive whole and in place."""
    path, data = _image(pool, "disk-0", 16 * MiB)
    h = _connect(nbdsrv, volid(path), structured=True)
    try:
        bufs = []
        for i in range(48):
            off = (i * 5 * MiB // 3) % (15 * MiB)
            b = nbd.Buffer(MiB)
            h.aio_pread(b, off)
            bufs.append((off, b))
        time.sleep(0.5)  # the server writes until the socket is full, then buffers the rest
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for off, b in bufs:
            assert b.to_bytearray() == data[off:off + MiB], off
    finally:
        h.shutdown()


def test_qemu_io_patterns_and_nbdcopy(nbdsrv: NbdServer, pool: Path, tmp_path: Path) -> None:
    path, data = _image(pool, "disk-0", 8 * MiB)
    uri = nbdsrv.uri(volid(path))
    # writes not yet flushed: the server cannot ask SEEK_DATA cheaply and sends the range as data
    out = run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0xa5 64k 1M", "-c", "read -P 0xa5 64k 1M",
              "-c", "read -P 0xa5 128k 512k", "-c", "write -z 2M 1M", "-c", "read -P 0 2M 1M",
              "-c", "flush", "-c", "read -P 0xa5 64k 1M", uri)
    assert b"Pattern verification failed" not in out.stdout + out.stderr
    assert out.stdout.count(b"read 1048576/1048576 bytes") == 3, out.stdout
    expect = bytearray(data)
    expect[64 * 1024:64 * 1024 + MiB] = b"\xa5" * MiB
    expect[2 * MiB:3 * MiB] = bytes(MiB)
    copy = tmp_path / "copy.raw"
    run(peer("nbdcopy"), uri, str(copy))
    assert copy.read_bytes() == bytes(expect)
    assert path.read_bytes() == bytes(expect)


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
@pytest.mark.parametrize("bs", ["4k", "256k", "12k"])
def test_fio_verify_crc32c_then_compare(nbdsrv: NbdServer, pool: Path, tmp_path: Path, bs: str) -> None:
    """fio writes random blocks with crc32c headers and reads every one back through the server (4 KiB:
    inline writes; 12 KiB: inline too, three pages; 256 KiB: the I/O pool and sendfile reads); then the
    export and the file compare equal through qemu-img."""
    r = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True)
    if not any(line.strip() == "nbd" for line in r.stdout.splitlines()):
        if in_ci():
            raise AssertionError("fio has no nbd engine")
        pytest.skip("fio has no nbd engine")
    path, _ = _image(pool, "disk-0", 16 * MiB)
    uri = nbdsrv.uri(volid(path))
    res = subprocess.run(["fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                          f"--bs={bs}", "--iodepth=16", "--size=16M", "--verify=crc32c",
                          "--verify_fatal=1", "--do_verify=1", "--output-format=terse"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "verify" not in res.stderr.lower() or "bad" not in res.stderr.lower(), res.stderr
    cmp = subprocess.run([peer("qemu-img"), "compare", "-U", "-f", "raw", "-F", "raw", str(path), uri],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def _qcow2_chain(pool: Path, tmp_path: Path) -> tuple[Path, bytes]:
    """A qcow2 over a qcow2 backing file, with data, zero, unallocated and compressed clusters; the
    bytes qemu-img reads from it."""
    base = create_image(disk_path(pool, "disk-8", "qcow2", base=True), "qcow2", "8M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x11 0 4M", "-c", "write -P 0x12 6M 1M", base)
    top = disk_path(pool, "disk-9", "qcow2")
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, "10M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x22 1M 1M", "-c", "write -z 2M 512k",
        "-c", "write -c -P 0x33 5M 64k", "-c", "write -P 0x44 9M 1M", top)
    expect = tmp_path / "expect.raw"
    run(peer("qemu-img"), "convert", "-f", "qcow2", "-O", "raw", top, expect)
    return top, expect.read_bytes()


def test_qcow2_driver_locates_cached_runs(pool: Path, tmp_path: Path) -> None:
    from imagecore.formats import open_image

    top, data = _qcow2_chain(pool, tmp_path)

    async def main() -> None:
        drv = await open_image(str(top), "qcow2")
        try:
            assert drv.host_runs_nowait(0, 4 * MiB) is None  # its L2 tables are not loaded yet
            await drv.readinto(0, memoryview(bytearray(4 * MiB)))
            runs = drv.host_runs_nowait(0, 4 * MiB)
            assert runs is not None, "cached data, zero and backing clusters are located inline"
            assert sum(r[0] for r in runs) == 4 * MiB
            pos = 0
            for n, fd, host in runs:  # every run reads as the image does
                want = data[pos:pos + n]
                assert (os.pread(fd, n, host) if fd >= 0 else bytes(n)) == want, (pos, n)
                pos += n
            assert drv.host_runs_nowait(5 * MiB, 64 * 1024) is None  # compressed: decompressed instead
        finally:
            await drv.close()

    asyncio.run(main())


@pytest.mark.parametrize("structured", [True, False])
def test_qcow2_chain_reads_match_qemu_img(nbdsrv: NbdServer, pool: Path, tmp_path: Path,
                                          structured: bool) -> None:
    top, data = _qcow2_chain(pool, tmp_path)
    h = _connect(nbdsrv, volid(top), structured=structured)
    try:
        for off, n in ((0, 4 * MiB), (MiB - 64 * 1024, 2 * MiB), (4 * MiB, 2 * MiB), (5 * MiB, 64 * 1024),
                       (6 * MiB, 4 * MiB), (0, 10 * MiB), (9 * MiB + 4096, 256 * 1024)):
            assert h.pread(n, off) == data[off:off + n], (off, n)
        # written through the server, then read back before and after a flush
        h.pwrite(b"\x55" * (3 * MiB), 3 * MiB)
        expect = data[:3 * MiB] + b"\x55" * (3 * MiB) + data[6 * MiB:]
        assert h.pread(4 * MiB, 2 * MiB) == expect[2 * MiB:6 * MiB]
        h.flush()
        assert h.pread(10 * MiB, 0) == expect
    finally:
        h.shutdown()
    out = run(peer("qemu-img"), "check", "-U", top)
    assert b"No errors were found" in out.stdout


def _serve_and_connect(pool: Path, tmp_path: Path, volume: str) -> tuple[NbdServer, nbd.NBD]:
    """A server for the SIGKILL tests and a structured-reply client on ``volume`` (the server killed if
    the connection fails)."""
    srv = start_server(tmp_path / "run", pool=pool)
    try:
        return srv, _connect(srv, volume, structured=True)
    except BaseException:
        srv.proc.kill()
        srv.proc.wait()
        raise


def _write_flush_kill(srv: NbdServer, h: nbd.NBD, expect: bytearray, last_at: int) -> None:
    """The SIGKILL tests' batch on an 8 MiB disk, all in flight together: 200 scattered 4 KiB writes, then
    an unaligned one, 512 KiB, 64 KiB and 128 KiB at ``last_at`` (every fiftieth with FUA); ``expect``
    takes each. Then a flush, and the server is killed without a chance to clean up."""
    writes = [(i * 4096 * 37 % (8 * MiB - 4096), 4096) for i in range(200)]
    writes += [(3 * MiB + 100, 5000), (5 * MiB, 512 * 1024), (MiB, 64 * 1024), (last_at, 128 * 1024)]
    for k, (off, n) in enumerate(writes):
        buf = bytes([k % 251 + 1]) * n
        h.aio_pwrite(buf, off, flags=nbd.CMD_FLAG_FUA if k % 50 == 7 else 0)
        expect[off:off + n] = buf
    while h.aio_in_flight() > 0:
        h.poll(-1)
    h.flush()
    srv.proc.kill()
    srv.proc.wait()


def test_flushed_writes_survive_sigkill(pool: Path, tmp_path: Path) -> None:
    """Writes of every path (inline, pooled, unaligned, FUA) acknowledged and flushed are in the file once
    the server is killed without a chance to clean up."""
    path, data = _image(pool, "disk-0", 8 * MiB)
    expect = bytearray(data)
    srv, h = _serve_and_connect(pool, tmp_path, volid(path))
    _write_flush_kill(srv, h, expect, 7 * MiB)
    del h
    assert path.read_bytes() == bytes(expect)


def test_qcow2_overwrites_in_place_without_a_task(pool: Path, tmp_path: Path) -> None:
    """Qcow2Driver.write_started writes in place into clusters the image alone owns, and only there: a
    cluster shared with an internal snapshot, a zero cluster, an unallocated one, or one that another
    write has in flight go to write()."""
    from imagecore.formats import open_image
    from imagecore.formats.qcow2.driver import Qcow2Driver

    img = create_image(disk_path(pool, "disk-5", "qcow2"), "qcow2", "4M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x11 0 2M", "-c", "write -z 2M 64k", img)
    run(peer("qemu-img"), "snapshot", "-c", "snap", img)
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x12 1M 64k", img)  # copied on write: COPIED again

    async def main() -> None:
        drv = await open_image(str(img), "qcow2", read_only=False)
        assert isinstance(drv, Qcow2Driver)
        try:
            await drv.readinto(0, memoryview(bytearray(4 * MiB)))  # the L2 table into the cache
            page = memoryview(b"\x77" * 4096)
            assert drv.write_started(0, page) is False  # shared with the snapshot
            started = drv.write_started(MiB + 4096, page)
            assert started is not False  # this image's own cluster
            if started is not True:
                await started
            assert drv.write_started(2 * MiB, page) is False  # zero cluster
            assert drv.write_started(3 * MiB, page) is False  # unallocated
            token = drv.inflight.add(MiB >> drv.cbits, (MiB >> drv.cbits) + 1)
            assert drv.write_started(MiB, page) is False  # another modifier holds the cluster
            drv.inflight.remove(token)
            await drv.flush()
        finally:
            await drv.close()

    asyncio.run(main())
    out = run(peer("qemu-io"), "-f", "qcow2", "-c", "read -P 0x77 1052672 4096", "-c", "read -P 0x12 1M 4096",
              "-c", "read -P 0x11 0 4096", img)
    assert b"Pattern verification failed" not in out.stdout, out.stdout
    check = run(peer("qemu-img"), "check", img)
    assert b"No errors were found" in check.stdout


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_qcow2_fio_overwrites_and_discards_then_check(nbdsrv: NbdServer, pool: Path, tmp_path: Path) -> None:
    """fio overwrites a fully allocated qcow2 with crc32c-verified random writes at QD16 (the in-place fast
    path), while another client discards and rewrites clusters of the same export (allocations and frees
    beside the fast path); every verified block reads back, and qemu-img finds the image clean and equal
    to what the server reads."""
    r = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True)
    if not any(line.strip() == "nbd" for line in r.stdout.splitlines()):
        if in_ci():
            raise AssertionError("fio has no nbd engine")
        pytest.skip("fio has no nbd engine")
    img = disk_path(pool, "disk-6", "qcow2")
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata,cluster_size=65536",
        img, "32M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x5a 0 32M", img)
    uri = nbdsrv.uri(volid(img))
    h = _connect(nbdsrv, volid(img), structured=True)
    try:
        fio = subprocess.Popen(["fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                                "--bs=4k", "--iodepth=16", "--offset=0", "--size=16M", "--verify=crc32c",
                                "--verify_fatal=1", "--do_verify=1", "--output-format=terse"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        # the other half: trims free clusters, writes allocate them again, while fio runs
        k = 0
        while fio.poll() is None and k < 2000:
            off = 16 * MiB + (k * 7 % 256) * 65536
            h.trim(65536, off)
            h.pwrite(bytes([k % 251 + 1]) * 8192, off + 4096)
            k += 1
        out, err = fio.communicate(timeout=120)
        assert fio.returncode == 0, out + err
        h.flush()
        tail = h.pread(16 * MiB, 16 * MiB)
    finally:
        h.shutdown()
    check = run(peer("qemu-img"), "check", "-U", img)
    assert b"No errors were found" in check.stdout, check.stdout
    got = tmp_path / "got.raw"
    run(peer("qemu-img"), "convert", "-U", "-f", "qcow2", "-O", "raw", img, got)
    assert got.read_bytes()[16 * MiB:] == tail


def test_qcow2_flushed_overwrites_survive_sigkill(pool: Path, tmp_path: Path) -> None:
    """Overwrites of a fully allocated qcow2 (the in-place path, inline or queued, beside FUA writes and
    allocating ones past the allocated part) acknowledged and flushed are in the image once the server is
    killed without a chance to clean up, and the image checks clean."""
    img = disk_path(pool, "disk-7", "qcow2")
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", img, "8M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x5a 0 6M", img)  # the last 2 MiB unallocated
    expect = bytearray(b"\x5a" * (6 * MiB) + bytes(2 * MiB))
    srv, h = _serve_and_connect(pool, tmp_path, volid(img))
    assert h.pread(8 * MiB, 0) == expect  # the L2 table into the server's cache
    _write_flush_kill(srv, h, expect, 6 * MiB + 8192)
    del h
    check = run(peer("qemu-img"), "check", img)
    assert b"No errors were found" in check.stdout, check.stdout
    got = tmp_path / "got.raw"
    run(peer("qemu-img"), "convert", "-f", "qcow2", "-O", "raw", img, got)
    data = got.read_bytes()
    # the first block that differs, not pytest's diff of 8 MiB
    bad = next((i for i in range(0, len(expect), 4096) if data[i:i + 4096] != expect[i:i + 4096]), None)
    assert len(data) == len(expect) and bad is None, f"the image differs at byte {bad}"


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_many_large_writes_in_flight_keep_their_own_bytes(nbdsrv: NbdServer, pool: Path, fmt: str) -> None:
    """Large payloads arriving while others are still being written (inline, queued to the I/O pool,
    merged, or qcow2's allocations): 96 writes of 256 KiB to 1 MiB, each of its own bytes, 32 in flight
    at a time, over the same offsets again and again.

    The NBD spec lets a server process requests in any order, so where two writes to one block were in
    flight together either may win; what must hold is that every 4 KiB block holds the bytes of one write
    that covered it, and never those of a write the client saw answered before it sent a later write
    there (that would be an acknowledged write undone). The image then reads the same through qemu-img."""
    size, block = 16 * MiB, 4096
    path = create_image(disk_path(pool, "disk-0", fmt), fmt, "16M")
    h = _connect(nbdsrv, volid(path), structured=True)
    writes: list[tuple[int, int, bytes]] = []
    answered: set[int] = set()
    answered_before: list[frozenset[int]] = []  # per write: the writes answered before it was sent

    def on_reply(k: int) -> Callable[[int], int]:
        def done(err: int) -> int:
            answered.add(k)
            return 1
        return done

    try:
        for k in range(96):
            n = (256 * 1024, 512 * 1024, MiB)[k % 3]
            off = (k * 5 * 256 * 1024) % (size - n)
            buf = bytes([(k * 7 + i) % 251 for i in range(251)]) * (n // 251) + bytes([k % 256]) * (n % 251)
            answered_before.append(frozenset(answered))
            h.aio_pwrite(buf, off, completion=on_reply(k))
            writes.append((off, n, buf))
            while h.aio_in_flight() >= 32:
                h.poll(-1)
        while h.aio_in_flight() > 0:
            h.poll(-1)
        h.flush()
        got = h.pread(size, 0)
    finally:
        h.shutdown()
    final = bytearray(size)
    for at in range(0, size, block):
        covering = [k for k, (off, n, _b) in enumerate(writes) if off <= at and at + block <= off + n]
        # a write still allowed to be the last: none covering this block was sent after its answer
        allowed = [k for k in covering if not any(k in answered_before[later] for later in covering)]
        piece = got[at:at + block]
        winner = next((k for k in allowed
                       if writes[k][2][at - writes[k][0]:at - writes[k][0] + block] == piece), None)
        if not covering:
            assert piece == bytes(block), at
            continue
        assert winner is not None, (f"block at {at}: not the bytes of any write allowed to be last there "
                                    f"(covering writes {covering}, allowed {allowed})")
        final[at:at + block] = piece
    model = pool.parent / f"model-{fmt}.raw"
    model.write_bytes(final)
    run(peer("qemu-img"), "compare", "-U", "-f", "raw", "-F", fmt, model, path)
