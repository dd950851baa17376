"""Copy-on-write exports, as qemu-nbd's ``-s`` and nbdkit's cow filter give them: clients write, the image
never changes.

:class:`CowFilter` sits over a read-only instance of the image. What clients write goes to an overlay: an
unlinked, sparse temporary file as large as the image, holding each block at its guest offset, and an
in-memory map (one byte per 64 KiB block) saying whether the overlay holds the block (DATA), whether the
block reads as zeroes (ZERO: a zeroed or trimmed block, which needs no space), or whether it still comes
from the image (BELOW). A write that covers a block only in part first copies the rest of the block from
the view below (read-modify-write), so every block lies wholly in one place. The overlay lives exactly as
long as the filter: closing it closes the file and the kernel frees its space, and nothing of it is ever
visible in a directory (O_TMPFILE).

:class:`CowVolume` is a Volume whose instances are opened that way. The export registry keys its instances
apart from the image's own, so every connection to one copy-on-write export shares one overlay (as the
clients of one ``qemu-nbd -s -t`` do) while the image's plain export, if any, is not affected.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from imagecore.driver import BlockDriver, Capabilities
from imagecore.errors import HostIOError, UnsupportedError
from imagecore.extent import Extent
from imagecore.hostio import HostFile

from .backend import Filter
from .pools import Volume

BLOCK_SIZE = 64 * 1024

# Block states in the map.
BELOW = 0
DATA = 1
ZERO = 2

_ZERO_BLOCK = bytes(BLOCK_SIZE)


def overlay_dir() -> str:
    """Where overlays are made: $TMPDIR, else /var/tmp, as qemu does (/tmp is often a small tmpfs)."""
    return os.environ.get("TMPDIR") or "/var/tmp"


def _temp_fd(directory: str) -> int:
    """A read-write file in ``directory`` that no name refers to."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    # a filesystem without O_TMPFILE: a named file, unlinked at once
    import tempfile

    fd, path = tempfile.mkstemp(prefix=".nbdsrv-cow-", dir=directory)
    os.unlink(path)
    return fd


class CowFilter(Filter):
    """A writable view of ``next`` whose changes live in a temporary overlay and vanish on close."""

    def __init__(self, next: BlockDriver, *, directory: str | None = None) -> None:
        super().__init__(next)
        # the image is the layer below the overlay, as under qemu-nbd -s (block status depths count it)
        self.backing = next
        c = next.caps
        self.caps = Capabilities(
            writable=True, zero=True, fast_zero=True, trim=True, flush=True, fua=True, extents=True,
            # one instance is shared by every connection of the export, so a flush covers them all
            multi_conn=True, cache=c.cache, min_block=c.min_block, pref_block=c.pref_block,
            max_block=c.max_block)
        self.directory = directory or overlay_dir()
        self.blocks = bytearray((self.size + BLOCK_SIZE - 1) // BLOCK_SIZE)
        self.in_overlay = 0  # blocks not BELOW; 0 lets reads go straight to the image
        self._file: HostFile | None = None
        # Taken by every change that turns a block into another state. Writes that find all their blocks
        # in the overlay already do not take it: such a block only ever leaves DATA by being zeroed whole,
        # which overlaps the write and so may order itself either way.
        self._lock = asyncio.Lock()

    # -- the map ---------------------------------------------------------------------------------------
    def _run_end(self, i: int, end: int) -> int:
        """The first block at or after ``i`` (and before ``end``) whose state differs from block ``i``'s."""
        state = self.blocks[i]
        stop = end
        for other in (BELOW, DATA, ZERO):
            if other != state:
                j = self.blocks.find(other, i, end)
                if j >= 0:
                    stop = min(stop, j)
        return stop

    def _runs(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """``(state, start, end)`` byte runs covering ``[offset, offset+length)``."""
        out: list[tuple[int, int, int]] = []
        end = offset + length
        last = (end - 1) // BLOCK_SIZE + 1
        pos = offset
        while pos < end:
            i = pos // BLOCK_SIZE
            j = self._run_end(i, last)
            stop = min(j * BLOCK_SIZE, end)
            out.append((self.blocks[i], pos, stop))
            pos = stop
        return out

    def _all(self, state: int, offset: int, length: int) -> bool:
        first, last = offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE + 1
        return self._run_end(first, last) == last and self.blocks[first] == state

    def _mark(self, first: int, last: int, state: int) -> None:
        for i in range(first, last):
            old = self.blocks[i]
            if old != state:
                self.in_overlay += (old == BELOW) - (state == BELOW)
                self.blocks[i] = state

    def _overlay(self) -> HostFile:
        # made on the first write, so that describing or only reading an export leaves no file behind
        if self._file is None:
            try:
                fd = _temp_fd(self.directory)
                os.ftruncate(fd, self.size)
            except OSError as exc:
                raise HostIOError.from_oserror(
                    exc, f"Could not create the copy-on-write overlay in '{self.directory}'") from None
            self._file = HostFile(fd, os.path.join(self.directory, "(copy-on-write overlay)"),
                                  read_only=False)
        return self._file

    # -- reads -----------------------------------------------------------------------------------------
    async def readinto(self, offset: int, buf: memoryview) -> None:
        if not buf:
            return
        if self.in_overlay == 0:
            await self.next.readinto(offset, buf)
            return
        for state, start, stop in self._runs(offset, len(buf)):
            piece = buf[start - offset:stop - offset]
            if state == BELOW:
                await self.next.readinto(start, piece)
            elif state == ZERO:
                piece[:] = bytes(len(piece))
            else:
                assert self._file is not None
                await self._file.readinto(start, piece)

    def readinto_nowait(self, offset: int, buf: memoryview) -> bool:
        if not buf:
            return True
        if self.in_overlay == 0 or self._all(BELOW, offset, len(buf)):
            return self.next.readinto_nowait(offset, buf)
        if self._file is not None and self._all(DATA, offset, len(buf)):
            return self._file.read_nowait(offset, buf) == len(buf)
        return False

    def host_runs_nowait(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        # only where the overlay has nothing of the range: the image below answers for all of it
        if self.in_overlay == 0 or self._all(BELOW, offset, length):
            return self.next.host_runs_nowait(offset, length)
        return None

    # -- changes ---------------------------------------------------------------------------------------
    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        n = len(data)
        if n == 0:
            return
        if self.in_overlay and self._all(DATA, offset, n):
            await self._overlay().pwrite(offset, data)
            return
        async with self._lock:
            first, last = offset // BLOCK_SIZE, (offset + n - 1) // BLOCK_SIZE + 1
            end = offset + n
            start, stop = offset, end
            head = tail = b""
            if offset % BLOCK_SIZE and self.blocks[first] != DATA:
                start = first * BLOCK_SIZE
                head = await self._view(start, offset - start)
            block_end = min(last * BLOCK_SIZE, self.size)
            if end < block_end and self.blocks[last - 1] != DATA:
                stop = block_end
                tail = await self._view(end, stop - end)
            f = self._overlay()
            await f.pwritev(start, [b for b in (head, data, tail) if len(b)])
            self._mark(first, last, DATA)

    async def _view(self, offset: int, length: int) -> bytes:
        """What the merged view holds at a range of one block that is not in the overlay yet."""
        buf = bytearray(length)
        await self.readinto(offset, memoryview(buf))
        return bytes(buf)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool,
                           fua: bool = False) -> None:
        await self._zero(offset, length, partial=True)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        # Trimmed blocks read as zeroes (the image below must not show through again); parts of blocks
        # are left as they are, which a trim allows, and as qemu's qcow2 overlay does.
        await self._zero(offset, length, partial=False)

    async def _zero(self, offset: int, length: int, *, partial: bool) -> None:
        if length <= 0:
            return
        end = offset + length
        # whole blocks: the last, short block of an image counts as whole when the range reaches the end
        first_whole = -(-offset // BLOCK_SIZE)
        last_whole = len(self.blocks) if end >= self.size else end // BLOCK_SIZE
        async with self._lock:
            if partial:
                if first_whole > last_whole:  # inside one block
                    await self._zero_part(offset, end)
                else:
                    if offset < first_whole * BLOCK_SIZE:
                        await self._zero_part(offset, min(first_whole * BLOCK_SIZE, end))
                    if last_whole * BLOCK_SIZE < end:
                        await self._zero_part(last_whole * BLOCK_SIZE, end)
            if first_whole < last_whole:
                had_data = self._file is not None and self.blocks.find(DATA, first_whole, last_whole) >= 0
                self._mark(first_whole, last_whole, ZERO)
                if had_data:
                    assert self._file is not None
                    try:  # only to give the space back: ZERO blocks are never read from the overlay
                        await self._file.punch_hole(first_whole * BLOCK_SIZE,
                                                    min(last_whole * BLOCK_SIZE, self.size)
                                                    - first_whole * BLOCK_SIZE)
                    except UnsupportedError:
                        pass

    async def _zero_part(self, start: int, stop: int) -> None:
        """Zero ``[start, stop)`` inside one block (the lock is held)."""
        i = start // BLOCK_SIZE
        state = self.blocks[i]
        if state == ZERO or stop <= start:
            return
        if state == DATA:
            assert self._file is not None
            await self._file.pwrite(start, _ZERO_BLOCK[:stop - start])
            return
        block_start = i * BLOCK_SIZE
        block_end = min(block_start + BLOCK_SIZE, self.size)
        head = await self._view(block_start, start - block_start)
        tail = await self._view(stop, block_end - stop)
        await self._overlay().pwritev(block_start, [b for b in (head, _ZERO_BLOCK[:stop - start], tail)
                                                    if len(b)])
        self._mark(i, i + 1, DATA)

    async def flush(self) -> None:
        # The image is never written, and the overlay dies with the export, so nothing can be made
        # durable; a flush (and FUA) succeeds at once.
        return None

    async def cache(self, offset: int, length: int) -> None:
        await self.next.cache(offset, length)

    # -- block status ----------------------------------------------------------------------------------
    async def _extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        for state, start, stop in self._runs(offset, length):
            if state == DATA:
                yield Extent(start, stop - start, data=True, zero=False, depth=0)
            elif state == ZERO:
                yield Extent(start, stop - start, data=False, zero=True, depth=0)
            else:
                # the image is one layer further down than it would be without the overlay
                async for e in self.next.extents(start, stop - start):
                    yield dataclasses.replace(e, depth=e.depth + 1)

    def extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        if self.in_overlay == 0 or length <= 0:
            return self._below(offset, length)
        return self._extents(offset, length)

    async def _below(self, offset: int, length: int) -> AsyncIterator[Extent]:
        async for e in self.next.extents(offset, length):
            yield dataclasses.replace(e, depth=e.depth + 1)

    def chain_length(self) -> int:
        return self.next.chain_length() + 1

    async def close(self) -> None:
        try:
            if self._file is not None:
                self._file.close()
                self._file = None
            self.blocks = bytearray()
            self.in_overlay = 0
        finally:
            await self.next.close()


@dataclass(frozen=True, slots=True)
class CowVolume(Volume):
    """A volume exported copy-on-write; ``cow_id`` tells apart the overlays of several such exports."""

    cow_id: str = ""

    @classmethod
    def of(cls, vol: Volume, cow_id: str, *, read_only: bool = False) -> CowVolume:
        """``vol`` exported copy-on-write: writable (the image is not written) unless ``read_only``."""
        fields = {f.name: getattr(vol, f.name) for f in dataclasses.fields(Volume)}
        fields["read_only"] = read_only
        return cls(**fields, cow_id=cow_id)

    async def open(self, *, read_only: bool, lock: bool = True, describe: bool = False) -> BlockDriver:
        # The image is always opened read-only, and holds the lock bytes qemu-nbd -s holds on it: those
        # of a backing file under a parent that lets others write (qemu's bdrv_default_perms_for_cow),
        # a consistent reader that shares every permission. So, as with qemu-nbd -s, another process may
        # still open the image read-write; the overlay's clients then see its changes where they have
        # not written themselves.
        opener = self.opener(lock=lock, describe=describe).sharing()
        base = await opener.open(self.path, self.fmt, read_only=True, options=self.open_options())
        if read_only or self.read_only:
            return base
        return CowFilter(base)
