"""The qcow2 refcount engine on closed images (Refcounts.offline, as snapshots and resize use it): byte
ranges, commits, bulk allocation with new refcount blocks and a larger refcount table, empty blocks dropped,
the last cluster in use; every result checked by `qemu-img check`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from imagecore.formats.qcow2.alloc import Refcounts
from imagecore.formats.qcow2.headio import read_header
from imagecore.hostio import HostFile
from tests.peers import peer, run

KiB = 1 << 10


def make(work: Path, size: str, *opts: str, writes: tuple[str, ...] = ()) -> Path:
    img = work / "r.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", "-o", ",".join(opts), img, size)
    args: list[str | Path] = []
    for w in writes:
        args += ["-c", w]
    if args:
        run(peer("qemu-io"), "-f", "qcow2", *args, img)
    return img


def check(img: Path) -> dict[str, Any]:
    proc = run(peer("qemu-img"), "check", "--output=json", img, check=False)
    assert proc.returncode in (0, 3), proc.stderr.decode()
    rep: dict[str, Any] = json.loads(proc.stdout)
    assert not rep.get("corruptions") and not rep.get("check-errors")
    return rep


async def engine(img: Path) -> tuple[HostFile, Refcounts]:
    hf = HostFile.open(str(img), read_only=False)
    return hf, await Refcounts.offline(hf, await read_header(hf))


async def test_change_bytes_counts_every_cluster_a_range_touches(work: Path) -> None:
    img = make(work, "1M", "cluster_size=4096")
    hf, rc = await engine(img)
    try:
        base = await rc.allocate(3)
        await rc.change_bytes(base + 4095, 2, 1)  # one byte in each of the first two clusters
        await rc.change_bytes(base + 2 * 4096 + 10, 100, 1)
        assert [await rc.get(base + k * 4096) for k in range(3)] == [2, 2, 2]
        await rc.change_bytes(base, 3 * 4096, -2)
        await rc.commit()
    finally:
        hf.close()
    hf, rc = await engine(img)  # what the commit left on disk
    try:
        assert [await rc.get(base + k * 4096) for k in range(3)] == [0, 0, 0]
    finally:
        hf.close()
    assert check(img).get("leaks", 0) == 0


async def test_commit_applies_deferred_frees_and_is_durable(work: Path) -> None:
    img = make(work, "1M", "cluster_size=4096")
    hf, rc = await engine(img)
    try:
        first = await rc.allocate(4)
        await hf.truncate(first + 4 * 4096)  # qemu-img check counts the clusters inside the file only
        rc.defer_free(first + 4096, 2)
        assert await rc.get(first + 4096) == 1  # deferred: nothing changes before the commit
        await rc.commit()
        assert rc.pending_frees == [] and not rc.cache.dirty
    finally:
        hf.close()
    hf, rc = await engine(img)
    try:
        assert [await rc.get(first + k * 4096) for k in range(4)] == [1, 0, 0, 1]
        assert await rc.last_used() == first + 4 * 4096
    finally:
        hf.close()
    assert check(img)["leaks"] == 2  # the two still counted, never referenced


async def test_allocate_area_adds_blocks_and_grows_the_table(work: Path) -> None:
    # 512-byte clusters with 64-bit refcounts: a block counts 64 clusters, the one-cluster table 64 blocks
    img = make(work, "1M", "cluster_size=512", "refcount_bits=64", writes=("write -P 7 0 64k",))
    hf, rc = await engine(img)
    try:
        table_before = rc.reftable_offset
        size_before = os.path.getsize(img)
        n = 5000  # past the 2 MiB the refcount table covers
        start = await rc.allocate_area(n)
        # grown first, at the end of the file; the area follows it
        assert table_before < size_before <= rc.reftable_offset < start
        assert start % 512 == 0 and rc.end == os.path.getsize(img) > start + n * 512
        assert all([await rc.get(start + k * 512) == 1 for k in range(0, n, 97)])
        assert await rc.get(start + (n - 1) * 512) == 1
        await rc.commit()
    finally:
        hf.close()
    rep = check(img)
    assert rep["leaks"] == n  # counted, never referenced; the new blocks count themselves and are referenced
    run(peer("qemu-img"), "check", "-r", "leaks", img, check=False)
    assert check(img).get("leaks", 0) == 0


async def test_allocate_area_skips_clusters_counted_past_the_end(work: Path) -> None:
    img = make(work, "1M", "cluster_size=4096")
    hf, rc = await engine(img)
    try:
        busy = await rc.allocate(3)
        await rc.commit()
    finally:
        hf.close()
    hf, rc = await engine(img)  # the file ends before the three counted clusters (nothing written there)
    try:
        assert os.path.getsize(img) <= busy
        start = await rc.allocate_area(2)
        assert start == busy + 3 * 4096
        await rc.commit()
    finally:
        hf.close()
    with open(img, "r+b") as f:
        f.truncate(start + 2 * 4096)
    assert check(img)["leaks"] == 5


async def test_drop_empty_blocks_and_last_used(work: Path) -> None:
    img = make(work, "1M", "cluster_size=512", "refcount_bits=64", writes=("write -P 7 0 16k",))
    hf, rc = await engine(img)
    try:
        end_before = await rc.last_used()
        start = await rc.allocate_area(300)  # several blocks that count nothing else
        await rc.commit()
        blocks = sum(1 for e in rc.reftable if e)
        assert await rc.last_used() >= start + 300 * 512
        rc.defer_free(start, 300)
        await rc.commit()
        await rc.drop_empty_blocks()
        remaining = [e for e in rc.reftable if e]
        assert len(remaining) < blocks
        # what is still in use: the old clusters and the blocks that stay (some count another block)
        assert await rc.last_used() == max([end_before] + [b + 512 for b in remaining])
    finally:
        hf.close()
    hf, rc = await engine(img)  # the cleared table entries are on disk
    try:
        assert sum(1 for e in rc.reftable if e) < blocks
    finally:
        hf.close()
    assert check(img).get("leaks", 0) == 0
