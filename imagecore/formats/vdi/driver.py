"""The vdi block driver, its check and its create, on the shared block table (formats/blocktable.py).

Open refuses what qemu 7.2 refuses, in its words and order. A new block takes the next block number
(``blocks_allocated``); on write-back the header, with its new count, is written and synced before the
block map entries, so that a crash between them leaves a count too high (a block of space skipped), never
too low (which would hand out a block number the map already uses).
"""

from __future__ import annotations

import os
import uuid
from array import array
from collections.abc import Mapping
from typing import Any

from ...driver import BlockDriver, Capabilities, CheckResult, ImageOpener, OpenContext
from ...errors import (
    BlockError,
    CheckUnsupportedError,
    HostIOError,
    ImageFormatError,
    UnsupportedError,
)
from ...hostio import HostFile, run_blocking
from ...qemuopts import parse_bool
from ..blocktable import MAX_TABLE_PAST_EOF, BlockTableDriver, decode_table, encode_entries
from .spec import (
    BLOCK_SIZE,
    BLOCKS_IN_IMAGE_MAX,
    DISCARDED,
    DISK_SIZE_MAX,
    HEADER,
    HEADER_SIZE_FIELD,
    SECTOR,
    SIGNATURE,
    TEXT,
    TYPE_DYNAMIC,
    TYPE_STATIC,
    UNALLOCATED,
    VERSION_1_1,
)

__all__ = ["VdiDriver", "check_vdi", "create_vdi", "open_vdi"]


class VdiDriver(BlockTableDriver):
    format_name = "vdi"
    big_endian = False

    def __init__(self, hf: HostFile, ctx: OpenContext, header: dict[str, Any], size: int) -> None:
        self.hf = hf
        self.filename = ctx.path
        self.header = header
        self.size = size
        self.backing = None
        self.block_size = int(header["block_size"])
        self.table_offset = int(header["offset_bmap"])
        self.offset_data = int(header["offset_data"])
        self.recurse_host = header["image_type"] == TYPE_STATIC
        self.init_table(ctx.read_only)
        writable = not ctx.read_only
        self.caps = Capabilities(writable=writable, zero=writable, fast_zero=False, trim=False,
                                 flush=True, fua=writable, extents=True, multi_conn=True)

    def block_host(self, entry: int) -> int | None:
        if entry >= DISCARDED:
            return None
        return self.offset_data + int(entry) * self.block_size

    async def place_block(self, index: int) -> int:
        number = int(self.header["blocks_allocated"])
        if number >= DISCARDED:
            raise ImageFormatError("vdi image has no block numbers left")
        start = self.offset_data + number * self.block_size
        await self.zero_new_space(start, start + self.block_size)
        self.header["blocks_allocated"] = number + 1
        return int(number)

    async def before_table_write(self) -> None:
        await self.hf.pwrite(0, HEADER.pack(self.header))
        await self.hf.fdatasync()


async def open_vdi(hf: HostFile, ctx: OpenContext) -> BlockDriver:
    head = await hf.pread(0, SECTOR)
    h = HEADER.unpack(head)
    disk_size = h["disk_size"]
    if disk_size > DISK_SIZE_MAX:
        raise UnsupportedError(f"Unsupported VDI image size (size is 0x{disk_size:x}, max supported is "
                               f"0x{DISK_SIZE_MAX:x})")
    # VBoxManage convertfromraw makes odd sizes; qemu rounds them up to a sector
    disk_size = (disk_size + SECTOR - 1) // SECTOR * SECTOR
    blocks = h["blocks_in_image"]
    if h["signature"] != SIGNATURE:
        raise ImageFormatError(f"Image not in VDI format (bad signature {h['signature']:08x})")
    if h["version"] != VERSION_1_1:
        major, minor = h["version"] >> 16, h["version"] & 0xFFFF
        raise UnsupportedError(f"unsupported VDI image (version {major}.{minor})")
    if h["offset_bmap"] % SECTOR:
        raise UnsupportedError(f"unsupported VDI image (unaligned block map offset 0x{h['offset_bmap']:x})")
    if h["offset_data"] % SECTOR:
        raise UnsupportedError(f"unsupported VDI image (unaligned data offset 0x{h['offset_data']:x})")
    if h["sector_size"] != SECTOR:
        raise UnsupportedError(f"unsupported VDI image (sector size {h['sector_size']} is not {SECTOR})")
    if h["block_size"] != BLOCK_SIZE:
        raise UnsupportedError(f"unsupported VDI image (block size {h['block_size']} is not {BLOCK_SIZE})")
    if disk_size > blocks * h["block_size"]:
        raise UnsupportedError(f"unsupported VDI image (disk size {disk_size}, image bitmap has room for "
                               f"{blocks * h['block_size']})")
    if any(h["uuid_link"]):
        raise UnsupportedError("unsupported VDI image (non-NULL link UUID)")
    if any(h["uuid_parent"]):
        raise UnsupportedError("unsupported VDI image (non-NULL parent UUID)")
    if blocks > BLOCKS_IN_IMAGE_MAX:
        raise UnsupportedError(f"unsupported VDI image (too many blocks {blocks}, "
                               f"max is {BLOCKS_IN_IMAGE_MAX})")
    bmap_bytes = -(-blocks * 4 // SECTOR) * SECTOR
    drv = VdiDriver(hf, ctx, h, disk_size)
    if h["offset_bmap"] + bmap_bytes > hf.size() and bmap_bytes > MAX_TABLE_PAST_EOF:
        if not ctx.options.get("no_io"):
            # qemu would allocate the whole map and read zeroes past the end of the file
            raise ImageFormatError(f"vdi block map of {blocks} entries lies past the end of the file")
        # info describes it as qemu does (iotest 084) and reads nothing through the map: none is held
        drv.table = array("I")
        return drv
    raw = await hf.pread(h["offset_bmap"], bmap_bytes) if bmap_bytes else b""
    drv.table = decode_table(raw, blocks, big_endian=False)
    return drv


# -- check --------------------------------------------------------------------------------------------

async def check_vdi(hf: HostFile, ctx: OpenContext, repair: str | None) -> CheckResult:
    """qemu's vdi check: every block number in range and used once, and the header's count right."""
    try:
        drv = await open_vdi(hf, ctx)
    except BlockError as exc:
        exc.open_failure = True  # type: ignore[attr-defined]
        raise
    assert isinstance(drv, VdiDriver)
    if repair is not None:
        raise CheckUnsupportedError("This image format does not support checks")
    res = CheckResult()
    blocks = len(drv.table)
    used = bytearray(blocks)  # one byte per block number, where qemu keeps a 32-bit entry
    allocated = 0
    for block, entry in enumerate(drv.table):
        if entry >= DISCARDED:
            continue
        if entry < blocks:
            allocated += 1
            if used[entry]:
                # qemu prints the entry it keeps for that block number (the number itself) and the number
                res.messages.append(f"ERROR: block index {entry} also used by {entry}")
                res.corruptions += 1
            else:
                used[entry] = 1
        else:
            res.messages.append(f"ERROR: block index {block} too large, is {entry}")
            res.corruptions += 1
    if allocated != drv.header["blocks_allocated"]:
        res.messages.append(f"ERROR: allocated blocks mismatch, is {allocated}, should be "
                            f"{drv.header['blocks_allocated']}")
        res.corruptions += 1
    return res


# -- create -------------------------------------------------------------------------------------------

def _bool_option(options: Mapping[str, str], name: str) -> bool:
    return parse_bool(name, options.get(name, "off"))


def _create_sync(path: str, size: int, static: bool) -> None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise HostIOError.from_oserror(exc, f"Could not create '{path}'") from None
    try:
        if size > DISK_SIZE_MAX:
            raise UnsupportedError(f"Unsupported VDI image size (size is 0x{size:x}, max supported is "
                                   f"0x{DISK_SIZE_MAX:x})")
        blocks = -(-size // BLOCK_SIZE)
        bmap_bytes = -(-blocks * 4 // SECTOR) * SECTOR
        header = {
            "text": TEXT, "signature": SIGNATURE, "version": VERSION_1_1, "header_size": HEADER_SIZE_FIELD,
            "image_type": TYPE_STATIC if static else TYPE_DYNAMIC, "offset_bmap": SECTOR,
            "offset_data": SECTOR + bmap_bytes, "sector_size": SECTOR, "disk_size": size,
            "block_size": BLOCK_SIZE, "blocks_in_image": blocks, "blocks_allocated": blocks if static else 0,
            "uuid_image": uuid.uuid4().bytes_le, "uuid_last_snap": uuid.uuid4().bytes_le,
        }
        os.pwrite(fd, HEADER.pack(header), 0)
        if bmap_bytes:
            table = array("I", range(blocks) if static else [UNALLOCATED] * blocks)
            body = encode_entries(table, 0, blocks, big_endian=False)
            os.pwrite(fd, body + bytes(bmap_bytes - len(body)), SECTOR)
        if static:
            os.ftruncate(fd, SECTOR + bmap_bytes + blocks * BLOCK_SIZE)
    except OSError as exc:
        raise HostIOError.from_oserror(exc, f"Could not create '{path}'") from None
    finally:
        os.close(fd)


async def create_vdi(path: str, size: int, options: Mapping[str, str], *,
                     opener: ImageOpener | None = None, unsafe: bool = False) -> None:
    """Create a dynamic (or, with ``static=on``, fully allocated) vdi image as qemu-img does."""
    static = _bool_option(options, "static")
    # qemu silently rounds the size up to a sector
    size = (size + SECTOR - 1) // SECTOR * SECTOR
    await run_blocking(_create_sync, path, size, static)
