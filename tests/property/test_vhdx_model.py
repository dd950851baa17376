"""Randomised differential test: concurrent writes, zeroes, discards and flushes on vhdx vs a bytearray
model; qemu-img then finds the image clean and equal to the model."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagecore.driver import ImageOpener
from imagecore.formats.vhdx.driver import VhdxDriver
from tests.peers import in_ci, peer, run

MiB = 1 << 20
SIZE = 6 * MiB  # six 1 MiB blocks

Op = tuple[str, int, int, int]  # kind, offset, length, argument


@st.composite
def batches(draw: st.DrawFn) -> list[list[Op]]:
    """Batches of operations with disjoint byte ranges (several may share a block that is not allocated
    yet), so the model does not depend on scheduling."""
    out: list[list[Op]] = []
    for _ in range(draw(st.integers(1, 5))):
        batch: list[Op] = []
        taken: list[tuple[int, int]] = []
        for _ in range(draw(st.integers(1, 5))):
            kind = draw(st.sampled_from(["w", "w", "w", "z", "t", "f"]))
            off = draw(st.integers(0, SIZE - 1))
            n = draw(st.integers(1, min(2 * MiB, SIZE - off)))
            if kind != "f" and any(s < off + n and off < e for s, e in taken):
                continue
            taken.append((off, off + n))
            batch.append((kind, off, n, draw(st.integers(1, 255))))
        out.append(batch)
    return out


async def perform(d: VhdxDriver, op: Op) -> None:
    kind, off, n, arg = op
    if kind == "w":
        await d.write(off, memoryview(bytes([arg]) * n))
    elif kind == "z":
        await d.write_zeroes(off, n, may_trim=bool(arg & 1), fast=False)
    elif kind == "t":
        await d.trim(off, n)
    else:
        await d.flush()


async def scenario(tmp: Path, opts: str, plan: list[list[Op]]) -> None:
    qemu_img = peer("qemu-img")
    img = tmp / "m.vhdx"
    run(qemu_img, "create", "-q", "-f", "vhdx", "-o", opts, img, str(SIZE))
    model = bytearray(SIZE)
    d = await ImageOpener().open(str(img), "vhdx", read_only=False)
    assert isinstance(d, VhdxDriver)
    try:
        for batch in plan:
            await asyncio.gather(*(perform(d, op) for op in batch))
            for kind, off, n, arg in batch:
                if kind == "w":
                    model[off:off + n] = bytes([arg]) * n
                elif kind == "z":
                    model[off:off + n] = bytes(n)
            buf = bytearray(SIZE)
            await d.readinto(0, memoryview(buf))
            assert buf == model
    finally:
        await d.close()
    raw = tmp / "m.raw"
    raw.write_bytes(bytes(model))
    run(qemu_img, "check", img)
    run(qemu_img, "compare", "-f", "vhdx", "-F", "raw", img, raw)


@settings(max_examples=15, deadline=None, derandomize=in_ci(), database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.sampled_from(["block_size=1M", "block_size=1M,subformat=fixed",
                        "block_size=1M,block_state_zero=off", "block_size=1M,log_size=2M"]), batches())
def test_vhdx_matches_model(opts: str, plan: list[list[Op]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp), opts, plan))
