"""Persistent dirty bitmaps: the bitmaps extension and the bitmap directory, in the words of qcow2.txt.

Read-only for now: ``info`` lists the bitmaps as qemu does (name, granularity, flags). A writer that does
not keep bitmaps up to date must make them invalid, and the driver does that the way the spec provides:
opening read-write clears the ``bitmaps`` autoclear bit, after which every reader (qemu included) treats
all bitmaps as inconsistent, so a backup tool never trusts a bitmap that missed writes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ...errors import ImageFormatError
from ...hostio import HostFile
from . import layout as L

# qemu's limits (block/qcow2-bitmap.c): the directory and names are bounded before anything is read
MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 64 << 20
MAX_NAME_SIZE = 1023

# the host offset in a bitmap table entry (bits 9-55); 0 means the cluster reads as all zeroes or all ones
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00

# flags of a directory entry
BME_IN_USE = 1 << 0
BME_AUTO = 1 << 1
BME_EXTRA_DATA_COMPATIBLE = 1 << 2

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


@dataclass(frozen=True, slots=True)
class Bitmap:
    """One entry of the bitmap directory."""

    name: str
    flags: int
    granularity_bits: int
    table_offset: int
    table_size: int

    def info(self) -> dict[str, Any]:
        """QAPI Qcow2BitmapInfo, its members in declaration order and its flags in qemu's order."""
        flags = [name for bit, name in ((BME_IN_USE, "in-use"), (BME_AUTO, "auto")) if self.flags & bit]
        return {"name": self.name, "granularity": 1 << self.granularity_bits, "flags": flags}


def has_bitmaps(h: L.Header) -> bool:
    """Whether the image's bitmaps are valid to read: the extension is there and its autoclear bit set."""
    return h.version >= 3 and bool(h.autoclear_features & L.AUTOCLEAR_BITMAPS) \
        and h.extension(L.EXT_BITMAPS) is not None


async def read_directory(hf: HostFile, h: L.Header) -> list[Bitmap]:
    """The bitmap directory, validated as qemu validates it; an empty list when bitmaps are not valid."""
    if not has_bitmaps(h):
        return []
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
    if dir_off % h.cluster_size or dir_off + dir_size > hf.size():
        raise ImageFormatError("bitmaps_ext: Invalid bitmap directory offset")
    raw = await hf.pread(dir_off, dir_size)
    out: list[Bitmap] = []
    pos = 0
    for _ in range(nb):
        if pos + ENTRY_STRUCT.size > len(raw):
            raise ImageFormatError("Bitmap directory is truncated")
        tbl_off, tbl_size, flags, _type, gran, name_size, extra = ENTRY_STRUCT.unpack_from(raw, pos)
        start = pos + ENTRY_STRUCT.size + extra
        if name_size > MAX_NAME_SIZE or start + name_size > len(raw):
            raise ImageFormatError("Bitmap directory entry is invalid")
        name = raw[start:start + name_size].decode("utf-8", "replace")
        out.append(Bitmap(name, flags, gran, tbl_off, tbl_size))
        pos = (start + name_size + 7) & ~7
    return out
