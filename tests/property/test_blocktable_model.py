"""Randomised differential test of the block table formats (vdi dynamic and static, vpc dynamic and fixed,
parallels):
concurrent writes, zeroes, trims and flushes against a bytearray model, then qemu-img check and compare."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagecore.driver import ImageOpener
from imagecore.formats import open_image
from tests.peers import in_ci, peer, run
from tests.property.model import Op, draw_batches, run_batches

# vdi blocks are 1 MiB and vpc's 2 MiB: a few blocks each, the last one partial
SIZE = 5 << 20
KINDS = [("vdi", ""), ("vdi", "static=on"), ("vpc", ""), ("vpc", "subformat=fixed,force_size=on"),
         ("vpc", "force_size=on"), ("parallels", ""), ("parallels", "cluster_size=4k")]


def sectors(draw: st.DrawFn) -> tuple[int, int]:
    off = draw(st.integers(0, SIZE // 512 - 1)) * 512
    return off, draw(st.integers(1, min(6144, (SIZE - off) // 512))) * 512


@st.composite
def batches(draw: st.DrawFn) -> list[list[Op]]:
    # trims are advisory: vdi and vpc keep the data, as qemu does
    return draw_batches(draw, sectors)


async def scenario(tmp: Path, fmt: str, opts: str, plan: list[list[Op]]) -> None:
    qemu_img = peer("qemu-img")
    img = tmp / f"m.{fmt}"
    model = bytearray(SIZE)
    run(qemu_img, "create", "-q", "-f", fmt, *(["-o", opts] if opts else []), img, str(SIZE))
    d = await ImageOpener().open(str(img), fmt, read_only=False)
    try:
        await run_batches(d, model, plan)
    finally:
        await d.close()
    if fmt in ("vdi", "parallels"):
        run(qemu_img, "check", img)
    raw = tmp / "model.raw"
    raw.write_bytes(bytes(model))
    run(qemu_img, "compare", "-f", fmt, "-F", "raw", img, raw)
    d2 = await open_image(str(img), fmt)
    try:
        buf = bytearray(SIZE)
        await d2.readinto(0, memoryview(buf))
        assert buf == model
    finally:
        await d2.close()


@settings(max_examples=25, deadline=None, derandomize=in_ci(), database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.sampled_from(KINDS), batches())
def test_block_table_formats_match_model(kind: tuple[str, str], plan: list[list[Op]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp), kind[0], kind[1], plan))
