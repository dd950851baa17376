"""Hosted sparse vmdk extents (KDMV): header, grain directory and tables, reads, allocating writes.

Safety follows the project's qcow2 model, in small: grain tables live on the event-loop thread; one metadata
lock serialises table loads with table updates; an in-flight registry makes a second write to a grain that is
being allocated wait and look again. A new grain's data is written before its grain-table entries (table,
then redundant table), and a new grain table before the directory entries that point to it, so a process
that dies between the steps only leaks space. Across a power cut the page cache may reach the disk in any
order, so grain-table and directory entries stay in memory (their tables pinned in the cache) until a
write-back: one fdatasync makes the new grains and zeroed tables durable, then the tables and directory
entries that point to them are written. ``flush`` does a write-back before its own fdatasync, and so does
an allocation once the pinned tables exceed the cache budget; a cut can lose unflushed writes, never
leave an entry pointing at a grain the disk never got.
"""

from __future__ import annotations

import asyncio
import struct
import sys
from array import array
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from ...errors import CorruptImageError, ImageFormatError, NoSpaceError, ReadOnlyError, UnsupportedError
from ...extent import Extent
from ...hostio import HostFile
from .spec import MAGIC
from .stream import SECTOR, grain_record, parse_footer, read_compressed_grain

FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
COMPRESSION_DEFLATE = 1
GD_AT_END = 0xFFFFFFFFFFFFFFFF
GTE_ZEROED = 1

# Bounds against hostile headers: 1 GiB grains are qemu's limit, but a grain is also an allocation buffer.
MAX_GRAIN_SECTORS = 32768          # 16 MiB
MAX_GTES_PER_GT = 512
MAX_GD_ENTRIES = 32 * 1024 * 1024
# Per image, over all its extents (a descriptor may list the same big extent file thousands of times).
MAX_GD_ENTRIES_TOTAL = 16 * 1024 * 1024
GT_CACHE_TABLES = 1024             # per image: 2 MiB of 512-entry tables
GRAIN_CACHE_BYTES = 2 * 1024 * 1024  # per image: inflated compressed grains
MAX_PENDING_GRAINS = 64            # stream-optimized grains being assembled from partial writes

_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")

# (guest offset, view) -> fill the view from the backing chain, or zeroes without one
FillFn = Callable[[int, memoryview], Awaitable[None]]


@dataclass(slots=True)
class SparseHeader:
    """The 512-byte hosted sparse extent header (all sector values in 512-byte sectors)."""

    version: int
    flags: int
    capacity: int
    grain_sectors: int
    desc_offset: int
    desc_size: int
    gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    overhead: int
    unclean: int = 0
    check_bytes: bytes = b"\n \r\n"
    compress_algorithm: int = 0

    @classmethod
    def parse(cls, buf: bytes, name: str) -> SparseHeader:
        if len(buf) < _HEADER.size or buf[:4] != MAGIC:
            raise ImageFormatError(f"'{name}' is not in VMDK format (bad magic)")
        (_m, version, flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd, overhead, unclean,
         check, algo) = _HEADER.unpack_from(buf, 0)
        return cls(version, flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd, overhead, unclean,
                   check, algo)

    def pack(self) -> bytes:
        head = _HEADER.pack(MAGIC, self.version, self.flags, self.capacity, self.grain_sectors,
                            self.desc_offset, self.desc_size, self.gtes_per_gt, self.rgd_offset,
                            self.gd_offset, self.overhead, self.unclean, self.check_bytes,
                            self.compress_algorithm)
        return head + bytes(SECTOR - len(head))

    @property
    def compressed(self) -> bool:
        return self.compress_algorithm == COMPRESSION_DEFLATE


class GrainCache:
    """Inflated compressed grains of one image, least recently used first out, bounded in bytes."""

    def __init__(self, budget: int = GRAIN_CACHE_BYTES) -> None:
        self.budget = budget
        self.used = 0
        self._items: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def get(self, key: tuple[int, int]) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key: tuple[int, int], data: bytes) -> None:
        if len(data) > self.budget or key in self._items:
            return
        self._items[key] = data
        self.used += len(data)
        while self.used > self.budget:
            _k, old = self._items.popitem(last=False)
            self.used -= len(old)


@dataclass(slots=True)
class ImageLimits:
    """Memory budgets shared by all sparse extents of one image."""

    gd_entries_left: int = MAX_GD_ENTRIES_TOTAL
    gt_tables_per_extent: int = GT_CACHE_TABLES
    grains: GrainCache = field(default_factory=GrainCache)

    @classmethod
    def for_extents(cls, count: int) -> ImageLimits:
        return cls(gt_tables_per_extent=max(4, GT_CACHE_TABLES // max(1, count)))


def _runs(flags: bytearray, value: int) -> list[tuple[int, int]]:
    """Index runs ``[a, b)`` where every byte of ``flags`` equals ``value``."""
    out: list[tuple[int, int]] = []
    i, n = 0, len(flags)
    other = 1 - value
    while i < n:
        a = flags.find(value, i)
        if a < 0:
            break
        b = flags.find(other, a)
        b = n if b < 0 else b
        out.append((a, b))
        i = b
    return out


def _le32_table(raw: bytes | bytearray) -> array[int]:
    table = array("I")
    table.frombytes(raw)
    if sys.byteorder == "big":
        table.byteswap()
    return table


class SparseExtent:
    """One KDMV sparse extent mapped at guest byte ``start``."""

    kind = "SPARSE"

    def __init__(self, hf: HostFile, header: SparseHeader, *, start: int, name: str, writable: bool,
                 gd: array[int], rgd: array[int] | None, file_size: int, limits: ImageLimits,
                 footer: bool = False) -> None:
        self.hf = hf
        self.header = header
        self.start = start
        self.name = name
        self.length = header.capacity * SECTOR
        self.grain_bytes = header.grain_sectors * SECTOR
        self.gtes = header.gtes_per_gt
        self.compressed = header.compressed
        self.has_markers = bool(header.flags & FLAG_MARKERS)
        self.zero_grain = bool(header.flags & FLAG_ZERO_GRAIN)
        # Stream-optimized grains can only be appended whole, after the last one; a footer must stay last.
        self.writable = writable and (not self.compressed or (self.has_markers and not footer))
        self.gd = gd
        self.rgd = rgd
        self._gt_bytes = self.gtes * 4
        # Grains are placed grain-aligned from the end of the file, as VMware and qemu do.
        gs = header.grain_sectors
        file_sectors = -(-file_size // SECTOR)
        self._next_sector = max(-(-file_sectors // gs) * gs, header.overhead)
        self._file_size = file_size
        self._cache: OrderedDict[int, array[int]] = OrderedDict()
        self._meta = asyncio.Lock()
        self._inflight: dict[int, asyncio.Event] = {}
        self._limits = limits
        # stream-optimized: grain -> (data, one flag byte per sector written so far)
        self._pending: dict[int, tuple[bytearray, bytearray]] = {}
        self._fill: FillFn | None = None
        self._has_backing = False
        # grain tables changed in memory only, and directory entries of new tables not yet in the file
        self._unwritten: set[int] = set()
        self._unwritten_gd: set[int] = set()

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    async def open(cls, hf: HostFile, *, start: int, name: str, writable: bool,
                   header: SparseHeader | None = None, limits: ImageLimits | None = None) -> SparseExtent:
        file_size = hf.size()
        if header is None:
            header = SparseHeader.parse(await hf.pread(0, SECTOR), name)
        footer = header.gd_offset == GD_AT_END
        if footer:
            if file_size < 3 * SECTOR + SECTOR:
                raise ImageFormatError("Invalid footer")
            header = SparseHeader.parse(parse_footer(await hf.pread(file_size - 3 * SECTOR, 3 * SECTOR)),
                                        name)
        cls._validate(header, name, file_size, writable)
        per_gt = header.gtes_per_gt * header.grain_sectors
        gd_entries = -(-header.capacity // per_gt)
        limits = limits or ImageLimits()
        if gd_entries > limits.gd_entries_left:
            raise ImageFormatError("vmdk grain directories of this image are too big in total")
        limits.gd_entries_left -= gd_entries
        gd_raw = await hf.pread(header.gd_offset * SECTOR, gd_entries * 4)
        gd = _le32_table(gd_raw)
        rgd: array[int] | None = None
        if header.flags & FLAG_RGD and header.rgd_offset:
            if header.rgd_offset * SECTOR + gd_entries * 4 > file_size:
                raise ImageFormatError(f"Could not read l1 backup table from extent '{name}': "
                                       "it lies beyond the end of the file")
            rgd = _le32_table(await hf.pread(header.rgd_offset * SECTOR, gd_entries * 4))
        ext = cls(hf, header, start=start, name=name, writable=writable, gd=gd, rgd=rgd,
                  file_size=file_size, limits=limits, footer=footer)
        return ext

    @staticmethod
    def _validate(h: SparseHeader, name: str, file_size: int, writable: bool) -> None:
        if h.version < 1 or h.version > 3:
            raise UnsupportedError(f"Unsupported VMDK version {h.version}")
        if h.version == 3 and writable and not h.compressed:
            raise ImageFormatError("VMDK version 3 must be read only")
        if h.compress_algorithm not in (0, COMPRESSION_DEFLATE):
            raise UnsupportedError(f"Unsupported VMDK compression algorithm {h.compress_algorithm}")
        if h.gtes_per_gt > MAX_GTES_PER_GT:
            raise ImageFormatError("L2 table size too big")
        if h.gtes_per_gt == 0 or h.grain_sectors == 0:
            raise ImageFormatError("L1 entry size is invalid")
        if h.grain_sectors > MAX_GRAIN_SECTORS:
            raise ImageFormatError("Invalid granularity, image may be corrupt")
        gd_entries = -(-h.capacity // (h.gtes_per_gt * h.grain_sectors))
        # qemu's own bound first (a huge capacity is "L1 size too big" there, iotest 059's afl9)
        if gd_entries > MAX_GD_ENTRIES:
            raise ImageFormatError("L1 size too big")
        if h.capacity == 0 or h.capacity >= 1 << 41:
            raise ImageFormatError(f"'{name}': invalid VMDK capacity {h.capacity} sectors")
        if h.overhead > file_size // SECTOR + (1 if file_size % SECTOR else 0):
            raise ImageFormatError(f"File truncated, expecting at least {h.overhead * SECTOR} bytes")
        if h.gd_offset == 0 or h.gd_offset * SECTOR + gd_entries * 4 > file_size:
            raise ImageFormatError(f"Could not read l1 table from extent '{name}': "
                                   "it lies beyond the end of the file")

    # -- table access ----------------------------------------------------------------------------
    def _gt_cached(self, gt_idx: int) -> array[int] | None:
        gt = self._cache.get(gt_idx)
        if gt is not None:
            self._cache.move_to_end(gt_idx)
        return gt

    async def _load_gt_locked(self, gt_idx: int) -> array[int]:
        gt = self._gt_cached(gt_idx)
        if gt is not None:
            return gt
        sector = self.gd[gt_idx]
        if sector * SECTOR + self._gt_bytes > self.hf.size():
            raise CorruptImageError(f"vmdk grain table {gt_idx} at sector {sector} lies beyond the end of "
                                    f"'{self.name}'")
        gt = _le32_table(await self.hf.pread(sector * SECTOR, self._gt_bytes))
        self._cache[gt_idx] = gt
        self._evict()
        return gt

    def _evict(self) -> None:
        """Drop the least recently used tables over budget, never one whose changes are not in the file,
        nor the one just used (its caller holds it)."""
        excess = len(self._cache) - self._limits.gt_tables_per_extent
        if excess <= 0:
            return
        older = list(self._cache)[:-1]
        for idx in [i for i in older if i not in self._unwritten and i not in self._unwritten_gd]:
            if excess <= 0:
                break
            del self._cache[idx]
            excess -= 1

    async def gte(self, grain: int) -> int:
        """The grain-table entry of ``grain`` (0 unallocated, 1 zeroed when enabled, else a sector)."""
        gt_idx, i = divmod(grain, self.gtes)
        if self.gd[gt_idx] == 0:
            return 0
        gt = self._gt_cached(gt_idx)
        if gt is None:
            async with self._meta:
                if self.gd[gt_idx] == 0:
                    return 0
                gt = await self._load_gt_locked(gt_idx)
        return gt[i]

    def gte_nowait(self, grain: int) -> int | None:
        gt_idx, i = divmod(grain, self.gtes)
        if self.gd[gt_idx] == 0:
            return 0
        gt = self._cache.get(gt_idx)
        return None if gt is None else gt[i]

    def _is_zeroed(self, gte: int) -> bool:
        return gte == GTE_ZEROED and self.zero_grain

    # -- reads -----------------------------------------------------------------------------------
    async def readinto(self, rel: int, view: memoryview, fill: FillFn) -> None:
        gb = self.grain_bytes
        n = len(view)
        pos = 0
        run_host = run_pos = run_len = 0
        while pos < n:
            grain, off_in = divmod(rel + pos, gb)
            take = min(gb - off_in, n - pos)
            if grain in self._pending:
                await self._read_pending(grain, off_in, view[pos:pos + take], fill)
                pos += take
                continue
            gte = await self.gte(grain)
            if gte > 1 or (gte == 1 and not self.zero_grain):
                if not self.compressed:
                    host = gte * SECTOR + off_in
                    if run_len and run_host + run_len == host and run_pos + run_len == pos:
                        run_len += take
                    else:
                        if run_len:
                            await self.hf.readinto(run_host, view[run_pos:run_pos + run_len])
                        run_host, run_pos, run_len = host, pos, take
                    pos += take
                    continue
                data = await self._grain_data(grain, gte)
                piece = data[off_in:off_in + take]
                view[pos:pos + len(piece)] = piece
                if len(piece) < take:
                    view[pos + len(piece):pos + take] = bytes(take - len(piece))
            elif gte == 0:
                await fill(self.start + rel + pos, view[pos:pos + take])
            else:
                view[pos:pos + take] = bytes(take)
            pos += take
        if run_len:
            await self.hf.readinto(run_host, view[run_pos:run_pos + run_len])

    async def _grain_data(self, grain: int, gte: int) -> bytes:
        key = (self.start, grain)
        data = self._limits.grains.get(key)
        if data is None:
            data = await read_compressed_grain(self.hf, gte * SECTOR, self.grain_bytes,
                                               has_marker=self.has_markers)
            self._limits.grains.put(key, data)
        return data

    def read_nowait(self, rel: int, view: memoryview) -> bool:
        """Serve a read inside one cached, allocated, uncompressed grain from the page cache."""
        if self.compressed:
            return False
        grain, off_in = divmod(rel, self.grain_bytes)
        if off_in + len(view) > self.grain_bytes:
            return False
        gte = self.gte_nowait(grain)
        if gte is None or gte <= 1:
            return False
        return self.hf.read_nowait(gte * SECTOR + off_in, view) == len(view)

    # -- writes ----------------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if not self.writable:
            if self.compressed:
                raise UnsupportedError("this streamOptimized vmdk image cannot be written (it ends with a "
                                       "footer or has no grain markers)")
            raise ReadOnlyError(f"vmdk extent '{self.name}' is read-only")

    def _data_sector(self, gte: int) -> int:
        if gte < self.header.overhead or gte >= 1 << 32:
            raise CorruptImageError(f"vmdk grain table entry {gte} of '{self.name}' points into metadata")
        return gte

    async def write(self, rel: int, data: memoryview, fill: FillFn, *, has_backing: bool) -> None:
        self._check_writable()
        gb = self.grain_bytes
        pos = 0
        n = len(data)
        while pos < n:
            grain, off_in = divmod(rel + pos, gb)
            take = min(gb - off_in, n - pos)
            if self.compressed:
                await self._stream_write(grain, off_in, data[pos:pos + take], fill, has_backing)
            else:
                await self._write_grain(grain, off_in, data[pos:pos + take], fill, has_backing)
            pos += take

    async def _write_grain(self, grain: int, off_in: int, chunk: memoryview, fill: FillFn,
                           has_backing: bool) -> None:
        while True:
            gte = await self.gte(grain)
            if gte > 1 or (gte == 1 and not self.zero_grain):
                await self.hf.pwrite(self._data_sector(gte) * SECTOR + off_in, chunk)
                return
            pending = self._inflight.get(grain)
            if pending is not None:
                await pending.wait()
                continue
            done = asyncio.Event()
            self._inflight[grain] = done
            try:
                await self._allocate(grain, off_in, chunk, fill, from_backing=gte == 0 and has_backing)
            finally:
                del self._inflight[grain]
                done.set()
            return

    def _take_sectors(self, count: int) -> int:
        sector = self._next_sector
        if sector + count >= 1 << 32:
            raise NoSpaceError(f"vmdk extent '{self.name}' is full (grain offsets exceed 32 bits)")
        self._next_sector = sector + count
        return sector

    async def _allocate(self, grain: int, off_in: int, chunk: memoryview, fill: FillFn,
                        from_backing: bool) -> None:
        gb = self.grain_bytes
        buf = bytearray(gb)
        if from_backing and (off_in > 0 or len(chunk) < gb):
            await fill(self.start + grain * gb, memoryview(buf))
        buf[off_in:off_in + len(chunk)] = chunk
        sector = self._take_sectors(self.header.grain_sectors)
        await self.hf.pwrite(sector * SECTOR, buf)
        await self._set_gte(grain, sector)

    async def _set_gte(self, grain: int, value: int) -> None:
        gt_idx, i = divmod(grain, self.gtes)
        async with self._meta:
            if self.gd[gt_idx] == 0:
                await self._allocate_gt(gt_idx)
            gt = await self._load_gt_locked(gt_idx)
            gt[i] = value
            self._unwritten.add(gt_idx)
            if len(self._unwritten) + len(self._unwritten_gd) > self._limits.gt_tables_per_extent:
                await self._write_back_locked()

    async def write_back(self) -> None:
        """Put the grain tables and directory entries changed in memory into the file, after their grains."""
        async with self._meta:
            await self._write_back_locked()

    async def _write_back_locked(self) -> None:
        if not self._unwritten and not self._unwritten_gd:
            return
        # the grains and the zeroed new tables first: an entry never reaches the disk before what it names
        await self.hf.fdatasync()
        for gt_idx in sorted(self._unwritten):
            raw = self._cache[gt_idx].tobytes() if sys.byteorder == "little" else \
                struct.pack(f"<{self.gtes}I", *self._cache[gt_idx])
            await self.hf.pwrite(self.gd[gt_idx] * SECTOR, raw)
            if self.rgd is not None and self.rgd[gt_idx]:
                await self.hf.pwrite(self.rgd[gt_idx] * SECTOR, raw)
            self._unwritten.discard(gt_idx)
        for gt_idx in sorted(self._unwritten_gd):
            if self.rgd is not None:
                await self.hf.pwrite(self.header.rgd_offset * SECTOR + gt_idx * 4,
                                     struct.pack("<I", self.rgd[gt_idx]))
            await self.hf.pwrite(self.header.gd_offset * SECTOR + gt_idx * 4,
                                 struct.pack("<I", self.gd[gt_idx]))
            self._unwritten_gd.discard(gt_idx)
        self._evict()

    async def _allocate_gt(self, gt_idx: int) -> None:
        gt_sectors = -(-self._gt_bytes // SECTOR)
        copies = 2 if self.rgd is not None else 1
        gs = self.header.grain_sectors
        span = -(-(gt_sectors * copies) // gs) * gs
        base = self._take_sectors(span)
        await self.hf.pwrite(base * SECTOR, bytes(span * SECTOR))
        # the directory entries follow at the next write-back, once the zeroed tables are durable
        if self.rgd is not None:
            self.rgd[gt_idx] = base + gt_sectors
        self.gd[gt_idx] = base
        self._cache[gt_idx] = array("I", bytes(self._gt_bytes))
        self._unwritten_gd.add(gt_idx)

    async def write_zeroes(self, rel: int, length: int, fill: FillFn, *, has_backing: bool,
                           may_trim: bool = False) -> None:
        self._check_writable()
        gb = self.grain_bytes
        pos = 0
        zeros = memoryview(bytes(gb))
        while pos < length:
            grain, off_in = divmod(rel + pos, gb)
            take = min(gb - off_in, length - pos)
            gte = await self.gte(grain)
            whole = off_in == 0 and (take == gb or rel + pos + take == self.length)
            if self.compressed:
                if gte != 0 or has_backing or grain in self._pending or grain in self._inflight:
                    await self._stream_write(grain, off_in, zeros[:take], fill, has_backing)
            elif self._is_zeroed(gte) or (gte == 0 and not has_backing and grain not in self._inflight):
                pass  # already reads as zeroes
            elif whole and self.zero_grain:
                while (pending := self._inflight.get(grain)) is not None:
                    await pending.wait()
                await self._set_gte(grain, GTE_ZEROED)
            else:
                await self._write_grain(grain, off_in, zeros[:take], fill, has_backing)
            pos += take

    # -- stream-optimized appends ----------------------------------------------------------------
    def _grain_len(self, grain: int) -> int:
        return min(self.grain_bytes, self.length - grain * self.grain_bytes)

    async def _stream_write(self, grain: int, off_in: int, chunk: memoryview, fill: FillFn,
                            has_backing: bool) -> None:
        """Assemble a grain from (sector-aligned) writes; compress and append it once complete."""
        self._fill, self._has_backing = fill, has_backing
        end = off_in + len(chunk)
        glen = self._grain_len(grain)
        if off_in % SECTOR or (end % SECTOR and end != glen):
            raise UnsupportedError("streamOptimized vmdk images take only sector-aligned writes")
        while (busy := self._inflight.get(grain)) is not None:
            await busy.wait()
        if await self.gte(grain) != 0:
            raise UnsupportedError("Could not write to allocated cluster for streamOptimized")
        entry = self._pending.get(grain)
        if entry is None:
            entry = (bytearray(glen), bytearray(-(-glen // SECTOR)))
            self._pending[grain] = entry
        buf, covered = entry
        buf[off_in:end] = chunk
        first, last = off_in // SECTOR, -(-end // SECTOR)
        covered[first:last] = b"\1" * (last - first)
        if covered.find(0) < 0:
            await self._finish_grain(grain)
        elif len(self._pending) > MAX_PENDING_GRAINS:
            await self._finish_grain(next(iter(self._pending)))

    async def _read_pending(self, grain: int, off_in: int, view: memoryview, fill: FillFn) -> None:
        buf, covered = self._pending[grain]
        await fill(self.start + grain * self.grain_bytes + off_in, view)
        for a, b in _runs(covered, 1):
            lo, hi = max(a * SECTOR, off_in), min(b * SECTOR, off_in + len(view), len(buf))
            if lo < hi:
                view[lo - off_in:hi - off_in] = buf[lo:hi]

    async def _finish_grain(self, grain: int) -> None:
        buf, covered = self._pending[grain]
        done = asyncio.Event()
        self._inflight[grain] = done
        try:
            base = self.start + grain * self.grain_bytes
            for a, b in _runs(covered, 0):
                if self._fill is not None:
                    await self._fill(base + a * SECTOR, memoryview(buf)[a * SECTOR:b * SECTOR])
            if any(buf) or self._has_backing:
                record = await grain_record(base // SECTOR, bytes(buf))
                sector = self._take_sectors(len(record) // SECTOR)
                await self.hf.pwrite(sector * SECTOR, record)
                await self._set_gte(grain, sector)
        finally:
            del self._pending[grain]
            del self._inflight[grain]
            done.set()

    async def finish_pending(self) -> None:
        """Append every grain still being assembled (unwritten sectors keep what they showed)."""
        while self._pending:
            await self._finish_grain(next(iter(self._pending)))

    # -- status ----------------------------------------------------------------------------------
    async def extents(self, rel: int, length: int) -> AsyncIterator[Extent]:
        """Runs relative to the extent; unallocated runs come with ``present=False``."""
        gb = self.grain_bytes
        span = gb * self.gtes
        pos = rel
        end = rel + length
        while pos < end:
            grain, off_in = divmod(pos, gb)
            if self.gd[grain // self.gtes] == 0:
                take = min((pos // span + 1) * span, end) - pos
                yield Extent(pos, take, data=False, zero=True, present=False)
                pos += take
                continue
            gte = await self.gte(grain)
            kind = self._kind(gte)
            # Extend the run over following grains of the same table in the same state (and, for
            # data, at following host offsets), without an Extent object per grain.
            gt_idx = grain // self.gtes
            gt = self._gt_cached(gt_idx)
            last = min((gt_idx + 1) * self.gtes, -(-end // gb)) - 1
            g = grain
            if gt is not None:
                base = gt_idx * self.gtes
                while g < last:
                    nxt = gt[g + 1 - base]
                    if self._kind(nxt) != kind:
                        break
                    if kind == 3 and nxt != gte + (g + 1 - grain) * self.header.grain_sectors:
                        break
                    g += 1
            take = min((g + 1) * gb, end) - pos
            if kind == 0:
                yield Extent(pos, take, data=False, zero=True, present=False)
            elif kind == 1:
                yield Extent(pos, take, data=False, zero=True)
            elif kind == 2:
                yield Extent(pos, take, data=True, zero=False, compressed=True)
            else:
                yield Extent(pos, take, data=True, zero=False, offset=gte * SECTOR + off_in)
            pos += take

    def _kind(self, gte: int) -> int:
        """0 unallocated, 1 zeroed, 2 compressed data, 3 data."""
        if gte == 0:
            return 0
        if self._is_zeroed(gte):
            return 1
        return 2 if self.compressed else 3

    def info(self, filename: str, fmt: str) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.compressed:
            out["compressed"] = True
        out.update({"virtual-size": self.length, "filename": filename, "cluster-size": self.grain_bytes,
                    "format": fmt})
        return out

    async def flush(self) -> None:
        await self.finish_pending()
        await self.write_back()
        await self.hf.fdatasync()
