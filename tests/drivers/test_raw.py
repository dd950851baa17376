"""The raw driver against files made and read by qemu-img and qemu-io."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from imagecore.driver import ImageOpener, get_format
from imagecore.errors import ReadOnlyError
from imagecore.extent import merge_extents
from imagecore.formats.raw import RawDriver
from tests.peers import peer, run

MiB = 1 << 20


async def _open(path: Path, *, read_only: bool) -> RawDriver:
    drv = await ImageOpener().open(str(path), "raw", read_only=read_only)
    assert isinstance(drv, RawDriver)
    return drv


def _qemu_map(path: Path) -> list[dict[str, object]]:
    proc = run(peer("qemu-img"), "map", "--output=json", "-f", "raw", path)
    return list(json.loads(proc.stdout))


async def test_read_write_and_extents_match_qemu(work: Path) -> None:
    img = work / "a.raw"
    run(peer("qemu-img"), "create", "-f", "raw", img, "8M")
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "write -P 0x11 5M 8k", img)
    drv = await _open(img, read_only=False)
    try:
        assert drv.size == 8 * MiB
        buf = bytearray(64 * 1024)
        await drv.readinto(MiB, memoryview(buf))
        assert buf == b"\x5a" * len(buf)
        await drv.write(3 * MiB, memoryview(b"\x77" * 4096), fua=True)
        exts = [e async for e in drv.extents(0, drv.size)]
        ours = [
            {"start": e.start, "length": e.length, "depth": e.depth, "present": e.present, "zero": e.zero,
             "data": e.data, "offset": e.offset}
            for e in merge_extents(exts)
        ]
        assert sum(e.length for e in exts) == drv.size
    finally:
        await drv.close()
    assert ours == _qemu_map(img)
    run(peer("qemu-io"), "-f", "raw", "-c", "read -P 0x77 3M 4k", img)


async def test_zeroes_and_trim_punch_holes(work: Path) -> None:
    img = work / "z.raw"
    run(peer("qemu-img"), "create", "-f", "raw", img, "4M")
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x33 0 4M", img)
    drv = await _open(img, read_only=False)
    try:
        await drv.write_zeroes(MiB, MiB, may_trim=True, fast=False)
        await drv.write_zeroes(2 * MiB, 64 * 1024, may_trim=False, fast=True)
        await drv.trim(3 * MiB, MiB)
        await drv.flush()
        holes = [e for e in [e async for e in drv.extents(0, drv.size)] if e.zero]
    finally:
        await drv.close()
    assert any(e.start <= MiB and e.end >= 2 * MiB for e in holes)
    assert any(e.start <= 3 * MiB and e.end >= 4 * MiB for e in holes)
    run(peer("qemu-io"), "-f", "raw", "-c", "read -P 0 1M 1M", "-c", "read -P 0 2M 64k",
        "-c", "read -P 0x33 2162688 917504", "-c", "read -P 0 3M 1M", img)
    mapped = _qemu_map(img)
    assert any(m["zero"] and m["start"] == 3 * MiB for m in mapped)


async def test_readinto_nowait_serves_cached_pages(work: Path) -> None:
    img = work / "n.raw"
    img.write_bytes(os.urandom(64 * 1024))
    drv = await _open(img, read_only=True)
    try:
        buf = bytearray(4096)
        await drv.readinto(8192, memoryview(buf))  # warms the page cache
        fast = bytearray(4096)
        assert drv.readinto_nowait(8192, memoryview(fast))
        assert fast == buf == img.read_bytes()[8192:12288]
        tail = bytearray(8192)
        assert not drv.readinto_nowait(60 * 1024, memoryview(tail))
        assert drv.caps.multi_conn and not drv.caps.writable
        with pytest.raises(ReadOnlyError):
            await drv.write(0, memoryview(b"x"))
    finally:
        await drv.close()


async def test_create_preallocation_modes(work: Path) -> None:
    spec = get_format("raw")
    assert spec.create is not None
    for mode in ("off", "falloc", "full"):
        img = work / f"p-{mode}.raw"
        await spec.create(str(img), 3 * MiB + 512, {"preallocation": mode}, opener=ImageOpener())
        info = json.loads(run(peer("qemu-img"), "info", "--output=json", "-f", "raw", img).stdout)
        assert info["virtual-size"] == 3 * MiB + 512
        if mode == "off":
            assert info["actual-size"] <= 64 * 1024
        else:
            assert info["actual-size"] >= 3 * MiB


async def test_may_need_flush_follows_every_kind_of_change(work: Path) -> None:
    """The server skips the close-time flush of an export that was only read; every change through the
    driver (write, zeroes, trim, resize) must make it needed again until a flush."""
    from nbdsrv.backend import build_stack

    img = work / "f.raw"
    run(peer("qemu-img"), "create", "-f", "raw", img, "8M")
    drv = await _open(img, read_only=False)
    stack = build_stack(drv, read_only=False, offset=4096, detect_zeroes="on", discard="ignore")
    try:
        assert not drv.may_need_flush() and not stack.may_need_flush()
        await drv.readinto(0, memoryview(bytearray(4096)))
        assert not stack.may_need_flush()
        changes = [
            lambda: drv.write(0, memoryview(b"\x01" * 4096)),
            lambda: drv.write(MiB, memoryview(b"\x02" * 65536)),
            lambda: drv.write_zeroes(0, 65536, may_trim=True, fast=False),
            lambda: drv.trim(2 * MiB, 65536),
            lambda: drv.hf.truncate(16 * MiB),
        ]
        for change in changes:
            await change()
            assert drv.may_need_flush() and stack.may_need_flush()
            await stack.flush()
            assert not drv.may_need_flush() and not stack.may_need_flush()
    finally:
        await drv.close()
    ro = await _open(img, read_only=True)
    try:
        assert not ro.may_need_flush()
    finally:
        await ro.close()
