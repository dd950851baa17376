"""A rebase that fails at any host operation keeps the image's guest view, and says so.

The copy of a safe rebase writes one piece while it reads and compares the next: a failure of either
side must end the rebase with a BlockError (a failed write as qemu-img's ``Error while writing to COW
image``), after the write under way has finished, with no exception left unretrieved in a task, and the
image must still read through its old backing chain as before (the header changes last), checking clean
after qemu's repair. The rebase runs once to record its host operations, then again on fresh copies with
each operation in turn failing with EIO.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import shutil
from pathlib import Path
from typing import Any

import pytest

from imagecore.errors import BlockError
from imagecore.ops.rebase import CowWriteError, rebase
from tests.doubles.faults import FaultOpener, FaultPlan
from tests.peers import peer, run


def _chain(d: Path) -> None:
    """A (1 MiB of 0x11), B over A (stripes, half of them equal to A), C over B (a cluster every 64 KiB):
    a rebase of C onto A compares and writes several pieces."""
    qi, qio = peer("qemu-img"), peer("qemu-io")
    d.mkdir()
    run(qi, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", d / "A.qcow2", "1M")
    run(qio, "-f", "qcow2", "-c", "write -P 0x11 0 1M", d / "A.qcow2")
    run(qi, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "A.qcow2", "-F", "qcow2",
        d / "B.qcow2")
    run(qio, "-f", "qcow2", *[a for k in range(8) for a in ("-c", f"write -P {0x11 if k % 2 else 0x22} "
                                                            f"{k * 128}k 64k")], d / "B.qcow2")
    run(qi, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "B.qcow2", "-F", "qcow2",
        d / "C.qcow2")
    run(qio, "-f", "qcow2", *[a for k in range(16) for a in ("-c", f"write -P 0x33 {k * 64}k 4k")],
        d / "C.qcow2")


def _qemu(*args: str | Path) -> int:
    return run(peer("qemu-img"), *args, check=False).returncode


@pytest.mark.parametrize("backing", ["A.qcow2", ""], ids=["safe", "flatten"])
async def test_a_failure_anywhere_keeps_the_guest_view(work: Path, backing: str) -> None:
    pristine = work / "pristine"
    _chain(pristine)
    fmt = "qcow2" if backing else None
    dry = work / "dry"
    shutil.copytree(pristine, dry)
    plan = FaultPlan()
    res = await rebase(str(dry / "C.qcow2"), "qcow2", backing, fmt, opener=FaultOpener(plan, lock=True))
    assert res.bytes_copied > 0
    writes = [op for op in plan.ops if op.kind == "write" and op.path.endswith("C.qcow2")]
    assert len(writes) > 4  # several pieces: the next one is read while one is written
    steps = len(plan.ops)

    unretrieved: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx))
    bad: list[str] = []
    cow_errors = 0
    try:
        for i in range(1, steps + 1):
            w = work / f"cut{i}"
            shutil.copytree(pristine, w)
            plan = FaultPlan()
            plan.arm("any", i, errno.EIO)
            raised: BlockError | None = None
            try:
                await rebase(str(w / "C.qcow2"), "qcow2", backing, fmt, opener=FaultOpener(plan, lock=True))
            except BlockError as exc:
                raised = exc
            failed = plan.faults[0] if plan.faults else None
            what = f"{i}: {failed.kind} {Path(failed.path).name}@{failed.offset}" if failed else f"{i}"
            if raised is None:
                bad.append(f"{what}: the rebase did not fail")
            elif isinstance(raised, CowWriteError):
                cow_errors += 1
                if str(raised) != "Error while writing to COW image: Input/output error":
                    bad.append(f"{what}: {raised}")
            if _qemu("check", "-q", "-r", "all", w / "C.qcow2"):
                bad.append(f"{what}: not clean after repair")
            if _qemu("compare", "-q", pristine / "C.qcow2", w / "C.qcow2"):
                bad.append(f"{what}: the image reads differently")
            shutil.rmtree(w)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    print(f"rebase ({'safe' if backing else 'flatten'}): {steps} host operations, each failed once, "
          f"{cow_errors} as COW write errors, {len(bad)} bad")
    assert bad == []
    assert cow_errors >= len(writes) // 2
    assert unretrieved == []
