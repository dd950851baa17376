"""`dd`: copy part of an image into a new image, as qemu-img dd does (bs, count and skip in blocks).

The output is created with the output format and the size qemu-img 7.2 gives it: the input's size, cut to
``count * bs`` when that is smaller, minus ``skip * bs`` (zero when the skip lies beyond). The copy reads
the input's data and writes it at the output's start; ranges the input reads as zeroes are neither read
nor written, since the new output reads as zeroes there already.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from ..driver import BlockDriver, ImageOpener, format_names, get_format
from ..errors import (
    BlockError,
    InvalidArgumentError,
    NotFoundError,
    OperationCancelledError,
    UnsupportedError,
)
from ..filenames import is_special
from ..hostio import aligned_buffer
from .common import INT64_MAX as INT64_MAX
from .common import ProgressFn, check_cancelled, report
from .compare import open_input
from .create import create_image

CHUNK = 4 << 20
INT_MAX = (1 << 31) - 1


@dataclass(slots=True)
class DdOptions:
    """qemu-img dd's operands: ``bs`` in bytes, ``count`` and ``skip`` in blocks (None when not given)."""

    input: str
    output: str
    fmt: str | None = None
    out_fmt: str = "raw"
    bs: int = 512
    count: int | None = None
    skip: int | None = None
    force_share: bool = False


@dataclass(slots=True)
class DdResult:
    """What dd made: the output's size and the bytes copied into it; ``skip_beyond`` when the skip lay
    past the input (qemu-img then warns ``cannot skip to specified offset`` and leaves the output empty)."""

    output_size: int
    bytes_copied: int
    skip_beyond: bool = False


def output_size(input_size: int, o: DdOptions) -> tuple[int, int, bool]:
    """(copy end in the input, output size, skip beyond the end) by qemu-img 7.2's arithmetic."""
    end = input_size
    if o.count is not None and o.count <= INT64_MAX // o.bs and o.count * o.bs < end:
        end = o.count * o.bs
    skip = o.skip or 0
    beyond = o.skip is not None and (skip > INT64_MAX // o.bs or end < skip * o.bs)
    return end, 0 if beyond else end - skip * o.bs, beyond


async def dd(o: DdOptions, *, opener: ImageOpener | None = None, progress: ProgressFn | None = None,
             cancel: asyncio.Event | None = None) -> DdResult:
    """Create ``o.output`` and copy the input's selected blocks into it; never prints.

    Progress is (bytes of the output done, output size). Errors read as qemu-img dd's. When ``cancel``
    is set the copy stops between chunks, the output made so far is deleted and OperationCancelledError
    is raised, as a cancelled convert does.
    """
    if o.bs < 1 or o.bs > INT_MAX:
        raise InvalidArgumentError(f"Invalid bs specified. Must be between 1 and {INT_MAX}.")
    opener = opener or ImageOpener(lock=True)
    src_opener = opener.sharing() if o.force_share and not opener.force_share else opener
    check_cancelled(cancel)
    src: BlockDriver | None = None
    dst: BlockDriver | None = None
    created = cancelled = False
    try:
        src = await open_input(o.input, o.fmt, src_opener)
        if o.out_fmt not in format_names():
            raise UnsupportedError("Unknown file format")
        if get_format(o.out_fmt).create is None:
            raise UnsupportedError(f"Format driver '{o.out_fmt}' does not support image creation")
        end, size, beyond = output_size(src.size, o)
        check_cancelled(cancel)
        parent = os.path.dirname(o.output) or "."
        try:
            if not is_special(o.output) and not os.path.isdir(parent):
                raise NotFoundError(f"Could not create '{o.output}': No such file or directory")
            await create_image(o.output, o.out_fmt, size, {}, opener=opener)
        except BlockError as exc:
            exc.message = f"{o.output}: error while creating output image: {exc}"
            raise
        created = True
        dst = await opener.open(o.output, o.out_fmt, read_only=False)
        start = end if beyond else (o.skip or 0) * o.bs
        # an NBD export is not a new image: its old bytes are overwritten with the input's zeroes too
        copied = await _copy(src, dst, start, end, progress, cancel, fresh=not is_special(o.output))
        await dst.flush()
        return DdResult(size, copied, beyond)
    except OperationCancelledError:
        cancelled = True
        raise
    finally:
        try:
            if dst is not None:
                await dst.close()
        except BlockError:
            if not cancelled:
                raise
        finally:
            if src is not None:
                await src.close()
            if cancelled and created and not is_special(o.output):
                try:
                    os.unlink(o.output)
                except FileNotFoundError:
                    pass


async def _copy(src: BlockDriver, dst: BlockDriver, start: int, end: int, progress: ProgressFn | None,
                cancel: asyncio.Event | None, *, fresh: bool = True) -> int:
    """Copy the input's ``[start, end)`` to the output's start; zero runs are left to the new image.

    Two buffers: the next chunk is read while the last one is written, and writes stay in order so that
    a new qcow2 output allocates its clusters in guest order.
    """
    total = max(end - start, 0)
    report(progress, 0, total)
    if total == 0:
        return 0
    size = min(CHUNK, total)
    views = [aligned_buffer(size), aligned_buffer(size)]
    writing: asyncio.Future[None] | None = None
    copied = turn = 0
    try:
        async for e in src.extents(start, total):
            if e.zero:
                if not fresh:
                    if writing is not None:
                        await writing
                        writing = None
                    await dst.write_zeroes(e.start - start, e.length, may_trim=False, fast=False)
                    copied += e.length
                continue
            pos = e.start
            while pos < e.end:
                check_cancelled(cancel)
                n = min(e.end - pos, size)
                view = views[turn][:n]
                turn ^= 1
                await _read(src, pos, view)
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(_write(dst, pos - start, view))
                pos += n
                copied += n
                report(progress, pos - start - n, total)
        if writing is not None:
            await writing
            writing = None
    finally:
        if writing is not None and not writing.done():
            writing.cancel()
            await asyncio.gather(writing, return_exceptions=True)
    report(progress, total, total)
    return copied


async def _read(src: BlockDriver, pos: int, view: memoryview) -> None:
    try:
        await src.readinto(pos, view)
    except OperationCancelledError:
        raise
    except BlockError as exc:
        exc.message = f"error while reading from input image file: {os.strerror(exc.errno)}"
        raise


async def _write(dst: BlockDriver, pos: int, view: memoryview) -> None:
    try:
        await dst.write(pos, view)
    except BlockError as exc:
        exc.message = f"error while writing to output image file: {os.strerror(exc.errno)}"
        raise
