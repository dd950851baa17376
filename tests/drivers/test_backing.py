"""Backing-file fall-through (imagecore.backing) through the formats that have backing files: an overlay
over a shorter backing file reads the backing data, then zeroes past its end, and maps as qemu-img maps it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagecore.backing import extents_below, read_below, read_below_nowait
from imagecore.driver import ImageOpener
from imagecore.extent import Extent, merge_extents
from tests.peers import peer, run

MiB = 1 << 20


async def test_read_below_clips_at_the_backing_end(work: Path) -> None:
    base = work / "base.raw"
    run(peer("qemu-img"), "create", "-f", "raw", base, "1M")
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x5a 0 1M", base)
    drv = await ImageOpener().open(str(base), "raw", read_only=True)
    try:
        for reader in ("async", "nowait"):
            buf = bytearray(b"\xff" * (2 * MiB))
            view = memoryview(buf)[MiB - 4096:]
            if reader == "async":
                await read_below(drv, MiB - 4096, view)
            else:
                assert read_below_nowait(drv, MiB - 4096, view)
            assert view[:4096] == b"\x5a" * 4096
            assert bytes(view[4096:]) == bytes(len(view) - 4096)
        none = bytearray(b"\xff" * 512)
        await read_below(None, 0, memoryview(none))
        assert none == bytes(512)
        runs = [e async for e in extents_below(drv, MiB - 4096, 8192)]
        assert runs[0].depth == 1 and runs[0].data
        assert runs[-1] == Extent(MiB, 4096, data=False, zero=True, depth=0, present=False)
        assert [e async for e in extents_below(None, 0, 512)] == [
            Extent(0, 512, data=False, zero=True, depth=0, present=False)]
    finally:
        await drv.close()


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk"])
async def test_overlay_over_a_shorter_backing_file_reads_and_maps_as_qemu(work: Path, fmt: str) -> None:
    base = work / f"base.{fmt}"
    top = work / f"top.{fmt}"
    run(peer("qemu-img"), "create", "-f", fmt, base, "1M")
    run(peer("qemu-io"), "-f", fmt, "-c", "write -P 0x5a 0 1M", base)
    run(peer("qemu-img"), "create", "-f", fmt, "-b", base.name, "-F", fmt, top, "4M")
    run(peer("qemu-io"), "-f", fmt, "-c", "write -P 0x11 2M 64k", top)
    drv = await ImageOpener().open(str(top), fmt, read_only=True)
    try:
        buf = bytearray(b"\xff" * (4 * MiB))
        await drv.readinto(0, memoryview(buf))
        expect = bytearray(4 * MiB)
        expect[:MiB] = b"\x5a" * MiB
        expect[2 * MiB:2 * MiB + 65536] = b"\x11" * 65536
        assert buf == expect
        ours = [(e.start, e.length, e.depth, e.data, e.zero, e.present)
                for e in merge_extents([e async for e in drv.extents(0, drv.size)])]
    finally:
        await drv.close()
    proc = run(peer("qemu-img"), "map", "--output=json", "-f", fmt, top)
    theirs = [(m["start"], m["length"], m["depth"], m["data"], m["zero"], m["present"])
              for m in json.loads(proc.stdout)]
    assert ours == theirs
