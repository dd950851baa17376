"""qcow2 WRITE_ZEROES into part of a cluster: nothing is stored where the range already reads as zeroes
(as qemu's qcow2_co_pwrite_zeroes), and the range is still zeroed where a backing file shows data."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from imagecore.formats import open_image
from tests.peers import peer, run

KiB = 1 << 10
MiB = 1 << 20


def qimg(*args: str | Path) -> bytes:
    return run(peer("qemu-img"), *args).stdout


def data_bytes(path: Path) -> int:
    """Bytes that ``qemu-img map`` reports as data stored in the image itself (depth 0)."""
    m = json.loads(qimg("map", "--output=json", path))
    return sum(e["length"] for e in m if e["data"] and e["depth"] == 0)


async def _zeroes(path: Path, ranges: list[tuple[int, int]]) -> bytes:
    d = await open_image(str(path), "qcow2", read_only=False)
    try:
        for off, n in ranges:
            await d.write_zeroes(off, n, may_trim=False, fast=False)
        await d.flush()
        buf = bytearray(d.size)
        await d.readinto(0, memoryview(buf))
        return bytes(buf)
    finally:
        await d.close()


# head, tail and middle of clusters, each under 64 KiB and not cluster-aligned
PARTIAL = [(4 * KiB, 8 * KiB), (MiB + 60 * KiB, 8 * KiB), (2 * MiB + 100, 3000)]


def test_partial_zeroes_over_unallocated_store_nothing(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    qimg("create", "-f", "qcow2", img, "8M")
    assert asyncio.run(_zeroes(img, PARTIAL)) == bytes(8 * MiB)
    assert data_bytes(img) == 0
    run(peer("qemu-img"), "check", img)


def test_partial_zeroes_over_zero_cluster_and_zero_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    img = tmp_path / "top.qcow2"
    qimg("create", "-f", "qcow2", base, "8M")
    qimg("create", "-f", "qcow2", "-b", base, "-F", "qcow2", img, "8M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -z 1M 64k", img)  # a zero cluster
    assert asyncio.run(_zeroes(img, PARTIAL)) == bytes(8 * MiB)
    assert data_bytes(img) == 0
    run(peer("qemu-img"), "check", img)


def test_partial_zeroes_over_backing_data_still_zero(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    img = tmp_path / "top.qcow2"
    qimg("create", "-f", "qcow2", base, "8M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0xaa 0 4M", base)
    qimg("create", "-f", "qcow2", "-b", base, "-F", "qcow2", img, "8M")
    got = asyncio.run(_zeroes(img, PARTIAL))
    want = bytearray(b"\xaa" * (4 * MiB) + bytes(4 * MiB))
    for off, n in PARTIAL:
        want[off:off + n] = bytes(n)
    assert got == bytes(want)
    assert data_bytes(img) > 0
    run(peer("qemu-img"), "check", img)
    out = tmp_path / "out.raw"
    qimg("convert", "-O", "raw", img, out)
    assert out.read_bytes() == bytes(want)
