"""Fault injection: EIO and ENOSPC at every host I/O step of an allocating write and of a flush.

For each step the operation's driver call must raise the project's error carrying the injected errno
(``HostIOError`` / ``NoSpaceError``, which the NBD server sends as the reply's errno), never a bare
``OSError`` or an assertion; the same request retried once the fault is gone must succeed (or be refused
because the image was marked corrupt, as qemu does); and afterwards real ``qemu-img check`` finds no
corruption (leaks allowed) and every write acknowledged before the fault reads back.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from imagecore.driver import BlockDriver, ImageOpener
from imagecore.errors import BlockError, CorruptImageError
from tests.doubles.faults import FaultOpener, FaultPlan
from tests.peers import peer, run

KiB = 1 << 10
MiB = 1 << 20
SIZE = 1 * MiB
# flushed before any fault: must survive everything
BEFORE = (0, bytes((i * 7 + 1) & 0xFF for i in range(8 * KiB)))
# the request under test: allocates clusters (or grains), partly covering two of them
REQUEST = (300 * KiB + 1000, bytes((i * 11 + 5) & 0xFF for i in range(70 * KiB)))


def make_image(work: Path, fmt: str, *, backing: Path | None = None) -> Path:
    img = work / f"base.{fmt}"
    opts = ["-o", "cluster_size=4096"] if fmt == "qcow2" else ["-o", "subformat=monolithicSparse"]
    if backing is not None:
        opts += ["-b", str(backing), "-F", "raw"]
    run(peer("qemu-img"), "create", "-q", "-f", fmt, *opts, img, str(SIZE))
    return img


async def prefill(img: Path, fmt: str, *, discard: bool) -> None:
    d = await ImageOpener().open(str(img), fmt, read_only=False)
    try:
        await d.write(BEFORE[0], memoryview(BEFORE[1]))
        if discard:
            await d.write(REQUEST[0], memoryview(REQUEST[1]))
        await d.flush()
    finally:
        await d.close()


async def run_request(d: BlockDriver, request: str) -> None:
    """The request under test, as a guest sends it and then relies on it (flush)."""
    if request in ("write", "cow"):
        await d.write(REQUEST[0], memoryview(REQUEST[1]))
    elif request == "discard":
        await d.trim(REQUEST[0], len(REQUEST[1]))
    await d.flush()


def guest(img: Path, fmt: str, work: Path) -> bytes:
    out = work / "guest.raw"
    run(peer("qemu-img"), "convert", "-U", "-f", fmt, "-O", "raw", img, out)
    return out.read_bytes()


def check(img: Path, fmt: str) -> tuple[bool, str]:
    """(marked corrupt, report); fails on anything but a clean or leaking image."""
    proc = run(peer("qemu-img"), "check", "-U", "-f", fmt, "--output=json", img, check=False)
    text = proc.stdout.decode() + proc.stderr.decode()
    if fmt == "qcow2":
        info = json.loads(run(peer("qemu-img"), "info", "-U", "--output=json", img).stdout)
        if info["format-specific"]["data"].get("corrupt"):
            return True, text
    assert proc.returncode in (0, 3), text
    rep = json.loads(proc.stdout)
    assert rep.get("corruptions", 0) == 0 and rep.get("check-errors", 0) == 0, text
    return False, text


async def setup_step(plan: FaultPlan, path: Path, fmt: str, request: str) -> BlockDriver:
    d = await FaultOpener(plan).open(str(path), fmt, read_only=False)
    if request == "flush":
        await d.write(REQUEST[0], memoryview(REQUEST[1]))  # acknowledged, not yet flushed
    return d


async def trial(work: Path, img: Path, fmt: str, request: str) -> tuple[int, bytes]:
    """How many host operations the request makes, and the guest contents after it (no fault armed)."""
    path = work / f"trial.{fmt}"
    shutil.copyfile(img, path)
    plan = FaultPlan()
    d = await setup_step(plan, path, fmt, request)
    try:
        mark = plan.mark()
        await run_request(d, request)
        n = plan.mark() - mark
    finally:
        await d.close()
    return n, guest(path, fmt, work)


CASES = [("qcow2", "write"), ("qcow2", "flush"), ("qcow2", "cow"), ("qcow2", "discard"),
         ("vmdk", "write"), ("vmdk", "flush")]


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
@pytest.mark.parametrize(("fmt", "request_kind"), CASES, ids=[f"{f}-{r}" for f, r in CASES])
async def test_fault_at_every_step(work: Path, fmt: str, request_kind: str, code: int) -> None:
    """``write``: an allocating write and its flush; ``flush``: the flush of an acknowledged write;
    ``cow``: a partial-cluster write over a backing file (its reads fail too); ``discard``: a trim and the
    flush that frees its clusters."""
    backing = None
    if request_kind == "cow":
        backing = work / "backing.raw"
        backing.write_bytes(bytes((i * 3 + 2) & 0xFF for i in range(SIZE)))
    img = make_image(work, fmt, backing=backing)
    await prefill(img, fmt, discard=request_kind == "discard")
    n, want = await trial(work, img, fmt, request_kind)
    assert n > 0
    corrupt_marked = 0
    kinds: set[str] = set()
    for step in range(1, n + 1):
        target = work / f"step{step}.{fmt}"
        shutil.copyfile(img, target)
        plan = FaultPlan()
        sync_failed = False
        d = await setup_step(plan, target, fmt, request_kind)
        try:
            plan.arm("any", step, code)
            with pytest.raises(BlockError) as info:
                await run_request(d, request_kind)
            assert [op.failed for op in plan.ops].count(True) == 1, f"step {step}: {plan.faults}"
            kinds.add(plan.faults[0].kind)
            assert info.value.errno == code, (step, plan.faults[0], repr(info.value))
            plan.disarm()
            sync_failed = plan.faults[0].kind == "sync"
            try:
                await run_request(d, request_kind)  # as a guest retries: the request must go through
            except CorruptImageError:
                corrupt_marked += 1
            except BlockError as exc:
                # after a failed fdatasync every flush of that open file fails, as in qemu's file-posix
                # (the kernel may have dropped the pages): the retry cannot go through
                if not sync_failed or exc.errno != errno.EIO:
                    raise
        finally:
            plan.disarm()
            try:
                await d.close()
            except BlockError:
                if not sync_failed:
                    raise
        marked, report = check(target, fmt)
        data = guest(target, fmt, work)
        where = f"step {step} ({plan.faults[0]})"
        assert data[BEFORE[0]:BEFORE[0] + len(BEFORE[1])] == BEFORE[1], f"{where}: flushed data lost"
        if not marked and not sync_failed:
            assert data == want, f"{where}: the retried request left other contents; {report}"
    print(f"\nfault injection, {fmt} {request_kind} {errno.errorcode[code]}: {n} steps "
          f"({', '.join(sorted(kinds))}), each failed with the errno, {corrupt_marked} marked corrupt, "
          "0 corruptions, 0 lost writes")


async def test_flush_after_failed_fdatasync_keeps_failing(work: Path) -> None:
    img = make_image(work, "qcow2")
    plan = FaultPlan()
    d = await FaultOpener(plan).open(str(img), "qcow2", read_only=False)
    try:
        await d.write(REQUEST[0], memoryview(REQUEST[1]))
        plan.arm("sync", 1, errno.EIO)
        with pytest.raises(BlockError):
            await d.flush()
        plan.disarm()
        await d.write(BEFORE[0], memoryview(BEFORE[1]))
        # the pages of the first write may be gone from the cache and never reach the disk: a flush that
        # succeeded now would tell the guest they are safe
        with pytest.raises(BlockError) as info:
            await d.flush()
        assert info.value.errno == errno.EIO
    finally:
        try:
            await d.close()
        except BlockError:
            pass
