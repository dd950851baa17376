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
from ..errors import BlockError, OperationCancelledError
from .common import ProgressFn, check_cancelled, layer, open_image


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

    def to_json(self) -> dict[str, Any]:
        """The entry as qemu-img's MapEntry JSON object (``offset`` only when the data has a host offset)."""
        d: dict[str, Any] = {"start": self.start, "length": self.length, "depth": self.depth,
                             "present": self.present, "zero": self.zero, "data": self.data}
        if self.offset is not None:
            d["offset"] = self.offset
        return d

    def json(self) -> str:
        """The entry as qemu-img 7.2 prints it in ``map --output=json``: one line, its own spacing."""
        mid = _FLAGS[self.depth, self.present, self.zero, self.data] if self.depth < 8 \
            else _flags(self.depth, self.present, self.zero, self.data)
        if self.offset is None:
            return f'{{ "start": {self.start}, "length": {self.length}, {mid}}}'
        return f'{{ "start": {self.start}, "length": {self.length}, {mid}, "offset": {self.offset}}}'


def _flags(depth: int, present: bool, zero: bool, data: bool) -> str:
    b = ("false", "true")
    return f'"depth": {depth}, "present": {b[present]}, "zero": {b[zero]}, "data": {b[data]}'


# the middle of an entry's JSON text for the depths a chain usually has, made once (this text is most of
# what map prints, once for each of up to millions of entries)
_FLAGS = {(d, p, z, a): _flags(d, p, z, a) for d in range(8) for p in (False, True) for z in (False, True)
          for a in (False, True)}


async def map_entries(drv: BlockDriver, start: int, end: int) -> AsyncGenerator[MapEntry, None]:
    """Merged entries covering ``[start, end)``; one empty entry when the range is empty, as qemu-img.

    An extent is compared with the entry being built in place, and a new entry made only when it does
    not merge (qemu-img's entry_mergeable): the loop runs once for each of the image's extents.
    """
    cur = MapEntry(start, 0, 0, False, False, False, None, None)
    if start < end:
        names: dict[int, BlockDriver] = {}
        async for e in drv.extents(start, end - start):
            off = e.offset
            fname = None
            if off is not None:
                d = e.depth
                holder = names.get(d)
                if holder is None:
                    holder = names[d] = layer(drv, d)
                fname = holder.data_file_name(e.start)
            if cur.length and cur.zero == e.zero and cur.data == e.data and cur.depth == e.depth \
                    and cur.present == e.present and cur.filename == fname \
                    and (off is None if cur.offset is None else off == cur.offset + cur.length):
                cur.length += e.length
                continue
            if cur.length > 0:
                yield cur
            cur = MapEntry(e.start, e.length, e.depth, e.present, e.zero, e.data, off, fname)
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
        while True:
            try:
                e = await anext(it)
            except StopAsyncIteration:
                return
            except OperationCancelledError:
                raise
            except BlockError as exc:
                # a block-status failure, worded as qemu-img's map words it
                exc.message = f"Could not read file metadata: {exc.message}"
                raise
            check_cancelled(cancel)
            yield e
            if progress is not None:
                progress(min(e.start + e.length - start, total), total)
