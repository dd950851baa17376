"""qcow2 write planning, with no I/O: where a guest write goes (in place, or new clusters with their
copy-on-write head and tail), and which L2 entries zeroing and discard write.

A :class:`WritePlan` is qemu's QCowL2Meta for one L2 table's part of a write. The driver builds it under its
metadata lock (asking :func:`placement` about each cluster, and the refcount engine where the COPIED flag
is missing), allocates the new clusters it asks for, writes the guest data (:meth:`WritePlan.host_writes`)
and only then links the new clusters into the table (:meth:`WritePlan.link`), dropping the old entries'
references at the next flush. That order is what makes a crash leak clusters at worst.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from enum import Enum

from .layout import L2E_COPIED, L2E_ZERO, SC_ALLOC_MASK, SC_ZERO_SHIFT
from .mapping import BadEntry, ClusterMap
from .tables import ClusterType, classify, classify_extended, referenced_clusters

HostWrite = tuple[int, list[memoryview | bytes]]


class Placement(Enum):
    """Where a write to one guest cluster goes (qemu's handle_copied and handle_alloc)."""

    IN_PLACE = 0  # a data cluster with refcount 1 (COPIED): overwritten where it is
    VERIFY = 1  # a data cluster without COPIED: in place if its refcount proves to be 1, else NEW
    NEW = 2  # anything else: written to a new cluster, linked once the data is on disk


def placement(m: ClusterMap, entry: int, bitmap: int = 0) -> tuple[Placement, int]:
    """(placement, host cluster) of a write to the cluster ``entry`` maps (``bitmap``: its subclusters).

    A cluster with unallocated or zero subclusters is rewritten whole into a new, fully allocated one.
    With an external data file a cluster without COPIED has no refcount to ask: it gets a new entry (at
    its guest offset, where data file clusters live). Raises BadEntry for an unaligned data cluster.
    """
    if m.extended:
        kind, host = classify_extended(entry, bitmap, m.data_file)
    else:
        kind, host = classify(entry, m.v3, m.data_file)
    if kind != ClusterType.NORMAL:
        return Placement.NEW, 0
    if host & ((1 << m.cluster_bits) - 1):
        raise BadEntry(f"L2 entry {entry:#x} points to an unaligned cluster")
    if m.extended and bitmap & SC_ALLOC_MASK != SC_ALLOC_MASK:
        return Placement.NEW, host
    if entry & L2E_COPIED:
        return Placement.IN_PLACE, host
    if m.data_file:
        return Placement.NEW, host
    return Placement.VERIFY, host


@dataclass(slots=True)
class NewCluster:
    """A guest cluster that the write moves to a new host cluster."""

    guest: int  # guest offset of the cluster
    old: int  # the L2 entry it replaces; its references drop once the new entry is on disk
    head: int  # bytes before the written part, copied from the old content (qemu's cow_start)
    tail: int  # bytes after the written part, copied likewise (cow_end)
    host: int = 0  # the new host cluster, once allocated


@dataclass(slots=True)
class WritePlan:
    """The guest bytes ``[offset, end)`` (within one L2 table) and where each of their clusters goes."""

    offset: int
    end: int
    cluster_bits: int
    in_place: list[tuple[int, int]] = field(default_factory=list)  # (guest cluster, host cluster)
    new: list[NewCluster] = field(default_factory=list)

    def clusters(self) -> range:
        """Guest offsets of the clusters the write touches."""
        cs = 1 << self.cluster_bits
        return range(self.offset & ~(cs - 1), (self.end + cs - 1) & ~(cs - 1), cs)

    def add_new(self, guest: int, old: int) -> None:
        cs = 1 << self.cluster_bits
        self.new.append(NewCluster(guest, old, max(self.offset - guest, 0), max(guest + cs - self.end, 0)))

    def add_new_span(self, guest: int, count: int) -> None:
        """:meth:`add_new` for ``count`` consecutive clusters from ``guest`` on whose entries are 0
        (unallocated), in one step: only the write's first and last clusters can be partly written."""
        cs = 1 << self.cluster_bits
        span = [NewCluster(g, 0, 0, 0) for g in range(guest, guest + count * cs, cs)]
        span[0].head = max(self.offset - guest, 0)
        span[-1].tail = max(span[-1].guest + cs - self.end, 0)
        self.new += span

    def allocation_runs(self) -> list[list[NewCluster]]:
        """The new clusters in runs of consecutive guest clusters: one contiguous allocation each."""
        cs = 1 << self.cluster_bits
        new = self.new
        if new and new[-1].guest - new[0].guest == (len(new) - 1) * cs:
            return [new]  # one run (the common case), seen without a step per cluster
        runs: list[list[NewCluster]] = []
        for c in new:
            if runs and runs[-1][-1].guest + cs == c.guest:
                runs[-1].append(c)
            else:
                runs.append([c])
        return runs

    def copy_on_write(self) -> list[NewCluster]:
        """The new clusters the write covers only in part: their old content is needed (only the write's
        first and last clusters can be such)."""
        new = self.new
        if not new:
            return []
        ends = new[:1] if len(new) == 1 else [new[0], new[-1]]
        return [c for c in ends if c.head or c.tail]

    def host_writes(self, data: memoryview, old: dict[int, bytearray]) -> list[HostWrite]:
        """The host writes that carry ``data`` (the guest bytes ``[offset, end)``), contiguous ones joined:
        in-place clusters get their part; a new cluster gets its part, or, when ``old`` has its old
        content (whole), that content with the part laid over it."""
        cs = 1 << self.cluster_bits
        offset, end = self.offset, self.end
        writes = HostWrites()
        for gc, host in self.in_place:
            lo, hi = max(gc, offset), min(gc + cs, end)
            writes.add_data(host + (lo - gc), data, lo - offset, hi - offset)
        new = self.new
        i, n = 0, len(new)
        if n and not old and new[-1].guest - new[0].guest == (n - 1) * cs \
                and new[-1].host - new[0].host == (n - 1) * cs:
            i = n  # one run of whole clusters, contiguous on the host: one slice of the data
            gc = new[0].guest
            lo, hi = max(gc, offset), min(new[-1].guest + cs, end)
            writes.add_data(new[0].host + (lo - gc), data, lo - offset, hi - offset)
        while i < n:
            c = new[i]
            gc = c.guest
            buf = old.get(gc) if old else None
            if buf is not None:
                lo, hi = max(gc, offset), min(gc + cs, end)
                buf[lo - gc:hi - gc] = data[lo - offset:hi - offset]
                writes.add(c.host, memoryview(buf))
                i += 1
                continue
            # the clusters after it that continue it in the guest and on the host, without old content
            # to lay the data over, take one slice of the data together
            j = i + 1
            while j < n and new[j].guest == gc + (j - i) * cs and new[j].host == c.host + (j - i) * cs \
                    and not (old and new[j].guest in old):
                j += 1
            lo, hi = max(gc, offset), min(gc + (j - i) * cs, end)
            writes.add_data(c.host + (lo - gc), data, lo - offset, hi - offset)
            i = j
        return writes

    def link(self, m: ClusterMap, l2: array[int]) -> list[int]:
        """Point the L2 table at the new clusters (every subcluster allocated); returns the old entries
        that held references, which the caller drops once the table is on disk."""
        mask = (1 << m.l2_bits) - 1
        w = 2 if m.extended else 1
        cbits = m.cluster_bits
        new = self.new
        cs = 1 << cbits
        n = len(new)
        if w == 1 and n > 1 and new[-1].guest - new[0].guest == (n - 1) * cs \
                and new[-1].host - new[0].host == (n - 1) * cs:
            # one run, contiguous on the host: its entries in one slice assignment
            idx = (new[0].guest >> cbits) & mask
            first = new[0].host | L2E_COPIED
            l2[idx:idx + n] = array("Q", range(first, first + n * cs, cs))
            new = []
        for c in new:
            idx = ((c.guest >> cbits) & mask) * w
            l2[idx] = c.host | L2E_COPIED
            if w == 2:
                l2[idx + 1] = SC_ALLOC_MASK
        return [c.old for c in self.new if c.old and referenced_clusters(c.old, cbits)[1]]


class HostWrites(list[HostWrite]):
    """Host writes in the order queued, a write that continues the previous one joined to it (and a slice
    of the guest data that continues the previous slice of it grown into one buffer, so that a run of
    clusters written whole is one buffer, not one per cluster)."""

    end = -1  # where the last write ends: joining costs O(1), not a sum over its buffers
    _data: memoryview | None = None  # the guest data the last buffer is a slice of, and where it ends
    _data_lo = _data_hi = 0

    def add(self, host: int, buf: memoryview | bytes) -> None:
        if self and host == self.end:
            self[-1][1].append(buf)
        else:
            self.append((host, [buf]))
        self.end = host + len(buf)
        self._data = None

    def add_data(self, host: int, data: memoryview, lo: int, hi: int) -> None:
        """Add ``data[lo:hi]`` (a byte view) at ``host``."""
        if self._data is data and self._data_hi == lo and host == self.end:
            self[-1][1][-1] = data[self._data_lo:hi]
            self.end = host + (hi - lo)
            self._data_hi = hi
            return
        self.add(host, data[lo:hi])
        self._data, self._data_lo, self._data_hi = data, lo, hi


# -- zeroes and discard -------------------------------------------------------------------------------

@dataclass(slots=True)
class ZeroPlan:
    """The L2 entries that make whole clusters read as zeroes (or as the backing file, for a discard)."""

    changes: list[tuple[int, int, int]] = field(default_factory=list)  # (word index, entry, bitmap)
    frees: list[int] = field(default_factory=list)  # replaced entries holding references (dropped later)

    def apply(self, m: ClusterMap, l2: array[int]) -> None:
        for idx, entry, bitmap in self.changes:
            l2[idx] = entry
            if m.extended:
                l2[idx + 1] = bitmap


def plan_zeroes(m: ClusterMap, l2: array[int], start: int, end: int, *, may_trim: bool, discard: bool,
                backing: bool, full: bool = False) -> ZeroPlan:
    """Entries for the whole clusters ``[start, end)`` of one L2 table (qemu's zero_in_l2_slice and
    discard_in_l2_slice), for v3 images and unbacked v2 ones.

    With standard entries: a data cluster with refcount 1 keeps its host cluster under the zero flag
    when ``may_trim`` is false (a later write reuses it); otherwise the zero flag alone, where something
    would show through (a backing file) or was allocated; otherwise nothing. With extended entries every
    subcluster turns zero, except that a discard leaves a cluster that is neither allocated nor over a
    backing file alone; the host cluster goes. A ``full`` discard (what a commit asks for, through
    bdrv_make_empty) makes every cluster unallocated, so that the backing file shows through.
    """
    cs = 1 << m.cluster_bits
    mask = (1 << m.l2_bits) - 1
    plan = ZeroPlan()
    if m.extended:
        bitmap = 0 if discard and full else SC_ALLOC_MASK << SC_ZERO_SHIFT
        for gc in range(start, end, cs):
            idx = ((gc >> m.cluster_bits) & mask) * 2
            e = l2[idx]
            if discard and not full and not backing and not referenced_clusters(e, m.cluster_bits)[1]:
                continue  # nothing shows through and nothing is allocated: qemu leaves it as it is
            if e == 0 and l2[idx + 1] == bitmap:
                continue
            plan.changes.append((idx, 0, bitmap))
            if referenced_clusters(e, m.cluster_bits)[1]:
                plan.frees.append(e)
        return plan
    # a discard too leaves an allocated cluster reading as zeroes (qemu's discard_in_l2_slice, v3)
    needs_zero_flag = not full and m.v3
    for gc in range(start, end, cs):
        idx = (gc >> m.cluster_bits) & mask
        e = l2[idx]
        kind, host = classify(e, m.v3, m.data_file)
        keep = not may_trim and m.v3 and bool(e & L2E_COPIED) \
            and kind in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC)
        if keep:
            new = host | L2E_COPIED | L2E_ZERO
        elif needs_zero_flag and (backing or kind != ClusterType.UNALLOCATED):
            new = L2E_ZERO
        else:
            new = 0
        if new == e:
            continue
        plan.changes.append((idx, new, 0))
        if not keep and referenced_clusters(e, m.cluster_bits)[1]:
            plan.frees.append(e)
    return plan


__all__ = ["HostWrite", "HostWrites", "NewCluster", "Placement", "WritePlan", "ZeroPlan", "placement",
           "plan_zeroes"]
