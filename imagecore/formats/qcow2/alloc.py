"""qcow2 refcounts and cluster allocation, plus the registry of in-flight allocating writes.

:class:`Refcounts` is the one refcount engine: the driver uses it for online writes, and the in-place edits
of a closed image (snapshots, resize, amend) open it with :meth:`Refcounts.offline`.

Order on disk (crash safety): increments reach the file before anything references the cluster; a new
refcount block is written before the refcount table points to it; a grown refcount table is written before
the header points to it. Decrements are deferred until the references that were dropped are on disk
(see :meth:`Refcounts.apply_pending_frees`), so a crash can only leak clusters.
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import Awaitable, Callable

from ...errors import CorruptImageError, ImageFormatError, InvalidArgumentError
from ...hostio import HostFile
from .cache import TableCache
from .layout import MAX_REFTABLE_BYTES, REFT_OFFSET_MASK, Header
from .tables import (
    Geometry,
    decode_table,
    encode_entry,
    encode_table,
    make_geometry,
    ones_refcount_block,
    refcount_get,
    refcount_max,
    refcount_set,
    unpack_refcounts,
)

# Written by the driver when an inconsistency is found: sets the corrupt bit and drops to read-only.
CorruptHook = Callable[[str], Awaitable[CorruptImageError]]

_HDR_REFTABLE = 48  # refcount_table_offset (u64) then refcount_table_clusters (u32)
_IOV_BATCH = 512  # buffers per pwritev, well under the kernel's IOV_MAX (1024)


class Refcounts:
    """The refcount table, a cache of refcount blocks and the allocator. Event-loop thread only."""

    def __init__(self, hf: HostFile, geo: Geometry, reftable_offset: int, reftable_clusters: int,
                 reftable: array[int], file_end: int, corrupt: CorruptHook, budget: int) -> None:
        self.hf = hf
        self.geo = geo
        self.cs = geo.cluster_size
        self.order = geo.refcount_order
        self.max = refcount_max(self.order)
        self.reftable_offset = reftable_offset
        self.reftable_clusters = reftable_clusters
        self.reftable = reftable
        self.cache: TableCache[bytearray] = TableCache(self.cs, budget)
        self.end = (file_end + self.cs - 1) & ~(self.cs - 1)
        self.pending_frees: list[tuple[int, int]] = []
        self.free: list[int] = []
        self._corrupt = corrupt

    @classmethod
    async def load(cls, hf: HostFile, geo: Geometry, reftable_offset: int, reftable_clusters: int,
                   corrupt: CorruptHook, budget: int, *, writable: bool = True) -> Refcounts:
        """The refcount table at ``reftable_offset``. Past the end of the file it reads as zeroes, as in
        qemu; an engine that will write refuses a table there, or over the header, instead of allocating
        over it."""
        cs = geo.cluster_size
        nbytes = reftable_clusters * cs
        if nbytes > MAX_REFTABLE_BYTES:
            raise ImageFormatError("Reference count table too large")
        size = hf.size()
        if writable and reftable_offset + nbytes > size + cs:
            raise ImageFormatError("Reference count table extends past the end of the file")
        if writable and reftable_offset < cs:
            raise ImageFormatError("Reference count table overlaps the image header")
        buf = bytearray(nbytes)
        await hf.readinto(reftable_offset, memoryview(buf))
        eng = cls(hf, geo, reftable_offset, reftable_clusters, decode_table(buf), size, corrupt, budget)
        if not hf.local:
            await eng._end_at_last_used()
        return eng

    async def _end_at_last_used(self) -> None:
        """Allocate after the last cluster in use rather than at the end of the file: over an NBD export,
        which never grows and may hold the image in its first part only, as qemu's allocator takes the
        free clusters from the start (the end of the file is then the end of the export)."""
        per = 1 << self.geo.refblock_bits
        for r in range(len(self.reftable) - 1, -1, -1):
            if not self.reftable[r] & REFT_OFFSET_MASK:
                continue
            values = await self._block_values(r)
            for k in range(per - 1, -1, -1):
                if values[k]:
                    self.end = min(self.end, (r * per + k + 1) * self.cs)
                    return

    @classmethod
    async def offline(cls, hf: HostFile, h: Header) -> Refcounts:
        """The engine for editing a closed image in place: an inconsistency found is an error, not a
        corrupt bit (the caller holds the image's write lock, and nothing else has it open)."""
        async def corrupt(message: str) -> CorruptImageError:
            return CorruptImageError(message)

        geo = make_geometry(h.cluster_bits, h.extended_l2, h.refcount_order)
        return await cls.load(hf, geo, h.refcount_table_offset, h.refcount_table_clusters, corrupt,
                              budget=1 << 62)

    # -- blocks ------------------------------------------------------------------------------------
    async def _load_block(self, boff: int) -> bytearray:
        blk = self.cache.get(boff)
        if blk is not None:
            return blk
        if boff % self.cs or boff >= self.end or boff == 0 \
                or self.reftable_offset <= boff < self.reftable_offset + self.reftable_clusters * self.cs:
            raise await self._corrupt(f"Refcount block offset {boff:#x} is invalid")
        blk = bytearray(self.cs)
        await self.hf.readinto(boff, memoryview(blk))
        got = self.cache.get(boff)
        if got is not None:  # loaded concurrently while we waited
            return got
        self.cache.put(boff, blk)
        return blk

    async def block_for(self, host: int) -> tuple[bytearray | None, int]:
        """(refcount block, index in it) for the cluster at ``host``; None when there is no block."""
        ri, bi = self.geo.refcount_position(host)
        if ri >= len(self.reftable):
            return None, bi
        boff = self.reftable[ri] & REFT_OFFSET_MASK
        if not boff:
            return None, bi
        return await self._load_block(boff), bi

    async def get(self, host: int) -> int:
        blk, bi = await self.block_for(host)
        return 0 if blk is None else refcount_get(blk, bi, self.order)

    async def _write_block(self, boff: int, blk: bytearray) -> None:
        await self.hf.pwrite(boff, bytes(blk))
        self.cache.mark_clean(boff)

    async def _ensure_block(self, host: int) -> tuple[bytearray, int, int]:
        """(block, index, block offset) for ``host``, creating the block (and growing the table) if needed."""
        ri, bi = self.geo.refcount_position(host)
        if ri >= len(self.reftable):
            await self._grow_reftable(ri + 1)
        boff = self.reftable[ri] & REFT_OFFSET_MASK
        if boff:
            return await self._load_block(boff), bi, boff
        nb = self._take_end(1)
        blk = bytearray(self.cs)
        nri, nbi = self.geo.refcount_position(nb)
        if nri == ri:
            refcount_set(blk, nbi, self.order, 1)
        else:
            oblk, obi, ooff = await self._ensure_block(nb)
            refcount_set(oblk, obi, self.order, refcount_get(oblk, obi, self.order) + 1)
            await self._write_block(ooff, oblk)
        await self.hf.pwrite(nb, bytes(blk))
        await self.hf.fdatasync()
        if self.reftable[ri] & REFT_OFFSET_MASK:
            raise await self._corrupt("Refcount table changed while a block was being added")
        await self.hf.pwrite(self.reftable_offset + 8 * ri, encode_entry(nb))
        self.reftable[ri] = nb
        self.cache.put(nb, blk)
        return blk, bi, nb

    async def _grow_reftable(self, min_entries: int) -> None:
        cs = self.cs
        old_entries = len(self.reftable)
        entries = max(min_entries, old_entries + old_entries // 2, cs // 8)
        start = self._aligned_end()
        while True:
            tclusters = -(-entries * 8 // cs)
            nb = 0
            while True:
                area_end = start + (tclusters + nb) * cs
                first = self.geo.refcount_position(start)[0]
                last = self.geo.refcount_position(area_end - 1)[0]
                missing = [r for r in range(first, last + 1)
                           if r >= old_entries or not self.reftable[r] & REFT_OFFSET_MASK]
                if len(missing) == nb:
                    break
                nb = len(missing)
            if last < entries:
                break
            entries = last + 1
        if tclusters * cs > MAX_REFTABLE_BYTES:
            raise ImageFormatError("Reference count table would grow too large")
        new_table = array("Q", self.reftable)
        new_table.extend([0] * (tclusters * cs // 8 - old_entries))
        blocks: dict[int, bytearray] = {}
        boffs: dict[int, int] = {}
        for i, r in enumerate(missing):
            boffs[r] = start + (tclusters + i) * cs
            blocks[r] = bytearray(cs)
            new_table[r] = boffs[r]
        touched: dict[int, bytearray] = {}
        for c in range(start, area_end, cs):
            r, bi = self.geo.refcount_position(c)
            if r in blocks:
                blk = blocks[r]
            else:
                boff = self.reftable[r] & REFT_OFFSET_MASK
                got = touched.get(boff)
                blk = got if got is not None else await self._load_block(boff)
                touched[boff] = blk
            refcount_set(blk, bi, self.order, refcount_get(blk, bi, self.order) + 1)
        self.end = area_end
        for r, blk in blocks.items():
            await self.hf.pwrite(boffs[r], bytes(blk))
        for boff, blk in touched.items():
            await self._write_block(boff, blk)
        await self.hf.pwrite(start, encode_table(new_table))
        await self.hf.fdatasync()
        await self.hf.pwrite(_HDR_REFTABLE, start.to_bytes(8, "big") + tclusters.to_bytes(4, "big"))
        await self.hf.fdatasync()
        old_off, old_clusters = self.reftable_offset, self.reftable_clusters
        self.reftable_offset, self.reftable_clusters, self.reftable = start, tclusters, new_table
        for r, blk in blocks.items():
            self.cache.put(boffs[r], blk)
        self.defer_free(old_off, old_clusters)

    # -- allocation --------------------------------------------------------------------------------
    def _aligned_end(self) -> int:
        return self.end

    def _take_end(self, n: int) -> int:
        off = self.end
        self.end += n * self.cs
        return off

    async def allocate(self, n: int) -> int:
        """Allocate ``n`` contiguous clusters with refcount 1 (in the cache; see :meth:`write_dirty`)."""
        while n == 1 and self.free:
            off = self.free.pop()
            if await self.get(off) == 0:
                await self.change(off, 1)
                return off
        while True:
            off = self._take_end(n)
            if await self._claim_in_block(off, n):
                return off
            # a file shorter than its refcounted clusters must not hand those out again
            busy = [i for i in range(n) if await self.get(off + i * self.cs) != 0]
            if not busy:
                break
            self.end = off + (busy[-1] + 1) * self.cs
        for i in range(n):
            await self.change(off + i * self.cs, 1)
        return off

    async def _claim_in_block(self, off: int, n: int) -> bool:
        """Set the refcounts of the ``n`` clusters at ``off`` to 1 in one go, when they are all counted by
        one existing refcount block of byte-wide entries and all free there (the common case of an
        allocation at the end of the file); False, with nothing changed, otherwise."""
        ri, bi = self.geo.refcount_position(off)
        if self.order < 3 or bi + n > 1 << self.geo.refblock_bits or ri >= len(self.reftable):
            return False
        boff = self.reftable[ri] & REFT_OFFSET_MASK
        if not boff:
            return False
        blk = await self._load_block(boff)
        w = 1 << (self.order - 3)
        if any(memoryview(blk)[w * bi:w * (bi + n)]):
            return False
        blk[w * bi:w * (bi + n)] = (1).to_bytes(w, "big") * n
        self.cache.mark_dirty(boff, blk)
        return True

    async def allocate_area(self, n: int) -> int:
        """Allocate ``n`` contiguous clusters at the end of the file with refcount 1, together with the
        refcount blocks that count them, placed right after them (qemu's qcow2_refcount_area): the way for
        a large allocation, where :meth:`allocate` would add, write and sync one block at a time.

        The new blocks are written and synced before the refcount table points to them (a table too small
        grows first); the existing blocks that change stay dirty in the cache, for :meth:`write_dirty` or
        :meth:`commit` to write before anything references the clusters.
        """
        cs, geo = self.cs, self.geo
        per = 1 << geo.refblock_bits
        while True:
            start = self.end
            nb = 0
            while True:  # the blocks are in the area they count: a fixed point
                area_end = start + (n + nb) * cs
                first = geo.refcount_position(start)[0]
                last = geo.refcount_position(area_end - 1)[0]
                missing = [r for r in range(first, last + 1)
                           if r >= len(self.reftable) or not self.reftable[r] & REFT_OFFSET_MASK]
                if len(missing) == nb:
                    break
                nb = len(missing)
            if last >= len(self.reftable):
                await self._grow_reftable(last + 1)  # it takes the end of the file: look again after it
                continue
            # a file shorter than its refcounted clusters must not hand those out again
            busy = 0
            for r in range(first, last + 1):
                if r >= len(self.reftable) or not self.reftable[r] & REFT_OFFSET_MASK:
                    continue
                values = await self._block_values(r)
                lo = max(start // cs - r * per, 0)
                hi = min((area_end - 1) // cs - r * per, per - 1)
                used = [k for k in range(lo, hi + 1) if values[k]]
                if used:
                    busy = (r * per + used[-1] + 1) * cs
            if not busy:
                break
            self.end = busy
        new_blocks: dict[int, bytearray] = {}
        absent = set(missing)
        for r in range(first, last + 1):
            lo = max(start // cs, r * per)
            hi = min(area_end // cs, (r + 1) * per)
            if r in absent and lo == r * per and hi - lo == per:
                new_blocks[r] = bytearray(ones_refcount_block(per, self.order, cs))
                continue
            if r in absent:
                blk = new_blocks[r] = bytearray(cs)
            else:
                boff = self.reftable[r] & REFT_OFFSET_MASK
                blk = await self._load_block(boff)
                self.cache.mark_dirty(boff, blk)
            for c in range(lo - r * per, hi - r * per):
                refcount_set(blk, c, self.order, 1)
        self.end = area_end
        block_at = {r: start + (n + k) * cs for k, r in enumerate(missing)}
        if missing:
            for k in range(0, len(missing), _IOV_BATCH):
                batch = missing[k:k + _IOV_BATCH]
                await self.hf.pwritev(block_at[batch[0]], [new_blocks[r] for r in batch])
            await self.hf.fdatasync()
            for r in missing:
                self.reftable[r] = block_at[r]
            # the table entries of the new blocks are consecutive: one write
            await self.hf.pwrite(self.reftable_offset + 8 * missing[0],
                                 encode_table(self.reftable[missing[0]:missing[-1] + 1]))
        return start

    async def change(self, host: int, delta: int) -> int:
        """Add ``delta`` to a cluster's refcount (in the cache); returns the new value."""
        blk, bi, boff = await self._ensure_block(host)
        old = refcount_get(blk, bi, self.order)
        new = old + delta
        if new < 0:
            raise await self._corrupt(f"Refcount of cluster {host // self.cs} would drop below zero")
        if new > self.max:
            # qemu answers EINVAL here, e.g. a snapshot of an image with refcount_bits=1
            raise InvalidArgumentError(f"Refcount of cluster {host // self.cs} would exceed {self.max} "
                                       f"(refcount_bits={1 << self.order})")
        refcount_set(blk, bi, self.order, new)
        self.cache.mark_dirty(boff, blk)
        return new

    async def change_bytes(self, offset: int, length: int, delta: int) -> None:
        """Add ``delta`` to the refcount of every cluster the byte range touches (compressed data)."""
        for c in range(offset // self.cs, (offset + length - 1) // self.cs + 1):
            await self.change(c * self.cs, delta)

    def defer_free(self, host: int, nclusters: int) -> None:
        """Drop a reference once the metadata that held it is on disk (at the next flush)."""
        if nclusters > 0:
            self.pending_frees.append((host, nclusters))

    async def apply_pending_frees(self, frees: list[tuple[int, int]]) -> list[int]:
        """Apply deferred decrements; returns the clusters whose refcount reached zero."""
        zeroed: list[int] = []
        for host, n in frees:
            for i in range(n):
                c = host + i * self.cs
                if await self.change(c, -1) == 0:
                    zeroed.append(c)
        return zeroed

    async def write_dirty(self) -> bool:
        """Write every dirty refcount block; True when something was written."""
        items = self.cache.dirty_items()
        for boff, blk in items:
            await self._write_block(boff, blk)
        self.cache.shrink()
        return bool(items)


    async def commit(self) -> None:
        """Offline edits: apply deferred frees, write every dirty block and sync (the decrements of a
        replaced refcount table are only deferred until the header points to its successor)."""
        frees, self.pending_frees = self.pending_frees, []
        await self.apply_pending_frees(frees)
        await self.write_dirty()
        await self.hf.fdatasync()

    async def _block_values(self, index: int) -> list[int]:
        off = self.reftable[index] & REFT_OFFSET_MASK
        return list(unpack_refcounts(bytes(await self._load_block(off)), self.order))

    async def drop_empty_blocks(self) -> None:
        """Free the refcount blocks that count nothing but themselves (qemu's qcow2_shrink_reftable).

        Each table entry is cleared and synced before the block's own refcount is dropped, so a crash
        leaks the block at worst.
        """
        gone: list[int] = []
        cleared = False
        per = self.geo.refblock_bits
        for index, entry in enumerate(self.reftable):
            off = entry & REFT_OFFSET_MASK
            if not off:
                continue
            own = off // self.cs
            inside = own >> per == index
            values = await self._block_values(index)
            if any(v for k, v in enumerate(values) if not (inside and k == own % (1 << per))):
                continue
            self.reftable[index] = 0
            await self.hf.pwrite(self.reftable_offset + index * 8, bytes(8))
            self.cache.drop(off)
            cleared = True
            if not inside:
                gone.append(off)
        if cleared:
            await self.hf.fdatasync()
        for off in gone:
            blk, _bi = await self.block_for(off)
            if blk is not None:
                await self.change(off, -1)
        await self.commit()

    async def last_used(self) -> int:
        """The host offset just past the last cluster with a nonzero refcount (0 for none)."""
        per = 1 << self.geo.refblock_bits
        for index in range(len(self.reftable) - 1, -1, -1):
            if not self.reftable[index] & REFT_OFFSET_MASK:
                continue
            values = await self._block_values(index)
            for k in range(len(values) - 1, -1, -1):
                if values[k]:
                    return (index * per + k + 1) * self.cs
        return 0

    # -- a rebuilt refcount structure (check -r all) ------------------------------------------------
    async def put_block(self, boff: int, raw: bytes) -> None:
        """Write a whole refcount block, encoded by the caller (a block of a new structure, which no
        table entry on disk names yet), and keep it cached."""
        await self.hf.pwrite(boff, raw)
        self.cache.put(boff, bytearray(raw))

    async def adopt_table(self, offset: int, table: array[int]) -> None:
        """Switch to a refcount table built elsewhere: its blocks were written with :meth:`put_block`;
        the table is written and synced before the header points to it, so a crash leaves the old
        structure in place (and the new one leaked)."""
        await self.hf.pwrite(offset, encode_table(table))
        await self.hf.fdatasync()
        clusters = -(-len(table) * 8 // self.cs)
        await self.hf.pwrite(_HDR_REFTABLE, offset.to_bytes(8, "big") + clusters.to_bytes(4, "big"))
        await self.hf.fdatasync()
        self.reftable_offset, self.reftable_clusters, self.reftable = offset, clusters, table
        if self.hf.local:
            self.end = max(self.end, (self.hf.size() + self.cs - 1) & ~(self.cs - 1))


class InFlight:
    """Guest cluster ranges being modified; an overlapping modifier waits, then looks again."""

    def __init__(self) -> None:
        self._ranges: dict[int, tuple[int, int, asyncio.Event]] = {}
        self._next = 0

    def overlapping(self, start: int, end: int) -> asyncio.Event | None:
        for s, e, ev in self._ranges.values():
            if s < end and start < e:
                return ev
        return None

    def add(self, start: int, end: int) -> int:
        self._next += 1
        self._ranges[self._next] = (start, end, asyncio.Event())
        return self._next

    def remove(self, token: int) -> None:
        item = self._ranges.pop(token, None)
        if item is not None:
            item[2].set()

    def __len__(self) -> int:
        return len(self._ranges)
