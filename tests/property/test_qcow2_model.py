"""Randomised differential test: concurrent writes, zeroes, trims, flushes on qcow2 vs a bytearray model."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagecore.driver import ImageOpener
from imagecore.formats import open_image
from imagecore.formats.qcow2.driver import Qcow2Driver
from tests.peers import in_ci, peer, run
from tests.property.model import Op, aligned_or_not, draw_batches, run_batches

SIZE = 1 << 20

@st.composite
def batches(draw: st.DrawFn, cs: int) -> list[list[Op]]:
    return draw_batches(draw, aligned_or_not(SIZE, cs), batches=6)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, str, bool, list[list[Op]]]:
    cs = draw(st.sampled_from([512, 4096, 65536]))
    compat = draw(st.sampled_from(["0.10", "1.1"]))
    opts = f"cluster_size={cs},compat={compat}"
    if compat == "1.1":
        opts += draw(st.sampled_from(["", ",lazy_refcounts=on", ",refcount_bits=1", ",refcount_bits=64"]))
        if cs == 65536 and draw(st.booleans()):
            opts += ",extended_l2=on"
    backing = draw(st.booleans())
    if draw(st.booleans()):
        opts += "|small-cache"  # a tiny table cache: eviction and write-back under concurrency
    return cs, opts, backing, draw(batches(cs))


def discarded(model: bytearray, d: Qcow2Driver, op: Op) -> None:
    """A trim frees whole clusters, which then read as zeroes (v3, or nothing below to show through)."""
    kind, off, n, _arg = op
    if kind == "t":
        cs = d.cs
        a = -(-off // cs) * cs
        b = (off + n) // cs * cs
        if b > a and (d.v3 or d.backing is None):
            model[a:b] = bytes(b - a)


async def scenario(tmp: Path, cs: int, opts: str, backing: bool, plan: list[list[Op]]) -> None:
    qemu_img = peer("qemu-img")
    opts, _, small = opts.partition("|")
    img = tmp / "m.qcow2"
    model = bytearray(SIZE)
    if backing:
        base = tmp / "base.raw"
        pattern = bytes((i * 7 + 3) % 251 for i in range(4096)) * (SIZE // 4096 - 5)
        base.write_bytes(pattern)  # shorter than the image: the tail reads as zeroes
        model[:len(pattern)] = pattern
        run(qemu_img, "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "raw",
            "-o", opts, img, str(SIZE))
    else:
        run(qemu_img, "create", "-q", "-f", "qcow2", "-o", opts, img, str(SIZE))
    d = await ImageOpener().open(str(img), "qcow2", read_only=False,
                                 options={"cache_size": 8192} if small else {})
    assert isinstance(d, Qcow2Driver)
    try:
        await run_batches(d, model, plan, lambda op: discarded(model, d, op))
    finally:
        await d.close()
    proc = run(qemu_img, "check", "--output=json", img, check=False)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    rep = json.loads(proc.stdout)
    assert rep.get("corruptions", 0) == 0 and rep.get("leaks", 0) == 0
    d2 = await open_image(str(img), "qcow2")
    try:
        buf = bytearray(SIZE)
        await d2.readinto(0, memoryview(buf))
        assert buf == model
    finally:
        await d2.close()


@settings(max_examples=40, deadline=None, derandomize=in_ci(), database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios())
def test_qcow2_matches_model(case: tuple[int, str, bool, list[list[Op]]]) -> None:
    cs, opts, backing, plan = case
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp), cs, opts, backing, plan))
