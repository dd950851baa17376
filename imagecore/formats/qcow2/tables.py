"""Pure qcow2 table math: decoding L1/L2/refcount tables, classifying L2 entries, refcount entry access."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from typing import NamedTuple

from .layout import (
    L2E_COMPRESSED,
    L2E_COPIED,
    L2E_OFFSET_MASK,
    L2E_ZERO,
    SC_ALLOC_MASK,
    SC_ZERO_SHIFT,
    SUBCLUSTERS,
    compressed_split,
)

_LITTLE = sys.byteorder == "little"

# Kinds of guest ranges, as a mapping walk reports them.
UNALLOC = 0  # not defined here: the backing file (or zeroes) shows through
ZERO = 1  # reads as zeroes (zero flag, or a zero subcluster)
NORMAL = 2  # data at a host offset
COMPRESSED = 3  # data in a compressed cluster


def decode_table(buf: bytes | bytearray | memoryview) -> array[int]:
    """Big-endian 64-bit entries to a native array."""
    a = array("Q")
    a.frombytes(buf)
    if _LITTLE:
        a.byteswap()
    return a


def encode_table(a: array[int]) -> bytes:
    """A native array of 64-bit entries to big-endian bytes."""
    if not _LITTLE:
        return a.tobytes()
    b = array("Q", a)
    b.byteswap()
    return b.tobytes()


def encode_entry(v: int) -> bytes:
    return v.to_bytes(8, "big")


class Compressed(NamedTuple):
    """Where a compressed cluster's data lies: ``offset`` and the byte count to read."""

    offset: int
    size: int


def compressed_location(entry: int, cluster_bits: int) -> Compressed:
    """Decode a compressed cluster descriptor (spec: offset bits 0..x-1, extra sectors x..61)."""
    mask, shift = compressed_split(cluster_bits)
    desc = entry & ~(L2E_COMPRESSED | L2E_COPIED)
    off = desc & mask
    sectors = (desc >> shift) + 1
    size = sectors * 512 - (off & 511)
    return Compressed(off, size)


def compressed_entry(offset: int, size: int, cluster_bits: int) -> int:
    """Encode a compressed cluster descriptor (``size`` bytes of compressed data at ``offset``)."""
    _mask, shift = compressed_split(cluster_bits)
    end = offset + size
    sectors = (end - 1) // 512 - offset // 512
    return L2E_COMPRESSED | (sectors << shift) | offset


def classify(entry: int, v3: bool) -> tuple[int, int]:
    """(kind, host offset) of a standard L2 entry. ZERO keeps its host offset when it has one."""
    if entry & L2E_COMPRESSED:
        return COMPRESSED, 0
    host = entry & L2E_OFFSET_MASK
    if v3 and entry & L2E_ZERO:
        return ZERO, host
    if host == 0:
        return UNALLOC, 0
    return NORMAL, host


def subcluster_kind(bitmap: int, index: int) -> int:
    """Kind of subcluster ``index`` of an extended L2 entry's bitmap (NORMAL, ZERO or UNALLOC)."""
    if bitmap >> (SC_ZERO_SHIFT + index) & 1:
        return ZERO
    if bitmap >> index & 1:
        return NORMAL
    return UNALLOC


def subcluster_runs(bitmap: int) -> list[tuple[int, int, int]]:
    """(first subcluster, count, kind) runs over the 32 subclusters of an extended L2 entry."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    kind = subcluster_kind(bitmap, 0)
    for i in range(1, SUBCLUSTERS):
        k = subcluster_kind(bitmap, i)
        if k != kind:
            runs.append((start, i - start, kind))
            start, kind = i, k
    runs.append((start, SUBCLUSTERS - start, kind))
    return runs


def bitmap_is_valid(bitmap: int) -> bool:
    """A subcluster may not be both allocated and zero."""
    return not (bitmap & SC_ALLOC_MASK) & (bitmap >> SC_ZERO_SHIFT)


# -- refcount blocks ----------------------------------------------------------------------------------

def refcount_get(block: bytearray | bytes, index: int, order: int) -> int:
    """Refcount ``index`` of a refcount block of entries ``1 << order`` bits wide."""
    if order == 4:
        return int.from_bytes(block[2 * index:2 * index + 2], "big")
    if order >= 3:
        w = 1 << (order - 3)
        return int.from_bytes(block[w * index:w * index + w], "big")
    bits = 1 << order
    per = 8 // bits
    return block[index // per] >> (bits * (index % per)) & ((1 << bits) - 1)


def refcount_set(block: bytearray, index: int, order: int, value: int) -> None:
    if order >= 3:
        w = 1 << (order - 3)
        block[w * index:w * index + w] = value.to_bytes(w, "big")
        return
    bits = 1 << order
    per = 8 // bits
    shift = bits * (index % per)
    mask = ((1 << bits) - 1) << shift
    block[index // per] = (block[index // per] & ~mask) | (value << shift)


def refcount_max(order: int) -> int:
    return (1 << (1 << order)) - 1


_SUB_BYTE_TABLES: dict[int, list[tuple[int, ...]]] = {}


def _sub_byte_table(order: int) -> list[tuple[int, ...]]:
    t = _SUB_BYTE_TABLES.get(order)
    if t is None:
        bits = 1 << order
        per = 8 >> order
        mask = (1 << bits) - 1
        t = [tuple((b >> (i * bits)) & mask for i in range(per)) for b in range(256)]
        _SUB_BYTE_TABLES[order] = t
    return t


# array codes for refcount orders 3 to 6 (entries of 8 to 64 bits)
REFCOUNT_CODES = {3: "B", 4: "H", 5: "I", 6: "Q"}


def decode_refcount_block(raw: bytes, code: str, entries: int) -> array[int]:
    """A stored refcount block (b"" when absent) as native integers of the entries' own width."""
    if not raw:
        return array(code, bytes(entries * array(code).itemsize))
    a = array(code, raw)
    if a.itemsize > 1:
        a.byteswap()
    return a


def unpack_refcounts(block: bytes, order: int) -> array[int]:
    """Decode a refcount block; entries narrower than a byte are packed least significant bits first."""
    if order >= 3:
        return array("Q", decode_refcount_block(block, REFCOUNT_CODES[order], len(block) << 3 >> order))
    table = _sub_byte_table(order)
    out = array("Q")
    for b in block:
        out.extend(table[b])
    return out


def pack_refcounts(values: Sequence[int], order: int, cluster_size: int) -> bytes:
    """Encode refcounts into one refcount block of ``cluster_size`` bytes (missing entries are 0)."""
    if order >= 3:
        code = REFCOUNT_CODES[order]
        a = array(code, values)
        if a.itemsize > 1:
            a.byteswap()
        raw = a.tobytes()
        return raw + bytes(cluster_size - len(raw))
    bits = 1 << order
    per = 8 >> order
    out = bytearray(cluster_size)
    for i, v in enumerate(values):
        out[i // per] |= v << ((i % per) * bits)
    return bytes(out)


def ones_refcount_block(used: int, order: int, cluster_size: int) -> bytes:
    """A refcount block whose first ``used`` entries are 1: the shape of every freshly created image."""
    if order >= 3:
        width = 1 << (order - 3)
        one = (1).to_bytes(width, "big")
        return one * used + bytes(cluster_size - used * width)
    per = 8 >> order
    full_byte = sum(1 << (i << order) for i in range(per))
    nfull, rest = divmod(used, per)
    out = bytearray(bytes([full_byte]) * nfull)
    if rest:
        out.append(sum(1 << (i << order) for i in range(rest)))
    return bytes(out) + bytes(cluster_size - len(out))


class Geometry(NamedTuple):
    """Sizes derived from the header that the table math needs."""

    cluster_bits: int
    l2_bits: int  # log2 of entries per L2 table
    l2_entry_words: int  # 1 for standard, 2 for extended L2 entries
    refcount_order: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return 1 << self.l2_bits

    @property
    def refblock_bits(self) -> int:
        """log2 of refcount entries per refcount block."""
        return self.cluster_bits + 3 - self.refcount_order

    def l1_index(self, guest: int) -> int:
        return guest >> (self.cluster_bits + self.l2_bits)

    def l2_index(self, guest: int) -> int:
        return (guest >> self.cluster_bits) & ((1 << self.l2_bits) - 1)

    def refcount_position(self, host: int) -> tuple[int, int]:
        """(refcount table index, index in the block) of the cluster at host offset ``host``."""
        c = host >> self.cluster_bits
        return c >> self.refblock_bits, c & ((1 << self.refblock_bits) - 1)


def make_geometry(cluster_bits: int, extended_l2: bool, refcount_order: int) -> Geometry:
    words = 2 if extended_l2 else 1
    l2_bits = cluster_bits - 3 - (1 if extended_l2 else 0)
    return Geometry(cluster_bits, l2_bits, words, refcount_order)


__all__ = [
    "COMPRESSED",
    "NORMAL",
    "UNALLOC",
    "ZERO",
    "Compressed",
    "Geometry",
    "bitmap_is_valid",
    "classify",
    "compressed_entry",
    "compressed_location",
    "decode_table",
    "encode_entry",
    "encode_table",
    "make_geometry",
    "refcount_get",
    "refcount_max",
    "refcount_set",
    "subcluster_kind",
    "subcluster_runs",
]
