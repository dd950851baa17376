"""Pure qcow2 cluster mapping: L2 tables to guest runs, checked against a per-cluster (per-subcluster)
walk built from the table math's classify functions, on hand-made and generated tables."""

from __future__ import annotations

from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagecore.formats.qcow2 import layout
from imagecore.formats.qcow2.mapping import BadEntry, ClusterMap, Run, _zero_run_end, append_run
from imagecore.formats.qcow2.tables import (
    STANDARD_SUBCLUSTER,
    ClusterType,
    SubclusterType,
    classify,
    classify_extended,
    compressed_entry,
    subcluster_type,
)

C = ClusterType
S = SubclusterType
COPIED = layout.L2E_COPIED
ZERO = layout.L2E_ZERO


def cmap(cbits: int, extended: bool = False, v3: bool = True, data_file: bool = False) -> ClusterMap:
    return ClusterMap(cbits, cbits - 3 - (1 if extended else 0), extended, v3, data_file)


def reference(m: ClusterMap, l2: array[int] | None, offset: int, end: int, out: list[Run]) -> None:
    """The runs of ``[offset, end)`` one cluster (or subcluster) at a time, merged by append_run."""
    cs = m.cluster_size
    mask = (1 << m.l2_bits) - 1
    for c in range(offset >> m.cluster_bits, ((end - 1) >> m.cluster_bits) + 1):
        lo, hi = max(c * cs, offset), min((c + 1) * cs, end)
        if l2 is None:
            append_run(out, S.UNALLOCATED_PLAIN, lo, hi - lo, 0)
            continue
        if not m.extended:
            e = l2[c & mask]
            ctype, host = classify(e, m.v3, m.data_file)
            if ctype == C.COMPRESSED:
                out.append((S.COMPRESSED, lo, hi - lo, e))
                continue
            if e & layout.L2E_OFFSET_MASK & (cs - 1):
                raise BadEntry(f"L2 entry {e:#x} points to an unaligned cluster")
            kind = STANDARD_SUBCLUSTER[ctype]
            append_run(out, kind, lo, hi - lo,
                       host + lo - c * cs if kind in (S.NORMAL, S.ZERO_ALLOC) else 0)
            continue
        e, bm = l2[2 * (c & mask)], l2[2 * (c & mask) + 1]
        ctype, host = classify_extended(e, bm, m.data_file)
        if ctype == C.COMPRESSED:
            out.append((S.COMPRESSED, lo, hi - lo, e))
            continue
        if host & (cs - 1):
            raise BadEntry(f"L2 entry {e:#x} points to an unaligned cluster")
        sc = cs // layout.SUBCLUSTERS
        for i in range(layout.SUBCLUSTERS):
            s_lo, s_hi = max(c * cs + i * sc, lo), min(c * cs + (i + 1) * sc, hi)
            if s_lo >= s_hi:
                continue
            kind = subcluster_type(ctype, bm, i)
            if kind == S.INVALID:
                raise BadEntry(f"invalid subcluster bitmap for guest cluster {c}")
            append_run(out, kind, s_lo, s_hi - s_lo, host + s_lo - c * cs if ctype == C.NORMAL else 0)


def both(m: ClusterMap, tables: list[tuple[array[int] | None, int, int]]) -> tuple[object, object]:
    """(runs or error) from the walk and from the reference over consecutive windows."""
    results = []
    for fn in (m.table_runs, lambda *a: reference(m, *a)):
        out: list[Run] = []
        try:
            for l2, a, b in tables:
                fn(l2, a, b, out)
            results.append(out)
        except BadEntry as exc:
            results.append(("BadEntry", str(exc)))
    return results[0], results[1]


# -- hand-made tables ---------------------------------------------------------------------------------

def test_standard_runs_merge_and_clip() -> None:
    m = cmap(9)  # 512-byte clusters, 64 entries
    cs = 512
    l2 = array("Q", [0] * 64)
    l2[0] = 10 * cs | COPIED
    l2[1] = 11 * cs | COPIED  # continues: one run
    l2[2] = 20 * cs  # refcount > 1: still data, a new host run
    l2[3] = ZERO
    l2[4] = ZERO  # zeroes merge
    l2[5] = 30 * cs | ZERO | COPIED  # zero with its host cluster kept: another kind
    l2[6] = compressed_entry(40 * cs, 100, 9)
    l2[7] = compressed_entry(40 * cs + 100, 100, 9)  # compressed runs never merge
    out: list[Run] = []
    m.table_runs(l2, 100, 64 * cs, out)
    assert out == [
        (S.NORMAL, 100, 2 * cs - 100, 10 * cs + 100),
        (S.NORMAL, 2 * cs, cs, 20 * cs),
        (S.ZERO_PLAIN, 3 * cs, 2 * cs, 0),
        (S.ZERO_ALLOC, 5 * cs, cs, 30 * cs),
        (S.COMPRESSED, 6 * cs, cs, l2[6]),
        (S.COMPRESSED, 7 * cs, cs, l2[7]),
        (S.UNALLOCATED_PLAIN, 8 * cs, 56 * cs, 0),
    ]
    assert both(m, [(l2, 100, 64 * cs)])[0] == out


def test_v2_ignores_the_zero_flag_and_data_files_have_offset_zero() -> None:
    cs = 512
    l2 = array("Q", [0] * 64)
    l2[0] = ZERO
    l2[1] = 5 * cs | ZERO
    out: list[Run] = []
    cmap(9, v3=False).table_runs(l2, 0, 2 * cs, out)
    assert out == [(S.UNALLOCATED_PLAIN, 0, cs, 0), (S.NORMAL, cs, cs, 5 * cs)]
    l2 = array("Q", [COPIED, cs | COPIED] + [0] * 62)
    out = []
    cmap(9, data_file=True).table_runs(l2, 0, 3 * cs, out)
    assert out == [(S.NORMAL, 0, 2 * cs, 0), (S.UNALLOCATED_PLAIN, 2 * cs, cs, 0)]
    out = []
    cmap(9).table_runs(l2, 0, 3 * cs, out)  # no data file: offset 0 is no cluster
    assert out == [(S.UNALLOCATED_PLAIN, 0, cs, 0), (S.NORMAL, cs, cs, cs),
                   (S.UNALLOCATED_PLAIN, 2 * cs, cs, 0)]


def test_runs_continue_across_tables_and_missing_tables() -> None:
    m = cmap(9)
    span = m.table_span
    l2 = array("Q", [0] * 64)
    l2[63] = 7 * 512 | COPIED
    nxt = array("Q", [8 * 512 | COPIED] + [0] * 63)
    out: list[Run] = []
    m.table_runs(None, 0, span, out)
    m.table_runs(l2, span, 2 * span, out)
    m.table_runs(nxt, 2 * span, 2 * span + 1024, out)
    assert out == [(S.UNALLOCATED_PLAIN, 0, 2 * span - 512, 0),
                   (S.NORMAL, 2 * span - 512, 1024, 7 * 512),
                   (S.UNALLOCATED_PLAIN, 2 * span + 512, 512, 0)]


def test_unaligned_entries_are_bad() -> None:
    l2 = array("Q", [0] * 512)  # 4 KiB clusters: offsets count in 512-byte units
    l2[3] = 5 * 4096 + 512 | COPIED
    with pytest.raises(BadEntry, match="unaligned"):
        cmap(12).table_runs(l2, 0, 64 * 4096, [])
    cmap(12).table_runs(l2, 0, 3 * 4096, [])  # outside the window: not looked at


def test_extended_runs_and_invalid_bitmaps() -> None:
    m = cmap(14, extended=True)  # 16 KiB clusters, 512-byte subclusters
    cs, sc = 1 << 14, 512
    l2 = array("Q", [0] * (2 << m.l2_bits))
    l2[0], l2[1] = 3 * cs | COPIED, 0b0011 | (0b0100 << 32)
    l2[2], l2[3] = 0, 0b1 << 33  # no host cluster, subcluster 1 reads as zeroes
    out: list[Run] = []
    m.table_runs(l2, 0, 2 * cs, out)
    assert out == [(S.NORMAL, 0, 2 * sc, 3 * cs),
                   (S.ZERO_ALLOC, 2 * sc, sc, 3 * cs + 2 * sc),
                   (S.UNALLOCATED_ALLOC, 3 * sc, cs - 3 * sc, 3 * cs + 3 * sc),
                   (S.UNALLOCATED_PLAIN, cs, sc, 0),
                   (S.ZERO_PLAIN, cs + sc, sc, 0),
                   (S.UNALLOCATED_PLAIN, cs + 2 * sc, cs - 2 * sc, 0)]
    assert m.first_invalid(l2, 0, 2 * cs) is None
    l2[3] = 1  # allocated subcluster without a host cluster
    assert m.first_invalid(l2, 0, 2 * cs) == 1
    with pytest.raises(BadEntry, match="guest cluster 1"):
        m.table_runs(l2, 0, 2 * cs, [])
    # an external data file's offset 0 is a host cluster: its subclusters are valid
    l2[2], l2[3] = COPIED, 1
    assert cmap(14, extended=True, data_file=True).first_invalid(l2, 0, 2 * cs) is None


@given(st.integers(1, 200), st.sets(st.integers(0, 199), max_size=12), st.integers(0, 199))
def test_zero_run_end(n: int, nonzero: set[int], start: int) -> None:
    start = min(start, n)
    a = array("Q", [0] * n)
    for i in nonzero:
        if i < n:
            a[i] = 1 << (8 * (i % 8))  # any one byte of the entry
    want = next((i for i in range(start, n) if a[i]), n)
    assert _zero_run_end(a.tobytes(), start, n) == want


# -- generated tables against the reference -----------------------------------------------------------

def _standard_entry(cbits: int) -> st.SearchStrategy[int]:
    cs = 1 << cbits
    host = st.integers(1, 12).map(lambda h: h * cs)
    return st.one_of(
        st.just(0),
        host.map(lambda h: h | COPIED),
        host,
        st.just(ZERO),
        host.map(lambda h: h | ZERO | COPIED),
        st.just(COPIED),
        st.just(COPIED | ZERO),
        st.tuples(st.integers(1, 50), st.integers(1, cs)).map(
            lambda t: compressed_entry(t[0] * cs + 7, t[1], cbits)),
        host.map(lambda h: (h + 512) | COPIED),  # unaligned with 4 KiB clusters: a corrupt image
    )


@st.composite
def _standard_case(draw: st.DrawFn) -> tuple[ClusterMap, list[tuple[array[int] | None, int, int]]]:
    cbits = draw(st.sampled_from([9, 12]))
    m = cmap(cbits, v3=draw(st.booleans()), data_file=draw(st.booleans()))
    n = 1 << m.l2_bits
    entry = _standard_entry(cbits)
    tables: list[tuple[array[int] | None, int, int]] = []
    for t in range(draw(st.integers(1, 3))):
        base = t * m.table_span
        if draw(st.integers(0, 5)) == 0:
            tables.append((None, base, base + m.table_span))
            continue
        sparse = draw(st.dictionaries(st.integers(0, n - 1), entry, max_size=40))
        runs = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, 40), st.integers(1, 99)),
                             max_size=3))
        l2 = array("Q", [0] * n)
        for i, e in sparse.items():
            l2[i] = e
        for i, count, h in runs:  # contiguous data, the common case of a written image
            for k in range(i, min(n, i + count)):
                l2[k] = (h + k - i) << cbits | COPIED
        tables.append((l2, base, base + m.table_span))
    # a window that starts and ends anywhere inside the first and last table
    first, last = tables[0], tables[-1]
    lo = draw(st.integers(first[1], first[2] - 1))
    hi = draw(st.integers(max(lo + 1, last[1]), last[2]))
    tables = [(l2, max(a, lo), min(b, hi)) for l2, a, b in tables if max(a, lo) < min(b, hi)]
    return m, tables


@settings(max_examples=300, deadline=None)
@given(_standard_case())
def test_standard_runs_match_the_reference(case: tuple[ClusterMap, list[tuple[array[int] | None, int, int]]]
                                           ) -> None:
    m, tables = case
    walk, ref = both(m, tables)
    assert walk == ref


@st.composite
def _extended_case(draw: st.DrawFn) -> tuple[ClusterMap, list[tuple[array[int] | None, int, int]]]:
    cbits = draw(st.sampled_from([9, 14]))
    m = cmap(cbits, extended=True, data_file=draw(st.booleans()))
    n = 1 << m.l2_bits
    cs = 1 << cbits
    half = st.integers(0, 0xFFFFFFFF)
    bitmap = st.one_of(
        st.just(0), st.just(0xFFFFFFFF), st.just(0xFFFFFFFF << 32),
        half.map(lambda a: a),  # allocated subclusters only
        half.map(lambda z: z << 32),  # zero subclusters only
        half.map(lambda a: a | ((~a & 0xFFFFFFFF) << 32)),  # valid mixes
        st.integers(0, (1 << 64) - 1),  # anything, mostly invalid
    )
    entry = st.one_of(st.just(0), st.just(COPIED), st.integers(1, 12).map(lambda h: h * cs | COPIED),
                      st.integers(1, 50).map(lambda h: compressed_entry(h * cs + 3, 40, cbits)))
    l2 = array("Q", [0] * (2 * n))
    for i, (e, bm) in draw(st.dictionaries(st.integers(0, n - 1), st.tuples(entry, bitmap),
                                           max_size=20)).items():
        l2[2 * i], l2[2 * i + 1] = e, bm
    lo = draw(st.integers(0, m.table_span - 1))
    hi = draw(st.integers(lo + 1, m.table_span))
    return m, [(l2, lo, hi)]


@settings(max_examples=300, deadline=None)
@given(_extended_case())
def test_extended_runs_match_the_reference(case: tuple[ClusterMap, list[tuple[array[int] | None, int, int]]]
                                           ) -> None:
    m, tables = case
    walk, ref = both(m, tables)
    assert walk == ref
    l2, lo, hi = tables[0]
    assert l2 is not None
    # the generated entries are aligned: the walk fails exactly when some bitmap is invalid
    assert (m.first_invalid(l2, lo, hi) is not None) == isinstance(ref, tuple)
