"""A block driver on a Ceph RBD image through librbd (Debian's python3-rbd), as QEMU's block/rbd.c is one.

Nothing here blocks the event loop. Data requests use librbd's asynchronous calls (aio_read, aio_write,
aio_write_zeroes, aio_discard, aio_flush): librbd runs the completion callback on one of its own threads,
which queues the result for the loop; one ``call_soon_threadsafe`` wakes the loop for every result queued
before it runs (under a queue depth of 16, one wake-up settles several requests). The calls that have no
asynchronous form (connecting, opening and closing an image, taking its lock, diff_iterate for block
status) run in the loop's default executor.

A writable instance takes the image's exclusive lock with ``lock_acquire``: librbd then refuses every
other client's request for it (instead of handing the lock over, as it does for clients that merely
write), so two nodes never write one image. The lock is librbd's managed lock, tied to this client's
watch on the image: it goes when the image is closed, and when the client dies, once the cluster notices
(the OSDs' watch timeout, 30 s by default) and the next client that asks breaks it.

Block status comes from ``diff_iterate`` (RBD's object map with fast-diff, else a scan of the image's
objects), the same call `rbd diff` makes: a range it does not report is unallocated and reads as zeroes.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno as errno_mod
import functools
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from .driver import BlockDriver, Capabilities
from .errors import (
    BlockError,
    HostIOError,
    ImageLockedError,
    UnsupportedError,
)
from .extent import Extent, amerge_extents

T = TypeVar("T")

# The first range block status asks diff_iterate about (see RbdDriver.extents): four default objects
_FIRST_DIFF_WINDOW = 16 << 20

# librbd's threads that keep a Python thread state of their own (see _keep_thread_state)
_kept = threading.local()
threads_kept = 0  # how many threads keep one (a test holds it bounded by librbd's threads)


def _keep_thread_state() -> None:
    """Keep the calling librbd thread's Python thread state for the next completion callback.

    The binding enters Python from librbd's threads with ``PyGILState_Ensure`` and leaves with
    ``PyGILState_Release``: a thread Python did not start gets a thread state made for the one call and
    destroyed after it, and CPython 3.11 maps and unmaps a 16 KiB frame stack with it. The unmap flushes
    the TLB of every CPU the process runs on. Once per completion, that held 4 KiB random reads on an RBD
    volume to about two thirds of what they reach without it (docs/benchmarks.md). One more
    ``PyGILState_Ensure`` on the thread, never released, makes the binding's Release leave the state in
    place. librbd runs a fixed set of threads per cluster connection, so this keeps a few states per
    connection (those of a connection that is shut down stay until the process exits). A
    ``threading.local`` lives in the thread state, so it tells whether this thread's state is kept.
    """
    global threads_kept
    if getattr(_kept, "state", False):
        return
    _kept.state = True
    threads_kept += 1
    if sys.implementation.name == "cpython":
        ctypes.pythonapi.PyGILState_Ensure()


# librbd's own lines on stderr would interleave with the server's log: its log goes to its log file only
QUIET = {"log_to_stderr": "false", "err_to_stderr": "false"}


def modules() -> tuple[Any, Any]:
    """The rados and rbd modules (Debian's python3-rados/python3-rbd), or UnsupportedError."""
    try:
        import rados
        import rbd
    except ImportError:
        raise UnsupportedError("RBD needs Debian's python3-rados and python3-rbd (importable only from "
                               "/usr/bin/python3 or a venv made with --system-site-packages)") from None
    return rados, rbd


def _errno(exc: BaseException) -> int:
    code = getattr(exc, "errno", None)
    return abs(code) if isinstance(code, int) and code else errno_mod.EIO


def ceph_error(exc: BaseException, what: str) -> BlockError:
    """One of our errors for an exception of rados or rbd (their classes carry an errno)."""
    code = _errno(exc)
    return HostIOError.from_oserror(OSError(code, os.strerror(code)), what)


async def blocking(fn: Callable[..., T], *args: Any, executor: Executor | None = None, what: str = "rbd",
                   **kwargs: Any) -> T:
    """Run one of librbd's or librados's blocking calls off the loop; their errors become ours."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(executor, functools.partial(fn, *args, **kwargs))
    except BlockError:
        raise
    except Exception as exc:
        if type(exc).__module__ in ("rados", "rbd"):
            raise ceph_error(exc, what) from None
        raise


class Cluster:
    """One connection (a librados client) to a Ceph cluster and an I/O context on one pool and namespace;
    every image of an RBD pool is opened through it."""

    def __init__(self, rados: Any, ioctx: Any) -> None:
        self.rados = rados
        self.ioctx = ioctx

    @classmethod
    async def connect(cls, *, conf: str | None, client: str | None, pool: str,
                      namespace: str | None = None, timeout: float = 30) -> Cluster:
        rados_mod, _ = modules()

        def connect() -> Cluster:
            r = rados_mod.Rados(conffile=conf or "", name=f"client.{client or 'admin'}")
            try:
                for key, value in QUIET.items():
                    r.conf_set(key, value)
                r.connect(timeout=int(timeout))
                ioctx = r.open_ioctx(pool)
                if namespace:
                    ioctx.set_namespace(namespace)
            except BaseException:
                r.shutdown()
                raise
            return cls(r, ioctx)

        return await blocking(connect, what=f"cannot connect to Ceph pool '{pool}'")

    async def close(self) -> None:
        def close() -> None:
            self.ioctx.close()
            self.rados.shutdown()
        await blocking(close)


class RbdDriver(BlockDriver):
    """An open RBD image (or one of its snapshots, read-only)."""

    format_name = "raw"
    reports_dirty = False
    # diff_iterate is a blocking call (a thread hop each), and without fast-diff a listing of every object
    # the range touches from its OSD: dearer than the zeroes of a hole, which librbd makes up locally
    sparse_reads = False

    def __init__(self, image: Any, name: str, size: int, *, read_only: bool, locked: bool) -> None:
        self.image = image
        self.filename = name
        self.size = size
        self.read_only = read_only
        self.locked = locked
        self._loop = asyncio.get_running_loop()
        # results of finished aio calls, queued by librbd's threads until the loop settles them
        self._results: list[tuple[Callable[[int, tuple[Any, ...]], None], int, tuple[Any, ...]]] = []
        self._results_lock = threading.Lock()
        self._wake_queued = False
        self._closed = False
        self.caps = Capabilities(writable=not read_only, zero=not read_only, fast_zero=False,
                                 trim=not read_only, flush=True, fua=not read_only, extents=True,
                                 multi_conn=True, cache=False, min_block=1, pref_block=4096,
                                 max_block=32 * 1024 * 1024)

    @classmethod
    async def open(cls, cluster: Cluster, name: str, *, read_only: bool, snapshot: str | None = None,
                   lock: bool = True, describe: bool = False) -> RbdDriver:
        """Open image ``name``; writable, it takes the exclusive lock (unless ``lock`` is False).

        ``describe`` opens it read-only in librbd and without the lock, but reports the capabilities a
        writable open would have (for NBD_OPT_INFO, which must not disturb the image's writer).
        """
        _, rbd = modules()
        ro = read_only or describe or snapshot is not None
        image = await blocking(rbd.Image, cluster.ioctx, name, snapshot=snapshot, read_only=ro,
                               what=f"cannot open RBD image '{name}'")
        locked = False
        try:
            if not ro and lock:
                await cls._acquire(image, name, rbd)
                locked = True
            size = await blocking(image.size)
        except BaseException:
            await blocking(image.close)
            raise
        drv = cls(image, name, int(size), read_only=ro, locked=locked)
        if describe and not read_only and snapshot is None:
            drv.caps = Capabilities(writable=True, zero=True, trim=True, fua=True, extents=True,
                                    multi_conn=True, cache=False, pref_block=4096)
        return drv

    @staticmethod
    async def _acquire(image: Any, name: str, rbd: Any) -> None:
        if not image.features() & rbd.RBD_FEATURE_EXCLUSIVE_LOCK:
            raise UnsupportedError(f"RBD image '{name}' lacks the exclusive-lock feature: two nodes could "
                                   "write it at once (rbd feature enable IMAGE exclusive-lock)")
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, image.lock_acquire, rbd.RBD_LOCK_MODE_EXCLUSIVE)
        except Exception as exc:
            if type(exc).__module__ != "rbd":
                raise
            if _errno(exc) in (errno_mod.EROFS, errno_mod.EBUSY, errno_mod.EAGAIN):
                owners = await _owners(image)
                raise ImageLockedError(f"RBD image '{name}' is locked by another client{owners} "
                                       "(exclusive-lock)") from None
            raise ceph_error(exc, f"cannot lock RBD image '{name}'") from None

    # -- the asynchronous calls -----------------------------------------------------------------------
    def _aio(self, start: Callable[[Callable[..., None]], Any], what: str,
             keep: object = None) -> asyncio.Future[Any]:
        """Start one aio call; the future gets (return value, extra callback arguments) on the loop.

        ``keep`` (a write's payload) stays referenced until librbd calls back, even when the caller has
        gone (a cancelled request): with zero-copy writes (``rbd_disable_zero_copy_writes = false`` in
        ceph.conf) librbd reads the caller's buffer until then."""
        loop = self._loop
        fut: asyncio.Future[Any] = loop.create_future()

        def settle(rv: int, extra: tuple[Any, ...]) -> None:
            if fut.done():
                return
            if rv < 0:
                fut.set_exception(HostIOError.from_oserror(OSError(-rv, os.strerror(-rv)),
                                                           f"{what} failed on RBD image '{self.filename}'"))
            else:
                fut.set_result((rv, extra))

        def done(completion: Any, *extra: Any, _keep: object = keep) -> None:  # on a librbd thread
            _keep_thread_state()
            with self._results_lock:
                self._results.append((settle, completion.get_return_value(), extra))
                if self._wake_queued:
                    return  # the loop is woken already and settles this one too
                self._wake_queued = True
            try:
                loop.call_soon_threadsafe(self._settle_results)
            except RuntimeError:
                pass  # the loop has closed: no one waits for this answer any more

        try:
            start(done)
        except Exception as exc:
            if type(exc).__module__ == "rbd":
                raise ceph_error(exc, what) from None
            raise
        return fut

    def _settle_results(self) -> None:
        with self._results_lock:
            results, self._results = self._results, []
            self._wake_queued = False
        for settle, rv, extra in results:
            settle(rv, extra)

    async def readinto(self, offset: int, buf: memoryview) -> None:
        _, extra = await self._aio(lambda cb: self.image.aio_read(offset, len(buf), cb), "read")
        data = extra[0] if extra else b""
        n = len(data)
        buf[:n] = data
        if n < len(buf):  # librbd returns short only past the end; the range was validated
            buf[n:] = bytes(len(buf) - n)

    def _start_write(self, offset: int, data: memoryview) -> asyncio.Future[Any]:
        # librbd's binding takes bytes or a bytearray, not a view: the buffer under a view that covers
        # all of it (an NBD request's payload) goes as it is. librbd copies it before aio_write returns
        # (rbd_disable_zero_copy_writes, on by default); _aio keeps it referenced until the completion
        # anyway, for a ceph.conf that turns zero-copy writes on.
        obj = data.obj
        payload = obj if isinstance(obj, (bytearray, bytes)) and data.nbytes == len(obj) else bytes(data)
        return self._aio(lambda cb: self.image.aio_write(payload, offset, cb), "write", payload)

    def write_started(self, offset: int, data: memoryview) -> asyncio.Future[None] | bool:
        # the server's write without a task: the future of librbd's call itself
        if self.read_only:
            return False  # write() gives the error
        return self._start_write(offset, data)

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        await self._start_write(offset, data)
        if fua:
            await self.flush()

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool,
                           fua: bool = False) -> None:
        if fast:
            # librbd cannot say whether zeroing a range will be cheap (it may write zeroes)
            raise UnsupportedError("fast zeroing is not supported on RBD")
        await self._aio(lambda cb: self.image.aio_write_zeroes(offset, length, cb), "write zeroes")
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._aio(lambda cb: self.image.aio_discard(offset, length, cb), "discard")
        if fua:
            await self.flush()

    async def flush(self) -> None:
        if not self.read_only:
            await self._aio(lambda cb: self.image.aio_flush(cb), "flush")

    async def extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        async for e in amerge_extents(self._window_extents(offset, length)):
            yield e

    async def _window_extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        # One diff_iterate per window, 16 MiB first and each next one 16 times larger: a block-status
        # request with NBD_CMD_FLAG_REQ_ONE (QEMU's always has it) wants one run, and a diff of the rest
        # of the image for each made QEMU's map of a fragmented volume cost the square of its runs.
        # (qemu's rbd driver stops its diff_iterate at the first run for the same reason.)
        pos, end = offset, offset + length
        window = _FIRST_DIFF_WINDOW
        while pos < end:
            wend = min(end, pos + window)
            window *= 16
            runs: list[tuple[int, int]] = []

            def collect(off: int, n: int, exists: bool, runs: list[tuple[int, int]] = runs) -> int:
                if exists:
                    runs.append((off, n))
                return 0

            await blocking(self.image.diff_iterate, pos, wend - pos, None, collect, include_parent=True,
                           whole_object=False, what=f"block status of RBD image '{self.filename}'")
            for off, n in sorted(runs):
                start, stop = max(off, pos), min(off + n, wend)
                if stop <= start:
                    continue
                if start > pos:
                    yield Extent(pos, start - pos, data=False, zero=True, present=False)
                yield Extent(start, stop - start, data=True, zero=False)
                pos = stop
            if pos < wend:
                yield Extent(pos, wend - pos, data=False, zero=True, present=False)
            pos = wend

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        image = self.image

        def close() -> None:
            try:
                if self.locked:
                    image.lock_release()
            finally:
                image.close()
        await blocking(close, what=f"cannot close RBD image '{self.filename}'")


async def _owners(image: Any) -> str:
    try:
        owners = await blocking(image.lock_get_owners)
        names = [str(o.get("owner", "")) for o in owners]
    except BlockError:
        return ""
    return f" ({', '.join(names)})" if names else ""
