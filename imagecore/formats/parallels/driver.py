"""The parallels block driver, its check and its create, on the shared block table (formats/blocktable.py).

As qemu 7.2: a writer sets ``inuse`` in the header when it opens the image and clears it on close, when the
file is also cut back to the end of the last cluster; an image left ``inuse`` opens read-only only, and
check reports it (and clears it with ``-r all``). New clusters go at the end of the data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ...driver import BlockDriver, Capabilities, CheckResult, ImageOpener, OpenContext
from ...errors import BlockError, HostIOError, ImageFormatError, InvalidArgumentError
from ...hostio import HostFile, run_blocking
from ...units import parse_option_size
from ..blocktable import MAX_TABLE_PAST_EOF, BlockTableDriver, decode_table, encode_entries
from .spec import (
    DEFAULT_CLUSTER_SIZE,
    HEADER,
    HEADS,
    INUSE_MAGIC,
    MAGIC,
    MAGIC_EXT,
    MAX_IMAGE_FACTOR,
    SECTOR,
    SECTORS_PER_CYLINDER,
    VERSION,
)

__all__ = ["ParallelsDriver", "check_parallels", "create_parallels", "open_parallels"]

_INT_MAX = 0x7FFFFFFF


class ParallelsImage:
    """The header and BAT of a parallels image as read from the file, with qemu's open checks."""

    def __init__(self, header: dict[str, Any], raw_bat: bytes, file_size: int) -> None:
        self.header = header
        self.tracks = int(header["tracks"])
        self.multiplier = 1 if header["magic"] == MAGIC else self.tracks
        self.cluster_size = self.tracks * SECTOR
        entries = int(header["bat_entries"])
        self.table = decode_table(raw_bat, entries, big_endian=False)
        nb_sectors = int(header["nb_sectors"])
        if header["magic"] == MAGIC:
            nb_sectors &= 0xFFFFFFFF  # the old signature has a 32-bit sector count
        self.size = nb_sectors * SECTOR
        data_end = int(header["data_off"]) or -(-(HEADER.size + 4 * entries) // SECTOR)
        last = max(self.table, default=0)
        if last:
            data_end = max(data_end, last * self.multiplier + self.tracks)
        self.data_end = data_end  # in sectors
        self.unclean = header["inuse"] == INUSE_MAGIC

    @classmethod
    async def read(cls, hf: HostFile) -> ParallelsImage:
        h = HEADER.unpack(await hf.pread(0, HEADER.size))
        if h["version"] != VERSION or h["magic"] not in (MAGIC, MAGIC_EXT):
            raise ImageFormatError("Image not in Parallels format")
        if h["tracks"] == 0:
            raise ImageFormatError("Invalid image: Zero sectors per track")
        if h["tracks"] > _INT_MAX // 513:
            raise ImageFormatError("Invalid image: Too big cluster")
        entries = h["bat_entries"]
        if entries > _INT_MAX // 4:
            raise ImageFormatError("Catalog too large")
        size = hf.size()
        if HEADER.size + 4 * entries > size and 4 * entries > MAX_TABLE_PAST_EOF:
            raise ImageFormatError("Catalog lies past the end of the file")
        raw = await hf.pread(HEADER.size, 4 * entries) if entries else b""
        return cls(h, raw, size)


class ParallelsDriver(BlockTableDriver):
    format_name = "parallels"
    reports_dirty = False  # qemu's parallels driver has no bdrv_get_info: info shows no dirty-flag
    big_endian = False
    unallocated_present = False

    def __init__(self, hf: HostFile, ctx: OpenContext, image: ParallelsImage) -> None:
        self.hf = hf
        self.filename = ctx.path
        self.image = image
        self.size = image.size
        self.backing = None
        self.block_size = image.cluster_size
        self.table = image.table
        self.table_offset = HEADER.size
        self.init_table(ctx.read_only)
        writable = not ctx.read_only
        self.caps = Capabilities(writable=writable, zero=writable, fast_zero=False, trim=False,
                                 flush=True, fua=writable, extents=True, multi_conn=True)

    def block_host(self, entry: int) -> int | None:
        if not entry:
            return None
        return int(entry) * self.image.multiplier * SECTOR

    async def place_block(self, index: int) -> int:
        img = self.image
        start = img.data_end * SECTOR
        entry = img.data_end // img.multiplier
        if entry > 0xFFFFFFFF:
            raise ImageFormatError("parallels image has no room left for another cluster")
        await self.zero_new_space(start, start + self.block_size)
        img.data_end += img.tracks
        return entry

    def cluster_size(self) -> int | None:
        return None  # qemu-img info shows none for parallels

    async def set_inuse(self, inuse: bool) -> None:
        self.image.header["inuse"] = INUSE_MAGIC if inuse else 0
        await self.hf.pwrite(0, HEADER.pack(self.image.header))
        await self.hf.fdatasync()

    async def close(self) -> None:
        try:
            if not (self._read_only or self.hf.read_only):
                await self.writeback()
                await self.hf.fdatasync()
                await self.set_inuse(False)
                # as qemu does on close: the file ends where the last cluster ends
                await self.hf.truncate(self.image.data_end * SECTOR)
                await self.hf.fdatasync()
        finally:
            self.hf.close()


async def open_parallels(hf: HostFile, ctx: OpenContext) -> BlockDriver:
    image = await ParallelsImage.read(hf)
    if image.unclean and not ctx.read_only:
        raise ImageFormatError("parallels: Image was not closed correctly; cannot be opened read/write")
    drv = ParallelsDriver(hf, ctx, image)
    if not ctx.read_only:
        await drv.set_inuse(True)
    return drv


# -- check --------------------------------------------------------------------------------------------

async def check_parallels(hf: HostFile, ctx: OpenContext, repair: str | None) -> CheckResult:
    """qemu 7.2's parallels check: the in-use flag, clusters past the end of the file, space leaked after
    the last cluster; ``-r all`` clears the flag and the entries past the end, ``-r leaks`` (and all) cut
    the leaked space off."""
    try:
        img = await ParallelsImage.read(hf)
    except BlockError as exc:
        exc.open_failure = True  # type: ignore[attr-defined]
        raise
    fix_errors = repair == "all"
    fix_leaks = repair in ("leaks", "all")
    res = CheckResult()
    size = hf.size()
    cs = img.cluster_size
    header_dirty = table_dirty = False
    if img.unclean:
        res.messages.append(f"{'Repairing' if fix_errors else 'ERROR'} image was not closed correctly")
        res.corruptions += 1
        if fix_errors:
            res.corruptions_fixed += 1
            img.header["inuse"] = 0
            header_dirty = True
    res.total_clusters = len(img.table)
    res.compressed_clusters = 0
    allocated = fragmented = 0
    high = prev = 0
    for i, entry in enumerate(img.table):
        off = int(entry) * img.multiplier * SECTOR
        if not off:
            prev = 0
            continue
        if off > size:
            res.messages.append(f"{'Repairing' if fix_errors else 'ERROR'} cluster {i} is outside image")
            res.corruptions += 1
            if fix_errors:
                img.table[i] = 0
                res.corruptions_fixed += 1
                table_dirty = True
                prev = 0
                continue
        allocated += 1
        high = max(high, off)
        if prev and prev + cs != off:
            fragmented += 1
        prev = off
    res.allocated_clusters = allocated
    res.fragmented_clusters = fragmented
    if table_dirty:
        await hf.pwrite(HEADER.size, encode_entries(img.table, 0, len(img.table), big_endian=False))
    if header_dirty:
        await hf.pwrite(0, HEADER.pack(img.header))
    end = high + cs
    res.image_end_offset = end
    if size > end:
        count = -(-(size - end) // cs)
        res.messages.append(f"{'Repairing' if fix_leaks else 'ERROR'} space leaked at the end of the image "
                            f"{size - end}")
        res.leaks += count
        if fix_leaks:
            await hf.truncate(end)
            res.leaks_fixed += count
    if table_dirty or header_dirty or res.leaks_fixed:
        await hf.fdatasync()
    return res


# -- create -------------------------------------------------------------------------------------------

def _create_sync(path: str, size: int, cluster_size: int) -> None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise HostIOError.from_oserror(exc, f"Could not create '{path}'") from None
    try:
        if cluster_size >= ((1 << 63) - 1) // MAX_IMAGE_FACTOR:
            raise InvalidArgumentError("Cluster size is too large")
        if size >= MAX_IMAGE_FACTOR * cluster_size:
            raise InvalidArgumentError("Image size is too large for this cluster size")
        entries = -(-size // cluster_size)
        bat_sectors = -(-(HEADER.size + 4 * entries) // cluster_size) * cluster_size // SECTOR
        header = {
            "magic": MAGIC_EXT, "version": VERSION, "heads": HEADS,
            "cylinders": size // SECTOR // HEADS // SECTORS_PER_CYLINDER, "tracks": cluster_size // SECTOR,
            "bat_entries": entries, "nb_sectors": -(-size // SECTOR), "data_off": bat_sectors,
        }
        os.ftruncate(fd, bat_sectors * SECTOR)
        os.pwrite(fd, HEADER.pack(header), 0)
    except OSError as exc:
        raise HostIOError.from_oserror(exc, f"Could not create '{path}'") from None
    finally:
        os.close(fd)


async def create_parallels(path: str, size: int, options: Mapping[str, str], *,
                           opener: ImageOpener | None = None, unsafe: bool = False) -> None:
    """Create an empty parallels image (``WithouFreSpacExt``) as qemu-img does."""
    cluster_size = DEFAULT_CLUSTER_SIZE
    if "cluster_size" in options:
        cluster_size = parse_option_size("cluster_size", options["cluster_size"])
    # qemu silently rounds both up to a sector
    size = -(-size // SECTOR) * SECTOR
    cluster_size = -(-cluster_size // SECTOR) * SECTOR
    await run_blocking(_create_sync, path, size, cluster_size)
