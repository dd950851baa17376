"""Randomised differential test: concurrent writes, zeroes, discards and flushes on qed and qcow images
(with and without a backing file, with a tiny table cache now and then) against a bytearray model, then
``qemu-img check`` clean (qed) and ``qemu-img compare`` equal to the model."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagecore.driver import ImageOpener
from imagecore.formats.twolevel import TwoLevelDriver
from tests.peers import in_ci, peer, run
from tests.property.model import Op, aligned_or_not, draw_batches, run_batches

SIZE = 1 << 20

@st.composite
def batches(draw: st.DrawFn, cs: int) -> list[list[Op]]:
    return draw_batches(draw, aligned_or_not(SIZE, cs), batches=6)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[str, list[str], bool, bool, list[list[Op]]]:
    fmt = draw(st.sampled_from(["qed", "qcow"]))
    opts: list[str] = []
    cs = 4096
    if fmt == "qed":
        cs = draw(st.sampled_from([4096, 65536]))
        opts = ["-o", f"cluster_size={cs},table_size={draw(st.sampled_from([2, 4]))}"]
    backing = draw(st.booleans())
    if fmt == "qcow" and backing:
        cs = 512
    return fmt, opts, backing, draw(st.booleans()), draw(batches(cs))


async def scenario(tmp: Path, fmt: str, opts: list[str], backing: bool, small: bool,
                   plan: list[list[Op]]) -> None:
    qemu_img = peer("qemu-img")
    img = tmp / f"m.{fmt}"
    model = bytearray(SIZE)
    if backing:
        base = tmp / "base.raw"
        pattern = bytes((i * 7 + 3) % 251 for i in range(4096)) * (SIZE // 4096 - 5)
        base.write_bytes(pattern)  # shorter than the image: the tail reads as zeroes
        model[:len(pattern)] = pattern
        run(qemu_img, "create", "-q", "-f", fmt, *opts, "-b", base.name, "-F", "raw", img, str(SIZE))
    else:
        run(qemu_img, "create", "-q", "-f", fmt, *opts, img, str(SIZE))
    d = await ImageOpener().open(str(img), fmt, read_only=False)
    assert isinstance(d, TwoLevelDriver)
    if small:
        d._budget = 1  # every new entry forces a write-back: ordering under concurrency
    try:
        await run_batches(d, model, plan)
    finally:
        await d.close()
    (tmp / "model.raw").write_bytes(model)
    if fmt == "qed":
        proc = run(qemu_img, "check", "--output=json", img, check=False)
        assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
        rep = json.loads(proc.stdout)
        assert rep.get("corruptions", 0) == 0 and rep.get("leaks", 0) == 0
    cmp = run(qemu_img, "compare", "-f", fmt, "-F", "raw", img, tmp / "model.raw", check=False)
    assert cmp.returncode == 0, cmp.stdout.decode() + cmp.stderr.decode()


@settings(max_examples=15, deadline=None, derandomize=in_ci(), database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios())
def test_qed_and_qcow_match_model(case: tuple[str, list[str], bool, bool, list[list[Op]]]) -> None:
    fmt, opts, backing, small, plan = case
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp), fmt, opts, backing, small, plan))
