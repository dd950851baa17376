"""Resizing a closed qcow2 image in place: growing within the L1 table's spare room or with a larger L1
table, and shrinking. Refcounts change through the driver's refcount engine (``Refcounts.offline``).

The L1 table occupies whole clusters, so it usually has unused entries past ``l1_size`` (with 64 KiB
clusters one L1 cluster maps 4 TiB). Growing into them needs no allocation and no refcount change: the
new entries are zeroed and flushed first, then the header's ``size`` and ``l1_size`` are written together
in one sector-sized write and flushed. A crash between the two steps leaves the old, consistent image.

When the table must grow (qemu's ``qcow2_grow_l1_table``), a new one is written at the end of the file.
Its clusters (and those of preallocated L2 tables and data) are counted by the engine, which writes and
syncs any refcount block (or larger refcount table) it adds before pointing to it; the new tables are
written and their refcounts synced before anything points to them; the header then switches size and L1
table in one sector-sized write, and the old L1 table is freed only after that switch is synced. A crash
at any point leaves either the old or the new image, with at worst a few leaked clusters (``check -r
leaks`` reclaims them).

A grow over a backing file that reaches past the old end (``tables_only``, then ``set_size``) makes the
tables first and leaves the header's size alone; the caller zeroes the new part through a driver told the
new size in memory, and the size switch comes last, as in qemu's qcow2_co_truncate. An ``l1_size`` larger
than the size needs is valid qcow2 (a shrink leaves one too), so each intermediate state is the old image.

A shrink is qemu's: the clusters past the new end are unmapped (L2 entries, and L1 entries of L2 tables
wholly past it, zeroed and synced), then their refcounts are dropped and synced, then the header gets the
new size, and the file loses its tail past the last cluster still in use. ``l1_size`` stays, as in qemu.
An L2 table shared with a snapshot is copied first (to a cluster counted before anything points to
it). A crash leaves the old size with the tail reading zeroes, or leaked clusters, never a cluster in
use with refcount 0.

With an external data file (qemu's ``qcow2_co_truncate`` with ``has_data_file``), guest data lives in
that file at its guest offset and has no refcounts: a grow maps the new clusters there when it
preallocates (always with ``data_file_raw``, whose tables must map the whole file one to one), a shrink
only unmaps them, and the data file takes the new size (a preallocated grow: up to the end of the last
mapped (sub)cluster) after the tables and before the header's size changes.
"""

from __future__ import annotations

import struct

from ...errors import HostIOError, ImageFormatError, InvalidArgumentError, UnsupportedError
from ...hostio import HostFile
from . import layout as L
from .alloc import Refcounts
from .headio import read_header
from .tables import classify, classify_extended, referenced_clusters

# size (u64), crypt_method (u32), l1_size (u32): the contiguous header fields at offset 24
_SIZE_TO_L1 = struct.Struct(">QII")
# ... followed by l1_table_offset (u64)
_SIZE_TO_L1_OFFSET = struct.Struct(">QIIQ")
_SIZE_OFFSET = 24


async def resize(hf: HostFile, size: int, prealloc: str = "off", *, tables_only: bool = False,
                 data_hf: HostFile | None = None) -> int:
    """Set the virtual size of the qcow2 image in ``hf`` to ``size``; returns the old one.

    ``prealloc`` (metadata, falloc, full: qemu's modes) allocates the clusters of the new part. With
    ``tables_only`` a grow makes the L1 table large enough for ``size`` but leaves the header's size as it
    was: the caller fills the new part (zeroes over a backing file) before :func:`set_size` shows it.
    ``data_hf`` is the image's external data file, open for writing (required when it has one).
    """
    h = await read_header(hf, writable=True)
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
    if size == old:
        return old
    if h.data_file is not None and data_hf is None:
        raise UnsupportedError("resizing qcow2 images with an external data file is not supported yet")
    data = data_hf if h.data_file is not None else None
    if size < old:
        await _shrink(hf, h, size, data)
        return old
    if data is not None and prealloc == "off" and h.autoclear_features & L.AUTOCLEAR_DATA_FILE_RAW:
        # the tables of a data_file_raw image map all of the data file one to one (qemu: at least
        # preallocation=metadata), so the grown part is mapped too
        prealloc = "metadata"
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
    assert not (tables_only and prealloc != "off")
    shown = old if tables_only else size
    if need > capacity or prealloc != "off":
        await _grow(hf, h, size, need, prealloc, shown, data)
        return old
    if need > h.l1_size:
        await hf.pwrite(h.l1_table_offset + h.l1_size * 8, bytes((need - h.l1_size) * 8))
        await hf.fdatasync()
    if data is not None:
        await _size_data_file(data, size, "off", h)
    await hf.pwrite(_SIZE_OFFSET, _SIZE_TO_L1.pack(shown, h.crypt_method, max(need, h.l1_size)))
    await hf.fdatasync()
    return old


async def _size_data_file(data: HostFile, size: int, prealloc: str, h: L.Header) -> None:
    """Give the external data file the image's new size, synced, as qemu's truncate forwards it: exactly
    ``size`` without preallocation; with it, grown (never shrunk) to the end of the last mapped
    (sub)cluster, the part past ``size`` written as zeroes (the copy-on-write of that allocation), and
    the new part allocated (falloc) or written (full)."""
    old = data.size()
    if prealloc == "off":
        await data.truncate(size)
    else:
        sc = h.cluster_size // (L.SUBCLUSTERS if h.extended_l2 else 1)
        end = -(-size // sc) * sc
        if end > old:
            if prealloc == "metadata" and end > size:
                await data.pwrite(size, bytes(end - size))
            else:
                await data.truncate(end)
            if prealloc == "falloc":
                try:
                    await data.allocate(old, end - old)
                except UnsupportedError:
                    await data.write_zeroes_slow(old, end - old)
            elif prealloc == "full":
                await data.write_zeroes_slow(old, end - old)
    await data.fdatasync()


async def set_size(hf: HostFile, size: int) -> None:
    """Write the header's virtual size alone (its L1 table already covers it) and sync it: the last step of
    a grow made with ``tables_only``."""
    await hf.pwrite(_SIZE_OFFSET, size.to_bytes(8, "big"))
    await hf.fdatasync()


async def _read_l2(hf: HostFile, h: L.Header, offset: int) -> list[int]:
    words = h.l2_entries * (h.l2_entry_size // 8)
    return list(struct.unpack(f">{words}Q", await hf.pread(offset, words * 8)))


def _pack(words: list[int], nbytes: int = 0) -> bytes:
    raw = struct.pack(f">{len(words)}Q", *words)
    return raw + bytes(max(nbytes - len(raw), 0))


async def _shrink(hf: HostFile, h: L.Header, size: int, data: HostFile | None) -> None:
    cs = h.cluster_size
    cluster_bits = h.cluster_bits
    l2_entries = h.l2_entries
    step = h.l2_entry_size // 8  # 64-bit words per L2 entry (2 with extended L2)
    first_gone = -(-size // cs)  # the first guest cluster wholly past the new end
    keep_l1 = -(-size // (cs * l2_entries))
    raw = await hf.pread(h.l1_table_offset, h.l1_size * 8) if h.l1_size else b""
    l1 = list(struct.unpack(f">{h.l1_size}Q", raw)) if h.l1_size else []
    rc = await Refcounts.offline(hf, h)
    freed: list[tuple[int, int]] = []  # (first host cluster's offset, count)
    l1_changes: dict[int, int] = {}
    for i in range(first_gone // l2_entries, len(l1)):
        l2_off = l1[i] & L.L1E_OFFSET_MASK
        if not l2_off:
            continue
        table = await _read_l2(hf, h, l2_off)
        start = max(first_gone - i * l2_entries, 0)
        for j in range(start, l2_entries):
            # an external data file's clusters have no refcounts: they are only unmapped
            first, count = (0, 0) if data is not None else referenced_clusters(table[j * step], cluster_bits)
            if count:
                freed.append((first, count))
            for k in range(step):
                table[j * step + k] = 0
        if i >= keep_l1:
            freed.append((l2_off, 1))
        elif start < l2_entries:
            if await rc.get(l2_off) > 1:
                # shared with a snapshot: the active image gets its own copy (qemu's COW of an L2 table),
                # in a cluster counted (and synced) before anything points to it
                copy_off = await rc.allocate(1)
                await rc.commit()
                await hf.pwrite(copy_off, _pack(table, cs))
                await hf.fdatasync()
                l1_changes[i] = copy_off | L.L1E_COPIED
                freed.append((l2_off, 1))
            else:
                await hf.pwrite(l2_off, _pack(table))
    for i, entry in l1_changes.items():
        await hf.pwrite(h.l1_table_offset + i * 8, struct.pack(">Q", entry))
    if len(l1) > keep_l1:
        await hf.pwrite(h.l1_table_offset + keep_l1 * 8, bytes((len(l1) - keep_l1) * 8))
    await hf.fdatasync()
    # the references are gone on disk: the refcounts may drop
    for first, count in freed:
        rc.defer_free(first, count)
    await rc.commit()
    if data is not None:
        await _size_data_file(data, size, "off", h)  # what it held past the new end is unmapped now
    await hf.pwrite(_SIZE_OFFSET, struct.pack(">Q", size))
    await hf.fdatasync()
    await _discard_unused(hf, rc, freed, cs)
    await rc.drop_empty_blocks()
    # the file's tail past the last cluster in use goes, as qemu's truncate does after a shrink
    file_end = await rc.last_used()
    if 0 < file_end < hf.size():
        await hf.truncate(file_end)
        await hf.fdatasync()


async def _discard_unused(hf: HostFile, rc: Refcounts, freed: list[tuple[int, int]], cs: int) -> None:
    """Punch holes for the freed clusters that nothing uses any more (refcount 0, synced), as qemu's
    truncate discards them (QCOW2_DISCARD_ALWAYS): the disk space comes back inside the file too, not only
    past its new end. A cluster still shared (with a snapshot, or a compressed neighbour) keeps its data.
    Discarding is advisory: a file system that cannot punch holes keeps the blocks."""
    runs: list[list[int]] = []
    for first, count in sorted(freed):
        for off in range(first, first + count * cs, cs):
            if await rc.get(off) != 0:
                continue
            if runs and runs[-1][1] == off:
                runs[-1][1] = off + cs
            elif not runs or runs[-1][1] < off:
                runs.append([off, off + cs])
    try:
        for start, end in runs:
            await hf.punch_hole(start, end - start)
    except (UnsupportedError, HostIOError):
        return


async def _grow(hf: HostFile, h: L.Header, size: int, need: int, prealloc: str, shown: int,
                data_hf: HostFile | None) -> None:
    """Grow with a new L1 table at the end of the file, or with preallocated clusters for the new part; the
    header's size becomes ``shown`` (``size``, or the old size when the caller fills the new part first).
    With an external data file ``data_hf`` the preallocated clusters are mapped to their guest offsets
    in it, and nothing is allocated in the image file for them."""
    cs = h.cluster_size
    step = h.l2_entry_size // 8
    l2e = h.l2_entries
    rc = await Refcounts.offline(hf, h)
    l1 = list(struct.unpack(f">{h.l1_size}Q", await hf.pread(h.l1_table_offset, h.l1_size * 8))) \
        if h.l1_size else []
    l1 += [0] * (need - len(l1))
    l1_capacity = (-(-h.l1_size * 8 // cs) * cs) // 8 if h.l1_size else 0
    l1_clusters = -(-need * 8 // cs) if need > l1_capacity else 0

    # the guest clusters to preallocate, by L1 index: (L2 table or [] when it is new, entry indexes)
    fills: dict[int, list[int]] = {}
    tables: dict[int, list[int]] = {}
    if prealloc != "off":
        for g in range(h.size // cs, -(-size // cs)):
            i, j = divmod(g, l2e)
            if i not in tables:
                off = l1[i] & L.L1E_OFFSET_MASK
                tables[i] = await _read_l2(hf, h, off) if off else []
            t = tables[i]
            if t:
                kind, _host = classify_extended(t[j * step], t[j * step + 1]) if step == 2 \
                    else classify(t[j * step], h.version >= 3)
                if kind.is_allocated:
                    continue
            fills.setdefault(i, []).append(j)
    new_l2 = [i for i in fills if not tables[i]]
    # in the image file; an external data file's clusters are its guest offsets
    n_data = sum(len(v) for v in fills.values()) if data_hf is None else 0

    # 1. new clusters in one area at the end of the file, in this order: the L1 table, new L2 tables, data;
    # counted by the engine (in its cache; the refcount blocks it adds after them, or a larger refcount
    # table, are written and synced before they are pointed to)
    total = l1_clusters + len(new_l2) + n_data
    base = await rc.allocate_area(total) if total else 0
    l1_off = base if l1_clusters else h.l1_table_offset
    l2_cluster = {i: base + (l1_clusters + k) * cs for k, i in enumerate(new_l2)}
    data = base + (l1_clusters + len(new_l2)) * cs

    # 2. their contents: data, the L2 tables that are new, a new L1 table (nothing live points there yet)
    if n_data and prealloc == "full":
        await hf.write_zeroes_slow(data, n_data * cs)
    elif n_data and prealloc == "falloc":
        try:
            await hf.allocate(data, n_data * cs)
        except UnsupportedError:
            await hf.write_zeroes_slow(data, n_data * cs)
    changed: list[int] = []  # existing L2 tables given entries
    host = data
    for i, js in fills.items():
        t = tables[i] or [0] * (l2e * step)
        for j in js:
            if data_hf is not None:
                host = (i * l2e + j) * cs
            t[j * step] = host | L.L2E_COPIED
            if step == 2:
                t[j * step + 1] = L.SC_ALLOC_MASK  # every subcluster allocated (it reads zeroes)
            host += cs
        tables[i] = t
        if i in l2_cluster:
            await hf.pwrite(l2_cluster[i], _pack(t))
            l1[i] = l2_cluster[i] | L.L1E_COPIED
        else:
            changed.append(i)
    if l1_clusters:
        await hf.pwrite(l1_off, _pack(l1, l1_clusters * cs))
    if total and hf.size() < base + total * cs:
        await hf.truncate(base + total * cs)  # metadata preallocation: the data clusters exist, sparse
    if data_hf is not None:
        # the data file holds what the new entries map before anything links them
        await _size_data_file(data_hf, size, prealloc, h)
    # 3. their refcounts, synced with everything above
    await rc.commit()
    # 4. counted clusters linked into the live tables (past the old size: the guest does not see them yet)
    for i in changed:
        await hf.pwrite(l1[i] & L.L1E_OFFSET_MASK, _pack(tables[i]))
    if not l1_clusters:
        # new entries (zero past the old l1_size, whatever the cluster held) and links to new L2 tables
        linked = sorted(l2_cluster)
        lo = min([h.l1_size, *linked])
        hi = max([need, *(i + 1 for i in linked)])
        if lo < hi:
            await hf.pwrite(h.l1_table_offset + lo * 8, struct.pack(f">{hi - lo}Q", *l1[lo:hi]))
    await hf.fdatasync()
    # 5. the switch: size and L1 table together, in the header's first sector
    switch = _SIZE_TO_L1_OFFSET.pack(shown, h.crypt_method, max(need, h.l1_size), l1_off)
    await hf.pwrite(_SIZE_OFFSET, switch)
    await hf.fdatasync()
    # 6. free what the header no longer points to (a crash before this leaks it, nothing worse)
    old_l1_clusters = -(-h.l1_size * 8 // cs)
    if l1_clusters and old_l1_clusters and h.l1_table_offset:
        rc.defer_free(h.l1_table_offset, old_l1_clusters)
    await rc.commit()
