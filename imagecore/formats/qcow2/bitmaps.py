"""Persistent dirty bitmaps on disk: the bitmaps extension, the bitmap directory, bitmap tables and the
bit layout of bitmap data, in the words of qcow2.txt, with qemu's limits and messages (qcow2-bitmap.c).

Pure encoding, decoding and bit math, plus the reads of a directory and a table. The tracking of writes,
the in-use flag and storing bitmaps back are the driver's (``dirty.py``).
"""

from __future__ import annotations

import re
import struct
import sys
from array import array
from dataclasses import dataclass, replace
from typing import Any

from ...errors import ImageFormatError
from ...hostio import HostFile
from . import layout as L

# qemu's limits (block/qcow2.h, block/qcow2-bitmap.c): checked before anything is read or stored
MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 64 << 20
MAX_NAME_SIZE = 1023
MAX_TABLE_SIZE = 0x8000000  # entries of one bitmap table
MAX_PHYS_SIZE = 0x20000000  # bytes of one bitmap's data: what qemu agrees to hold in memory
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31

# a bitmap table entry: the host offset (bits 9-55); with offset 0, bit 0 reads the cluster as all ones
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_RESERVED_MASK = 0xFF000000000001FE
TABLE_ALL_ONES = 1 << 0

# flags of a directory entry
BME_IN_USE = 1 << 0
BME_AUTO = 1 << 1
BME_EXTRA_DATA_COMPATIBLE = 1 << 2
BME_RESERVED_FLAGS = 0xFFFFFFFC

TYPE_DIRTY_TRACKING = 1

# -- construct declaration: the cold path, and the spec's own words ------------------------------------

def _declare() -> dict[str, Any]:
    import construct as cs

    BITMAPS_EXTENSION = cs.Struct(
        "nb_bitmaps" / cs.Int32ub,
        "reserved32" / cs.Int32ub,
        "bitmap_directory_size" / cs.Int64ub,
        "bitmap_directory_offset" / cs.Int64ub,
    )

    DIRECTORY_ENTRY = cs.Struct(
        "bitmap_table_offset" / cs.Int64ub,
        "bitmap_table_size" / cs.Int32ub,
        "flags" / cs.Int32ub,
        "type" / cs.Int8ub,
        "granularity_bits" / cs.Int8ub,
        "name_size" / cs.Int16ub,
        "extra_data_size" / cs.Int32ub,
    )
    return {"BITMAPS_EXTENSION": BITMAPS_EXTENSION, "DIRECTORY_ENTRY": DIRECTORY_ENTRY}


_declared: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    """The construct declarations, built on first use (by the tests and the cold paths that want
    them): importing construct costs every command-line verb that opens a qcow2 image about 11 ms."""
    if name in ("BITMAPS_EXTENSION", "DIRECTORY_ENTRY"):
        if not _declared:
            _declared.update(_declare())
        return _declared[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- precompiled struct equivalents (a test keeps them equal to the declarations) ---------------------

EXTENSION_STRUCT = struct.Struct(">IIQQ")
ENTRY_STRUCT = struct.Struct(">QIIBBHI")
FLAGS_OFFSET = 12  # of the flags word in a directory entry, which the in-use update rewrites alone


@dataclass(frozen=True, slots=True)
class Bitmap:
    """One entry of the bitmap directory; ``position`` is its byte offset in the directory as read."""

    name: str
    flags: int
    granularity_bits: int
    table_offset: int
    table_size: int
    position: int = 0

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        return bool(self.flags & BME_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & BME_AUTO)

    def info(self) -> dict[str, Any]:
        """QAPI Qcow2BitmapInfo, its members in declaration order and its flags in qemu's order."""
        flags = [name for bit, name in ((BME_IN_USE, "in-use"), (BME_AUTO, "auto")) if self.flags & bit]
        return {"name": self.name, "granularity": 1 << self.granularity_bits, "flags": flags}

    def with_flags(self, flags: int) -> Bitmap:
        return replace(self, flags=flags)


# -- sizes ----------------------------------------------------------------------------------------------

def bitmap_bytes(size: int, granularity_bits: int) -> int:
    """Bytes of bitmap data for an image of ``size`` bytes (qemu's get_bitmap_bytes_needed)."""
    bits = -(-size >> granularity_bits)
    return -(-bits // 8)


def table_entries(size: int, granularity_bits: int, cluster_size: int) -> int:
    """Entries of the bitmap table for an image of ``size`` bytes: one per cluster of bitmap data."""
    return -(-bitmap_bytes(size, granularity_bits) // cluster_size)


def entry_size(name: bytes, extra: int = 0) -> int:
    """Bytes a directory entry takes, padding included (qemu's calc_dir_entry_size)."""
    return (ENTRY_STRUCT.size + len(name) + extra + 7) & ~7


def default_granularity(cluster_size: int) -> int:
    """The granularity of a bitmap added without one (bdrv_get_default_bitmap_granularity)."""
    return min(max(cluster_size, 4096), 65536)


def constraints_error(size: int, cluster_size: int, name: str, granularity: int) -> str | None:
    """Why qemu cannot store a bitmap of ``granularity`` named ``name`` (check_constraints_on_bitmap)."""
    gbits = granularity.bit_length() - 1
    if gbits > MAX_GRANULARITY_BITS:
        return f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)"
    if gbits < MIN_GRANULARITY_BITS:
        return f"Granularity is under minimum ({1 << MIN_GRANULARITY_BITS} bytes)"
    nbytes = bitmap_bytes(size, gbits)
    if nbytes > MAX_PHYS_SIZE or nbytes > MAX_TABLE_SIZE * cluster_size:
        return "Too much space will be occupied by the bitmap. Use larger granularity"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_SIZE:
        return f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
    return None


# -- the extension and the directory --------------------------------------------------------------------

def encode_extension(nb: int, dir_size: int, dir_offset: int) -> bytes:
    return EXTENSION_STRUCT.pack(nb, 0, dir_size, dir_offset)


def encode_directory(bitmaps: list[Bitmap]) -> bytes:
    """The directory as qemu writes it: no extra data, names unterminated, entries padded with zeroes."""
    out = bytearray()
    for bm in bitmaps:
        name = bm.name.encode("utf-8", "surrogateescape")
        start = len(out)
        out += ENTRY_STRUCT.pack(bm.table_offset, bm.table_size, bm.flags, TYPE_DIRTY_TRACKING,
                                 bm.granularity_bits, len(name), 0) + name
        out += bytes(entry_size(name) - (len(out) - start))
    return bytes(out)


def check_entry(bm: Bitmap, extra: int, kind: int, cluster_size: int, image_size: int) -> bool:
    """Whether an entry satisfies qemu's constraints (check_dir_entry)."""
    if (bm.table_size == 0 or bm.table_offset == 0 or bm.table_offset % cluster_size
            or bm.table_size > MAX_TABLE_SIZE or not MIN_GRANULARITY_BITS <= bm.granularity_bits
            <= MAX_GRANULARITY_BITS or bm.flags & BME_RESERVED_FLAGS or kind != TYPE_DIRTY_TRACKING):
        return False
    phys = bm.table_size * cluster_size
    if phys > MAX_PHYS_SIZE:
        return False
    # a consistent bitmap must cover the image; an in-use one may be stale (an unsaved resize)
    return bool(bm.flags & BME_IN_USE) or image_size <= (phys * 8) << bm.granularity_bits


def decode_directory(raw: bytes, nb: int, cluster_size: int, image_size: int) -> list[Bitmap]:
    """Parse and validate a directory as qemu's bitmap_list_load does, with its messages."""
    out: list[Bitmap] = []
    pos = 0
    end = len(raw)
    while pos < end:
        if pos + ENTRY_STRUCT.size > end:
            raise ImageFormatError("Broken bitmap directory")
        if len(out) + 1 > nb:
            raise ImageFormatError("More bitmaps found than specified in header extension")
        tbl_off, tbl_size, flags, kind, gbits, name_size, extra = ENTRY_STRUCT.unpack_from(raw, pos)
        size = (ENTRY_STRUCT.size + name_size + extra + 7) & ~7
        if pos + size > end:
            raise ImageFormatError("Broken bitmap directory")
        start = pos + ENTRY_STRUCT.size + extra
        name = raw[start:start + name_size].decode("utf-8", "surrogateescape")
        if extra:
            raise ImageFormatError("Bitmap extra data is not supported")
        bm = Bitmap(name, flags, gbits, tbl_off, tbl_size, pos)
        if name_size > MAX_NAME_SIZE or not check_entry(bm, extra, kind, cluster_size, image_size):
            raise ImageFormatError(f"Bitmap '{name}' doesn't satisfy the constraints")
        out.append(bm)
        pos += size
    if len(out) != nb:
        raise ImageFormatError("Less bitmaps found than specified in header extension")
    return out


def has_bitmaps(h: L.Header) -> bool:
    """Whether the image's bitmaps are valid to read: the extension is there and its autoclear bit set."""
    return h.version >= 3 and bool(h.autoclear_features & L.AUTOCLEAR_BITMAPS) \
        and h.extension(L.EXT_BITMAPS) is not None


def parse_extension(h: L.Header, file_size: int) -> tuple[int, int, int]:
    """(number of bitmaps, directory size, directory offset) of a valid extension (qemu's open checks)."""
    ext = h.extension(L.EXT_BITMAPS)
    assert ext is not None
    if len(ext) < EXTENSION_STRUCT.size:
        raise ImageFormatError("bitmaps_ext: Invalid extension length")
    nb, reserved, dir_size, dir_off = EXTENSION_STRUCT.unpack_from(ext, 0)
    if reserved:
        raise ImageFormatError("bitmaps_ext: Reserved field is not zero")
    if nb == 0:
        raise ImageFormatError("found bitmaps extension with zero bitmaps")
    if nb > MAX_BITMAPS:
        raise ImageFormatError(f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported maximum "
                               f"of {MAX_BITMAPS}")
    if dir_size > MAX_DIRECTORY_SIZE:
        raise ImageFormatError(f"bitmaps_ext: Bitmap directory size ({dir_size}) exceeds the maximum "
                               f"supported size ({MAX_DIRECTORY_SIZE})")
    if dir_size == 0:
        raise ImageFormatError("Requested bitmap directory size is zero")
    if dir_off % h.cluster_size or dir_off == 0 or dir_off + dir_size > file_size:
        raise ImageFormatError("bitmaps_ext: Invalid bitmap directory offset")
    return nb, dir_size, dir_off


async def read_directory(hf: HostFile, h: L.Header) -> list[Bitmap]:
    """The bitmap directory, validated as qemu validates it; an empty list when bitmaps are not valid."""
    if not has_bitmaps(h):
        return []
    nb, dir_size, dir_off = parse_extension(h, hf.size())
    raw = await hf.pread(dir_off, dir_size)
    return decode_directory(raw, nb, h.cluster_size, h.size)


def check_table_entry(entry: int, cluster_size: int) -> bool:
    """qemu's check_table_entry: no reserved bits, an aligned offset, no all-ones flag beside an offset."""
    if entry & TABLE_RESERVED_MASK:
        return False
    off = entry & TABLE_OFFSET_MASK
    return not off or (not entry & TABLE_ALL_ONES and not off % cluster_size)


async def read_table(hf: HostFile, bm: Bitmap, cluster_size: int) -> array[int]:
    """The bitmap table of ``bm`` (native integers), each entry checked."""
    if bm.table_offset + bm.table_size * 8 > hf.size():
        raise ImageFormatError(f"Could not read bitmap_table table from image for bitmap '{bm.name}'")
    table = array("Q", await hf.pread(bm.table_offset, bm.table_size * 8))
    if sys.byteorder == "little":
        table.byteswap()
    for e in table:
        if not check_table_entry(e, cluster_size):
            raise ImageFormatError(f"Could not read bitmap_table table from image for bitmap '{bm.name}'")
    return table


def encode_table(table: array[int]) -> bytes:
    out = array("Q", table)
    if sys.byteorder == "little":
        out.byteswap()
    return out.tobytes()


# -- bits: bit i of the data is bit (i % 8) of byte (i // 8), least significant first -----------------

def set_bits(buf: bytearray, first: int, end: int) -> None:
    """Set bits ``[first, end)`` of ``buf``."""
    if end - first == 1:
        buf[first >> 3] |= 1 << (first & 7)
        return
    a, b = first >> 3, (end - 1) >> 3
    lo = (0xFF << (first & 7)) & 0xFF
    hi = 0xFF >> (7 - ((end - 1) & 7))
    if a == b:
        buf[a] |= lo & hi
        return
    buf[a] |= lo
    if b > a + 1:
        buf[a + 1:b] = b"\xff" * (b - a - 1)
    buf[b] |= hi


def clear_tail(buf: bytearray, first: int) -> None:
    """Clear every bit from ``first`` to the end of ``buf`` (the unused tail bits must be zero)."""
    a = first >> 3
    if a >= len(buf):
        return
    buf[a] &= 0xFF >> (8 - (first & 7)) if first & 7 else 0
    buf[a + 1:] = bytes(len(buf) - a - 1)


_NOT_ZERO = re.compile(rb"[^\x00]")
_NOT_FF = re.compile(rb"[^\xff]")


def bit_runs(buf: bytes | bytearray, first: int, end: int) -> list[tuple[int, int, bool]]:
    """Runs ``(start, stop, value)`` of equal bits of ``buf`` covering bits ``[first, end)``.

    Whole bytes of zeroes or of ones are skipped with one C-level search each, so a sparse cluster costs
    a few regex steps, not a Python step per bit.
    """
    out: list[tuple[int, int, bool]] = []
    pos = first

    def add(start: int, stop: int, value: bool) -> None:
        if out and out[-1][2] == value and out[-1][1] == start:
            out[-1] = (out[-1][0], stop, value)
        else:
            out.append((start, stop, value))

    while pos < end:
        byte = buf[pos >> 3]
        if not pos & 7 and (byte == 0 or byte == 0xFF):
            value = byte == 0xFF
            m = (_NOT_FF if value else _NOT_ZERO).search(buf, pos >> 3, (end + 7) >> 3)
            stop = min(end, (m.start() << 3) if m is not None else end)
            add(pos, stop, value)
            pos = stop
            continue
        value = bool(byte >> (pos & 7) & 1)
        add(pos, pos + 1, value)
        pos += 1
    return out


__all__ = [
    "BME_AUTO",
    "BME_IN_USE",
    "Bitmap",
    "bit_runs",
    "bitmap_bytes",
    "check_table_entry",
    "constraints_error",
    "decode_directory",
    "encode_directory",
    "encode_extension",
    "has_bitmaps",
    "read_directory",
    "read_table",
    "set_bits",
    "table_entries",
]
