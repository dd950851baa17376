"""The vmdk block driver: opens monolithic or descriptor-based images and routes I/O to their extents."""

from __future__ import annotations

import asyncio
import bisect
import os
import secrets
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from ...backing import extents_below, read_below
from ...driver import BlockDriver, Capabilities, CheckResult, OpenContext
from ...errors import (
    BlockError,
    CheckUnsupportedError,
    CorruptImageError,
    ImageFormatError,
    InvalidArgumentError,
    ReadOnlyError,
    UnsupportedError,
)
from ...extent import Extent, amerge_extents
from ...hostio import HostFile
from .descriptor import (
    DESCRIPTOR_CREATE_TYPES,
    MAX_DESCRIPTOR_BYTES,
    Descriptor,
    decode_text,
    parse_descriptor,
    replace_cid,
)
from .flat import FlatExtent, ZeroExtent
from .sparse import ImageLimits, SparseExtent, SparseHeader
from .spec import COWD_MAGIC, MAGIC
from .stream import SECTOR

__all__ = ["VmdkDriver", "check_vmdk", "open_vmdk"]

# Where qemu and VMware put the descriptor of a monolithic sparse file when the header does not say.
_EMBEDDED_DESC_OFFSET = 0x200
_EMBEDDED_DESC_SIZE = 20 * SECTOR

FillFn = Callable[[int, memoryview], Awaitable[None]]


class VmdkExtent(Protocol):
    start: int
    length: int
    name: str
    kind: str
    compressed: bool
    writable: bool

    async def readinto(self, rel: int, view: memoryview, fill: FillFn) -> None: ...
    def read_nowait(self, rel: int, view: memoryview) -> bool: ...
    async def write(self, rel: int, data: memoryview, fill: FillFn, *, has_backing: bool) -> None: ...
    async def write_zeroes(self, rel: int, length: int, fill: FillFn, *, has_backing: bool,
                           may_trim: bool = False) -> None: ...
    def extents(self, rel: int, length: int) -> AsyncIterator[Extent]: ...
    def info(self, filename: str, fmt: str) -> dict[str, object]: ...
    async def flush(self) -> None: ...


class VmdkDriver(BlockDriver):
    format_name = "vmdk"

    def __init__(self, hf: HostFile, ctx: OpenContext) -> None:
        self.hf = hf
        self.ctx = ctx
        self.filename = ctx.path
        self.read_only = ctx.read_only
        self.size = 0
        self.caps = Capabilities(writable=False)
        self.backing = None
        self.extents_: list[VmdkExtent] = []
        self._starts: list[int] = []
        self._ext_info: list[tuple[str, str]] = []  # (filename, format) per extent, for info
        self._files: list[HostFile] = []
        self.desc = Descriptor()
        self.create_type = ""
        self.cid = 0
        self.parent_cid = 0xFFFFFFFF
        # (offset, capacity or None for a stand-alone file) of the descriptor text inside self.hf
        self._desc_area: tuple[int, int | None] = (0, None)
        self._desc_text = ""
        self._cid_task: asyncio.Future[None] | None = None
        # convert -c's writes, one after another in the order they are made (a FIFO lock), so that a
        # stream-optimized extent appends its grains in that order, as qemu's does
        self._compressed_writes = asyncio.Lock()

    # -- opening ---------------------------------------------------------------------------------
    async def _open(self) -> None:
        hf, ctx = self.hf, self.ctx
        size = hf.size()
        if size < 4:
            raise ImageFormatError("File is too small, not a valid image")
        head = await hf.pread(0, SECTOR)
        if head[:4] == MAGIC:
            header = SparseHeader.parse(head, ctx.path)
            if header.capacity == 0 and header.desc_offset:
                # A sparse header that only carries a descriptor describing other extents.
                off = header.desc_offset * SECTOR
                cap = min(header.desc_size * SECTOR or MAX_DESCRIPTOR_BYTES, MAX_DESCRIPTOR_BYTES)
                await self._read_descriptor(off, cap)
                await self._open_descriptor_extents()
            else:
                ext = await SparseExtent.open(hf, start=0, name=ctx.path, writable=not ctx.read_only,
                                              header=header, limits=ImageLimits())
                self._add_extent(ext, ctx.path, "")
                off = header.desc_offset * SECTOR if header.desc_offset else _EMBEDDED_DESC_OFFSET
                cap = header.desc_size * SECTOR if header.desc_offset else _EMBEDDED_DESC_SIZE
                if cap <= 0 or off >= size:
                    raise ImageFormatError(f"'{ctx.path}' has no embedded VMDK descriptor")
                await self._read_descriptor(off, min(cap, MAX_DESCRIPTOR_BYTES))
                self.create_type = "streamOptimized" if ext.compressed else "monolithicSparse"
        elif head[:4] == COWD_MAGIC:
            raise UnsupportedError("VMFS sparse (COWD) vmdk extents are not supported")
        else:
            await self._read_descriptor(0, None)
            await self._open_descriptor_extents()
        self.cid = self.desc.cid
        self.parent_cid = self.desc.parent_cid
        if self.desc.parent_hint and not ctx.options.get("no_backing"):
            self.backing = await ctx.opener.open_backing(self.desc.parent_hint, "vmdk", ctx)
        self.size = self._starts[-1] + self.extents_[-1].length if self.extents_ else 0
        # Stream-optimized images take only append-style writes (what convert does), so they are never
        # advertised as writable to a server.
        writable = not ctx.read_only and all((e.writable and not e.compressed) or e.kind == "ZERO"
                                             for e in self.extents_)
        self.caps = Capabilities(writable=writable, zero=True, fast_zero=False, trim=False,
                                 flush=True, fua=True, extents=True, multi_conn=True)

    async def _read_descriptor(self, offset: int, capacity: int | None) -> None:
        length = capacity if capacity is not None else min(self.hf.size(), MAX_DESCRIPTOR_BYTES)
        raw = await self.hf.pread(offset, length)
        self._desc_area = (offset, capacity)
        self._desc_text = decode_text(raw)
        self.desc = parse_descriptor(self._desc_text)

    async def _open_descriptor_extents(self) -> None:
        ctx = self.ctx
        desc = self.desc
        if desc.create_type not in DESCRIPTOR_CREATE_TYPES:
            raise UnsupportedError(f"Unsupported image type '{desc.create_type[:64]}'")
        if not desc.extents:
            raise ImageFormatError("invalid VMDK image descriptor: it lists no extents")
        self.create_type = desc.create_type
        limits = ImageLimits.for_extents(sum(1 for line in desc.extents if line.type == "SPARSE"))
        start = 0
        for line in desc.extents:
            if line.access == "NOACCESS":
                raise UnsupportedError("vmdk extents with NOACCESS are not supported")
            if line.type == "ZERO":
                self._add_extent(ZeroExtent(start=start, length=line.sectors * SECTOR), "", "ZERO")
                start += line.sectors * SECTOR
                continue
            if line.type not in ("FLAT", "VMFS", "SPARSE"):
                raise UnsupportedError(f"Unsupported extent type '{line.type}'")
            assert line.filename is not None
            path = ctx.opener.resolve(line.filename, ctx.path)
            _refuse_special_file(path)
            writable = not ctx.read_only and line.access == "RW"
            xhf = ctx.opener.open_file(path, read_only=not writable)
            self._files.append(xhf)
            ext: VmdkExtent
            if line.type == "SPARSE":
                head = await xhf.pread(0, SECTOR)
                if head[:4] == COWD_MAGIC:
                    raise UnsupportedError("VMFS sparse (COWD) vmdk extents are not supported")
                header = SparseHeader.parse(head, path)
                if header.capacity == 0:
                    raise ImageFormatError(f"vmdk extent '{path}' has no capacity")
                ext = await SparseExtent.open(xhf, start=start, name=path, writable=writable, header=header,
                                              limits=limits)
            else:
                ext = FlatExtent(xhf, start=start, length=line.sectors * SECTOR, offset=line.offset * SECTOR,
                                 name=path, kind=line.type, writable=writable)
            self._add_extent(ext, path, line.type)
            start += ext.length

    def _add_extent(self, ext: VmdkExtent, filename: str, fmt: str) -> None:
        self.extents_.append(ext)
        self._starts.append(ext.start)
        self._ext_info.append((filename, fmt))

    # -- helpers ---------------------------------------------------------------------------------
    def _pieces(self, offset: int, length: int) -> list[tuple[VmdkExtent, int, int, int]]:
        """(extent, offset inside it, length, position in the request) covering the range."""
        out: list[tuple[VmdkExtent, int, int, int]] = []
        idx = bisect.bisect_right(self._starts, offset) - 1
        pos = 0
        while pos < length and 0 <= idx < len(self.extents_):
            ext = self.extents_[idx]
            rel = offset + pos - ext.start
            take = min(ext.length - rel, length - pos)
            if take > 0:
                out.append((ext, rel, take, pos))
                pos += take
            idx += 1
        return out

    async def _fill(self, offset: int, view: memoryview) -> None:
        """Unallocated data: from the backing file where it reaches, zeroes elsewhere."""
        await read_below(self.backing, offset, view)

    async def _touch_cid(self) -> None:
        """Give the image a new CID before its first change, as VMware and qemu do."""
        if self._cid_task is None:
            self._cid_task = asyncio.ensure_future(self._write_cid(secrets.randbits(32)))
        task = self._cid_task
        try:
            await task
        except Exception:
            # a host error may pass: the next change tries again (as qemu does) instead of failing forever
            if self._cid_task is task and task.done():
                self._cid_task = None
            raise

    async def _write_cid(self, cid: int) -> None:
        text = replace_cid(self._desc_text, cid)
        raw = text.encode("utf-8", errors="surrogateescape")
        offset, capacity = self._desc_area
        if capacity is not None:
            if len(raw) > capacity:
                raise ImageFormatError("vmdk descriptor does not fit its area after the CID update")
            # Pad only over the old text: the rest of the area is left exactly as it was.
            old = len(self._desc_text.encode("utf-8", errors="surrogateescape"))
            await self.hf.pwrite(offset, raw + bytes(max(0, old - len(raw))))
        else:
            await self.hf.pwrite(offset, raw)
            if len(raw) < self.hf.size() - offset:
                await self.hf.truncate(offset + len(raw))
        self._desc_text = text
        self.cid = cid

    def _check_write(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"'{self.filename}' is open read-only")

    # -- BlockDriver -----------------------------------------------------------------------------
    async def readinto(self, offset: int, buf: memoryview) -> None:
        for ext, rel, take, pos in self._pieces(offset, len(buf)):
            await ext.readinto(rel, buf[pos:pos + take], self._fill)

    def readinto_nowait(self, offset: int, buf: memoryview) -> bool:
        pieces = self._pieces(offset, len(buf))
        if len(pieces) != 1:
            return False
        ext, rel, _take, _pos = pieces[0]
        return ext.read_nowait(rel, buf)

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        self._check_write()
        await self._touch_cid()
        has_backing = self.backing is not None
        for ext, rel, take, pos in self._pieces(offset, len(data)):
            await ext.write(rel, data[pos:pos + take], self._fill, has_backing=has_backing)
        if fua:
            await self.flush()

    async def write_compressed(self, offset: int, data: memoryview) -> None:
        """convert -c's write of whole grains, as qemu's vmdk driver takes it: a stream-optimized extent
        stores every grain compressed anyway (deflated, behind its grain marker, appended; its grain
        table entry only once the grain is on disk), a hosted sparse extent stores ordinary grains.
        (A flat extent has no grains: convert refuses -c onto one, "invalid cluster size".)

        The writes are taken one at a time in the order they are called: a stream-optimized extent
        deflates a grain before it takes the file space for it, and concurrent writes would otherwise
        append their grains in the order their compression ends, not in guest order as qemu's (and a
        streaming reader) expects.
        """
        async with self._compressed_writes:
            await self.write(offset, data)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool,
                           fua: bool = False) -> None:
        if fast:
            raise UnsupportedError("fast zeroing is not supported by the vmdk driver")
        self._check_write()
        await self._touch_cid()
        has_backing = self.backing is not None
        for ext, rel, take, _pos in self._pieces(offset, length):
            await ext.write_zeroes(rel, take, self._fill, has_backing=has_backing, may_trim=may_trim)
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        # Discard is advisory and vmdk has no way to give grains back.
        self._check_write()
        if fua:
            await self.flush()

    async def flush(self) -> None:
        if self.read_only:
            return
        for ext in self.extents_:
            if isinstance(ext, SparseExtent):
                if ext.compressed:
                    await ext.finish_pending()
                await ext.write_back()
        seen: set[int] = set()
        for hf in [self.hf, *self._files]:
            if hf.fd not in seen and not hf.read_only:
                seen.add(hf.fd)
                await hf.fdatasync()

    async def extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        async for e in amerge_extents(self._raw_extents(offset, length)):
            yield e

    async def _raw_extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        for ext, rel, take, _pos in self._pieces(offset, length):
            async for e in ext.extents(rel, take):
                e.start += ext.start
                if e.present:
                    yield e
                    continue
                async for b in extents_below(self.backing, e.start, e.length):
                    yield b

    async def close(self) -> None:
        try:
            if self._cid_task is not None:
                # A failed CID update was already reported to the write that needed it.
                await asyncio.gather(self._cid_task, return_exceptions=True)
            if not self.read_only:
                for ext in self.extents_:
                    if isinstance(ext, SparseExtent):
                        if ext.compressed:
                            await ext.finish_pending()
                        # grain-table entries kept in memory until now reach the file
                        await ext.write_back()
        finally:
            self._close_files()
            if self.backing is not None:
                backing, self.backing = self.backing, None
                await backing.close()

    def _close_files(self) -> None:
        for hf in self._files:
            hf.close()
        self._files.clear()
        self.hf.close()

    # -- description -----------------------------------------------------------------------------
    def format_specific(self) -> dict[str, Any] | None:
        extents = [ext.info(name, fmt)
                   for ext, (name, fmt) in zip(self.extents_, self._ext_info, strict=True)]
        return {"type": "vmdk", "data": {"cid": self.cid, "parent-cid": self.parent_cid,
                                         "create-type": self.create_type, "extents": extents}}

    def cluster_size(self) -> int | None:
        first = self.extents_[0] if self.extents_ else None
        if not isinstance(first, SparseExtent):
            return None
        for ext in self.extents_[1:]:
            if (not isinstance(ext, SparseExtent) or ext.grain_bytes != first.grain_bytes
                    or ext.compressed != first.compressed):
                return None
        return first.grain_bytes

    def backing_filename(self) -> str | None:
        return self.desc.parent_hint

    def backing_format(self) -> str | None:
        return "vmdk" if self.desc.parent_hint else None

    def data_host_file(self) -> HostFile | None:
        return self.hf

    def data_file_name(self, offset: int) -> str:
        """The extent file holding guest ``offset`` (qemu-img map names it, not the descriptor)."""
        idx = bisect.bisect_right(self._starts, offset) - 1
        if 0 <= idx < len(self._ext_info) and self._ext_info[idx][0]:
            return self._ext_info[idx][0]
        return self.filename

    def host_files(self) -> list[HostFile]:
        """The descriptor file and every extent file: qemu-img sums them all for actual-size."""
        return [self.hf, *self._files]


def _refuse_special_file(path: str) -> None:
    """A FIFO or device named as an extent would hang the open or read a host device; refuse it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # opening reports it
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise ImageFormatError(f"vmdk extent '{path}' is not a regular file or block device")


async def open_vmdk(hf: HostFile, ctx: OpenContext) -> VmdkDriver:
    drv = VmdkDriver(hf, ctx)
    try:
        await drv._open()
    except BaseException:
        drv._close_files()
        if drv.backing is not None:
            await drv.backing.close()
        raise
    return drv


async def check_vmdk(hf: HostFile, ctx: OpenContext, repair: str | None) -> CheckResult:
    """qemu's vmdk check: every allocated grain (and flat extent start) must lie inside its file."""
    if repair is not None:
        raise CheckUnsupportedError("This image format does not support checks")
    try:
        drv = await open_vmdk(hf, ctx)
    except BlockError as exc:
        # qemu-img could not open the image: its words, not a failed check
        exc.open_failure = True  # type: ignore[attr-defined]
        raise
    try:
        for ext in drv.extents_:
            problem = await _check_extent(ext)
            if problem is not None:
                # qemu prints the finding itself, then fails the check with EINVAL.
                sys.stderr.write(problem + "\n")
                raise InvalidArgumentError("Invalid argument")
    finally:
        await drv.close()
    return CheckResult()


async def _check_extent(ext: VmdkExtent) -> str | None:
    first_sector = ext.start // SECTOR
    if isinstance(ext, FlatExtent):
        if ext.offset >= ext.hf.size():
            return f"ERROR: cluster offset for sector {first_sector} points after EOF"
        return None
    if not isinstance(ext, SparseExtent):
        return None
    file_size = ext.hf.size()
    gs = ext.header.grain_sectors
    grains = -(-ext.length // ext.grain_bytes)
    for gt_idx, gt_sector in enumerate(ext.gd):
        if gt_sector == 0:
            continue
        base = gt_idx * ext.gtes
        try:
            entries = [await ext.gte(g) for g in range(base, min(base + ext.gtes, grains))]
        except CorruptImageError:
            return f"ERROR: could not get cluster_offset for sector {first_sector + base * gs}"
        for i, gte in enumerate(entries):
            if gte == 0 or (gte == 1 and ext.zero_grain):
                continue
            if gte * SECTOR >= file_size:
                return f"ERROR: cluster offset for sector {first_sector + (base + i) * gs} points after EOF"
    return None
