"""The vpc block driver (fixed and dynamic VHD) and its create, the dynamic kind on the shared block table.

Open follows qemu 7.2: the footer at offset 0, else (a fixed image) at the end of the file; the virtual
size from the geometry unless the creator application is one that sizes by the footer's current size.
A new block of a dynamic image goes where the footer is: the footer moves first to the new end of the
file, then the block's sector bitmap (all ones, as qemu writes it) replaces the old footer, and the BAT
entry follows on write-back, after the data is durable. qemu has no check for vpc (exit code 63).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from ...driver import BlockDriver, Capabilities, ImageOpener, OpenContext
from ...errors import HostIOError, ImageFormatError, InvalidArgumentError, UnsupportedError
from ...extent import Extent
from ...hostio import HostFile, run_blocking
from ...qemuopts import parse_bool
from ..blocktable import MAX_TABLE_PAST_EOF, BlockTableDriver, decode_table
from .spec import (
    COOKIE,
    CURRENT_SIZE_CREATORS,
    DEFAULT_BLOCK_SIZE,
    DYN_COOKIE,
    DYN_HEADER,
    DYN_HEADER_SIZE,
    FOOTER,
    FOOTER_SIZE,
    MAX_GEOMETRY,
    MAX_SECTORS,
    SECTOR,
    TIMESTAMP_BASE,
    TYPE_DYNAMIC,
    TYPE_FIXED,
    UNUSED,
    checksum,
    rounded_geometry,
)

__all__ = ["VpcDynamicDriver", "VpcFixedDriver", "create_vpc", "open_vpc"]

_INT_MAX = 0x7FFFFFFF
# past this, qemu's block layer refuses the read itself (an offset beyond its largest length)
_MAX_OFFSET = (1 << 63) - (1 << 30)


class VpcFixedDriver(BlockDriver):
    """A fixed VHD: guest bytes at the same offsets in the file, the footer after them."""

    format_name = "vpc"

    def __init__(self, hf: HostFile, ctx: OpenContext, size: int) -> None:
        self.hf = hf
        self.filename = ctx.path
        self.size = size
        self.backing = None
        self._read_only = ctx.read_only
        writable = not ctx.read_only
        self.caps = Capabilities(writable=writable, zero=writable, fast_zero=False, trim=False,
                                 flush=True, fua=writable, extents=True, multi_conn=True)

    async def readinto(self, offset: int, buf: memoryview) -> None:
        await self.hf.readinto(offset, buf)

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        await self.hf.pwrite(offset, data)
        if fua:
            await self.hf.fdatasync()

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool,
                           fua: bool = False) -> None:
        if length <= 0:
            return
        try:
            await self.hf.zero_range(offset, length)
        except UnsupportedError:
            if fast:
                raise
            await self.hf.write_zeroes_slow(offset, length)
        if fua:
            await self.hf.fdatasync()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        return None  # qemu's vpc driver does not discard

    async def flush(self) -> None:
        await self.hf.fdatasync()

    async def extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        # qemu maps a fixed image through the file (BDRV_BLOCK_RAW): holes read as zeroes and stay data
        end = min(offset + length, self.size)
        if offset >= end:
            return
        for start, stop, is_data in self.hf.iter_data_runs(offset, end):
            yield Extent(start, stop - start, data=True, zero=not is_data, offset=start)

    async def close(self) -> None:
        self.hf.close()

    def data_host_file(self) -> HostFile | None:
        return self.hf


class VpcDynamicDriver(BlockTableDriver):
    format_name = "vpc"
    big_endian = True

    def __init__(self, hf: HostFile, ctx: OpenContext, footer: bytes, size: int, block_size: int,
                 table_offset: int) -> None:
        self.hf = hf
        self.filename = ctx.path
        self.footer = footer
        self.size = size
        self.backing = None
        self.block_size = block_size
        self.bitmap_size = (block_size // (8 * SECTOR) + 511) & ~511
        self.table_offset = table_offset
        self.free = 0  # where the next block's bitmap goes (where the footer is)
        self.init_table(ctx.read_only)
        # blocks whose sector bitmap is known to be all ones (qemu sets every bit before it writes a block)
        self._full_bitmaps: set[int] = set()
        writable = not ctx.read_only
        self.caps = Capabilities(writable=writable, zero=writable, fast_zero=False, trim=False,
                                 flush=True, fua=writable, extents=True, multi_conn=True)

    def block_host(self, entry: int) -> int | None:
        if entry == UNUSED:
            return None
        return int(entry) * SECTOR + self.bitmap_size

    async def place_block(self, index: int) -> int:
        start = self.free
        if start // SECTOR >= UNUSED:
            raise ImageFormatError("vpc image has no room left for another block")
        new_free = start + self.bitmap_size + self.block_size
        old_size = self.hf.size()
        # the footer first, at the new end: a crash from here on leaves a valid image with spare space
        await self.hf.pwrite(new_free, self.footer)
        if self.bitmap_size:
            await self.hf.pwrite(start, b"\xff" * self.bitmap_size)
        data = start + self.bitmap_size
        if data < old_size:
            # the old footer, or space a crash left behind, lies where the new block's data goes
            stop = min(new_free, old_size)
            try:
                await self.hf.zero_range(data, stop - data)
            except UnsupportedError:
                await self.hf.write_zeroes_slow(data, stop - data)
        self.free = new_free
        self._full_bitmaps.add(index)
        return start // SECTOR

    async def touch_block(self, index: int, entry: int) -> None:
        if index in self._full_bitmaps or not self.bitmap_size:
            return
        # a block another tool wrote may mark some sectors absent; qemu sets them all before writing
        await self.hf.pwrite(int(entry) * SECTOR, b"\xff" * self.bitmap_size)
        self._full_bitmaps.add(index)


def _check_offset(offset: int, length: int, message: str) -> None:
    if offset + length > _MAX_OFFSET:
        raise ImageFormatError(message)


def _size_calc(ctx: OpenContext) -> str | None:
    """The ``force_size_calc`` open option: ``chs`` or ``current_size`` overrides the creator table."""
    value = ctx.options.get("force_size_calc")
    if value is None:
        return None
    if value not in ("chs", "current_size"):
        raise InvalidArgumentError(f"Invalid size calculation mode: '{value}'")
    return str(value)


async def open_vpc(hf: HostFile, ctx: OpenContext) -> BlockDriver:
    size_calc = _size_calc(ctx)
    file_size = hf.size()
    raw = await hf.pread(0, FOOTER_SIZE)
    fixed = False
    if raw[:8] != COOKIE:
        # qemu's block layer sees a file's length in whole sectors, zeroes after its end
        sectors_end = -(-file_size // SECTOR) * SECTOR
        if sectors_end < FOOTER_SIZE:
            raise ImageFormatError("File too small for a VHD header")
        raw = await hf.pread(sectors_end - FOOTER_SIZE, FOOTER_SIZE)
        raw = raw + bytes(FOOTER_SIZE - len(raw))
        # only a fixed image keeps its one footer at the end
        if raw[:8] != COOKIE or FOOTER.unpack(raw)["disk_type"] != TYPE_FIXED:
            raise ImageFormatError("invalid VPC image")
        fixed = True
    raw = raw + bytes(FOOTER_SIZE - len(raw))
    footer = FOOTER.unpack(raw)
    if checksum(raw, FOOTER.offset("checksum")) != footer["checksum"]:
        raise ImageFormatError("Incorrect header checksum")
    sectors = (footer["disk_geometry_cylinders"] * footer["disk_geometry_heads"]
               * footer["disk_geometry_sectors"])
    # Virtual PC sizes a disk by its geometry, Hyper-V and others by the footer's current size; the
    # largest geometry always means the current size (the geometry cannot say more), whatever the
    # force_size_calc option says
    use_chs = footer["creator_application"] not in CURRENT_SIZE_CREATORS or size_calc == "chs"
    if not use_chs or sectors == MAX_GEOMETRY or size_calc == "current_size":
        sectors = footer["current_size"] // SECTOR
    if sectors > MAX_SECTORS:
        raise ImageFormatError(f"Could not open '{ctx.path}': File too large")
    size = sectors * SECTOR
    if fixed:
        return VpcFixedDriver(hf, ctx, size)
    _check_offset(footer["data_offset"], DYN_HEADER_SIZE, "Error reading dynamic VHD header")
    dyn = DYN_HEADER.unpack(await hf.pread(footer["data_offset"], DYN_HEADER_SIZE))
    if dyn["cookie"] != DYN_COOKIE:
        raise ImageFormatError("Invalid header magic")
    block_size = dyn["block_size"]
    if block_size < SECTOR or block_size & (block_size - 1):
        raise ImageFormatError(f"Invalid block size {block_size}")
    entries = dyn["max_table_entries"]
    signed = entries - (1 << 32) if entries >= 1 << 31 else entries
    if signed >= 0 and entries * block_size < size:
        raise ImageFormatError("Page table too small")
    if signed < 0 or signed > _INT_MAX // 4:
        raise ImageFormatError(f"Max Table Entries too large ({signed})")
    bat_offset = dyn["table_offset"]
    _check_offset(bat_offset, entries * 4, "Error reading pagetable")
    if bat_offset + entries * 4 > file_size and entries * 4 > MAX_TABLE_PAST_EOF:
        raise ImageFormatError("block-vpc: free_data_block_offset points after the end of file. "
                               "The image has been truncated.")
    drv = VpcDynamicDriver(hf, ctx, raw, size, block_size, bat_offset)
    drv.table = decode_table(await hf.pread(bat_offset, entries * 4), entries, big_endian=True)
    free = (bat_offset + entries * 4 + 511) & ~511
    last = max((e for e in drv.table if e != UNUSED), default=None)
    if last is not None:
        free = max(free, last * SECTOR + drv.bitmap_size + block_size)
    if free > file_size:
        raise ImageFormatError("block-vpc: free_data_block_offset points after the end of file. "
                               "The image has been truncated.")
    drv.free = free
    return drv


# -- create -------------------------------------------------------------------------------------------

def _bool_option(options: Mapping[str, str], name: str) -> bool:
    return parse_bool(name, options.get(name, "off"))


def _too_large() -> InvalidArgumentError:
    # qemu's EFBIG, which qemu-img create words for the format
    return InvalidArgumentError("The image size is too large for file format 'vpc'")


def make_footer(size: int, chs: tuple[int, int, int], disk_type: int, force_size: bool,
                data_offset: int) -> bytes:
    values: dict[str, Any] = {
        "cookie": COOKIE, "features": 2, "file_format_version": 0x00010000, "data_offset": data_offset,
        "time_stamp": (int(time.time()) - TIMESTAMP_BASE) & 0xFFFFFFFF,
        "creator_application": b"qem2" if force_size else b"qemu",
        "creator_version_major": 5, "creator_version_minor": 3, "creator_host_os": b"Wi2k",
        "original_size": size, "current_size": size, "disk_geometry_cylinders": chs[0],
        "disk_geometry_heads": chs[1], "disk_geometry_sectors": chs[2], "disk_type": disk_type,
        "unique_id": uuid.uuid4().bytes,
    }
    raw = FOOTER.pack(values)
    values["checksum"] = checksum(raw, FOOTER.offset("checksum"))
    return FOOTER.pack(values)


def _create_sync(path: str, size: int, fixed: bool, force_size: bool) -> None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise HostIOError.from_oserror(exc, f"Could not create '{path}'") from None
    try:
        chs, sectors = rounded_geometry(size, force_size)
        if sectors > MAX_SECTORS:
            raise _too_large()
        if not force_size:
            size = sectors * SECTOR
        if fixed:
            footer = make_footer(size, chs, TYPE_FIXED, force_size, 0xFFFFFFFFFFFFFFFF)
            os.ftruncate(fd, size + FOOTER_SIZE)
            os.pwrite(fd, footer, size)
            return
        footer = make_footer(size, chs, TYPE_DYNAMIC, force_size, FOOTER_SIZE)
        entries = -(-sectors // (DEFAULT_BLOCK_SIZE // SECTOR))
        bat_bytes = (entries * 4 + 511) & ~511
        bat_offset = FOOTER_SIZE + DYN_HEADER_SIZE
        dyn: dict[str, Any] = {
            "cookie": DYN_COOKIE, "data_offset": 0xFFFFFFFFFFFFFFFF, "table_offset": bat_offset,
            "header_version": 0x00010000, "max_table_entries": entries, "block_size": DEFAULT_BLOCK_SIZE,
        }
        dyn["checksum"] = checksum(DYN_HEADER.pack(dyn), DYN_HEADER.offset("checksum"))
        os.pwrite(fd, footer, 0)
        os.pwrite(fd, DYN_HEADER.pack(dyn), FOOTER_SIZE)
        if bat_bytes:
            os.pwrite(fd, b"\xff" * bat_bytes, bat_offset)
        os.pwrite(fd, footer, bat_offset + bat_bytes)
    except OSError as exc:
        if exc.errno == 27:  # EFBIG
            raise _too_large() from None
        raise HostIOError.from_oserror(exc, f"Could not create '{path}'") from None
    finally:
        os.close(fd)


async def create_vpc(path: str, size: int, options: Mapping[str, str], *,
                     opener: ImageOpener | None = None, unsafe: bool = False) -> None:
    """Create a dynamic or fixed VHD as qemu-img does, its size rounded to a geometry unless force_size."""
    subformat = options.get("subformat", "dynamic")
    if subformat not in ("dynamic", "fixed"):
        raise InvalidArgumentError(f"Parameter 'subformat' does not accept value '{subformat}'")
    force_size = _bool_option(options, "force_size")
    size = (size + SECTOR - 1) // SECTOR * SECTOR
    await run_blocking(_create_sync, path, size, subformat == "fixed", force_size)
