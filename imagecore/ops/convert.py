"""`convert`: copy one or more images (concatenated) into a new or existing target, keeping it sparse.

The source's extents decide what is read: zero and unallocated runs are never read, and data runs are read
in large chunks by ``-m`` concurrent tasks, then scanned for all-zero blocks of the ``-S`` size, which are
skipped too. Writes go out in guest order unless ``-W`` allows any order. ``-c`` compresses a chunk's
clusters in a pool before its turn to write; ``-C`` copies raw runs host file to host file; ``-r`` paces
the target's writes with qemu's throttle; ``--salvage`` turns unreadable sectors into zeroes with
qemu-img's warnings.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import copy
import errno
import itertools
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..driver import BlockDriver, ImageOpener
from ..errors import (
    BlockError,
    HostIOError,
    InvalidArgumentError,
    OperationCancelledError,
    SnapshotNotFoundError,
    UnsupportedError,
)
from ..extent import Extent
from ..filenames import is_special
from ..formats.qcow2.compress import compress_clusters
from ..hostio import aligned_bytearray, run_blocking
from ..units import INT64_MAX
from .common import CACHE_MODES, ProgressFn, check_cancelled, open_image, require_snapshot_loaded
from .create import all_options, check_format, create_image, same_file, validate_options

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

CHUNK = 2 << 20
# qemu-img 7.2's MAX_COROUTINES: -m takes 1 to 16 requests in flight
MAX_COROUTINES = 16
# qemu-img 7.2's largest -S; zeroes are looked for within a chunk, so past CHUNK only whole zero chunks
# are skipped, as in qemu-img, whose buffer is 2 MiB as well
MAX_SPARSE = 16 << 20
ZERO_CHUNK = 64 << 20
_ZERO = bytes(CHUNK)


def _zero_runs(buf: bytearray, start: int, length: int, sparse: int) -> list[tuple[int, int, bool]]:
    """Split ``buf[start:length]`` into (start, end, all_zero) runs at ``sparse``-byte granularity.

    Blocks are tested in C, not one by one: a block whose first byte is not zero is data, so only the
    runs of blocks that start with a zero byte are compared with zeroes, each run at once and block by
    block only where it is not all zero. A chunk of data and holes costs a few calls, not one per block."""
    zeroes = memoryview(_ZERO)
    view = memoryview(buf)
    sw = buf.startswith

    def is_zero(a: int, b: int) -> bool:
        # A range is zero when its first page is and the rest equals the range shifted by a page: one
        # stream through the cache instead of two, the second read hitting what the first just loaded.
        if b - a <= _PAGE_ZERO:
            return sw(zeroes[:b - a], a)
        return sw(zeroes[:_PAGE_ZERO], a) and sw(view[a:b - _PAGE_ZERO], a + _PAGE_ZERO)

    runs: list[tuple[int, int, bool]] = []

    def add(a: int, b: int, zero: bool) -> None:
        if runs and runs[-1][2] == zero:
            runs[-1] = (runs[-1][0], b, zero)
        else:
            runs.append((a, b, zero))

    data_from = start  # blocks from here to the next candidate run are data
    for m in _ZERO_BYTES.finditer(buf[start:length:sparse]):
        a = start + m.start() * sparse
        b = min(length, start + m.end() * sparse)
        if a > data_from:
            add(data_from, a, False)
        data_from = b
        if is_zero(a, b):
            add(a, b, True)
            continue
        for pos in range(a, b, sparse):
            n = min(sparse, b - pos)
            add(pos, pos + n, sw(zeroes[:n], pos))
    if data_from < length:
        add(data_from, length, False)
    return runs


_PAGE_ZERO = 4096
# runs of zero bytes: in a chunk's first bytes of its blocks, the blocks that may be all zero
_ZERO_BYTES = re.compile(b"\x00+")

DATA, ZERO, SKIP = 0, 1, 2
SECTOR = 512

WarnFn = Callable[[str], None]


@dataclass(slots=True)
class ConvertOptions:
    sources: list[str]
    target: str
    src_fmt: str | None = None
    out_fmt: str = "raw"
    options: dict[str, str] = field(default_factory=dict)
    sparse_size: int = 4096
    sparse_explicit: bool = False  # -S was given: qemu-img refuses it together with -C
    skip_create: bool = False
    progress: bool = False
    quiet: bool = False
    backing: str | None = None
    backing_fmt: str | None = None
    parallel: int = 8
    out_of_order: bool = False
    compress: bool = False
    target_is_zero: bool = False
    force_share: bool = False  # -U: the sources' locks share everything; the target is locked as ever
    cache: str = "unsafe"  # qemu-img convert's default target cache mode: no waiting for the disk
    # -l: an internal snapshot of the source, {"id": ..} and/or {"name": ..}, or {"id-or-name": ..}
    snapshot: dict[str, str] | None = None
    rate_limit: int = 0  # -r: bytes per second written to the target; 0 is no limit
    copy_range: bool = False  # -C: copy data host file to host file (copy_file_range) where possible
    salvage: bool = False  # --salvage: unreadable sectors become zeroes, each with a warning
    # worker processes compressing for -c; 0: the I/O thread pool (zlib and zstd release the GIL)
    compress_workers: int = 0
    # --bitmaps, --skip-broken-bitmaps (ops/bitmap.py does the work)
    bitmaps: bool = False
    skip_broken_bitmaps: bool = False


@dataclass(slots=True)
class ConvertStats:
    """What a finished convert moved, in guest bytes: ``bytes_read`` data read from the sources,
    ``bytes_written`` data written to the target, ``bytes_zeroed`` zero runs, whether written as zeroes or
    skipped because the target reads as zeroes already. With a backing file (``-B``) the runs it provides
    are in none of them; ``bytes_offloaded`` is the part of ``bytes_written`` copied host file to host
    file (``-C``), ``bytes_salvaged`` what ``--salvage`` turned into zeroes; ``seconds`` is the wall
    time of the whole call."""

    total: int
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_zeroed: int = 0
    bytes_offloaded: int = 0
    bytes_salvaged: int = 0
    seconds: float = 0.0


def check_flags(o: ConvertOptions, *, options_given: bool | None = None) -> None:
    """The refusals qemu-img 7.2 makes of a flag combination before it opens anything, in its order."""
    if o.compress and o.copy_range:
        raise InvalidArgumentError("Cannot enable copy offloading when -c is used")
    if o.sparse_explicit and o.copy_range:
        raise InvalidArgumentError("Cannot enable copy offloading when -S is used")
    if o.copy_range and o.salvage:
        raise InvalidArgumentError("Cannot use copy offloading in salvaging mode")
    if o.skip_create and (bool(o.options) if options_given is None else options_given):
        raise InvalidArgumentError("-o has no effect when skipping image creation")
    if o.target_is_zero and not o.skip_create:
        raise InvalidArgumentError("--target-is-zero requires use of -n flag")


def check_values(o: ConvertOptions) -> None:
    """-m, -S and -r out of qemu-img 7.2's ranges, refused with its messages."""
    if o.parallel < 1 or o.parallel > MAX_COROUTINES:
        raise InvalidArgumentError("Invalid number of coroutines. Allowed number of coroutines is between 1 "
                                   f"and {MAX_COROUTINES}")
    if o.sparse_size < 0 or o.sparse_size % 512 or o.sparse_size > MAX_SPARSE:
        raise InvalidArgumentError("Invalid buffer size for sparse output specified. Valid sizes are "
                                   f"multiples of 512 up to {MAX_SPARSE}. Select 0 to disable sparse "
                                   "detection (fully allocates output).")
    if o.rate_limit < 0 or o.rate_limit > INT64_MAX:
        raise InvalidArgumentError(f"Invalid rate limit specified. Must be between 0 and {INT64_MAX}.")


class _Tally:
    """Counts the bytes done for the progress callback, out of ``counted`` (what the first pass found to
    count: data, and zeroes written as data), and keeps the statistics, in guest bytes."""

    def __init__(self, total: int, progress: ProgressFn | None) -> None:
        self.stats = ConvertStats(total)
        self.progress = progress
        self.counted = 0
        self.done = 0
        # qemu-img's progress steps for the runs handed out, reported as the copied bytes reach them
        self.steps: collections.deque[int] = collections.deque()
        self.copied = 0

    def add(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.counted)

    def plan(self, step: int) -> None:
        self.steps.append(step)

    def copied_bytes(self, n: int) -> None:
        """Chunks finish in any order, but the steps were planned over the same bytes, so the copied total
        passes each step's end once its bytes (or as many others) are on the target."""
        self.copied += n
        while self.steps and self.done + self.steps[0] <= self.copied:
            self.add(self.steps.popleft())


class _Throttle:
    """qemu's throttle for ``-r`` (a leaky bucket on the target's writes, THROTTLE_BPS_WRITE with no burst
    setting): a request may start while the bucket holds at most a tenth of a second's worth, and then
    pours its whole length in; the bucket drains at the rate. So a 2 MiB chunk waits for the previous
    one to drain, and 4 MiB at 1 MiB/s take about two seconds, as with qemu-img."""

    def __init__(self, rate: int) -> None:
        self.rate = float(rate)
        self.level = 0.0
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        async with self.lock:  # one request at a time, in arrival order, as qemu's throttle group queues
            while True:
                now = time.monotonic()
                self.level = max(0.0, self.level - (now - self.stamp) * self.rate)
                self.stamp = now
                extra = self.level - self.rate / 10
                if extra <= 0:
                    break
                await asyncio.sleep(extra / self.rate)
            self.level += n


class _Compressor:
    """Compresses whole runs of clusters for ``-c``: one task per run, in worker processes or, without
    them, in the I/O thread pool (zlib and zstd release the GIL there)."""

    def __init__(self, cluster: int, ctype: str, workers: int) -> None:
        self.cluster = cluster
        self.ctype = ctype
        self.pool: ProcessPoolExecutor | None = None
        if workers > 0:
            # imported here: the process pool's modules cost every other convert's start-up 10 ms
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # forkserver: a fork of this process would copy the event loop's threads' state
            self.pool = ProcessPoolExecutor(max_workers=workers,
                                            mp_context=multiprocessing.get_context("forkserver"))

    async def compress(self, data: memoryview) -> list[bytes | None]:
        if self.pool is None:
            return await run_blocking(compress_clusters, data, self.cluster, self.ctype)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, compress_clusters, bytes(data), self.cluster,
                                          self.ctype)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


async def _cancel(writes: list[asyncio.Future[None]]) -> None:
    """Cancel and wait out a copier's writes: none may outlive the copier, since they read its buffer."""
    for t in writes:
        t.cancel()
    await asyncio.gather(*writes, return_exceptions=True)


def _copy_file_range(src_fd: int, src_off: int, dst_fd: int, dst_off: int, length: int) -> None:
    while length > 0:
        n = os.copy_file_range(src_fd, dst_fd, length, src_off, dst_off)
        if n <= 0:
            raise OSError(errno.EIO, "copy_file_range copied nothing")
        src_off += n
        dst_off += n
        length -= n


# (kind, global offset, length, block-status warnings to give before the run is copied)
Run = tuple[int, int, int, tuple[str, ...]]


class _Copier:
    def __init__(self, o: ConvertOptions, sources: list[BlockDriver], target: BlockDriver,
                 zero_init: bool, top_only: bool, tally: _Tally, cancel: asyncio.Event | None,
                 warn: WarnFn | None) -> None:
        self.o = o
        self.sources = sources
        self.bases: list[int] = []
        base = 0
        for src in sources:
            self.bases.append(base)
            base += src.size
        self.target = target
        self.zero_init = zero_init
        self.top_only = top_only
        self.tally = tally
        self.stats = tally.stats
        self.cancel = cancel
        self.warn = warn
        self.queue: asyncio.Queue[tuple[int, int, int, int, tuple[str, ...]] | None] = asyncio.Queue(
            maxsize=o.parallel * 2)
        # Chunks take their turn to write in guest order: the copier of chunk ``seq`` waits on its own
        # future, which the copier of ``seq - 1`` completes (one wake-up per chunk, not one per copier).
        self.next_seq = 0
        self.turn_waiters: dict[int, asyncio.Future[None]] = {}
        self.throttle = _Throttle(o.rate_limit) if o.rate_limit else None
        self.compressor: _Compressor | None = None
        self.compressed_write = None
        self.cluster = 0
        if o.compress:
            self.cluster = target.cluster_size() or 0
            packed_write = getattr(target, "write_compressed_clusters", None)
            if packed_write is not None and self.cluster:
                ctype = ((target.format_specific() or {}).get("data") or {}).get("compression-type", "zlib")
                self.compressor = _Compressor(self.cluster, ctype, o.compress_workers)
                self.packed_write = packed_write
            else:
                self.compressed_write = getattr(target, "write_compressed", None)
        # -C: host to host copies need a target whose guest offsets are its file's (raw)
        self.offload_to = target.data_host_file() if o.copy_range and target.format_name == "raw" else None
        if self.offload_to is not None and not self.offload_to.local:
            self.offload_to = None

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def _warn(self, text: str) -> None:
        # --salvage's warnings are qemu-img's qprintf-like ones: -q silences them
        if self.warn is not None and not self.o.quiet:
            self.warn(text)

    def _part(self, offset: int) -> int:
        """The index of the source that holds global ``offset``."""
        # an empty source shares its base with the next one: bisect picks the last of them
        return max(0, bisect.bisect_right(self.bases, offset) - 1)

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(source index, source offset, length) pieces of a global range, which may cross sources."""
        out: list[tuple[int, int, int]] = []
        i = self._part(offset)
        end = offset + length
        while offset < end:
            while offset >= self.bases[i] + self.sources[i].size:
                i += 1
            n = min(end, self.bases[i] + self.sources[i].size) - offset
            out.append((i, offset - self.bases[i], n))
            offset += n
        return out

    # -- what to copy ------------------------------------------------------------------------------
    def _kind(self, e: Extent) -> int:
        if self.top_only and (e.depth > 0 or not e.present):
            return SKIP
        return ZERO if e.zero else DATA

    async def _source_runs(self, idx: int) -> AsyncIterator[tuple[int, int, int, str | None]]:
        """(kind, source offset, length, warning) runs of one source. A block-status error aborts, as in
        qemu-img; with --salvage the query is retried on ever shorter ranges (a quarter each time) down to
        one sector, which is then taken for data with a warning."""
        src = self.sources[idx]
        size = src.size
        pos = 0
        while pos < size:
            before = pos
            try:
                async for e in src.extents(pos, size - pos):
                    yield self._kind(e), e.start, e.length, None
                    pos = e.start + e.length
            except BlockError as exc:
                if not self.o.salvage:
                    raise HostIOError(f"error while reading block status at offset {pos}: "
                                      f"{os.strerror(exc.errno)}") from None
                n = -(-(size - pos) // SECTOR)
                err = exc
                while True:
                    if n == 1:
                        note = f"error while reading block status at offset {pos}: {os.strerror(err.errno)}"
                        yield DATA, pos, min(SECTOR, size - pos), note
                        pos += SECTOR
                        break
                    n = -(-n // 4)
                    try:
                        got = [e async for e in src.extents(pos, min(n * SECTOR, size - pos))]
                    except BlockError as again:
                        err = again
                        continue
                    for e in got:
                        yield self._kind(e), e.start, e.length, None
                        pos = e.start + e.length
                    break
                continue
            if pos == before:
                break  # a driver that maps nothing more: nothing more to copy

    async def _runs(self, starts: collections.deque[int] | None = None) -> AsyncIterator[Run]:
        """Runs over all sources in global offsets, adjacent ones of a kind merged (a salvaged sector
        stays a run of its own, carrying its warning); ``starts`` gets where each block-status answer
        began, merged or not."""
        pending: list[Any] | None = None  # kind, start, length, notes
        for idx in range(len(self.sources)):
            base = self.bases[idx]
            async for kind, start, length, note in self._source_runs(idx):
                start += base
                if starts is not None:
                    starts.append(start)
                if (note is None and pending is not None and not pending[3] and pending[0] == kind
                        and pending[1] + pending[2] == start):
                    pending[2] += length
                    continue
                if pending is not None:
                    yield pending[0], pending[1], pending[2], pending[3]
                pending = [kind, start, length, (note,) if note else ()]
        if pending is not None:
            yield pending[0], pending[1], pending[2], pending[3]

    async def _whole_clusters(self, runs: AsyncIterator[Run], cluster: int) -> AsyncIterator[Run]:
        """Runs whose data parts cover whole target clusters, for compressed writes (a compressed cluster is
        written whole: two runs sharing one would each overwrite the other's half). Zero and skipped runs
        give up their partial clusters at either edge, which are read as data instead, across sources
        where a cluster spans two of them, as qemu-img reads them."""
        pending: list[Any] | None = None  # a DATA run being extended: kind, start, length, notes

        async for kind, start, length, notes in runs:
            end = start + length
            pieces: list[list[Any]] = []
            if kind == DATA:
                pieces.append([DATA, start, length, notes])
            else:
                zs = -(-start // cluster) * cluster
                ze = end // cluster * cluster
                if zs >= ze:
                    pieces.append([DATA, start, length, ()])
                else:
                    if start < zs:
                        pieces.append([DATA, start, zs - start, ()])
                    pieces.append([kind, zs, ze - zs, ()])
                    if ze < end:
                        pieces.append([DATA, ze, end - ze, ()])
            for p in pieces:
                if pending is not None and p[0] == pending[0] == DATA and pending[1] + pending[2] == p[1]:
                    pending[2] += p[2]
                    pending[3] += p[3]
                    continue
                if pending is not None:
                    yield pending[0], pending[1], pending[2], pending[3]
                pending = p
        if pending is not None:
            yield pending[0], pending[1], pending[2], pending[3]

    def _planned_runs(self, starts: collections.deque[int] | None = None) -> AsyncIterator[Run]:
        runs = self._runs(starts)
        if self.cluster and (self.compressor is not None or self.compressed_write is not None):
            runs = self._whole_clusters(runs, self.cluster)
        return runs

    def counts(self, kind: int) -> bool:
        """Whether a chunk of ``kind`` counts for the progress, as in qemu-img: data, and zeroes when they
        are written as data (-S 0); skipped runs and zeroes left to the target do not."""
        return kind == DATA or (kind == ZERO and not self.o.sparse_size)

    async def prescan(self) -> int:
        """Walk the block status once before copying, as qemu-img's counting pass does, and return the
        bytes the progress counts (its allocated_sectors): with --salvage the warnings come out then, and
        again while copying."""
        counted = 0
        async for kind, _start, length, notes in self._planned_runs():
            for note in notes:
                self._warn(note)
            if self.counts(kind):
                counted += length
            if self.cancelled():
                break
        return counted

    def _count(self, kind: int, start: int, length: int, starts: collections.deque[int]) -> None:
        """Progress for a run as qemu-img counts it, when a copier takes each of its chunks: a cluster
        at a time for a compressed target, else up to 2 MiB from the start of each block-status answer
        (qemu's chunks follow the answers; ours, the guest's 2 MiB boundaries)."""
        end = start + length
        cuts = [start]
        while starts and starts[0] < end:
            at = starts.popleft()
            if at > start:
                cuts.append(at)
        cuts.append(end)
        if not self.counts(kind):
            return
        compressed = self.compressor is not None or self.compressed_write is not None
        step = CHUNK
        if compressed:
            # whole clusters from the run's start, which _whole_clusters aligned
            step, cuts = self.cluster or CHUNK, [start, end]
        for a, b in itertools.pairwise(cuts):
            for pos in range(a, b, step):
                self.tally.plan(min(step, b - pos))

    async def produce(self) -> None:
        seq = 0
        starts: collections.deque[int] = collections.deque()
        async for kind, start, length, notes in self._planned_runs(starts):
            self._count(kind, start, length, starts)
            # -S 0 writes zeroes as data, in chunks as qemu-img does (so -r paces them as it does)
            step = CHUNK if kind == DATA or not self.o.sparse_size else ZERO_CHUNK
            pos = 0
            while pos < length and not self.cancelled():
                # Chunks end on chunk boundaries of the guest address space, so targets see aligned writes.
                n = min(length - pos, step - ((start + pos) % step))
                await self.queue.put((seq, kind, start + pos, n, notes if pos == 0 else ()))
                seq += 1
                pos += n
            if self.cancelled():
                break
        for _ in range(self.o.parallel):
            await self.queue.put(None)

    # -- ordering ----------------------------------------------------------------------------------
    async def _wait_turn(self, seq: int) -> None:
        if self.o.out_of_order or self.next_seq == seq:
            return
        fut = self.turn_waiters[seq] = asyncio.get_running_loop().create_future()
        try:
            await fut
        finally:
            del self.turn_waiters[seq]

    def _done_turn(self, seq: int) -> None:
        if self.o.out_of_order:
            return
        self.next_seq = seq + 1
        fut = self.turn_waiters.get(seq + 1)
        if fut is not None and not fut.done():
            fut.set_result(None)

    # -- reading -----------------------------------------------------------------------------------
    async def _read(self, offset: int, view: memoryview) -> None:
        pos = 0
        for idx, src_off, n in self._pieces(offset, len(view)):
            await self.sources[idx].readinto(src_off, view[pos:pos + n])
            pos += n

    async def _read_salvaged(self, offset: int, view: memoryview) -> None:
        """--salvage: read each source piece again, sector by sector where the piece fails; a sector that
        still fails reads as zeroes, with qemu-img's warning naming its offset in its source."""
        pos = 0
        for idx, src_off, n in self._pieces(offset, len(view)):
            src = self.sources[idx]
            piece = view[pos:pos + n]
            pos += n
            try:
                await src.readinto(src_off, piece)
                continue
            except BlockError:
                pass
            for s in range(0, n, SECTOR):
                sector = piece[s:s + SECTOR]
                try:
                    await src.readinto(src_off + s, sector)
                except BlockError as exc:
                    self._warn(f"error while reading offset {src_off + s}: {os.strerror(exc.errno)}")
                    sector[:] = bytes(len(sector))
                    self.stats.bytes_salvaged += len(sector)

    # -- writing -----------------------------------------------------------------------------------
    async def _zero(self, offset: int, length: int) -> None:
        # -S 0 asks for a fully allocated target, so even known-zero runs are written.
        if self.zero_init and not self.top_only and self.o.sparse_size > 0:
            return
        if self.throttle is not None:
            await self.throttle.take(length)
        if not self.o.sparse_size:
            # qemu-img writes a buffer of zeroes, so every cluster is allocated as data (zero runs come
            # in chunks of at most CHUNK with -S 0)
            await self.target.write(offset, memoryview(_ZERO)[:length])
            return
        await self.target.write_zeroes(offset, length, may_trim=True, fast=False)

    async def _write(self, offset: int, data: memoryview, packed: list[bytes | None] | None) -> None:
        if self.throttle is not None:
            await self.throttle.take(len(data))
        if packed is not None:
            try:
                await self.packed_write(offset, data, packed)
            except BlockError as exc:
                exc.convert_offset = offset  # type: ignore[attr-defined]
                raise
        elif self.compressed_write is not None:
            await self.compressed_write(offset, data)
        else:
            await self.target.write(offset, data)

    async def _offload(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        """-C: copy a data chunk's runs host file to host file with copy_file_range, as qemu's copy_range
        does. Returns the (start, end) parts of the chunk, relative to it, that are left to copy the
        ordinary way (compressed or backing data, which have no host run of their own), or None when the
        file system refuses the copy: the whole chunk is then copied the ordinary way and -C given up, as
        qemu-img falls back."""
        assert self.offload_to is not None
        plan: list[tuple[int, int, int, int]] = []  # src fd (-1: ordinary), host offset, target offset, len
        for idx, src_off, n in self._pieces(offset, length):
            src = self.sources[idx]
            hf = src.data_host_file()
            async for e in src.extents(src_off, n):
                dst = self.bases[idx] + e.start
                if (hf is not None and hf.local and e.data and not e.zero and e.depth == 0
                        and e.offset is not None and not e.compressed):
                    plan.append((hf.fd, e.offset, dst, e.length))
                else:
                    plan.append((-1, 0, dst, e.length))
        dst_fd = self.offload_to.fd
        rest: list[tuple[int, int]] = []
        for fd, host, dst, n in plan:
            if fd < 0:
                rest.append((dst - offset, dst - offset + n))
                continue
            try:
                await run_blocking(_copy_file_range, fd, host, dst_fd, dst, n)
            except OSError:
                return None
            self.stats.bytes_written += n
            self.stats.bytes_offloaded += n
            self.stats.bytes_read += n
        return rest

    async def work(self) -> None:
        # page-aligned: the kernel copies into and out of it at twice the speed of a bytearray's own
        buf = aligned_bytearray(CHUNK)
        mv = memoryview(buf)
        sparse = min(self.o.sparse_size, CHUNK)
        if self.cluster and sparse and (self.compressor is not None or self.compressed_write is not None):
            # compressed clusters are written whole, so zeroes are detected cluster by cluster, as
            # qemu-img convert -c does
            sparse = self.cluster
        while True:
            item = await self.queue.get()
            if item is None:
                return
            seq, kind, offset, length, notes = item
            if self.cancelled():
                # Between chunks is the safe point: the chunk is not copied but its turn is passed on, so
                # every copier drains the queue and stops with its writes complete and the target whole.
                await self._wait_turn(seq)
                self._done_turn(seq)
                continue
            started: list[asyncio.Future[None]] = []
            packs: list[list[bytes | None]] = []
            have_turn = False
            try:
                if notes:
                    # a salvaged sector's warnings come out in guest order, before its read's
                    await self._wait_turn(seq)
                    have_turn = True
                    for note in notes:
                        self._warn(note)
                parts = [(0, length)]
                if kind == DATA and self.offload_to is not None:
                    await self._wait_turn(seq)
                    have_turn = True
                    rest = await self._offload(offset, length)
                    if rest is None:
                        self.offload_to = None  # qemu-img gives -C up at the first refusal, and copies on
                    else:
                        parts = rest
                runs = []
                for a, b in parts if kind == DATA else []:
                    view = mv[a:b]
                    try:
                        await self._read(offset + a, view)
                    except BlockError as exc:
                        if not self.o.salvage:
                            # qemu-img convert names the failed read by its guest offset and errno only
                            raise HostIOError(
                                f"error while reading at byte {offset}: {os.strerror(exc.errno)}") from None
                        if not have_turn:
                            await self._wait_turn(seq)
                            have_turn = True
                        await self._read_salvaged(offset + a, view)
                    self.stats.bytes_read += b - a
                    # On the loop's thread: the scan holds the GIL wherever it runs, and a chunk of data is
                    # told from zeroes in microseconds, less than a hand-over to a worker costs.
                    runs += [(a, b, False)] if sparse == 0 else _zero_runs(buf, a, b, sparse)
                    if self.compressor is not None:
                        # compressed before the turn, so that chunks compress in parallel while the
                        # writes, and so the clusters' allocation, stay in guest order
                        packs = await asyncio.gather(*(self.compressor.compress(mv[a:b])
                                                       for a, b, zero in runs if not zero))
                if kind == ZERO:
                    runs = [(0, length, True)]
                if not have_turn:
                    await self._wait_turn(seq)
                it = iter(packs)
                started = [asyncio.ensure_future(self._flush_run(offset, mv, a, b, zero,
                                                                 None if zero else next(it, None)))
                           for a, b, zero in runs]
                if started and not self.o.out_of_order:
                    # One loop turn lets each write reach the target's allocation queue, so clusters are
                    # allocated in guest order; the writes themselves then overlap the next chunk's.
                    await asyncio.sleep(0)
            except BaseException:
                await _cancel(started)
                raise
            finally:
                self._done_turn(seq)
            try:
                await asyncio.gather(*started)
                if self.counts(kind):
                    self.tally.copied_bytes(length)
            except BlockError as exc:
                await _cancel(started)
                # qemu-img names a failed write by where its request began (a compressed cluster's own)
                at = getattr(exc, "convert_offset", offset)
                raise HostIOError(f"error while writing at byte {at}: {os.strerror(exc.errno)}") from None
            except BaseException:
                await _cancel(started)
                raise

    async def _flush_run(self, offset: int, mv: memoryview, a: int, b: int, zero: bool,
                         packed: list[bytes | None] | None) -> None:
        if zero:
            await self._zero(offset + a, b - a)
            self.stats.bytes_zeroed += b - a
        else:
            await self._write(offset + a, mv[a:b], packed)
            self.stats.bytes_written += b - a


def _driver_class(fmt: str) -> type | None:
    """The driver class of a format qemu can write compressed (qcow2, vmdk, qcow), imported on demand."""
    if fmt == "qcow2":
        from ..formats.qcow2.driver import Qcow2Driver
        return Qcow2Driver
    if fmt == "vmdk":
        from ..formats.vmdk.driver import VmdkDriver
        return VmdkDriver
    if fmt == "qcow":
        from ..formats.qcow.driver import QcowDriver
        return QcowDriver
    return None


def _check_compression(fmt: str, options: dict[str, str]) -> None:
    """Refuse -c before the target is created, as qemu-img does, so a refusal leaves no file behind."""
    cls = _driver_class(fmt)
    if cls is None:
        raise UnsupportedError("Compression not supported for this file format")
    if options.get("encryption", "off") not in ("off", "false", "no") or options.get("encrypt.format"):
        raise UnsupportedError("Compression and encryption not supported at the same time")
    if options.get("preallocation", "off") != "off":
        raise UnsupportedError("Compression and preallocation not supported at the same time")
    if getattr(cls, "write_compressed", None) is None:
        raise UnsupportedError(f"Compressed writes are not supported by the {fmt} driver yet")


async def convert(o: ConvertOptions, *, opener: ImageOpener | None = None, progress: ProgressFn | None = None,
                  cancel: asyncio.Event | None = None, warn: WarnFn | None = None) -> ConvertStats:
    """Copy ``o.sources`` into ``o.target``; never prints (``o.progress`` and ``o.quiet`` are the CLI's).

    ``progress`` gets (bytes done, total) once before the copy starts and after every chunk; ``warn``
    gets qemu-img's warning texts (--salvage's unreadable sectors). When ``cancel`` is set the copiers
    finish the chunks they are writing and take no more, everything is closed, a target this call
    created is deleted (an existing one, with ``-n``, stays, partly written but consistent) and
    OperationCancelledError is raised.
    """
    began = time.monotonic()
    opener = opener or ImageOpener(lock=True)
    src_opener = copy.copy(opener)
    src_opener.force_share = o.force_share
    check_values(o)
    check_flags(o)
    if not o.sources:
        raise InvalidArgumentError("Must specify image file name")
    check_cancelled(cancel)
    sources: list[BlockDriver] = []
    target: BlockDriver | None = None
    created = False
    cancelled = False
    compressor: _Compressor | None = None
    try:
        if o.snapshot is not None and "id-or-name" in o.snapshot and len(o.sources) > 1:
            raise InvalidArgumentError("No support for concatenating multiple snapshot")
        for i, path in enumerate(o.sources):
            # -l shows an internal snapshot of the (first) source, as qemu-img's snapshot_load_tmp does
            snap = o.snapshot if i == 0 else None
            try:
                src = await open_image(path, o.src_fmt, read_only=True, opener=src_opener,
                                       options={"snapshot": snap} if snap is not None else None)
            except SnapshotNotFoundError as exc:
                raise SnapshotNotFoundError(f"Failed to load snapshot: {exc}") from None
            sources.append(src)
            if snap is not None:
                require_snapshot_loaded(src)
        if o.force_share:
            # Without -U our own source locks refuse the target; with it, compare inodes instead.
            for path in o.sources:
                if same_file(path, o.target):
                    raise InvalidArgumentError(
                        f"{o.target}: error while converting {o.out_fmt}: the target is the source "
                        f"image '{path}'")
        total = sum(s.size for s in sources)
        options = _create_options(o) if not o.skip_create else {}
        # -B, or -o backing_file: the target's unallocated runs show its backing file (with -n too, where
        # qemu-img takes -B to mean the target has one)
        backing = options.get("backing_file") or o.backing
        if o.target_is_zero and backing:
            # qemu-img 7.2 (and 10) print this and exit 0 having done nothing; a refusal is an error here
            raise InvalidArgumentError("Cannot use --target-is-zero when the destination image has a "
                                       "backing file")
        if len(sources) > 1 and backing:
            raise InvalidArgumentError("Having a backing file for the target makes no sense when "
                                       "concatenating multiple input images")
        if options.get("backing_file") and "backing_fmt" not in options:
            raise InvalidArgumentError("Use of backing file requires explicit backing format")
        if o.compress:
            _check_compression(o.out_fmt, options)
        if o.bitmaps:
            from .bitmap import check_convert_source

            check_convert_source(sources, skip_broken=o.skip_broken_bitmaps)
        if not o.skip_create:
            options.pop("size", None)
            check_cancelled(cancel)
            try:
                # as qemu-img's bdrv_create, without opening the backing file: the target's open below
                # reports a backing file that does not open, as qemu-img does (the target stays)
                await create_image(o.target, o.out_fmt, total, options, opener=opener, unsafe=True)
            except BlockError as exc:
                exc.message = f"{o.target}: error while converting {o.out_fmt}: {exc}"
                raise
            # from here on a cancelled convert removes the target it made
            created = True
        if o.cache not in CACHE_MODES:
            # qemu-img looks at -t only now, with the target made (which it leaves)
            raise InvalidArgumentError(f"Invalid cache option: {o.cache}")
        target_opener = opener
        if o.cache == "unsafe" and opener.sync:
            target_opener = opener.unsynced()
        # the target opens with the secrets its -o options named, as qemu-img's img_add_key_secrets
        keys = {k: v for k, v in options.items() if k in ("key-secret", "encrypt.key-secret")}
        target = await open_image(o.target, o.out_fmt, read_only=False, opener=target_opener,
                                  options=keys or None)
        if o.skip_create and target.size < total:
            raise InvalidArgumentError("output file is smaller than input file")
        if o.compress and getattr(target, "write_compressed", None) is None:
            raise UnsupportedError(f"Compressed writes are not supported by the {o.out_fmt} driver yet")
        if o.compress and not target.cluster_size():
            # a format without clusters (a flat vmdk): qemu-img refuses it once the target is made
            raise InvalidArgumentError("invalid cluster size")
        if o.bitmaps:
            from .bitmap import check_convert_target

            check_convert_target(target, o.out_fmt)
        # a new file reads as zeroes; an NBD export "created" over keeps its old bytes (qemu's
        # bdrv_has_zero_init is 0 for nbd), so its zero runs are written
        zero_init = o.target_is_zero or (not o.skip_create and not is_special(o.target)
                                         and target.has_zero_init())
        check_cancelled(cancel)
        tally = _Tally(total, progress)
        copier = _Copier(o, sources, target, zero_init, bool(backing), tally, cancel, warn)
        compressor = copier.compressor
        if o.salvage or progress is not None:
            # the progress is a share of the bytes the copy counts, found by this first pass
            tally.counted = await copier.prescan()
        tally.add(0)
        workers = [asyncio.create_task(copier.work()) for _ in range(o.parallel)]
        producer = asyncio.create_task(copier.produce())
        try:
            await asyncio.gather(producer, *workers)
        except BaseException:
            for t in (producer, *workers):
                t.cancel()
            await asyncio.gather(producer, *workers, return_exceptions=True)
            raise
        check_cancelled(cancel)
        if o.compress and getattr(target, "external_data", False):
            # qemu-img ends a compressed copy with an empty compressed write, which a qcow2 image with a
            # data file refuses: it exits 1 there without a word, and so does the CLI (the message is
            # for the admin socket)
            refused = HostIOError(f"error while writing at byte 0: {os.strerror(errno.ENOTSUP)}")
            refused.cli_silent = True
            raise refused
        if o.compress and target.format_name == "qcow":
            # the same empty compressed write, which qemu's qcow driver refuses (EINVAL) once every
            # cluster is in: qemu-img 7.2 (and 10) exit 1 there without a word, the CLI too
            await target.flush()
            refused = HostIOError(f"error while writing at byte 0: {os.strerror(errno.EINVAL)}")
            refused.cli_silent = True
            raise refused
        await target.flush()
        if o.bitmaps:
            from .bitmap import copy_bitmaps

            await copy_bitmaps(sources[0], target, skip_broken=o.skip_broken_bitmaps, warn=warn)
        if progress is not None:
            progress(tally.counted, tally.counted)
        tally.stats.seconds = time.monotonic() - began
        return tally.stats
    except OperationCancelledError:
        cancelled = True
        raise
    finally:
        if compressor is not None:
            compressor.close()
        if target is not None:
            await _close_quietly(target, cancelled)
        for s in sources:
            await s.close()
        if cancelled and created:
            _remove_target(o.target)


def _create_options(o: ConvertOptions) -> dict[str, str]:
    """The target's creation options, -o's and then -B/-F's, refused in qemu-img 7.2's order and words."""
    check_format(o.out_fmt)
    options = dict(o.options)
    validate_options(o.out_fmt, options)
    known = {opt.name for opt in all_options(o.out_fmt)}
    if o.backing is not None:
        if "backing_file" not in known:
            raise InvalidArgumentError(f"Backing file not supported for file format '{o.out_fmt}'")
        options["backing_file"] = o.backing
    if o.backing_fmt is not None:
        if "backing_fmt" not in known:
            raise InvalidArgumentError(f"Backing file format not supported for file format '{o.out_fmt}'")
        options["backing_fmt"] = o.backing_fmt
    return options


async def _close_quietly(target: BlockDriver, cancelled: bool) -> None:
    """Close the target; after a cancellation the file is about to go, so its close may fail unheard."""
    if not cancelled:
        await target.close()
        return
    try:
        await target.close()
    except BlockError:
        pass


def _remove_target(path: str) -> None:
    if is_special(path):
        return  # an NBD export is not ours to remove
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise HostIOError.from_oserror(exc, f"Could not remove '{path}'") from None
