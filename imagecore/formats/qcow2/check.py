"""qcow2 consistency check and repair, with qemu-img check's semantics and wording.

The expected refcount of every cluster is rebuilt from the metadata (header, L1/L2 tables of the active
image and of each snapshot, snapshot table, refcount structures, bitmaps) and compared with the stored
refcounts. The array of expected refcounts is sized by the real file, never by header claims: a reference
beyond the end of the file is itself reported as a corruption.
"""

from __future__ import annotations

import struct
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from ...driver import CheckResult, OpenContext
from ...errors import BlockError, HostIOError, ImageFormatError, InvalidArgumentError
from ...hostio import HostFile
from . import bitmaps as B
from . import layout as L
from .headio import read_header
from .snapshot import SnapshotTable, read_snapshot_table
from .tables import REFCOUNT_CODES, decode_refcount_block, pack_refcounts, unpack_refcounts

REFT_RESERVED = 0x1FF

def _allocated(e: int, ext: bool, has_data_file: bool) -> bool:
    """Whether a standard L2 entry maps a host cluster (qemu's NORMAL or ZERO_ALLOC types)."""
    if e & L.L2E_OFFSET_MASK:
        return True
    if e & L.L2E_ZERO and not ext:
        return False
    # offset 0 is a real cluster in an external data file, told apart from a hole by the COPIED flag
    return has_data_file and bool(e & L.L2E_COPIED)


_BLOCK_CACHE_BYTES = 64 * 1024 * 1024
MAX_MESSAGES = 100_000  # a hostile image could otherwise make the report itself unbounded


@dataclass(slots=True)
class _Memo:
    """What walking one table found: its messages and its (corruptions, allocated, fragmented, compressed)."""

    messages: list[str]
    counters: tuple[int, ...]


# -- the check ---------------------------------------------------------------------------------------

@dataclass(slots=True)
class _State:
    hf: HostFile
    h: L.Header
    file_size: int
    refs: array[int]  # expected refcounts, one per cluster of the file (+1 for a partial last cluster)
    res: CheckResult
    refcount_max: int
    reftable: list[int] = field(default_factory=list)
    snaps: SnapshotTable | None = None
    rebuild: bool = False
    blocks: OrderedDict[int, bytes] = field(default_factory=OrderedDict)
    # Tables referenced more than once (snapshots share L2 tables; hostile images may point every entry
    # at one table) are walked once; later references replay the findings and multiply the refcounts.
    mult: int = 1
    quiet: bool = False
    overflows: int = 0
    recorders: list[list[str]] = field(default_factory=list)
    memo: dict[tuple[int, int, bool], _Memo] = field(default_factory=dict)
    pending_l1: dict[tuple[int, int], int] = field(default_factory=dict)
    pending_l2: dict[int, int] = field(default_factory=dict)

    @property
    def cs(self) -> int:
        return self.h.cluster_size

    def msg(self, text: str) -> None:
        if self.quiet:
            return
        if len(self.res.messages) < MAX_MESSAGES:
            self.res.messages.append(text)
        for r in self.recorders:
            r.append(text)

    def corrupt(self, n: int = 1) -> None:
        if not self.quiet:
            self.res.corruptions += n

    def inc(self, offset: int, size: int) -> None:
        """Count ``mult`` references to each cluster of ``[offset, offset+size)`` (inc_refcounts_imrt)."""
        if size <= 0:
            return
        if offset + size - self.file_size >= self.cs:
            self.msg("ERROR: counting reference for region exceeding the end of the file by one cluster "
                     f"or more: offset {offset:#x} size {size:#x}")
            self.corrupt()
            return
        bits = self.h.cluster_bits
        first, last = offset >> bits, (offset + size - 1) >> bits
        refs, m, top = self.refs, self.mult, self.refcount_max
        for k in range(first, last + 1):
            if k >= len(refs):
                refs.extend([0] * (k + 1 - len(refs)))
            new = refs[k] + m
            if new > top:
                over = new - top
                self.overflows += over
                for _ in range(min(over, 1 + MAX_MESSAGES - len(self.res.messages))):
                    self.res.messages.append(f"ERROR: overflow cluster offset={k << bits:#x}")
                    self.res.messages.append(
                        "Use qemu-img amend to increase the refcount entry width or qemu-img convert "
                        "to create a clean copy if the image cannot be opened for writing")
                new = top
            refs[k] = new

    def _counters(self) -> tuple[int, int, int, int]:
        r = self.res
        return (r.corruptions, r.allocated_clusters or 0, r.fragmented_clusters or 0,
                r.compressed_clusters or 0)

    def _replay(self, memo: _Memo) -> None:
        for text in memo.messages:
            self.msg(text)
        r = self.res
        r.corruptions += memo.counters[0]
        r.allocated_clusters = (r.allocated_clusters or 0) + memo.counters[1]
        r.fragmented_clusters = (r.fragmented_clusters or 0) + memo.counters[2]
        r.compressed_clusters = (r.compressed_clusters or 0) + memo.counters[3]

    async def walk_l1(self, l1_offset: int, l1_size: int, frag: bool) -> None:
        """check_l1 once per distinct table; a repeat replays its findings and is counted for later."""
        key = (l1_offset, l1_size, frag)
        memo = self.memo.get(key)
        if memo is not None:
            self._replay(memo)
            self.pending_l1[(l1_offset, l1_size)] = self.pending_l1.get((l1_offset, l1_size), 0) + 1
            return
        rec: list[str] = []
        before = self._counters()
        self.recorders.append(rec)
        try:
            await self.check_l1(l1_offset, l1_size, frag)
        finally:
            self.recorders.pop()
        after = self._counters()
        self.memo[key] = _Memo(rec, tuple(a - b for a, b in zip(after, before, strict=True)))

    async def walk_l2(self, l2_off: int, frag: bool) -> None:
        if self.quiet:
            self.pending_l2[l2_off] = self.pending_l2.get(l2_off, 0) + self.mult
            return
        key = (l2_off, -1, frag)
        memo = self.memo.get(key)
        if memo is not None:
            self._replay(memo)
            self.pending_l2[l2_off] = self.pending_l2.get(l2_off, 0) + 1
            return
        rec: list[str] = []
        before = self._counters()
        self.recorders.append(rec)
        try:
            await self.check_l2(l2_off, frag)
        finally:
            self.recorders.pop()
        after = self._counters()
        self.memo[key] = _Memo(rec, tuple(a - b for a, b in zip(after, before, strict=True)))

    async def apply_pending(self) -> None:
        """Count the references of the repeated tables, each walked once more with a multiplier."""
        self.quiet = True
        try:
            for (off, size), m in self.pending_l1.items():
                self.mult = m
                await self.check_l1(off, size, False)
            for off, m in self.pending_l2.items():
                self.mult = m
                await self.check_l2(off, False)
        finally:
            self.quiet, self.mult = False, 1
        self.res.corruptions += self.overflows

    async def read(self, offset: int, length: int) -> bytes:
        return await self.hf.pread(offset, length)

    async def stored_raw(self, index: int) -> bytes | None:
        """The stored refcount block ``index`` as on disk (b"" when absent); None when its entry is unusable.

        A small LRU keeps memory bounded however many reftable entries a hostile image has.
        """
        if index >= len(self.reftable):
            return b""
        cached = self.blocks.get(index)
        if cached is not None:
            self.blocks.move_to_end(index)
            return cached
        off = self.reftable[index] & L.REFT_OFFSET_MASK
        if off % self.cs:
            return None
        raw = await self.read(off, self.cs) if off else b""
        self.blocks[index] = raw
        while len(self.blocks) > max(4, _BLOCK_CACHE_BYTES // self.cs):
            self.blocks.popitem(last=False)
        return raw

    async def stored_block(self, index: int) -> array[int] | None:
        raw = await self.stored_raw(index)
        if raw is None:
            return None
        if not raw:
            return array("Q", bytes(8 * self.rb_entries))
        return unpack_refcounts(raw, self.h.refcount_order)

    @property
    def rb_entries(self) -> int:
        return self.cs * 8 >> self.h.refcount_order

    async def stored_refcount(self, cluster: int) -> int | None:
        raw = await self.stored_raw(cluster // self.rb_entries)
        if raw is None:
            return None
        if not raw:
            return 0
        i = cluster % self.rb_entries
        order = self.h.refcount_order
        if order < 3:
            bits = 1 << order
            return raw[i * bits // 8] >> (i * bits % 8) & ((1 << bits) - 1)
        width = 1 << (order - 3)
        return int.from_bytes(raw[i * width:(i + 1) * width], "big")

    # -- the walk ------------------------------------------------------------------------------------

    async def check_l1(self, l1_offset: int, l1_size: int, frag: bool) -> None:
        if l1_size == 0:
            return
        self.inc(l1_offset, l1_size * 8)
        # never read more than the file holds, whatever the table claims
        avail = max(0, min(l1_size * 8, self.file_size - l1_offset))
        raw = await self.read(l1_offset, avail) if avail else b""
        for i in range(len(raw) // 8):
            e = struct.unpack_from(">Q", raw, i * 8)[0]
            if e & L.L1E_RESERVED:
                self.msg(f"ERROR found L1 entry with reserved bits set: {e:x}")
                self.corrupt()
            l2_off = e & L.L1E_OFFSET_MASK
            if not l2_off:
                continue
            self.inc(l2_off, self.cs)
            if l2_off % self.cs:
                self.msg(f"ERROR l2_offset={l2_off:x}: Table is not cluster aligned; L1 entry corrupted")
                self.corrupt()
            await self.walk_l2(l2_off, frag)

    async def check_l2(self, l2_off: int, frag: bool) -> None:
        h, cs, res = self.h, self.cs, self.res
        ext = h.extended_l2
        step = 2 if ext else 1
        n = h.l2_entries
        raw = await self.read(l2_off, n * 8 * step) if l2_off < self.file_size else bytes(n * 8 * step)
        words = array("Q", raw)
        words.byteswap()
        has_data_file = bool(h.incompatible_features & L.INCOMPAT_DATA_FILE)
        off_mask, size_shift = L.compressed_split(h.cluster_bits)
        next_contig = 0
        # The common entry (an aligned, uncompressed data cluster inside the file) is counted
        # inline: this loop runs once per cluster of the image.
        refs, bits, top, m = self.refs, h.cluster_bits, self.refcount_max, self.mult
        file_size = self.file_size
        nrefs = len(refs)
        plain_mask = L.L2E_COMPRESSED | L.L2E_STD_RESERVED | L.L2E_ZERO | (cs - 1)
        count_frag = frag and not self.quiet
        allocated = fragmented = 0
        for i in range(n):
            e = words[i * step]
            bitmap = words[i * step + 1] if ext else 0
            if not e and not bitmap:
                continue
            if not ext and not e & plain_mask:
                offset = e & L.L2E_OFFSET_MASK
                if offset:
                    if count_frag:
                        allocated += 1
                        if next_contig and offset != next_contig:
                            fragmented += 1
                        next_contig = offset + cs
                    if not has_data_file:
                        k = offset >> bits
                        if offset < file_size and k < nrefs and refs[k] + m <= top:
                            refs[k] += m
                        else:
                            self.inc(offset, cs)
                    continue
            if e & L.L2E_COMPRESSED:
                if e & L.L2E_COPIED:
                    self.msg(f"ERROR: coffset={e & off_mask:#x}: copied flag must never be set for "
                             "compressed clusters")
                    e &= ~L.L2E_COPIED
                    self.corrupt()
                if has_data_file:
                    self.msg(f"ERROR compressed cluster {i} with data file, entry={e:#x}")
                    self.corrupt()
                    continue
                if bitmap:
                    self.msg(f"ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, "
                             f"entry={e:#x}")
                    self.corrupt()
                    continue
                coffset = e & off_mask
                nb_sectors = ((e >> size_shift) & ((1 << (62 - size_shift)) - 1)) + 1
                csize = nb_sectors * 512 - (coffset & 511)
                self.inc(coffset, csize)
                if frag and not self.quiet:
                    res.allocated_clusters = (res.allocated_clusters or 0) + 1
                    res.compressed_clusters = (res.compressed_clusters or 0) + 1
                    res.fragmented_clusters = (res.fragmented_clusters or 0) + 1
                continue
            if e & L.L2E_STD_RESERVED:
                self.msg(f"ERROR found l2 entry with reserved bits set: {e:x}")
                self.corrupt()
            offset = e & L.L2E_OFFSET_MASK
            if not _allocated(e, ext, has_data_file):
                if ext and bitmap & L.SC_ALLOC_MASK:
                    self.corrupt()
                    self.msg("ERROR: Unallocated cluster has non-zero subcluster allocation bitmap")
                continue
            if (bitmap >> 32) & bitmap:
                self.corrupt()
                self.msg(f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation "
                         "bitmap")
            if offset % cs:
                self.corrupt()
                contains_data = bool(bitmap & L.SC_ALLOC_MASK) if ext else not (e & L.L2E_ZERO)
                if not contains_data:
                    self.msg(f"ERROR offset={offset:x}: Preallocated cluster is not properly aligned; "
                             "L2 entry corrupted.")
                else:
                    self.msg(f"ERROR offset={offset:x}: Data cluster is not properly aligned; "
                             "L2 entry corrupted.")
            if frag and not self.quiet:
                res.allocated_clusters = (res.allocated_clusters or 0) + 1
                if next_contig and offset != next_contig:
                    res.fragmented_clusters = (res.fragmented_clusters or 0) + 1
                next_contig = offset + cs
            if not has_data_file:
                self.inc(offset, cs)
        if allocated or fragmented:
            res.allocated_clusters = (res.allocated_clusters or 0) + allocated
            res.fragmented_clusters = (res.fragmented_clusters or 0) + fragmented

    async def check_bitmaps(self) -> None:
        h = self.h
        if h.version < 3 or not h.autoclear_features & L.AUTOCLEAR_BITMAPS:
            return
        ext = h.extension(L.EXT_BITMAPS)
        if ext is None or len(ext) < 24:
            return
        nb, _reserved, dir_size, dir_off = B.EXTENSION_STRUCT.unpack_from(ext, 0)
        if nb == 0 or nb > B.MAX_BITMAPS or dir_size > B.MAX_DIRECTORY_SIZE or dir_off % self.cs:
            return
        self.inc(dir_off, dir_size)
        if dir_off + dir_size > self.file_size:
            return
        d = await self.read(dir_off, dir_size)
        pos = 0
        for _ in range(nb):
            if pos + 24 > len(d):
                break
            tbl_off, tbl_size, _flags, _type, _gran, name_size, extra = B.ENTRY_STRUCT.unpack_from(d, pos)
            pos += (24 + extra + name_size + 7) & ~7
            if tbl_off % self.cs or tbl_size * 8 > L.MAX_L1_BYTES:
                continue
            self.inc(tbl_off, tbl_size * 8)
            if not tbl_size or tbl_off + tbl_size * 8 > self.file_size:
                continue
            tbl = array("Q", await self.read(tbl_off, tbl_size * 8))
            tbl.byteswap()
            for e in tbl:
                off = e & B.TABLE_OFFSET_MASK
                if off:
                    self.inc(off, self.cs)

    async def check_refblocks(self) -> None:
        nb_clusters = len(self.refs)
        for i, e in enumerate(self.reftable):
            if not e:
                continue  # most of a reftable is unused: nothing to check, and this loop runs per entry
            off = e & L.REFT_OFFSET_MASK
            if e & REFT_RESERVED:
                self.msg(f"ERROR refcount table entry {i} has reserved bits set")
                self.res.corruptions += 1
                self.rebuild = True
                continue
            if off % self.cs:
                self.msg(f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted")
                self.res.corruptions += 1
                self.rebuild = True
                continue
            if off >> self.h.cluster_bits >= nb_clusters:
                self.res.corruptions += 1
                self.msg(f"ERROR refcount block {i} is outside image")
                self.rebuild = True
                continue
            if off:
                self.inc(off, self.cs)
                rc = self.refs[off >> self.h.cluster_bits]
                if rc != 1:
                    self.msg(f"ERROR refcount block {i} refcount={rc}")
                    self.res.corruptions += 1
                    self.rebuild = True

    async def calculate(self) -> None:
        """Rebuild the expected refcounts (qemu's calculate_refcounts)."""
        h = self.h
        self.inc(0, self.cs)
        await self.walk_l1(h.l1_table_offset, h.l1_size, True)
        assert self.snaps is not None
        if h.incompatible_features & L.INCOMPAT_DATA_FILE and self.snaps.snapshots:
            self.msg(f"ERROR {len(self.snaps.snapshots)} snapshots in image with data file")
            self.res.corruptions += 1
        for sn in self.snaps.snapshots:
            if sn.l1_table_offset % self.cs:
                self.msg(f"ERROR snapshot {sn.id} ({sn.name}) l1_offset={sn.l1_table_offset:#x}: L1 table "
                         "is not cluster aligned; snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            if sn.l1_size > L.MAX_L1_BYTES // 8:
                self.msg(f"ERROR snapshot {sn.id} ({sn.name}) l1_size={sn.l1_size:#x}: L1 table is too "
                         "large; snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            await self.walk_l1(sn.l1_table_offset, sn.l1_size, False)
        await self.apply_pending()
        self.inc(self.snaps.offset, self.snaps.size)
        self.inc(h.refcount_table_offset, len(self.reftable) * 8)
        await self.check_bitmaps()
        await self.check_refblocks()

    async def compare(self, fix_leaks: bool, fix_errors: bool) -> int:
        """Compare stored and expected refcounts (qemu's compare_refcounts); returns the highest used cluster.

        Fixed refcounts are written back at once.
        """
        res, refs, rbe = self.res, self.refs, self.rb_entries
        highest = 0
        nb = len(refs)
        for bi in range(-(-nb // rbe)):
            base = bi * rbe
            stored = await self.stored_block(bi)
            count = min(rbe, nb - base)
            if stored is None:
                for i in range(base, base + count):
                    self.msg(f"Can't get refcount for cluster {i}: Input/output error")
                    res.check_errors += 1
                    if refs[i]:
                        highest = i
                continue
            expect = refs[base:base + count]
            have = stored[:count]
            dirty = False
            if have == expect:
                for j in range(count - 1, -1, -1):
                    if have[j]:
                        highest = max(highest, base + j)
                        break
                continue
            for j in range(count):
                r1, r2 = have[j], expect[j]
                i = base + j
                if r1 or r2:
                    highest = i
                if r1 == r2:
                    continue
                fixed = False
                if r1 == 0:
                    self.rebuild = True
                elif r1 > r2 and fix_leaks:
                    fixed = True
                elif r1 < r2 and fix_errors:
                    fixed = True
                word = "Repairing" if fixed else ("ERROR" if r1 < r2 else "Leaked")
                self.msg(f"{word} cluster {i} refcount={r1} reference={r2}")
                if fixed:
                    stored[j] = r2
                    dirty = True
                    if r1 > r2:
                        res.leaks_fixed += 1
                    else:
                        res.corruptions_fixed += 1
                    continue
                if r1 < r2:
                    res.corruptions += 1
                else:
                    res.leaks += 1
            if dirty:
                await self.write_block(bi, stored)
        return highest

    async def write_block(self, index: int, values: array[int]) -> None:
        off = self.reftable[index] & L.REFT_OFFSET_MASK
        raw = pack_refcounts(values, self.h.refcount_order, self.cs)
        await self.hf.pwrite(off, raw)
        self.blocks[index] = raw

    async def check_copied(self, repair: bool) -> None:
        h, res = self.h, self.res
        if not h.l1_size or h.l1_table_offset >= self.file_size:
            return
        has_data_file = bool(h.incompatible_features & L.INCOMPAT_DATA_FILE)
        raw = await self.read(h.l1_table_offset, min(h.l1_size * 8, self.file_size - h.l1_table_offset))
        ext = h.extended_l2
        step = 2 if ext else 1
        bits = h.cluster_bits
        walked: dict[int, tuple[list[str], int]] = {}
        code = REFCOUNT_CODES.get(h.refcount_order, "")
        rb = self.rb_entries
        cur_index = -1
        cur: array[int] | None = None
        for i in range(len(raw) // 8):
            l1e = struct.unpack_from(">Q", raw, i * 8)[0]
            l2_off = l1e & L.L1E_OFFSET_MASK
            if not l2_off:
                continue
            rc = await self.stored_refcount(l2_off >> bits)
            if rc is None:
                continue
            if (rc == 1) != bool(l1e & L.L1E_COPIED):
                res.corruptions += 1
                self.msg(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED L2 cluster: l1_index={i} "
                         f"l1_entry={l1e:x} refcount={rc}")
                if repair:
                    l1e = l1e | L.L1E_COPIED if rc == 1 else l1e & ~L.L1E_COPIED
                    await self.hf.pwrite(h.l1_table_offset + i * 8, struct.pack(">Q", l1e))
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            if l2_off >= self.file_size:
                continue
            # an L2 table named again gives the same findings (none once it was repaired)
            seen = walked.get(l2_off)
            if seen is not None:
                for text in seen[0]:
                    self.msg(text)
                res.corruptions += seen[1]
                continue
            rec: list[str] = []
            self.recorders.append(rec)
            before = res.corruptions
            l2raw = await self.read(l2_off, h.l2_entries * 8 * step)
            words = array("Q", l2raw)
            words.byteswap()
            l2_dirty = False
            for j in range(h.l2_entries):
                e = words[j * step]
                if not e or e & L.L2E_COMPRESSED:
                    continue
                off = e & L.L2E_OFFSET_MASK
                if not off and not _allocated(e, ext, has_data_file):
                    continue
                if has_data_file:
                    drc: int | None = 1
                elif code:
                    # one decoded block at a time, in its own width: as many bytes as the block
                    c = off >> bits
                    bi = c // rb
                    if bi != cur_index:
                        cur_index = bi
                        raw_block = await self.stored_raw(bi)
                        cur = None if raw_block is None else decode_refcount_block(raw_block, code, rb)
                    if cur is None:
                        continue
                    drc = cur[c - bi * rb]
                else:
                    drc = await self.stored_refcount(off >> bits)
                    if drc is None:
                        continue
                if (drc == 1) != bool(e & L.L2E_COPIED):
                    res.corruptions += 1
                    self.msg(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED data cluster: "
                             f"l2_entry={e:x} refcount={drc}")
                    if repair:
                        words[j * step] = e | L.L2E_COPIED if drc == 1 else e & ~L.L2E_COPIED
                        l2_dirty = True
                        res.corruptions -= 1
                        res.corruptions_fixed += 1
            self.recorders.pop()
            walked[l2_off] = ([], 0) if repair else (rec, res.corruptions - before)
            if l2_dirty:
                words.byteswap()
                await self.hf.pwrite(l2_off, words.tobytes())


async def _load(hf: HostFile) -> tuple[L.Header, int, list[int], SnapshotTable]:
    file_size = hf.size()
    h = await read_header(hf, tables_past_end=True)
    # a reftable past the end reads as zeroes (qemu's file layer zero-fills short reads), and the walk
    # then reports every cluster it finds as a corruption
    raw = await hf.pread(h.refcount_table_offset, h.refcount_table_clusters * h.cluster_size)
    rt = array("Q", raw)
    rt.byteswap()
    snaps = await read_snapshot_table(hf, h, file_size)
    return h, file_size, list(rt), snaps


async def _run(hf: HostFile) -> _State:
    h, file_size, reftable, snaps = await _load(hf)
    cs = h.cluster_size
    nb_clusters = -(-file_size // cs)
    res = CheckResult(total_clusters=-(-h.size // cs), allocated_clusters=0, fragmented_clusters=0,
                      compressed_clusters=0)
    st = _State(hf=hf, h=h, file_size=file_size, refs=array("Q", bytes(8 * nb_clusters)), res=res,
                refcount_max=(1 << h.refcount_bits) - 1, reftable=reftable, snaps=snaps)
    await st.calculate()
    return st


async def _rebuild(st: _State) -> None:
    """Write a fresh refcount table and blocks after the end of the image, from the expected refcounts.

    The old refcount structures are not referenced by the new ones, so they simply become free.
    """
    h, cs, hf = st.h, st.cs, st.hf
    refs = array("Q", st.refs)
    # drop the references the old refcount structures contributed
    bits = h.cluster_bits
    for e in st.reftable:
        off = e & L.REFT_OFFSET_MASK
        if off and not e & REFT_RESERVED and not off % cs and off >> bits < len(refs) and refs[off >> bits]:
            refs[off >> bits] -= 1
    first = h.refcount_table_offset >> bits
    for k in range(first, first + h.refcount_table_clusters):
        if k < len(refs) and refs[k]:
            refs[k] -= 1
    end = len(refs)
    while end and not refs[end - 1]:
        end -= 1
    start = max(end, -(-st.file_size // cs))
    rbe = st.rb_entries
    rt_clusters, nblocks = 1, 1
    while True:
        total = start + rt_clusters + nblocks
        need_b = -(-total // rbe)
        need_rt = -(-need_b * 8 // cs)
        if need_b <= nblocks and need_rt <= rt_clusters:
            break
        nblocks, rt_clusters = max(nblocks, need_b), max(rt_clusters, need_rt)
    if rt_clusters * cs > L.MAX_REFTABLE_BYTES:
        raise InvalidArgumentError("Refcount table would be too large to rebuild")
    total = start + nblocks + rt_clusters
    refs.extend([0] * (total - len(refs)) if total > len(refs) else [])
    for k in range(start, total):
        refs[k] = 1
    table = bytearray(rt_clusters * cs)
    for b in range(nblocks):
        struct.pack_into(">Q", table, b * 8, (start + b) * cs)
        await hf.pwrite((start + b) * cs, pack_refcounts(refs[b * rbe:(b + 1) * rbe], h.refcount_order, cs))
    rt_off = (start + nblocks) * cs
    await hf.pwrite(rt_off, table)
    await hf.fdatasync()
    await hf.pwrite(48, struct.pack(">QI", rt_off, rt_clusters))
    await hf.fdatasync()


async def _mark_clean(hf: HostFile, h: L.Header) -> None:
    """Clear the dirty and corrupt bits of a repaired image, as qemu does after a successful repair."""
    if h.version < 3:
        return
    raw = await hf.pread(72, 8)
    incompat = struct.unpack(">Q", raw)[0]
    clean = incompat & ~(L.INCOMPAT_DIRTY | L.INCOMPAT_CORRUPT)
    if clean != incompat:
        await hf.pwrite(72, struct.pack(">Q", clean))
        await hf.fdatasync()


async def check_qcow2(hf: HostFile, ctx: OpenContext, repair: str | None) -> CheckResult:
    """Check (and with ``repair`` "leaks" or "all", repair) the qcow2 image open as ``hf``."""
    if repair not in (None, "leaks", "all"):
        raise InvalidArgumentError(f"Invalid repair mode '{repair}'")
    if repair is not None and hf.read_only:
        raise InvalidArgumentError("Cannot repair an image opened read-only")
    fix_leaks = repair is not None
    fix_errors = repair == "all"
    try:
        st = await _run(hf)
        res = st.res
        pre = (res.corruptions, res.leaks, res.check_errors, len(res.messages))
        highest = await st.compare(False, False)
        if st.rebuild and fix_errors:
            res.messages.append("Rebuilding refcount structure")
            old = res
            await _rebuild(st)
            st = await _run(hf)
            res = st.res
            highest = await st.compare(True, False)
            if st.rebuild:
                res.messages.append("ERROR rebuilt refcount structure is still broken")
            # what this last comparison finds was left over by the rebuild itself
            fresh_leaks = res.leaks
            res.messages[:0] = old.messages
            res.leaks_fixed = old.leaks_fixed + old.leaks
            res.corruptions_fixed = old.corruptions_fixed + max(0, old.corruptions - res.corruptions)
            res.leaks = fresh_leaks
        elif fix_leaks:
            if st.rebuild:
                res.messages.append("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                # qemu-img gives up here ("Check failed: Input/output error"); the messages so far travel
                # with the error as its ``check_result``
                err = HostIOError("Input/output error")
                err.check_result = res  # type: ignore[attr-defined]
                raise err
            if res.leaks or res.corruptions:
                res.corruptions, res.leaks, res.check_errors = pre[:3]
                highest = await st.compare(fix_leaks, fix_errors)
        if fix_errors:
            do_repair = True
        elif fix_leaks:
            do_repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            do_repair = False
        await st.check_copied(do_repair)
        res.image_end_offset = (highest + 1) * st.cs
        if repair is not None and (res.leaks_fixed or res.corruptions_fixed):
            await hf.fdatasync()
        if repair is not None and not res.check_errors and not res.corruptions:
            await _mark_clean(hf, st.h)
        return res
    except ImageFormatError:
        raise
    except BlockError:
        raise
    except (struct.error, ValueError, IndexError, OverflowError) as exc:
        raise ImageFormatError(f"Could not check image: {exc}") from None
