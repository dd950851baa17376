"""Creating vmdk images: monolithicSparse, monolithicFlat, twoGbMaxExtentSparse/Flat and streamOptimized."""

from __future__ import annotations

import os
import secrets
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from ...driver import ImageOpener, create_file
from ...errors import HostIOError, ImageLockedError, InvalidArgumentError, UnsupportedError
from ...hostio import HostFile
from ...qemuopts import parse_bool
from .descriptor import MAX_EXTENTS, NO_PARENT_CID, render_descriptor
from .sparse import (
    COMPRESSION_DEFLATE,
    FLAG_COMPRESSED,
    FLAG_MARKERS,
    FLAG_NL_DETECT,
    FLAG_RGD,
    FLAG_ZERO_GRAIN,
    SparseHeader,
)
from .stream import SECTOR

SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
              "streamOptimized")
ADAPTER_TYPES = ("ide", "buslogic", "lsilogic", "legacyESX")
SPLIT_SIZE = 0x80000000
GRAIN_SECTORS = 128
GTES_PER_GT = 512
DESC_SECTORS = 20


def _bool(options: dict[str, str], name: str) -> bool:
    return parse_bool(name, options.get(name, "off"))


# The largest sparse extent qemu lays out correctly (2^48 - 32 MiB): its vmdk_init_extent rounds the grain
# count up to whole tables in 32 bits (grains + 511), and beyond this silently writes an image without
# grain tables that qemu-img check then fails on. qemu has no limit of its own; sizes past this one are
# refused with the message qemu gives for any EFBIG at create.
MAX_SPARSE_SIZE = (2**32 - GTES_PER_GT) * GRAIN_SECTORS * SECTOR
# qemu reads at most 1 MiB - 1 of a descriptor file (vmdk_read_desc); a longer one silently loses extents.
MAX_DESCRIPTOR_FILE = (1 << 20) - 1
# Grain directories are written in pieces of this many bytes, so that memory stays bounded by it and
# not by the virtual size.
GD_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class SparseLayout:
    """Where the metadata of a fresh sparse extent goes; the tables themselves start as a zeroed hole."""

    header: SparseHeader
    gt_count: int
    gd_sectors: int
    gt_sectors: int

    def directory_chunks(self, gd_offset: int) -> Iterator[tuple[int, bytes]]:
        """``(file offset, bytes)`` pieces of the directory at sector ``gd_offset``, each at most GD_CHUNK.

        Entry i points at the i-th table, which follows the directory's own (sector-padded) area.
        """
        per_chunk = GD_CHUNK // 4
        first_table = gd_offset + self.gd_sectors
        for start in range(0, self.gt_count, per_chunk):
            n = min(per_chunk, self.gt_count - start)
            first = first_table + start * self.gt_sectors
            entries = array("I", range(first, first + n * self.gt_sectors, self.gt_sectors))
            if sys.byteorder == "big":
                entries.byteswap()
            yield gd_offset * SECTOR + start * 4, entries.tobytes()


def sparse_layout(size: int, *, compressed: bool, zeroed_grain: bool) -> SparseLayout:
    """Header and directory geometry of a fresh sparse extent of ``size`` bytes.

    Layout: header, descriptor area, redundant GD and its tables, GD and its tables, grains from the next
    grain boundary.
    """
    if size > MAX_SPARSE_SIZE:
        raise InvalidArgumentError("The image size is too large for file format 'vmdk'")
    capacity = size // SECTOR
    grains = -(-capacity // GRAIN_SECTORS)
    gt_count = -(-grains // GTES_PER_GT)
    gt_sectors = GTES_PER_GT * 4 // SECTOR
    gd_sectors = -(-(gt_count * 4) // SECTOR)
    rgd_offset = 1 + DESC_SECTORS
    gd_offset = rgd_offset + gd_sectors + gt_count * gt_sectors
    end = gd_offset + gd_sectors + gt_count * gt_sectors
    overhead = -(-end // GRAIN_SECTORS) * GRAIN_SECTORS
    version = 3 if compressed else 2 if zeroed_grain else 1
    flags = FLAG_RGD | FLAG_NL_DETECT
    if compressed:
        flags |= FLAG_COMPRESSED | FLAG_MARKERS
    if zeroed_grain:
        flags |= FLAG_ZERO_GRAIN
    header = SparseHeader(version=version, flags=flags, capacity=capacity, grain_sectors=GRAIN_SECTORS,
                          desc_offset=1, desc_size=DESC_SECTORS, gtes_per_gt=GTES_PER_GT,
                          rgd_offset=rgd_offset, gd_offset=gd_offset, overhead=overhead,
                          compress_algorithm=COMPRESSION_DEFLATE if compressed else 0)
    return SparseLayout(header, gt_count, gd_sectors, gt_sectors)


async def _resize(hf: HostFile, size: int) -> None:
    """Truncate with qemu's message for a file the host cannot make that large."""
    try:
        await hf.truncate(size)
    except HostIOError as exc:
        raise HostIOError(f"Could not resize file: {os.strerror(exc.errno)}") from None


async def _new_file(path: str) -> HostFile:
    hf = await create_file(path)
    try:
        await hf.truncate(0)
    except BaseException:
        hf.close()
        raise
    return hf


async def _write_sparse(path: str, size: int, *, compressed: bool, zeroed_grain: bool,
                        descriptor: bytes | None) -> None:
    lay = sparse_layout(size, compressed=compressed, zeroed_grain=zeroed_grain)
    header = lay.header
    hf = await _new_file(path)
    try:
        await _resize(hf, header.overhead * SECTOR)
        await hf.pwrite(0, header.pack())
        if descriptor is not None:
            await hf.pwrite(header.desc_offset * SECTOR, descriptor)
        for gd_offset in (header.rgd_offset, header.gd_offset):
            for offset, chunk in lay.directory_chunks(gd_offset):
                await hf.pwrite(offset, chunk)
        await hf.fdatasync()
    finally:
        hf.close()


async def _parent_cid(backing: str, path: str, opener: ImageOpener) -> int:
    from .driver import VmdkDriver

    bpath = opener.resolve(backing, path)
    try:
        bdrv = await opener.open(bpath, None if opener.allow_probe else "vmdk", read_only=True)
    except ImageLockedError as exc:
        # qemu's vmdk create opens the parent through a BlockBackend, whose lock error has no
        # "Could not open" prefix (qcow2's create reads its backing file force-share instead)
        exc.message = exc.message.removeprefix(f"Could not open '{bpath}': ")
        raise
    try:
        if not isinstance(bdrv, VmdkDriver):
            raise InvalidArgumentError(f"Invalid backing file format: {bdrv.format_name}. Must be vmdk")
        return bdrv.cid
    finally:
        await bdrv.close()


async def create_vmdk(path: str, size: int, options: dict[str, str], *, opener: ImageOpener,
                      unsafe: bool = False) -> None:
    """Create a vmdk image as ``qemu-img create -f vmdk`` does, with the same ``-o`` options.

    A backing file is always opened, even with ``unsafe`` (-u), as qemu does: its CID goes into the
    new descriptor.
    """
    size = -(-size // SECTOR) * SECTOR
    backing_fmt = options.get("backing_fmt")
    if backing_fmt is not None and backing_fmt != "vmdk":
        raise InvalidArgumentError("backing_file must be a vmdk image")
    subformat = options.get("subformat", "monolithicSparse")
    if subformat not in SUBFORMATS:
        raise InvalidArgumentError(f"invalid parameter value: {subformat}")
    adapter = options.get("adapter_type", "ide")
    if adapter not in ADAPTER_TYPES:
        raise InvalidArgumentError(f"invalid parameter value: {adapter}")
    hw_version: str | None = options.get("hwversion")
    if hw_version == "undefined":
        hw_version = None
    if _bool(options, "compat6"):
        if hw_version is not None:
            raise InvalidArgumentError("compat6 cannot be enabled with hwversion set")
        hw_version = "6"
    tools_version = options.get("toolsversion", "2147483647")
    zeroed_grain = _bool(options, "zeroed_grain")
    backing = options.get("backing_file")
    split = subformat.startswith("twoGb")
    flat = subformat in ("monolithicFlat", "twoGbMaxExtentFlat")
    compressed = subformat == "streamOptimized"
    if flat and backing:
        raise UnsupportedError("Flat image can't have backing file")
    if flat and zeroed_grain:
        raise UnsupportedError("Flat image can't enable zeroed grain")
    for text in (tools_version, hw_version or "", backing or ""):
        if '"' in text or "\n" in text or "\r" in text or "\0" in text:
            raise InvalidArgumentError(f"invalid parameter value: {text!r}")

    folder, base = os.path.split(path)
    stem, dot, ext = base.rpartition(".")
    prefix, postfix = (stem, dot + ext) if dot else (base, "")

    parent_cid = NO_PARENT_CID
    if backing:
        parent_cid = await _parent_cid(backing, path, opener)

    # Every limit is checked, and the whole descriptor rendered, before the first file is touched.
    if not split and not flat and size > MAX_SPARSE_SIZE:
        raise InvalidArgumentError("The image size is too large for file format 'vmdk'")
    extents: list[tuple[str, int]] = []  # (file name, bytes) of each separate extent file
    extent_lines: list[str] = []
    if not split and not flat:
        extent_lines.append(f'RW {size // SECTOR} SPARSE "{base}"\n')
    else:
        chunk = SPLIT_SIZE if split else max(size, 1)
        if -(-size // chunk) > MAX_EXTENTS:
            # more extents than a descriptor may list (our reader's bound, and far below qemu's 1 MiB)
            raise InvalidArgumentError("The image size is too large for file format 'vmdk'")
        done = 0
        idx = 1
        while done < size:
            cur = min(size - done, chunk)
            if split:
                name = f"{prefix}-{'f' if flat else 's'}{idx:03d}{postfix}"
            else:
                name = f"{prefix}-flat{postfix}"
            extents.append((name, cur))
            extent_lines.append(f'RW {cur // SECTOR} FLAT "{name}" 0\n' if flat
                                else f'RW {cur // SECTOR} SPARSE "{name}"\n')
            done += cur
            idx += 1

    heads = 16 if adapter == "ide" else 255
    text = render_descriptor(cid=secrets.randbits(32), parent_cid=parent_cid, create_type=subformat,
                             parent_hint=backing or None, extent_lines=extent_lines,
                             hw_version=hw_version or "4", cylinders=size // (63 * heads * SECTOR),
                             heads=heads, adapter_type=adapter, tools_version=tools_version)
    raw = text.encode("utf-8", errors="surrogateescape")
    if not split and not flat:
        if len(raw) > DESC_SECTORS * SECTOR:
            raise InvalidArgumentError("the vmdk descriptor is too long (shorten the backing file name)")
        await _write_sparse(path, size, compressed=compressed, zeroed_grain=zeroed_grain, descriptor=raw)
        return
    if len(raw) > MAX_DESCRIPTOR_FILE:
        raise InvalidArgumentError("The image size is too large for file format 'vmdk'")
    for name, cur in extents:
        xpath = os.path.join(folder, name)
        if flat:
            xhf = await _new_file(xpath)
            try:
                await _resize(xhf, cur)
            finally:
                xhf.close()
        else:
            await _write_sparse(xpath, cur, compressed=False, zeroed_grain=zeroed_grain, descriptor=None)
    hf = await _new_file(path)
    try:
        await hf.pwrite(0, raw)
        await hf.fdatasync()
    finally:
        hf.close()
