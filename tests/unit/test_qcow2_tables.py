"""Pure qcow2 table math: entry decoding, refcount widths, compressed descriptors, subclusters, the cache."""

from __future__ import annotations

import struct
from array import array

import pytest

from imagecore.formats.qcow2 import layout
from imagecore.formats.qcow2.cache import TableCache
from imagecore.formats.qcow2.tables import (
    COMPRESSED,
    NORMAL,
    UNALLOC,
    ZERO,
    bitmap_is_valid,
    classify,
    compressed_entry,
    compressed_location,
    decode_table,
    encode_table,
    make_geometry,
    refcount_get,
    refcount_max,
    refcount_set,
    subcluster_runs,
)


def test_tables_decode_big_endian() -> None:
    raw = struct.pack(">3Q", 1, 0x8000000000050000, 0xFFFFFFFFFFFFFFFF)
    t = decode_table(raw)
    assert list(t) == [1, 0x8000000000050000, 0xFFFFFFFFFFFFFFFF]
    assert encode_table(t) == raw
    assert list(t) == [1, 0x8000000000050000, 0xFFFFFFFFFFFFFFFF]  # encoding leaves the table alone


def test_classify_entries() -> None:
    assert classify(0, True) == (UNALLOC, 0)
    assert classify(layout.L2E_COPIED | 0x50000, True) == (NORMAL, 0x50000)
    assert classify(layout.L2E_ZERO, True) == (ZERO, 0)
    assert classify(layout.L2E_COPIED | 0x50000 | layout.L2E_ZERO, True) == (ZERO, 0x50000)
    assert classify(layout.L2E_COMPRESSED | 0x1234, True)[0] == COMPRESSED
    # v2 has no zero flag
    assert classify(0x50000 | layout.L2E_ZERO, False) == (NORMAL, 0x50000)


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
    runs = subcluster_runs(bm)
    assert runs == [(0, 2, NORMAL), (2, 1, ZERO), (3, 1, NORMAL), (4, 28, UNALLOC)]
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
