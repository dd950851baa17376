"""Pure qcow2 write planning: where a write to each kind of cluster goes, the copy-on-write head and tail of
new clusters, the host writes that carry the data, linking, and the entries zeroing and discard write."""

from __future__ import annotations

from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagecore.formats.qcow2 import layout
from imagecore.formats.qcow2.mapping import BadEntry, ClusterMap
from imagecore.formats.qcow2.plan import Placement, WritePlan, placement, plan_zeroes
from imagecore.formats.qcow2.tables import compressed_entry

P = Placement
COPIED = layout.L2E_COPIED
ZERO = layout.L2E_ZERO
ALL = layout.SC_ALLOC_MASK
CS = 4096


def cmap(extended: bool = False, v3: bool = True, data_file: bool = False, cbits: int = 12) -> ClusterMap:
    return ClusterMap(cbits, cbits - 3 - (1 if extended else 0), extended, v3, data_file)


def test_placement_of_each_kind() -> None:
    m = cmap()
    assert placement(m, 5 * CS | COPIED) == (P.IN_PLACE, 5 * CS)
    assert placement(m, 5 * CS) == (P.VERIFY, 5 * CS)  # the refcount decides
    assert placement(m, 0)[0] == P.NEW
    assert placement(m, ZERO)[0] == P.NEW
    assert placement(m, 5 * CS | ZERO | COPIED)[0] == P.NEW  # zero with its host cluster: rewritten
    assert placement(m, compressed_entry(5 * CS, 100, 12))[0] == P.NEW
    with pytest.raises(BadEntry, match="unaligned"):
        placement(m, 5 * CS + 512 | COPIED)
    # v2: the zero bit is no flag, the cluster is data
    assert placement(cmap(v3=False), 5 * CS | ZERO | COPIED) == (P.IN_PLACE, 5 * CS)
    # data file: offset 0 is a cluster; without COPIED there is no refcount to ask
    d = cmap(data_file=True)
    assert placement(d, COPIED) == (P.IN_PLACE, 0)
    assert placement(d, 5 * CS)[0] == P.NEW
    # extended: only a fully allocated cluster is written in place
    x = cmap(extended=True, cbits=14)
    assert placement(x, 5 << 14 | COPIED, ALL) == (P.IN_PLACE, 5 << 14)
    assert placement(x, 5 << 14 | COPIED, ALL >> 1) == (P.NEW, 5 << 14)
    assert placement(x, 5 << 14 | COPIED, (ALL >> 1) | (1 << 63)) == (P.NEW, 5 << 14)
    assert placement(x, 0, 0)[0] == P.NEW


def test_write_plan_cow_runs_and_link() -> None:
    m = cmap()
    plan = WritePlan(CS + 100, 5 * CS - 50, 12)
    assert list(plan.clusters()) == [CS, 2 * CS, 3 * CS, 4 * CS]
    plan.add_new(CS, 0)
    plan.in_place.append((2 * CS, 40 * CS))
    plan.add_new(3 * CS, ZERO)
    plan.add_new(4 * CS, 0)
    assert [(c.guest, c.head, c.tail) for c in plan.new] == \
        [(CS, 100, 0), (3 * CS, 0, 0), (4 * CS, 0, 50)]
    assert [[c.guest for c in run] for run in plan.allocation_runs()] == [[CS], [3 * CS, 4 * CS]]
    assert [c.guest for c in plan.copy_on_write()] == [CS, 4 * CS]
    for c, host in zip(plan.new, (10 * CS, 20 * CS, 21 * CS), strict=True):
        c.host = host
    data = memoryview(bytes(range(256)) * 64)[:plan.end - plan.offset]
    old = {CS: bytearray(b"\xaa" * CS), 4 * CS: bytearray(b"\xbb" * CS)}
    writes = plan.host_writes(data, old)
    # in place first, then the new clusters; the two consecutive new ones in one write
    assert [(h, [len(b) for b in bufs]) for h, bufs in writes] == \
        [(40 * CS, [CS]), (10 * CS, [CS]), (20 * CS, [CS, CS])]
    first = bytes(writes[1][1][0])
    assert first[:100] == b"\xaa" * 100 and first[100:] == bytes(data[:CS - 100])
    last = bytes(writes[2][1][1])
    assert last[-50:] == b"\xbb" * 50
    l2 = array("Q", [0] * 512)
    assert plan.link(m, l2) == []  # the old entries held no clusters
    assert (l2[1], l2[2], l2[3], l2[4]) == (10 * CS | COPIED, 0, 20 * CS | COPIED, 21 * CS | COPIED)
    x = cmap(extended=True, cbits=14)
    plan = WritePlan(0, 100, 14)
    plan.add_new(0, 3 << 14 | COPIED)
    plan.new[0].host = 9 << 14
    l2 = array("Q", [0] * 2048)
    assert plan.link(x, l2) == [3 << 14 | COPIED]  # its old cluster's reference drops
    assert (l2[0], l2[1]) == (9 << 14 | COPIED, ALL)  # every subcluster allocated


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 8 * CS - 1), st.integers(1, 8 * CS), st.lists(st.booleans(), min_size=8, max_size=8))
def test_host_writes_put_every_byte_in_its_place(offset: int, length: int, in_place: list[bool]) -> None:
    end = min(offset + length, 8 * CS)
    plan = WritePlan(offset, end, 12)
    for k, gc in enumerate(plan.clusters()):
        if in_place[k]:
            plan.in_place.append((gc, (100 + 2 * k) * CS))
        else:
            plan.add_new(gc, 0)
    for c in plan.new:
        c.host = (200 + c.guest // CS) * CS
    data = memoryview(bytes((i * 7 + 3) & 0xFF for i in range(end - offset)))
    old = {c.guest: bytearray([0x5A]) * CS for c in plan.copy_on_write()}
    disk = bytearray(300 * CS)
    for host, bufs in plan.host_writes(data, old):
        blob = b"".join(bytes(b) for b in bufs)
        disk[host:host + len(blob)] = blob
    for gc, host in plan.in_place:
        lo, hi = max(gc, offset), min(gc + CS, end)
        assert disk[host + lo - gc:host + hi - gc] == data[lo - offset:hi - offset]
    for c in plan.new:
        lo, hi = max(c.guest, offset), min(c.guest + CS, end)
        want = b"\x5a" * c.head + bytes(data[lo - offset:hi - offset]) + b"\x5a" * c.tail
        if not (c.head or c.tail):
            assert c.guest not in old
        assert disk[c.host:c.host + CS] == want


@pytest.mark.parametrize(("entry", "may_trim", "discard", "backing", "want", "freed"), [
    # zeroing data: the host cluster stays under the zero flag unless trimming is allowed
    (5 * CS | COPIED, False, False, False, 5 * CS | COPIED | ZERO, False),
    (5 * CS | COPIED, True, False, False, ZERO, True),
    (5 * CS, False, False, False, ZERO, True),  # shared with a snapshot: never kept
    (5 * CS | COPIED | ZERO, False, False, False, None, False),  # already zero: unchanged
    (5 * CS | COPIED | ZERO, True, False, False, ZERO, True),
    (0, False, False, False, 0, False),  # unbacked hole: reads as zeroes already
    (0, False, False, True, ZERO, False),  # a backing file would show through
    # discard (qemu's discard_in_l2_slice): the zero flag where the cluster was allocated or a backing
    # file would show through; an unallocated or zero cluster with nothing behind it stays as it is
    (5 * CS | COPIED, True, True, False, ZERO, True),
    (5 * CS | COPIED, True, True, True, ZERO, True),
    (ZERO, True, True, False, None, False),
    (0, True, True, False, None, False),
    (compressed_entry(9 * CS + 10, 99, 12), True, True, False, ZERO, True),
])
def test_zero_entries(entry: int, may_trim: bool, discard: bool, backing: bool, want: int | None,
                      freed: bool) -> None:
    m = cmap()
    l2 = array("Q", [0] * 512)
    l2[3] = entry
    plan = plan_zeroes(m, l2, 3 * CS, 4 * CS, may_trim=may_trim, discard=discard, backing=backing)
    if want is None or want == entry:
        assert plan.changes == [] and plan.frees == []
        return
    assert plan.changes == [(3, want, 0)]
    assert plan.frees == ([entry] if freed else [])
    plan.apply(m, l2)
    assert l2[3] == want


def test_zero_entries_v2_and_extended() -> None:
    l2 = array("Q", [5 * CS | COPIED] + [0] * 511)
    plan = plan_zeroes(cmap(v3=False), l2, 0, 2 * CS, may_trim=False, discard=False, backing=False)
    assert plan.changes == [(0, 0, 0)] and plan.frees == [5 * CS | COPIED]  # v2: no zero flag to use
    x = cmap(extended=True, cbits=14)
    l2 = array("Q", [0] * 2048)
    l2[0], l2[1] = 7 << 14 | COPIED, ALL
    l2[3] = ALL << 32  # already all zero
    plan = plan_zeroes(x, l2, 0, 2 << 14, may_trim=True, discard=False, backing=False)
    assert plan.changes == [(0, 0, ALL << 32)] and plan.frees == [7 << 14 | COPIED]
    plan = plan_zeroes(x, l2, 0, 2 << 14, may_trim=True, discard=True, backing=False)
    # a discard: the allocated cluster reads as zeroes, the unallocated one with nothing behind is left
    assert plan.changes == [(0, 0, ALL << 32)] and plan.frees == [7 << 14 | COPIED]
    plan.apply(x, l2)
    assert list(l2[:4]) == [0, ALL << 32, 0, ALL << 32]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 6), st.integers(1, 8), st.booleans(), st.integers(0, CS - 1), st.integers(1, CS))
def test_a_run_of_new_clusters_links_and_writes_as_cluster_by_cluster(first: int, count: int, split: bool,
                                                                       head: int, tail: int) -> None:
    """The one-step paths (a span of unallocated clusters added at once, one run contiguous on the host
    linked by one slice assignment and written as one slice of the data) give what adding, linking and
    writing cluster by cluster gives."""
    m = cmap()
    offset = first * CS + head
    end = (first + count - 1) * CS + tail
    if end <= offset:
        end = offset + 1
    fast, slow = WritePlan(offset, end, 12), WritePlan(offset, end, 12)
    clusters = list(fast.clusters())
    fast.add_new_span(clusters[0], len(clusters))
    for gc in clusters:
        slow.add_new(gc, 0)
    assert [(c.guest, c.old, c.head, c.tail) for c in fast.new] == \
        [(c.guest, c.old, c.head, c.tail) for c in slow.new]
    for plan in (fast, slow):
        for k, c in enumerate(plan.new):
            # a gap on the host after the first cluster when ``split``: not one run there
            c.host = (50 + k + (1 if split and k else 0)) * CS
    l2_fast, l2_slow = array("Q", [0] * 512), array("Q", [0] * 512)
    assert fast.link(m, l2_fast) == []
    for c in slow.new:  # the reference: one entry at a time
        l2_slow[c.guest // CS] = c.host | COPIED
    assert l2_fast == l2_slow
    data = memoryview(bytes((i * 5 + 1) & 0xFF for i in range(end - offset)))
    old = {c.guest: bytearray([0x5A]) * CS for c in fast.copy_on_write()}
    assert [c.guest for c in fast.copy_on_write()] == [c.guest for c in slow.new if c.head or c.tail]
    disk = bytearray(80 * CS)
    for host, bufs in fast.host_writes(data, old):
        blob = b"".join(bytes(b) for b in bufs)
        disk[host:host + len(blob)] = blob
    for c in fast.new:
        lo, hi = max(c.guest, offset), min(c.guest + CS, end)
        assert disk[c.host:c.host + CS] == b"\x5a" * c.head + bytes(data[lo - offset:hi - offset]) + \
            b"\x5a" * c.tail
