"""The foundation: extent merging, HostFile I/O and sparseness, and the error model's projections."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

import pytest

from imagecore import errors, hostio
from imagecore.extent import Extent, merge_extents
from imagecore.hostio import HostFile


def test_merge_joins_equal_adjacent_runs_only() -> None:
    runs = [
        Extent(0, 4096, data=True, zero=False, offset=8192),
        Extent(4096, 4096, data=True, zero=False, offset=12288),  # host-contiguous: merges
        Extent(8192, 4096, data=True, zero=False, offset=65536),  # host jump: new run
        Extent(12288, 4096, data=False, zero=True),
        Extent(16384, 4096, data=False, zero=True),
        Extent(20480, 4096, data=False, zero=True, depth=1, present=False),
    ]
    merged = list(merge_extents(runs))
    assert [(e.start, e.length) for e in merged] == [(0, 8192), (8192, 4096), (12288, 8192), (20480, 4096)]
    assert merged[0].offset == 8192
    # merging copies: the input runs are untouched
    assert runs[0].length == 4096


def test_every_error_class_projects_three_ways() -> None:
    seen = set()
    stack: list[type[errors.BlockError]] = [errors.BlockError]
    while stack:
        cls = stack.pop()
        seen.add(cls)
        stack.extend(cls.__subclasses__())
        assert isinstance(cls.errno, int) and cls.errno > 0
        assert isinstance(cls.json_class, str) and cls.json_class
        assert isinstance(cls.exit_code, int)
    assert errors.ReadOnlyError in seen and errors.CorruptImageError in seen
    assert errors.NoSpaceError.errno == errno.ENOSPC
    assert errors.ShutdownError.errno == errno.ESHUTDOWN


def test_oserror_mapping_keeps_the_host_errno() -> None:
    assert isinstance(errors.HostIOError.from_oserror(OSError(errno.ENOSPC, "full")), errors.NoSpaceError)
    e = errors.HostIOError.from_oserror(OSError(errno.EROFS, "ro"), "write")
    assert isinstance(e, errors.PermissionDeniedError) and "write" in str(e)
    e = errors.HostIOError.from_oserror(OSError(errno.EXDEV, "x"))
    assert e.errno == errno.EXDEV


async def test_hostfile_roundtrip_sparseness_and_zeroing(tmp_path: Path) -> None:
    path = tmp_path / "f.raw"
    path.write_bytes(b"")
    hf = HostFile.open(str(path), read_only=False)
    try:
        await hf.truncate(4 << 20)
        await hf.pwritev(1 << 20, [b"a" * 4096, memoryview(b"b" * 4096)])
        await hf.fdatasync()
        buf = bytearray(8192)
        assert await hf.readinto(1 << 20, memoryview(buf)) == 8192
        assert bytes(buf) == b"a" * 4096 + b"b" * 4096
        # the read is in the page cache now, so the inline path serves it
        again = bytearray(4096)
        n = hf.read_nowait(1 << 20, memoryview(again))
        assert n in (0, 4096) and (n == 0 or bytes(again) == b"a" * 4096)
        # reads past EOF are short and zero-filled
        tail = bytearray(b"\xff" * 8192)
        assert await hf.readinto((4 << 20) - 4096, memoryview(tail)) == 4096
        assert bytes(tail) == bytes(8192)
        # sparse layout is visible through SEEK_DATA/SEEK_HOLE
        assert hf.seek_data(0) == 1 << 20
        assert hf.seek_hole(1 << 20) >= (1 << 20) + 8192
        await hf.punch_hole(1 << 20, 4096)
        assert await hf.pread(1 << 20, 4096) == bytes(4096)
        await hf.zero_range((1 << 20) + 4096, 4096)
        assert await hf.pread((1 << 20) + 4096, 4096) == bytes(4096)
        assert hf.size() == 4 << 20
    finally:
        hf.close()


def test_hostfile_data_runs(tmp_path: Path) -> None:
    """Data and holes as SEEK_DATA/SEEK_HOLE see them, a hole to the end of the range once one reaches the
    end of the file, and at most the runs asked for."""
    path = tmp_path / "r.raw"
    with open(path, "wb") as f:
        f.truncate(2 << 20)
        f.write(b"a" * 4096)
        f.seek(1 << 20)
        f.write(b"b" * 8192)
    hf = HostFile.open(str(path), read_only=True)
    try:
        mib = 1 << 20
        assert hf.data_runs(0, 3 * mib) == [(0, 4096, True), (4096, mib, False), (mib, mib + 8192, True),
                                            (mib + 8192, 3 * mib, False)]
        assert hf.data_runs(2048, mib + 4096, max_runs=2) == [(2048, 4096, True), (4096, mib, False)]
        assert hf.data_runs(8192, 16384) == [(8192, 16384, False)]
        assert hf.data_runs(3 * mib, 4 * mib) == [(3 * mib, 4 * mib, False)]
        assert hf.data_runs(5, 5) == []
    finally:
        hf.close()


async def test_hostfile_writes_more_buffers_than_one_pwritev_takes(tmp_path: Path) -> None:
    """A write of thousands of small pieces (clusters of 512 bytes, say) is not refused with EINVAL
    because pwritev(2) takes at most IOV_MAX (1024) buffers."""
    path = tmp_path / "f.raw"
    path.write_bytes(b"")
    hf = HostFile.open(str(path), read_only=False)
    pieces = [bytes([i % 251]) * 512 for i in range(5000)]
    try:
        await hf.pwritev(4096, pieces)
        assert await hf.pread(4096, 5000 * 512) == b"".join(pieces)
    finally:
        hf.close()


async def test_hostfile_start_writeback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """start_writeback hands the file to sync_file_range(SYNC_FILE_RANGE_WRITE) on a worker and returns
    at once, one call at a time; it does nothing on a read-only file, without syncs or after close, and a
    close right after it is safe. (The kernel call itself is recorded on its way through, and made.)"""
    real = hostio._sync_file_range_fn()
    assert real is not None  # Linux has it
    calls: list[int] = []
    gate = threading.Event()

    def recording(fd: int) -> None:
        gate.wait(5)
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(hostio, "_sync_file_range", recording)
    monkeypatch.setattr(hostio, "_sync_file_range_loaded", True)
    path = tmp_path / "wb.raw"
    path.write_bytes(b"")
    hf = HostFile.open(str(path), read_only=False)
    try:
        await hf.pwritev(0, [bytes([7]) * (1 << 20)] * 4)
        hf.start_writeback()
        hf.start_writeback()  # the first one is still under way: not a second
        gate.set()
        for _ in range(500):
            if hf._writeback is None:
                break
            await asyncio.sleep(0.01)
        assert calls == [hf.fd]
        gate.clear()
        hf.start_writeback()
        fd = hf.fd
    finally:
        gate.set()
        hf.close()  # a call under way ends first (holding the fd); one not yet begun does nothing
    for _ in range(500):
        if hf._writeback is None:
            break
        await asyncio.sleep(0.01)
    assert calls in ([fd], [fd, fd])
    calls[:] = [fd, fd]
    hf.start_writeback()  # closed: nothing
    ro = HostFile.open(str(path), read_only=True)
    try:
        ro.start_writeback()
    finally:
        ro.close()
    unsynced = HostFile.open(str(path), read_only=False)
    unsynced.sync_enabled = False
    try:
        await unsynced.pwrite(0, b"y" * 4096)
        unsynced.start_writeback()
    finally:
        unsynced.close()
    assert calls == [fd, fd]
    assert path.read_bytes()[:4097] == b"y" * 4096 + bytes([7])


async def test_hostfile_refuses_writes_when_read_only(tmp_path: Path) -> None:
    path = tmp_path / "ro.raw"
    path.write_bytes(bytes(4096))
    hf = HostFile.open(str(path), read_only=True)
    try:
        with pytest.raises(errors.ReadOnlyError):
            await hf.pwrite(0, b"x")
    finally:
        hf.close()


def test_hostfile_open_errors_are_block_errors(tmp_path: Path) -> None:
    with pytest.raises(errors.NotFoundError, match="Could not open"):
        HostFile.open(str(tmp_path / "missing"), read_only=True)
    link = tmp_path / "link"
    os.symlink(tmp_path / "elsewhere", link)
    (tmp_path / "elsewhere").write_bytes(b"")
    with pytest.raises(errors.BlockError):
        HostFile.open(str(link), read_only=True, follow_symlinks=False)
