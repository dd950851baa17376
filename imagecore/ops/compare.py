"""`compare`: whether two images read the same, as qemu-img compare decides it, and where they first differ.

Both images' extents are walked in step: ranges that read as zeroes on both sides are never read, data on
both sides is read in large chunks and compared, and data facing an unallocated range must read as zeroes.
Without strict mode the larger image's extra part must read as zeroes too. A mismatch is reported at the
start of its 512-byte sector (counted from the chunk's start), as qemu-img reports it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from ..driver import BlockDriver, ImageOpener
from ..errors import BlockError, OperationCancelledError
from ..extent import Extent
from ..hostio import aligned_buffer, aligned_bytearray
from .common import ProgressFn, check_cancelled, open_image, report

CHUNK = 2 << 20  # qemu-img's IO_BUF_SIZE: the most one comparison step reads from each image
SECTOR = 512
_ZERO = bytes(CHUNK)

# qemu-img compare's exit codes besides 0 (identical) and 1 (different)
EXIT_OPEN = 2
EXIT_STATUS = 3
EXIT_READ = 4


@dataclass(slots=True)
class CompareResult:
    """The verdict: ``identical``, else ``offset`` of the first mismatching sector, or a strict-mode
    refusal (``size_mismatch`` with ``strict``, or ``status_mismatch`` at ``offset``). ``size_mismatch``
    alone (not strict) means the sizes differ and qemu-img warns before its verdict."""

    identical: bool
    size1: int
    size2: int
    offset: int | None = None
    size_mismatch: bool = False
    strict: bool = False
    status_mismatch: bool = False

    def lines(self) -> list[str]:
        """What qemu-img compare prints on stdout for this result (without -q)."""
        if self.strict and self.size_mismatch:
            return ["Strict mode: Image size mismatch!"]
        if self.status_mismatch:
            return [f"Strict mode: Offset {self.offset} block status mismatch!"]
        out: list[str] = []
        if self.size_mismatch and (self.offset is None or self.offset >= min(self.size1, self.size2)):
            out.append("Warning: Image size mismatch!")
        out.append("Images are identical." if self.identical
                   else f"Content mismatch at offset {self.offset}!")
        return out

    @property
    def exit_code(self) -> int:
        return 0 if self.identical else 1


def _with_exit(exc: BlockError, code: int, message: str | None = None) -> BlockError:
    if message is not None:
        exc.message = message
    exc.exit_code = code  # the stage decides compare's exit code, whatever the error's kind
    return exc


async def open_input(path: str, fmt: str | None, opener: ImageOpener) -> BlockDriver:
    """Open an image to read as qemu-img's img_open does, with its wording for a missing or odd file."""
    return await open_image(path, fmt, read_only=True, opener=opener)


class _Walk:
    """One image's extents consumed piecewise: the current run and how much of it is left."""

    def __init__(self, drv: BlockDriver, name: str) -> None:
        self.drv = drv
        self.name = name
        self.it: AsyncIterator[Extent] = drv.extents(0, drv.size)
        self.cur: Extent | None = None
        self.pos = 0

    async def at(self, offset: int) -> Extent:
        """The run covering ``offset``; offsets only grow."""
        while self.cur is None or self.cur.end <= offset:
            try:
                self.cur = await anext(self.it)
            except StopAsyncIteration:
                raise _with_exit(BlockError(), EXIT_STATUS,
                                 f"Sector allocation test failed for {self.name}") from None
            except OperationCancelledError:
                raise
            except BlockError as exc:
                raise _with_exit(exc, EXIT_STATUS, f"Sector allocation test failed for {self.name}") from None
        return self.cur

    def status(self, e: Extent) -> tuple[bool, bool, bool, bool, bool]:
        """The bits of qemu's block status that strict mode compares: allocated, zero, data, offset
        valid and whether the run reaches the end of the image."""
        return (e.present, e.zero, e.data, e.offset is not None, e.end >= self.drv.size)

    async def aclose(self) -> None:
        closer = getattr(self.it, "aclose", None)
        if closer is not None:
            await closer()


async def _read(drv: BlockDriver, name: str, offset: int, buf: memoryview) -> None:
    try:
        await drv.readinto(offset, buf)
    except OperationCancelledError:
        raise
    except BlockError as exc:
        raise _with_exit(exc, EXIT_READ, f"Error while reading offset {offset} of {name}: "
                                         f"{os.strerror(exc.errno)}") from None


def first_difference(a: bytearray, b: memoryview, n: int) -> int:
    """Index of the first byte where ``a[:n]`` and ``b[:n]`` differ, or -1; memcmp-sized steps."""
    if a.startswith(b[:n]):
        return -1
    lo, hi = 0, n  # the difference lies in [lo, hi)
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if a.startswith(b[lo:mid], lo):
            lo = mid
        else:
            hi = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i
    return -1  # unreachable: the prefixes differed


def _sector(index: int) -> int:
    return index - index % SECTOR


async def compare(path1: str, path2: str, fmt1: str | None = None, fmt2: str | None = None, *,
                  strict: bool = False, opener: ImageOpener | None = None, force_share: bool = False,
                  progress: ProgressFn | None = None, cancel: asyncio.Event | None = None) -> CompareResult:
    """Compare two images' guest contents; never prints.

    Errors carry qemu-img compare's exit codes: 2 when an image cannot be opened, 3 when its allocation
    cannot be queried, 4 when a read fails. Progress is (bytes compared, the larger image's size).
    """
    if opener is None:
        opener = ImageOpener(lock=True, force_share=force_share)
    elif force_share and not opener.force_share:
        opener = opener.sharing()
    check_cancelled(cancel)
    drv1: BlockDriver | None = None
    drv2: BlockDriver | None = None
    try:
        try:
            drv1 = await open_input(path1, fmt1, opener)
            drv2 = await open_input(path2, fmt2, opener)
        except OperationCancelledError:
            raise
        except BlockError as exc:
            raise _with_exit(exc, EXIT_OPEN) from None
        return await _compare(drv1, drv2, path1, path2, strict, progress, cancel)
    finally:
        for d in (drv2, drv1):
            if d is not None:
                await d.close()


async def _compare(drv1: BlockDriver, drv2: BlockDriver, name1: str, name2: str, strict: bool,
                   progress: ProgressFn | None, cancel: asyncio.Event | None) -> CompareResult:
    size1, size2 = drv1.size, drv2.size
    total, base = min(size1, size2), max(size1, size2)
    res = CompareResult(False, size1, size2, size_mismatch=size1 != size2, strict=strict)
    report(progress, 0, base)
    if strict and size1 != size2:
        return res
    # page-aligned: the kernel copies into them at twice the speed of a bytearray's own
    buf1 = aligned_bytearray(CHUNK)
    mv1, mv2 = memoryview(buf1), aligned_buffer(CHUNK)
    w1, w2 = _Walk(drv1, name1), _Walk(drv2, name2)
    async with aclosing(w1), aclosing(w2):
        offset = 0
        while offset < total:
            check_cancelled(cancel)
            e1, e2 = await w1.at(offset), await w2.at(offset)
            chunk = min(e1.end, e2.end) - offset
            if strict and w1.status(e1) != w2.status(e2):
                res.status_mismatch, res.offset = True, offset
                return res
            if e1.zero and e2.zero:
                pass
            elif e1.present == e2.present:
                if e1.present:
                    chunk = min(chunk, CHUNK)
                    await asyncio.gather(_read(drv1, name1, offset, mv1[:chunk]),
                                         _read(drv2, name2, offset, mv2[:chunk]))
                    at = first_difference(buf1, mv2, chunk)
                    if at >= 0:
                        res.offset = offset + _sector(at)
                        return res
            else:
                chunk = min(chunk, CHUNK)
                drv, name = (drv1, name1) if e1.present else (drv2, name2)
                at = await _nonzero(drv, name, offset, mv1[:chunk], buf1)
                if at >= 0:
                    res.offset = offset + at
                    return res
            offset += chunk
            report(progress, offset, base)
        if size1 != size2:
            over = w1 if size1 > size2 else w2
            while offset < base:
                check_cancelled(cancel)
                e = await over.at(offset)
                chunk = e.end - offset
                if e.present and not e.zero:
                    chunk = min(chunk, CHUNK)
                    at = await _nonzero(over.drv, over.name, offset, mv1[:chunk], buf1)
                    if at >= 0:
                        res.offset = offset + at
                        return res
                offset += chunk
                report(progress, offset, base)
    res.identical = True
    return res


async def _nonzero(drv: BlockDriver, name: str, offset: int, view: memoryview, buf: bytearray) -> int:
    """Read ``view``'s length at ``offset``; the start of its first sector that is not all zeroes, or -1."""
    await _read(drv, name, offset, view)
    at = first_difference(buf, memoryview(_ZERO), len(view))
    return -1 if at < 0 else _sector(at)
