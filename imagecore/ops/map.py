"""`map`: the allocation map of an image and its backing chain, as merged entries; their JSON and text forms.

``open_map`` opens the image and yields the entries while it stays open; ``MapEntry.json`` is qemu-img
7.2's one-line JSON form of an entry and ``human_line`` a row of its human table.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from ..driver import BlockDriver, ImageOpener
from .common import ProgressFn, check_cancelled, layer, open_image, report


@dataclass(slots=True)
class MapEntry:
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    filename: str | None

    def mergeable(self, nxt: MapEntry) -> bool:
        """qemu-img's entry_mergeable: same flags, same file, host offsets continuing."""
        if self.length == 0:
            return False
        if (self.zero, self.data, self.depth, self.present, self.filename is None, self.offset is None) != (
                nxt.zero, nxt.data, nxt.depth, nxt.present, nxt.filename is None, nxt.offset is None):
            return False
        if self.filename is not None and self.filename != nxt.filename:
            return False
        return self.offset is None or nxt.offset is None or self.offset + self.length == nxt.offset

    def to_json(self) -> dict[str, Any]:
        """The entry as qemu-img's MapEntry JSON object (``offset`` only when the data has a host offset)."""
        d: dict[str, Any] = {"start": self.start, "length": self.length, "depth": self.depth,
                             "present": self.present, "zero": self.zero, "data": self.data}
        if self.offset is not None:
            d["offset"] = self.offset
        return d

    def json(self) -> str:
        """The entry as qemu-img 7.2 prints it in ``map --output=json``: one line, its own spacing."""
        text = (f'{{ "start": {self.start}, "length": {self.length}, "depth": {self.depth},'
                f' "present": {_b(self.present)}, "zero": {_b(self.zero)}, "data": {_b(self.data)}')
        if self.offset is not None:
            text += f', "offset": {self.offset}'
        return text + "}"


def _b(v: bool) -> str:
    return "true" if v else "false"


async def map_entries(drv: BlockDriver, start: int, end: int) -> AsyncGenerator[MapEntry, None]:
    """Merged entries covering ``[start, end)``; one empty entry when the range is empty, as qemu-img."""
    cur = MapEntry(start, 0, 0, False, False, False, None, None)
    if start < end:
        async for e in drv.extents(start, end - start):
            fname = layer(drv, e.depth).filename if e.offset is not None else None
            nxt = MapEntry(e.start, e.length, e.depth, e.present, e.zero, e.data, e.offset, fname)
            if cur.mergeable(nxt):
                cur.length += nxt.length
                continue
            if cur.length > 0:
                yield cur
            cur = nxt
    yield cur


HUMAN_HEADER = "%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File")  # noqa: UP031


def _hex(v: int) -> str:
    # C's %#x prints a bare 0 for zero.
    return "%-16s" % ("0" if v == 0 else f"{v:#x}")  # noqa: UP031


def human_line(e: MapEntry) -> str:
    """The human table's row for a data entry (qemu-img lists only data that is not zero)."""
    return f"{_hex(e.start)}{_hex(e.length)}{_hex(e.offset or 0)}{e.filename or ''}\n"


@asynccontextmanager
async def open_map(path: str, fmt: str | None, *, opener: ImageOpener | None = None, start: int = 0,
                   max_length: int | None = None, force_share: bool = False,
                   progress: ProgressFn | None = None,
                   cancel: asyncio.Event | None = None) -> AsyncIterator[AsyncIterator[MapEntry]]:
    """Open ``path`` and yield its merged map entries over ``[start, start+max_length)`` (clipped to the
    image), as an async iterator valid while the context is open.

    Progress is the bytes of the range mapped so far; a set ``cancel`` stops the iteration between
    entries with OperationCancelledError.
    """
    if opener is None:
        opener = ImageOpener(lock=True, force_share=force_share)
    elif force_share and not opener.force_share:
        opener = opener.sharing()
    drv = await open_image(path, fmt, read_only=True, opener=opener)
    try:
        end = drv.size
        if max_length is not None:
            end = min(start + max_length, end)
        entries = _entries(drv, start, end, progress, cancel)
        try:
            yield entries
        finally:
            # a caller that stops early must not leave a generator suspended in the closed driver
            await entries.aclose()
    finally:
        await drv.close()


async def _entries(drv: BlockDriver, start: int, end: int, progress: ProgressFn | None,
                   cancel: asyncio.Event | None) -> AsyncGenerator[MapEntry, None]:
    total = max(end - start, 0)
    async with aclosing(map_entries(drv, start, end)) as it:
        async for e in it:
            check_cancelled(cancel)
            yield e
            report(progress, min(e.start + e.length - start, total), total)
