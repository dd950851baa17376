"""Pure qcow2 table math: decoding L1/L2/refcount tables, the kinds of clusters and subclusters an L2 entry
describes (named as qemu names them), refcount entry access."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from enum import Enum
from functools import lru_cache
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


class ClusterType(Enum):
    """What an L2 entry says about its whole cluster (qemu's QCow2ClusterType).

    A plain Enum, not an IntEnum: a cluster type compared with a subcluster type (or an int) is never
    equal, and mypy's strict equality refuses the comparison.
    """

    UNALLOCATED = 0  # no host cluster: the backing file (or zeroes) shows through
    ZERO_PLAIN = 1  # reads as zeroes, no host cluster (the zero flag: v3, standard entries)
    ZERO_ALLOC = 2  # reads as zeroes, its host cluster kept for the next write
    NORMAL = 3  # a host cluster (with extended L2 entries its subclusters say what each part holds)
    COMPRESSED = 4  # compressed data, packed byte-wise into host clusters

    @property
    def is_allocated(self) -> bool:
        """Whether the entry holds host clusters (qemu's qcow2_cluster_is_allocated)."""
        return self in _ALLOCATED


_ALLOCATED = frozenset({ClusterType.ZERO_ALLOC, ClusterType.NORMAL, ClusterType.COMPRESSED})


class SubclusterType(Enum):
    """What one subcluster is (qemu's QCow2SubclusterType); an image with standard L2 entries has one
    subcluster per cluster. It is also the kind of a guest run that a mapping walk reports."""

    UNALLOCATED_PLAIN = 0  # the backing file (or zeroes) shows through; no host cluster
    UNALLOCATED_ALLOC = 1  # the same, in a host cluster that holds other subclusters (extended L2 only)
    ZERO_PLAIN = 2  # reads as zeroes; no host cluster
    ZERO_ALLOC = 3  # reads as zeroes; in a host cluster
    NORMAL = 4  # data at a host offset
    COMPRESSED = 5  # data in a compressed cluster
    INVALID = 6  # an entry and bitmap no consistent image has


# The subcluster type of a standard entry (its one subcluster), by its cluster type (qemu's
# qcow2_get_subcluster_type); UNALLOCATED_ALLOC needs extended entries.
STANDARD_SUBCLUSTER = {
    ClusterType.UNALLOCATED: SubclusterType.UNALLOCATED_PLAIN,
    ClusterType.ZERO_PLAIN: SubclusterType.ZERO_PLAIN,
    ClusterType.ZERO_ALLOC: SubclusterType.ZERO_ALLOC,
    ClusterType.NORMAL: SubclusterType.NORMAL,
    ClusterType.COMPRESSED: SubclusterType.COMPRESSED,
}


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


def classify(entry: int, v3: bool, data_file: bool = False) -> tuple[ClusterType, int]:
    """(type, host offset) of a standard L2 entry (qemu's qcow2_get_cluster_type).

    The zero flag means something on v3 images only (v2 has no such flag: the bit is ignored). With an
    external data file, offset 0 is a real cluster there, told apart from a hole by the COPIED flag (every
    data file cluster has refcount 1). The host offset is 0 for UNALLOCATED, ZERO_PLAIN and COMPRESSED
    entries (a compressed entry's data: :func:`compressed_location`).
    """
    if entry & L2E_COMPRESSED:
        return ClusterType.COMPRESSED, 0
    host = entry & L2E_OFFSET_MASK
    if v3 and entry & L2E_ZERO:
        return (ClusterType.ZERO_ALLOC, host) if host else (ClusterType.ZERO_PLAIN, 0)
    if host or (data_file and entry & L2E_COPIED):
        return ClusterType.NORMAL, host
    return ClusterType.UNALLOCATED, 0


def classify_extended(entry: int, bitmap: int, data_file: bool = False) -> tuple[ClusterType, int]:
    """(type, host offset) of an extended L2 entry, whose ``bitmap`` says what each subcluster holds.

    Extended entries exist on v3 images only and have no zero flag (their subclusters are zero instead):
    the type is UNALLOCATED, NORMAL or COMPRESSED. An unallocated entry with allocated subclusters is still
    UNALLOCATED here: :func:`subcluster_type` calls its subclusters INVALID.
    """
    if entry & L2E_COMPRESSED:
        return ClusterType.COMPRESSED, 0
    host = entry & L2E_OFFSET_MASK
    if host or (data_file and entry & L2E_COPIED):
        return ClusterType.NORMAL, host
    return ClusterType.UNALLOCATED, 0


def bitmap_is_valid(bitmap: int) -> bool:
    """A subcluster may not be both allocated and zero."""
    return not (bitmap & SC_ALLOC_MASK) & (bitmap >> SC_ZERO_SHIFT)


def subcluster_type(ctype: ClusterType, bitmap: int, index: int) -> SubclusterType:
    """Subcluster ``index`` of an extended entry of cluster type ``ctype`` (qemu's
    qcow2_get_subcluster_type): INVALID when the bitmap does not fit the entry (a subcluster both allocated
    and zero, or allocated subclusters without a host cluster), whichever subcluster is asked about."""
    if ctype == ClusterType.COMPRESSED:
        return SubclusterType.COMPRESSED
    if ctype == ClusterType.NORMAL:
        if not bitmap_is_valid(bitmap):
            return SubclusterType.INVALID
        if bitmap >> (SC_ZERO_SHIFT + index) & 1:
            return SubclusterType.ZERO_ALLOC
        if bitmap >> index & 1:
            return SubclusterType.NORMAL
        return SubclusterType.UNALLOCATED_ALLOC
    if bitmap & SC_ALLOC_MASK:
        return SubclusterType.INVALID
    if bitmap >> (SC_ZERO_SHIFT + index) & 1:
        return SubclusterType.ZERO_PLAIN
    return SubclusterType.UNALLOCATED_PLAIN


@lru_cache(maxsize=4096)
def subcluster_runs(ctype: ClusterType, bitmap: int) -> tuple[tuple[int, int, SubclusterType], ...]:
    """(first subcluster, count, type) runs over the 32 subclusters of an extended entry of cluster type
    ``ctype`` (UNALLOCATED or NORMAL). Cached: an image's bitmaps are few distinct values, and this is the
    mapping walk's cost per extended entry."""
    runs: list[tuple[int, int, SubclusterType]] = []
    start = 0
    kind = subcluster_type(ctype, bitmap, 0)
    for i in range(1, SUBCLUSTERS):
        k = subcluster_type(ctype, bitmap, i)
        if k != kind:
            runs.append((start, i - start, kind))
            start, kind = i, k
    runs.append((start, SUBCLUSTERS - start, kind))
    return tuple(runs)


def referenced_clusters(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(first host cluster's offset, count) of the image file's clusters an L2 entry holds a reference to
    (qemu's qcow2_free_any_cluster): a compressed entry's data may span two; a NORMAL or ZERO_ALLOC entry
    (or, on v2, one with the bit v3 calls zero) holds one; others none, (0, 0). Entries of an image with an
    external data file reference no cluster of the image file."""
    if entry & L2E_COMPRESSED:
        loc = compressed_location(entry, cluster_bits)
        cmask = (1 << cluster_bits) - 1
        first = loc.offset & ~cmask
        last = (loc.offset + loc.size - 1) & ~cmask
        return first, ((last - first) >> cluster_bits) + 1
    host = entry & L2E_OFFSET_MASK
    return (host, 1) if host else (0, 0)


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
    "STANDARD_SUBCLUSTER",
    "ClusterType",
    "Compressed",
    "Geometry",
    "SubclusterType",
    "bitmap_is_valid",
    "classify",
    "classify_extended",
    "compressed_entry",
    "compressed_location",
    "decode_table",
    "encode_entry",
    "encode_table",
    "make_geometry",
    "refcount_get",
    "refcount_max",
    "refcount_set",
    "referenced_clusters",
    "subcluster_runs",
    "subcluster_type",
]
