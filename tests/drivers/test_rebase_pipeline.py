"""The seams of rebase's copy loop, made to show up in a small image: the block-status window refreshed
every few pieces (the chain below the new backing file is cut while it is asked for, and a write under way
must end first: its copy-on-write reads through that chain), with differing runs of single sectors, which
are written into new clusters whose other sectors are copied from the old chain.

The result must be qemu-img's: the same guest view, and the same clusters allocated (qemu-img map).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from imagecore.ops import rebase as rebase_op
from tests.peers import peer, run


def _chain(d: Path) -> None:
    """A (2 MiB of 0x11); B over A, with subclusters (64 KiB clusters of 2 KiB subclusters), a sector of
    0x22 every 24 KiB: B defines the 2 KiB around each and reads the rest of its clusters from A; C over
    B, 4 KiB clusters, one every 40 KiB. A safe rebase of C onto A writes single sectors into new clusters
    of C whose other sectors are copied through B, from A."""
    qi, qio = peer("qemu-img"), peer("qemu-io")
    d.mkdir()
    run(qi, "create", "-q", "-f", "qcow2", d / "A.qcow2", "2M")
    run(qio, "-f", "qcow2", "-c", "write -P 0x11 0 2M", d / "A.qcow2")
    run(qi, "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "A.qcow2", "-F", "qcow2",
        d / "B.qcow2")
    run(qi, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "B.qcow2", "-F", "qcow2",
        d / "C.qcow2")
    # in the second half of a 4 KiB cluster of C: a piece that ends on C's cluster boundary, written while
    # the next ones are looked at, whose first half C copies from A
    cmds = [a for off in range(3072, 2 << 20, 24 << 10) for a in ("-c", f"write -P 0x22 {off} 512")]
    run(qio, "-f", "qcow2", *cmds, d / "B.qcow2")
    cmds = [a for off in range(0, 2 << 20, 40 << 10) for a in ("-c", f"write -P 0x33 {off} 4k")]
    run(qio, "-f", "qcow2", *cmds, d / "C.qcow2")


def _map(path: Path) -> list[dict[str, object]]:
    out = subprocess.run([peer("qemu-img"), "map", "--output=json", path.name], cwd=path.parent,
                         capture_output=True, check=True, timeout=60).stdout
    return list(json.loads(out))


@pytest.mark.parametrize("backing", ["A.qcow2", ""], ids=["safe", "flatten"])
async def test_small_windows_give_qemus_result(work: Path, backing: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pristine = work / "pristine"
    _chain(pristine)
    ours, theirs = work / "ours", work / "theirs"
    shutil.copytree(pristine, ours)
    shutil.copytree(pristine, theirs)
    fmt = ["-F", "qcow2"] if backing else []
    run(peer("qemu-img"), "rebase", "-b", backing, *fmt, theirs / "C.qcow2")
    windows = 0
    status_runs = rebase_op._status_runs

    async def counted(*args: object) -> object:
        nonlocal windows
        windows += 1
        # block status may wait (for a table read from the disk): whatever else is runnable runs now
        await asyncio.sleep(0.001)
        return await status_runs(*args)  # type: ignore[arg-type]

    # a window of a few pieces' status: refreshed while earlier pieces are still being written
    monkeypatch.setattr(rebase_op, "STATUS_WINDOW", 20 << 10)
    monkeypatch.setattr(rebase_op, "_status_runs", counted)
    res = await rebase_op.rebase(str(ours / "C.qcow2"), "qcow2", backing, "qcow2" if backing else None)
    assert windows > 50
    assert res.bytes_copied > 0
    run(peer("qemu-img"), "compare", "-q", pristine / "C.qcow2", ours / "C.qcow2")
    run(peer("qemu-img"), "check", "-q", ours / "C.qcow2")
    assert _map(ours / "C.qcow2") == _map(theirs / "C.qcow2")
