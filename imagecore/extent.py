"""Extents: runs of a device's address space with their allocation state, and merging of adjacent runs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, replace


@dataclass(slots=True)
class Extent:
    """One run of guest address space.

    ``data``: storage is allocated for it at ``depth`` (qemu's BDRV_BLOCK_DATA).
    ``zero``: it reads as zeroes (qemu's BDRV_BLOCK_ZERO).
    ``present``: some layer of the chain defines it (qemu's BDRV_BLOCK_ALLOCATED over the chain); when
    False, ``depth`` is the chain length, as in ``qemu-img map``.
    ``depth``: 0 for the image itself, n for its n-th backing file.
    ``offset``: host offset of the data in the file that holds it, when it lies there contiguously.
    """

    start: int
    length: int
    data: bool
    zero: bool
    depth: int = 0
    present: bool = True
    offset: int | None = None
    compressed: bool = False

    @property
    def end(self) -> int:
        return self.start + self.length

    def can_merge(self, nxt: Extent) -> bool:
        """True when ``nxt`` follows this run and has the same state (offsets continuing)."""
        if (
            self.end != nxt.start
            or self.data != nxt.data
            or self.zero != nxt.zero
            or self.depth != nxt.depth
            or self.present != nxt.present
            or self.compressed != nxt.compressed
        ):
            return False
        if self.offset is None or nxt.offset is None:
            return self.offset is None and nxt.offset is None
        return self.offset + self.length == nxt.offset


def merge_extents(extents: Iterable[Extent]) -> Iterator[Extent]:
    """Merge adjacent runs of equal state; the input must be sorted and contiguous."""
    cur: Extent | None = None
    for e in extents:
        if e.length <= 0:
            continue
        if cur is not None and cur.can_merge(e):
            cur.length += e.length
            continue
        if cur is not None:
            yield cur
        cur = replace(e)
    if cur is not None:
        yield cur


async def amerge_extents(extents: AsyncIterator[Extent]) -> AsyncIterator[Extent]:
    """Async form of :func:`merge_extents`."""
    cur: Extent | None = None
    async for e in extents:
        if e.length <= 0:
            continue
        if cur is not None and cur.can_merge(e):
            cur.length += e.length
            continue
        if cur is not None:
            yield cur
        cur = replace(e)
    if cur is not None:
        yield cur
