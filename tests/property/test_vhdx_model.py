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
from tests.property.model import Op, draw_batches, run_batches

MiB = 1 << 20
SIZE = 6 * MiB  # six 1 MiB blocks


def anywhere(draw: st.DrawFn) -> tuple[int, int]:
    off = draw(st.integers(0, SIZE - 1))
    return off, draw(st.integers(1, min(2 * MiB, SIZE - off)))


@st.composite
def batches(draw: st.DrawFn) -> list[list[Op]]:
    """Several operations may share a block that is not allocated yet."""
    return draw_batches(draw, anywhere)


async def scenario(tmp: Path, opts: str, plan: list[list[Op]]) -> None:
    qemu_img = peer("qemu-img")
    img = tmp / "m.vhdx"
    run(qemu_img, "create", "-q", "-f", "vhdx", "-o", opts, img, str(SIZE))
    model = bytearray(SIZE)
    d = await ImageOpener().open(str(img), "vhdx", read_only=False)
    assert isinstance(d, VhdxDriver)
    try:
        await run_batches(d, model, plan)
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
