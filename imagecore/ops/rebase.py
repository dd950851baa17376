"""`rebase`: give an image another backing file, or none, as qemu-img 7.2 does (and qemu 10's ``-c``).

Safe mode (the default) keeps the guest's view of the image: wherever the image itself does not define a
range and the old backing chain and the new backing file read differently, the old chain's data is copied
into the image first; only then is the header pointed at the new backing file. ``-b ""`` makes the image
standalone (everything the old chain provides is copied in). ``-u`` (unsafe) rewrites the backing file
name and format alone, without opening any backing file.

The copy follows qemu-img's ``img_rebase`` step for step, because its steps are visible in the result:
the image is walked in pieces of at most 2 MiB; a piece the image defines itself is skipped; when the new
backing file is a member of the old chain, a piece that no layer above it defines is skipped too (both
sides read it from there); the rest is read from both sides and compared in 512-byte sectors; differing
sectors are written with the old data, or written as zeroes where the old chain ends before the image
does. With ``-c`` every cluster that receives data is written whole and compressed, as qemu 10 does.
The copied data is flushed before the header changes, so a crash leaves the old backing file with some
clusters already copied (the same guest view), never the new one with data missing.

Messages, their order and exit codes are qemu-img's: ``Invalid cache option``, ``Invalid source cache
option``, the open errors of the image and its chain, ``Compression not supported for this file format``,
``Invalid format name``, ``Could not open new backing file``, ``Error while writing to COW image``, and
``Could not change the backing file to '...': ...`` (``backing format must be specified`` for ``-b``
without ``-F``; raw and vmdk images have no backing file to change: ``Operation not supported``).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import itertools
import operator
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from ..driver import BlockDriver, ImageOpener, OpenContext, block_layer_error, get_format, image_open_error
from ..errors import (
    BlockError,
    CorruptImageError,
    ImageLockedError,
    InvalidArgumentError,
    NoSpaceError,
    OperationCancelledError,
    UnsupportedError,
    UnsupportedFormatError,
)
from ..extent import Extent
from ..hostio import HostFile
from .common import (
    BackingFn,
    ProgressFn,
    Writeback,
    check_cancelled,
    check_image_path,
    open_image,
    report,
    with_backing,
)
from .create import QEMU_DRIVERS

IO_BUF_SIZE = 2 << 20  # qemu-img's IO_BUF_SIZE: the largest piece compared at once
STATUS_WINDOW = 64 << 20  # how much of the image's extents is asked for at once
SECTOR = 512
CACHE_MODES = ("none", "off", "writeback", "unsafe", "directsync", "writethrough")


@dataclass(slots=True)
class RebaseResult:
    """What ``rebase`` did: the new backing file (None: standalone) and what it copied to keep the view."""

    path: str
    format: str
    backing: str | None
    backing_format: str | None
    bytes_copied: int = 0
    bytes_zeroed: int = 0


class BackingChangeError(BlockError):
    """The last step failed: ``Could not change the backing file to 'NAME': REASON``. Everything before it
    (the copy of safe mode) has been done, so qemu-img has printed its progress to the end already."""


class CowWriteError(BlockError):
    """A write into the image failed during the copy: qemu-img's ``Error while writing to COW image``."""


def _errno_text(exc: BlockError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


async def rebase(path: str, fmt: str | None, backing: str | None, backing_fmt: str | None = None, *,
                 unsafe: bool = False, compress: bool = False, force_share: bool = False,
                 cache: str = "writeback", src_cache: str = "writeback", opener: ImageOpener | None = None,
                 progress: ProgressFn | None = None, cancel: asyncio.Event | None = None) -> RebaseResult:
    """Rebase ``path`` onto ``backing`` (``""`` or None: no backing file). Never prints.

    ``backing`` None is qemu-img's ``-u`` without ``-b``, which removes the backing file. ``force_share``
    (-U) applies to the new backing file only, as in qemu-img. ``cache`` ``unsafe`` skips every sync.
    Progress is ``(pieces compared, qemu's piece count)`` after each compared piece of safe mode; a caller
    rendering qemu-img's meter adds the final 100 % itself. ``cancel`` is honoured between pieces, before
    the header changes (the guest view is the same at every such point).
    """
    if cache not in CACHE_MODES:
        raise InvalidArgumentError(f"Invalid cache option: {cache}")
    if src_cache not in CACHE_MODES:
        raise InvalidArgumentError(f"Invalid source cache option: {src_cache}")
    opener = opener or ImageOpener(lock=True)
    if cache == "unsafe":
        opener = opener.unsynced()
    check_cancelled(cancel)
    if unsafe:
        return await _rebase_unsafe(path, fmt, backing, backing_fmt, compress, opener)
    assert backing is not None
    top = await open_read_write(path, fmt, opener)
    result = RebaseResult(path, top.format_name, backing or None, backing_fmt if backing else None)
    try:
        if compress and getattr(top, "write_compressed", None) is None:
            raise UnsupportedError("Compression not supported for this file format")
        if backing_fmt is not None and not _known_format(backing_fmt):
            raise InvalidArgumentError(f"Invalid format name: '{backing_fmt}'")
        new, depth, own = await _open_new_backing(top, path, backing, backing_fmt, opener, force_share)
        try:
            # extended L2 images take no compressed clusters (a whole-cluster write would overwrite the
            # subclusters the image holds itself): their differing sectors are written plainly
            if compress and not getattr(top, "ext_l2", False):
                await _copy_aligned(top, new, depth, result, progress, cancel)
            else:
                await _copy(top, new, depth, result, progress, cancel)
        finally:
            if own and new is not None:
                await new.close()
        await top.flush()
    finally:
        await top.close()
    hf = opener.open_file(path, read_only=False) if result.format in _HEADER_EDITS else None
    try:
        await _change_backing(hf, backing, backing_fmt, result.format)
    finally:
        if hf is not None:
            hf.close()
    return result


# formats whose qemu driver takes compressed writes (qemu 10's check for -c)
_COMPRESSING = frozenset({"qcow2", "vmdk"})


async def _rebase_unsafe(path: str, fmt: str | None, backing: str | None, backing_fmt: str | None,
                         compress: bool, opener: ImageOpener) -> RebaseResult:
    """-u: the header alone, the image opened without its backing chain, its bitmaps kept."""
    target = await open_for_edit(path, fmt, opener, chain=False)
    try:
        if compress and target.format not in _COMPRESSING:
            raise UnsupportedError("Compression not supported for this file format")
        if backing_fmt is not None and not _known_format(backing_fmt):
            raise InvalidArgumentError(f"Invalid format name: '{backing_fmt}'")
        await _change_backing(target.hf, backing, backing_fmt, target.format)
    finally:
        if target.hf is not None:
            target.hf.close()
    return RebaseResult(path, target.format, backing or None, backing_fmt if backing else None)


def _known_format(name: str) -> bool:
    """qemu's bdrv_find_format: any driver it has, including those it recognises but will not open."""
    if name in QEMU_DRIVERS:
        return True
    try:
        get_format(name)
    except UnsupportedFormatError:
        return True
    except UnsupportedError:
        return False
    return True


# -- opening ------------------------------------------------------------------------------------------

class _NoBacking(BlockDriver):
    """Stands in for a backing file that ``-u`` does not open (qemu opens the image without its chain):
    nothing reads through it."""

    format_name = "none"

    def __init__(self, name: str) -> None:
        self.size = 0
        self.filename = name

    async def readinto(self, offset: int, buf: memoryview) -> None:
        raise UnsupportedError("the backing file of an image rebased with -u is not open")

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        raise UnsupportedError("the backing file of an image rebased with -u is not open")

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool,
                           fua: bool = False) -> None:
        raise UnsupportedError("the backing file of an image rebased with -u is not open")

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        raise UnsupportedError("the backing file of an image rebased with -u is not open")

    async def flush(self) -> None:
        return None

    async def extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        yield Extent(offset, length, False, True, 0, False)

    async def close(self) -> None:
        return None


def _skip_backing(probe: ImageOpener, plain: BackingFn) -> BackingFn:
    async def open_backing(name: str, bfmt: str | None, ctx: OpenContext) -> BlockDriver:
        return _NoBacking(name)
    return open_backing


async def open_read_write(path: str, fmt: str | None, opener: ImageOpener, *, chain: bool = True
                          ) -> BlockDriver:
    """An image opened read-write as qemu-img's verbs that change it open it, failures worded as qemu's
    (``Could not open 'IMAGE': ...``, ``Could not open backing file: ...`` for its chain). Without
    ``chain`` the backing files are not opened (qemu's BDRV_O_NO_BACKING, which rebase -u uses)."""
    return await open_image(path, fmt, read_only=False,
                            opener=opener if chain else with_backing(opener, _skip_backing))


@dataclass(slots=True)
class EditTarget:
    """An image held for an edit of its metadata in place: ``hf`` is its file, read-write and holding the
    image's write lock (None for a format without such edits), with the format and whether the image has a
    backing file."""

    hf: HostFile | None
    format: str
    has_backing: bool


async def open_for_edit(path: str, fmt: str | None, opener: ImageOpener, *, chain: bool = True) -> EditTarget:
    """Open an image whose metadata alone a verb rewrites (amend, rebase -u), with qemu-img's checks and
    messages for a read-write open, but without a read-write open of the driver.

    The write lock is taken on the file first and held throughout. A qcow2 image is then validated by a
    read-only open (its backing chain and data file included, as qemu opens them unless ``chain`` is
    False): a read-write open of the driver would clear the persistent bitmaps' autoclear bit, which only a
    writer of guest data has to do, and these verbs write none; qemu keeps the bitmaps across them. A
    corrupt image is refused as a read-write open refuses it; a dirty one (lazy refcounts, not closed
    cleanly) and any other format go through the driver's read-write open, which repairs a dirty image as
    qemu's does.
    """
    check_image_path(path, read_only=False)
    try:
        hf = opener.open_file(path, read_only=False)
    except ImageLockedError:
        # qemu's luks driver takes its file's permissions as raw does: a volume another process holds
        # opens, and only the key update itself asks for the file alone (ops/amend.py)
        unlocked_opener = opener.unlocked()
        hf = unlocked_opener.open_file(path, read_only=False)
        try:
            luks = opener.image_format(hf, fmt, path, read_only=False).name == "luks"
        except BlockError:
            luks = False
        if not luks:
            hf.close()
            raise
    try:
        spec = opener.image_format(hf, fmt, path, read_only=False)
        if spec.name == "qcow2":
            from ..formats.qcow2.headio import read_header
            from ..formats.qcow2.layout import INCOMPAT_CORRUPT, INCOMPAT_DIRTY

            try:
                h = await read_header(hf, writable=True)
            except BlockError as exc:
                raise image_open_error(exc, path) from None
            if h.incompatible_features & INCOMPAT_CORRUPT:
                raise image_open_error(
                    CorruptImageError("qcow2: Image is corrupt; cannot be opened read/write"), path)
            if not h.incompatible_features & INCOMPAT_DIRTY:
                # this file's lock is held on hf; the chain is locked as for a writer, by the opener's
                # own open_backing (bound to the locking opener)
                locked_backing = opener.open_backing
                unlocked = with_backing(opener, (lambda _o, _p: locked_backing) if chain else _skip_backing)
                unlocked.lock = False
                try:
                    drv = await unlocked.open(path, "qcow2", read_only=True)
                except OperationCancelledError:
                    raise
                except BlockError as exc:
                    raise image_open_error(exc, path) from None
                has_backing = drv.backing is not None
                await drv.close()
                return EditTarget(hf, "qcow2", has_backing)
    except BaseException:
        hf.close()
        raise
    hf.close()
    if spec.name == "luks":
        # opened as raw is (its lock shares everything); the key update takes its own (ops/amend.py)
        opener = opener.unlocked()
    drv = await open_read_write(path, spec.name, opener, chain=chain)
    name, has_backing = drv.format_name, drv.backing is not None
    await drv.close()
    return EditTarget(opener.open_file(path, read_only=False) if name in _HEADER_EDITS else None, name,
                      has_backing)


# the formats whose header rebase rewrites in place (qemu's bdrv_change_backing_file)
_HEADER_EDITS = frozenset({"qcow2", "qed"})


def _same_file(drv: BlockDriver, st: os.stat_result) -> bool:
    hf = drv.data_host_file()
    if hf is None:
        return False
    own = os.fstat(hf.fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


async def _open_new_backing(top: BlockDriver, path: str, backing: str, backing_fmt: str | None,
                            opener: ImageOpener, force_share: bool
                            ) -> tuple[BlockDriver | None, int | None, bool]:
    """(the new backing file or None, its depth in the old chain or None, whether it is ours to close).

    A new backing file that is a member of the old chain is that member (qemu's prefix chain), not a
    second open of the same file; any other is opened read-only, force-share with ``-U``.
    """
    if not backing:
        return None, None, False
    resolved = opener.resolve(backing, path)
    try:
        st = os.stat(resolved)
    except OSError:
        st = None
    if st is not None:
        depth, layer = 1, top.backing
        while layer is not None:
            if _same_file(layer, st):
                return layer, depth, False
            depth, layer = depth + 1, layer.backing
    try:
        check_image_path(resolved, read_only=True)
        new = await (opener.sharing() if force_share else opener).open(resolved, backing_fmt, read_only=True)
    except OperationCancelledError:
        raise
    except BlockError as exc:
        # qemu's bdrv_open of the new backing file, whose errors carry no img_open prefix of their own
        raise block_layer_error(exc, f"Could not open new backing file '{backing}': ") from None
    return new, None, True


# -- the copy -----------------------------------------------------------------------------------------

async def _status_runs(top: BlockDriver, offset: int, length: int) -> list[Extent]:
    out: list[Extent] = []
    async for e in top.extents(offset, length):
        out.append(e)
    return out


async def _own_status(layer: BlockDriver, offset: int, end: int) -> list[Extent]:
    """One layer's own extents over ``[offset, end)``, its backing file cut off while they are asked for
    (what it does not define reads as not present); past its end, not present."""
    out: list[Extent] = []
    inside = min(end, layer.size)
    if offset < inside:
        below, layer.backing = layer.backing, None
        try:
            out = await _status_runs(layer, offset, inside - offset)
        finally:
            layer.backing = below
    if inside < end:
        lo = max(offset, inside)
        out.append(Extent(lo, end - lo, False, True, 0, False, None))
    return out


async def _chain_status(layers: list[BlockDriver], offset: int, length: int) -> list[Extent]:
    """The extents of ``layers[0]`` over ``[offset, offset + length)`` as its block status gives them
    through the chain ``layers`` (each the backing file of the one before; below the last, nothing), but
    with each layer asked once for the whole range instead of once per run the layers above leave
    undefined: a run a layer does not define is filled in from the next one's answer, its depth counted
    from the top."""
    end = offset + length
    own = [await _own_status(layer, offset, end) for layer in layers]
    starts = [[e.start for e in runs] for runs in own]
    out: list[Extent] = []

    def fill(level: int, lo: int, hi: int) -> None:
        runs = own[level]
        last = level + 1 == len(own)
        for i in range(max(bisect.bisect_right(starts[level], lo) - 1, 0), len(runs)):
            e = runs[i]
            if e.start >= hi:
                break
            s, t = max(e.start, lo), min(e.start + e.length, hi)
            if s >= t:
                continue
            if e.present or last:
                if level == 0 and s == e.start and t == e.start + e.length:
                    out.append(e)
                else:
                    out.append(Extent(s, t - s, e.data, e.zero, e.depth + level, e.present,
                                      None if e.offset is None else e.offset + (s - e.start), e.compressed))
            else:
                fill(level + 1, s, t)

    fill(0, offset, end)
    return out


def _l2_span(top: BlockDriver) -> int | None:
    """How far one qcow2 block-status answer reaches (one L2 table), which bounds qemu's pieces."""
    cs = top.cluster_size() if top.format_name == "qcow2" else None
    if not cs:
        return None
    header = getattr(top, "header", None)
    entry = 16 if header is not None and header.extended_l2 else 8
    return cs * (cs // entry)


def _first_run(runs: list[Extent], lo: int, hi: int, key: bool, keyfn: Callable[[Extent], bool]) -> int:
    """Bytes of ``[lo, hi)`` from ``lo`` on while ``keyfn(extent)`` stays ``key`` (``runs``: the extents
    that meet ``[lo, hi)``, uncut)."""
    pos = lo
    for e in runs:
        if keyfn(e) != key:
            break
        pos = e.start + e.length
    return min(pos, hi) - lo


def _layer_run(runs: list[Extent], lo: int, hi: int) -> int:
    """The length of the run one layer defines from ``lo`` on, within ``[lo, hi)`` (qemu's answer for one
    layer: one cluster kind, data contiguous on the host, a compressed cluster alone)."""
    first = runs[0]
    if first.compressed:
        return min(first.start + first.length, hi) - lo
    pos = lo
    prev: Extent | None = None
    for e in runs:
        if e.depth != first.depth or e.present != first.present or e.data != first.data \
                or e.compressed or (not e.data and e.zero != first.zero):
            break
        if prev is not None and prev.offset is not None and e.offset is not None \
                and prev.offset + prev.length != e.offset:
            break
        pos = e.start + e.length
        prev = e
    return min(pos, hi) - lo


class _Piece:
    """Where the walk over the image stands: which of its pieces need comparing (qemu's loop head).

    The image's extents are asked for a window of STATUS_WINDOW at a time and reused for the pieces in it:
    the writes of a piece cannot change how a later piece looks as long as pieces end on cluster boundaries,
    and the caller drops the window (:meth:`forget`) when one does not.

    Only the layers above the new backing file matter (the image alone, when the new backing file is not
    in the old chain or there is none, since what the image does not define itself is then compared
    anyway): each of them is asked for the window once, its backing file cut off meanwhile
    (:func:`_chain_status`), instead of block status going down the chain once per run the image leaves
    undefined, and on into layers whose answer is not used (a run they would define reads as not present
    instead, which decides the same). ``quiesce`` is awaited first: no write of the image may be under way
    while its chain is cut (a write's copy-on-write reads through it).
    """

    def __init__(self, top: BlockDriver, depth: int | None,
                 quiesce: Callable[[], Awaitable[None]] | None = None) -> None:
        self.top = top
        self.depth = depth
        self.quiesce = quiesce
        self.span = _l2_span(top)
        self.old_size = top.backing.size if top.backing is not None else 0
        # the layers whose own extents decide: the image and those above the new backing file
        self.layers = [top]
        for _ in range((depth or 1) - 1):
            below = self.layers[-1].backing
            assert below is not None
            self.layers.append(below)
        self.window: list[Extent] = []
        self.starts: list[int] = []
        self.window_end = 0

    def forget(self) -> None:
        self.window, self.starts, self.window_end = [], [], 0

    async def _runs(self, offset: int, n: int) -> tuple[list[Extent], int]:
        """The image's extents that meet ``[offset, offset + n)``, uncut, and where that range ends within
        the window."""
        if not self.window or not self.window[0].start <= offset < self.window_end:
            length = min(STATUS_WINDOW, self.top.size - offset)
            if self.quiesce is not None:
                await self.quiesce()
            self.window = await _chain_status(self.layers, offset, length)
            self.starts = [e.start for e in self.window]
            self.window_end = offset + length
        end = min(offset + n, self.window_end)
        # the walk moves forward through the window: bisection finds the extents at once
        first = max(bisect.bisect_right(self.starts, offset) - 1, 0)
        return self.window[first:bisect.bisect_left(self.starts, end, first)], end

    async def next(self, offset: int, n: int) -> tuple[bool, int]:
        """(whether [offset, offset + result) must be compared, its length)."""
        runs, end = await self._runs(offset, n)

        def own(e: Extent) -> bool:
            return e.present and e.depth == 0

        allocated = own(runs[0])
        n = _first_run(runs, offset, end, allocated, own)
        if allocated:
            return False, n
        if self.span:
            n = min(n, self.span - offset % self.span)
        depth = self.depth
        if depth is not None and offset < self.old_size:
            # only what a layer above the new backing file defines can differ (past the end of the old
            # chain, which reads zeroes, everything is compared)
            def above(e: Extent) -> bool:
                return e.present and 0 < e.depth < depth

            if not above(runs[0]):
                return False, min(n, _first_run(runs, offset, end, False, above), self.old_size - offset)
            n = min(n, _layer_run(runs, offset, end))
        return True, n


class _Buffers:
    """Reused buffers of the pieces' sizes: fresh 2 MiB buffers cost a page fault per page each time."""

    def __init__(self) -> None:
        self.free: dict[int, list[bytearray]] = {}

    def take(self, n: int) -> bytearray:
        got = self.free.get(n)
        return got.pop() if got else bytearray(n)

    def give(self, buf: bytearray) -> None:
        self.free.setdefault(len(buf), []).append(buf)


async def _read(drv: BlockDriver | None, size: int, offset: int, buf: bytearray) -> None:
    """Fill ``buf`` from ``drv`` at ``offset``; past its end (or without it) the buffer stays zero.

    Inline from the page cache when the driver can (a rebase has no one else on its loop to keep waiting,
    and a thread hop per piece costs more than the copy on a busy machine), else through the I/O pool.
    """
    inside = max(0, min(len(buf), size - offset)) if drv is not None else 0
    if inside > 0:
        view = memoryview(buf)[:inside]
        assert drv is not None
        if not drv.readinto_nowait(offset, view):
            await drv.readinto(offset, view)
    if inside < len(buf):
        buf[inside:] = _ZEROS[:len(buf) - inside]


@dataclass(slots=True)
class _Chunk:
    """A piece that was compared: its place, whether the old chain ended before it, the old data, and the
    runs of differing sectors to write."""

    offset: int
    n: int
    old_is_zero: bool
    buf_old: bytearray
    runs: list[tuple[int, int]]


async def _copy(top: BlockDriver, new: BlockDriver | None, depth: int | None, result: RebaseResult,
                progress: ProgressFn | None, cancel: asyncio.Event | None) -> None:
    """qemu-img 7.2's copy loop: pieces of at most 2 MiB, cut where the old chain ends, compared and
    written sector by sector (qemu 10's loop instead for -c: see :func:`_copy_aligned`).

    The next piece is looked at, read and compared while the previous one is written, when a piece ends
    on a cluster boundary (the writes cannot then change how the next piece looks) and the image has a
    backing file (a standalone image lends itself the new one while zeroes are
    stored, see :func:`_store_zeroes`, which the next piece's look at the image must not see).
    """
    size = top.size
    old = top.backing
    old_size = old.size if old is not None else 0
    new_size = new.size if new is not None else 0
    steps = size // min(size, IO_BUF_SIZE) if size else 0
    walk = _Piece(top, depth, lambda: finish())
    cs = top.cluster_size() or SECTOR
    buffers = _Buffers()

    async def prepare(offset: int) -> _Chunk | None:
        while offset < size:
            check_cancelled(cancel)
            needed, n = await walk.next(offset, min(IO_BUF_SIZE, size - offset))
            if not needed:
                offset += n
                continue
            old_is_zero = offset >= old_size
            if not old_is_zero:
                n = min(n, old_size - offset)
            if new is not None and offset < new_size:
                n = min(n, new_size - offset)
            buf_old = buffers.take(n)
            await _read(None if old_is_zero else old, old_size, offset, buf_old)
            if new is None or offset >= new_size:
                runs = _differing(buf_old, None, SECTOR)  # the new side reads zeroes
            else:
                buf_new = buffers.take(n)
                await _read(new, new_size, offset, buf_new)
                runs = _differing(buf_old, buf_new, SECTOR)
                buffers.give(buf_new)
            return _Chunk(offset, n, old_is_zero, buf_old, runs)
        return None

    async def write(c: _Chunk) -> None:
        for start, length in c.runs:
            await _write(top, new, c.offset + start, length, None if c.old_is_zero else
                         memoryview(c.buf_old)[start:start + length], cs, result)

    # The writes go one at a time, in order (clusters are allocated in guest order, as qemu's are), and
    # the next piece is looked at, read and compared while the previous one is written: its data goes
    # to the file on a worker thread, so the two overlap on two cores.
    writing: asyncio.Future[None] | None = None
    written: _Chunk | None = None
    writeback = Writeback(top)
    done = 0

    async def finish() -> None:
        nonlocal writing, written, done
        if writing is not None:
            fut, writing = writing, None
            await fut
        if written is not None:
            writeback.wrote(sum(n for _, n in written.runs))
            buffers.give(written.buf_old)
            written = None
            done += 1
            report(progress, done, steps)

    try:
        chunk = await prepare(0)
        while chunk is not None:
            nxt_offset = chunk.offset + chunk.n
            await finish()
            written = chunk
            if chunk.runs:
                writing = asyncio.ensure_future(write(chunk))
            if nxt_offset % cs:
                await finish()
                walk.forget()
            elif old is None:
                await finish()
            chunk = await prepare(nxt_offset)
        await finish()
    finally:
        if writing is not None:
            # a failure or cancellation while a write is under way: it ends before the driver closes
            if not writing.done():
                with contextlib.suppress(BaseException):
                    await asyncio.wait({writing})
            if writing.done() and not writing.cancelled():
                writing.exception()  # retrieved: the error that ends the copy is the one raised here


async def _copy_aligned(top: BlockDriver, new: BlockDriver | None, depth: int | None, result: RebaseResult,
                        progress: ProgressFn | None, cancel: asyncio.Event | None) -> None:
    """qemu 10's copy loop, which rebase -c uses: pieces widened to whole clusters, compared cluster by
    cluster, the old chain read up to its end and zeroes past it, and each differing run of clusters
    written whole and compressed (zeroes, where the old chain has ended, as zero clusters)."""
    size = top.size
    old = top.backing
    old_size = old.size if old is not None else 0
    new_size = new.size if new is not None else 0
    steps = size // min(size, IO_BUF_SIZE) if size else 0
    walk = _Piece(top, depth)
    cs = top.cluster_size() or SECTOR
    write = getattr(top, "write_compressed", None)
    assert write is not None
    done = 0
    offset = 0
    while offset < size:
        check_cancelled(cancel)
        needed, n = await walk.next(offset, min(IO_BUF_SIZE, size - offset))
        if not needed:
            offset += n
            continue
        n += offset % cs
        offset -= offset % cs
        n = min(-(-(offset + n) // cs) * cs - offset, size - offset)
        buf_old, buf_new = bytearray(n), bytearray(n)
        await _read(old, old_size, offset, buf_old)
        await _read(new, new_size, offset, buf_new)
        eof = offset >= old_size
        written = 0
        for start, length, differ in _runs(buf_old, buf_new, cs):
            if differ:
                try:
                    if eof:
                        await _store_zeroes(top, new, offset + start, length, cs)
                        result.bytes_zeroed += length
                    else:
                        await write(offset + start, memoryview(buf_old)[start:start + length])
                        result.bytes_copied += length
                except OperationCancelledError:
                    raise
                except BlockError as exc:
                    raise CowWriteError(f"Error while writing to COW image: {_errno_text(exc)}") from None
            written = start + length
            if offset + written >= old_size:
                eof = True
        done += 1
        report(progress, done, steps)
        offset += n


async def _write(top: BlockDriver, new: BlockDriver | None, offset: int, length: int,
                 data: memoryview | None, cs: int, result: RebaseResult) -> None:
    """Write the old view of a differing run into the image: its data, or zeroes (``data`` None) stored
    so that the new backing file cannot show through them."""
    try:
        if data is None:
            await _store_zeroes(top, new, offset, length, cs)
            result.bytes_zeroed += length
        else:
            await top.write(offset, data)
            result.bytes_copied += length
    except OperationCancelledError:
        raise
    except BlockError as exc:
        raise CowWriteError(f"Error while writing to COW image: {_errno_text(exc)}") from None


async def _store_zeroes(top: BlockDriver, new: BlockDriver | None, offset: int, length: int, cs: int) -> None:
    """qemu's write-zeroes into an unallocated range, as qcow2 stores it: whole clusters become zero
    clusters; a piece of a cluster does too when the rest of the cluster reads as zeroes, else the
    piece is written as zero data (the rest copied from the old chain). Other formats get zero data.

    The driver's own write_zeroes may store nothing where the image already reads as zeroes (no backing
    file, or past the old one's end); here the zeroes must hold once the new backing file is in place, so
    a standalone image is given the new backing file for the duration, which makes the driver set the
    zero flag as qemu does.
    """
    if top.format_name != "qcow2":
        await top.write(offset, memoryview(bytes(length)))
        return
    end = offset + length
    pos = offset
    whole_from: int | None = None
    while pos < end:
        cstart = pos - pos % cs
        cend = min(cstart + cs, top.size)
        piece_end = min(end, cend)
        whole = pos == cstart and piece_end == cend
        if not whole:
            buf = bytearray(cend - cstart)
            await top.readinto(cstart, memoryview(buf))
            whole = not any(buf)
        if whole:
            whole_from = cstart if whole_from is None else whole_from
        else:
            if whole_from is not None:
                await _zero_clusters(top, new, whole_from, cstart)
                whole_from = None
            await top.write(pos, memoryview(bytes(piece_end - pos)))
        pos = piece_end
    if whole_from is not None:
        await _zero_clusters(top, new, whole_from, min(-(-end // cs) * cs, top.size))


async def _zero_clusters(top: BlockDriver, new: BlockDriver | None, start: int, end: int) -> None:
    lent = top.backing is None and new is not None
    if lent:
        top.backing = new
    try:
        await top.write_zeroes(start, end - start, may_trim=False, fast=False)
    finally:
        if lent:
            top.backing = None


def _runs(a: bytearray, b: bytearray, chunk: int) -> list[tuple[int, int, bool]]:
    """qemu's compare_buffers over the whole buffers: runs of ``chunk``-sized pieces (the last one may be
    shorter) that are equal or differ, in order."""
    n = len(a)
    if a == b:
        return [(0, n, False)] if n else []
    out: list[tuple[int, int, bool]] = []
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        differ = a[s:e] != b[s:e]
        if out and out[-1][2] == differ:
            out[-1] = (out[-1][0], e - out[-1][0], differ)
        else:
            out.append((s, e - s, differ))
    return out


_BLOCK = 64 * 1024
_ZEROS = memoryview(bytes(IO_BUF_SIZE))
_ZERO_SECTOR = bytes(SECTOR)
_HEAD = 8  # bytes of each sector compared first, as one integer


@functools.lru_cache(maxsize=8)
def _heads(count: int) -> struct.Struct:
    """Picks the first 8 bytes of each of ``count`` sectors as integers, in one C call: sectors whose
    heads differ differ, and only those whose heads are equal need comparing whole."""
    return struct.Struct("=" + f"Q{SECTOR - _HEAD}x" * count)


def _equal_sectors(a: bytearray, mb: memoryview, start: int, end: int) -> list[int]:
    """The starts of the 512-byte sectors in ``[start, end)`` (a multiple of 512 long) where ``a`` and the
    buffer ``mb`` views are equal."""
    count = (end - start) // SECTOR
    cut = _heads(count)
    same = itertools.compress(range(start, end, SECTOR),
                              map(operator.eq, cut.unpack_from(a, start), cut.unpack_from(mb, start)))
    # startswith compares in place (memcmp), without copying either side
    return [s for s in same if a.startswith(mb[s:s + SECTOR], s)]


def _zero_sectors(a: bytearray, start: int, end: int) -> list[int]:
    """The starts of the all-zero 512-byte sectors of ``a`` in ``[start, end)`` (sectors aligned to
    ``start``), found with ``find`` in place rather than a comparison per sector."""
    out: list[int] = []
    pos = start
    while pos < end:
        i = a.find(_ZERO_SECTOR, pos, end)
        if i < 0:
            break
        s = start + -(-(i - start) // SECTOR) * SECTOR
        if s + SECTOR <= end and (s == i or a.startswith(_ZERO_SECTOR, s)):
            out.append(s)
            pos = s + SECTOR
        else:
            pos = s
    return out


def _differing(a: bytearray, b: bytearray | None, chunk: int) -> list[tuple[int, int]]:
    """The runs of ``chunk``-sized pieces (512-byte sectors) in which ``a`` and ``b`` (None: zeroes) differ,
    as qemu's compare_buffers finds them, merged.

    Nothing is copied: equal 64 KiB blocks are skipped with one ``startswith`` (a memcmp in place); in a
    block that differs, against zeroes the equal sectors are ``a``'s zero sectors, found with ``find``
    (a piece with no zero sector at all is one run), else the sectors whose first 8 bytes are equal
    (picked out of both blocks by one ``struct`` call) are compared whole.
    """
    n = len(a)
    if b is None:
        if a == _ZEROS[:n]:
            return []
        if chunk == SECTOR and not n % SECTOR and a.find(_ZERO_SECTOR) < 0:
            return [(0, n)]
    elif a == b:
        return []
    out: list[tuple[int, int]] = []

    def add(start: int, end: int) -> None:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((start, end - start))

    mb = _ZEROS if b is None else memoryview(b)
    for bs in range(0, n, _BLOCK):
        be = min(bs + _BLOCK, n)
        if a.startswith(mb[bs:be], bs):
            continue
        if chunk != SECTOR or (be - bs) % SECTOR:
            for s in range(bs, be, chunk):
                e = min(s + chunk, be)
                if not a.startswith(mb[s:e], s):
                    add(s, e)
            continue
        pos = bs
        for s in _zero_sectors(a, bs, be) if b is None else _equal_sectors(a, mb, bs, be):
            if s > pos:
                add(pos, s)
            pos = s + SECTOR
        if pos < be:
            add(pos, be)
    return out


# -- the header ---------------------------------------------------------------------------------------

async def _change_backing(hf: HostFile | None, backing: str | None, backing_fmt: str | None,
                          fmt: str = "qcow2") -> None:
    """Point the image in ``hf`` (None: a format without backing files to change) at its new backing
    file, with qemu's refusals and their words."""
    shown = "(null)" if backing is None else backing
    name = backing or None
    if name is not None and backing_fmt is None:
        raise BackingChangeError(
            f"Could not change the backing file to '{shown}': backing format must be specified")
    if hf is None:
        raise BackingChangeError(f"Could not change the backing file to '{shown}': Operation not supported")
    if fmt == "qed":
        from ..formats.qed.driver import change_backing_file as change_qed

        try:
            await change_qed(hf, name, backing_fmt if name is not None else None)
        except NoSpaceError:
            raise BackingChangeError(
                f"Could not change the backing file to '{shown}': No space left in the file header") from None
        except UnsupportedError as exc:
            raise BackingChangeError(f"Could not change the backing file to '{shown}': {exc}") from None
        return
    from ..formats.qcow2.headwrite import change_backing_file

    try:
        await change_backing_file(hf, name, backing_fmt if name is not None else None)
    except NoSpaceError:
        raise BackingChangeError(
            f"Could not change the backing file to '{shown}': No space left in the file header") from None
    except InvalidArgumentError as exc:
        raise BackingChangeError(f"Could not change the backing file to '{shown}': {exc}") from None
