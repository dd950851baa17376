"""Where NBD meets imagecore: export descriptions from driver capabilities, block status, and filters.

The protocol core already validates ranges, alignment and flags against what it advertised; what is left
here is policy (read-only exports and templates) and translation (extents to NBD block-status runs).

Filters follow nbdkit's model: a filter is a BlockDriver whose ``next`` is the layer below, and whose
methods delegate to it unless they change something. They are kept thin: one attribute lookup and one
call per request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

from imagecore.driver import BlockDriver, Capabilities
from imagecore.errors import (
    BlockError,
    ImageLockedError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ReadOnlyError,
    ShutdownError,
)
from imagecore.extent import Extent
from nbdproto.constants import (
    META_BASE_ALLOCATION,
    META_QEMU_ALLOCATION_DEPTH,
    META_QEMU_DIRTY_BITMAP,
    REP_ERR_POLICY,
    REP_ERR_SHUTDOWN,
    REP_ERR_UNKNOWN,
    STATE_DIRTY,
    STATE_HOLE,
    STATE_ZERO,
)

from .proto.events import ExportInfo

# A block-status reply is bounded so that a single request over a badly fragmented image cannot build an
# unbounded list; clients ask again for the rest.
MAX_EXTENTS = 64 * 1024


class Filter(BlockDriver):
    """A layer over ``next`` with the same interface; every method passes through by default."""

    def __init__(self, next: BlockDriver) -> None:
        self.next = next
        self.size = next.size
        self.caps = next.caps
        self.filename = next.filename
        self.backing = next.backing

    async def readinto(self, offset: int, buf: memoryview) -> None:
        await self.next.readinto(offset, buf)

    # The fast paths pass through only for a filter whose reads are the layer below's: one that changes
    # readinto (an offset, an overlay) must say how its fast paths map, or they would bypass it.
    def readinto_nowait(self, offset: int, buf: memoryview) -> bool:
        if type(self).readinto is not Filter.readinto:
            return False
        return self.next.readinto_nowait(offset, buf)

    def host_runs_nowait(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        if type(self).readinto is not Filter.readinto:
            return None
        return self.next.host_runs_nowait(offset, length)

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        await self.next.write(offset, data, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool,
                           fua: bool = False) -> None:
        await self.next.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.next.trim(offset, length, fua=fua)

    async def flush(self) -> None:
        await self.next.flush()

    def may_need_flush(self) -> bool:
        return self.next.may_need_flush()

    def extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        return self.next.extents(offset, length)

    def extents_lookahead(self) -> bool:
        # the layer's, for a filter whose extents are the layer's
        return type(self).extents is Filter.extents and self.next.extents_lookahead()

    def extents_nowait(self, offset: int, length: int) -> Iterator[Extent] | None:
        # only for a filter whose extents are the layer below's (an offset, an overlay must map them)
        if type(self).extents is not Filter.extents:
            return None
        return self.next.extents_nowait(offset, length)

    async def cache(self, offset: int, length: int) -> None:
        await self.next.cache(offset, length)

    async def close(self) -> None:
        await self.next.close()

    def chain_length(self) -> int:
        return self.next.chain_length()

    def bitmap_names(self) -> list[str]:
        return self.next.bitmap_names()

    def bitmap_runs(self, name: str, offset: int, length: int) -> AsyncIterator[tuple[int, int, bool]]:
        return self.next.bitmap_runs(name, offset, length)


class ReadOnlyFilter(Filter):
    """Refuses every change with EPERM, whatever the layer below could do."""

    def __init__(self, next: BlockDriver) -> None:
        super().__init__(next)
        c = next.caps
        self.caps = Capabilities(
            writable=False, zero=False, fast_zero=False, trim=False, flush=c.flush, fua=False,
            extents=c.extents, multi_conn=c.multi_conn, cache=c.cache, min_block=c.min_block,
            pref_block=c.pref_block, max_block=c.max_block)

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        raise ReadOnlyError("export is read-only")

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool,
                           fua: bool = False) -> None:
        raise ReadOnlyError("export is read-only")

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        raise ReadOnlyError("export is read-only")


# Why an export that exists was refused, as the option reply that says so (the first matching class
# wins). The spec has no "busy" reply; a lock held by another process is a policy refusal.
# ERR_UNKNOWN is kept for names that are truly absent.
REFUSALS: tuple[tuple[type[BlockError], int], ...] = (
    (ShutdownError, REP_ERR_SHUTDOWN),
    (NotFoundError, REP_ERR_UNKNOWN),
    (ImageLockedError, REP_ERR_POLICY),
    (PermissionDeniedError, REP_ERR_POLICY),
    (BlockError, REP_ERR_POLICY),
)


def refusal(exc: BlockError) -> tuple[int, str]:
    """The ``(NBD_REP_ERR_*, message)`` an option reply gives for a refused export."""
    for cls, rep in REFUSALS:
        if isinstance(exc, cls):
            return rep, str(exc)
    return REP_ERR_POLICY, str(exc)


class OffsetFilter(Filter):
    """The image from ``offset`` on (qemu-nbd -o: qemu's raw driver with an offset over the image)."""

    def __init__(self, next: BlockDriver, offset: int) -> None:
        super().__init__(next)
        if offset > next.size:
            raise InvalidArgumentError(f"Offset ({offset}) cannot be greater than size of the containing "
                                       f"file ({next.size})")
        self.offset = offset
        self.size = next.size - offset

    async def readinto(self, offset: int, buf: memoryview) -> None:
        await self.next.readinto(offset + self.offset, buf)

    def readinto_nowait(self, offset: int, buf: memoryview) -> bool:
        return self.next.readinto_nowait(offset + self.offset, buf)

    def host_runs_nowait(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        return self.next.host_runs_nowait(offset + self.offset, length)

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        await self.next.write(offset + self.offset, data, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool,
                           fua: bool = False) -> None:
        await self.next.write_zeroes(offset + self.offset, length, may_trim=may_trim, fast=fast, fua=fua)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.next.trim(offset + self.offset, length, fua=fua)

    async def extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        async for e in self.next.extents(offset + self.offset, length):
            yield replace(e, start=e.start - self.offset)

    async def cache(self, offset: int, length: int) -> None:
        await self.next.cache(offset + self.offset, length)

    def bitmap_names(self) -> list[str]:
        return []  # a bitmap counts the image's own offsets


class DiscardIgnoreFilter(Filter):
    """qemu's ``discard=ignore`` (qemu-nbd's default): a trim succeeds and changes nothing. Writing zeroes
    may still deallocate where the client allows it in a format image (qemu's NBD server hands its
    MAY_UNMAP to the format node, and qcow2 drops the clusters), never in a raw file (qemu's raw driver
    asks its file through bdrv_co_pwrite_zeroes, which drops MAY_UNMAP without discard=unmap)."""

    def __init__(self, next: BlockDriver) -> None:
        super().__init__(next)
        self.zero_unmaps = next.format_name != "raw"

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if fua:
            await self.next.flush()

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool,
                           fua: bool = False) -> None:
        await self.next.write_zeroes(offset, length, may_trim=may_trim and self.zero_unmaps, fast=fast,
                                     fua=fua)


_ZEROES = bytes(1 << 20)


def is_zero(data: memoryview) -> bool:
    """Whether a buffer holds only zero bytes (compared a MiB at a time, in C)."""
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    zero = memoryview(_ZEROES)
    for i in range(0, len(view), len(_ZEROES)):
        part = view[i:i + len(_ZEROES)]
        if part != zero[:len(part)]:
            return False
    return True


class DetectZeroesFilter(Filter):
    """qemu's ``detect-zeroes``: a write of zeroes becomes a write-zeroes request, which deallocates too
    with ``unmap`` (only allowed with ``discard=unmap``)."""

    def __init__(self, next: BlockDriver, *, unmap: bool) -> None:
        super().__init__(next)
        self.unmap = unmap

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        if len(data) and is_zero(data):
            await self.next.write_zeroes(offset, len(data), may_trim=self.unmap, fast=False, fua=fua)
        else:
            await self.next.write(offset, data, fua=fua)


def build_stack(driver: BlockDriver, *, read_only: bool, offset: int = 0, detect_zeroes: str = "off",
                discard: str = "unmap") -> BlockDriver:
    """The filters an export runs through, innermost first: the offset (qemu-nbd -o), discard=ignore,
    detect-zeroes, read-only."""
    if offset:
        driver = OffsetFilter(driver, offset)
    if read_only or not driver.caps.writable:
        return ReadOnlyFilter(driver)
    if discard in ("ignore", "off"):
        driver = DiscardIgnoreFilter(driver)
    if detect_zeroes in ("on", "unmap"):
        driver = DetectZeroesFilter(driver, unmap=detect_zeroes == "unmap" and discard in ("unmap", "on"))
    return driver


def export_info(name: str, driver: BlockDriver, *, description: str = "",
                bitmaps: tuple[str, ...] | None = None, allocation_depth: bool = True,
                multi_conn: bool = True, qemu_blocks: bool = False) -> ExportInfo:
    """What the protocol core advertises for ``driver``; flags follow the capabilities honestly.

    Every consistent persistent bitmap of the image is a ``qemu:dirty-bitmap:NAME`` context, or only those
    in ``bitmaps`` when it is given (``--bitmap``, qemu-nbd's ``-B``). ``qemu_blocks`` advertises FUA
    and the preferred block size as qemu-nbd does (``nbdsrv qemu-nbd``).
    """
    c = driver.caps
    ro = not c.writable
    contexts: tuple[str, ...] = ()
    if c.extents:
        contexts = (META_BASE_ALLOCATION, META_QEMU_ALLOCATION_DEPTH) if allocation_depth else (
            META_BASE_ALLOCATION,)
    own = driver.bitmap_names()
    contexts += tuple(META_QEMU_DIRTY_BITMAP + n for n in own if bitmaps is None or n in bitmaps)
    # a bitmap named with --bitmap may live further down the backing chain, as qemu-nbd -B finds it
    contexts += tuple(META_QEMU_DIRTY_BITMAP + n for n in bitmaps or ()
                      if n not in own and bitmap_layer(driver, n) is not None)
    max_block = min(c.max_block, 32 * 1024 * 1024)
    return ExportInfo(
        name=name, size=driver.size, read_only=ro, description=description,
        can_flush=c.flush, can_fua=(c.fua and not ro) or (ro and qemu_blocks and c.flush),
        can_trim=c.trim and not ro,
        can_zero=c.zero and not ro, can_fast_zero=c.fast_zero and c.zero and not ro, can_cache=c.cache,
        # One driver instance per image serves every connection (exports.py), so a flush on one
        # connection covers writes completed on all of them.
        can_multi_conn=c.multi_conn and multi_conn,
        min_block=max(1, c.min_block),
        pref_block=max(4096 if qemu_blocks else c.pref_block, c.min_block, 1),
        max_block=max(max_block, c.min_block, 1),
        meta_contexts=contexts)


# How far past a request a block-status reply's final extent may look for where its run ends (see
# BlockDriver.extents_lookahead): as far as a descriptor without extended headers reaches, and over at
# most so many of the driver's extents (qemu:allocation-depth on a raw file is one run however many
# data runs and holes lie under it: each costs its lseeks)
LOOKAHEAD = 1 << 32
LOOKAHEAD_EXTENTS = 64


class _StatusRuns:
    """One meta context's block-status runs, built from a driver's extents in order: (length, flags)
    runs, neighbours with the same flags merged, from the request's offset to its end; the final run may
    go on past the end (by at most ``extra`` bytes and LOOKAHEAD_EXTENTS of the driver's extents) while
    the extents that follow have its flags."""

    __slots__ = ("allocation", "driver", "extra", "last_flags", "left", "out", "past", "req_one")

    def __init__(self, driver: BlockDriver, context: str, length: int, req_one: bool, extra: int) -> None:
        self.driver = driver
        self.allocation = context == META_BASE_ALLOCATION
        self.req_one = req_one
        self.left = length  # bytes of the request not yet covered
        self.extra = extra
        self.out: list[tuple[int, int]] = []
        self.last_flags = -1
        self.past = 0  # extents taken wholly past the request

    def add(self, e: Extent) -> bool:
        """Take one extent; False once the reply is complete (the caller stops asking)."""
        n = min(e.length, self.left + self.extra)
        if n <= 0:
            return self.left + self.extra > 0
        if self.allocation:
            flags = (0 if e.data else STATE_HOLE) | (STATE_ZERO if e.zero else 0)
        else:
            # qemu:allocation-depth: 0 where no layer of the chain has the run, else 1 + its depth.
            flags = e.depth + 1 if e.present else _past_short_backing(self.driver, e)
        out = self.out
        if flags == self.last_flags:
            if self.left <= 0:
                self.past += 1
                if self.past > LOOKAHEAD_EXTENTS:
                    return False
            out[-1] = (out[-1][0] + n, flags)
        else:
            if self.left <= 0 or (self.req_one and out) or len(out) >= MAX_EXTENTS:
                return False  # past the request only the final run goes on
            out.append((n, flags))
            self.last_flags = flags
        covered = min(n, self.left)
        self.left -= covered
        self.extra -= n - covered
        return self.left + self.extra > 0

    def runs(self, length: int) -> list[tuple[int, int]]:
        out = self.out
        if not out:
            # A driver that yields nothing for a valid range: describe it as data, the safe answer.
            out.append((length, 0))
        return out[:1] if self.req_one else out


def _lookahead(driver: BlockDriver, offset: int, length: int, req_one: bool) -> int:
    """Bytes past the request that the final extent may cover: none with REQ_ONE (the spec forbids it)
    or where looking further costs more than the extents taken."""
    if req_one or not driver.extents_lookahead():
        return 0
    return max(0, min(LOOKAHEAD, driver.size - offset - length))


async def block_status(driver: BlockDriver, context: str, offset: int, length: int, *,
                       req_one: bool) -> list[tuple[int, int]]:
    """Runs of ``(length, flags)`` for one meta context, from ``offset``: they cover the request (or its
    first part), and the final one may run on past it (never with REQ_ONE)."""
    if context.startswith(META_QEMU_DIRTY_BITMAP):
        return await bitmap_status(driver, context[len(META_QEMU_DIRTY_BITMAP):], offset, length,
                                   req_one=req_one)
    extra = _lookahead(driver, offset, length, req_one)
    acc = _StatusRuns(driver, context, length, req_one, extra)
    async for e in driver.extents(offset, length + extra):
        if not acc.add(e):
            break
    return acc.runs(length)


def block_status_nowait(driver: BlockDriver, context: str, offset: int, length: int, *,
                        req_one: bool) -> list[tuple[int, int]] | None:
    """:func:`block_status` without awaiting, where the driver finds its extents so
    (:meth:`~imagecore.driver.BlockDriver.extents_nowait`); None means await :func:`block_status`."""
    if context.startswith(META_QEMU_DIRTY_BITMAP):
        return None
    extra = _lookahead(driver, offset, length, req_one)
    extents = driver.extents_nowait(offset, length + extra)
    if extents is None:
        return None
    acc = _StatusRuns(driver, context, length, req_one, extra)
    for e in extents:
        if not acc.add(e):
            break
    else:
        if acc.left > 0:
            # the driver stopped short of the request (a qcow2 table not read yet): a reply that covers
            # less would cost the client a request, so the coroutine answers it, reading what it lacks
            return None
    return acc.runs(length)


def _past_short_backing(driver: BlockDriver, e: Extent) -> int:
    """The allocation depth of a run no layer has: a run past the end of a backing file shorter than the
    layer above it reads as zeroes that qemu counts as allocated in that backing file (its
    bdrv_is_allocated_above; qemu-img map calls the same run unallocated). The run's depth is that of
    the layer above the short file, or of the last layer of the chain, which has no backing file."""
    layer = driver
    for _ in range(e.depth):
        if layer.backing is None:
            return 0
        layer = layer.backing
    below = layer.backing
    return e.depth + 2 if below is not None and e.start >= below.size else 0


def bitmap_layer(driver: BlockDriver, name: str) -> BlockDriver | None:
    """The layer whose consistent bitmap ``name`` is: the image's own, else the first layer of its backing
    chain that has it (qemu-nbd's -B looks there too: a backup tool's bitmap may be in the base below a
    snapshot overlay); None if no layer has it."""
    layer: BlockDriver | None = driver
    while layer is not None:
        if name in layer.bitmap_names():
            return layer
        layer = layer.backing
    return None


async def bitmap_status(driver: BlockDriver, bitmap: str, offset: int, length: int, *,
                        req_one: bool) -> list[tuple[int, int]]:
    """A dirty bitmap's runs as block status: NBD_STATE_DIRTY where a write (made before the export was
    opened, or through it since) set the bitmap's bits, 0 where it is clean; at the bitmap's granularity,
    clipped to the request. A bitmap of a backing layer sees only the writes made to that layer."""
    out: list[tuple[int, int]] = []
    layer = driver if bitmap in driver.bitmap_names() else (bitmap_layer(driver, bitmap) or driver)
    async for start, end, dirty in layer.bitmap_runs(bitmap, offset, length):
        flags = STATE_DIRTY if dirty else 0
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + end - start, flags)
            continue
        if (req_one and out) or len(out) >= MAX_EXTENTS:
            break
        out.append((end - start, flags))
    if not out:
        out.append((length, 0))
    return out[:1] if req_one else out
