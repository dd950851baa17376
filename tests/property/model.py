"""What the driver model tests share: batches of writes, zeroes, trims and flushes whose byte ranges do not
overlap within a batch (so the model does not depend on how the batch is scheduled), performing one
operation on a driver, and applying it to the bytearray model."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from hypothesis import strategies as st

from imagecore.driver import BlockDriver

Op = tuple[str, int, int, int]  # kind (w, z, t, f), offset, length, argument (the byte written)
KINDS = ["w", "w", "w", "z", "t", "f"]

# draws (offset, length) of one operation
Place = Callable[[st.DrawFn], tuple[int, int]]
# the byte range an operation keeps for itself within its batch
Span = Callable[[int, int], tuple[int, int]]


def draw_batches(draw: st.DrawFn, place: Place, *, batches: int = 5, per_batch: int = 5,
                 span: Span = lambda off, n: (off, off + n)) -> list[list[Op]]:
    out: list[list[Op]] = []
    for _ in range(draw(st.integers(1, batches))):
        batch: list[Op] = []
        taken: list[tuple[int, int]] = []
        for _ in range(draw(st.integers(1, per_batch))):
            kind = draw(st.sampled_from(KINDS))
            off, n = place(draw)
            lo, hi = span(off, n)
            if kind != "f" and any(s < hi and lo < e for s, e in taken):
                continue
            taken.append((lo, hi))
            batch.append((kind, off, n, draw(st.integers(1, 255))))
        out.append(batch)
    return out


async def perform(d: BlockDriver, op: Op) -> None:
    kind, off, n, arg = op
    if kind == "w" and arg & 2:
        # as the NBD server writes without FUA: started without a coroutine where the driver can
        started = d.write_started(off, memoryview(bytes([arg]) * n))
        if started is False:
            await d.write(off, memoryview(bytes([arg]) * n))
        elif started is not True:
            await started
    elif kind == "w":
        await d.write(off, memoryview(bytes([arg]) * n))
    elif kind == "z":
        await d.write_zeroes(off, n, may_trim=bool(arg & 1), fast=False)
    elif kind == "t":
        await d.trim(off, n)
    else:
        await d.flush()


def apply(model: bytearray, op: Op) -> None:
    """Writes and zeroes; a trim changes nothing here (the tests whose format discards add that)."""
    kind, off, n, arg = op
    if kind == "w":
        model[off:off + n] = bytes([arg]) * n
    elif kind == "z":
        model[off:off + n] = bytes(n)


async def run_batches(d: BlockDriver, model: bytearray, plan: list[list[Op]],
                      also: Callable[[Op], None] | None = None) -> None:
    """Each batch at once on the driver, then on the model (``also`` adds a format's own effects), and
    the whole image read back equal to the model after every batch."""
    for batch in plan:
        await asyncio.gather(*(perform(d, op) for op in batch))
        for op in batch:
            apply(model, op)
            if also is not None:
                also(op)
        buf = bytearray(len(model))
        await d.readinto(0, memoryview(buf))
        assert buf == model


def aligned_or_not(size: int, cs: int) -> Place:
    """Up to three whole clusters half of the time, any bytes up to three clusters long the other half."""
    def place(draw: st.DrawFn) -> tuple[int, int]:
        if draw(st.booleans()):
            off = draw(st.integers(0, size // cs - 1)) * cs
            return off, min(draw(st.integers(1, 3)) * cs, size - off)
        off = draw(st.integers(0, size - 1))
        return off, draw(st.integers(1, min(3 * cs, size - off)))
    return place
