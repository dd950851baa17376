"""`commit`: copy what an overlay holds into its backing file (or a base further down), as qemu-img 7.2's
commit does it, and empty the overlay afterwards.

qemu-img runs an active commit job: the top image opens read-write over a read-only chain, the base is then
reopened read-write (a base smaller than the top grows to the top's size), every range allocated above
the base is copied into it (ranges that read as zeroes written as zeroes), and, unless told not to (-d;
-b implies it), the top is emptied so that it reads through to the base again. The same happens here
through the BlockDriver interface, with several copies in flight.

Locks and messages are qemu-img's: the top holds the writer's lock bytes, the backing chain the reader's
as it opens (a chain another process writes is refused with "Could not open backing file: ..."), the base
then the writer's ("Failed to get "write" lock" when anyone else has it open) and the images between top
and base refuse to share consistent reads ("Failed to get shared "consistent read" lock").

Data safety: the base is flushed before the top is touched, so at no point does data live in neither.
A cancelled commit stops between chunks, flushes what reached the base and leaves the top as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass

from ..driver import BlockDriver, ImageOpener, block_layer_error
from ..errors import (
    BlockError,
    CancelledJobError,
    ImageLockedError,
    InvalidArgumentError,
    UnsupportedError,
)
from ..hostio import HostFile, aligned_buffer
from ..locking import CONSISTENT_READ, WRITE_UNCHANGED, lock_image
from .common import (
    ProgressFn,
    Writeback,
    check_cancelled,
    open_image,
    report,
)

# qemu's bdrv_parse_cache_mode names ("off" is "none")
CACHE_MODES = ("none", "off", "writeback", "unsafe", "directsync", "writethrough")
# how qemu-img reports an error that stopped its commit job
JOB_FAILED = "Block job failed: "
# The most one copy step moves, and how many steps are in flight at once: large enough that the per-step
# cost vanishes, small enough that a cancellation or a rate limit takes hold quickly (qemu's mirror job
# moves 1 MiB at a time too). Each step in flight has a buffer of its own, reused: a fresh one per step
# would cost a page fault per page.
CHUNK = 1 << 20
PARALLEL = 8
# With a rate limit, steps shrink so that the limit is kept over a tenth of a second or so (qemu's slice).
MIN_LIMITED_CHUNK = 64 << 10


@dataclass(slots=True)
class CommitResult:
    """What a finished commit did, in guest bytes.

    ``base`` is the image committed into (its path as opened), ``depth`` how far below the top it is.
    ``copied`` data bytes written into it, ``zeroed`` bytes written as zeroes; ``base_size`` its virtual
    size before, ``base_grown_to`` the size it grew to (None when it was large enough). ``emptied`` says
    whether the top was emptied; ``seconds`` is the wall time of the call.
    """

    path: str
    format: str
    base: str
    base_format: str
    depth: int
    size: int
    copied: int = 0
    zeroed: int = 0
    base_size: int = 0
    base_grown_to: int | None = None
    emptied: bool = False
    seconds: float = 0.0


class BaseNotFoundError(InvalidArgumentError):
    """-b names no image of the top's backing chain (or the top has no backing file)."""


async def _open_top(path: str, fmt: str | None, opener: ImageOpener) -> BlockDriver:
    return await open_image(path, fmt, read_only=False, opener=opener)


def _same_image(name: str, stored: str, image: str) -> bool:
    """Whether ``name`` (as -b gives it) and ``stored`` (an image's backing file name) are one file, both
    taken relative to ``image``'s folder, as qemu's bdrv_find_backing_image compares them."""
    folder = os.path.dirname(image)
    given = name if os.path.isabs(name) else os.path.join(folder, name)
    have = stored if os.path.isabs(stored) else os.path.join(folder, stored)
    return os.path.realpath(given) == os.path.realpath(have)


def find_base(top: BlockDriver, name: str | None) -> tuple[BlockDriver, BlockDriver, int]:
    """(the image above the base, the base, its depth below ``top``): the backing file named ``name``, or
    the immediate one. Raises BaseNotFoundError with qemu-img's message."""
    if name is None:
        if top.backing is None:
            raise BaseNotFoundError("Image does not have a backing file")
        return top, top.backing, 1
    cur, depth = top, 0
    while cur.backing is not None:
        stored = cur.backing_filename()
        if stored is not None and _same_image(name, stored, cur.filename):
            return cur, cur.backing, depth + 1
        cur, depth = cur.backing, depth + 1
    raise BaseNotFoundError(f"Did not find '{name}' in the backing chain of '{top.filename}'")


def _lock_intermediate(drv: BlockDriver) -> None:
    """A commit job's hold on an image between top and base: besides the chain's read, it shares neither
    consistent reads nor resizes, so no one else may read an image that is about to be bypassed."""
    hf = drv.data_host_file()
    if hf is None:
        return
    try:
        lock_image(hf.fd, write=False, perm=CONSISTENT_READ, shared=WRITE_UNCHANGED)
    except ImageLockedError as exc:
        exc.hint = f"Is another process using the image [{drv.filename}]?"
        raise


async def _reopen_writable(overlay: BlockDriver, base: BlockDriver, size: int, opener: ImageOpener
                           ) -> tuple[BlockDriver, int | None]:
    """Swap the read-only ``base`` under ``overlay`` for a writable instance of it, grown to ``size``
    when smaller (qemu's reopen of the base and the job's truncate); returns it and the size it grew to."""
    from . import resize as resize_op

    path, fmt, old = base.filename, base.format_name, base.size
    # the chain's read lock on the base would refuse our own writer: the read-only instance goes first
    overlay.backing = None
    await base.close()
    grown: int | None = None
    try:
        if old < size:
            try:
                await resize_op.resize(path, fmt, size, opener=opener)
            except UnsupportedError:
                raise BlockError(JOB_FAILED + "Operation not supported") from None
            grown = size
        rw = await opener.open(path, fmt, read_only=False,
                               options={"probed": True} if base.format_probed else None)
    except ImageLockedError as exc:
        # qemu's reopen of an image already open: no "Could not open" before the refusal
        block_layer_error(exc, "")
        raise
    overlay.backing = rw
    below = rw.backing
    if grown is not None and below is not None and below.size > old:
        # qemu's truncate zero-fills a grown part that the base's own backing file would otherwise show
        await rw.write_zeroes(old, size - old, may_trim=True, fast=False)
    return rw, grown


class _Copier:
    """Copies the ranges allocated above the base, several chunks in flight, under an optional rate."""

    def __init__(self, top: BlockDriver, base: BlockDriver, depth: int, floor: int, rate: int,
                 res: CommitResult, progress: ProgressFn | None, cancel: asyncio.Event | None) -> None:
        self.top, self.base, self.depth = top, base, depth
        # past the end of an image between top and base the top reads zeroes, whatever the base holds
        self.floor = floor
        self.rate = rate
        self.res = res
        self.progress = progress
        self.cancel = cancel
        # (whole 64 KiB pieces, so that a limited step does not split the clusters it writes)
        self.chunk = CHUNK if rate <= 0 else max(MIN_LIMITED_CHUNK, min(CHUNK, rate // 10) & ~0xFFFF)
        self.slots = asyncio.Semaphore(PARALLEL)
        self.buffers = [aligned_buffer(self.chunk) for _ in range(PARALLEL)]
        self.tasks: set[asyncio.Task[None]] = set()
        self.failed: BaseException | None = None
        self.began = time.monotonic()
        self.walked = 0
        self.writeback = Writeback(base)

    async def run(self) -> None:
        size = self.top.size
        report(self.progress, 0, size)
        try:
            async for e in self.top.extents(0, size):
                above = e.present and e.depth < self.depth
                if above:
                    await self._range(e.start, e.length, e.zero)
                elif e.end > self.floor:
                    lo = max(e.start, self.floor)
                    await self._range(lo, e.end - lo, True)
                self.walked = e.end
                if self.failed is None:
                    report(self.progress, self.walked, size)
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
        except BaseException:
            for t in self.tasks:
                t.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            raise
        if self.failed is not None:
            raise self.failed

    async def _range(self, start: int, length: int, zero: bool) -> None:
        pos, end = start, start + length
        step = max(self.chunk, 1 << 30) if zero else self.chunk
        while pos < end:
            if self.failed is not None:
                raise self.failed
            check_cancelled(self.cancel)
            n = min(step, end - pos)
            if not zero:
                await self._throttle(n)
            await self.slots.acquire()
            task = asyncio.create_task(self._one(pos, n, zero))
            self.tasks.add(task)
            task.add_done_callback(self._done)
            pos += n

    async def _throttle(self, n: int) -> None:
        """Hold a data chunk back until the bytes copied so far fit the rate (zeroes cost nothing, as in
        qemu's mirror job)."""
        if self.rate <= 0:
            return
        due = self.res.copied / self.rate - (time.monotonic() - self.began)
        if due > 0:
            await asyncio.sleep(due)
        self.res.copied += n  # counted when dispatched: the next chunk waits for this one's share

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.slots.release()
        if not task.cancelled() and task.exception() is not None and self.failed is None:
            self.failed = task.exception()

    async def _one(self, pos: int, n: int, zero: bool) -> None:
        if zero:
            await self.base.write_zeroes(pos, n, may_trim=True, fast=False)
            self.res.zeroed += n
            return
        buf = self.buffers.pop()
        try:
            mv = buf[:n]
            # from the page cache on the loop's thread when it can, while the writes go on in a worker:
            # a hand-off per read costs more than the copy on a busy machine
            if not self.top.readinto_nowait(pos, mv):
                await self.top.readinto(pos, mv)
            await self.base.write(pos, mv)
        finally:
            self.buffers.append(buf)
        if self.rate <= 0:
            self.res.copied += n
        self.writeback.wrote(n)


async def commit(path: str, fmt: str | None = None, *, base: str | None = None, drop: bool = False,
                 rate_limit: int = 0, cache: str = "writeback", opener: ImageOpener | None = None,
                 progress: ProgressFn | None = None, cancel: asyncio.Event | None = None) -> CommitResult:
    """Commit ``path`` into its backing file, or into ``base`` further down its chain; never prints.

    ``drop`` keeps the top as it is (qemu-img's -d; its -b implies it): otherwise a top committed into its
    immediate backing file is emptied afterwards (never when ``base`` lies deeper: the images between would
    show through). ``rate_limit`` caps the data copied in bytes per second (0: none). ``cache`` is
    qemu-img's -t: ``unsafe`` skips the syncs. ``progress`` gets (bytes of the top walked, its size) once
    the top is open and as the copy goes; when ``cancel`` is set the copy stops between chunks, the base
    is flushed and the top stays untouched.
    """
    began = time.monotonic()
    if cache not in CACHE_MODES:
        raise InvalidArgumentError(f"Invalid cache option: {cache}")
    if rate_limit < 0:
        raise InvalidArgumentError("rate limit must not be negative")
    opener = opener or ImageOpener(lock=True)
    if cache == "unsafe":
        opener = opener.unsynced()
    check_cancelled(cancel)
    top = await _open_top(path, fmt, opener)
    closed = False
    try:
        report(progress, 0, top.size)
        overlay, base_ro, depth = find_base(top, base)
        check_cancelled(cancel)
        between: list[BlockDriver] = []
        cur = top.backing
        while cur is not None and cur is not base_ro:
            between.append(cur)
            cur = cur.backing
        floor = min((d.size for d in between), default=top.size)
        base_drv, grown = await _reopen_writable(overlay, base_ro, top.size, opener)
        res = CommitResult(path, top.format_name, base_drv.filename, base_drv.format_name, depth, top.size,
                           base_size=base_ro.size, base_grown_to=grown)
        if opener.lock:
            for d in between:
                _lock_intermediate(d)
        copier = _Copier(top, base_drv, depth, floor, rate_limit, res, progress, cancel)
        try:
            await copier.run()
        except BaseException as exc:
            # whatever reached the base stays consistent and durable, also when the copy stopped; the
            # copy's own error is the one to report, worded as qemu-img words a failed job
            with contextlib.suppress(BlockError):
                await base_drv.flush()
            if isinstance(exc, BlockError) and not isinstance(exc, CancelledJobError) \
                    and not exc.message.startswith(JOB_FAILED):
                exc.message = JOB_FAILED + exc.message
            raise
        await base_drv.flush()
        report(progress, top.size, top.size)
        if not drop and depth == 1:
            hf = top.data_host_file()
            if top.format_name == "qcow2" and hf is not None and await _rewrites(hf):
                closed = True
                await top.close()
                await _empty_closed(path, opener)
                res.emptied = True
            else:
                res.emptied = await _empty_open(top)
        res.seconds = time.monotonic() - began
        return res
    finally:
        if not closed:
            await top.close()


async def _rewrites(hf: HostFile) -> bool:
    """Whether qemu empties this qcow2 image by rewriting it (else it discards every cluster)."""
    from ..formats.qcow2 import empty

    return await empty.completely_emptiable(hf)


async def _empty_closed(path: str, opener: ImageOpener) -> None:
    """qemu's make_completely_empty, on the closed top, reopened with the writer's lock bytes again."""
    from ..formats.qcow2 import empty

    hf = opener.open_file(path, read_only=False)
    try:
        await empty.make_completely_empty(hf)
    finally:
        hf.close()


async def _empty_open(top: BlockDriver) -> bool:
    """Empty the open top through its driver (qemu's bdrv_make_empty); False when its format cannot,
    which qemu-img lets pass."""
    try:
        await top.make_empty()
    except UnsupportedError:
        return False
    return True
