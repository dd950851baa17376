"""`bench`: qemu-img 7.2's I/O benchmark, requests kept in flight against an image through its driver.

The run is qemu-img's img_bench: ``count`` requests of ``bufsize`` bytes, reads or writes of a pattern
byte, ``depth`` of them in flight; the first at ``offset``, each next one ``step`` bytes further (wrapping
at the end of the image as qemu-img 7.2 wraps, so a request may run past the end and fail as there). With
``flush_interval`` a flush follows every that many requests, after the requests in flight have drained
unless ``drain`` is off. Only the run is timed: opening and closing the image are not.

Requests go through the BlockDriver interface on the event loop, each one its own task; a read the page
cache can serve completes inline, without one. The cache and aio modes are accepted as qemu-img accepts
them (and ``aio=native`` refused without a direct cache, as it is refused there), but requests take the
driver's own paths: there is no O_DIRECT and no Linux AIO here, so a read may be served from the page
cache where qemu-img with ``-t none`` reads the disk.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..driver import BlockDriver, ImageOpener, image_open_error
from ..errors import BlockError, InvalidArgumentError, OperationCancelledError
from ..hostio import aligned_buffer
from .common import INT64_MAX, check_cancelled, check_image_path

INT_MAX = (1 << 31) - 1
# qemu's bdrv_parse_cache_mode and bdrv_parse_aio names
CACHE_MODES = ("none", "off", "writeback", "unsafe", "directsync", "writethrough")
DIRECT_CACHE_MODES = ("none", "off", "directsync")
AIO_MODES = ("threads", "native", "io_uring")


@dataclass(slots=True)
class BenchOptions:
    """qemu-img bench's options, with its defaults."""

    count: int = 75000
    depth: int = 64
    offset: int = 0
    bufsize: int = 4096
    step: int = 0  # 0: the buffer size
    write: bool = False
    pattern: int = 0
    flush_interval: int = 0
    drain: bool = True
    cache: str = "writeback"
    aio: str = "threads"
    force_share: bool = False
    fmt: str | None = None


@dataclass(slots=True)
class BenchResult:
    """What ran: the figures of qemu-img's first line, the image's size and the run's wall time."""

    count: int
    write: bool
    bufsize: int
    depth: int
    offset: int
    step: int
    flush_interval: int
    image_size: int = 0
    seconds: float = 0.0
    flushes: int = 0

    def header(self) -> list[str]:
        """qemu-img bench's lines before the run."""
        lines = [f"Sending {self.count} {'write' if self.write else 'read'} requests, {self.bufsize} bytes "
                 f"each, {self.depth} in parallel (starting at offset {self.offset}, step size {self.step})"]
        if self.flush_interval:
            lines.append(f"Sending flush every {self.flush_interval} requests")
        return lines

    def footer(self) -> str:
        return "Run completed in %3.3f seconds." % self.seconds  # noqa: UP031 - C printf semantics


class BenchFailedError(BlockError):
    """A request or flush failed; the message is qemu-img's ("Failed request: Input/output error")."""


def validate(o: BenchOptions) -> None:
    """qemu-img's checks before the image is opened, in its order, with its messages."""
    bounds = (("request count", o.count, 0, INT_MAX), ("queue depth", o.depth, 1, INT_MAX),
              ("offset", o.offset, 0, INT64_MAX), ("buffer size", o.bufsize, 0, INT_MAX),
              ("step_size", o.step, 0, INT_MAX), ("pattern byte", o.pattern, 0, 0xFF),
              ("flush interval", o.flush_interval, 0, INT_MAX))
    for name, value, low, high in bounds:
        if not low <= value <= high:
            raise InvalidArgumentError(f"Invalid {name} specified. Must be between {low} and {high}.")
    if o.cache not in CACHE_MODES:
        raise InvalidArgumentError("Invalid cache mode")
    if o.aio not in AIO_MODES:
        raise InvalidArgumentError(f"Invalid aio option: {o.aio}")
    if not o.write and o.flush_interval:
        raise InvalidArgumentError("--flush-interval is only available in write tests")
    if o.flush_interval and o.flush_interval < o.depth:
        raise InvalidArgumentError("Flush interval can't be smaller than depth")


class _Run:
    """qemu-img's bench_cb as a state machine: issue while below the depth, count completions, flush every
    ``flush_interval`` requests (waiting for the queue to drain first unless told not to)."""

    def __init__(self, drv: BlockDriver, o: BenchOptions, res: BenchResult) -> None:
        self.drv = drv
        self.o = o
        self.res = res
        self.size = drv.size
        self.n = o.count
        self.in_flight = 0
        self.in_flush = False
        self.offset = o.offset
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending: set[asyncio.Future[None]] = set()
        self.failed: BaseException | None = None
        slots = min(o.depth, o.count)
        try:
            if o.write:
                self.pattern = memoryview(bytes([o.pattern]) * o.bufsize)
                self.buffers: list[memoryview] = []
            else:
                self.buffers = [aligned_buffer(o.bufsize) for _ in range(slots)]
        except MemoryError:
            raise BlockError(f"Could not allocate {slots * o.bufsize} bytes for the request buffers: "
                             f"{os.strerror(_errno.ENOMEM)}") from None

    def start(self) -> None:
        self._pump()
        self._check_done()

    def _next_offset(self) -> int:
        off = self.offset
        # qemu-img 7.2 wraps at the image's end, not at the last offset a whole request fits at
        self.offset = (self.offset + self.res.step) % self.size if self.size else 0
        return off

    def _fits(self, off: int) -> bool:
        return off <= self.size and self.size - off >= self.o.bufsize

    def _pump(self) -> None:
        """Issue requests while there are some left and room in flight (qemu's while loop)."""
        o = self.o
        while self.failed is None and not self.in_flush and self.n > self.in_flight and \
                self.in_flight < o.depth:
            off = self._next_offset()
            self.in_flight += 1
            if not self._fits(off):
                # qemu's block layer refuses a request past the end before the driver sees it
                self._fail(BenchFailedError(f"Failed request: {os.strerror(_errno.EIO)}"))
                return
            if not o.write:
                buf = self.buffers.pop()
                if not o.bufsize or self.drv.readinto_nowait(off, buf):
                    self.buffers.append(buf)
                    if not self._complete():
                        return
                    continue
                fut = asyncio.ensure_future(self._read(off, buf))
            elif not o.bufsize:
                if not self._complete():
                    return
                continue
            else:
                fut = asyncio.ensure_future(self.drv.write(off, self.pattern))
            self.pending.add(fut)
            fut.add_done_callback(self._request_done)

    async def _read(self, off: int, buf: memoryview) -> None:
        try:
            await self.drv.readinto(off, buf)
        finally:
            self.buffers.append(buf)

    def _ended_badly(self, fut: asyncio.Future[None], what: str) -> bool:
        """Whether ``fut``, done, was cancelled or failed; a failure fails the bench as qemu-img words it
        (``Failed request: ...``, ``Failed flush request: ...``)."""
        self.pending.discard(fut)
        if fut.cancelled():
            return True
        exc = fut.exception()
        if exc is None:
            return False
        code = exc.errno if isinstance(exc, BlockError) else _errno.EIO
        self._fail(BenchFailedError(f"Failed {what}: {os.strerror(code)}"))
        return True

    def _request_done(self, fut: asyncio.Future[None]) -> None:
        if self._ended_badly(fut, "request"):
            return
        if self._complete():
            self._pump()
        self._check_done()

    def _complete(self) -> bool:
        """Count one finished request; False when no new request may start (a drained flush is due)."""
        remaining = self.n - self.in_flight
        self.n -= 1
        self.in_flight -= 1
        every = self.o.flush_interval
        if every and remaining % every == 0:
            if self.in_flight == 0 or not self.o.drain:
                self._flush()
            if self.o.drain:
                return False
        return True

    def _flush(self) -> None:
        self.res.flushes += 1
        if self.o.drain:
            self.in_flush = True
        fut = asyncio.ensure_future(self.drv.flush())
        self.pending.add(fut)
        fut.add_done_callback(self._flush_done)

    def _flush_done(self, fut: asyncio.Future[None]) -> None:
        if self._ended_badly(fut, "flush request"):
            return
        if self.o.drain:
            self.in_flush = False
            self._pump()
        self._check_done()

    def _fail(self, exc: BaseException) -> None:
        if self.failed is None:
            self.failed = exc
            if not self.done.done():
                self.done.set_exception(exc)

    def _check_done(self) -> None:
        if self.n == 0 and not self.done.done():
            self.done.set_result(None)

    async def settle(self) -> None:
        """Wait for what is still in flight (an undrained flush, or requests after a failure)."""
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)


async def _open(path: str, o: BenchOptions, opener: ImageOpener) -> BlockDriver:
    check_image_path(path, read_only=not o.write)
    if o.aio == "native" and o.cache not in DIRECT_CACHE_MODES:
        raise InvalidArgumentError(f"Could not open '{path}': aio=native was specified, but it requires "
                                   "cache.direct=on, which was not specified.")
    try:
        return await opener.open(path, o.fmt, read_only=not o.write)
    except OperationCancelledError:
        raise
    except BlockError as exc:
        image_open_error(exc, path)
        raise


async def bench(path: str, o: BenchOptions, *, opener: ImageOpener | None = None,
                on_start: Callable[[BenchResult], None] | None = None,
                cancel: asyncio.Event | None = None) -> BenchResult:
    """Run qemu-img bench's requests against ``path``; never prints.

    ``on_start`` gets the result's figures once the image is open and before the first request (the CLI
    prints qemu-img's first lines then). A failed request or flush raises BenchFailedError; ``cancel``
    stops the run between requests.
    """
    validate(o)
    opener = opener or ImageOpener(lock=True, force_share=o.force_share)
    if o.cache == "unsafe" and opener.sync:
        opener = opener.unsynced()
    check_cancelled(cancel)
    drv = await _open(path, o, opener)
    try:
        res = BenchResult(o.count, o.write, o.bufsize, o.depth, o.offset, o.step or o.bufsize,
                          o.flush_interval, image_size=drv.size)
        if on_start is not None:
            on_start(res)
        run = _Run(drv, o, res)
        began = time.monotonic()
        run.start()
        waiter: asyncio.Future[None] = run.done
        watch: list[asyncio.Future[Any]] = [waiter]
        if cancel is not None:
            watch.append(asyncio.ensure_future(cancel.wait()))
        try:
            await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in watch[1:]:
                fut.cancel()
        res.seconds = time.monotonic() - began
        if not waiter.done():
            run.failed = OperationCancelledError()
            waiter.cancel()
            await run.settle()
            raise OperationCancelledError()
        await run.settle()
        waiter.result()
        return res
    finally:
        await drv.close()
