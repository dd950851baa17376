"""Creating vhdx images as qemu 7.2 lays them out: dynamic or fixed, with its options, defaults and checks.

The layout: the file type identifier (with qemu's creator string), two headers a sequence number apart, two
copies of the region table, the log (empty) at 1 MiB, the BAT after it, 1 MiB of metadata after that, and
payload blocks from 5 MiB past the metadata. A dynamic image's BAT is all zeroes (or all ZERO-state
entries with block_state_zero, qemu's default); a fixed one's points at preallocated blocks, in order
(block_state_zero marks them ZERO anyway, as qemu does).
"""

from __future__ import annotations

import random

from ...driver import ImageOpener
from ...errors import BlockError, InvalidArgumentError
from ...hostio import HostFile
from ...qemuopts import parse_bool
from ...units import parse_option_size
from ...version import package_version
from .layout import (
    BAT_GUID,
    BLOCK_SIZE_MAX,
    FILE_PARAM_GUID,
    HEADER1_OFFSET,
    HEADER2_OFFSET,
    HEADER_BLOCK,
    HEADER_SECTION_END,
    LOGICAL_SECTOR_GUID,
    MAX_IMAGE_SIZE,
    META_IS_REQUIRED,
    META_IS_VIRTUAL_DISK,
    METADATA_GUID,
    PAGE83_GUID,
    PARAMS_LEAVE_BLOCKS_ALLOCATED,
    PAYLOAD_FULLY_PRESENT,
    PAYLOAD_NOT_PRESENT,
    PAYLOAD_ZERO,
    PHYS_SECTOR_GUID,
    REGION_TABLE2_OFFSET,
    REGION_TABLE_OFFSET,
    U32,
    VIRTUAL_SIZE_GUID,
    ZERO_GUID,
    Header,
    MetaEntry,
    MiB,
    Region,
    bat_entries,
    chunk_ratio,
    default_block_size,
    metadata_table,
    new_guid,
    region_table,
)

SUBFORMATS = ("dynamic", "fixed")
DEFAULT_LOG_SIZE = 1 * MiB


def _bool(options: dict[str, str], name: str, default: bool) -> bool:
    value = options.get(name)
    return default if value is None else parse_bool(name, value)


async def create_vhdx(path: str, size: int, options: dict[str, str], *, opener: ImageOpener,
                      unsafe: bool = False, logical_sector: int = 512) -> None:
    """Make ``path`` a new vhdx of ``size`` bytes; errors are qemu's, checked before the file is touched.

    ``logical_sector`` (512, qemu's only choice; 4096 for tests of images other tools make) sets both
    sector size items."""
    subformat = options.get("subformat", "dynamic")
    if subformat not in SUBFORMATS:
        raise InvalidArgumentError(f"Parameter 'subformat' does not accept value '{subformat}'")
    zero_blocks = _bool(options, "block_state_zero", True)
    # qemu rounds silently: the size to 512 bytes, the log and block sizes up to whole MiB (a block size
    # of 0, or none, is automatic; past 256 MiB it is 256 MiB)
    size = -(-size // 512) * 512
    if size > MAX_IMAGE_SIZE:
        raise InvalidArgumentError("Image size too large; max of 64TB")
    log_size = DEFAULT_LOG_SIZE
    if "log_size" in options:
        log_size = -(-parse_option_size("log_size", options["log_size"]) // MiB) * MiB
        if log_size > U32:
            raise InvalidArgumentError("Log size must be smaller than 4 GB")
        if log_size < MiB:
            raise InvalidArgumentError("Log size must be a multiple of 1 MB")
    block_size = 0
    if "block_size" in options:
        block_size = min(-(-parse_option_size("block_size", options["block_size"]) // MiB) * MiB,
                         BLOCK_SIZE_MAX)
    if not block_size:
        block_size = default_block_size(size)
    if block_size & (block_size - 1):
        raise InvalidArgumentError("Block size must be a power of two")
    fixed = subformat == "fixed"

    ratio = chunk_ratio(block_size, logical_sector)
    entries = bat_entries(size, block_size, ratio)
    bat_length = -(-entries * 8 // MiB) * MiB
    bat_offset = -(-(HEADER_SECTION_END + log_size) // MiB) * MiB
    meta_offset = -(-(bat_offset + bat_length) // MiB) * MiB
    data_offset = bat_offset + bat_length + 5 * MiB

    try:
        hf = HostFile.open(path, read_only=False, create=True)
    except BlockError as exc:
        # qemu's file protocol words a failed create so
        exc.message = exc.message.replace(f"Could not open '{path}'", f"Could not create '{path}'", 1)
        raise
    try:
        await hf.truncate(0)
        # the creator field is diagnostic only: it names the program that made the file
        ident = b"vhdxfile" + f"imagecore v{package_version()}".encode("utf-16-le")
        await hf.pwrite(0, ident)
        seq = random.getrandbits(32)
        hdr = Header(seq, new_guid(), new_guid(), ZERO_GUID, 0, 1, log_size, HEADER_SECTION_END)
        await hf.pwrite(HEADER1_OFFSET, bytes(hdr.block()))
        await hf.fdatasync()
        hdr.sequence += 1
        await hf.pwrite(HEADER2_OFFSET, bytes(hdr.block()))
        await hf.fdatasync()

        table = region_table([Region(BAT_GUID, bat_offset, bat_length, 0),
                              Region(METADATA_GUID, meta_offset, MiB, 0)])
        await hf.truncate(data_offset + (size if fixed else 0))
        if fixed or zero_blocks:
            state = PAYLOAD_ZERO if zero_blocks else (PAYLOAD_FULLY_PRESENT if fixed else PAYLOAD_NOT_PRESENT)
            await _write_bat(hf, bat_offset, bat_length, size, block_size, ratio, data_offset, state)
        await hf.pwrite(REGION_TABLE_OFFSET, bytes(table))
        await hf.pwrite(REGION_TABLE2_OFFSET, bytes(table))

        sector = logical_sector.to_bytes(4, "little")
        items = (
            (FILE_PARAM_GUID, (block_size | ((PARAMS_LEAVE_BLOCKS_ALLOCATED if fixed else 0) << 32))
             .to_bytes(8, "little"), META_IS_REQUIRED),
            (VIRTUAL_SIZE_GUID, size.to_bytes(8, "little"), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
            (PAGE83_GUID, new_guid(), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
            (LOGICAL_SECTOR_GUID, sector, META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
            (PHYS_SECTOR_GUID, sector, META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        )
        at = HEADER_BLOCK
        metas: list[MetaEntry] = []
        body = bytearray()
        for guid, value, flags in items:
            metas.append(MetaEntry(guid, at, len(value), flags))
            at += len(value)
            body += value
        await hf.pwrite(meta_offset, bytes(metadata_table(metas)))
        await hf.pwrite(meta_offset + HEADER_BLOCK, bytes(body))
        await hf.fdatasync()
    except BaseException:
        hf.close()
        raise
    hf.close()


async def _write_bat(hf: HostFile, bat_offset: int, bat_length: int, size: int, block_size: int, ratio: int,
                     data_offset: int, state: int) -> None:
    """Write the whole BAT region, as qemu does, with its payload entries set (never its bitmap entries);
    in pieces of 1 MiB, so that memory stays bounded whatever the size."""
    blocks = -(-size // block_size)
    for start in range(0, bat_length, MiB):
        chunk = bytearray(min(MiB, bat_length - start))
        first, end = start // 8, (start + len(chunk)) // 8
        # the payload blocks whose entries fall in this piece (entry i = block + block // ratio)
        block = max(0, first - first // (ratio + 1) - 1)
        while block < blocks:
            idx = block + block // ratio
            if idx >= end:
                break
            if idx >= first:
                if state == PAYLOAD_FULLY_PRESENT:
                    entry = -(-(data_offset + block * block_size) // MiB) * MiB | state
                else:
                    entry = state
                at = (idx - first) * 8
                chunk[at:at + 8] = entry.to_bytes(8, "little")
            block += 1
        await hf.pwrite(bat_offset + start, bytes(chunk))
