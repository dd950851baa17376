"""Resizing a closed qcow2 image in place: growing within the L1 table's spare room or with a larger L1
table, and shrinking.

The L1 table occupies whole clusters, so it usually has unused entries past ``l1_size`` (with 64 KiB
clusters one L1 cluster maps 4 TiB). Growing into them needs no allocation and no refcount change: the
new entries are zeroed and flushed first, then the header's ``size`` and ``l1_size`` are written together
in one sector-sized write and flushed. A crash between the two steps leaves the old, consistent image.

When the table must grow (qemu's ``qcow2_grow_l1_table``), a new one is written at the end of the file,
with the refcount blocks (and, when the refcount table is full, a new refcount table) that count it.
Everything new is written and synced before the header points to it; the old L1 table (and refcount
table) is freed only after the header switch is synced. A crash at any point leaves either the old or
the new image, with at worst a few leaked clusters (``check -r leaks`` reclaims them).

A shrink is qemu's: the clusters past the new end are unmapped (L2 entries, and L1 entries of L2 tables
wholly past it, zeroed and synced), then their refcounts are dropped and synced, then the header gets the
new size, and the file loses its tail past the last cluster still in use. ``l1_size`` stays, as in qemu.
An L2 table shared with a snapshot is copied first (to a cluster counted before anything points to
it). A crash leaves the old size with the tail reading zeroes, or leaked clusters, never a cluster in
use with refcount 0.
"""

from __future__ import annotations

import struct

from ...errors import ImageFormatError, InvalidArgumentError, UnsupportedError
from ...hostio import HostFile
from . import layout as L
from .headio import read_header
from .tables import classify, classify_extended, pack_refcounts, referenced_clusters, unpack_refcounts

# size (u64), crypt_method (u32), l1_size (u32): the contiguous header fields at offset 24
_SIZE_TO_L1 = struct.Struct(">QII")
# ... followed by l1_table_offset (u64), refcount_table_offset (u64), refcount_table_clusters (u32)
_SIZE_TO_REFTABLE = struct.Struct(">QIIQQI")
_SIZE_OFFSET = 24


async def resize(hf: HostFile, size: int, prealloc: str = "off") -> int:
    """Set the virtual size of the qcow2 image in ``hf`` to ``size``; returns the old one.

    ``prealloc`` (metadata, falloc, full: qemu's modes) allocates the clusters of the new part.
    """
    h = await read_header(hf)
    if h.incompatible_features & L.INCOMPAT_CORRUPT:
        raise ImageFormatError("qcow2 image is marked corrupt; repair it with check -r all first")
    if h.incompatible_features & L.INCOMPAT_DIRTY:
        raise ImageFormatError("qcow2 image was not closed cleanly; repair it with check -r all first")
    old = h.size
    if size % 512:
        raise InvalidArgumentError("The new size must be a multiple of 512")
    # qemu 7.2 resizes v3 images with internal snapshots (each snapshot records its own size); v2 only
    # lacks the field for it
    if h.nb_snapshots and h.version < 3:
        raise UnsupportedError("Can't resize a v2 image which has snapshots")
    if h.data_file is not None:
        raise UnsupportedError("resizing qcow2 images with an external data file is not supported yet")
    if size == old:
        return old
    if size < old:
        await _shrink(hf, h, size)
        return old
    cs = h.cluster_size
    need = -(-size // (cs * h.l2_entries))
    if need * 8 > L.MAX_L1_BYTES or size > L.MAX_VIRTUAL_SIZE:
        raise InvalidArgumentError("Failed to grow the L1 table: File too large")
    capacity = (-(-h.l1_size * 8 // cs) * cs) // 8 if h.l1_size else 0
    if prealloc != "off" and h.backing_file:
        raise UnsupportedError("preallocation when growing a qcow2 image with a backing file is not "
                               "supported yet")
    if prealloc != "off" and h.nb_snapshots:
        # the last L2 table may be shared with a snapshot, and would have to be copied before it is changed
        raise UnsupportedError("preallocation when growing a qcow2 image with internal snapshots is not "
                               "supported yet")
    if need > capacity or prealloc != "off":
        await _grow(hf, h, size, need, prealloc)
        return old
    if need > h.l1_size:
        await hf.pwrite(h.l1_table_offset + h.l1_size * 8, bytes((need - h.l1_size) * 8))
        await hf.fdatasync()
    await hf.pwrite(_SIZE_OFFSET, _SIZE_TO_L1.pack(size, h.crypt_method, max(need, h.l1_size)))
    await hf.fdatasync()
    return old


class _Refcounts:
    """The image's refcount table and the refcount blocks this resize reads and changes."""

    def __init__(self, hf: HostFile, h: L.Header, table: list[int]) -> None:
        self.hf, self.h = hf, h
        self.cs = h.cluster_size
        self.order = h.refcount_order
        self.per_block = self.cs * 8 >> self.order
        self.top = (1 << h.refcount_bits) - 1
        self.table = table
        self.blocks: dict[int, list[int]] = {}

    def covered(self, index: int) -> bool:
        return index < len(self.table) and bool(self.table[index] & L.REFT_OFFSET_MASK)

    async def block(self, index: int) -> list[int]:
        blk = self.blocks.get(index)
        if blk is None:
            off = self.table[index] & L.REFT_OFFSET_MASK if self.covered(index) else 0
            if off:
                blk = list(unpack_refcounts(await self.hf.pread(off, self.cs), self.order))
            else:
                blk = [0] * self.per_block
            self.blocks[index] = blk
        return blk

    async def add(self, first: int, count: int, delta: int) -> None:
        for c in range(first, first + count):
            blk = await self.block(c // self.per_block)
            v = blk[c % self.per_block] + delta
            if not 0 <= v <= self.top:
                raise ImageFormatError(f"refcount of cluster {c} is out of range; run 'check -r all'")
            blk[c % self.per_block] = v

    async def write_blocks(self, indexes: set[int]) -> None:
        for index in sorted(indexes):
            off = self.table[index] & L.REFT_OFFSET_MASK
            await self.hf.pwrite(off, pack_refcounts(self.blocks[index], self.order, self.cs))


async def _shrink(hf: HostFile, h: L.Header, size: int) -> None:
    cs = h.cluster_size
    cluster_bits = cs.bit_length() - 1
    l2_entries = h.l2_entries
    step = h.l2_entry_size // 8  # 64-bit words per L2 entry (2 with extended L2)
    first_gone = -(-size // cs)  # the first guest cluster wholly past the new end
    keep_l1 = -(-size // (cs * l2_entries))
    raw = await hf.pread(h.l1_table_offset, h.l1_size * 8) if h.l1_size else b""
    l1 = list(struct.unpack(f">{h.l1_size}Q", raw)) if h.l1_size else []
    rc = _Refcounts(hf, h, await _read_table(hf, h))
    freed: list[tuple[int, int]] = []  # (first host cluster, count)
    l1_changes: dict[int, int] = {}
    for i in range(first_gone // l2_entries, len(l1)):
        l2_off = l1[i] & L.L1E_OFFSET_MASK
        if not l2_off:
            continue
        table = list(struct.unpack(f">{l2_entries * step}Q", await hf.pread(l2_off, l2_entries * step * 8)))
        start = max(first_gone - i * l2_entries, 0)
        for j in range(start, l2_entries):
            first, count = referenced_clusters(table[j * step], cluster_bits)
            if count:
                freed.append((first // cs, count))
            for k in range(step):
                table[j * step + k] = 0
        if i >= keep_l1:
            freed.append((l2_off // cs, 1))
        elif start < l2_entries:
            packed = struct.pack(f">{len(table)}Q", *table)
            if (await rc.block(l2_off // cs // rc.per_block))[l2_off // cs % rc.per_block] > 1:
                # shared with a snapshot: the active image gets its own copy (qemu's COW of an L2 table)
                copy_off = await _alloc_one(rc)
                await hf.pwrite(copy_off, packed + bytes(cs - len(packed)))
                await hf.fdatasync()
                l1_changes[i] = copy_off | L.L1E_COPIED
                freed.append((l2_off // cs, 1))
            else:
                await hf.pwrite(l2_off, packed)
    for i, entry in l1_changes.items():
        await hf.pwrite(h.l1_table_offset + i * 8, struct.pack(">Q", entry))
    if len(l1) > keep_l1:
        await hf.pwrite(h.l1_table_offset + keep_l1 * 8, bytes((len(l1) - keep_l1) * 8))
    await hf.fdatasync()
    rc.blocks.clear()
    for first, count in freed:
        await rc.add(first, count, -1)
    if rc.blocks:
        await rc.write_blocks(set(rc.blocks))
        await hf.fdatasync()
    await hf.pwrite(_SIZE_OFFSET, struct.pack(">Q", size))
    await hf.fdatasync()
    await _drop_empty_refblocks(rc)
    # the file's tail past the last cluster in use goes, as qemu's truncate does after a shrink
    last = -1
    for index, entry in enumerate(rc.table):
        if entry & L.REFT_OFFSET_MASK:
            blk = await rc.block(index)
            for k in range(len(blk) - 1, -1, -1):
                if blk[k]:
                    last = max(last, index * rc.per_block + k)
                    break
    file_end = (last + 1) * cs
    if 0 < file_end < hf.size():
        await hf.truncate(file_end)
        await hf.fdatasync()


async def _alloc_one(rc: _Refcounts) -> int:
    """One cluster at the end of the file, counted (and synced) before it is returned.

    A missing refcount block is placed right after it, counting both; a refcount table without room for
    its entry is not grown here (a clear refusal instead).
    """
    hf, cs = rc.hf, rc.cs
    end = -(-hf.size() // cs)
    index = end // rc.per_block
    if rc.covered(index):
        await rc.add(end, 1, 1)
        await rc.write_blocks({index})
    else:
        block = end + 1
        if block // rc.per_block != index or index >= len(rc.table):
            raise UnsupportedError("shrinking this qcow2 image needs a larger refcount table, which is not "
                                   "supported yet")
        rc.blocks[index] = [0] * rc.per_block
        rc.table[index] = block * cs
        await rc.add(end, 2, 1)
        await rc.write_blocks({index})
        await hf.fdatasync()
        await hf.pwrite(rc.h.refcount_table_offset + index * 8, struct.pack(">Q", block * cs))
    await hf.fdatasync()
    return end * cs


async def _drop_empty_refblocks(rc: _Refcounts) -> None:
    """Free the refcount blocks that count nothing but themselves (qemu's qcow2_shrink_reftable).

    The table entry is cleared and synced before the block's own refcount is dropped, so a crash leaks
    the block at worst.
    """
    h, cs = rc.h, rc.cs
    gone: list[int] = []
    cleared = False
    for index, entry in enumerate(rc.table):
        off = entry & L.REFT_OFFSET_MASK
        if not off:
            continue
        own = off // cs
        blk = await rc.block(index)
        inside = own // rc.per_block == index
        if any(v for k, v in enumerate(blk) if not (inside and k == own % rc.per_block)):
            continue
        rc.table[index] = 0
        await rc.hf.pwrite(h.refcount_table_offset + index * 8, bytes(8))
        del rc.blocks[index]
        cleared = True
        if not inside:
            gone.append(own)
    if cleared:
        await rc.hf.fdatasync()
    written: set[int] = set()
    for own in gone:
        if rc.covered(own // rc.per_block):
            await rc.add(own, 1, -1)
            written.add(own // rc.per_block)
    if written:
        await rc.write_blocks(written)
        await rc.hf.fdatasync()


async def _read_table(hf: HostFile, h: L.Header) -> list[int]:
    raw = await hf.pread(h.refcount_table_offset, h.refcount_table_clusters * h.cluster_size)
    return list(struct.unpack(f">{len(raw) // 8}Q", raw))


async def _grow(hf: HostFile, h: L.Header, size: int, need: int, prealloc: str) -> None:
    """Grow with a new L1 table at the end of the file, or with preallocated clusters for the new part."""
    cs = h.cluster_size
    step = h.l2_entry_size // 8
    l2e = h.l2_entries
    table = await _read_table(hf, h)
    rc = _Refcounts(hf, h, table)
    capacity = len(table)
    used = len(table)
    while used and not table[used - 1] & L.REFT_OFFSET_MASK:
        used -= 1
    end = -(-hf.size() // cs)
    l1 = list(struct.unpack(f">{h.l1_size}Q", await hf.pread(h.l1_table_offset, h.l1_size * 8))) \
        if h.l1_size else []
    l1 += [0] * (need - len(l1))
    l1_capacity = (-(-h.l1_size * 8 // cs) * cs) // 8 if h.l1_size else 0
    l1_clusters = -(-need * 8 // cs) if need > l1_capacity else 0

    # the guest clusters to preallocate, by L1 index: (L2 table or None when it is new, entry indexes)
    fills: dict[int, list[int]] = {}
    tables: dict[int, list[int]] = {}
    if prealloc != "off":
        for g in range(h.size // cs, -(-size // cs)):
            i, j = divmod(g, l2e)
            if i not in tables:
                off = l1[i] & L.L1E_OFFSET_MASK
                tables[i] = list(struct.unpack(f">{l2e * step}Q", await hf.pread(off, l2e * step * 8))) \
                    if off else []
            t = tables[i]
            if t:
                kind, _host = classify_extended(t[j * step], t[j * step + 1]) if step == 2 \
                    else classify(t[j * step], h.version >= 3)
                if kind.is_allocated:
                    continue
            fills.setdefault(i, []).append(j)
    new_l2 = [i for i in fills if not tables[i]]
    n_data = sum(len(v) for v in fills.values())
    fixed = l1_clusters + len(new_l2) + n_data
    # New clusters, in this order from ``end``: the L1 table, new L2 tables, data, missing refcount
    # blocks, a new refcount table. Each of them must itself be counted, hence the fixed point.
    new_blocks: list[int] = []
    rt_clusters = 0
    while True:
        last = end + fixed + len(new_blocks) + rt_clusters - 1
        missing = [i for i in range(end // rc.per_block, last // rc.per_block + 1) if not rc.covered(i)]
        entries = max(used, (missing[-1] + 1) if missing else 0)
        want_rt = -(-entries * 8 // cs) if entries > capacity else 0
        if len(missing) == len(new_blocks) and want_rt <= rt_clusters:
            break
        new_blocks = missing
        rt_clusters = max(rt_clusters, want_rt)
    l1_off = end * cs if l1_clusters else h.l1_table_offset
    l2_cluster = {i: end + l1_clusters + k for k, i in enumerate(new_l2)}
    data = end + l1_clusters + len(new_l2)
    first_block = data + n_data
    block_cluster = {idx: first_block + k for k, idx in enumerate(new_blocks)}
    rt_off = (first_block + len(new_blocks)) * cs if rt_clusters else h.refcount_table_offset
    alloc_end = first_block + len(new_blocks) + rt_clusters

    # 1. data, then the L2 tables that are new, then a new L1 table: nothing live points there yet
    if n_data and prealloc == "full":
        await hf.write_zeroes_slow(data * cs, n_data * cs)
    elif n_data and prealloc == "falloc":
        try:
            await hf.allocate(data * cs, n_data * cs)
        except UnsupportedError:
            await hf.write_zeroes_slow(data * cs, n_data * cs)
    changed: list[int] = []  # existing L2 tables given entries
    host = data
    for i, js in fills.items():
        t = tables[i] or [0] * (l2e * step)
        for j in js:
            t[j * step] = host * cs | L.L2E_COPIED
            if step == 2:
                t[j * step + 1] = L.SC_ALLOC_MASK  # every subcluster allocated (it reads zeroes)
            host += 1
        tables[i] = t
        if i in l2_cluster:
            await hf.pwrite(l2_cluster[i] * cs, struct.pack(f">{len(t)}Q", *t))
            l1[i] = l2_cluster[i] * cs | L.L1E_COPIED
        else:
            changed.append(i)
    if l1_clusters:
        packed = struct.pack(f">{need}Q", *l1)
        await hf.pwrite(l1_off, packed + bytes(l1_clusters * cs - len(packed)))
    # 2. refcounts for every new cluster, new blocks written before any table entry points to them
    if rt_clusters:
        table = table + [0] * (rt_clusters * cs // 8 - len(table))
        rc.table = table
    for idx, cluster in block_cluster.items():
        rc.blocks[idx] = [0] * rc.per_block  # a fresh block: nothing in its range was counted before
        while len(table) <= idx:
            table.append(0)
        table[idx] = cluster * cs
    await rc.add(end, alloc_end - end, 1)
    touched = set(rc.blocks)
    fresh = set(block_cluster)
    await rc.write_blocks(fresh)
    await rc.write_blocks(touched - fresh)
    if rt_clusters:
        await hf.pwrite(rt_off, b"".join(struct.pack(">Q", e) for e in table))
    elif block_cluster:
        for idx, cluster in block_cluster.items():
            await hf.pwrite(h.refcount_table_offset + idx * 8, struct.pack(">Q", cluster * cs))
    if hf.size() < alloc_end * cs:
        await hf.truncate(alloc_end * cs)  # metadata preallocation: the data clusters exist, sparse
    await hf.fdatasync()
    # 3. counted clusters linked into the live tables (past the old size: the guest does not see them yet)
    for i in changed:
        off = l1[i] & L.L1E_OFFSET_MASK
        await hf.pwrite(off, struct.pack(f">{len(tables[i])}Q", *tables[i]))
    if not l1_clusters:
        # new entries (zero past the old l1_size, whatever the cluster held) and links to new L2 tables
        linked = sorted(l2_cluster)
        lo = min([h.l1_size, *linked])
        hi = max([need, *(i + 1 for i in linked)])
        if lo < hi:
            await hf.pwrite(h.l1_table_offset + lo * 8, struct.pack(f">{hi - lo}Q", *l1[lo:hi]))
    await hf.fdatasync()
    # 4. the switch: size, L1 and refcount table together, in the header's first sector
    await hf.pwrite(_SIZE_OFFSET, _SIZE_TO_REFTABLE.pack(
        size, h.crypt_method, max(need, h.l1_size), l1_off, rt_off,
        rt_clusters if rt_clusters else h.refcount_table_clusters))
    await hf.fdatasync()
    # 5. free what the header no longer points to (a crash before this leaks it, nothing worse)
    rc.blocks.clear()
    old_l1_clusters = -(-h.l1_size * 8 // cs)
    if l1_clusters and old_l1_clusters and h.l1_table_offset:
        await rc.add(h.l1_table_offset // cs, old_l1_clusters, -1)
    if rt_clusters:
        await rc.add(h.refcount_table_offset // cs, h.refcount_table_clusters, -1)
    if rc.blocks:
        await rc.write_blocks(set(rc.blocks))
        await hf.fdatasync()
