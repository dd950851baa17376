"""The persistent dirty bitmaps of an open qcow2 image: writes tracked, the in-use flag, queries, edits, and
storing them back on close, crash-safe.

The model is qemu's (block/qcow2-bitmap.c), with two differences that keep memory and I/O bounded:

* Nothing is loaded on open but the directory. A bitmap is its on-disk table (read on first need) plus an
  *overlay*: one cluster of bits per bitmap-data cluster that writes touched this session, ORed onto what
  the table points to. Memory is the clusters written to, not the bitmap's size (qemu holds whole bitmaps:
  128 MiB for 64 TiB at 64 KiB granularity). Past ``OVERLAY_BUDGET`` the oldest overlay clusters are
  *spilled*: merged with their base and written to clusters of their own, which only this session's table
  references until the bitmaps are stored (a crash leaks them, as qemu's check -r then reclaims).
* The in-use flag is set on disk (and synced) before the first write is issued, not at open, and only on
  the entries with the ``auto`` flag: a disabled bitmap cannot go stale, so a backup tool's frozen bitmap
  survives a crash of the server. A read-write open that never writes leaves the image untouched.

Storing (on close) follows qemu's order: new data clusters, tables and directory are written and synced
with their refcounts before the header's extension points to the new directory; the old directory, tables
and data clusters are freed after. A table whose bitmap did not change is kept as it is, and clusters of a
changed bitmap that did not change are shared into its new table (their refcount raised, then dropped
again with the old table), so a store writes what changed, not whole bitmaps.

A bitmap found in use on open was not closed cleanly: it is inconsistent, is never tracked or offered,
and is kept on disk as it is until it is removed (qemu's rules).
"""

from __future__ import annotations

import asyncio
import struct
from array import array
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Protocol

from ...errors import (
    BitmapNotFoundError,
    ExistsError,
    InconsistentBitmapError,
    InvalidArgumentError,
    ReadOnlyError,
)
from ...hostio import HostFile
from . import layout as L
from .alloc import Refcounts
from .bitmaps import (
    BME_AUTO,
    BME_IN_USE,
    FLAGS_OFFSET,
    MAX_BITMAPS,
    MAX_DIRECTORY_SIZE,
    TABLE_ALL_ONES,
    TABLE_OFFSET_MASK,
    Bitmap,
    bit_runs,
    clear_tail,
    constraints_error,
    encode_directory,
    encode_extension,
    encode_table,
    entry_size,
    read_directory,
    read_table,
    set_bits,
    table_entries,
)
from .headio import read_header

# Bytes of overlay clusters held in memory for all bitmaps of an image before the oldest are spilled.
OVERLAY_BUDGET = 64 << 20
# Clusters of bitmap data kept after a read, for block-status scans that walk a bitmap in order.
READ_CACHE = 16

_ONES = b"\xff"


class TrackedBitmap:
    """One bitmap of an open image: its on-disk entry and what this session changed."""

    __slots__ = ("disk", "enabled", "gbits", "inconsistent", "modified", "name", "overlay", "owned", "size",
                 "table")

    def __init__(self, name: str, gbits: int, *, enabled: bool, disk: Bitmap | None, size: int,
                 inconsistent: bool = False) -> None:
        self.name = name
        self.gbits = gbits
        self.enabled = enabled
        self.inconsistent = inconsistent
        self.disk = disk  # the entry in the on-disk directory; None for a bitmap added this session
        self.size = size
        self.table: array[int] | None = None  # the base: loaded on first need
        self.owned: set[int] = set()  # clusters spilled this session (no on-disk table has them)
        self.overlay: dict[int, bytearray] = {}  # table index -> bits set this session
        self.modified = disk is None  # its content differs from what its on-disk table says

    @property
    def granularity(self) -> int:
        return 1 << self.gbits


class Host(Protocol):
    """What the bitmaps need of their image: the open driver, or a closed image edited in place."""

    hf: HostFile
    header: L.Header
    refs: Refcounts | None
    cs: int
    cbits: int
    read_only: bool
    v3: bool
    lock: asyncio.Lock
    bitmaps: list[Bitmap]


class ClosedImage:
    """A closed qcow2 image edited in place (resize): the Host of its bitmaps, with the offline refcount
    engine."""

    def __init__(self, hf: HostFile, h: L.Header, refs: Refcounts) -> None:
        self.hf = hf
        self.header = h
        self.refs: Refcounts | None = refs
        self.cs = h.cluster_size
        self.cbits = h.cluster_bits
        self.read_only = False
        self.v3 = h.version >= 3
        self.lock = asyncio.Lock()
        self.bitmaps: list[Bitmap] = []


class DirtyBitmaps:
    """The bitmaps of one open qcow2 image. Event-loop thread only, as the rest of its metadata."""

    def __init__(self, drv: Host, entries: list[Bitmap]) -> None:
        self.drv = drv
        self.cs = drv.cs
        self.shift = drv.cbits + 3  # bits of bitmap data per cluster, as a shift
        self.on_disk: list[Bitmap] = list(entries)  # the directory as the file has it
        self.bitmaps: list[TrackedBitmap] = [
            TrackedBitmap(e.name, e.granularity_bits, enabled=e.auto, disk=e, size=drv.header.size,
                          inconsistent=e.in_use) for e in entries]
        self.active: list[TrackedBitmap] = []
        self._refresh_active()
        self.structure_changed = False
        self.orphans: list[int] = []  # spilled clusters of bitmaps removed since: freed by the store
        self.marked = False  # this session set in-use flags on disk: a store must clear them
        self.need_in_use = any(e.auto and not e.in_use for e in entries)
        self.pending = self.need_in_use  # track() asks for prepare() while this is set
        self.budget = OVERLAY_BUDGET
        self.overlay_bytes = 0
        self._order: OrderedDict[tuple[int, int], TrackedBitmap] = OrderedDict()  # oldest overlay first
        self._prep = asyncio.Lock()
        self._cache: OrderedDict[int, bytes] = OrderedDict()

    # -- looking up ------------------------------------------------------------------------------------
    def _refresh_active(self) -> None:
        self.active = [b for b in self.bitmaps if b.enabled and not b.inconsistent]

    def find(self, name: str) -> TrackedBitmap | None:
        return next((b for b in self.bitmaps if b.name == name), None)

    def get(self, name: str) -> TrackedBitmap:
        bm = self.find(name)
        if bm is None:
            raise BitmapNotFoundError(f"Dirty bitmap '{name}' not found")
        return bm

    def usable(self, name: str, *, modify: bool = True) -> TrackedBitmap:
        """The bitmap ``name``, checked as qemu's bdrv_dirty_bitmap_check does before using it."""
        bm = self.get(name)
        if modify and self.drv.read_only:
            raise ReadOnlyError(f"Bitmap '{name}' is readonly and cannot be modified")
        if bm.inconsistent:
            raise InconsistentBitmapError(f"Bitmap '{name}' is inconsistent and cannot be used")
        return bm

    def names(self) -> list[str]:
        """The bitmaps that can be read: every consistent one, in directory order."""
        return [b.name for b in self.bitmaps if not b.inconsistent]

    # -- the hot path ----------------------------------------------------------------------------------
    def track(self, offset: int, length: int) -> bool:
        """Set the bits of ``[offset, offset+length)`` in every enabled bitmap, before the write goes out.

        Returns True when :meth:`prepare` must be awaited before the write is issued (the in-use flag is
        not on disk yet, or the overlays are over their budget).
        """
        if length <= 0 or not self.active:
            return self.pending
        end = offset + length
        shift = self.shift
        mask = (1 << shift) - 1
        for bm in self.active:
            g = bm.gbits
            first = offset >> g
            stop = ((end - 1) >> g) + 1
            ci = first >> shift
            if (stop - 1) >> shift == ci:
                buf = bm.overlay.get(ci)
                if buf is None:
                    buf = self._new_overlay(bm, ci)
                i = first & mask
                if stop - first == 1:
                    buf[i >> 3] |= 1 << (i & 7)
                else:
                    set_bits(buf, i, i + stop - first)
                continue
            self._set_range(bm, offset, end)  # across overlay chunks
        return self.pending

    def _new_overlay(self, bm: TrackedBitmap, ci: int) -> bytearray:
        buf = bytearray(self.cs)
        bm.overlay[ci] = buf
        bm.modified = True
        self._order[(id(bm), ci)] = bm
        self.overlay_bytes += self.cs
        if self.overlay_bytes > self.budget:
            self.pending = True
        return buf

    async def prepare(self) -> None:
        """What must reach the disk before a tracked write may: the in-use flag; and a spill when the
        overlays are over their budget."""
        async with self._prep:
            if self.need_in_use:
                await self._mark_in_use()
            if self.overlay_bytes > self.budget:
                async with self.drv.lock:
                    await self._spill(self.budget // 2)
            self.pending = self.need_in_use or self.overlay_bytes > self.budget

    async def _mark_in_use(self, *, every: bool = False) -> None:
        """Set the in-use flag of every ``auto`` entry (or ``every`` entry) of the on-disk directory, then
        sync.

        Each flags word is rewritten in place alone: four aligned bytes are never torn, so a crash half-way
        leaves some entries marked and the others untouched (and no write has been issued yet).
        """
        hf = self.drv.hf
        dir_off = self._directory()[1]
        marked = []
        for e in self.on_disk:
            if (e.auto or every) and not e.in_use:
                await hf.pwrite(dir_off + e.position + FLAGS_OFFSET, struct.pack(">I", e.flags | BME_IN_USE))
                marked.append(e.with_flags(e.flags | BME_IN_USE))
            else:
                marked.append(e)
        await hf.fdatasync()
        self.on_disk = marked
        by_name = {e.name: e for e in marked}
        for bm in self.bitmaps:
            if bm.disk is not None and bm.disk.name in by_name:
                bm.disk = by_name[bm.disk.name]
        self.need_in_use = False
        self.marked = True
        self.drv.bitmaps = list(marked)

    def _directory(self) -> tuple[int, int]:
        """(size, offset) of the on-disk directory (0, 0 without one)."""
        ext = self.drv.header.extension(L.EXT_BITMAPS)
        if not self.on_disk or ext is None:
            return 0, 0
        _nb, _r, size, off = struct.unpack_from(">IIQQ", ext, 0)
        return size, off

    # -- reading ---------------------------------------------------------------------------------------
    async def _table(self, bm: TrackedBitmap) -> array[int]:
        if bm.table is None:
            if bm.disk is not None:
                bm.table = await read_table(self.drv.hf, bm.disk, self.cs)
            else:
                bm.table = array("Q", bytes(8 * table_entries(bm.size, bm.gbits, self.cs)))
        return bm.table

    async def _base(self, bm: TrackedBitmap, ci: int) -> bytes | None:
        """The base of cluster ``ci``: its bytes, ``_ONES`` for an all-ones entry, None for zeroes."""
        table = await self._table(bm)
        if ci >= len(table):
            return None
        e = table[ci]
        off = e & TABLE_OFFSET_MASK
        if not off:
            return _ONES if e & TABLE_ALL_ONES else None
        got = self._cache.get(off)
        if got is not None:
            self._cache.move_to_end(off)
            return got
        data = await self.drv.hf.pread(off, self.cs)
        if len(data) < self.cs:
            data += bytes(self.cs - len(data))
        self._cache[off] = data
        if len(self._cache) > READ_CACHE:
            self._cache.popitem(last=False)
        return data

    async def _content(self, bm: TrackedBitmap, ci: int) -> bytes | None:
        """Cluster ``ci`` of the bitmap as it stands: base OR overlay (``_ONES``, bytes, or None)."""
        base = await self._base(bm, ci)
        over = bm.overlay.get(ci)
        if over is None or base is _ONES:
            return base
        if base is None:
            return bytes(over)
        return _or(base, over)

    async def runs(self, name: str, offset: int, length: int) -> AsyncIterator[tuple[int, int, bool]]:
        """``(start, end, dirty)`` byte runs of bitmap ``name`` over ``[offset, offset+length)``, in order,
        adjacent runs of one state merged. Refused for an inconsistent bitmap, as qemu refuses it."""
        bm = self.usable(name, modify=False)
        async for r in self._runs(bm, offset, length):
            yield r

    async def _runs(self, bm: TrackedBitmap, offset: int, length: int
                    ) -> AsyncIterator[tuple[int, int, bool]]:
        end = min(offset + length, bm.size)
        if end <= offset:
            return
        g = bm.gbits
        shift = self.shift
        bit = offset >> g
        stop = ((end - 1) >> g) + 1
        pending: list[int] | None = None  # start, end, dirty
        while bit < stop:
            ci = bit >> shift
            cstart = ci << shift
            cend = min(cstart + (1 << shift), stop)
            content = await self._content(bm, ci)
            if content is None:
                pieces = [(bit, cend, False)]
            elif content is _ONES:
                pieces = [(bit, cend, True)]
            else:
                pieces = [(s + cstart, e + cstart, v) for s, e, v in bit_runs(content, bit - cstart,
                                                                              cend - cstart)]
            for s, e, v in pieces:
                bs, be = max(offset, s << g), min(end, e << g)
                if pending is not None and pending[2] == v and pending[1] == bs:
                    pending[1] = be
                    continue
                if pending is not None:
                    yield pending[0], pending[1], bool(pending[2])
                pending = [bs, be, v]
            bit = cend
        if pending is not None:
            yield pending[0], pending[1], bool(pending[2])

    async def count(self, name: str) -> int:
        """Bytes marked dirty (qemu's ``count``), for tests and descriptions."""
        bm = self.get(name)
        return sum(e - s for s, e, d in [r async for r in self._runs(bm, 0, bm.size)] if d)

    # -- edits (qemu-img bitmap, convert --bitmaps, the admin socket) ------------------------------------
    def can_store(self, name: str, granularity: int) -> str | None:
        """Why a new persistent bitmap cannot be stored here (qcow2_co_can_store_new_dirty_bitmap)."""
        if not self.drv.v3:
            return "Cannot store dirty bitmaps in qcow2 v2 files"
        why = constraints_error(self.drv.header.size, self.cs, name, granularity)
        if why is not None:
            return why
        if len(self.bitmaps) + 1 > MAX_BITMAPS:
            return "Maximum number of persistent bitmaps is already reached"
        size = sum(entry_size(b.name.encode("utf-8", "surrogateescape")) for b in self.bitmaps)
        if size + entry_size(name.encode("utf-8", "surrogateescape")) > MAX_DIRECTORY_SIZE:
            return "Not enough space in the bitmap directory"
        return None

    def add(self, name: str, granularity: int, *, disabled: bool = False) -> TrackedBitmap:
        """Add an empty bitmap (checked by the caller with :meth:`can_store`); stored on close."""
        if self.find(name) is not None:
            raise ExistsError(f"Bitmap already exists: {name}")
        if self.drv.read_only:
            raise ReadOnlyError("No write access")
        bm = TrackedBitmap(name, granularity.bit_length() - 1, enabled=not disabled, disk=None,
                           size=self.drv.header.size)
        self.bitmaps.append(bm)
        self.structure_changed = True
        self._refresh_active()
        return bm

    def remove(self, name: str) -> None:
        bm = self.get(name)
        if self.drv.read_only:
            raise ReadOnlyError(f"Bitmap '{name}' is readonly and cannot be modified")
        self._drop_overlay(bm)
        self.orphans += bm.owned
        self.bitmaps.remove(bm)
        self.structure_changed = True
        self._refresh_active()

    def clear(self, name: str) -> None:
        bm = self.usable(name)
        self._drop_overlay(bm)
        bm.table = array("Q", bytes(8 * table_entries(bm.size, bm.gbits, self.cs)))
        bm.modified = True

    def enable(self, name: str, on: bool = True) -> None:
        bm = self.usable(name)
        if bm.enabled != on:
            bm.enabled = on
            self.structure_changed = True
            self._refresh_active()

    def resize(self, bm: TrackedBitmap, size: int) -> None:
        """The image is ``size`` bytes now: the table takes the new length when stored, and the last
        cluster is rewritten so that the bits past the new end are zero."""
        if size == bm.size:
            return
        shrink = size < bm.size
        bm.size = size
        bm.modified = True
        last = table_entries(size, bm.gbits, self.cs) - 1
        if shrink and last >= 0 and last not in bm.overlay:
            self._new_overlay(bm, last)

    def _drop_overlay(self, bm: TrackedBitmap) -> None:
        for ci in bm.overlay:
            self._order.pop((id(bm), ci), None)
        self.overlay_bytes -= len(bm.overlay) * self.cs
        bm.overlay.clear()

    async def merge(self, dst_name: str, src: DirtyBitmaps, src_name: str) -> None:
        """``dst |= src``, ``src`` a bitmap of this image or of another one of the same size."""
        dst = self.usable(dst_name)
        sbm = src.usable(src_name, modify=False)
        if sbm.size != dst.size:
            raise InvalidArgumentError(f"Bitmaps are of different sizes (destination size is {dst.size}, "
                                       f"source size is {sbm.size}) and can't be merged")
        if sbm is dst:
            return
        if sbm.gbits == dst.gbits and src.cs == self.cs:
            table = await src._table(sbm)
            for ci in sorted({i for i, e in enumerate(table) if e} | set(sbm.overlay)):
                content = await src._content(sbm, ci)
                if content is None:
                    continue
                buf = dst.overlay.get(ci)
                if buf is None:
                    buf = self._new_overlay(dst, ci)
                if content is _ONES:
                    buf[:] = b"\xff" * len(buf)
                    clear_tail(buf, _bits(dst) - (ci << self.shift))
                else:
                    buf[:] = _or(buf, content)
                await self._settle()
        else:
            async for start, end, dirty in src._runs(sbm, 0, sbm.size):
                if dirty:
                    self._set_range(dst, start, end)
                    await self._settle()
        dst.modified = True

    def _set_range(self, bm: TrackedBitmap, start: int, end: int) -> None:
        shift, g = self.shift, bm.gbits
        pos, stop = start >> g, ((end - 1) >> g) + 1
        while pos < stop:
            ci = pos >> shift
            cend = min((ci + 1) << shift, stop)
            buf = bm.overlay.get(ci)
            if buf is None:
                buf = self._new_overlay(bm, ci)
            set_bits(buf, pos - (ci << shift), cend - (ci << shift))
            pos = cend

    async def _settle(self) -> None:
        if self.overlay_bytes > self.budget:
            async with self.drv.lock:
                await self._spill(self.budget // 2)

    # -- spilling --------------------------------------------------------------------------------------
    async def _spill(self, target: int) -> None:
        """Write the oldest overlay clusters, merged with their base, to clusters of this session's own
        until the overlays hold at most ``target`` bytes. Nothing on disk references those clusters
        until the bitmaps are stored. Called under the driver's metadata lock."""
        refs = self.drv.refs
        assert refs is not None
        hf = self.drv.hf
        while self.overlay_bytes > target and self._order:
            (_id, ci), bm = self._order.popitem(last=False)
            over = bm.overlay.pop(ci, None)
            if over is None:
                continue
            self.overlay_bytes -= self.cs
            table = await self._table(bm)
            base = await self._base(bm, ci)
            data = bytearray(b"\xff" * self.cs) if base is _ONES else bytearray(
                _or(base, over) if base is not None else over)
            clear_tail(data, _bits(bm) - (ci << self.shift))
            host = table[ci] & TABLE_OFFSET_MASK
            if host not in bm.owned:
                host = await refs.allocate(1)
                bm.owned.add(host)
            await hf.pwrite(host, bytes(data))
            self._cache.pop(host, None)
            table[ci] = host

    # -- storing ---------------------------------------------------------------------------------------
    def changed(self) -> bool:
        return self.structure_changed or self.marked or any(b.modified for b in self.bitmaps)

    async def store(self) -> None:
        """Write the bitmaps back and clear the in-use flags (on close, under the metadata lock, after the
        image's own metadata was flushed)."""
        drv = self.drv
        if drv.read_only or not self.changed():
            return
        refs = drv.refs
        assert refs is not None
        hf = drv.hf
        cs = self.cs
        frees: list[tuple[int, int]] = [(c, 1) for c in self.orphans]
        entries: list[Bitmap] = []
        keep_tables: set[int] = set()
        for bm in self.bitmaps:
            if bm.inconsistent:
                assert bm.disk is not None
                entries.append(bm.disk)
                keep_tables.add(bm.disk.table_offset)
                continue
            flags = BME_AUTO if bm.enabled else 0
            if not bm.modified and bm.disk is not None:
                entries.append(Bitmap(bm.name, flags, bm.gbits, bm.disk.table_offset, bm.disk.table_size))
                keep_tables.add(bm.disk.table_offset)
                continue
            off, n, unused = await self._write_bitmap(bm)
            frees += [(c, 1) for c in unused]
            entries.append(Bitmap(bm.name, flags, bm.gbits, off, n))
        # the old tables that the new directory no longer has, with their data clusters
        for e in self.on_disk:
            if e.table_offset in keep_tables:
                continue
            old = await read_table(hf, e, cs)
            frees += [(x & TABLE_OFFSET_MASK, 1) for x in old if x & TABLE_OFFSET_MASK]
            frees.append((e.table_offset, -(-e.table_size * 8 // cs)))
        old_size, old_off = self._directory()
        new_off = new_size = 0
        if entries:
            raw = encode_directory(entries)
            new_size = len(raw)
            new_off = await refs.allocate(-(-new_size // cs))
            await hf.pwrite(new_off, raw)
        await refs.write_dirty()
        await hf.fdatasync()  # everything the new extension points to is on disk, refcounted
        h = drv.header
        h.refcount_table_offset, h.refcount_table_clusters = refs.reftable_offset, refs.reftable_clusters
        if entries:
            h.set_extension(L.EXT_BITMAPS, encode_extension(len(entries), new_size, new_off))
            h.autoclear_features |= L.AUTOCLEAR_BITMAPS
        else:
            h.set_extension(L.EXT_BITMAPS, None)
            h.autoclear_features &= ~L.AUTOCLEAR_BITMAPS
        raw_header = L.encode_header(h)
        await hf.pwrite(0, raw_header + bytes(cs - len(raw_header)))
        await hf.fdatasync()
        if old_size:
            frees.append((old_off, -(-old_size // cs)))
        # the old structures are unreachable now: their references may go
        zeroed = await refs.apply_pending_frees(frees)
        await refs.write_dirty()
        refs.free.extend(sorted(zeroed, reverse=True))
        await hf.fdatasync()
        # the session starts again from what is on disk now
        pos = 0
        self.on_disk = []
        for e in entries:
            self.on_disk.append(Bitmap(e.name, e.flags, e.granularity_bits, e.table_offset, e.table_size,
                                       pos))
            pos += entry_size(e.name.encode("utf-8", "surrogateescape"))
        by_name = {e.name: e for e in self.on_disk}
        for bm in self.bitmaps:
            bm.disk = by_name[bm.name]
            bm.table = None
            bm.owned = set()
            bm.modified = False
            self._drop_overlay(bm)
        self._order.clear()
        self._cache.clear()
        self.orphans = []
        self.structure_changed = False
        self.marked = False
        self.need_in_use = any(e.auto and not e.in_use for e in self.on_disk)
        self.pending = self.need_in_use
        drv.bitmaps = list(self.on_disk)

    async def _write_bitmap(self, bm: TrackedBitmap) -> tuple[int, int, list[int]]:
        """Write a changed bitmap's data and table to new clusters (or to clusters it owns already);
        returns (table offset, entries, owned clusters the new table does not use)."""
        refs = self.drv.refs
        assert refs is not None
        hf = self.drv.hf
        cs = self.cs
        n = table_entries(bm.size, bm.gbits, cs)
        # the base's entries are clusters of the on-disk table, or of this session's own (owned)
        base = await self._table(bm)
        table = array("Q", bytes(8 * n))
        used: set[int] = set()
        indices = sorted({i for i in range(min(n, len(base))) if base[i]} | {i for i in bm.overlay if i < n})
        tail = _bits(bm)
        for ci in indices:
            host = base[ci] & TABLE_OFFSET_MASK if ci < len(base) else 0
            over = bm.overlay.get(ci)
            if over is None and host and host in bm.owned:
                table[ci] = host
                used.add(host)
                continue
            if over is None and host and refs.max >= 2:
                # unchanged: the new table shares it; the old table's free brings its refcount back to 1
                await refs.change(host, 1)
                table[ci] = host
                continue
            content = await self._content(bm, ci)
            if content is None:
                continue
            data = bytearray(b"\xff" * cs) if content is _ONES else bytearray(content)
            clear_tail(data, tail - (ci << self.shift))
            if not any(data):
                continue
            if host and host in bm.owned:
                target = host
            else:
                target = await refs.allocate(1)
            used.add(target)
            await hf.pwrite(target, bytes(data))
            table[ci] = target
        raw = encode_table(table)
        off = await refs.allocate(-(-len(raw) // cs))
        await hf.pwrite(off, raw)
        return off, n, sorted(bm.owned - used)


def _bits(bm: TrackedBitmap) -> int:
    """Bits of bitmap data the image's size needs; the ones past it must stay zero on disk."""
    return -(-bm.size >> bm.gbits)


def _or(a: bytes | bytearray, b: bytes | bytearray) -> bytes:
    n = len(a)
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(n, "little")


# -- a resize of a closed image ---------------------------------------------------------------------------

async def before_resize(hf: HostFile) -> DirtyBitmaps | None:
    """Make a closed image's bitmaps ready for a resize, as qemu's does: refused while one is inconsistent
    (its size cannot be known); otherwise every one is marked in use and synced first, so that a crash
    before :func:`after_resize` stores them again leaves bitmaps QEMU calls inconsistent, not a table too
    small for the new size (which QEMU would refuse to open the image for)."""
    h = await read_header(hf)
    entries = await read_directory(hf, h)
    if not entries:
        return None
    for e in entries:
        if e.in_use:
            raise InconsistentBitmapError(f"Bitmap '{e.name}' is inconsistent and cannot be used")
    t = DirtyBitmaps(ClosedImage(hf, h, await Refcounts.offline(hf, h)), entries)
    await t._mark_in_use(every=True)
    return t


async def after_resize(t: DirtyBitmaps) -> None:
    """Store the bitmaps for the image's new size: tables of the new length, bits past the end cleared."""
    hf = t.drv.hf
    h = await read_header(hf)
    refs = await Refcounts.offline(hf, h)
    t.drv.header, t.drv.refs = h, refs
    t._cache.clear()
    for bm in t.bitmaps:
        t.resize(bm, h.size)
    await t.store()
    await refs.commit()


__all__ = ["OVERLAY_BUDGET", "ClosedImage", "DirtyBitmaps", "TrackedBitmap", "after_resize", "before_resize"]
