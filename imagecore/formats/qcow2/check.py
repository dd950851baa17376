"""qcow2 consistency check and repair, with qemu-img check's semantics and wording (qemu 7.2).

The expected refcount of every cluster is rebuilt from the metadata (header, L1/L2 tables of the active
image and of each snapshot, snapshot table, refcount structures, bitmaps) and compared with the stored
refcounts. The array of expected refcounts is sized by the real file, never by header claims: a reference
beyond the end of the file is itself reported as a corruption.

Repair follows qemu's order and reports each step in its words: preallocated zero clusters with unaligned
offsets become plain zero clusters, a refcount block past the end of the file is repaired by growing the
file, refcounts too high (``-r leaks``) or too low (``-r all``) are set to the references counted, a
refcount structure that cannot be trusted (a refcount of 0 for a used cluster, a broken refcount block) is
rebuilt in free clusters from the counted references, and OFLAG_COPIED is set where the refcount is 1.
Refcounts are changed through the driver's refcount engine (:class:`alloc.Refcounts`) and the table codecs;
every repair write is first checked against the image's metadata, as qemu's overlap check does, and an
overlap marks the image corrupt instead of overwriting it.
"""

from __future__ import annotations

import functools
import operator
import struct
import sys
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import compress, repeat

from ... import progname
from ...driver import CheckResult, OpenContext
from ...errors import BlockError, CorruptImageError, HostIOError, ImageFormatError, InvalidArgumentError
from ...hostio import HostFile
from . import bitmaps as B
from . import layout as L
from .alloc import Refcounts
from .headio import read_first_cluster
from .layout import parse_header
from .snapshot import (
    MAX_EXTRA_DATA,
    MAX_TABLE_BYTES,
    NO_ICOUNT,
    Snapshot,
    SnapshotTable,
    encode_snapshot_table,
)
from .tables import REFCOUNT_CODES, decode_refcount_block, make_geometry, pack_refcounts, unpack_refcounts

REFT_RESERVED = 0x1FF
FIX_LEAKS = 1
FIX_ERRORS = 2

# the names qemu's overlap check gives the metadata it protects, in the order it looks
OL_HEADER, OL_ACTIVE_L1, OL_ACTIVE_L2, OL_REFTABLE, OL_REFBLOCK, OL_SNAPSHOTS, OL_INACTIVE_L1, \
    OL_BITMAP_DIR = range(8)
_OL_NAMES = ("qcow2_header", "active L1 table", "active L2 table", "refcount table", "refcount block",
             "snapshot table", "inactive L1 table", "bitmap directory")


def _cx(v: int) -> str:
    """C's ``%#x``: no 0x before a zero."""
    return f"{v:#x}" if v else "0"


def _allocated(e: int, ext: bool, has_data_file: bool) -> bool:
    """Whether a standard L2 entry maps a host cluster (qemu's NORMAL or ZERO_ALLOC types)."""
    if e & L.L2E_OFFSET_MASK:
        return True
    if e & L.L2E_ZERO and not ext:
        return False
    # offset 0 is a real cluster in an external data file, told apart from a hole by the COPIED flag
    return has_data_file and bool(e & L.L2E_COPIED)


def _lane_clear(cluster_bits: int) -> list[tuple[int, bytes]]:
    """For each byte lane of a big-endian L2 entry that holds offset bits below the cluster size: the
    lane and the byte values allowed there (those bits clear)."""
    lanes = []
    for lane in range(7, -1, -1):
        low = 8 * (7 - lane)
        if low >= cluster_bits:
            break
        mask = (1 << min(8, cluster_bits - low)) - 1
        lanes.append((lane, bytes(v for v in range(256) if not v & mask)))
    return lanes


def _plain_l2(raw: bytes, lanes: list[tuple[int, bytes]]) -> bool:
    """Whether every entry of a standard L2 table is unallocated or an aligned data cluster: no compressed,
    zero or reserved bits (checked a byte lane at a time, at C speed)."""
    if raw[0::8].translate(None, b"\x00\x80"):
        return False
    # bit 0 (zero flag) and the reserved bits 1-8 lie below every cluster size, so the lanes cover them
    return not any(raw[lane::8].translate(None, allowed) for lane, allowed in lanes)


@functools.lru_cache(maxsize=64)
def _run_weights(n: int) -> tuple[int, int]:
    """(G, H) for tables of ``n`` big-endian 64-bit entries read as one integer: the entries ``first + i *
    step`` (i = 0 .. n-1) read as ``first * G + step * H``, since no entry carries into the next."""
    ones = array("Q", [1]) * n
    steps = array("Q", range(n))
    if sys.byteorder == "little":
        ones.byteswap()
        steps.byteswap()
    return int.from_bytes(ones.tobytes(), "big"), int.from_bytes(steps.tobytes(), "big")


def _one_run(raw: bytes, bits: int) -> tuple[int, int, int] | None:
    """(first host cluster, count, entries that are not zero) when the allocated entries of a plain L2 table
    are one run of clusters contiguous on the host, with unallocated entries only before and after it (what
    a sequentially written image holds); else None. Decided by one comparison of big integers, without a
    Python step per entry (an arithmetic sequence of entries is ``first * G + step * H``,
    :func:`_run_weights`)."""
    b = bytearray(raw)
    b[0::8] = bytes(len(b) // 8)  # drop OFLAG_COPIED
    body = bytes(b)
    # an entry's top bytes are zero (offsets < 2^56) and its low byte too (offsets are 512-aligned), so the
    # stripped zeroes end inside the first and last allocated entries: whole entries are counted by rounding
    lead = (len(body) - len(body.lstrip(b"\0"))) // 8
    end = (len(body.rstrip(b"\0")) + 7) // 8
    if end <= lead:
        return None
    n = end - lead
    first = int.from_bytes(body[lead * 8:lead * 8 + 8], "big")
    ones, steps = _run_weights(n)
    if int.from_bytes(body[lead * 8:end * 8], "big") != first * ones + (steps << bits):
        return None
    # outside the run, an entry that is not zero has OFLAG_COPIED alone (a plain table has no other bit)
    return first >> bits, n, n + raw[0:lead * 8:8].count(0x80) + raw[end * 8::8].count(0x80)


def _cluster_indexes(raw: bytes, bits: int) -> list[int]:
    """The host cluster of every allocated entry of a plain L2 table, in table order."""
    b = bytearray(raw)
    b[0::8] = bytes(len(b) // 8)  # drop OFLAG_COPIED
    offs = array("Q", b)
    offs.byteswap()
    return list(map(operator.rshift, filter(None, offs), repeat(bits)))


_BLOCK_CACHE_BYTES = 64 * 1024 * 1024
_INT64_MAX = (1 << 63) - 1
_MAX_REQUEST = _INT64_MAX & ~((1 << 30) - 1)  # qemu's BDRV_MAX_LENGTH: no request reaches past it
MAX_MESSAGES = 100_000  # a hostile image could otherwise make the report itself unbounded


class _RepairIOError(HostIOError):
    """A repair write failed (qemu: -EIO); ``report`` is the line qemu-img prints for it, if any."""

    def __init__(self, report: str | None = None) -> None:
        super().__init__("Input/output error")
        self.report = report


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
    refs: array[int]  # expected refcounts, one per cluster (qemu's in-memory refcount table)
    nb: int  # qemu's *nb_clusters: the clusters compared; grows in whole refcount blocks
    res: CheckResult
    refcount_max: int
    fix: int = 0
    writable: bool = False
    reftable: list[int] = field(default_factory=list)
    snaps: SnapshotTable | None = None
    l1: list[int] = field(default_factory=list)  # the active L1 table as opened (qemu's s->l1_table)
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
    repaired_walk: bool = False
    signaled: bool = False  # qemu prints one corruption event per open
    engine: Refcounts | None = None
    overlap_map: dict[int, int] | None = None
    lanes: list[tuple[int, bytes]] = field(default_factory=list)
    # the stored refcounts of the whole image, kept by a comparison that found them all as counted (and
    # changed nothing): the OFLAG_COPIED pass then looks them up at C speed
    flat: array[int] | None = None
    ones: array[int] = field(default_factory=lambda: array("Q"))
    code: str = "Q"  # the refcounts' array type: the stored width (a byte for narrower refcounts)
    # the plain L2 tables of the active image: their runs of data clusters and whether every entry has
    # OFLAG_COPIED, for the OFLAG_COPIED pass
    plain_runs: dict[int, tuple[list[tuple[int, int]], bool]] = field(default_factory=dict)
    l2_walked: int = 0

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

    def grow(self, n: int) -> None:
        """qemu's realloc_refcount_array: count ``n`` clusters (the array itself grows in whole blocks)."""
        per = self.rb_entries
        want = -(-n // per) * per
        if want > len(self.refs):
            self.refs.extend(array(self.code, bytes(self.refs.itemsize * (want - len(self.refs)))))
        self.nb = n

    def inc(self, offset: int, size: int) -> None:
        """Count ``mult`` references to each cluster of ``[offset, offset+size)`` (inc_refcounts_imrt)."""
        if size <= 0:
            return
        if offset + size - self.file_size >= self.cs:
            self.msg("ERROR: counting reference for region exceeding the end of the file by one cluster "
                     f"or more: offset {_cx(offset)} size {_cx(size)}")
            self.corrupt()
            return
        bits = self.h.cluster_bits
        first, last = offset >> bits, (offset + size - 1) >> bits
        if last >= self.nb:
            self.grow(last + 1)
        refs, m, top = self.refs, self.mult, self.refcount_max
        for k in range(first, last + 1):
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

    async def walk_l1(self, l1_offset: int, l1_size: int, frag: bool, active: bool) -> None:
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
        self.repaired_walk = False
        try:
            await self.check_l1(l1_offset, l1_size, frag, active)
        finally:
            self.recorders.pop()
        after = self._counters()
        if not self.repaired_walk:  # a repaired table reads differently the next time (as in qemu)
            self.memo[key] = _Memo(rec, tuple(a - b for a, b in zip(after, before, strict=True)))

    async def walk_l2(self, l2_off: int, frag: bool, active: bool) -> None:
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
        repaired, self.repaired_walk = self.repaired_walk, False
        try:
            await self.check_l2(l2_off, frag, active)
        finally:
            self.recorders.pop()
        after = self._counters()
        if not self.repaired_walk:
            self.memo[key] = _Memo(rec, tuple(a - b for a, b in zip(after, before, strict=True)))
        self.repaired_walk = self.repaired_walk or repaired

    async def apply_pending(self) -> None:
        """Count the references of the repeated tables, each walked once more with a multiplier."""
        self.quiet = True
        fix, self.fix = self.fix, 0
        try:
            for (off, size), m in self.pending_l1.items():
                self.mult = m
                await self.check_l1(off, size, False, False)
            for off, m in self.pending_l2.items():
                self.mult = m
                await self.check_l2(off, False, False)
        finally:
            self.quiet, self.mult, self.fix = False, 1, fix
        self.res.corruptions += self.overflows

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; past the end of the file reads zeroes, as qemu's file layer."""
        data = await self.hf.pread(offset, length) if offset < self.file_size else b""
        return data + bytes(length - len(data)) if len(data) < length else data

    # -- corruption events and the overlap check ------------------------------------------------------

    async def signal_corruption(self, message: str, fatal: bool = True) -> None:
        """qemu's qcow2_signal_corruption: one line per open; fatal on a writable image, which it marks
        corrupt (the bit qemu sets in the header), so that nothing writes to it until it is repaired."""
        fatal = fatal and self.writable
        if self.signaled and (not fatal or self.h.incompatible_features & L.INCOMPAT_CORRUPT):
            return
        if fatal:
            self.res.messages.append(f"qcow2: Marking image as corrupt: {message}; further corruption "
                                     "events will be suppressed")
            self.h.incompatible_features |= L.INCOMPAT_CORRUPT
            if self.h.version >= 3:
                await self.hf.pwrite(72, struct.pack(">Q", self.h.incompatible_features))
                await self.hf.fdatasync()
        else:
            self.res.messages.append(f"qcow2: Image is corrupt: {message}; further non-fatal corruption "
                                     "events will be suppressed")
        self.signaled = True

    def _metadata_clusters(self) -> dict[int, int]:
        """For qemu's overlap check (its default, 'cached' level): cluster -> the first kind of metadata
        found there, in qemu's order of looking."""
        if self.overlap_map is not None:
            return self.overlap_map
        bits, cs = self.h.cluster_bits, self.cs
        found: dict[int, int] = {}

        def add(kind: int, off: int, size: int) -> None:
            if size <= 0:
                return
            for c in range(off >> bits, ((off + size - 1) >> bits) + 1):
                found.setdefault(c, kind)

        h = self.h
        found[0] = OL_HEADER
        if h.l1_size:
            add(OL_ACTIVE_L1, h.l1_table_offset, h.l1_size * 8)
        for e in self.l1:
            if e & L.L1E_OFFSET_MASK:
                add(OL_ACTIVE_L2, e & L.L1E_OFFSET_MASK, cs)
        add(OL_REFTABLE, h.refcount_table_offset, len(self.reftable) * 8)
        for e in self.reftable:
            if e & L.REFT_OFFSET_MASK:
                add(OL_REFBLOCK, e & L.REFT_OFFSET_MASK, cs)
        if self.snaps is not None:
            add(OL_SNAPSHOTS, self.snaps.offset, self.snaps.size)
            for sn in self.snaps.snapshots:
                add(OL_INACTIVE_L1, sn.l1_table_offset, sn.l1_size * 8)
        bm = self._bitmap_directory()
        if bm is not None:
            add(OL_BITMAP_DIR, *bm)
        self.overlap_map = found
        return found

    async def overlap_check(self, ignore: int | None, offset: int, size: int) -> None:
        """qcow2_pre_write_overlap_check: refuse (and signal) a repair write that would hit metadata."""
        bits = self.h.cluster_bits
        found = self._metadata_clusters()
        hit: int | None = None
        for c in range(offset >> bits, ((offset + size - 1) >> bits) + 1):
            kind = found.get(c)
            if kind is not None and kind != ignore and (hit is None or kind < hit):
                hit = kind
        if hit is None and ignore != OL_HEADER and offset < self.cs:
            hit = OL_HEADER
        if hit is not None:
            await self.signal_corruption(f"Preventing invalid write on metadata (overlaps with "
                                         f"{_OL_NAMES[hit]})")
            raise _RepairIOError()

    def _bitmap_directory(self) -> tuple[int, int] | None:
        h = self.h
        if h.version < 3 or not h.autoclear_features & L.AUTOCLEAR_BITMAPS:
            return None
        ext = h.extension(L.EXT_BITMAPS)
        if ext is None or len(ext) < 24:
            return None
        _nb, _reserved, dir_size, dir_off = B.EXTENSION_STRUCT.unpack_from(ext, 0)
        return dir_off, dir_size

    # -- stored refcounts -------------------------------------------------------------------------------

    async def stored_raw(self, index: int) -> bytes | None:
        """The stored refcount block ``index`` as on disk (b"" when absent); None when its entry is unusable
        (qemu's get_refcount fails with EIO and signals the corruption).

        A small LRU keeps memory bounded however many reftable entries a hostile image has.
        """
        if index >= len(self.reftable):
            return b""
        cached = self.blocks.get(index)
        if cached is not None:
            self.blocks.move_to_end(index)
            return cached
        off = self.reftable[index] & L.REFT_OFFSET_MASK
        if off and off + self.cs > _MAX_REQUEST:
            return None  # qemu's block layer refuses the read (EIO)
        if off % self.cs:
            await self.signal_corruption(f"Refblock offset {_cx(off)} unaligned "
                                         f"(reftable index: {_cx(index)})")
            return None
        raw = await self.read(off, self.cs) if off else b""
        self.blocks[index] = raw
        while len(self.blocks) > max(4, _BLOCK_CACHE_BYTES // self.cs):
            self.blocks.popitem(last=False)
        return raw

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

    async def refcount_engine(self) -> Refcounts:
        """The refcount engine over the current refcount table, for the repairs that change refcounts."""
        if self.engine is None:
            async def corrupt(message: str) -> CorruptImageError:
                await self.signal_corruption(message)
                return CorruptImageError(message)

            h = self.h
            geo = make_geometry(h.cluster_bits, h.extended_l2, h.refcount_order)
            table = array("Q", self.reftable)
            self.engine = Refcounts(self.hf, geo, h.refcount_table_offset,
                                    -(-len(table) * 8 // self.cs), table, self.file_size, corrupt,
                                    budget=1 << 62)
        return self.engine

    # -- the walk ------------------------------------------------------------------------------------

    async def check_l1(self, l1_offset: int, l1_size: int, frag: bool, active: bool) -> None:
        if l1_size == 0:
            return
        self.inc(l1_offset, l1_size * 8)
        if l1_offset + l1_size * 8 > _MAX_REQUEST:
            self.msg("ERROR: I/O error in check_refcounts_l1")
            self.res.check_errors += 1
            raise HostIOError("Input/output error")
        # never read more than the file holds, whatever the table claims
        avail = max(0, min(l1_size * 8, self.file_size - l1_offset))
        raw = await self.read(l1_offset, avail) if avail else b""
        for i in range(len(raw) // 8):
            e = struct.unpack_from(">Q", raw, i * 8)[0]
            if not e:
                continue
            if e & L.L1E_RESERVED:
                self.msg(f"ERROR found L1 entry with reserved bits set: {e:x}")
                self.corrupt()
            l2_off = e & L.L1E_OFFSET_MASK
            self.inc(l2_off, self.cs)
            if l2_off % self.cs:
                self.msg(f"ERROR l2_offset={l2_off:x}: Table is not cluster aligned; L1 entry corrupted")
                self.corrupt()
            await self.walk_l2(l2_off, frag, active)

    async def fix_l2_entry_by_zero(self, l2_off: int, words: array[int], i: int, active: bool) -> bool:
        """qemu's fix_l2_entry_by_zero: the entry becomes a zero cluster (its allocated subclusters zero).

        Returns True when fixed; an overlap with other metadata raises (the walk of this table stops).
        """
        ext = self.h.extended_l2
        if ext:
            bitmap = words[2 * i + 1]
            bitmap = (bitmap | bitmap << 32) & (L.SC_ALLOC_MASK << L.SC_ZERO_SHIFT)
            words[2 * i], words[2 * i + 1] = 0, bitmap
            entry = struct.pack(">QQ", 0, bitmap)
        else:
            words[i] = L.L2E_ZERO
            entry = struct.pack(">Q", L.L2E_ZERO)
        pos = l2_off + i * len(entry)
        await self.overlap_check(OL_ACTIVE_L2 if active else None, pos, len(entry))
        await self.hf.pwrite(pos, entry)
        await self.hf.fdatasync()
        self.res.corruptions -= 1
        self.res.corruptions_fixed += 1
        self.repaired_walk = True
        return True

    async def check_l2(self, l2_off: int, frag: bool, active: bool) -> None:
        h, cs, res = self.h, self.cs, self.res
        ext = h.extended_l2
        step = 2 if ext else 1
        n = h.l2_entries
        raw = await self.read(l2_off, n * 8 * step)
        has_data_file = bool(h.incompatible_features & L.INCOMPAT_DATA_FILE)
        if not ext and not has_data_file and self.mult == 1 and not self.quiet \
                and _plain_l2(raw, self.lanes):
            self.l2_walked = l2_off
            if self._count_plain(raw, frag):
                return
        words = array("Q", raw)
        words.byteswap()
        off_mask, size_shift = L.compressed_split(h.cluster_bits)
        next_contig = 0
        # The common entry (an aligned, uncompressed data cluster inside the file) is counted
        # inline: this loop runs once per cluster of the image.
        refs, bits, top, m = self.refs, h.cluster_bits, self.refcount_max, self.mult
        file_size = self.file_size
        nrefs = self.nb
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
                            refs, nrefs = self.refs, self.nb
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
                refs, nrefs = self.refs, self.nb
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
                    self.msg("ERROR: Unallocated cluster has non-zero subcluster allocation map")
                continue
            if (bitmap >> 32) & bitmap:
                self.corrupt()
                self.msg(f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation "
                         "bitmap")
            if offset % cs:
                self.corrupt()
                contains_data = bool(bitmap & L.SC_ALLOC_MASK) if ext else not (e & L.L2E_ZERO)
                if not contains_data:
                    fixing = bool(self.fix & FIX_ERRORS) and not self.quiet
                    self.msg(f"{'Repairing' if fixing else 'ERROR'} offset={offset:x}: Preallocated "
                             "cluster is not properly aligned; L2 entry corrupted.")
                    if fixing:
                        try:
                            await self.fix_l2_entry_by_zero(l2_off, words, i, active)
                        except _RepairIOError:
                            # qemu stops here: the check fails
                            self.msg("ERROR: Overlap check failed")
                            res.check_errors += 1
                            raise HostIOError("Input/output error") from None
                        except OSError as exc:
                            self.msg(f"ERROR: Failed to overwrite L2 table entry: {exc.strerror}")
                            res.check_errors += 1
                        else:
                            continue  # the cluster is no longer used
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
                refs, nrefs = self.refs, self.nb
        if allocated or fragmented:
            res.allocated_clusters = (res.allocated_clusters or 0) + allocated
            res.fragmented_clusters = (res.fragmented_clusters or 0) + fragmented

    def _count_plain(self, raw: bytes, frag: bool) -> bool:
        """Count the references of a plain L2 table (every entry unallocated or an aligned data cluster)
        a run of contiguous clusters at a time, at C speed, where the result is plainly the same as the
        entry-by-entry walk's; False leaves the table to that walk (a cluster past the end of the file,
        a refcount overflowing)."""
        bits = self.h.cluster_bits
        refs, top = self.refs, self.refcount_max
        runs: list[tuple[int, int]] = []
        capped = top < (1 << 8 * refs.itemsize) - 1  # else the array itself refuses an overflow
        one = _one_run(raw, bits)
        if one is not None:
            # the common case, a table written in order: one run, no per-entry list
            first, n, used = one
            if (first + n - 1) << bits >= self.file_size:
                return False
            ks: list[int] = []
            allocated, breaks_n = n, 0
        else:
            ks = _cluster_indexes(raw, bits)
            if not ks:
                return True
            if max(ks) << bits >= self.file_size:
                return False
            breaks = list(compress(range(1, len(ks)), map(operator.ne, map(operator.sub, ks[1:], ks[:-1]),
                                                                repeat(1))))
            allocated, breaks_n = len(ks), len(breaks)
        if one is None and breaks_n > len(ks) // 16:
            done_k = 0
            try:
                for k in ks:
                    refs[k] += 1
                    done_k += 1
                if capped and max(map(refs.__getitem__, ks)) > top:
                    raise OverflowError
            except OverflowError:
                for k in ks[:done_k]:
                    refs[k] -= 1
                return False
        else:
            if one is not None:
                runs.append((one[0], one[0] + one[1]))
            else:
                start = 0
                for end in [*breaks, len(ks)]:
                    runs.append((ks[start], ks[end - 1] + 1))
                    start = end
            done: list[tuple[int, int, array[int]]] = []
            for a, b in runs:
                seg = refs[a:b]
                if seg.tobytes().count(0) == (b - a) * seg.itemsize:
                    refs[a:b] = self.ones[:b - a]
                else:
                    try:
                        refs[a:b] = array(self.code, map(operator.add, seg, repeat(1)))
                        over = capped and max(refs[a:b]) > top
                    except OverflowError:
                        over = True
                    if over:
                        for a2, b2, old in reversed([*done, (a, b, seg)]):
                            refs[a2:b2] = old
                        return False
                done.append((a, b, seg))
        if frag:
            res = self.res
            res.allocated_clusters = (res.allocated_clusters or 0) + allocated
            res.fragmented_clusters = (res.fragmented_clusters or 0) + breaks_n
            if runs:
                if one is None:
                    used = len(raw) // 8 - array("Q", raw).count(0)
                self.plain_runs[self.l2_walked] = (runs, raw[0::8].count(0x80) == used)
        return True

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
        cs, bits = self.cs, self.h.cluster_bits
        for i, e in enumerate(self.reftable):
            if not e:
                continue  # most of a reftable is unused: nothing to check, and this loop runs per entry
            off = e & L.REFT_OFFSET_MASK
            cluster = off >> bits
            if e & REFT_RESERVED:
                self.msg(f"ERROR refcount table entry {i} has reserved bits set")
                self.res.corruptions += 1
                self.rebuild = True
                continue
            if off % cs:
                self.msg(f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted")
                self.res.corruptions += 1
                self.rebuild = True
                continue
            if cluster >= self.nb:
                self.res.corruptions += 1
                fixing = bool(self.fix & FIX_ERRORS)
                self.msg(f"{'Repairing' if fixing else 'ERROR'} refcount block {i} is outside image")
                if fixing:
                    # a refcount block past the end (a crash before it was written): grow the file
                    # over it; the block then reads as zeroes and the comparison finds what it lacks
                    why = None
                    if off > _INT64_MAX - cs:
                        why = "Invalid argument"
                    else:
                        try:
                            await self.hf.truncate(off + cs)
                        except (OSError, BlockError) as exc:
                            why = getattr(exc, "strerror", None) or str(exc).rsplit(": ", 1)[-1]
                            self.msg(f"{progname.name()}: Could not resize file: {why}")
                    if why is not None:
                        self.rebuild = True
                        self.msg(f"ERROR could not resize image: {why}")
                        continue
                    self.file_size = self.hf.size()
                    self.grow(-(-self.file_size // cs))
                    self.res.corruptions -= 1
                    self.res.corruptions_fixed += 1
                    self.inc(off, cs)
                continue
            self.inc(off, cs)
            rc = self.refs[cluster]
            if rc != 1:
                self.msg(f"ERROR refcount block {i} refcount={rc}")
                self.res.corruptions += 1
                self.rebuild = True

    async def calculate(self) -> None:
        """Count the expected refcounts (qemu's calculate_refcounts)."""
        h = self.h
        self.inc(0, self.cs)
        await self.walk_l1(h.l1_table_offset, h.l1_size, True, True)
        assert self.snaps is not None
        if h.incompatible_features & L.INCOMPAT_DATA_FILE and self.snaps.snapshots:
            self.msg(f"ERROR {len(self.snaps.snapshots)} snapshots in image with data file")
            self.res.corruptions += 1
        for sn in self.snaps.snapshots:
            if sn.l1_table_offset % self.cs:
                self.msg(f"ERROR snapshot {sn.id} ({sn.name}) l1_offset={_cx(sn.l1_table_offset)}: L1 table "
                         "is not cluster aligned; snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            if sn.l1_size > L.MAX_L1_BYTES // 8:
                self.msg(f"ERROR snapshot {sn.id} ({sn.name}) l1_size={_cx(sn.l1_size)}: L1 table is too "
                         "large; snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            await self.walk_l1(sn.l1_table_offset, sn.l1_size, False, False)
        await self.apply_pending()
        self.inc(self.snaps.offset, self.snaps.size)
        self.inc(h.refcount_table_offset, len(self.reftable) * 8)
        crypto = h.extension(L.EXT_CRYPTO) if h.crypt_method == L.CRYPT_LUKS else None
        if crypto is not None and len(crypto) == 16:
            # the LUKS header area the full disk encryption header extension points to
            self.inc(*struct.unpack(">QQ", crypto))
        await self.check_bitmaps()
        await self.check_refblocks()

    def reset_count(self) -> None:
        """Forget the counted references, for counting again after a rebuild."""
        self.refs = array(self.code, bytes(self.refs.itemsize * len(self.refs)))
        self.memo.clear()
        self.pending_l1.clear()
        self.pending_l2.clear()
        self.overflows = 0
        self.plain_runs.clear()
        self.blocks.clear()

    async def compare(self, res: CheckResult, fix: int) -> int:
        """Compare stored and expected refcounts (qemu's compare_refcounts); returns the highest used
        cluster. Mismatches that ``fix`` allows are repaired through the refcount engine."""
        refs, rbe = self.refs, self.rb_entries
        highest = 0
        nb = self.nb
        engine = None
        zeroed: list[int] = []
        order = self.h.refcount_order
        all_equal = True
        for bi in range(-(-nb // rbe)):
            base = bi * rbe
            count = min(rbe, nb - base)
            raw = await self.stored_raw(bi)
            if raw is None:
                all_equal = False
                for i in range(base, base + count):
                    self.msg(f"Can't get refcount for cluster {i}: Input/output error")
                    res.check_errors += 1
                continue
            expect = refs[base:base + count]
            if order >= 3:
                # compared as stored: big-endian bytes of the refcounts' own width
                if expect.itemsize > 1:
                    expect.byteswap()
                want = expect.tobytes()
                if (raw[:len(want)] if raw else bytes(len(want))) == want:
                    last = len(want.rstrip(b"\0"))
                    if last:
                        highest = max(highest, base + (last - 1) // expect.itemsize)
                    continue
                expect = refs[base:base + count]
            have = unpack_refcounts(raw, order)[:count] if raw else array("Q", bytes(8 * count))
            if order < 3 and have == array("Q", expect):
                for j in range(count - 1, -1, -1):
                    if have[j]:
                        highest = max(highest, base + j)
                        break
                continue
            all_equal = False
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
                elif r1 > r2 and fix & FIX_LEAKS:
                    fixed = True
                elif r1 < r2 and fix & FIX_ERRORS:
                    fixed = True
                word = "Repairing" if fixed else ("ERROR" if r1 < r2 else "Leaked")
                self.msg(f"{word} cluster {i} refcount={r1} reference={r2}")
                if fixed:
                    if engine is None:
                        engine = await self.refcount_engine()
                    if await engine.change(i * self.cs, r2 - r1) == 0:
                        zeroed.append(i)
                    if r1 > r2:
                        res.leaks_fixed += 1
                    else:
                        res.corruptions_fixed += 1
                    continue
                if r1 < r2:
                    res.corruptions += 1
                else:
                    res.leaks += 1
        # every stored refcount is as counted: the OFLAG_COPIED pass may look them up in the counted ones
        self.flat = refs if all_equal and engine is None else None
        if engine is not None:
            await engine.write_dirty()
            await self.hf.fdatasync()
            self.blocks.clear()
            # a cluster no longer used is discarded, as qemu's repair does (QCOW2_DISCARD_ALWAYS)
            for i in zeroed:
                try:
                    await self.hf.punch_hole(i * self.cs, self.cs)
                except OSError:
                    pass
        return highest

    # -- rebuilding the refcount structure ----------------------------------------------------------

    def alloc_imrt(self, count: int, first_free: list[int]) -> int:
        """qemu's alloc_clusters_imrt: the first run of ``count`` free clusters at or after
        ``first_free[0]`` in the counted refcounts (growing them past the end), given refcount 1."""
        refs = self.refs
        cluster = first_free[0]
        first_gap = True
        run = 0
        while cluster < self.nb and run < count:
            if not refs[cluster]:
                run += 1
                if first_gap:
                    first_free[0] = cluster
                    first_gap = False
            elif run:
                run = 0
            cluster += 1
        if run < count:
            self.grow(cluster + count - run)
            refs = self.refs
        cluster -= run
        for k in range(cluster, cluster + count):
            refs[k] = 1
        return cluster

    async def write_refblocks(self, first: int, end: int, table: list[int]) -> bool:
        """qemu's rebuild_refcounts_write_refblocks over clusters ``[first, end)``: a refcount block for
        every block of counted refcounts that has a used cluster, each in a free cluster; returns whether
        the new table had to grow."""
        rbe, cs = self.rb_entries, self.cs
        engine = await self.refcount_engine()
        first_free = [0]
        grown = False
        cluster = first
        while cluster < end:
            if not self.refs[cluster]:
                cluster += 1
                continue
            index = cluster // rbe
            start = index * rbe
            if index < len(table) and table[index]:
                boff = table[index]
            else:
                if first_free[0] < start:
                    first_free[0] = start
                bc = self.alloc_imrt(1, first_free)
                if bc >= end:
                    end = bc + 1  # the block holding this block's own refcount must be written too
                if index >= len(table):
                    entries = -(-(index + 1) * 8 // cs) * cs // 8
                    table.extend([0] * (entries - len(table)))
                    grown = True
                boff = bc * cs
                table[index] = boff
            try:
                await self.overlap_check(None, boff, cs)
            except _RepairIOError:
                raise _RepairIOError("ERROR writing refblock: Input/output error") from None
            values = self.refs[start:start + rbe]
            await engine.put_block(boff, pack_refcounts(values, self.h.refcount_order, cs))
            cluster = start + rbe
        return grown

    async def rebuild_structure(self) -> None:
        """qemu's rebuild_refcount_structure: new refcount blocks and table in free clusters (first fit),
        written before the header points to the new table; the old structure is then leaked."""
        cs = self.cs
        table: list[int] = []
        self.blocks.clear()
        grown = await self.write_refblocks(0, self.nb, table)
        assert grown
        rt_off = 0
        while grown:
            length = len(table) * 8
            clusters = -(-length // cs)
            if length > L.MAX_REFTABLE_BYTES:
                raise _RepairIOError("ERROR allocating reftable: File too large")
            rt_off = self.alloc_imrt(clusters, [0]) * cs
            grown = await self.write_refblocks(rt_off // cs, rt_off // cs + clusters, table)
        try:
            await self.overlap_check(None, rt_off, len(table) * 8)
        except _RepairIOError:
            raise _RepairIOError("ERROR writing reftable: Input/output error") from None
        engine = await self.refcount_engine()
        await engine.adopt_table(rt_off, array("Q", table))
        self.h.refcount_table_offset = rt_off
        self.h.refcount_table_clusters = -(-len(table) * 8 // cs)
        self.reftable = table
        self.overlap_map = None
        self.blocks.clear()
        self.engine = None  # the next repairs work on the new table, from what is on disk
        self.file_size = self.hf.size()

    # -- OFLAG_COPIED -----------------------------------------------------------------------------------

    async def check_copied(self, res: CheckResult, fix: int) -> None:
        """qemu's check_oflag_copied over the active L1 table as opened, with the refcounts as they are
        now (after any repair)."""
        h = self.h
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        has_data_file = bool(h.incompatible_features & L.INCOMPAT_DATA_FILE)
        ext = h.extended_l2
        step = 2 if ext else 1
        bits = h.cluster_bits
        walked: dict[int, tuple[list[str], int]] = {}
        code = REFCOUNT_CODES.get(h.refcount_order, "")
        rb = self.rb_entries
        cur_index = -1
        cur: array[int] | None = None
        for i, l1e in enumerate(self.l1):
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
                    self.l1[i] = l1e
                    # qemu writes the L1 sector holding the entry
                    first = i & ~63
                    sector = self.l1[first:min(first + 64, len(self.l1))]
                    pos = h.l1_table_offset + 8 * first
                    try:
                        await self.overlap_check(OL_ACTIVE_L1, pos, 8 * len(sector))
                        await self.hf.pwrite(pos, struct.pack(f">{len(sector)}Q", *sector))
                        await self.hf.fdatasync()
                    except (_RepairIOError, OSError):
                        res.check_errors += 1
                        raise HostIOError("Input/output error") from None
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            # an L2 table named again gives the same findings (none once it was repaired)
            seen = walked.get(l2_off)
            if seen is not None:
                for text in seen[0]:
                    self.msg(text)
                res.corruptions += seen[1]
                continue
            known = self.plain_runs.get(l2_off)
            if known is not None and known[1] and self.flat is not None \
                    and all(self.flat[a:b] == self.ones[:b - a] for a, b in known[0]):
                walked[l2_off] = ([], 0)  # every data cluster has OFLAG_COPIED and refcount 1
                continue
            rec: list[str] = []
            self.recorders.append(rec)
            before = res.corruptions
            l2raw = await self.read(l2_off, h.l2_entries * 8 * step)
            if not ext and not has_data_file and self._copied_plain(l2raw):
                self.recorders.pop()
                walked[l2_off] = ([], 0)
                continue
            words = array("Q", l2raw)
            words.byteswap()
            dirty = 0
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
                        dirty += 1
            self.recorders.pop()
            walked[l2_off] = ([], 0) if dirty else (rec, res.corruptions - before)
            if dirty:
                try:
                    await self.overlap_check(OL_ACTIVE_L2, l2_off, self.cs)
                except _RepairIOError:
                    self.msg("ERROR: Could not write L2 table; metadata overlap check failed: "
                             "Input/output error")
                    res.check_errors += 1
                    raise HostIOError("Input/output error") from None
                words.byteswap()
                await self.hf.pwrite(l2_off, words.tobytes())
                res.corruptions -= dirty
                res.corruptions_fixed += dirty
        if repair:
            await self.hf.fdatasync()


    def _copied_plain(self, raw: bytes) -> bool:
        """Whether a plain L2 table has OFLAG_COPIED on every data cluster and each of them has refcount 1
        (looked up, at C speed, in the refcounts the comparison kept); False leaves the table to the
        entry-by-entry check."""
        flat = self.flat
        if flat is None or not _plain_l2(raw, self.lanes):
            return False
        one = _one_run(raw, self.h.cluster_bits)
        if one is not None:
            first, n, used = one
            return raw[0::8].count(0x80) == used and first + n <= len(flat) \
                and flat[first:first + n] == self.ones[:n]
        used = len(raw) // 8 - array("Q", raw).count(0)
        if raw[0::8].count(0x80) != used:
            return False
        ks = _cluster_indexes(raw, self.h.cluster_bits)
        if not ks:
            return True
        if max(ks) >= len(flat):
            return False
        values = operator.itemgetter(*ks)(flat) if len(ks) > 1 else (flat[ks[0]],)
        return bool(values.count(1) == len(ks))


async def _open(hf: HostFile, fix: int) -> _State:
    file_size = hf.size()
    # qemu's open for a check ignores the snapshot table (the check reads it itself, see
    # _check_snapshot_table): the header is validated without it
    first = bytearray(await read_first_cluster(hf))
    nb_snapshots, snapshots_offset = struct.unpack_from(">IQ", first, 60) if len(first) >= 72 else (0, 0)
    if len(first) >= 72:
        struct.pack_into(">IQ", first, 60, 0, 0)
    h = parse_header(bytes(first), file_size, writable=not hf.read_only, check=True)
    h.nb_snapshots, h.snapshots_offset = nb_snapshots, snapshots_offset
    # a reftable past the end reads as zeroes (qemu's file layer zero-fills short reads), and the walk
    # then reports every cluster it finds as a corruption
    cs = h.cluster_size
    rt_bytes = h.refcount_table_clusters * cs
    raw = await hf.pread(h.refcount_table_offset, rt_bytes) if h.refcount_table_offset < file_size else b""
    raw += bytes(rt_bytes - len(raw))
    rt = array("Q", raw)
    rt.byteswap()
    l1: list[int] = []
    if h.l1_size and h.l1_table_offset < file_size:
        l1raw = await hf.pread(h.l1_table_offset, min(h.l1_size * 8, file_size - h.l1_table_offset))
        l1a = array("Q", l1raw[:len(l1raw) & ~7])
        l1a.byteswap()
        l1 = l1a.tolist()
    nb_clusters = -(-file_size // cs)
    res = CheckResult(total_clusters=-(-h.size // cs), allocated_clusters=0, fragmented_clusters=0,
                      compressed_clusters=0)
    st = _State(hf=hf, h=h, file_size=file_size, refs=array("Q"), nb=nb_clusters, res=res,
                refcount_max=(1 << h.refcount_bits) - 1, fix=fix, writable=not hf.read_only,
                reftable=rt.tolist(), snaps=SnapshotTable([], 0, 0), l1=l1)
    st.lanes = _lane_clear(h.cluster_bits)
    st.code = REFCOUNT_CODES.get(h.refcount_order, "B")
    st.ones = array(st.code, [1]) * h.l2_entries
    # qemu sizes its array in whole refcount blocks but compares only the file's clusters
    per = st.rb_entries
    st.refs = array(st.code, bytes(array(st.code).itemsize * (-(-nb_clusters // per) * per)))
    return st


async def _clear_unknown_autoclear(hf: HostFile, h: L.Header) -> None:
    """A writable open clears the autoclear bits it does not know, as qemu's qcow2_do_open does for every
    writable open, a repairing check's too (their features may not hold once we write)."""
    keep = h.autoclear_features & L.AUTOCLEAR_KNOWN
    if h.version >= 3 and keep != h.autoclear_features:
        h.autoclear_features = keep
        await hf.pwrite(88, struct.pack(">Q", keep))
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


async def _check_refcounts(st: _State, fix: int) -> None:
    """qemu's qcow2_check_refcounts, into ``st.res``."""
    await st.calculate()
    res = st.res
    pre = (res.corruptions, res.leaks, res.check_errors, res.corruptions_fixed, res.leaks_fixed)
    highest = await st.compare(res, 0)
    if st.rebuild and fix & FIX_ERRORS:
        old_corruptions, old_leaks = res.corruptions, res.leaks
        st.msg("Rebuilding refcount structure")
        try:
            await st.rebuild_structure()
        except _RepairIOError as exc:
            if exc.report:
                res.messages.append(f"{progname.name()}: {exc.report}")
            raise HostIOError("Input/output error") from None
        res.corruptions = res.leaks = 0
        st.rebuild = False
        st.reset_count()
        fix_saved, st.fix = st.fix, 0
        await st.calculate()
        st.fix = fix_saved
        fresh_leaks = 0
        if fix & FIX_LEAKS:
            scratch = CheckResult()
            highest = await st.compare(scratch, FIX_LEAKS)
            if st.rebuild:
                st.msg("ERROR rebuilt refcount structure is still broken")
            fresh_leaks = scratch.leaks
        if res.corruptions < old_corruptions:
            res.corruptions_fixed += old_corruptions - res.corruptions
        if res.leaks < old_leaks:
            res.leaks_fixed += old_leaks - res.leaks
        res.leaks += fresh_leaks
    elif fix:
        if st.rebuild:
            st.msg("ERROR need to rebuild refcount structures")
            res.check_errors += 1
            raise HostIOError("Input/output error")
        if res.leaks or res.corruptions:
            res.corruptions, res.leaks, res.check_errors, res.corruptions_fixed, res.leaks_fixed = pre
            highest = await st.compare(res, fix)
    await st.check_copied(res, fix)
    res.image_end_offset = (highest + 1) * st.cs


_SNAPSHOT_HEADER = 40  # the fixed part of a snapshot table entry (QCowSnapshotHeader)


class _SnapshotTableError(HostIOError):
    """The snapshot table cannot be read: the check stops, as qemu-img's does (with errno's words)."""


async def _check_snapshot_table(st: _State, fix: int) -> CheckResult:
    """qemu's qcow2_check_read_snapshot_table: read the snapshot table the header points to as qemu's
    check does (past the end of the file reads zeroes), repairing with -r all what it repairs (too many
    snapshots, too much extra data), and find the v3 entries without their 16 bytes of extra data."""
    sres = CheckResult()
    h, hf = st.h, st.hf
    nb, offset = h.nb_snapshots, h.snapshots_offset
    repair = bool(fix & FIX_ERRORS)
    reduced = dropped = 0
    if nb > L.MAX_SNAPSHOTS and repair:
        st.msg(f"Discarding {nb - L.MAX_SNAPSHOTS} overhanging snapshots")
        reduced += nb - L.MAX_SNAPSHOTS
        nb = L.MAX_SNAPSHOTS

    def fail(message: str, errno_text: str, *more: str) -> _SnapshotTableError:
        sres.check_errors += 1
        st.msg(f"{progname.name()}: {message}")
        for line in more:
            st.msg(line)
        err = _SnapshotTableError(errno_text)
        st.res.check_errors += sres.check_errors
        return err

    if nb > L.MAX_SNAPSHOTS:
        raise fail("ERROR snapshot table too large", "File too large",
                   f"You can force-remove all {nb - L.MAX_SNAPSHOTS} overhanging snapshots with "
                   "qemu-img check -r all")
    if _INT64_MAX - nb * _SNAPSHOT_HEADER < offset or offset % st.cs:
        raise fail("ERROR snapshot table offset invalid", "Invalid argument")
    snaps: list[Snapshot] = []
    pos = offset
    for i in range(nb):
        if pos - offset > MAX_TABLE_BYTES:
            raise fail("ERROR failed to read the snapshot table: Snapshot table too large",
                       "File too large")
        pos = (pos + 7) & ~7
        start = pos
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vm32,
         extra_len) = L.SNAPSHOT_FIXED.unpack(await st.read(pos, _SNAPSHOT_HEADER))
        pos += _SNAPSHOT_HEADER
        keep_extra = extra_len
        if extra_len > MAX_EXTRA_DATA:
            if not repair:
                raise fail(f"ERROR failed to read the snapshot table: Too much extra metadata in snapshot "
                           f"table entry {i}", "File too large",
                           "You can force-remove this extra metadata with qemu-img check -r all")
            st.msg(f"Discarding too much extra metadata in snapshot table entry {i} ({extra_len} > "
                   f"{MAX_EXTRA_DATA})")
            dropped += 1
            keep_extra = 24
        extra = await st.read(pos, min(24, extra_len))
        ext = extra + bytes(24 - len(extra))
        unknown = b""
        if extra_len > 24 and keep_extra > 24:
            unknown = await st.read(pos + 24, extra_len - 24)
        pos += extra_len
        ids = (await st.read(pos, id_len)).decode("utf-8", "replace")
        pos += id_len
        name = (await st.read(pos, name_len)).decode("utf-8", "replace")
        pos += name_len
        if pos - offset > MAX_TABLE_BYTES:
            if not repair:
                raise fail("ERROR failed to read the snapshot table: Snapshot table is too big",
                           "File too large",
                           f"You can force-remove all {nb - i} overhanging snapshots with qemu-img check "
                           "-r all")
            st.msg(f"Discarding {nb - i} overhanging snapshots (snapshot table is too big)")
            reduced += nb - i
            pos = start
            break
        vm_state = struct.unpack_from(">Q", ext, 0)[0] if extra_len >= 8 else vm32
        disk_size = struct.unpack_from(">Q", ext, 8)[0] if extra_len >= 16 else None
        ic = struct.unpack_from(">Q", ext, 16)[0] if extra_len >= 24 else NO_ICOUNT
        snaps.append(Snapshot(ids, name, l1_off, l1_size, dsec, dnsec, vmclock, vm_state, disk_size,
                              None if ic == NO_ICOUNT else ic, extra[:keep_extra] + unknown))
    st.snaps = SnapshotTable(snaps, offset, pos - offset if snaps else 0)
    sres.corruptions += reduced + dropped
    if reduced:
        # the header's count first, as qemu does: the refcount check then frees the dropped entries
        h.nb_snapshots = len(snaps)
        await hf.pwrite(60, struct.pack(">I", len(snaps)))
        await hf.fdatasync()
        sres.corruptions_fixed += reduced
        sres.corruptions -= reduced
    if h.version >= 3:
        for i, sn in enumerate(snaps):
            if len(sn.extra_data) < 16:
                sres.corruptions += 1
                st.msg(f"{'Repairing' if repair else 'ERROR'} snapshot table entry {i} is incomplete")
    return sres


async def _first_free(engine: Refcounts, n: int, cs: int) -> int:
    """qemu's cluster allocator as a check leaves it: the first run of ``n`` clusters with refcount 0 from
    the start of the image (past the refcount table's reach, every cluster is free)."""
    c = run = 0
    while run < n:
        run = 0 if await engine.get(c * cs) else run + 1
        c += 1
    return (c - n) * cs


async def _fix_snapshot_table(st: _State, sres: CheckResult, fix: int) -> None:
    """qemu's qcow2_check_fix_snapshot_table: with -r all, a table with broken entries is written anew
    (complete entries; a missing disk size is the image's) in newly allocated clusters, after qemu's
    overlap check; the header then points to it and the old table's clusters are freed."""
    if not sres.corruptions or not fix & FIX_ERRORS:
        return
    assert st.snaps is not None
    h, hf, cs = st.h, st.hf, st.cs
    snaps = st.snaps.snapshots
    for sn in snaps:
        if sn.disk_size is None:
            sn.disk_size = h.size
    engine = await st.refcount_engine()
    data = encode_snapshot_table(snaps) if snaps else b""
    new_off = 0
    try:
        if data:
            need = -(-len(data) // cs)
            new_off = await _first_free(engine, need, cs)
            for k in range(need):
                await engine.change(new_off + k * cs, 1)
            await engine.write_dirty()
            await hf.fdatasync()
            await st.overlap_check(None, new_off, len(data))
            await hf.pwrite(new_off, data)
            await hf.fdatasync()
    except (_RepairIOError, OSError, BlockError) as exc:
        why = "Input/output error" if isinstance(exc, _RepairIOError) else str(exc)
        st.msg(f"ERROR failed to update snapshot table: {why}")
        sres.check_errors += 1
        raise HostIOError(why) from None
    await hf.pwrite(60, struct.pack(">IQ", len(snaps), new_off))
    await hf.fdatasync()
    old_off, old_size = st.snaps.offset, st.snaps.size
    h.nb_snapshots, h.snapshots_offset = len(snaps), new_off
    st.snaps = SnapshotTable(snaps, new_off, len(data))
    st.overlap_map = None
    # free the old table's clusters; qemu discards those no longer used
    for c in range(old_off // cs, -(-(old_off + old_size) // cs)) if old_size else ():
        blk, _bi = await engine.block_for(c * cs) if c * cs < _MAX_REQUEST else (None, 0)
        if blk is None:
            # qemu's update_refcount has no block to lower here: it allocates an empty one (first free
            # cluster, hooked into the table) and gives up
            ri = (c * cs) >> (engine.geo.refblock_bits + st.h.cluster_bits)
            if ri < len(engine.reftable):
                boff = await _first_free(engine, 1, cs)
                await engine.change(boff, 1)
                await engine.write_dirty()
                await hf.pwrite(boff, bytes(cs))
                await hf.fdatasync()
                await hf.pwrite(engine.reftable_offset + 8 * ri, struct.pack(">Q", boff))
                await hf.fdatasync()
                engine.reftable[ri] = boff
            st.msg("qcow2_free_clusters failed: Resource temporarily unavailable")
            break
        if await engine.get(c * cs) == 0:
            st.msg("qcow2_free_clusters failed: Invalid argument")
            break
        if await engine.change(c * cs, -1) == 0:
            try:
                await hf.punch_hole(c * cs, cs)
            except OSError:
                pass
    await engine.write_dirty()
    await hf.fdatasync()
    sres.corruptions_fixed += sres.corruptions
    sres.corruptions = 0


async def check_qcow2(hf: HostFile, ctx: OpenContext, repair: str | None) -> CheckResult:
    """Check (and with ``repair`` "leaks" or "all", repair) the qcow2 image open as ``hf``."""
    if repair not in (None, "leaks", "all"):
        raise InvalidArgumentError(f"Invalid repair mode '{repair}'")
    if repair is not None and hf.read_only:
        raise InvalidArgumentError("Cannot repair an image opened read-only")
    fix = 0 if repair is None else FIX_LEAKS | (FIX_ERRORS if repair == "all" else 0)
    try:
        try:
            st = await _open(hf, fix)
            if st.h.crypt_method:
                # qemu-img opens the image with its key first: a missing or wrong secret fails the open
                from .crypto import open_crypto

                await open_crypto(hf, st.h, ctx.options, io=True, read_only=True)
        except BlockError as exc:
            # qemu-img could not open the image: its words, not a failed check
            exc.open_failure = True  # type: ignore[attr-defined]
            raise
        if st.writable:
            await _clear_unknown_autoclear(hf, st.h)
        try:
            snap_res = await _check_snapshot_table(st, fix)
            await _check_refcounts(st, fix)
            res = st.res
            await _fix_snapshot_table(st, snap_res, fix)
        except HostIOError as exc:
            # qemu-img gives up ("Check failed: Input/output error"); the messages so far travel with
            # the error as its ``check_result``
            exc.check_result = st.res  # type: ignore[attr-defined]
            raise
        for name in ("corruptions", "leaks", "check_errors", "corruptions_fixed", "leaks_fixed"):
            setattr(res, name, getattr(res, name) + getattr(snap_res, name))
        if fix and not res.check_errors and not res.corruptions:
            await _mark_clean(hf, st.h)
        return res
    except BlockError:
        raise
    except (struct.error, ValueError, IndexError, OverflowError) as exc:
        raise ImageFormatError(f"Could not check image: {exc}") from None
