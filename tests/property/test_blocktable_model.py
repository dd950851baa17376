"""Randomised differential test of the block table formats (vdi dynamic and static, vpc dynamic and fixed,
parallels):
concurrent writes, zeroes, trims and flushes against a bytearray model, then qemu-img check and compare."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagecore.driver import BlockDriver, ImageOpener
from imagecore.formats import open_image
from tests.peers import in_ci, peer, run

# vdi blocks are 1 MiB and vpc's 2 MiB: a few blocks each, the last one partial
SIZE = 5 << 20
KINDS = [("vdi", ""), ("vdi", "static=on"), ("vpc", ""), ("vpc", "subformat=fixed,force_size=on"),
         ("vpc", "force_size=on"), ("parallels", ""), ("parallels", "cluster_size=4k")]

Op = tuple[str, int, int, int]  # kind, offset, length, argument


@st.composite
def batches(draw: st.DrawFn) -> list[list[Op]]:
    """Batches of operations with disjoint byte ranges, so the model does not depend on scheduling."""
    out: list[list[Op]] = []
    for _ in range(draw(st.integers(1, 5))):
        batch: list[Op] = []
        taken: list[tuple[int, int]] = []
        for _ in range(draw(st.integers(1, 5))):
            kind = draw(st.sampled_from(["w", "w", "w", "z", "t", "f"]))
            off = draw(st.integers(0, SIZE // 512 - 1)) * 512
            n = draw(st.integers(1, min(6144, (SIZE - off) // 512))) * 512
            if kind != "f" and any(s < off + n and off < e for s, e in taken):
                continue
            taken.append((off, off + n))
            batch.append((kind, off, n, draw(st.integers(1, 255))))
        out.append(batch)
    return out


async def perform(d: BlockDriver, op: Op) -> None:
    kind, off, n, arg = op
    if kind == "w":
        await d.write(off, memoryview(bytes([arg]) * n))
    elif kind == "z":
        await d.write_zeroes(off, n, may_trim=bool(arg & 1), fast=False)
    elif kind == "t":
        await d.trim(off, n)  # advisory: vdi and vpc keep the data, as qemu does
    else:
        await d.flush()


def apply(model: bytearray, op: Op) -> None:
    kind, off, n, arg = op
    if kind == "w":
        model[off:off + n] = bytes([arg]) * n
    elif kind == "z":
        model[off:off + n] = bytes(n)


async def scenario(tmp: Path, fmt: str, opts: str, plan: list[list[Op]]) -> None:
    qemu_img = peer("qemu-img")
    img = tmp / f"m.{fmt}"
    model = bytearray(SIZE)
    run(qemu_img, "create", "-q", "-f", fmt, *(["-o", opts] if opts else []), img, str(SIZE))
    d = await ImageOpener().open(str(img), fmt, read_only=False)
    try:
        for batch in plan:
            await asyncio.gather(*(perform(d, op) for op in batch))
            for op in batch:
                apply(model, op)
            buf = bytearray(SIZE)
            await d.readinto(0, memoryview(buf))
            assert buf == model
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
