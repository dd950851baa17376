"""A commit that fails at any host operation leaves the chain reading as it did.

The commit runs once to record its host operations (the top's, the base's, the growth of the base and
the emptying of the top), then again on fresh copies with each operation in turn failing with EIO. Every
such commit must raise a BlockError (never succeed silently, hang or corrupt), and afterwards, once
qemu's repair has run (what opening a dirty image does), the top must read exactly as before, through
whatever the base holds, and both images must check clean: the data was in the top, or in the flushed
base, at every moment.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

from imagecore.errors import BlockError
from imagecore.ops.commit import commit
from tests.doubles.faults import FaultOpener, FaultPlan
from tests.peers import peer, run


def _chain(d: Path, grow: bool) -> None:
    qi, qio = peer("qemu-img"), peer("qemu-io")
    d.mkdir()
    run(qi, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", d / "base.qcow2", "2M" if grow else "4M")
    run(qio, "-f", "qcow2", "-c", "write -P 0x11 0 2M", d / "base.qcow2")
    run(qi, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.qcow2", "-F", "qcow2",
        d / "top.qcow2", "4M")
    run(qio, "-f", "qcow2", "-c", "write -P 0x22 64k 256k", "-c", "write -z 1M 8k", "-c",
        "write -P 0x33 3M 64k", d / "top.qcow2")


def _qemu(*args: str | Path) -> int:
    return run(peer("qemu-img"), *args, check=False).returncode


@pytest.mark.parametrize("grow", [False, True], ids=["same size", "base grows"])
async def test_a_failure_anywhere_keeps_the_chain(work: Path, grow: bool) -> None:
    pristine = work / "pristine"
    _chain(pristine, grow)
    dry = work / "dry"
    shutil.copytree(pristine, dry)
    plan = FaultPlan()
    res = await commit(str(dry / "top.qcow2"), "qcow2", opener=FaultOpener(plan, lock=True))
    assert res.emptied and res.copied
    steps = len(plan.ops)
    assert steps > 20
    bad: list[str] = []
    for i in range(1, steps + 1):
        w = work / f"cut{i}"
        shutil.copytree(pristine, w)
        plan = FaultPlan()
        plan.arm("any", i, errno.EIO)
        raised = False
        try:
            await commit(str(w / "top.qcow2"), "qcow2", opener=FaultOpener(plan, lock=True))
        except BlockError:
            raised = True
        failed = plan.faults[0] if plan.faults else None
        what = f"{i}: {failed.kind} {Path(failed.path).name}@{failed.offset}" if failed else f"{i}"
        if not raised:
            bad.append(f"{what}: the commit did not fail")
        for name in ("base.qcow2", "top.qcow2"):
            # qemu-img check -r exits 0 when the image is clean after the repair
            if _qemu("check", "-q", "-r", "all", w / name):
                bad.append(f"{what}: {name} not clean after repair")
        if _qemu("compare", pristine / "top.qcow2", w / "top.qcow2"):
            bad.append(f"{what}: the top reads differently")
        shutil.rmtree(w)
    print(f"commit ({'base grows' if grow else 'same size'}): {steps} host operations, each failed once, "
          f"{len(bad)} bad")
    assert bad == []
