"""Backing-file fall-through, shared by every format with a backing file.

A layer that has not allocated a run shows what the layer below it holds there; where the backing file
is shorter than the layer (or there is none), the run reads as zeroes and ``qemu-img map`` reports it as
this layer's own unallocated run (depth 0), as qemu's block layer does. The format drivers (qcow2, vmdk,
and any other format with a backing file) call these with their ``backing`` attribute instead of
repeating the clipping.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from .driver import BlockDriver
from .extent import Extent


def read_below_nowait(backing: BlockDriver | None, offset: int, view: memoryview) -> bool:
    """Fill ``view`` with what lies below at ``offset`` without awaiting; False when the backing file
    cannot serve it inline (then call :func:`read_below`). ``view`` may be partly filled then."""
    n = len(view)
    if backing is None or offset >= backing.size:
        view[:] = bytes(n)
        return True
    inside = min(n, backing.size - offset)
    if not backing.readinto_nowait(offset, view[:inside]):
        return False
    if inside < n:
        view[inside:] = bytes(n - inside)
    return True


async def read_below(backing: BlockDriver | None, offset: int, view: memoryview) -> None:
    """Fill ``view`` with what lies below at guest ``offset``: the backing file's data where it reaches,
    zeroes past its end or without one."""
    n = len(view)
    if backing is None or offset >= backing.size:
        view[:] = bytes(n)
        return
    inside = min(n, backing.size - offset)
    if not backing.readinto_nowait(offset, view[:inside]):
        await backing.readinto(offset, view[:inside])
    if inside < n:
        view[inside:] = bytes(n - inside)


async def extents_below(backing: BlockDriver | None, offset: int, length: int) -> AsyncIterator[Extent]:
    """The runs an unallocated run of this layer shows from the chain below: the backing file's runs one
    level deeper, then (past its end, or without one) this layer's own unallocated zero run at depth 0,
    as ``qemu-img map`` shows it."""
    inside = 0
    if backing is not None and offset < backing.size:
        inside = min(length, backing.size - offset)
        async for e in backing.extents(offset, inside):
            e.depth += 1
            yield e
    if inside < length:
        yield Extent(offset + inside, length - inside, data=False, zero=True, depth=0, present=False)
