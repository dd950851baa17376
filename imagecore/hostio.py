"""HostFile: non-blocking access to a host file descriptor for the event loop.

Reads first try ``preadv(RWF_NOWAIT)`` inline, which serves page-cache hits without a thread hop; a
would-block or short read falls back to a bounded thread pool. Writes, syncs and fallocate always go to the
pool, so the loop never waits on the disk.

HostFile is also the seam for test doubles (power loss, fault injection): every operation reaches the host
through one of the few blocking *primitive* methods listed in :class:`HostFile`'s docstring, and a subclass
that overrides those sees, and may alter or fail, everything a driver does to the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar, TypeVar

from .errors import BlockError, HostIOError, InvalidArgumentError, ReadOnlyError, UnsupportedError

T = TypeVar("T")

# the most buffers one pwritev(2) takes (1024 on Linux)
_IOV_MAX: int = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
# fallocate(2) mode bits, as :meth:`HostFile._fallocate_blocking` receives them
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_FALLOC_FL_KEEP_SIZE = FALLOC_FL_KEEP_SIZE
_FALLOC_FL_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE
_FALLOC_FL_ZERO_RANGE = FALLOC_FL_ZERO_RANGE

_MAX_WORKERS = 16
# Buffered writers to one file contend for its inode lock: more than a few threads per file only add
# wake-ups. Each drainer takes queued writes until the queue is empty.
_WRITE_DRAINERS = 4
# A large write keeps one drainer busy long enough for the next to be queued behind it: more drainers would
# only spin on the inode lock, burning the core the event loop needs.
_LARGE_WRITE = 256 * 1024
# readinto() serves reads up to this many bytes inline from the page cache, larger ones on the pool: a
# server's loop must not copy megabytes while other clients wait. Under inline_io() (a process whose loop
# runs one operation) the limit is _INLINE_IO_READ_MAX and small writes are done inline too.
INLINE_READ_MAX = 256 * 1024
inline_read_max = INLINE_READ_MAX
_INLINE_IO_READ_MAX = 16 << 20
_writes_inline = False
# pwrite_inline: the largest write done on the loop's thread, how long one may take before inline writes
# stop for a while (a sign of writeback throttling), and for how long. A 1 MiB copy into cached pages
# takes a few hundred microseconds, less than handing the write to a thread and its completion back
# costs: 1 MiB NBD writes at QD8 measured 3253 MiB/s and 0.300 CPU s per GiB inline, against 2784 and
# 0.353 through the pool.
INLINE_WRITE_MAX = 1024 * 1024
_INLINE_WRITE_SLOW = 0.005
_INLINE_WRITE_BACKOFF = 0.5
_COMPLETION_BATCH = 8
# A drainer writes small queued writes that continue one another with one pwritev, up to this many bytes.
# Large writes are not merged: one pwritev of several MiB measured twice the system time of the same
# bytes in MiB-sized writes (convert raw -> qcow2: 1.8 s against 0.8 s of system time).
_MERGE_WRITES = True
_MERGE_MAX = 1024 * 1024
# offset, buffers, whether the write is large, and the future its waiter awaits
_QueuedWrite = tuple[int, Sequence[bytes | bytearray | memoryview], bool, "asyncio.Future[None]"]
_executor: ThreadPoolExecutor | None = None
_monotonic = time.monotonic
_executor_lock = threading.Lock()


@contextlib.contextmanager
def inline_io() -> Iterator[None]:
    """For the block's length, reads (from the page cache) and small writes are done on the calling loop's
    thread instead of the I/O pool: for a process whose loop runs one operation and nothing else (the
    imagecore command, an admin job's worker). Each hand-over to a pool thread and back costs wake-ups and
    GIL switches that, on a virtual machine, outweigh the overlap the pool gives: convert qcow2 -> vpc of
    2 GiB (a 512-byte bitmap write per MiB of data) took 2.7 s through the pool and 1.6 s inline
    (qemu-img: 2.1 s). Large writes still go to the pool, where one thread copies them into the page cache
    while the loop reads the next chunk: raw -> qcow2 took 1.0 s with them inline, 0.69 s so (qemu-img:
    0.68 s)."""
    global inline_read_max, _writes_inline
    saved = inline_read_max, _writes_inline
    inline_read_max, _writes_inline = _INLINE_IO_READ_MAX, True
    try:
        yield
    finally:
        inline_read_max, _writes_inline = saved


def io_executor() -> ThreadPoolExecutor:
    """The process-wide bounded pool for blocking file operations."""
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(max_workers=_MAX_WORKERS, thread_name_prefix="hostio")
    return _executor


async def run_blocking(fn: Callable[..., T], *args: object) -> T:
    """Run ``fn(*args)`` on the I/O pool and wait for it."""
    return await asyncio.get_running_loop().run_in_executor(io_executor(), fn, *args)


_address_of: Callable[[bytearray], int] | None = None
_uninitialised: Callable[[int], bytearray] | None = None


def _load_buffer_helpers() -> None:
    global _address_of, _uninitialised
    import ctypes  # loaded on first use: it costs every short command a few milliseconds

    char, addressof = ctypes.c_char, ctypes.addressof
    new = ctypes.pythonapi.PyByteArray_FromStringAndSize
    new.restype = ctypes.py_object
    new.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    _address_of = lambda b: addressof(char.from_buffer(b))  # noqa: E731
    _uninitialised = lambda n: new(None, n)  # noqa: E731


def aligned_bytearray(size: int, *, zeroed: bool = True) -> bytearray:
    """A bytearray of ``size`` bytes, more than a page, whose bytes start on a page boundary.

    For buffers that large reads and writes copy through. The kernel copies between a user buffer and the
    page cache (and socket buffers) with ``rep movsb``, which here runs at about half speed for a buffer 16
    bytes past a 64-byte line (0, 32 and 48 are fine), and glibc puts an allocation large enough for a
    mapping of its own 16 bytes past a page. Reading 512 MiB from the page cache into a bytearray took
    0.069 s, into the same buffer shifted to a page boundary 0.030 s; rewriting cached pages took 0.055 s
    and 0.035 s. A bytearray, not a view, for the methods a memoryview lacks (``startswith`` compares in
    C) and for code that takes the whole object (librbd's binding copies a view first).

    CPython drops a bytearray's first bytes by moving its start, and cuts less than half of it from its end
    in place, so a page more is allocated and trimmed at both ends. Elsewhere the trims may move the bytes,
    which costs only speed.

    ``zeroed=False`` skips the zero-filling, for a buffer the caller overwrites whole before anything
    reads it (an NBD WRITE payload, filled from the socket before the request exists): its first bytes
    are whatever the heap held, so it must never reach a client or a disk unfilled."""
    assert size > _PAGE
    raw = _new_bytearray(size + _PAGE, zeroed)
    assert _address_of is not None
    del raw[:-_address_of(raw) % _PAGE]
    del raw[size:]
    return raw


def aligned_buffer(size: int, *, zeroed: bool = True) -> memoryview:
    """``size`` writable bytes that start on a page boundary (see :func:`aligned_bytearray`): the whole
    bytearray above a page, a view into a larger one up to a page."""
    if size > _PAGE:
        return memoryview(aligned_bytearray(size, zeroed=zeroed))
    raw = _new_bytearray(size + _PAGE, zeroed)
    assert _address_of is not None
    start = -_address_of(raw) % _PAGE
    return memoryview(raw)[start:start + size]


def _new_bytearray(size: int, zeroed: bool) -> bytearray:
    if _address_of is None or _uninitialised is None:
        _load_buffer_helpers()
        assert _uninitialised is not None
    return bytearray(size) if zeroed else _uninitialised(size)


def _fallocate_fn() -> Callable[[int, int, int, int], None] | None:
    # loaded on first use: ctypes costs every short command a few milliseconds
    try:
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fa = libc.fallocate64
        fa.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fa.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        if fa(fd, mode, offset, length) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return fallocate


_fallocate: Callable[[int, int, int, int], None] | None = None
_fallocate_loaded = False

_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range_fn() -> Callable[[int], None] | None:
    """sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE), which the os module lacks (loaded on first use)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        sfr = libc.sync_file_range
        sfr.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        sfr.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None

    def start(fd: int) -> None:
        sfr(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # a hint: its failure changes nothing

    return start


_sync_file_range: Callable[[int], None] | None = None
_sync_file_range_loaded = False

# cachestat(2) (Linux 6.5): how many pages of a range are in the page cache. The same number on every
# architecture, the syscall table having been unified before it was added.
_NR_CACHESTAT = 451
_PAGE = os.sysconf("SC_PAGE_SIZE") if "SC_PAGE_SIZE" in os.sysconf_names else 4096


def _cachestat_fn() -> Callable[[int, int, int], int] | None:
    """``cached(fd, offset, length)``: the pages of the range in the page cache, or -1 when unknown."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        syscall = libc.syscall
        syscall.restype = ctypes.c_long
        rng = (ctypes.c_uint64 * 2)()
        st = (ctypes.c_uint64 * 5)()
        rng_p, st_p = ctypes.byref(rng), ctypes.byref(st)
        nr, zero = ctypes.c_long(_NR_CACHESTAT), ctypes.c_uint(0)
    except (OSError, AttributeError):
        return None

    def cached(fd: int, offset: int, length: int) -> int:
        rng[0] = offset
        rng[1] = length
        if syscall(nr, ctypes.c_int(fd), rng_p, st_p, zero) != 0:
            return -1
        return int(st[0])

    try:
        # ENOSYS before Linux 6.5: the caller then never asks
        if cached(0, 0, 1) < 0 and ctypes.get_errno() == errno.ENOSYS:
            return None
    except OSError:
        return None
    return cached


_cachestat: Callable[[int, int, int], int] | None = None
_cachestat_loaded = False


class HostFile:
    """An open host file. Every method that may block is a coroutine that runs on the I/O pool (or inline,
    where that cannot wait for the disk or under :func:`inline_io`).

    The interface for test doubles is this class itself: a subclass overrides some of these blocking
    primitives, which are the only places where data reaches or leaves the host file (all run on a worker
    thread, except that :meth:`pwrite_sync`, :meth:`pwrite_inline` and the small writes under
    :func:`inline_io` call ``_write_full`` on their caller's thread, and ``read_nowait`` reads on it):

    - ``_write_full(offset, bufs)``: write all of ``bufs`` at ``offset`` (every ``pwrite``, ``pwritev``,
      ``pwrite_sync`` and ``write_zeroes_slow`` ends here; it may be called from several threads at once);
    - ``_read_full(offset, buf) -> int``: fill ``buf``, returning the count (short only at end of file);
      ``read_nowait`` serves page-cache hits inline and a double that must see every read overrides it to
      return 0, which sends the read to ``_read_full``;
    - ``_datasync()``: ``fdatasync(2)``; everything written before the call is durable once it returns;
    - ``_truncate_blocking(size)``: ``ftruncate(2)``;
    - ``_fallocate_blocking(mode, offset, length)``: ``fallocate(2)`` with the ``FALLOC_FL_*`` bits above
      (punch_hole, zero_range, allocate).

    An ``OSError`` raised by a primitive reaches the caller as :class:`HostIOError` with its errno. The
    primitives keep their signatures; the rest of the class is built on them. A double is created through
    :meth:`open` (a classmethod, so ``Subclass.open(...)`` returns a ``Subclass``) from an
    ``ImageOpener.open_file`` override.
    """

    # False for a file that is no host file (an NBD export: imagecore.formats.nbd.NbdFile): no fd, no
    # locks, no allocation to report
    local: ClassVar[bool] = True

    def __init__(self, fd: int, path: str, *, read_only: bool) -> None:
        self.fd = fd
        self.path = path
        self.read_only = read_only
        self._nowait = _RWF_NOWAIT != 0
        self._closed = False
        self._wlock = threading.Lock()
        self._wqueue: deque[_QueuedWrite] = deque()
        self._drainers = 0
        self._modified = 0
        self._synced = 0
        # False gives qemu's cache=unsafe: flushes still write out caches but never wait for the disk.
        self.sync_enabled = True
        # Set by a failed fdatasync. Linux may then have dropped the dirty pages whose writeback failed,
        # and a later fdatasync would succeed without them reaching the disk; like qemu's file-posix
        # (page_cache_inconsistent), every later flush of this open file fails with EIO.
        self._sync_failed = False
        self._writeback: object | None = None  # the start_writeback call under way
        self._fd_lock = threading.Lock()  # held while a worker uses the fd outside an operation's call
        # Whether the file's bytes may leave without passing through this object (sendfile replies): not
        # for a subclass that overrides the read primitives (a test double must see every read).
        cls = type(self)
        self.zero_copy = cls.read_nowait is HostFile.read_nowait and cls._read_full is HostFile._read_full
        # Small writes on the loop's thread (pwrite_inline): not for a double that must see every write
        # on its own terms, and off until _inline_after once one was slow.
        self._inline_writes = cls._write_full is HostFile._write_full
        self._inline_after = 0.0

    @classmethod
    def open(cls, path: str, *, read_only: bool, create: bool = False, exclusive: bool = False,
             follow_symlinks: bool = True, dir_fd: int | None = None) -> HostFile:
        flags = os.O_RDONLY if read_only else os.O_RDWR
        flags |= os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT
        if exclusive:
            flags |= os.O_EXCL
        if not follow_symlinks:
            flags |= os.O_NOFOLLOW
        try:
            fd = os.open(path, flags, 0o644, dir_fd=dir_fd)
        except OSError as exc:
            raise HostIOError.from_oserror(exc, f"Could not open '{path}'") from None
        return cls(fd, path, read_only=read_only)

    # -- sizes ---------------------------------------------------------------------------------------
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def allocated_size(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    # -- reads ---------------------------------------------------------------------------------------
    def read_nowait(self, offset: int, buf: memoryview) -> int:
        """Try to fill ``buf`` from the page cache without blocking.

        Returns the number of bytes read (0 when nothing could be read without blocking). A short count can
        also mean end of file; callers that must tell the two apart fall back to :meth:`readinto`.
        """
        if not self._nowait:
            return 0
        try:
            return os.preadv(self.fd, [buf], offset, _RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait = False
                return 0
            raise HostIOError.from_oserror(exc, "read") from None

    def in_page_cache(self, offset: int, length: int) -> bool:
        """True when every page of ``[offset, offset + length)`` is in the page cache, so that a sendfile
        of it does not wait for the disk (cachestat(2); always False where the kernel lacks it)."""
        global _cachestat, _cachestat_loaded
        if not _cachestat_loaded:
            _cachestat = _cachestat_fn()
            _cachestat_loaded = True
        if _cachestat is None or length <= 0:
            return False
        pages = (offset + length - 1) // _PAGE - offset // _PAGE + 1
        return _cachestat(self.fd, offset, length) >= pages

    def _read_full(self, offset: int, buf: memoryview) -> int:
        done = 0
        total = len(buf)
        while done < total:
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    async def readinto(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; returns bytes read, short only at end of file (rest zeroed)."""
        # A large copy on the loop thread stalls everything else (see inline_read_max); callers that want
        # the inline path for a large read anyway use read_nowait().
        n = self.read_nowait(offset, buf) if len(buf) <= inline_read_max else 0
        if n < len(buf):
            try:
                n += await run_blocking(self._read_full, offset + n, buf[n:])
            except OSError as exc:
                raise HostIOError.from_oserror(exc, "read") from None
            if n < len(buf):
                buf[n:] = bytes(len(buf) - n)
        return n

    def readinto_sync(self, offset: int, buf: memoryview) -> int:
        """Blocking read, for code already running on a worker thread."""
        try:
            n = self._read_full(offset, buf)
        except OSError as exc:
            raise HostIOError.from_oserror(exc, "read") from None
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)
        return n

    async def pread(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        await self.readinto(offset, memoryview(buf))
        return bytes(buf)

    # -- writes --------------------------------------------------------------------------------------
    def _check_writable(self) -> None:
        """Called by every modifying operation: refuse it on a read-only file, and count it."""
        if self.read_only:
            raise ReadOnlyError(f"'{self.path}' is open read-only")
        self._modified += 1

    @property
    def has_unsynced_writes(self) -> bool:
        """True while this file may hold dirty page-cache pages of ours (modified since the last sync)."""
        return self._modified != self._synced

    def _write_full(self, offset: int, bufs: Sequence[bytes | bytearray | memoryview]) -> None:
        views = [memoryview(b).cast("B") for b in bufs]
        first = 0
        while first < len(views):
            # pwritev takes at most IOV_MAX buffers (EINVAL past it): a write of many small clusters
            # goes out in several calls
            n = os.pwritev(self.fd, views[first:first + _IOV_MAX], offset)
            offset += n
            while first < len(views) and n >= len(views[first]):
                n -= len(views[first])
                first += 1
            if first < len(views) and n:
                views[first] = views[first][n:]

    def pwrite_sync(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_writable()
        try:
            self._write_full(offset, [data])
        except OSError as exc:
            raise HostIOError.from_oserror(exc, "write") from None

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self.pwritev(offset, [data])

    async def pwritev(self, offset: int, bufs: Sequence[bytes | bytearray | memoryview]) -> None:
        await self.pwritev_started(offset, bufs)

    def pwritev_started(self, offset: int, bufs: Sequence[bytes | bytearray | memoryview]
                        ) -> asyncio.Future[None]:
        """Queue a write for the I/O pool; the future completes when it is done (the body of pwritev,
        for callers that want a callback rather than a task)."""
        self._check_writable()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        large = sum(map(len, bufs)) >= _LARGE_WRITE
        if _writes_inline and not large:
            try:
                self._write_full(offset, bufs)
            except OSError as exc:
                fut.set_exception(HostIOError.from_oserror(exc, "write"))
            else:
                fut.set_result(None)
            return fut
        with self._wlock:
            self._wqueue.append((offset, bufs, large, fut))
            spawn = self._drainers < (1 if large else _WRITE_DRAINERS)
            if spawn:
                self._drainers += 1
        if spawn:
            io_executor().submit(self._drain_writes, loop)
        return fut

    def pwrite_inline(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Write a small buffer on the caller's thread when that cannot wait for the disk, else False.

        Only whole pages already in the page cache (no read before the write), and not for a while after
        an inline write took long: the file may be under writeback throttling, and the loop must not
        sleep in it. The write may overtake queued ones: for callers whose concurrent writes have no
        order (NBD requests in flight together), not for a driver's ordered metadata updates.
        """
        n = len(data)
        if (not self._inline_writes or n > INLINE_WRITE_MAX or offset % _PAGE or n % _PAGE
                or _monotonic() < self._inline_after):
            return False
        if not self.in_page_cache(offset, n):
            return False
        self._check_writable()
        t0 = _monotonic()
        try:
            self._write_full(offset, [data])
        except OSError as exc:
            raise HostIOError.from_oserror(exc, "write") from None
        if _monotonic() - t0 > _INLINE_WRITE_SLOW:
            self._inline_after = _monotonic() + _INLINE_WRITE_BACKOFF
        return True

    def _drain_writes(self, loop: asyncio.AbstractEventLoop) -> None:
        """Worker thread: perform queued writes, handing completions back to the loop in batches."""
        done: list[tuple[asyncio.Future[None], BaseException | None]] = []
        while True:
            with self._wlock:
                if not self._wqueue:
                    self._drainers -= 1
                    break
                offset, bufs, large, fut = self._wqueue.popleft()
                futs = [fut]
                q = self._wqueue
                if (q and not large and q[0][0] == offset + (size := sum(map(len, bufs)))
                        and _MERGE_WRITES):
                    # the writes queued right behind this one that continue it: one pwritev for all
                    bufs = list(bufs)
                    while (q and q[0][0] == offset + size and not q[0][2]
                           and len(bufs) + len(q[0][1]) <= _IOV_MAX):
                        n = sum(map(len, q[0][1]))
                        if size + n > _MERGE_MAX:
                            break
                        _o, more_bufs, _large, more_fut = q.popleft()
                        bufs.extend(more_bufs)
                        size += n
                        futs.append(more_fut)
                more = bool(q)
            exc: BaseException | None = None
            try:
                self._write_full(offset, bufs)
            except OSError as e:
                exc = HostIOError.from_oserror(e, "write")
            except BaseException as e:  # handed to the waiting coroutine
                exc = e
            done.extend((f, exc) for f in futs)
            if not more or large or len(done) >= _COMPLETION_BATCH:
                loop.call_soon_threadsafe(_complete_writes, done)
                done = []
        if done:
            loop.call_soon_threadsafe(_complete_writes, done)

    async def fdatasync(self) -> None:
        if self.read_only or not self.sync_enabled:
            return
        if self._sync_failed:
            raise HostIOError.from_oserror(
                OSError(errno.EIO, "an earlier flush failed; written data may be lost"), "flush")
        upto = self._modified
        try:
            await run_blocking(self._datasync)
        except OSError as exc:
            self._sync_failed = True
            raise HostIOError.from_oserror(exc, "flush") from None
        self._synced = max(self._synced, upto)

    def start_writeback(self) -> None:
        """Ask the kernel to start writing this file's dirty pages to the disk, and return at once.

        A hint for a writer that writes much and then flushes (a commit, a rebase): the disk then works
        while the copy goes on, and the final fdatasync has less left to wait for. It makes nothing
        durable and orders nothing (the kernel may write any dirty page back at any time anyway), so crash
        safety still rests on fdatasync alone. Nothing happens on a read-only file, without syncs (cache
        mode unsafe), after a failed flush, or while the previous call is still under way.
        """
        if self.read_only or not self.sync_enabled or self._sync_failed or self._closed \
                or self._writeback is not None:
            return
        global _sync_file_range, _sync_file_range_loaded
        if not _sync_file_range_loaded:
            _sync_file_range, _sync_file_range_loaded = _sync_file_range_fn(), True
        if _sync_file_range is None:
            return
        start, fd = _sync_file_range, self.fd

        def run() -> None:
            try:
                with self._fd_lock:
                    if not self._closed:  # the fd is not closed (and reused) while this runs: see close
                        start(fd)
            finally:
                self._writeback = None

        self._writeback = io_executor().submit(run)

    def _datasync(self) -> None:
        os.fdatasync(self.fd)

    def _truncate_blocking(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def _fallocate_blocking(self, mode: int, offset: int, length: int) -> None:
        global _fallocate, _fallocate_loaded
        if not _fallocate_loaded:
            _fallocate, _fallocate_loaded = _fallocate_fn(), True
        if _fallocate is None:
            raise OSError(errno.ENOSYS, "fallocate is not available")
        _fallocate(self.fd, mode, offset, length)

    async def truncate(self, size: int) -> None:
        self._check_writable()
        try:
            if _writes_inline and size >= self.size():
                # growing only sets the size (no blocks to free): under inline_io, not worth a thread hop,
                # of which a convert to vdi made one per allocated block
                self._truncate_blocking(size)
            else:
                await run_blocking(self._truncate_blocking, size)
        except OSError as exc:
            raise HostIOError.from_oserror(exc, "truncate") from None

    async def _fallocate(self, mode: int, offset: int, length: int) -> None:
        self._check_writable()
        if length <= 0:
            return
        try:
            await run_blocking(self._fallocate_blocking, mode, offset, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise UnsupportedError(f"fallocate mode {mode:#x} is not supported here") from None
            raise HostIOError.from_oserror(exc, "fallocate") from None

    async def punch_hole(self, offset: int, length: int) -> None:
        """Deallocate a range; it reads back as zeroes and the file size is kept."""
        await self._fallocate(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)

    async def zero_range(self, offset: int, length: int) -> None:
        """Zero a range, keeping it allocated (may extend the file)."""
        await self._fallocate(_FALLOC_FL_ZERO_RANGE, offset, length)

    async def allocate(self, offset: int, length: int) -> None:
        """Preallocate a range (may extend the file)."""
        await self._fallocate(0, offset, length)

    async def write_zeroes_slow(self, offset: int, length: int) -> None:
        """Write explicit zero buffers over a range, when no fallocate mode applies."""
        chunk = bytes(min(length, 1 << 20))
        while length > 0:
            n = min(length, len(chunk))
            await self.pwrite(offset, memoryview(chunk)[:n])
            offset += n
            length -= n

    # -- sparseness ----------------------------------------------------------------------------------
    def seek_data(self, offset: int) -> int:
        """Next data offset at or after ``offset``; the file size when there is none."""
        try:
            return os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return max(offset, self.size())
            if exc.errno == errno.EINVAL:
                return offset
            raise HostIOError.from_oserror(exc, "seek") from None

    def seek_hole(self, offset: int) -> int:
        """Next hole offset at or after ``offset``; the file size at the end."""
        try:
            return os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return max(offset, self.size())
            if exc.errno == errno.EINVAL:
                return self.size()
            raise HostIOError.from_oserror(exc, "seek") from None

    def data_runs(self, start: int, end: int, max_runs: int = 1 << 62) -> list[tuple[int, int, bool]]:
        """The first ``max_runs`` runs of :meth:`iter_data_runs` (at least one for a range that is not
        empty), with no lseek past the last of them."""
        return list(itertools.islice(self.iter_data_runs(start, end), max_runs))

    def iter_data_runs(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """The file's data and holes over ``[start, end)`` as ``(start, stop, is data)`` runs, each found
        when it is asked for. Past the end of the file, and from a hole that reaches it, one hole runs to
        ``end``.

        Two lseeks per data run and hole (the end of a hole is where data starts), in one loop that block
        status over a file of millions of runs spends most of its time in. Lazily, because a caller often
        needs only the first runs: a client asking block status with NBD_CMD_FLAG_REQ_ONE (QEMU always
        does) wants one.
        """
        fd = self.fd
        lseek = os.lseek
        size = self.size()
        pos = start
        data_at = -1  # where the last hole ended
        while pos < end:
            if pos >= size:
                yield pos, end, False
                return
            if pos != data_at:
                try:
                    d = lseek(fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    d = self._seek_error(exc, pos, size, pos)
                if d > pos:
                    stop = end if d >= size else min(d, end)
                    yield pos, stop, False
                    pos = data_at = stop
                    continue
            try:
                h = lseek(fd, pos, os.SEEK_HOLE)
            except OSError as exc:
                h = self._seek_error(exc, pos, size, size)
            stop = min(max(h, pos + 1), end)
            yield pos, stop, True
            pos = stop

    @staticmethod
    def _seek_error(exc: OSError, offset: int, size: int, unsupported: int) -> int:
        """What a failed SEEK_DATA or SEEK_HOLE means: ENXIO, nothing more before the end of the file;
        EINVAL, a file system without them (all data: ``unsupported`` is the answer then)."""
        if exc.errno == errno.ENXIO:
            return max(offset, size)
        if exc.errno == errno.EINVAL:
            return unsupported
        raise HostIOError.from_oserror(exc, "seek") from None

    # -- lifetime ------------------------------------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            with self._fd_lock:  # after a start_writeback under way, whose fd this is
                self._closed = True
            os.close(self.fd)

    def __repr__(self) -> str:
        return f"HostFile({self.path!r}, fd={self.fd}, read_only={self.read_only})"


def _complete_writes(done: list[tuple[asyncio.Future[None], BaseException | None]]) -> None:
    for fut, exc in done:
        if fut.cancelled():
            continue
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)


def check_range(offset: int, length: int, size: int) -> None:
    """Raise InvalidArgumentError unless ``[offset, offset+length)`` lies within ``[0, size]``."""
    if offset < 0 or length < 0 or offset + length > size:
        raise InvalidArgumentError(f"range {offset}+{length} is outside the device (size {size})")


__all__ = ["FALLOC_FL_KEEP_SIZE", "FALLOC_FL_PUNCH_HOLE", "FALLOC_FL_ZERO_RANGE", "BlockError", "HostFile",
           "check_range", "io_executor", "run_blocking"]
