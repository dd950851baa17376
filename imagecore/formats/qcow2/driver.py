"""The qcow2 block driver: reads, writes, zeroes, discard, extents over a backing chain, crash-safe.

All metadata (header, L1, the L2 and refcount caches, the allocator, the in-flight registry) is touched on
the event-loop thread only. A metadata lock guards lookups that load tables and every allocation; it is
released while guest data moves. Modifying requests claim their guest clusters in the in-flight registry, so
two writes racing to allocate one cluster run one after the other, the second one looking again.
"""

from __future__ import annotations

import asyncio
import io
import re
import zlib
from array import array
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ...driver import BlockDriver, Capabilities, OpenContext
from ...errors import (
    CorruptImageError,
    ImageFormatError,
    InvalidArgumentError,
    ReadOnlyError,
    SnapshotNotFoundError,
    UnsupportedError,
)
from ...extent import Extent
from ...hostio import INLINE_READ_MAX, HostFile, check_range, run_blocking
from .alloc import InFlight, Refcounts
from .cache import DEFAULT_BUDGET, TableCache
from .headio import read_header
from .layout import (
    AUTOCLEAR_BITMAPS,
    AUTOCLEAR_DATA_FILE_RAW,
    AUTOCLEAR_KNOWN,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    COMPRESSION_ZSTD,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    L1E_COPIED,
    L1E_OFFSET_MASK,
    L2E_COMPRESSED,
    L2E_COPIED,
    L2E_OFFSET_MASK,
    L2E_ZERO,
    MAX_L1_BYTES,
    SC_ALLOC_MASK,
    SC_ZERO_SHIFT,
    SUBCLUSTERS,
    Header,
)
from .tables import (
    COMPRESSED,
    NORMAL,
    UNALLOC,
    ZERO,
    Geometry,
    bitmap_is_valid,
    classify,
    compressed_entry,
    compressed_location,
    decode_table,
    encode_entry,
    encode_table,
    make_geometry,
    subcluster_runs,
)

if TYPE_CHECKING:
    from .bitmaps import Bitmap
    from .snapshot import Snapshot

_HDR_INCOMPAT = 72
# the first byte of a non-zero L2 entry (any non-zero byte: entries are 8-byte aligned in the buffer)
_NONZERO = re.compile(rb"[^\x00]")
_HDR_AUTOCLEAR = 88

# A run of the guest address space as a mapping walk reports it: (kind, guest offset, length, host).
# host is the byte offset of the data for NORMAL, the host cluster (or 0) for ZERO, and the raw L2 entry
# for COMPRESSED.
Run = tuple[int, int, int, int]


async def open_qcow2(hf: HostFile, ctx: OpenContext) -> Qcow2Driver:
    """Open a qcow2 image on ``hf``, with its backing chain and data file."""
    h = await read_header(hf)
    if h.incompatible_features & INCOMPAT_DIRTY and not h.incompatible_features & INCOMPAT_CORRUPT \
            and not (ctx.read_only or hf.read_only):
        await _repair_dirty(hf, ctx, h)
        h = await read_header(hf)
    drv = Qcow2Driver(hf, h, ctx)
    try:
        await drv._open()
    except BaseException:
        await drv._close_children()
        raise
    return drv


async def _repair_dirty(hf: HostFile, ctx: OpenContext, h: Header) -> None:
    """A dirty image (lazy refcounts, not closed cleanly) has stale refcounts: rebuild them, as qemu does."""
    from .check import check_qcow2

    res = await check_qcow2(hf, ctx, "all")
    if res.corruptions or res.check_errors:
        raise CorruptImageError(f"qcow2: could not repair the refcounts of dirty image '{ctx.path}' "
                                f"({res.corruptions} corruptions remain); run 'check -r all'")
    h.incompatible_features &= ~INCOMPAT_DIRTY
    await hf.fdatasync()
    await hf.pwrite(_HDR_INCOMPAT, h.incompatible_features.to_bytes(8, "big"))
    await hf.fdatasync()


class Qcow2Driver(BlockDriver):
    """An open qcow2 image."""

    format_name = "qcow2"

    def __init__(self, hf: HostFile, header: Header, ctx: OpenContext) -> None:
        self.hf = hf
        self.header = header
        self.ctx = ctx
        self.filename = ctx.path
        self.size = header.size
        self.v3 = header.version >= 3
        self.read_only = ctx.read_only or hf.read_only
        self.geo: Geometry = make_geometry(header.cluster_bits, header.extended_l2, header.refcount_order)
        self.cs = header.cluster_size
        self.cbits = header.cluster_bits
        self.ext_l2 = header.extended_l2
        self.sc_size = self.cs // SUBCLUSTERS
        self.l1: array[int] = array("Q")
        budget = int(ctx.options.get("cache_size", DEFAULT_BUDGET))
        self.budget = budget
        self.l2cache: TableCache[array[int]] = TableCache(self.cs, budget * 3 // 4)
        self.refs: Refcounts | None = None
        self.lock = asyncio.Lock()
        self.inflight = InFlight()
        self.backing: BlockDriver | None = None
        self.data_hf: HostFile = hf
        self.external_data = False
        self.data_file_raw = bool(header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)
        self.snapshots: list[Snapshot] = []
        self.bitmaps: list[Bitmap] = []
        self.snapshot_loaded: Snapshot | None = None
        # where the next compressed cluster's bytes go (0: start a new cluster), as qemu's free_byte_offset
        self._free_byte_offset = 0
        self.lazy_refcounts = bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS)
        self._dirty_set = False
        self._decompressed: OrderedDict[int, bytes] = OrderedDict()
        self._corrupt_reported = False
        self._closed = False
        self.caps = Capabilities(writable=not self.read_only, zero=True, fast_zero=True, trim=True,
                                 flush=True, fua=True, extents=True, multi_conn=True,
                                 min_block=1, pref_block=max(4096, min(self.cs, 65536)))

    # -- opening -----------------------------------------------------------------------------------
    async def _open(self) -> None:
        h = self.header
        if not self.read_only:
            if h.incompatible_features & INCOMPAT_CORRUPT:
                raise CorruptImageError("qcow2: Image is corrupt; cannot be opened read/write")

        fsize = self.hf.size()
        l1_bytes = h.l1_size * 8
        if l1_bytes > MAX_L1_BYTES:
            raise ImageFormatError("Active L1 table too large")
        if l1_bytes and h.l1_table_offset + l1_bytes > fsize:
            raise ImageFormatError("Active L1 table extends past the end of the file")
        buf = bytearray(l1_bytes)
        if l1_bytes:
            await self.hf.readinto(h.l1_table_offset, memoryview(buf))
        self.l1 = decode_table(buf)
        self.refs = await Refcounts.load(self.hf, self.geo, h.refcount_table_offset,
                                         h.refcount_table_clusters, self._corrupt, self.budget // 4)
        if h.nb_snapshots:
            from .snapshot import read_snapshot_table  # most images have none: not loaded for them

            self.snapshots = (await read_snapshot_table(self.hf, h)).snapshots
        wanted = self.ctx.options.get("snapshot")
        if wanted is not None:
            await self._load_snapshot(wanted)
        from .bitmaps import read_directory

        # read before a read-write open invalidates them below: info describes the file as it was
        self.bitmaps = await read_directory(self.hf, h)
        if h.incompatible_features & INCOMPAT_DATA_FILE:
            name = h.data_file
            assert name is not None
            self.data_hf = self.ctx.opener.open_data_file(name, self.ctx)
            self.external_data = True
        if h.backing_file:
            self.backing = await self.ctx.opener.open_backing(h.backing_file, h.backing_format, self.ctx)
        if not self.read_only and self.v3:
            keep = h.autoclear_features & AUTOCLEAR_KNOWN & ~AUTOCLEAR_BITMAPS
            if keep != h.autoclear_features:
                h.autoclear_features = keep
                await self.hf.pwrite(_HDR_AUTOCLEAR, keep.to_bytes(8, "big"))
                await self.hf.fdatasync()

    async def _load_snapshot(self, wanted: dict[str, str]) -> None:
        """Show an internal snapshot instead of the active image, read-only (qemu's snapshot_load_tmp).

        ``wanted`` has ``id``, ``name`` or both (all given must match), or ``id-or-name`` (the id first,
        then the name, as a bare ``-l NAME`` is looked up).
        """
        if not self.read_only:
            raise InvalidArgumentError("a snapshot can be opened read-only only")
        found = None
        if "id-or-name" in wanted:
            key = wanted["id-or-name"]
            found = next((sn for sn in self.snapshots if sn.id == key), None) or next(
                (sn for sn in self.snapshots if sn.name == key), None)
        else:
            keys = [(k, v) for k, v in wanted.items() if k in ("id", "name")]
            found = next((sn for sn in self.snapshots if all(getattr(sn, k) == v for k, v in keys)), None)
        if found is None:
            raise SnapshotNotFoundError("Can't find snapshot")
        if found.l1_size * 8 > MAX_L1_BYTES:
            raise ImageFormatError("Snapshot L1 table too large")
        if found.l1_size and found.l1_table_offset + found.l1_size * 8 > self.hf.size():
            raise ImageFormatError("Snapshot L1 table extends past the end of the file")
        buf = bytearray(found.l1_size * 8)
        if buf:
            await self.hf.readinto(found.l1_table_offset, memoryview(buf))
        self.l1 = decode_table(buf)
        if found.disk_size is not None:
            self.size = found.disk_size
        self.snapshot_loaded = found

    # -- description -------------------------------------------------------------------------------
    def snapshot_info(self) -> list[dict[str, Any]]:
        if not self.snapshots:
            return []
        from .snapshot import snapshot_info_json

        return [snapshot_info_json(sn) for sn in self.snapshots]

    def format_specific(self) -> dict[str, Any] | None:
        h = self.header
        data: dict[str, Any] = {"compat": "1.1" if self.v3 else "0.10",
                                "compression-type": COMPRESSION_NAMES.get(h.compression_type, "zlib")}
        if self.v3:
            data["lazy-refcounts"] = self.lazy_refcounts
        if self.bitmaps:
            data["bitmaps"] = [b.info() for b in self.bitmaps]
        data["refcount-bits"] = h.refcount_bits
        if self.external_data:
            data["data-file"] = h.data_file
            data["data-file-raw"] = self.data_file_raw
        if self.v3:
            data["corrupt"] = bool(h.incompatible_features & INCOMPAT_CORRUPT)
            data["extended-l2"] = self.ext_l2
        return {"type": "qcow2", "data": data}

    def cluster_size(self) -> int | None:
        return self.cs

    def is_dirty(self) -> bool:
        return bool(self.header.incompatible_features & INCOMPAT_DIRTY)

    def backing_filename(self) -> str | None:
        return self.header.backing_file

    def backing_format(self) -> str | None:
        return self.header.backing_format

    def data_host_file(self) -> HostFile | None:
        return self.hf

    # -- table access ------------------------------------------------------------------------------
    async def _corrupt(self, msg: str) -> CorruptImageError:
        """Mark the image corrupt (when writable), drop to read-only, and build the error to raise."""
        if not self.read_only and self.v3 and not self._corrupt_reported:
            self._corrupt_reported = True
            self.header.incompatible_features |= INCOMPAT_CORRUPT
            try:
                await self.hf.pwrite(_HDR_INCOMPAT, self.header.incompatible_features.to_bytes(8, "big"))
                await self.hf.fdatasync()
            except Exception:  # best effort: the error raised after is what matters
                pass
        self.read_only = True
        self.caps.writable = False
        return CorruptImageError(f"qcow2: Marking image as corrupt: {msg}; further corruption events "
                                 "will be suppressed")

    @property
    def _end(self) -> int:
        assert self.refs is not None
        return self.refs.end

    def _metadata_at(self, host: int, *, l2: bool = True) -> str | None:
        """Which metadata (if any that is cheap to know) occupies the host cluster at ``host``."""
        assert self.refs is not None
        h = self.header
        cs = self.cs
        if host < cs:
            return "header"
        if h.l1_table_offset <= host < h.l1_table_offset + max(len(self.l1) * 8, 1):
            return "active L1 table"
        refs = self.refs
        if refs.reftable_offset <= host < refs.reftable_offset + refs.reftable_clusters * cs:
            return "refcount table"
        if l2 and host in self.l2cache:
            return "L2 table"
        if host in refs.cache:
            return "refcount block"
        return None

    def l1_table(self) -> array[int]:
        """The active L1 table (native integers, flags included)."""
        return self.l1

    async def read_l2(self, l2_offset: int) -> array[int]:
        """The L2 table at a host offset (through the cache)."""
        t = self.l2cache.get(l2_offset)
        if t is not None:
            return t
        if l2_offset % self.cs or l2_offset + self.cs > max(self._end, self.hf.size()):
            raise await self._corrupt(f"L2 table offset {l2_offset:#x} unaligned or past the end of the file")
        buf = bytearray(self.cs)
        await self.hf.readinto(l2_offset, memoryview(buf))
        got = self.l2cache.get(l2_offset)
        if got is not None:
            return got
        t = decode_table(buf)
        self.l2cache.put(l2_offset, t)
        return t

    async def refcount(self, host: int) -> int:
        """The refcount of the host cluster at ``host``."""
        assert self.refs is not None
        return await self.refs.get(host)

    def refcount_table(self) -> array[int]:
        assert self.refs is not None
        return self.refs.reftable

    async def _l2_for(self, l1i: int) -> array[int] | None:
        if l1i >= len(self.l1):
            return None
        off = self.l1[l1i] & L1E_OFFSET_MASK
        if not off:
            return None
        t = self.l2cache.get(off)
        return t if t is not None else await self.read_l2(off)

    # -- mapping -----------------------------------------------------------------------------------
    def _runs_in_table(self, l2: array[int] | None, offset: int, end: int, out: list[Run]) -> None:
        """Append runs for ``[offset, end)``, which lies within one L2 table's coverage."""
        cs = self.cs
        cbits = self.cbits
        mask = (1 << self.geo.l2_bits) - 1
        if l2 is None:
            _append(out, UNALLOC, offset, end - offset, 0)
            return
        if not self.ext_l2:
            self._standard_runs(l2, offset, end, out)
            return
        pos = offset
        sc = self.sc_size
        while pos < end:
            idx = (pos >> cbits) & mask
            cstart = pos & ~(cs - 1)
            cend = min(cstart + cs, end)
            e = l2[2 * idx]
            bm = l2[2 * idx + 1]
            if e & L2E_COMPRESSED:
                out.append((COMPRESSED, pos, cend - pos, e))
                pos = cend
                continue
            host = e & L2E_OFFSET_MASK
            if host & (cs - 1):
                raise _BadEntry(f"L2 entry {e:#x} points to an unaligned cluster")
            for first, count, kind in subcluster_runs(bm):
                rs = max(cstart + first * sc, pos)
                re_ = min(cstart + (first + count) * sc, cend)
                if rs >= re_:
                    continue
                if kind == NORMAL:
                    _append(out, NORMAL, rs, re_ - rs, host + (rs - cstart))
                else:
                    _append(out, kind, rs, re_ - rs, host + (rs - cstart) if host else 0)
            pos = cend

    def _standard_runs(self, l2: array[int], offset: int, end: int, out: list[Run]) -> None:
        """``_runs_in_table`` for standard L2 entries: one pass that merges as it goes (this loop is map's,
        block status's and convert's cost on a large image, so it stays flat)."""
        cbits = self.cbits
        cs = self.cs
        first = offset >> cbits
        last = (end - 1) >> cbits
        i0 = first & ((1 << self.geo.l2_bits) - 1)
        v3 = self.v3
        ext_data = self.external_data
        runs: list[list[int]] = []  # [kind, first guest byte, length, host] in whole clusters
        rk = -1
        rhost = rlen = 0
        g = first << cbits
        entries = l2[i0:i0 + last - first + 1]
        raw = memoryview(entries).cast("B")  # zero entries are zero in either byte order
        n = len(entries)
        i = 0
        while i < n:
            e = entries[i]
            if not e:
                # A run of unallocated clusters: found with one C-level search instead of a Python step
                # per entry, since the holes of a sparse image are most of its L2 entries.
                m = _NONZERO.search(raw, i * 8)
                nxt = n if m is None else m.start() >> 3
                span = (nxt - i) << cbits
                if rk == UNALLOC:
                    rlen += span
                    runs[-1][2] = rlen
                else:
                    rk, rhost, rlen = UNALLOC, 0, span
                    runs.append([UNALLOC, g, span, 0])
                g += span
                i = nxt
                continue
            i += 1
            if e & L2E_COMPRESSED:
                runs.append([COMPRESSED, g, cs, e])
                rk = -1
                g += cs
                continue
            host = e & L2E_OFFSET_MASK
            if host & (cs - 1):
                raise _BadEntry(f"L2 entry {e:#x} points to an unaligned cluster")
            if v3 and e & L2E_ZERO:
                kind = ZERO
            elif host or (ext_data and e & L2E_COPIED):
                kind = NORMAL  # offset 0 is a real offset in an external data file
            else:
                kind = UNALLOC
            # the same rule as _append: data continues at the next host cluster; zeroes and holes merge
            # when neither has a host offset or the host offsets continue
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
        for kind, rg, n, host in runs:
            if kind == COMPRESSED:
                out.append((COMPRESSED, rg, n, host))
            else:
                _append(out, kind, rg, n, host)

    async def _map(self, offset: int, length: int) -> list[Run]:
        out: list[Run] = []
        span = self.cs << self.geo.l2_bits
        pos = offset
        end = offset + length
        while pos < end:
            tend = min((pos // span + 1) * span, end)
            l2 = await self._l2_for(pos // span)
            if self.ext_l2 and l2 is not None:
                await self._validate_ext_l2(l2, pos, tend)
            try:
                self._runs_in_table(l2, pos, tend, out)
            except _BadEntry as exc:
                raise await self._corrupt(str(exc)) from None
            pos = tend
        if not self.external_data:
            end_ = self._end
            for kind, _g, n, host in out:
                if kind == NORMAL and host + n > end_:
                    raise await self._corrupt(f"data cluster offset {host:#x} is past the end of the file")
        return out

    async def _validate_ext_l2(self, l2: array[int], pos: int, end: int) -> None:
        mask = (1 << self.geo.l2_bits) - 1
        for c in range(pos >> self.cbits, ((end - 1) >> self.cbits) + 1):
            idx = c & mask
            e, bm = l2[2 * idx], l2[2 * idx + 1]
            if e & L2E_COMPRESSED:
                continue
            if not bitmap_is_valid(bm) or (bm & 0xFFFFFFFF and not e & L2E_OFFSET_MASK):
                raise await self._corrupt(f"invalid subcluster bitmap for guest cluster {c}")

    def _map_nowait(self, offset: int, length: int) -> list[Run] | None:
        span = self.cs << self.geo.l2_bits
        out: list[Run] = []
        pos = offset
        end = offset + length
        while pos < end:
            tend = min((pos // span + 1) * span, end)
            l1i = pos // span
            l2: array[int] | None = None
            if l1i < len(self.l1):
                off = self.l1[l1i] & L1E_OFFSET_MASK
                if off:
                    l2 = self.l2cache.peek(off)
                    if l2 is None:
                        return None
            if self.ext_l2:
                return None
            try:
                self._runs_in_table(l2, pos, tend, out)
            except _BadEntry:
                return None
            pos = tend
        return out

    # -- reads -------------------------------------------------------------------------------------
    def readinto_nowait(self, offset: int, buf: memoryview) -> bool:
        runs = self._map_nowait(offset, len(buf))
        if runs is None:
            return False
        base = offset
        end = self._end
        for kind, g, n, host in runs:
            view = buf[g - base:g - base + n]
            if kind == NORMAL:
                if not self.external_data and host + n > end:
                    return False
                if self.data_hf.read_nowait(host, view) != n:
                    return False
            elif kind == ZERO:
                view[:] = bytes(n)
            elif kind == UNALLOC:
                if not self._backing_nowait(g, view):
                    return False
            else:
                return False
        return True

    def _backing_nowait(self, g: int, view: memoryview) -> bool:
        b = self.backing
        if b is None:
            view[:] = bytes(len(view))
            return True
        bsize = b.size
        n = len(view)
        if g >= bsize:
            view[:] = bytes(n)
            return True
        inside = min(n, bsize - g)
        if not b.readinto_nowait(g, view[:inside]):
            return False
        if inside < n:
            view[inside:] = bytes(n - inside)
        return True

    async def _read_backing(self, g: int, view: memoryview) -> None:
        b = self.backing
        n = len(view)
        if b is None or g >= b.size:
            view[:] = bytes(n)
            return
        inside = min(n, b.size - g)
        if not b.readinto_nowait(g, view[:inside]):
            await b.readinto(g, view[:inside])
        if inside < n:
            view[inside:] = bytes(n - inside)

    async def readinto(self, offset: int, buf: memoryview) -> None:
        check_range(offset, len(buf), self.size)
        # Large copies go to the I/O pool (HostFile.readinto) rather than stalling the loop inline.
        if len(buf) <= INLINE_READ_MAX and self.readinto_nowait(offset, buf):
            return
        async with self.lock:
            runs = await self._map(offset, len(buf))
        await self._read_runs(runs, offset, buf)

    async def _read_runs(self, runs: list[Run], base: int, buf: memoryview) -> None:
        for kind, g, n, host in runs:
            view = buf[g - base:g - base + n]
            if kind == NORMAL:
                await self.data_hf.readinto(host, view)
            elif kind == ZERO:
                view[:] = bytes(n)
            elif kind == UNALLOC:
                await self._read_backing(g, view)
            else:
                data = await self._decompress(host)
                within = g & (self.cs - 1)
                view[:] = data[within:within + n]

    async def _decompress(self, entry: int) -> bytes:
        got = self._decompressed.get(entry)
        if got is not None:
            self._decompressed.move_to_end(entry)
            return got
        loc = compressed_location(entry, self.cbits)
        if loc.offset == 0 or loc.offset >= max(self._end, self.data_hf.size()) or loc.size <= 0 \
                or loc.size > 2 * self.cs + 512:
            raise await self._corrupt(f"compressed cluster at {loc.offset:#x} is invalid")
        raw = await self.data_hf.pread(loc.offset, loc.size)
        zstd = self.header.compression_type == COMPRESSION_ZSTD
        try:
            data = await run_blocking(_inflate_zstd if zstd else _inflate_zlib, raw, self.cs)
        except Exception as exc:  # zlib.error, zstd.ZstdError and friends
            raise ImageFormatError(f"Could not decompress cluster at {loc.offset:#x}: {exc}") from None
        if len(data) != self.cs:
            raise ImageFormatError(f"Compressed cluster at {loc.offset:#x} decompresses to "
                                   f"{len(data)} bytes, not {self.cs}")
        self._decompressed[entry] = data
        if len(self._decompressed) > 8:
            self._decompressed.popitem(last=False)
        return data

    async def cache(self, offset: int, length: int) -> None:
        buf = bytearray(min(length, 1 << 20))
        pos, end = offset, offset + length
        while pos < end:
            n = min(len(buf), end - pos)
            await self.readinto(pos, memoryview(buf)[:n])
            pos += n

    # -- extents -----------------------------------------------------------------------------------
    async def extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        span = self.cs << self.geo.l2_bits
        pos, end = offset, offset + length
        while pos < end:
            tend = min((pos // span + 1) * span, end)
            async with self.lock:
                runs = await self._map(pos, tend - pos)
            for kind, g, n, host in runs:
                if kind == NORMAL:
                    for e in self._host_holes(g, n, host):
                        yield e
                elif kind == COMPRESSED:
                    yield Extent(g, n, True, False, 0, True, None, True)
                elif kind == ZERO:
                    yield Extent(g, n, False, True, 0, True, host or None)
                elif host and self.backing is None:
                    # unallocated subclusters of an allocated cluster: qemu reports the host offset
                    yield Extent(g, n, False, True, 0, False, host)
                else:
                    async for e in self._backing_extents(g, n):
                        yield e
            pos = tend

    def _host_holes(self, g: int, n: int, host: int) -> list[Extent]:
        """Split allocated data by the host file's holes, which read as zeroes (as qemu's block status)."""
        hf = self.data_hf
        out: list[Extent] = []
        pos, end = host, host + n
        while pos < end:
            d = min(hf.seek_data(pos), end)
            if d > pos:
                out.append(Extent(g + pos - host, d - pos, True, True, 0, True, pos))
                pos = d
                if pos >= end:
                    break
            h = min(max(hf.seek_hole(pos), pos + 1), end)
            out.append(Extent(g + pos - host, h - pos, True, False, 0, True, pos))
            pos = h
        return out

    async def _backing_extents(self, g: int, n: int) -> AsyncIterator[Extent]:
        b = self.backing
        if b is None or g >= b.size:
            yield Extent(g, n, False, True, 0, False, None)
            return
        inside = min(n, b.size - g)
        async for e in b.extents(g, inside):
            e.depth += 1
            yield e
        if inside < n:
            yield Extent(g + inside, n - inside, False, True, 0, False, None)

    # -- writes ------------------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.read_only or not self.caps.writable:
            if self._corrupt_reported or self.header.incompatible_features & INCOMPAT_CORRUPT:
                raise CorruptImageError("qcow2: image is marked corrupt and was dropped to read-only")
            raise ReadOnlyError(f"'{self.filename}' is open read-only")

    async def _claim(self, start: int, end: int) -> int:
        c0 = start >> self.cbits
        c1 = ((end - 1) >> self.cbits) + 1 if end > start else c0 + 1
        while True:
            ev = self.inflight.overlapping(c0, c1)
            if ev is None:
                return self.inflight.add(c0, c1)
            await ev.wait()

    async def _before_modify(self, offset: int, length: int) -> None:
        check_range(offset, length, self.size)
        self._check_writable()
        if self.lazy_refcounts and not self._dirty_set and self.v3:
            async with self.lock:
                if not self._dirty_set:
                    self.header.incompatible_features |= INCOMPAT_DIRTY
                    await self.hf.pwrite(_HDR_INCOMPAT, self.header.incompatible_features.to_bytes(8, "big"))
                    await self.hf.fdatasync()
                    self._dirty_set = True

    async def _l2_for_write(self, l1i: int) -> tuple[int, array[int]]:
        """The L2 table for ``l1i``, allocated or copied (when shared with a snapshot) as needed."""
        assert self.refs is not None
        if l1i >= len(self.l1):
            raise await self._corrupt(f"guest offset beyond the L1 table (index {l1i})")
        e = self.l1[l1i]
        off = e & L1E_OFFSET_MASK
        if off:
            what = self._metadata_at(off, l2=False)
            if what:
                raise await self._corrupt(f"L2 table at {off:#x} overlaps the {what}")
        if off and e & L1E_COPIED:
            return off, await self.read_l2(off)
        if off:
            old = await self.read_l2(off)
            if await self.refs.get(off) == 1:
                # not shared after all: only the flag was missing
                await self.hf.pwrite(self.header.l1_table_offset + 8 * l1i, encode_entry(off | L1E_COPIED))
                self.l1[l1i] = off | L1E_COPIED
                return off, old
            table = array("Q", old)
            for i in range(0, len(table), self.geo.l2_entry_words):
                # the entries are now referenced by two tables: none may claim refcount 1
                table[i] &= ~L2E_COPIED
        else:
            table = array("Q", bytes(self.cs))
        new = await self.refs.allocate(1)
        await self.refs.write_dirty()
        await self.hf.pwrite(new, encode_table(table))
        await self.hf.fdatasync()
        self.l2cache.put(new, table)
        # the disk first: a cancellation in between can then only leak the new table
        await self.hf.pwrite(self.header.l1_table_offset + 8 * l1i, encode_entry(new | L1E_COPIED))
        self.l1[l1i] = new | L1E_COPIED
        if off:
            self.l2cache.drop(off)
            self.refs.defer_free(off, 1)
        return new, table

    def _free_entry(self, e: int) -> None:
        """Drop the reference a standard L2 entry holds (deferred until the entry's change is on disk)."""
        assert self.refs is not None
        if self.external_data:
            return
        if e & L2E_COMPRESSED:
            loc = compressed_location(e, self.cbits)
            first = loc.offset & ~(self.cs - 1)
            last = (loc.offset + loc.size - 1) & ~(self.cs - 1)
            self.refs.defer_free(first, (last - first) // self.cs + 1)
            return
        host = e & L2E_OFFSET_MASK
        if host:
            self.refs.defer_free(host, 1)

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        await self._before_modify(offset, len(data))
        if len(data):
            mv = memoryview(data).cast("B")
            span = self.cs << self.geo.l2_bits
            pos, end = offset, offset + len(mv)
            # one L2 table at a time keeps the planning simple and bounded
            while pos < end:
                tend = min((pos // span + 1) * span, end, pos + (8 << 20))
                await self._write_part(pos, mv[pos - offset:tend - offset])
                pos = tend
        await self._after_modify(fua)

    async def _write_part(self, offset: int, data: memoryview) -> None:
        assert self.refs is not None
        cs = self.cs
        token = await self._claim(offset, offset + len(data))
        try:
            end = offset + len(data)
            c_first = offset & ~(cs - 1)
            c_end = (end + cs - 1) & ~(cs - 1)
            l1i = offset >> (self.cbits + self.geo.l2_bits)
            mask = (1 << self.geo.l2_bits) - 1
            async with self.lock:
                self._check_writable()
                _l2off, l2 = await self._l2_for_write(l1i)
                inplace: list[tuple[int, int]] = []  # (guest cluster, host cluster)
                fresh: list[tuple[int, int]] = []  # (guest cluster, old entry)
                w = self.geo.l2_entry_words
                for gc in range(c_first, c_end, cs):
                    idx = ((gc >> self.cbits) & mask) * w
                    e = l2[idx]
                    kind, host = classify(e, self.v3 and not self.ext_l2)
                    if kind == UNALLOC and self.external_data and e & L2E_COPIED:
                        kind = NORMAL
                    if self.ext_l2 and kind == UNALLOC and host:
                        kind = NORMAL  # allocated host cluster with unallocated subclusters
                    if kind == NORMAL and host & (cs - 1):
                        raise await self._corrupt(f"L2 entry {e:#x} points to an unaligned cluster")
                    if self.ext_l2 and kind == NORMAL and l2[idx + 1] & SC_ALLOC_MASK != SC_ALLOC_MASK:
                        fresh.append((gc, e))  # copied whole into a fully allocated cluster
                        continue
                    if kind == NORMAL and not e & L2E_COPIED and not self.external_data:
                        rc = await self.refs.get(host)
                        if rc == 0:
                            raise await self._corrupt(f"cluster at {host:#x} is in use but has refcount 0")
                        if rc == 1:
                            e = l2[idx] = e | L2E_COPIED  # only the flag was missing
                            self.l2cache.mark_dirty(_l2off, l2)
                    if kind == NORMAL and e & L2E_COPIED:
                        if not self.external_data:
                            if host + cs > self._end:
                                raise await self._corrupt(f"data cluster offset {host:#x} is past the "
                                                          "end of the file")
                            what = self._metadata_at(host)
                            if what:
                                raise await self._corrupt(f"data cluster at {host:#x} overlaps the {what}")
                        inplace.append((gc, host))
                    else:
                        fresh.append((gc, e))
                # new clusters: one contiguous allocation per run of guest clusters
                new_hosts: dict[int, int] = {}
                i = 0
                while i < len(fresh):
                    j = i + 1
                    while j < len(fresh) and fresh[j][0] == fresh[j - 1][0] + cs:
                        j += 1
                    if self.external_data:
                        base = fresh[i][0]  # data clusters live at their guest offset
                    else:
                        base = await self.refs.allocate(j - i)
                    for k in range(i, j):
                        new_hosts[fresh[k][0]] = base + (k - i) * cs
                    i = j
                old_runs: dict[int, list[Run]] = {}
                for gc, _e in fresh:
                    lo, hi = max(gc, offset), min(gc + cs, end)
                    if lo > gc or hi < gc + cs:
                        old_runs[gc] = await self._map(gc, cs)
            # guest data I/O, without the lock
            writes: list[tuple[int, list[memoryview | bytes]]] = []
            for gc, host in inplace:
                lo, hi = max(gc, offset), min(gc + cs, end)
                _add_write(writes, host + (lo - gc), data[lo - offset:hi - offset])
            for gc, _e in fresh:
                lo, hi = max(gc, offset), min(gc + cs, end)
                host = new_hosts[gc]
                if gc in old_runs:
                    buf = bytearray(cs)
                    runs = old_runs[gc]
                    await self._read_runs(runs, gc, memoryview(buf))
                    buf[lo - gc:hi - gc] = data[lo - offset:hi - offset]
                    _add_write(writes, host, memoryview(buf))
                else:
                    _add_write(writes, host, data[lo - offset:hi - offset])
            try:
                for host, bufs in writes:
                    await self.data_hf.pwritev(host, bufs)
            except BaseException:
                if not self.external_data:
                    for host in new_hosts.values():
                        self.refs.defer_free(host, 1)  # never referenced: safe to drop at once
                raise
            if fresh:
                async with self.lock:
                    _l2off, l2 = await self._l2_for_write(l1i)
                    w = self.geo.l2_entry_words
                    for gc, e in fresh:
                        idx = ((gc >> self.cbits) & mask) * w
                        l2[idx] = new_hosts[gc] | L2E_COPIED
                        if w == 2:
                            l2[idx + 1] = SC_ALLOC_MASK
                        self._free_entry(e)
                    self.l2cache.mark_dirty(_l2off, l2)
        finally:
            self.inflight.remove(token)

    async def write_compressed(self, offset: int, data: memoryview) -> None:
        """Write whole guest clusters compressed (convert -c), as qemu's qcow2_co_pwritev_compressed does.

        ``data`` covers whole clusters (the image's last one may be shorter: it reads as zero-padded).
        Each cluster is compressed off the event loop, all of a run's clusters at once (zlib and zstd
        release the GIL, so they compress on every core), packed byte-wise after the previous compressed
        cluster, and its L2 entry points at it only once the bytes are written (the entry reaches the
        disk at the next flush, after the refcounts). A cluster that does not compress below a cluster's
        size is written as a normal one.
        """
        cs = self.cs
        if offset % cs or (len(data) % cs and offset + len(data) != self.size):
            raise InvalidArgumentError("compressed writes must cover whole clusters")
        mv = memoryview(data).cast("B")
        await asyncio.gather(*(self._write_compressed_cluster(pos, mv[pos - offset:pos - offset + cs])
                               for pos in range(offset, offset + len(mv), cs)))

    async def _write_compressed_cluster(self, offset: int, data: memoryview) -> None:
        cs = self.cs
        if self.external_data:
            raise UnsupportedError("Compression is not supported with an external data file")
        if self.ext_l2:
            # subclustered images: compressed entries carry no subcluster bitmap; write the data plainly
            await self.write(offset, data)
            return
        await self._before_modify(offset, len(data))
        raw = bytes(data) if len(data) == cs else bytes(data) + bytes(cs - len(data))
        packed = await run_blocking(_deflate_zstd if self.header.compression_type == COMPRESSION_ZSTD
                                    else _deflate_zlib, raw)
        if len(packed) >= cs:
            await self.write(offset, data)
            return
        assert self.refs is not None
        token = await self._claim(offset, offset + cs)
        try:
            l1i = offset >> (self.cbits + self.geo.l2_bits)
            idx = ((offset >> self.cbits) & ((1 << self.geo.l2_bits) - 1)) * self.geo.l2_entry_words
            async with self.lock:
                self._check_writable()
                host = await self._alloc_bytes(len(packed))
            try:
                await self.data_hf.pwrite(host, packed)
            except BaseException:
                self._free_bytes(host, len(packed))
                raise
            async with self.lock:
                l2off, l2 = await self._l2_for_write(l1i)
                old = l2[idx]
                l2[idx] = compressed_entry(host, len(packed), self.cbits)
                self._free_entry(old)
                self.l2cache.mark_dirty(l2off, l2)
        finally:
            self.inflight.remove(token)
        await self._after_modify(False)

    async def _alloc_bytes(self, n: int) -> int:
        """``n`` bytes (less than a cluster) for compressed data, packed after the previous ones in the
        current compressed cluster, whose refcount counts the compressed clusters in it (qemu's
        qcow2_alloc_bytes). A cluster that a flush has freed meanwhile is not packed into again."""
        assert self.refs is not None
        cs = self.cs
        off = self._free_byte_offset
        if off and off & (cs - 1) and (off & (cs - 1)) + n <= cs:
            cluster = off & ~(cs - 1)
            if 0 < await self.refs.get(cluster) < self.refs.max:
                await self.refs.change(cluster, 1)
                self._free_byte_offset = off + n
                return off
        off = await self.refs.allocate(1)
        self._free_byte_offset = off + n
        return off

    def _free_bytes(self, host: int, n: int) -> None:
        """Give back bytes that _alloc_bytes handed out and nothing references."""
        assert self.refs is not None
        self.refs.defer_free(host & ~(self.cs - 1), 1)

    async def _after_modify(self, fua: bool) -> None:
        if fua:
            await self.flush()
        elif self.l2cache.over_budget() or (self.refs is not None and self.refs.cache.over_budget()):
            await self.flush()

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool,
                           fua: bool = False) -> None:
        await self._before_modify(offset, length)
        cs = self.cs
        end = offset + length
        a = (offset + cs - 1) & ~(cs - 1)
        b = end & ~(cs - 1)
        if end == self.size and self.size % cs:
            b = (end + cs - 1) & ~(cs - 1)  # the partial last cluster counts as whole
        if a >= b:
            a = b = offset
        partial = [(s, e) for s, e in ((offset, min(a, end)), (max(b, offset), end)) if e > s]
        # as qemu's qcow2_co_pwrite_zeroes: a partial cluster that already reads as zeroes (unallocated
        # with no backing or a zero backing, zero clusters, host holes) needs nothing stored
        whole_metadata = not self.external_data and (self.v3 or (self.backing is None and may_trim))
        if fast and (partial or not whole_metadata):
            raise UnsupportedError("fast zeroing is not possible for this range")
        partial = [(s, e) for s, e in partial if not await self._reads_as_zeroes(s, e - s)]
        for s, e in partial:
            await self._write_zero_data(s, e - s)
        if b > a:
            if whole_metadata:
                await self._zero_clusters(a, b, may_trim, discard=False)
            else:
                await self._write_zero_data(a, min(b, self.size) - a)
        await self._after_modify(fua)

    async def _reads_as_zeroes(self, offset: int, length: int) -> bool:
        async for e in self.extents(offset, length):
            if not e.zero:
                return False
        return True

    async def _write_zero_data(self, offset: int, length: int) -> None:
        chunk = bytes(min(length, 1 << 20))
        pos, end = offset, offset + length
        while pos < end:
            n = min(len(chunk), end - pos)
            await self.write(pos, memoryview(chunk)[:n])
            pos += n

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._before_modify(offset, length)
        cs = self.cs
        end = offset + length
        a = (offset + cs - 1) & ~(cs - 1)
        b = end & ~(cs - 1)
        if end == self.size and self.size % cs:
            b = (end + cs - 1) & ~(cs - 1)
        # with an external data file a discard is only advisory: the data file stays as it is
        if b > a and (self.v3 or self.backing is None) and not self.external_data:
            await self._zero_clusters(a, b, True, discard=True)
        await self._after_modify(fua)

    async def make_empty(self) -> None:
        """Discard every cluster so that the image reads through to its backing file: qemu's
        qcow2_make_empty where it discards (a full discard: no zero flags, even over a backing file)."""
        await self._before_modify(0, self.size)
        end = -(-self.size // self.cs) * self.cs
        await self._zero_clusters(0, end, True, discard=True, full=True)
        await self.flush()

    async def _zero_clusters(self, a: int, b: int, may_trim: bool, *, discard: bool,
                             full: bool = False) -> None:
        """Make whole clusters ``[a, b)`` read as zeroes through metadata alone (v3, or v2 unbacked);
        ``full`` (a full discard) makes them unallocated instead, showing the backing file."""
        cs = self.cs
        span = cs << self.geo.l2_bits
        mask = (1 << self.geo.l2_bits) - 1
        pos = a
        while pos < b:
            tend = min((pos // span + 1) * span, b)
            token = await self._claim(pos, tend)
            try:
                async with self.lock:
                    self._check_writable()
                    l1i = pos // span
                    needs_zero_flag = not full and self.v3 and (self.backing is not None or not discard)
                    existing = l1i < len(self.l1) and self.l1[l1i] & L1E_OFFSET_MASK
                    if not existing and (full or self.backing is None):
                        pos = tend
                        continue  # no table: already reads as zeroes
                    l2off, l2 = await self._l2_for_write(l1i)
                    changed = False
                    if self.ext_l2:
                        changed = self._zero_ext(l2, pos, tend, discard, full)
                    for gc in range(pos, tend, cs) if not self.ext_l2 else ():
                        idx = (gc >> self.cbits) & mask
                        e = l2[idx]
                        kind, host = classify(e, self.v3)
                        keep = (not may_trim and self.v3 and kind in (NORMAL, ZERO) and host
                                and e & L2E_COPIED)
                        if keep:
                            new = host | L2E_COPIED | L2E_ZERO
                        elif needs_zero_flag and (self.backing is not None or kind != UNALLOC):
                            new = L2E_ZERO
                        else:
                            new = 0
                        if new == e:
                            continue
                        l2[idx] = new
                        changed = True
                        if not keep:
                            self._free_entry(e)
                    if changed:
                        self.l2cache.mark_dirty(l2off, l2)
            finally:
                self.inflight.remove(token)
            pos = tend

    def _zero_ext(self, l2: array[int], pos: int, end: int, discard: bool, full: bool = False) -> bool:
        """Extended L2: whole clusters become all-zero subclusters (or unallocated when nothing shows
        through, or on a full discard); their host clusters are freed."""
        mask = (1 << self.geo.l2_bits) - 1
        bitmap = 0 if discard and (full or self.backing is None) else SC_ALLOC_MASK << SC_ZERO_SHIFT
        changed = False
        for gc in range(pos, end, self.cs):
            idx = ((gc >> self.cbits) & mask) * 2
            e = l2[idx]
            if e == 0 and l2[idx + 1] == bitmap:
                continue
            l2[idx] = 0
            l2[idx + 1] = bitmap
            changed = True
            self._free_entry(e)
        return changed

    # -- flush and close ---------------------------------------------------------------------------
    async def flush(self) -> None:
        if self.read_only or self.refs is None:
            return
        async with self.lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        refs = self.refs
        assert refs is not None
        frees, refs.pending_frees = refs.pending_frees, []
        wrote = await refs.write_dirty()
        dirty_l2 = self.l2cache.dirty_items()
        if wrote and dirty_l2:
            await self.hf.fdatasync()  # a reference never reaches the disk before its refcount
        for off, table in dirty_l2:
            await self.hf.pwrite(off, encode_table(table))
            self.l2cache.mark_clean(off)
        self.l2cache.shrink()
        if self.data_hf is not self.hf:
            await self.data_hf.fdatasync()
        await self.hf.fdatasync()
        if frees:
            # the dropped references are on disk now: the decrements may follow
            zeroed = await refs.apply_pending_frees(frees)
            await refs.write_dirty()
            for c in zeroed:
                self.l2cache.drop(c)
                try:
                    await self.hf.punch_hole(c, self.cs)
                except UnsupportedError:
                    pass
            refs.free.extend(sorted(zeroed, reverse=True))
            await self.hf.fdatasync()

    async def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.read_only and self.refs is not None:
                async with self.lock:
                    await self._flush_locked()
                    if self._dirty_set:
                        self.header.incompatible_features &= ~INCOMPAT_DIRTY
                        await self.hf.pwrite(_HDR_INCOMPAT,
                                             self.header.incompatible_features.to_bytes(8, "big"))
                        await self.hf.fdatasync()
                        self._dirty_set = False
        finally:
            self._closed = True
            await self._close_children()

    async def _close_children(self) -> None:
        try:
            if self.backing is not None:
                await self.backing.close()
        finally:
            if self.data_hf is not self.hf:
                self.data_hf.close()
            self.hf.close()


def _append(out: list[Run], kind: int, g: int, n: int, host: int) -> None:
    """Append a run, merging it with the previous one when the state (and host offset) continues."""
    if out:
        pk, pg, pn, ph = out[-1]
        if pk == kind and pg + pn == g and kind != COMPRESSED:
            if kind == NORMAL:
                if ph + pn == host:
                    out[-1] = (pk, pg, pn + n, ph)
                    return
            elif (ph == 0 and host == 0) or (ph and host and ph + pn == host):
                out[-1] = (pk, pg, pn + n, ph)
                return
    out.append((kind, g, n, host))


class _BadEntry(Exception):
    """An L2 entry that no consistent image has; turned into CorruptImageError by the caller."""


def _add_write(writes: list[tuple[int, list[memoryview | bytes]]], host: int,
               buf: memoryview | bytes) -> None:
    """Queue a host write, joining it to the previous one when it continues it."""
    if writes:
        h, bufs = writes[-1]
        if h + sum(len(b) for b in bufs) == host:
            bufs.append(buf)
            return
    writes.append((host, [buf]))


def _deflate_zlib(raw: bytes) -> bytes:
    # qemu's qcow2_zlib_compress: raw deflate, 4 KiB window, memLevel 9, the default level and strategy
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
    return c.compress(raw) + c.flush()


def _deflate_zstd(raw: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(raw)


def _inflate_zlib(raw: bytes, cs: int) -> bytes:
    d = zlib.decompressobj(-12)
    return d.decompress(raw, cs)


def _inflate_zstd(raw: bytes, cs: int) -> bytes:
    import zstandard

    # qemu's zstd frames may lack a content size, so stream with an output cap instead of one-shot
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=False)
    out = bytearray()
    while len(out) < cs:
        chunk = reader.read(cs - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


__all__ = ["Qcow2Driver", "open_qcow2"]
