"""Pure qcow2 cluster mapping: L2 table contents to runs of the guest address space, with no I/O.

A run is ``(kind, guest offset, length, host)``: ``kind`` is a :class:`~.tables.SubclusterType` (an image
with standard L2 entries has one subcluster per cluster); ``host`` is the byte offset of the data for
NORMAL, of the host bytes for ZERO_ALLOC and UNALLOCATED_ALLOC (0 for the PLAIN kinds), and the raw L2 entry
for COMPRESSED. Adjacent runs merge when their kind and host offsets continue, as qemu's block status
merges them; compressed runs never merge (each has its own entry).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any

from .layout import L2E_COMPRESSED, L2E_COPIED, L2E_OFFSET_MASK, L2E_ZERO, SUBCLUSTERS
from .tables import ClusterType, SubclusterType, classify_extended, subcluster_runs, subcluster_type

Run = tuple[SubclusterType, int, int, int]

# module-level names: the walk below compares kinds once per entry, and a global lookup is cheaper there
# than an enum class attribute
UNALLOCATED_PLAIN = SubclusterType.UNALLOCATED_PLAIN
UNALLOCATED_ALLOC = SubclusterType.UNALLOCATED_ALLOC
ZERO_PLAIN = SubclusterType.ZERO_PLAIN
ZERO_ALLOC = SubclusterType.ZERO_ALLOC
NORMAL = SubclusterType.NORMAL
COMPRESSED = SubclusterType.COMPRESSED
INVALID = SubclusterType.INVALID

# zero bytes to compare spans of L2 entries with: as many as the largest L2 table has (2 MiB clusters);
# untouched pages of a zero-filled allocation cost no memory
_ZEROS = memoryview(bytes(1 << 21))


class BadEntry(Exception):
    """An L2 entry that no consistent image has; the driver turns it into CorruptImageError."""


@dataclass(frozen=True, slots=True)
class ClusterMap:
    """How one image's L2 entries map guest bytes: the format parameters the walk needs, nothing that
    changes while the image is open."""

    cluster_bits: int
    l2_bits: int  # log2 of entries per L2 table
    extended: bool  # extended L2 entries (with a subcluster bitmap)
    v3: bool  # the zero flag of standard entries counts
    data_file: bool  # an external data file: host offset 0 (with COPIED) is a real cluster

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def table_span(self) -> int:
        """Guest bytes one L2 table maps."""
        return 1 << (self.cluster_bits + self.l2_bits)

    def table_runs(self, l2: array[int] | None, offset: int, end: int, out: list[Run]) -> None:
        """Append the runs of ``[offset, end)``, which lies within one L2 table's coverage (``l2`` is that
        table, None when the L1 entry is empty). Raises BadEntry for an entry no consistent image has."""
        if l2 is None:
            append_run(out, UNALLOCATED_PLAIN, offset, end - offset, 0)
        elif self.extended:
            self.extended_runs(l2, offset, end, out)
        else:
            self.standard_runs(l2, offset, end, out)

    def first_invalid(self, l2: array[int], offset: int, end: int) -> int | None:
        """The first guest cluster of ``[offset, end)`` whose extended entry and subcluster bitmap are
        INVALID (qemu marks the image corrupt on those), or None."""
        mask = (1 << self.l2_bits) - 1
        for c in range(offset >> self.cluster_bits, ((end - 1) >> self.cluster_bits) + 1):
            idx = c & mask
            e, bm = l2[2 * idx], l2[2 * idx + 1]
            ctype = classify_extended(e, bm, self.data_file)[0]
            if subcluster_type(ctype, bm, 0) == INVALID:
                return c
        return None

    def extended_runs(self, l2: array[int], offset: int, end: int, out: list[Run]) -> None:
        cbits = self.cluster_bits
        cs = 1 << cbits
        mask = (1 << self.l2_bits) - 1
        sc = cs // SUBCLUSTERS
        data_file = self.data_file
        pos = offset
        while pos < end:
            idx = (pos >> cbits) & mask
            cstart = pos & ~(cs - 1)
            cend = min(cstart + cs, end)
            e = l2[2 * idx]
            bm = l2[2 * idx + 1]
            ctype, host = classify_extended(e, bm, data_file)
            if ctype == ClusterType.COMPRESSED:
                out.append((COMPRESSED, pos, cend - pos, e))
                pos = cend
                continue
            if host & (cs - 1):
                raise BadEntry(f"L2 entry {e:#x} points to an unaligned cluster")
            # every subcluster of an allocated cluster (data, zero or unallocated) has its host bytes
            allocated = ctype == ClusterType.NORMAL
            for first, count, kind in subcluster_runs(ctype, bm):
                rs = max(cstart + first * sc, pos)
                re_ = min(cstart + (first + count) * sc, cend)
                if rs >= re_:
                    continue
                if kind == INVALID:
                    raise BadEntry(f"invalid subcluster bitmap for guest cluster {pos >> cbits}")
                append_run(out, kind, rs, re_ - rs, host + (rs - cstart) if allocated else 0)
            pos = cend

    def standard_runs(self, l2: array[int], offset: int, end: int, out: list[Run]) -> None:
        """:meth:`table_runs` for standard L2 entries: one pass that merges as it goes (this loop is map's,
        block status's and convert's cost on a large image, so it stays flat: it applies
        :func:`~.tables.classify`'s rules inline, and a test keeps the two equal)."""
        cbits = self.cluster_bits
        cs = 1 << cbits
        first = offset >> cbits
        last = (end - 1) >> cbits
        i0 = first & ((1 << self.l2_bits) - 1)
        v3 = self.v3
        data_file = self.data_file
        runs: list[list[Any]] = []  # [kind, first guest byte, length, host] in whole clusters
        rk: SubclusterType | None = None
        rhost = rlen = 0
        g = first << cbits
        entries = l2[i0:i0 + last - first + 1]
        raw = bytes(memoryview(entries).cast("B"))  # zero entries are zero in either byte order
        n = len(entries)
        i = 0
        while i < n:
            e = entries[i]
            if not e:
                # A run of unallocated clusters: its end found by comparing spans with zeroes (memcmp)
                # instead of a Python step per entry, since the holes of a sparse image are most of its
                # L2 entries.
                nxt = _zero_run_end(raw, i + 1, n)
                span = (nxt - i) << cbits
                if rk == UNALLOCATED_PLAIN:
                    rlen += span
                    runs[-1][2] = rlen
                else:
                    rk, rhost, rlen = UNALLOCATED_PLAIN, 0, span
                    runs.append([UNALLOCATED_PLAIN, g, span, 0])
                g += span
                i = nxt
                continue
            i += 1
            if e & L2E_COMPRESSED:
                runs.append([COMPRESSED, g, cs, e])
                rk = None
                g += cs
                continue
            host = e & L2E_OFFSET_MASK
            if host & (cs - 1):
                raise BadEntry(f"L2 entry {e:#x} points to an unaligned cluster")
            if v3 and e & L2E_ZERO:
                kind = ZERO_ALLOC if host else ZERO_PLAIN
            elif host or (data_file and e & L2E_COPIED):
                kind = NORMAL  # offset 0 is a real offset in an external data file
            else:
                kind = UNALLOCATED_PLAIN
            # the same rule as append_run: data continues at the next host cluster; zeroes and holes
            # merge when neither has a host offset or the host offsets continue
            if kind == rk and (host == rhost + rlen if kind == NORMAL or rhost else not host):
                rlen += cs
                runs[-1][2] = rlen
            else:
                rk, rhost, rlen = kind, host, cs
                runs.append([kind, g, cs, host])
            g += cs
        # clip the first and last clusters to [offset, end)
        head = offset - (first << cbits)
        if head:
            r = runs[0]
            r[1] += head
            r[2] -= head
            if r[0] != COMPRESSED and (r[0] == NORMAL or r[3]):
                r[3] += head
        runs[-1][2] -= g - end
        # the runs of one table are already merged: only the first may continue the previous table's last
        kind, rg, n, host = runs[0]
        append_run(out, kind, rg, n, host)
        out.extend([(kind, rg, n, host) for kind, rg, n, host in runs[1:]])


def _zero_run_end(raw: bytes, i: int, n: int) -> int:
    """The index of the first non-zero 8-byte entry of ``raw`` at or after ``i`` (``n`` when none is):
    spans doubling from ``i`` until one is not all zeroes, then halved down to that entry."""
    step = 1
    while i < n:
        cand = min(i + step, n)
        if not raw.startswith(_ZEROS[:(cand - i) << 3], i << 3):
            while cand - i > 1:  # [i, cand) holds a non-zero entry
                mid = (i + cand) >> 1
                if raw.startswith(_ZEROS[:(mid - i) << 3], i << 3):
                    i = mid
                else:
                    cand = mid
            return i
        i = cand
        step <<= 1
    return n


def append_run(out: list[Run], kind: SubclusterType, g: int, n: int, host: int) -> None:
    """Append a run, merging it with the previous one when the kind continues and so does the host offset
    (the PLAIN kinds have none; compressed runs never merge: each has its own entry)."""
    if out:
        pk, pg, pn, ph = out[-1]
        if pk == kind and pg + pn == g and kind != COMPRESSED \
                and (ph + pn == host or kind == UNALLOCATED_PLAIN or kind == ZERO_PLAIN):
            out[-1] = (pk, pg, pn + n, ph)
            return
    out.append((kind, g, n, host))


__all__ = ["BadEntry", "ClusterMap", "Run", "append_run"]
