"""The raw format: guest bytes map one to one onto the host file; sparseness comes from the file system."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator, Iterator, Mapping

from ..driver import (
    FILE_CREATE_OPTIONS,
    PROBE_BYTES,
    BlockDriver,
    Capabilities,
    CreateOption,
    FormatSpec,
    ImageOpener,
    OpenContext,
    probe_bytes,
    register_format,
)
from ..errors import HostIOError, InvalidArgumentError, ReadOnlyError, UnsupportedError
from ..extent import Extent
from ..hostio import HostFile, run_blocking
from ..qemuopts import parse_options

# qemu's raw format declares only the size; the file protocol adds these, and `create -o help FILE` shows
# both lists merged.
CREATE_OPTIONS: tuple[CreateOption, ...] = (
    CreateOption("size", "size", "Virtual disk size"),
)
PREALLOC_MODES = ("off", "falloc", "full")

_FULL_CHUNK = 1 << 20
# qemu's raw driver checks the first sector of a probed image (BLOCK_PROBE_BUF_SIZE there)
PROBE_SECTOR = 512


class RawDriver(BlockDriver):
    """A raw image on one HostFile; its size is the file's size."""

    format_name = "raw"
    # the format was guessed, not named: writes to the first sector are checked (_check_sector0)
    guard_sector0 = False

    def __init__(self, hf: HostFile, path: str) -> None:
        self.hf = hf
        self.filename = path
        # qemu's block layer counts in 512-byte sectors: an odd-sized file reads as zero up to the next one.
        self.size = (hf.size() + 511) & ~511
        self.backing = None
        writable = not hf.read_only
        self.caps = Capabilities(writable=writable, zero=writable, fast_zero=writable, trim=writable,
                                 flush=True, fua=writable, extents=True, multi_conn=True)

    async def readinto(self, offset: int, buf: memoryview) -> None:
        await self.hf.readinto(offset, buf)

    def readinto_nowait(self, offset: int, buf: memoryview) -> bool:
        # A short count is either the end of the file or an uncached page; the slow path tells them apart.
        return self.hf.read_nowait(offset, buf) == len(buf)

    def host_runs_nowait(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        hf = self.hf
        if not hf.zero_copy:
            return None
        end = offset + length
        if hf.has_unsynced_writes:
            # SEEK_DATA may be slow over dirty pages (see extents): the range as one data run, holes
            # included, when it is all cached
            if end <= hf.size() and hf.in_page_cache(offset, length):
                return [(length, hf.fd, offset)]
            return None
        runs = hf.data_runs(offset, end, 64)
        if runs[-1][1] < end:
            return None
        out: list[tuple[int, int, int]] = []
        for start, stop, data in runs:
            if not data:
                out.append((stop - start, -1, 0))
            elif hf.in_page_cache(start, stop - start):
                out.append((stop - start, hf.fd, start))
            else:
                return None
        return out

    def write_started(self, offset: int, data: memoryview) -> asyncio.Future[None] | bool:
        hf = self.hf
        if offset < PROBE_SECTOR and self.guard_sector0:
            return False
        if hf.pwrite_inline(offset, data):
            return True
        return hf.pwritev_started(offset, [data])

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        if offset < PROBE_SECTOR and self.guard_sector0:
            await self._check_sector0(offset, data)
        await self.hf.pwrite(offset, data)
        if fua:
            await self.hf.fdatasync()

    async def _check_sector0(self, offset: int, data: memoryview) -> None:
        """A raw image whose format was guessed must keep looking raw: a write that would give its first
        sector another format's header (and so, probed again, a backing file of the guest's choosing) is
        refused, as qemu's raw driver refuses it (EPERM)."""
        head = bytearray(await self.hf.pread(0, PROBE_SECTOR))
        head += bytes(PROBE_SECTOR - len(head))
        n = min(len(data), PROBE_SECTOR - offset)
        head[offset:offset + n] = data[:n]
        if probe_bytes(bytes(head) + bytes(PROBE_BYTES - PROBE_SECTOR), self.filename) != "raw":
            raise ReadOnlyError(os.strerror(errno.EPERM))

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool,
                           fua: bool = False) -> None:
        if length <= 0:
            return
        done = False
        if may_trim:
            try:
                await self.hf.punch_hole(offset, length)
                done = True
            except UnsupportedError:
                pass
        if not done:
            try:
                await self.hf.zero_range(offset, length)
                done = True
            except UnsupportedError:
                if fast:
                    raise UnsupportedError("zeroing this range is not cheap here") from None
        if not done:
            await self.hf.write_zeroes_slow(offset, length)
        if fua:
            await self.hf.fdatasync()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        try:
            await self.hf.punch_hole(offset, length)
        except UnsupportedError:
            # Trim is advisory; a file system without hole punching just keeps the data.
            return
        if fua:
            await self.hf.fdatasync()

    async def flush(self) -> None:
        await self.hf.fdatasync()

    def may_need_flush(self) -> bool:
        # every change to the file goes through the HostFile, which counts it
        return self.hf.has_unsynced_writes

    async def extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        end = min(offset + length, self.size)
        pos = offset
        # The first batch is two runs (one, and where it ends), and the batches grow while the caller
        # keeps asking: a block-status request with NBD_CMD_FLAG_REQ_ONE (QEMU's always has it) wants one
        # run, and looking up 1024 for each made `qemu-img map` over NBD of a raw file with 16,384 runs
        # take 19-20 s instead of about 1 (server and client on one CPU).
        batch = 2
        while pos < end:
            # SEEK_DATA can take milliseconds on a file with many dirty pages: while we have unsynced
            # writes the walk runs on the I/O pool (one hop maps many runs); otherwise it is a pair of
            # cheap lseeks, done inline so that the server's sparse reads pay no thread hop.
            if self.hf.has_unsynced_writes:
                runs = await run_blocking(self._runs_sync, pos, end, batch)
            else:
                runs = self._runs_sync(pos, end, batch)
            for start, stop, data in runs:
                yield Extent(start, stop - start, data=data, zero=not data, offset=start)
            pos = runs[-1][1]
            batch = min(batch * 16, 1024)

    def extents_lookahead(self) -> bool:
        return True  # runs are looked up as they are asked for

    def extents_nowait(self, offset: int, length: int) -> Iterator[Extent] | None:
        # the lseeks inline while nothing is unsynced (see extents)
        if self.hf.has_unsynced_writes:
            return None
        return (Extent(start, stop - start, data=data, zero=not data, offset=start)
                for start, stop, data in self.hf.iter_data_runs(offset, min(offset + length, self.size)))

    def _runs_sync(self, pos: int, end: int, max_runs: int = 1024) -> list[tuple[int, int, bool]]:
        """(start, stop, is_data) runs from ``pos`` towards ``end``: at least one, at most ``max_runs``."""
        return self.hf.data_runs(pos, end, max_runs)

    async def close(self) -> None:
        self.hf.close()

    def data_host_file(self) -> HostFile | None:
        return self.hf


class FileProtocolDriver(RawDriver):
    """The file protocol opened alone (``json:{"driver":"file",...}``): raw's behaviour, qemu's name."""

    format_name = "file"


async def open_raw(hf: HostFile, ctx: OpenContext) -> BlockDriver:
    if ctx.options.get("protocol_only"):
        return FileProtocolDriver(hf, ctx.path)
    drv = RawDriver(hf, ctx.path)
    drv.guard_sector0 = bool(ctx.options.get("probed")) and not ctx.read_only
    return drv


def _parse_prealloc(options: Mapping[str, str]) -> str:
    mode = options.get("preallocation", "off")
    if mode not in (*PREALLOC_MODES, "metadata"):
        raise InvalidArgumentError(f"invalid parameter value: {mode}")
    return mode


def _resize(fd: int, size: int) -> None:
    """ftruncate with qemu's messages; a size past off_t is what the kernel calls EINVAL."""
    try:
        if size >= 1 << 63:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        os.ftruncate(fd, size)
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            # qemu-img create turns any EFBIG into this, whatever the format's driver said
            raise InvalidArgumentError("The image size is too large for file format 'raw'") from None
        raise HostIOError.from_oserror(exc, "Could not resize file") from None


def _create_sync(path: str, size: int, prealloc: str) -> None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise HostIOError.from_oserror(exc, f"Could not create '{path}'") from None
    # The block layer works in 512-byte sectors, so qemu rounds the file up to whole sectors.
    size = (size + 511) & ~511
    try:
        if prealloc == "metadata":
            # a mode qemu knows and its file driver refuses once the file is made (and left, empty)
            raise InvalidArgumentError(f"Unsupported preallocation mode: {prealloc}")
        _resize(fd, size)
        if prealloc == "falloc" and size > 0:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                raise HostIOError.from_oserror(exc, "Could not preallocate data for the new file") from None
        elif prealloc == "full":
            zero = bytes(min(size, _FULL_CHUNK))
            pos = 0
            while pos < size:
                pos += os.pwrite(fd, memoryview(zero)[: min(len(zero), size - pos)], pos)
            os.fdatasync(fd)
        elif size > 0:
            # As qemu does: allocating the first block lets O_DIRECT users probe the alignment, and it
            # makes `map` of a fresh image look the same as one qemu-img made.
            os.pwrite(fd, bytes(4096 if size >= 4096 else 512), 0)
    except OSError as exc:
        raise HostIOError.from_oserror(exc, f"Could not create '{path}'") from None
    finally:
        os.close(fd)


async def create_raw(path: str, size: int, options: Mapping[str, str], *,
                     opener: ImageOpener | None = None, unsafe: bool = False) -> None:
    """Create a raw image of ``size`` bytes; ``options`` may carry ``preallocation``; no backing to check."""
    if size < 0:
        raise InvalidArgumentError("Image size must be positive")
    parse_options(options, (*CREATE_OPTIONS, *FILE_CREATE_OPTIONS))
    await run_blocking(_create_sync, path, size, _parse_prealloc(options))


register_format(FormatSpec(
    name="raw",
    open=open_raw,
    probe=None,
    create=create_raw,
    create_options=CREATE_OPTIONS,
    extensions=("raw",),
    open_options=("offset", "size"),
    file_create=True,
))
