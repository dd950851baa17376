"""`map`: the allocation map of an image and its backing chain, in qemu-img 7.2's JSON or human form."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..driver import BlockDriver, ImageOpener
from ..errors import ImageFormatError
from .common import layer, open_image, out


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

    def json(self) -> str:
        text = (f'{{ "start": {self.start}, "length": {self.length}, "depth": {self.depth},'
                f' "present": {_b(self.present)}, "zero": {_b(self.zero)}, "data": {_b(self.data)}')
        if self.offset is not None:
            text += f', "offset": {self.offset}'
        return text + "}"


def _b(v: bool) -> str:
    return "true" if v else "false"


async def map_entries(drv: BlockDriver, start: int, end: int) -> AsyncIterator[MapEntry]:
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


def _hex(v: int) -> str:
    # C's %#x prints a bare 0 for zero.
    return "%-16s" % ("0" if v == 0 else f"{v:#x}")  # noqa: UP031


async def map_image(path: str, fmt: str | None, *, output: str = "human", start: int = 0,
                    max_length: int | None = None, force_share: bool = False) -> int:
    drv = await open_image(path, fmt, read_only=True,
                           opener=ImageOpener(lock=True, force_share=force_share))
    try:
        end = drv.size
        if max_length is not None:
            end = min(start + max_length, end)
        if output == "json":
            parts = [e.json() async for e in map_entries(drv, start, end)]
            out("[" + ",\n".join(parts) + "]\n")
            return 0
        out("%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File"))  # noqa: UP031
        async for e in map_entries(drv, start, end):
            if e.data and e.offset is None:
                raise ImageFormatError("File contains external, encrypted or compressed clusters.")
            if e.data and not e.zero:
                out(f"{_hex(e.start)}{_hex(e.length)}{_hex(e.offset or 0)}{e.filename or ''}\n")
        return 0
    finally:
        await drv.close()
