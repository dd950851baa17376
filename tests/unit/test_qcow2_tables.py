"""Pure qcow2 table math: entry decoding, refcount widths, compressed descriptors, subclusters, the cache."""

from __future__ import annotations

import struct
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagecore.formats.qcow2 import layout
from imagecore.formats.qcow2.cache import TableCache
from imagecore.formats.qcow2.tables import (
    STANDARD_SUBCLUSTER,
    ClusterType,
    SubclusterType,
    bitmap_is_valid,
    classify,
    classify_extended,
    compressed_entry,
    compressed_location,
    decode_table,
    encode_table,
    make_geometry,
    refcount_get,
    refcount_max,
    refcount_set,
    referenced_clusters,
    subcluster_runs,
    subcluster_type,
)

C = ClusterType
S = SubclusterType


def test_tables_decode_big_endian() -> None:
    raw = struct.pack(">3Q", 1, 0x8000000000050000, 0xFFFFFFFFFFFFFFFF)
    t = decode_table(raw)
    assert list(t) == [1, 0x8000000000050000, 0xFFFFFFFFFFFFFFFF]
    assert encode_table(t) == raw
    assert list(t) == [1, 0x8000000000050000, 0xFFFFFFFFFFFFFFFF]  # encoding leaves the table alone


def test_classify_entries() -> None:
    assert classify(0, True) == (C.UNALLOCATED, 0)
    assert classify(layout.L2E_COPIED | 0x50000, True) == (C.NORMAL, 0x50000)
    assert classify(0x50000, True) == (C.NORMAL, 0x50000)  # shared with a snapshot: still normal
    assert classify(layout.L2E_ZERO, True) == (C.ZERO_PLAIN, 0)
    assert classify(layout.L2E_COPIED | 0x50000 | layout.L2E_ZERO, True) == (C.ZERO_ALLOC, 0x50000)
    assert classify(layout.L2E_COMPRESSED | 0x1234, True) == (C.COMPRESSED, 0)
    # v2 has no zero flag: the bit is ignored
    assert classify(0x50000 | layout.L2E_ZERO, False) == (C.NORMAL, 0x50000)
    assert classify(layout.L2E_ZERO, False) == (C.UNALLOCATED, 0)
    # offset 0 with COPIED is a real cluster in an external data file, and nothing without one
    assert classify(layout.L2E_COPIED, True, data_file=True) == (C.NORMAL, 0)
    assert classify(layout.L2E_COPIED, True) == (C.UNALLOCATED, 0)
    assert classify(0, True, data_file=True) == (C.UNALLOCATED, 0)
    assert classify(layout.L2E_COPIED | layout.L2E_ZERO, True, data_file=True) == (C.ZERO_PLAIN, 0)
    assert [t for t in C if t.is_allocated] == [C.ZERO_ALLOC, C.NORMAL, C.COMPRESSED]


def test_kinds_never_equal_across_types() -> None:
    # plain enums: a cluster type mistaken for a subcluster type (or an int) never compares equal
    assert C.NORMAL != S.NORMAL and C.NORMAL.value != S.NORMAL.value
    assert all(S.NORMAL != v for v in range(8))
    assert {STANDARD_SUBCLUSTER[t].name for t in C} == \
        {"UNALLOCATED_PLAIN", "ZERO_PLAIN", "ZERO_ALLOC", "NORMAL", "COMPRESSED"}


def test_classify_extended_entries() -> None:
    host = 0x60000 | layout.L2E_COPIED
    assert classify_extended(host, 0) == (C.NORMAL, 0x60000)
    # extended entries have no zero flag: their subclusters are zero instead
    assert classify_extended(layout.L2E_ZERO, 0xFFFFFFFF << 32) == (C.UNALLOCATED, 0)
    assert classify_extended(layout.L2E_COMPRESSED | 0x1234, 0) == (C.COMPRESSED, 0)
    assert classify_extended(layout.L2E_COPIED, 1, data_file=True) == (C.NORMAL, 0)
    assert classify_extended(layout.L2E_COPIED, 1) == (C.UNALLOCATED, 0)


def test_subcluster_types_as_qemu() -> None:
    # bit i: subcluster i allocated; bit 32+i: subcluster i reads as zeroes
    bm = 0b01 | (0b10 << 32)
    assert [subcluster_type(C.NORMAL, bm, i) for i in range(3)] == \
        [S.NORMAL, S.ZERO_ALLOC, S.UNALLOCATED_ALLOC]
    assert [subcluster_type(C.UNALLOCATED, 0b10 << 32, i) for i in range(3)] == \
        [S.UNALLOCATED_PLAIN, S.ZERO_PLAIN, S.UNALLOCATED_PLAIN]
    # invalid: allocated and zero at once, or allocated subclusters without a host cluster; the whole
    # entry is invalid, whichever subcluster is asked about
    assert subcluster_type(C.NORMAL, 1 | (1 << 32), 5) == S.INVALID
    assert subcluster_type(C.UNALLOCATED, 1 << 7, 0) == S.INVALID
    assert subcluster_type(C.COMPRESSED, 0xFFFF, 0) == S.COMPRESSED


@pytest.mark.parametrize("cbits", [9, 16, 21])
def test_referenced_clusters(cbits: int) -> None:
    cs = 1 << cbits
    assert referenced_clusters(0, cbits) == (0, 0)
    assert referenced_clusters(layout.L2E_ZERO, cbits) == (0, 0)
    assert referenced_clusters(5 * cs | layout.L2E_COPIED, cbits) == (5 * cs, 1)
    assert referenced_clusters(5 * cs | layout.L2E_ZERO, cbits) == (5 * cs, 1)  # zero, host kept
    # compressed data: every host cluster its bytes touch, however the descriptor rounds to sectors
    assert referenced_clusters(compressed_entry(3 * cs + 100, 300, cbits), cbits) == (3 * cs, 1)
    assert referenced_clusters(compressed_entry(4 * cs - 100, 300, cbits), cbits) == (3 * cs, 2)
    assert referenced_clusters(compressed_entry(4 * cs - 512, 512, cbits), cbits) == (3 * cs, 1)


@pytest.mark.parametrize("order", range(7))
def test_refcount_widths(order: int) -> None:
    cs = 512
    blk = bytearray(cs)
    n = cs * 8 >> order
    mx = refcount_max(order)
    vals = [(i * 2654435761) % (mx + 1) for i in range(n)]
    for i, v in enumerate(vals):
        refcount_set(blk, i, order, v)
    assert [refcount_get(blk, i, order) for i in range(n)] == vals
    if order == 4:
        assert blk[:2] == vals[0].to_bytes(2, "big")
    if order == 0:
        # sub-byte widths fill each byte from its least significant bit (spec and qemu agree)
        b = bytearray(1)
        refcount_set(b, 0, 0, 1)
        assert b[0] == 1
        refcount_set(b, 7, 0, 1)
        assert b[0] == 0x81


@pytest.mark.parametrize("cbits", [9, 12, 16, 21])
def test_compressed_descriptor_round_trip(cbits: int) -> None:
    for off, size in ((0x10000 + 17, 1000), (0x200000, 512), (0x7000 + 511, 3)):
        e = compressed_entry(off, size, cbits)
        loc = compressed_location(e | layout.L2E_COPIED, cbits)
        assert loc.offset == off
        assert loc.size >= size and (off + loc.size) % 512 == 0


def test_subclusters() -> None:
    bm = 0b1011 | (0b100 << 32)
    assert bitmap_is_valid(bm)
    runs = subcluster_runs(C.NORMAL, bm)
    assert runs == ((0, 2, S.NORMAL), (2, 1, S.ZERO_ALLOC), (3, 1, S.NORMAL), (4, 28, S.UNALLOCATED_ALLOC))
    assert subcluster_runs(C.UNALLOCATED, 0b110 << 32) == \
        ((0, 1, S.UNALLOCATED_PLAIN), (1, 2, S.ZERO_PLAIN), (3, 29, S.UNALLOCATED_PLAIN))
    assert subcluster_runs(C.UNALLOCATED, 1) == ((0, 32, S.INVALID),)
    assert not bitmap_is_valid(1 | (1 << 32))


def test_geometry() -> None:
    g = make_geometry(16, False, 4)
    assert g.l2_entries == 8192 and g.refblock_bits == 15
    assert g.l1_index(8192 * 65536) == 1 and g.l2_index(65536 * 3) == 3
    assert g.refcount_position(65536 * 32769) == (1, 1)
    x = make_geometry(16, True, 4)
    assert x.l2_entries == 4096 and x.l2_entry_words == 2


def test_cache_keeps_dirty_entries() -> None:
    c: TableCache[array[int]] = TableCache(4096, budget=4 * 4096)
    for i in range(4):
        c.put(i, array("Q"), dirty=(i == 0))
    for i in range(4, 10):
        c.put(i, array("Q"))
    assert len(c) == 4 and 0 in c and c.dirty == {0}
    assert c.get(9) is not None and c.get(1) is None
    c.mark_clean(0)
    c.put(10, array("Q"))
    assert 0 not in c


def test_cache_never_drops_the_entry_just_used() -> None:
    c: TableCache[array[int]] = TableCache(4096, budget=4 * 4096)
    for i in range(4):
        c.put(i, array("Q"), dirty=True)
    t = array("Q", [1])
    c.put(99, t)  # every older entry is dirty: the new one must survive for its caller
    assert c.get(99) is t
    c.put(100, array("Q"))
    assert 99 not in c
    c.mark_dirty(99, t)  # a change to a table its owner still holds puts it back
    assert c.get(99) is t and 99 in c.dirty


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(1, 1 << 20)), min_size=1, max_size=64),
       st.integers(9, 21), st.booleans())
def test_one_run_is_found_exactly_when_the_entries_are_one_contiguous_run(
        entries: list[int | None], bits: int, copied: bool) -> None:
    """check's fast path for a table written in order agrees with the entry-by-entry list of clusters."""
    from imagecore.formats.qcow2.check import _cluster_indexes, _one_run

    # half the time, turn the allocated entries into one contiguous run
    if copied:
        first = next((e for e in entries if e is not None), 1)
        alloc = [i for i, e in enumerate(entries) if e is not None]
        if alloc:
            lo, hi = alloc[0], alloc[-1]
            entries = [None] * lo + [first + i for i in range(hi - lo + 1)] + [None] * (len(entries) - hi - 1)
    raw = b"".join(struct.pack(">Q", 0 if e is None else (1 << 63) | (e << bits)) for e in entries)
    ks = _cluster_indexes(raw, bits)
    contiguous = bool(ks) and ks == list(range(ks[0], ks[0] + len(ks))) and (
        len(ks) == 1 + max(i for i, e in enumerate(entries) if e is not None)
        - min(i for i, e in enumerate(entries) if e is not None))
    used = sum(1 for e in entries if e is not None)
    assert _one_run(raw, bits) == ((ks[0], len(ks), used) if contiguous else None)
