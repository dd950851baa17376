"""Persistent dirty bitmaps through the qcow2 driver, checked by QEMU: `info` lists them as qemu-img does;
every write, zeroing, discard and compressed write sets the bits of the enabled bitmaps; the in-use flag is
on disk before the first write and gone after a clean close; what QEMU reads back (qemu-nbd -B, qemu-img
check) is exactly what was written; and the edge cases: disabled and inconsistent bitmaps, memory spills,
clusters shared between the old and new tables, refcount_bits=1, a read-write open that writes nothing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from imagecore.formats import open_image
from imagecore.formats.qcow2 import bitmaps as B
from imagecore.formats.qcow2.driver import Qcow2Driver
from tests.bitmaps_util import (
    bitmaps_of,
    check_clean,
    crash_qemu_writer,
    expected,
    flags_of,
    qemu_map,
)
from tests.peers import imagecore_cmd, peer, qemu10, run

KiB, MiB = 1 << 10, 1 << 20


def qimg(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return run(peer("qemu-img"), *args)


def with_bitmaps(path: Path) -> Path:
    qimg("create", "-q", "-f", "qcow2", path, "64M")
    qimg("bitmap", "--add", path, "b0")
    qimg("bitmap", "--add", "-g", "128k", "--disable", path, "second-bitmap")
    qimg("bitmap", "--add", "-g", "512", path, "ünïcode")
    return path


async def open_rw(path: Path) -> Qcow2Driver:
    d = await open_image(str(path), "qcow2", read_only=False)
    assert isinstance(d, Qcow2Driver)
    return d


def test_declarations_and_precompiled_structs_agree() -> None:
    raw = bytes(range(1, 25))
    c = B.DIRECTORY_ENTRY.parse(raw)
    assert B.ENTRY_STRUCT.unpack(raw) == (c.bitmap_table_offset, c.bitmap_table_size, c.flags, c.type,
                                          c.granularity_bits, c.name_size, c.extra_data_size)
    e = B.BITMAPS_EXTENSION.parse(raw)
    assert B.EXTENSION_STRUCT.unpack(raw) == (e.nb_bitmaps, e.reserved32, e.bitmap_directory_size,
                                              e.bitmap_directory_offset)
    assert B.DIRECTORY_ENTRY.sizeof() == B.ENTRY_STRUCT.size and B.BITMAPS_EXTENSION.sizeof() == 24


def test_info_lists_bitmaps_as_qemu_img(tmp_path: Path) -> None:
    img = with_bitmaps(tmp_path / "b.qcow2")
    crash_qemu_writer(img, "write 0 64k")  # in-use flags too
    for args in (["--output=json"], []):
        q = run(peer("qemu-img"), "info", "-U", *args, img).stdout
        o = subprocess.run([*imagecore_cmd(), "info", "-U", *args, str(img)], capture_output=True,
                           check=True).stdout
        drop = (b"disk size:", b'"actual-size"')
        assert [x for x in o.splitlines() if not x.lstrip().startswith(drop)] == \
            [x for x in q.splitlines() if not x.lstrip().startswith(drop)]
    data = json.loads(run(*imagecore_cmd(), "info", "--output=json", img).stdout)["format-specific"]["data"]
    # QEMU marks every bitmap in use while it has the image open, the disabled one too
    assert [(b["name"], b["granularity"], b["flags"]) for b in data["bitmaps"]] == [
        ("b0", 65536, ["in-use", "auto"]), ("second-bitmap", 131072, ["in-use"]),
        ("ünïcode", 512, ["in-use", "auto"])]


async def test_every_kind_of_write_sets_the_enabled_bitmaps(tmp_path: Path) -> None:
    img = with_bitmaps(tmp_path / "w.qcow2")
    qimg("bitmap", "--add", "-g", "4k", img, "b4k")
    ranges = [(100 * KiB, 4 * KiB), (MiB, MiB), (5 * MiB + 3, 1), (9 * MiB, 3 * MiB + 512),
              (20 * MiB, 128 * KiB), (30 * MiB, 64 * KiB), (63 * MiB, MiB)]
    d = await open_rw(img)
    try:
        await d.write(ranges[0][0], memoryview(b"a" * ranges[0][1]))
        await d.write(ranges[1][0], memoryview(b"b" * ranges[1][1]))
        await d.write(ranges[2][0], memoryview(b"c"))
        await d.write_zeroes(ranges[3][0], ranges[3][1], may_trim=True, fast=False)
        await d.write(ranges[4][0], memoryview(bytes(range(256)) * 512))
        await d.trim(ranges[5][0], ranges[5][1])
        await d.write_compressed(ranges[6][0], memoryview(b"z" * MiB))
        # before close: the in-use flags are on disk (synced before the first write), the disabled one not
        assert flags_of(img) == {"b0": ["in-use", "auto"], "second-bitmap": [], "ünïcode": ["in-use", "auto"],
                                 "b4k": ["in-use", "auto"]}
        assert [r async for r in d.bitmap_runs("b4k", 0, d.size)] == [
            (o, o + n, dirty) for o, n, dirty in expected(d.size, 4096, ranges)]
    finally:
        await d.close()
    assert flags_of(img) == {"b0": ["auto"], "second-bitmap": [], "ünïcode": ["auto"], "b4k": ["auto"]}
    check_clean(img)
    for name, gran in (("b0", 65536), ("ünïcode", 512), ("b4k", 4096)):
        assert qemu_map(img, name) == expected(64 * MiB, gran, ranges), name
    assert qemu_map(img, "second-bitmap") == [(0, 64 * MiB, False)]


async def test_bitmaps_accumulate_over_sessions_and_qemu_writes(tmp_path: Path) -> None:
    img = with_bitmaps(tmp_path / "s.qcow2")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write 0 64k", img)  # QEMU tracks this one
    d = await open_rw(img)
    try:
        await d.write(3 * MiB, memoryview(b"x" * 4096))
    finally:
        await d.close()
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write 40M 1M", img)
    d = await open_rw(img)
    try:
        await d.write(50 * MiB, memoryview(b"x" * 4096))
    finally:
        await d.close()
    check_clean(img)
    ranges = [(0, 64 * KiB), (3 * MiB, 4096), (40 * MiB, MiB), (50 * MiB, 4096)]
    assert qemu_map(img, "b0") == expected(64 * MiB, 65536, ranges)
    assert qemu_map(img, "ünïcode", qemu_nbd=qemu10("qemu-nbd")) == expected(64 * MiB, 512, ranges)


async def test_a_read_write_open_that_writes_nothing_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    img = with_bitmaps(tmp_path / "n.qcow2")
    before = img.read_bytes()
    d = await open_rw(img)
    buf = bytearray(4096)
    await d.readinto(0, memoryview(buf))
    await d.flush()
    await d.close()
    assert img.read_bytes() == before


async def test_only_a_disabled_bitmap_is_never_marked_in_use(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "16M")
    qimg("bitmap", "--add", "--disable", img, "frozen")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write 0 64k", img)
    qimg("bitmap", "--enable", img, "frozen")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write 1M 64k", img)
    qimg("bitmap", "--disable", img, "frozen")
    before = img.read_bytes()
    d = await open_rw(img)
    try:
        await d.write(8 * MiB, memoryview(b"y" * 4096))
        # nothing to mark: the frozen bitmap cannot go stale, so a crash here would keep it usable
        assert flags_of(img) == {"frozen": []}
    finally:
        await d.close()
    after = img.read_bytes()
    assert qemu_map(img, "frozen") == expected(16 * MiB, 65536, [(MiB, 64 * KiB)])
    assert len(after) >= len(before)
    check_clean(img)


async def test_an_inconsistent_bitmap_is_kept_as_it_is_and_never_offered(tmp_path: Path) -> None:
    img = tmp_path / "i.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "16M")
    qimg("bitmap", "--add", img, "lost")
    crash_qemu_writer(img, "write 0 64k")
    qimg("bitmap", "--add", img, "fresh")
    assert flags_of(img) == {"lost": ["in-use", "auto"], "fresh": ["auto"]}
    d = await open_rw(img)
    try:
        assert d.bitmap_names() == ["fresh"]
        await d.write(2 * MiB, memoryview(b"q" * 4096))
        with pytest.raises(Exception, match="inconsistent"):
            [r async for r in d.bitmap_runs("lost", 0, d.size)]
    finally:
        await d.close()
    assert flags_of(img) == {"lost": ["in-use", "auto"], "fresh": ["auto"]}
    check_clean(img)
    assert qemu_map(img, "fresh") == expected(16 * MiB, 65536, [(2 * MiB, 4096)])
    # QEMU agrees that it cannot be used, and lets it be removed
    p = run(peer("qemu-img"), "bitmap", "--clear", img, "lost", check=False)
    assert p.returncode == 1 and b"is inconsistent and cannot be used" in p.stderr
    qimg("bitmap", "--remove", img, "lost")
    check_clean(img)


@pytest.mark.parametrize("opts", [["-o", "cluster_size=512"], ["-o", "cluster_size=512,refcount_bits=1"]])
async def test_spills_and_shared_clusters(tmp_path: Path, opts: list[str], monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """512-byte clusters make a bitmap cluster cover 2 MiB at 512-byte granularity, so a few writes fill
    many of them; a budget of four clusters forces spills; a second session changes one cluster of a
    bitmap whose others must be kept (shared, or copied with refcount_bits=1, where sharing is impossible)."""
    from imagecore.formats.qcow2 import dirty

    monkeypatch.setattr(dirty, "OVERLAY_BUDGET", 4 * 512)
    img = tmp_path / "spill.qcow2"
    qimg("create", "-q", "-f", "qcow2", *opts, img, "48M")
    qimg("bitmap", "--add", "-g", "512", img, "fine")
    qimg("bitmap", "--add", "-g", "64k", img, "coarse")
    first = [(i * 2 * MiB + 7 * 512, 1500) for i in range(24)]
    d = await open_rw(img)
    try:
        for off, n in first:
            await d.write(off, memoryview(b"s" * n))
        assert d.tracking is not None and any(b.owned for b in d.tracking.bitmaps)  # it did spill
        assert [r async for r in d.bitmap_runs("fine", 0, d.size)] == [
            (o, o + n, dirty) for o, n, dirty in expected(d.size, 512, first)]
    finally:
        await d.close()
    check_clean(img)
    assert qemu_map(img, "fine") == expected(48 * MiB, 512, first)
    assert qemu_map(img, "coarse") == expected(48 * MiB, 65536, first)
    second = [(10 * MiB + 100 * 512, 512)]
    d = await open_rw(img)
    try:
        await d.write(second[0][0], memoryview(b"t" * 512))
    finally:
        await d.close()
    check_clean(img)
    assert qemu_map(img, "fine") == expected(48 * MiB, 512, first + second)


async def test_a_corrupt_image_keeps_its_bitmaps_in_use(tmp_path: Path) -> None:
    """A driver that drops to read-only on corruption cannot store: the bitmap stays in use, inconsistent,
    never silently wrong."""
    img = tmp_path / "c.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "16M")
    qimg("bitmap", "--add", img, "b0")
    d = await open_rw(img)
    await d.write(0, memoryview(b"w" * 4096))
    await d._corrupt("test")
    await d.close()
    assert flags_of(img)["b0"] == ["in-use", "auto"]


async def test_spilled_clusters_of_a_bitmap_removed_or_cleared_are_freed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imagecore.formats.qcow2 import dirty

    monkeypatch.setattr(dirty, "OVERLAY_BUDGET", 2 * 512)
    img = tmp_path / "orphans.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "16M")
    for name in ("gone", "wiped", "kept"):
        qimg("bitmap", "--add", "-g", "512", img, name)
    d = await open_rw(img)
    try:
        for i in range(8):
            await d.write(i * 2 * MiB, memoryview(b"o" * 512))
        t = d.bitmap_tracker()
        assert all(b.owned for b in t.bitmaps)
        t.remove("gone")
        t.clear("wiped")
    finally:
        await d.close()
    check_clean(img)  # no leaked cluster: the spilled ones were freed
    assert [b["name"] for b in bitmaps_of(img)] == ["wiped", "kept"]
    assert qemu_map(img, "wiped") == [(0, 16 * MiB, False)]
    assert qemu_map(img, "kept") == expected(16 * MiB, 512, [(i * 2 * MiB, 512) for i in range(8)])
