"""`convert`: copy one or more images (concatenated) into a new or existing target, keeping it sparse.

The source's extents decide what is read: zero and unallocated runs are never read, and data runs are read
in large chunks by ``-m`` concurrent tasks, then scanned for all-zero blocks of the ``-S`` size, which are
skipped too. Writes go out in guest order unless ``-W`` allows any order.
"""

from __future__ import annotations

import asyncio
import copy
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ..driver import BlockDriver, ImageOpener
from ..errors import (
    BlockError,
    HostIOError,
    InvalidArgumentError,
    OperationCancelledError,
    SnapshotNotFoundError,
    UnsupportedError,
)
from ..hostio import run_blocking
from .common import ProgressFn, check_cancelled, open_image, require_snapshot_loaded
from .create import check_format, create_image, same_file, validate_options

CHUNK = 2 << 20
# qemu-img 7.2's MAX_COROUTINES: -m takes 1 to 16 requests in flight
MAX_COROUTINES = 16
# qemu-img 7.2's largest -S; zeroes are looked for within a chunk, so past CHUNK the output is sparser
# than qemu-img's (the same data, more holes)
MAX_SPARSE = 16 << 20
ZERO_CHUNK = 64 << 20
_ZERO = bytes(CHUNK)


def _zero_runs(buf: bytearray, length: int, sparse: int) -> list[tuple[int, int, bool]]:
    """Split ``buf[:length]`` into (start, end, all_zero) runs at ``sparse``-byte granularity."""
    if buf.startswith(memoryview(_ZERO)[:length]):
        return [(0, length, True)]
    sw = buf.startswith
    zblock = _ZERO[:sparse]
    runs: list[tuple[int, int, bool]] = []
    run_start = 0
    run_zero: bool | None = None
    pos = 0
    while pos < length:
        n = min(sparse, length - pos)
        is_zero = sw(zblock if n == sparse else _ZERO[:n], pos)
        if run_zero is None:
            run_zero = is_zero
        elif is_zero != run_zero:
            runs.append((run_start, pos, run_zero))
            run_start, run_zero = pos, is_zero
        pos += n
    if run_zero is not None:
        runs.append((run_start, length, run_zero))
    return runs

DATA, ZERO, SKIP = 0, 1, 2


@dataclass(slots=True)
class ConvertOptions:
    sources: list[str]
    target: str
    src_fmt: str | None = None
    out_fmt: str = "raw"
    options: dict[str, str] = field(default_factory=dict)
    sparse_size: int = 4096
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
    # --bitmaps, --skip-broken-bitmaps (ops/bitmap.py does the work); ``warn`` prints qemu's warning lines
    bitmaps: bool = False
    skip_broken_bitmaps: bool = False
    warn: Callable[[str], None] | None = None


@dataclass(slots=True)
class ConvertStats:
    """What a finished convert moved, in guest bytes: ``bytes_read`` data read from the sources,
    ``bytes_written`` data written to the target, ``bytes_zeroed`` zero runs, whether written as zeroes or
    skipped because the target reads as zeroes already. With a backing file (``-B``) the runs it provides
    are in none of them; ``seconds`` is the wall time of the whole call."""

    total: int
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_zeroed: int = 0
    seconds: float = 0.0


class _Tally:
    """Counts the bytes done for the progress callback and the statistics, in guest bytes."""

    def __init__(self, total: int, progress: ProgressFn | None) -> None:
        self.stats = ConvertStats(total)
        self.progress = progress
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.stats.total)


async def _runs(sources: list[BlockDriver], top_only: bool) -> AsyncIterator[tuple[int, int, int, int, int]]:
    """(kind, global offset, length, source index, source offset) runs; adjacent runs of a kind merged."""
    base = 0
    pending: list[int] | None = None  # kind, start, length, src, src_off
    for idx, src in enumerate(sources):
        async for e in src.extents(0, src.size):
            if top_only and (e.depth > 0 or not e.present):
                kind = SKIP
            elif e.zero:
                kind = ZERO
            else:
                kind = DATA
            start = base + e.start
            if (pending is not None and pending[0] == kind and pending[1] + pending[2] == start
                    and (kind != DATA or pending[3] == idx)):
                pending[2] += e.length
                continue
            if pending is not None:
                yield pending[0], pending[1], pending[2], pending[3], pending[4]
            pending = [kind, start, e.length, idx, e.start]
        base += src.size
    if pending is not None:
        yield pending[0], pending[1], pending[2], pending[3], pending[4]


async def _whole_clusters(runs: AsyncIterator[tuple[int, int, int, int, int]], cluster: int
                          ) -> AsyncIterator[tuple[int, int, int, int, int]]:
    """Runs whose data parts cover whole target clusters, for compressed writes (a compressed cluster is
    written whole: two runs sharing one would each overwrite the other's half). Zero and skipped runs
    give up their partial clusters at either edge, which are read as data instead."""
    pending: list[int] | None = None  # a DATA run being extended: kind, start, length, src, src_off

    def data(start: int, end: int, idx: int, src_off: int) -> list[int]:
        return [DATA, start, end - start, idx, src_off]

    async for kind, start, length, idx, src_off in runs:
        end = start + length
        pieces: list[list[int]] = []
        if kind == DATA:
            pieces.append(data(start, end, idx, src_off))
        else:
            zs = -(-start // cluster) * cluster
            ze = end // cluster * cluster
            if zs >= ze:
                pieces.append(data(start, end, idx, src_off))
            else:
                if start < zs:
                    pieces.append(data(start, zs, idx, src_off))
                pieces.append([kind, zs, ze - zs, idx, src_off + zs - start])
                if ze < end:
                    pieces.append(data(ze, end, idx, src_off + ze - start))
        for p in pieces:
            if (pending is not None and p[0] == pending[0] == DATA and pending[3] == p[3]
                    and pending[1] + pending[2] == p[1]):
                pending[2] += p[2]
                continue
            if pending is not None:
                yield pending[0], pending[1], pending[2], pending[3], pending[4]
            pending = p
    if pending is not None:
        yield pending[0], pending[1], pending[2], pending[3], pending[4]


async def _cancel(writes: list[asyncio.Future[None]]) -> None:
    """Cancel and wait out a copier's writes: none may outlive the copier, since they read its buffer."""
    for t in writes:
        t.cancel()
    await asyncio.gather(*writes, return_exceptions=True)


class _Copier:
    def __init__(self, o: ConvertOptions, sources: list[BlockDriver], target: BlockDriver,
                 zero_init: bool, tally: _Tally, cancel: asyncio.Event | None) -> None:
        self.o = o
        self.sources = sources
        self.target = target
        self.zero_init = zero_init
        self.tally = tally
        self.stats = tally.stats
        self.cancel = cancel
        self.queue: asyncio.Queue[tuple[int, int, int, int, int, int] | None] = asyncio.Queue(
            maxsize=o.parallel * 2)
        self.next_seq = 0
        self.turn = asyncio.Condition()
        self.compressed_write = getattr(target, "write_compressed", None)

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    async def produce(self) -> None:
        seq = 0
        runs = _runs(self.sources, self.o.backing is not None)
        cluster = self.target.cluster_size() if self.o.compress and self.compressed_write else None
        if cluster:
            runs = _whole_clusters(runs, cluster)
        async for kind, start, length, idx, src_off in runs:
            step = CHUNK if kind == DATA else ZERO_CHUNK
            pos = 0
            while pos < length and not self.cancelled():
                # Chunks end on chunk boundaries of the guest address space, so targets see aligned writes.
                n = min(length - pos, step - ((start + pos) % step))
                await self.queue.put((seq, kind, start + pos, n, idx, src_off + pos))
                seq += 1
                pos += n
            if self.cancelled():
                break
        for _ in range(self.o.parallel):
            await self.queue.put(None)

    async def _wait_turn(self, seq: int) -> None:
        if self.o.out_of_order:
            return
        async with self.turn:
            await self.turn.wait_for(lambda: self.next_seq == seq)

    async def _done_turn(self, seq: int) -> None:
        if self.o.out_of_order:
            return
        async with self.turn:
            self.next_seq = seq + 1
            self.turn.notify_all()

    async def _zero(self, offset: int, length: int) -> None:
        # -S 0 asks for a fully allocated target, so even known-zero runs are written.
        if self.zero_init and self.o.backing is None and self.o.sparse_size > 0:
            return
        await self.target.write_zeroes(offset, length, may_trim=self.o.sparse_size > 0, fast=False)

    async def _write(self, offset: int, data: memoryview) -> None:
        if self.compressed_write is not None and self.o.compress:
            await self.compressed_write(offset, data)
        else:
            await self.target.write(offset, data)

    async def work(self) -> None:
        buf = bytearray(CHUNK)
        mv = memoryview(buf)
        sparse = min(self.o.sparse_size, CHUNK)
        if self.o.compress and self.compressed_write is not None and sparse:
            # compressed clusters are written whole, so zeroes are detected cluster by cluster, as
            # qemu-img convert -c does
            sparse = self.target.cluster_size() or sparse
        while True:
            item = await self.queue.get()
            if item is None:
                return
            seq, kind, offset, length, idx, src_off = item
            if self.cancelled():
                # Between chunks is the safe point: the chunk is not copied but its turn is passed on, so
                # every copier drains the queue and stops with its writes complete and the target whole.
                await self._wait_turn(seq)
                await self._done_turn(seq)
                continue
            started: list[asyncio.Future[None]] = []
            try:
                if kind == DATA:
                    try:
                        await self.sources[idx].readinto(src_off, mv[:length])
                    except BlockError as exc:
                        # qemu-img convert names the failed read by its guest offset and errno only
                        raise HostIOError(
                            f"error while reading at byte {offset}: {os.strerror(exc.errno)}") from None
                    self.stats.bytes_read += length
                    # Scanning 2 MiB for zeroes is a memcmp that holds the GIL but needs no loop: in a worker
                    # it overlaps with the other copiers' reads and writes.
                    runs = ([(0, length, False)] if sparse == 0
                            else await run_blocking(_zero_runs, buf, length, sparse))
                else:
                    runs = [(0, length, True)] if kind == ZERO else []
                await self._wait_turn(seq)
                started = [asyncio.ensure_future(self._flush_run(offset, mv, a, b, zero))
                           for a, b, zero in runs]
                if started and not self.o.out_of_order:
                    # One loop turn lets each write reach the target's allocation queue, so clusters are
                    # allocated in guest order; the writes themselves then overlap the next chunk's.
                    await asyncio.sleep(0)
            except BaseException:
                await _cancel(started)
                raise
            finally:
                await self._done_turn(seq)
            try:
                await asyncio.gather(*started)
            except BaseException:
                await _cancel(started)
                raise
            self.tally.add(length)

    async def _flush_run(self, offset: int, mv: memoryview, a: int, b: int, zero: bool) -> None:
        if zero:
            await self._zero(offset + a, b - a)
            self.stats.bytes_zeroed += b - a
        else:
            await self._write(offset + a, mv[a:b])
            self.stats.bytes_written += b - a


def _driver_class(fmt: str) -> type | None:
    """The driver class of a format qemu can write compressed (qcow2, vmdk), imported on demand."""
    if fmt == "qcow2":
        from ..formats.qcow2.driver import Qcow2Driver
        return Qcow2Driver
    if fmt == "vmdk":
        from ..formats.vmdk.driver import VmdkDriver
        return VmdkDriver
    return None


def _check_compression(fmt: str) -> None:
    """Refuse -c before the target is created, as qemu-img does, so a refusal leaves no file behind."""
    cls = _driver_class(fmt)
    if cls is None:
        raise UnsupportedError("Compression not supported for this file format")
    if getattr(cls, "write_compressed", None) is None:
        raise UnsupportedError(f"Compressed writes are not supported by the {fmt} driver yet")


async def convert(o: ConvertOptions, *, opener: ImageOpener | None = None, progress: ProgressFn | None = None,
                  cancel: asyncio.Event | None = None) -> ConvertStats:
    """Copy ``o.sources`` into ``o.target``; never prints (``o.progress`` and ``o.quiet`` are the CLI's).

    ``progress`` gets (bytes done, total) once before the copy starts and after every chunk. When
    ``cancel`` is set the copiers finish the chunks they are writing and take no more, everything is
    closed, a target this call created is deleted (an existing one, with ``-n``, stays, partly written
    but consistent) and OperationCancelledError is raised.
    """
    began = time.monotonic()
    opener = opener or ImageOpener(lock=True)
    src_opener = copy.copy(opener)
    src_opener.force_share = o.force_share
    if o.parallel < 1 or o.parallel > MAX_COROUTINES:
        raise InvalidArgumentError("Invalid number of coroutines. Allowed number of coroutines is between 1 "
                                   f"and {MAX_COROUTINES}")
    if o.sparse_size < 0 or o.sparse_size % 512 or o.sparse_size > MAX_SPARSE:
        raise InvalidArgumentError("Invalid buffer size for sparse output specified. Valid sizes are "
                                   f"multiples of 512 up to {MAX_SPARSE}. Select 0 to disable sparse "
                                   "detection (fully allocates output).")
    if o.backing is not None and o.skip_create:
        raise InvalidArgumentError("Specifying backing image makes no sense when not creating target image, "
                                   "please use -o backing_file=... instead")
    if o.backing is not None and len(o.sources) > 1:
        raise InvalidArgumentError("Specifying a backing file is not supported with multiple sources")
    check_cancelled(cancel)
    sources: list[BlockDriver] = []
    target: BlockDriver | None = None
    created = False
    cancelled = False
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
        check_format(o.out_fmt)
        if o.compress:
            _check_compression(o.out_fmt)
        if o.bitmaps:
            from .bitmap import check_convert_source

            check_convert_source(sources, skip_broken=o.skip_broken_bitmaps)
        if not o.skip_create:
            options = dict(o.options)
            if o.backing is not None:
                options["backing_file"] = o.backing
                if o.backing_fmt is not None:
                    options["backing_fmt"] = o.backing_fmt
            if options.get("backing_file"):
                # -o backing_file=... gives the target a backing file just as -B does
                o.backing = options["backing_file"]
            validate_options(o.out_fmt, options)
            options.pop("size", None)
            if options.get("backing_file") and "backing_fmt" not in options:
                raise InvalidArgumentError("Backing file specified without backing format")
            check_cancelled(cancel)
            try:
                await create_image(o.target, o.out_fmt, total, options, opener=opener)
            except BlockError as exc:
                exc.message = f"{o.target}: error while converting {o.out_fmt}: {exc}"
                raise
            # from here on a cancelled convert removes the target it made
            created = True
        target_opener = opener
        if o.cache == "unsafe" and opener.sync:
            target_opener = copy.copy(opener)
            target_opener.sync = False
        target = await open_image(o.target, o.out_fmt, read_only=False, opener=target_opener)
        if target.size < total:
            raise InvalidArgumentError(f"Error: target image ({target.size} bytes) is smaller than the "
                                       f"source ({total} bytes)")
        if o.compress and getattr(target, "write_compressed", None) is None:
            raise UnsupportedError(f"Compressed writes are not supported by the {o.out_fmt} driver yet")
        if o.bitmaps:
            from .bitmap import check_convert_target

            check_convert_target(target, o.out_fmt)
        zero_init = o.target_is_zero or not o.skip_create
        check_cancelled(cancel)
        tally = _Tally(total, progress)
        tally.add(0)
        copier = _Copier(o, sources, target, zero_init, tally, cancel)
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
        await target.flush()
        if o.bitmaps:
            from .bitmap import copy_bitmaps

            await copy_bitmaps(sources[0], target, skip_broken=o.skip_broken_bitmaps, warn=o.warn)
        if progress is not None:
            progress(total, total)
        tally.stats.seconds = time.monotonic() - began
        return tally.stats
    except OperationCancelledError:
        cancelled = True
        raise
    finally:
        if target is not None:
            await _close_quietly(target, cancelled)
        for s in sources:
            await s.close()
        if cancelled and created:
            _remove_target(o.target)


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
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise HostIOError.from_oserror(exc, f"Could not remove '{path}'") from None
