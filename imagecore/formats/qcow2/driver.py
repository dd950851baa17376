"""The qcow2 block driver: reads, writes, zeroes, discard, extents over a backing chain, crash-safe.

All metadata (header, L1, the L2 and refcount caches, the allocator, the in-flight registry) is touched on
the event-loop thread only. A metadata lock guards lookups that load tables and every allocation; it is
released while guest data moves. Modifying requests claim their guest clusters in the in-flight registry, so
two writes racing to allocate one cluster run one after the other, the second one looking again.

What the tables say is decided by pure modules: ``mapping`` turns L2 tables into guest runs, ``plan`` says
where a write goes and which entries zeroing writes, ``alloc.Refcounts`` counts clusters. The driver loads
tables, runs those plans in the order crash safety needs, and handles corruption found on the way.
"""

from __future__ import annotations

import asyncio
import io
import zlib
from array import array
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from ... import hostio
from ...backing import extents_below, read_below, read_below_nowait
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
from ...hostio import HostFile, check_range, run_blocking
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
    EXT_BITMAPS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    L1E_COPIED,
    L1E_OFFSET_MASK,
    L2E_COPIED,
    MAX_L1_BYTES,
    SUBCLUSTERS,
    Header,
)
from .mapping import (
    COMPRESSED,
    NORMAL,
    UNALLOCATED_ALLOC,
    UNALLOCATED_PLAIN,
    ZERO_ALLOC,
    ZERO_PLAIN,
    BadEntry,
    ClusterMap,
    Run,
    append_run,
)
from .plan import HostWrites, Placement, WritePlan, placement, plan_zeroes
from .status import host_runs, metadata_preallocated
from .tables import (
    Geometry,
    compressed_entry,
    compressed_location,
    decode_table,
    encode_entry,
    encode_table,
    make_geometry,
    referenced_clusters,
)

if TYPE_CHECKING:
    from .bitmaps import Bitmap
    from .crypto import QcowCrypto
    from .dirty import DirtyBitmaps
    from .snapshot import Snapshot
    from .tables import SubclusterType

_HDR_INCOMPAT = 72
_HDR_AUTOCLEAR = 88
# The first window of guest bytes that block status maps (see _extents): 32 clusters
_FIRST_WINDOW_CLUSTERS = 32



async def open_qcow2(hf: HostFile, ctx: OpenContext) -> Qcow2Driver:
    """Open a qcow2 image on ``hf``, with its backing chain and data file."""
    writable = not (ctx.read_only or hf.read_only)
    # qemu-img info opens with BDRV_O_NO_IO: the data file is not needed then
    io = not ctx.options.get("no_io", False)
    h = await read_header(hf, writable=writable, io=io)
    if h.incompatible_features & INCOMPAT_DIRTY and not h.incompatible_features & INCOMPAT_CORRUPT \
            and writable:
        await _repair_dirty(hf, ctx, h)
        h = await read_header(hf, writable=writable, io=io)
    drv = Qcow2Driver(hf, h, ctx)
    try:
        if h.crypt_method:
            from .crypto import open_crypto

            drv.crypto = await open_crypto(hf, h, ctx.options, io=io, read_only=drv.read_only)
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
        self.cmap = ClusterMap(header.cluster_bits, self.geo.l2_bits, header.extended_l2, self.v3,
                               bool(header.incompatible_features & INCOMPAT_DATA_FILE))
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
        # the persistent dirty bitmaps, tracked on every write (dirty.py); None for an image without any
        self.tracking: DirtyBitmaps | None = None
        self.snapshot_loaded: Snapshot | None = None
        # where the next compressed cluster's bytes go (0: start a new cluster), as qemu's free_byte_offset
        self._free_byte_offset = 0
        self.lazy_refcounts = bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS)
        self._dirty_set = False
        self._decompressed: OrderedDict[int, bytes] = OrderedDict()
        self._corrupt_reported = False
        self._closed = False
        # whether block status looks into the host file under data clusters: decided at the first block
        # status, as qemu decides it (status.py)
        self._metadata_prealloc: bool | None = None
        # the cipher of an encrypted image (crypto.py): data is encrypted per 512-byte sector, so its
        # reads and writes are widened to whole sectors and its writes serialised (a partial sector is
        # read, merged and encrypted again)
        self.crypto: QcowCrypto | None = None
        self._crypt_lock = asyncio.Lock()
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
        if l1_bytes and not self.read_only:
            # qemu opens these too (a table past the end reads as zeroes); a writer here refuses them
            # rather than allocate over a table, or write the header through one
            if h.l1_table_offset + l1_bytes > fsize:
                raise ImageFormatError("Active L1 table extends past the end of the file")
            if h.l1_table_offset < self.cs:
                raise ImageFormatError("Active L1 table overlaps the image header")
        buf = bytearray(l1_bytes)
        if l1_bytes:
            await self.hf.readinto(h.l1_table_offset, memoryview(buf))
        self.l1 = decode_table(buf)
        self.refs = await Refcounts.load(self.hf, self.geo, h.refcount_table_offset,
                                         h.refcount_table_clusters, self._corrupt, self.budget // 4,
                                         writable=not self.read_only)
        if h.incompatible_features & INCOMPAT_DATA_FILE:
            # opened before the snapshots and bitmaps are read, as qemu opens it
            name = h.data_file
            if name is not None:  # None only for info's open (no I/O), which reads no data
                self.data_hf = self.ctx.opener.open_data_file(name, self.ctx)
            self.external_data = True
        if h.nb_snapshots:
            from .snapshot import read_snapshot_table  # most images have none: not loaded for them

            self.snapshots = (await read_snapshot_table(self.hf, h, past_end=self.read_only)).snapshots
        wanted = self.ctx.options.get("snapshot")
        if wanted is not None:
            await self._load_snapshot(wanted)
        from .bitmaps import read_directory

        self.bitmaps = await read_directory(self.hf, h)
        if self.bitmaps:
            self.bitmap_tracker()
        if h.backing_file and not self.ctx.options.get("no_backing"):
            # (no_backing: opened with "backing": null, its unallocated runs read as zeroes)
            self.backing = await self.ctx.opener.open_backing(h.backing_file, h.backing_format, self.ctx)
        if not self.read_only and self.v3:
            # unknown autoclear bits go (their features may be stale after our writes); the bitmaps bit
            # stays while there are bitmaps: they are tracked, their in-use flag set before the first write
            keep = h.autoclear_features & AUTOCLEAR_KNOWN
            if h.extension(EXT_BITMAPS) is None:
                keep &= ~AUTOCLEAR_BITMAPS
            if keep != h.autoclear_features:
                h.autoclear_features = keep
                await self.hf.pwrite(_HDR_AUTOCLEAR, keep.to_bytes(8, "big"))
                await self.hf.fdatasync()

    def bitmap_tracker(self) -> DirtyBitmaps:
        """The image's dirty bitmaps (made empty for an image without any, for edits)."""
        if self.tracking is None:
            from .dirty import DirtyBitmaps

            self.tracking = DirtyBitmaps(self, self.bitmaps)
        return self.tracking

    def bitmap_names(self) -> list[str]:
        # the bitmaps describe the active image: a snapshot shown instead offers none
        if self.tracking is None or self.snapshot_loaded is not None:
            return []
        return self.tracking.names()

    async def bitmap_runs(self, name: str, offset: int, length: int) -> AsyncIterator[tuple[int, int, bool]]:
        async for r in self.bitmap_tracker().runs(name, offset, length):
            yield r

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
        if self.crypto is not None:
            data["encrypt"] = self.crypto.info
        if self.external_data:
            if h.data_file is not None:  # an image without the name, opened without I/O: none shown
                data["data-file"] = h.data_file
            data["data-file-raw"] = self.data_file_raw
        if self.v3:
            data["corrupt"] = bool(h.incompatible_features & INCOMPAT_CORRUPT)
            data["extended-l2"] = self.ext_l2
        return {"type": "qcow2", "data": data}

    def cluster_size(self) -> int | None:
        return self.cs

    def is_encrypted(self) -> bool:
        return self.crypto is not None

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
        # the file's size only when the table lies past the end known already (an fstat per table was
        # 4 % of a cold block-status walk)
        if l2_offset % self.cs or (l2_offset + self.cs > self._end and l2_offset + self.cs > self.hf.size()):
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
    async def _map(self, offset: int, length: int) -> list[Run]:
        out: list[Run] = []
        span = self.cs << self.geo.l2_bits
        pos = offset
        end = offset + length
        while pos < end:
            tend = min((pos // span + 1) * span, end)
            l2 = await self._l2_for(pos // span)
            if self.ext_l2 and l2 is not None:
                bad = self.cmap.first_invalid(l2, pos, tend)
                if bad is not None:
                    raise await self._corrupt(f"invalid subcluster bitmap for guest cluster {bad}")
            try:
                self.cmap.table_runs(l2, pos, tend, out)
            except BadEntry as exc:
                raise await self._corrupt(str(exc)) from None
            pos = tend
        if not self.external_data:
            end_ = self._end
            for kind, _g, n, host in out:
                if kind == NORMAL and host + n > end_:
                    raise await self._corrupt(f"data cluster offset {host:#x} is past the end of the file")
        return out

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
                self.cmap.table_runs(l2, pos, tend, out)
            except BadEntry:
                return None
            pos = tend
        return out

    # -- reads -------------------------------------------------------------------------------------
    def readinto_nowait(self, offset: int, buf: memoryview) -> bool:
        if self.crypto is not None:
            return False
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
            elif kind == ZERO_PLAIN or kind == ZERO_ALLOC:
                view[:] = bytes(n)
            elif kind == UNALLOCATED_PLAIN or kind == UNALLOCATED_ALLOC:
                if not read_below_nowait(self.backing, g, view):
                    return False
            else:
                return False
        return True

    def host_runs_nowait(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        # What readinto_nowait would copy, as places in the data file: plain data clusters (in the page
        # cache), zero clusters, and the backing file's own runs under unallocated ones.
        hf = self.data_hf
        if not hf.zero_copy or self.header.crypt_method:
            return None  # an encrypted image's clusters hold ciphertext
        runs = self._map_nowait(offset, length)
        if runs is None:
            return None
        end = self._end
        out: list[tuple[int, int, int]] = []
        for kind, g, n, host in runs:
            if kind == NORMAL:
                if (not self.external_data and host + n > end) or not hf.in_page_cache(host, n):
                    return None
                if out and out[-1][1] == hf.fd and out[-1][2] + out[-1][0] == host:
                    out[-1] = (out[-1][0] + n, hf.fd, out[-1][2])
                else:
                    out.append((n, hf.fd, host))
            elif kind == ZERO_PLAIN or kind == ZERO_ALLOC:
                out.append((n, -1, 0))
            elif kind == UNALLOCATED_PLAIN or kind == UNALLOCATED_ALLOC:
                b = self.backing
                inside = 0 if b is None else max(0, min(n, b.size - g))
                if inside:
                    assert b is not None
                    below = b.host_runs_nowait(g, inside)
                    if below is None:
                        return None
                    out.extend(below)
                if inside < n:
                    out.append((n - inside, -1, 0))
            else:
                return None  # compressed
        return out

    async def readinto(self, offset: int, buf: memoryview) -> None:
        check_range(offset, len(buf), self.size)
        if self.crypto is not None:
            start, end = offset & ~511, min((offset + len(buf) + 511) & ~511, self.size)
            if (start, end) != (offset, offset + len(buf)):
                whole = memoryview(bytearray(end - start))
                await self.readinto(start, whole)
                buf[:] = whole[offset - start:offset - start + len(buf)]
                return
        # Large copies go to the I/O pool (HostFile.readinto) rather than stalling the loop inline.
        if len(buf) <= hostio.inline_read_max and self.readinto_nowait(offset, buf):
            return
        async with self.lock:
            runs = await self._map(offset, len(buf))
        await self._read_runs(runs, offset, buf)

    async def _read_runs(self, runs: list[Run], base: int, buf: memoryview) -> None:
        for kind, g, n, host in runs:
            view = buf[g - base:g - base + n]
            if kind == NORMAL:
                await self.data_hf.readinto(host, view)
                if self.crypto is not None:
                    await run_blocking(self.crypto.decrypt, host, g, view)
            elif kind == ZERO_PLAIN or kind == ZERO_ALLOC:
                view[:] = bytes(n)
            elif kind == UNALLOCATED_PLAIN or kind == UNALLOCATED_ALLOC:
                await read_below(self.backing, g, view)
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
        if self.crypto is None:
            async for e in self._extents(offset, length):
                yield e
            return
        # qemu gives no host offset for encrypted data (its block status has no BDRV_BLOCK_OFFSET_VALID)
        async for e in self._extents(offset, length):
            if e.depth == 0:
                e.offset = None
            yield e

    async def _extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        span = self.cs << self.geo.l2_bits
        pos, end = offset, offset + length
        # a host hole under encrypted data does not read as zeroes: the file is never looked into
        holes = False if self.crypto is not None else self._metadata_prealloc
        if holes is None:
            async with self.lock:
                holes = self._metadata_prealloc
                if holes is None:
                    assert self.refs is not None
                    holes = await metadata_preallocated(self.hf, self.refs, self.header.refcount_order)
                    self._metadata_prealloc = holes
        # Mapped a window at a time, the first of 32 clusters and each next one 16 times larger up to a
        # table: a block-status request with NBD_CMD_FLAG_REQ_ONE (QEMU's always has it) wants one run,
        # and mapping a whole table of alternating clusters for each made `qemu-img map` over NBD of
        # 16,384 of them take 45-55 s (qemu-nbd 10: 0.6-1.25 s). The extents are still those of whole
        # tables (_settled), which compare's progress meter, for one, shows.
        window = _FIRST_WINDOW_CLUSTERS * self.cs
        held: list[Run] = []
        while pos < end:
            tend = self._window_end(pos, end, window)
            window = min(window * 16, span)
            async with self.lock:
                runs = await self._map(pos, tend - pos)
            pos = tend
            for kind, g, n, host in self._settled(held, runs, pos, end):
                own = self._own_extents(kind, g, n, host, holes)
                if own is not None:
                    for e in own:
                        yield e
                else:
                    async for e in extents_below(self.backing, g, n):
                        yield e

    def _settled(self, held: list[Run], runs: list[Run], pos: int, end: int) -> list[Run]:
        """The runs of a window just mapped (to ``pos``), merged with the one ``held`` back from the
        window before: all of them at the end of a table or of the range, else all but the last, which
        the next window may continue (it stays in ``held``)."""
        for kind, g, n, host in runs:
            append_run(held, kind, g, n, host)
        if pos >= end or pos % (self.cs << self.geo.l2_bits) == 0:
            done = held[:]
            held.clear()
        else:
            done = held[:-1]
            del held[:-1]
        return done

    def _window_end(self, pos: int, end: int, window: int) -> int:
        """Where a mapping window from ``pos`` ends: within one table, ``window`` guest bytes of whole
        clusters."""
        cs = self.cs
        span = cs << self.geo.l2_bits
        return min((pos // span + 1) * span, end, pos - pos % cs + window)

    def _own_extents(self, kind: SubclusterType, g: int, n: int, host: int, holes: bool
                     ) -> Iterator[Extent] | None:
        """The extents of one mapped run that this layer answers itself; None for an unallocated run
        over a backing file (extents_below)."""
        if kind == NORMAL:
            if holes:
                return host_runs(self.data_hf, g, n, host)
            return iter((Extent(g, n, True, False, 0, True, host),))
        if kind == COMPRESSED:
            return iter((Extent(g, n, True, False, 0, True, None, True),))
        if kind == ZERO_PLAIN or kind == ZERO_ALLOC:
            return iter((Extent(g, n, False, True, 0, True, host if kind == ZERO_ALLOC else None),))
        if self.backing is not None:
            return None
        if kind == UNALLOCATED_ALLOC:
            # unallocated subclusters of an allocated cluster: qemu reports the host offset
            return iter((Extent(g, n, False, True, 0, False, host),))
        return iter((Extent(g, n, False, True, 0, False),))

    def extents_lookahead(self) -> bool:
        # tables are mapped in windows as they are asked for; a backing file's extents might not be
        return self.backing is None

    def extents_nowait(self, offset: int, length: int) -> Iterator[Extent] | None:
        # Where the tables are cached: the first window must be, and the extents stop short of the first
        # window whose table is not (a block-status reply may cover less than the request).
        holes = self._metadata_prealloc
        if self.crypto is not None or self.backing is not None or holes is None:
            return None
        end = offset + length
        tend = self._window_end(offset, end, _FIRST_WINDOW_CLUSTERS * self.cs)
        runs = self._map_checked_nowait(offset, tend)
        if runs is None:
            return None
        return self._extents_nowait(runs, tend, end, holes)

    def _extents_nowait(self, runs: list[Run], pos: int, end: int, holes: bool) -> Iterator[Extent]:
        span = self.cs << self.geo.l2_bits
        window = _FIRST_WINDOW_CLUSTERS * self.cs * 16
        held: list[Run] = []
        while True:
            yield from self._own_extents_of(self._settled(held, runs, pos, end), holes)
            if pos >= end:
                return
            tend = self._window_end(pos, end, window)
            window = min(window * 16, span)
            got = self._map_checked_nowait(pos, tend)
            if got is None:
                # the held run as far as it is known: the extents end there
                yield from self._own_extents_of(held, holes)
                return
            runs, pos = got, tend

    def _own_extents_of(self, runs: list[Run], holes: bool) -> Iterator[Extent]:
        for kind, g, n, host in runs:
            own = self._own_extents(kind, g, n, host, holes)
            assert own is not None  # no backing file
            yield from own

    def _map_checked_nowait(self, pos: int, end: int) -> list[Run] | None:
        """:meth:`_map_nowait`, None also where :meth:`_map` would find the image corrupt (a data
        cluster past the end of the file), so that it is reported there."""
        runs = self._map_nowait(pos, end - pos)
        if runs is None:
            return None
        if not self.external_data:
            end_ = self._end
            for kind, _g, n, host in runs:
                if kind == NORMAL and host + n > end_:
                    return None
        return runs

    def data_file_name(self, offset: int) -> str:
        return self.data_hf.path if self.external_data else self.filename

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
        self.refs.defer_free(*referenced_clusters(e, self.cbits))

    def write_started(self, offset: int, data: memoryview) -> asyncio.Future[None] | bool:
        """An overwrite without a coroutine: bytes that fall in clusters this image alone owns (COPIED,
        so written in place as the slow path would), one host run, whose L2 table is in the cache, with
        no other modifier in flight on them. The clusters are registered in flight until the write is
        done, so a discard or a copy on write of them waits, as it waits for write(). Everything else
        (allocation, zero or compressed clusters, copy on write, encryption, bitmaps to mark, subclusters,
        the lazy-refcounts dirty bit still to set, a suspicious entry) is False: write() handles it."""
        n = len(data)
        if (self.crypto is not None or self.tracking is not None or self.ext_l2 or self.refs is None
                or not n or offset + n > self.size or self.read_only or not self.caps.writable
                or (self.lazy_refcounts and self.v3 and not self._dirty_set)):
            return False
        cbits = self.cbits
        bits = self.geo.l2_bits
        l1i = offset >> (cbits + bits)
        if l1i != (offset + n - 1) >> (cbits + bits) or l1i >= len(self.l1):
            return False
        l2 = self.l2cache.peek(self.l1[l1i] & L1E_OFFSET_MASK)
        if l2 is None:
            return False
        c0, c1 = offset >> cbits, ((offset + n - 1) >> cbits) + 1
        if self.inflight.overlapping(c0, c1) is not None:
            return False
        cs = self.cs
        mask = (1 << bits) - 1
        first = -1
        for gc in range(c0, c1):
            try:
                where, host = placement(self.cmap, l2[gc & mask])
            except BadEntry:
                return False
            if where is not Placement.IN_PLACE:
                return False
            if first < 0:
                first = host
            elif host != first + ((gc - c0) << cbits):
                return False  # not one host run
            if not self.external_data and (host + cs > self._end or self._metadata_at(host)):
                return False  # the slow path names the corruption
        host = first + (offset & (cs - 1))
        hf = self.data_hf
        if hf.pwrite_inline(host, data):
            return True
        token = self.inflight.add(c0, c1)
        fut = hf.pwritev_started(host, [data])
        fut.add_done_callback(lambda _f: self.inflight.remove(token))
        return fut

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        if self.crypto is None:
            await self._write(offset, data, fua)
            return
        check_range(offset, len(data), self.size)
        async with self._crypt_lock:
            start, end = offset & ~511, min((offset + len(data) + 511) & ~511, self.size)
            if (start, end) != (offset, offset + len(data)):
                whole = bytearray(end - start)
                await self.readinto(start, memoryview(whole))
                whole[offset - start:offset - start + len(data)] = data
                offset, data = start, memoryview(whole)
            await self._write(offset, data, fua)

    async def _write(self, offset: int, data: memoryview, fua: bool) -> None:
        await self._before_modify(offset, len(data))
        if self.tracking is not None and self.tracking.track(offset, len(data)):
            await self.tracking.prepare()
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
            l1i = offset >> (self.cbits + self.geo.l2_bits)
            async with self.lock:
                self._check_writable()
                plan = await self._plan_write(l1i, offset, offset + len(data))
                old_runs = {c.guest: await self._map(c.guest, cs) for c in plan.copy_on_write()}
            # guest data I/O, without the lock: the old content of partly written new clusters, then the
            # data (a new cluster's whole content in one write)
            old: dict[int, bytearray] = {}
            for gc, runs in old_runs.items():
                old[gc] = bytearray(cs)
                await self._read_runs(runs, gc, memoryview(old[gc]))
            try:
                for host, bufs in plan.host_writes(data, old):
                    if self.crypto is not None:
                        bufs = [await run_blocking(self.crypto.encrypt, host, 0, b"".join(bufs))]
                    await self.data_hf.pwritev(host, bufs)
            except BaseException:
                if not self.external_data:
                    for c in plan.new:
                        self.refs.defer_free(c.host, 1)  # never referenced: safe to drop at once
                raise
            if plan.new:
                async with self.lock:
                    l2off, l2 = await self._l2_for_write(l1i)
                    for e in plan.link(self.cmap, l2):
                        self._free_entry(e)
                    self.l2cache.mark_dirty(l2off, l2)
        finally:
            self.inflight.remove(token)

    async def _plan_write(self, l1i: int, offset: int, end: int) -> WritePlan:
        """Decide where the guest bytes ``[offset, end)`` of one L2 table go and allocate the new clusters
        (metadata lock held). A COPIED flag found missing on a cluster with refcount 1 is set on the way."""
        assert self.refs is not None
        cs = self.cs
        l2off, l2 = await self._l2_for_write(l1i)
        plan = WritePlan(offset, end, self.cbits)
        mask = (1 << self.geo.l2_bits) - 1
        w = self.geo.l2_entry_words
        clusters = plan.clusters()
        i0 = (clusters.start >> self.cbits) & mask
        if w == 1 and not any(l2[i0:i0 + len(clusters)]):
            # every entry 0 (unallocated, the usual case of a copy into an image): all new, in one step
            plan.add_new_span(clusters.start, len(clusters))
            clusters = range(0)
        for gc in clusters:
            idx = ((gc >> self.cbits) & mask) * w
            e = l2[idx]
            try:
                where, host = placement(self.cmap, e, l2[idx + 1] if w == 2 else 0)
            except BadEntry as exc:
                raise await self._corrupt(str(exc)) from None
            if where is Placement.VERIFY:
                rc = await self.refs.get(host)
                if rc == 0:
                    raise await self._corrupt(f"cluster at {host:#x} is in use but has refcount 0")
                if rc == 1:
                    l2[idx] = e | L2E_COPIED  # only the flag was missing
                    self.l2cache.mark_dirty(l2off, l2)
                    where = Placement.IN_PLACE
            if where is not Placement.IN_PLACE:
                plan.add_new(gc, e)
                continue
            if not self.external_data:
                if host + cs > self._end:
                    raise await self._corrupt(f"data cluster offset {host:#x} is past the end of the file")
                what = self._metadata_at(host)
                if what:
                    raise await self._corrupt(f"data cluster at {host:#x} overlaps the {what}")
            plan.in_place.append((gc, host))
        for run in plan.allocation_runs():
            # data file clusters live at their guest offset; image file clusters come from the allocator
            base = run[0].guest if self.external_data else await self.refs.allocate(len(run))
            for k, c in enumerate(run):
                c.host = base + k * cs
        return plan

    async def write_compressed(self, offset: int, data: memoryview) -> None:
        """Write whole guest clusters compressed (convert -c), as qemu's qcow2_co_pwritev_compressed does.

        ``data`` covers whole clusters (the image's last one may be shorter: it reads as zero-padded).
        Each cluster is compressed off the event loop, all of a run's clusters at once (zlib and zstd
        release the GIL, so they compress on every core), packed byte-wise after the previous compressed
        cluster, and its L2 entry points at it only once the bytes are written (the entry reaches the
        disk at the next flush, after the refcounts). A cluster that does not compress below a cluster's
        size is written as a normal one.
        """
        if self.crypto is not None:
            raise UnsupportedError("Compression and encryption not supported at the same time")
        cs = self.cs
        if offset % cs or (len(data) % cs and offset + len(data) != self.size):
            raise InvalidArgumentError("compressed writes must cover whole clusters")
        mv = memoryview(data).cast("B")
        if self.tracking is not None and self.tracking.track(offset, len(mv)):
            await self.tracking.prepare()
        await asyncio.gather(*(self._write_compressed_cluster(pos, mv[pos - offset:pos - offset + cs])
                               for pos in range(offset, offset + len(mv), cs)))

    async def _write_compressed_cluster(self, offset: int, data: memoryview) -> None:
        cs = self.cs
        if self.external_data:
            raise UnsupportedError("Compression is not supported with an external data file")
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
                if self.geo.l2_entry_words == 2:
                    l2[idx + 1] = 0  # a compressed cluster has no subcluster bitmap: its word stays 0
                self._free_entry(old)
                self.l2cache.mark_dirty(l2off, l2)
        finally:
            self.inflight.remove(token)
        await self._after_modify(False)

    async def write_compressed_clusters(self, offset: int, data: memoryview,
                                        packed: list[bytes | None]) -> None:
        """Write the whole guest clusters of ``data`` from ``offset``, already compressed by the caller
        (convert -c compresses whole runs per task in a worker pool): ``packed[i]`` is cluster i in this
        image's compression type, or None where it did not compress below a cluster's size and goes in
        plainly. As write_compressed, in guest order: each compressed cluster's bytes are packed after
        the previous ones (refcount first), written, and only then linked from its L2 entry; a run of
        plain clusters is one ordinary write.
        """
        if self.crypto is not None:
            raise UnsupportedError("Compression and encryption not supported at the same time")
        cs = self.cs
        if offset % cs or (len(data) % cs and offset + len(data) != self.size) \
                or len(packed) != -(-len(data) // cs):
            raise InvalidArgumentError("compressed writes must cover whole clusters")
        if self.external_data:
            raise UnsupportedError("Compression is not supported with an external data file")
        assert self.refs is not None
        mv = memoryview(data).cast("B")
        await self._before_modify(offset, len(mv))
        i = 0
        while i < len(packed):
            j = i
            plain = packed[i] is None
            while j < len(packed) and (packed[j] is None) == plain:
                j += 1
            start, end = offset + i * cs, min(offset + j * cs, offset + len(mv))
            if plain:
                await self.write(start, mv[i * cs:j * cs])
            else:
                await self._link_compressed(start, end, [b for b in packed[i:j] if b is not None])
            i = j
        await self._after_modify(False)

    async def _link_compressed(self, start: int, end: int, blobs: list[bytes]) -> None:
        """Pack, write and link a run of compressed clusters: one allocation pass and one L2 pass under
        the metadata lock, the packed bytes written between them in as few writes as they allow."""
        assert self.refs is not None
        cs = self.cs
        token = await self._claim(start, end)
        try:
            hosts: list[int] = []
            async with self.lock:
                self._check_writable()
                try:
                    for blob in blobs:
                        hosts.append(await self._alloc_bytes(len(blob)))
                except BaseException:
                    for h, blob in zip(hosts, blobs, strict=False):
                        self._free_bytes(h, len(blob))
                    raise
            writes = HostWrites()
            for h, blob in zip(hosts, blobs, strict=True):
                writes.add(h, blob)
            try:
                for h, bufs in writes:
                    await self.data_hf.pwritev(h, bufs)
            except BaseException:
                for h, blob in zip(hosts, blobs, strict=True):
                    self._free_bytes(h, len(blob))
                raise
            mask = (1 << self.geo.l2_bits) - 1
            w = self.geo.l2_entry_words
            async with self.lock:
                cur = -1
                l2off, l2 = 0, array("Q")
                for k, (h, blob) in enumerate(zip(hosts, blobs, strict=True)):
                    g = start + k * cs
                    l1i = g >> (self.cbits + self.geo.l2_bits)
                    if l1i != cur:
                        if cur >= 0:
                            self.l2cache.mark_dirty(l2off, l2)
                        l2off, l2 = await self._l2_for_write(l1i)
                        cur = l1i
                    idx = ((g >> self.cbits) & mask) * w
                    old = l2[idx]
                    l2[idx] = compressed_entry(h, len(blob), self.cbits)
                    if w == 2:
                        l2[idx + 1] = 0
                    self._free_entry(old)
                self.l2cache.mark_dirty(l2off, l2)
        finally:
            self.inflight.remove(token)

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
        if self.tracking is not None and self.tracking.track(offset, length):
            await self.tracking.prepare()
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
        if self.tracking is not None and self.tracking.track(offset, length):
            await self.tracking.prepare()
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
        span = self.cs << self.geo.l2_bits
        pos = a
        while pos < b:
            tend = min((pos // span + 1) * span, b)
            token = await self._claim(pos, tend)
            try:
                async with self.lock:
                    self._check_writable()
                    l1i = pos // span
                    existing = l1i < len(self.l1) and self.l1[l1i] & L1E_OFFSET_MASK
                    if not existing and (full or self.backing is None):
                        pos = tend
                        continue  # no table: already reads as zeroes
                    l2off, l2 = await self._l2_for_write(l1i)
                    plan = plan_zeroes(self.cmap, l2, pos, tend, may_trim=may_trim, discard=discard,
                                       backing=self.backing is not None, full=full)
                    plan.apply(self.cmap, l2)
                    for e in plan.frees:
                        self._free_entry(e)
                    if plan.changes:
                        self.l2cache.mark_dirty(l2off, l2)
            finally:
                self.inflight.remove(token)
            pos = tend

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
                    if self.tracking is not None:
                        await self.tracking.store()
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
