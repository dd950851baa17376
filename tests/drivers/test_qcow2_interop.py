"""qcow2 images made and written by qemu-img/qemu-io read byte-identical through the driver; extents = map."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagecore.extent import Extent, amerge_extents, merge_extents
from imagecore.formats import open_image
from tests.peers import peer, run

MiB = 1 << 20


def qimg(*args: str | Path) -> None:
    run(peer("qemu-img"), *args)


def qio(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args: list[str | Path] = []
    for c in cmds:
        args += ["-c", c]
    run(peer("qemu-io"), "-f", fmt, *args, path)


async def read_all(path: Path) -> bytes:
    d = await open_image(str(path), "qcow2")
    try:
        buf = bytearray(d.size)
        step = 3 * MiB + 4096  # unaligned chunks exercise run splitting
        for off in range(0, d.size, step):
            n = min(step, d.size - off)
            await d.readinto(off, memoryview(buf)[off:off + n])
        return bytes(buf)
    finally:
        await d.close()


def reference(path: Path, tmp: Path) -> bytes:
    out = tmp / (path.name + ".ref.raw")
    qimg("convert", "-O", "raw", path, out)
    return out.read_bytes()


async def assert_same(path: Path, tmp: Path) -> None:
    got = await read_all(path)
    want = reference(path, tmp)
    assert len(got) == len(want)
    if got != want:
        bad = next(i for i in range(len(got)) if got[i] != want[i])
        raise AssertionError(f"first difference at byte {bad}")


def pattern_cmds(size: int, cs: int) -> list[str]:
    """A mix of data writes, zero writes and discards, aligned and not."""
    return [
        f"write -P 0x11 0 {3 * cs}",
        f"write -P 0x22 {cs // 2} {cs}",
        f"write -z {4 * cs} {2 * cs}",
        f"write -P 0x33 {8 * cs + 100} 5000",
        f"discard {cs} {cs}",
        f"write -P 0x44 {size - 3 * cs} {3 * cs}",
        f"write -z -u {size - 2 * cs} {cs}",
        f"write -P 0x55 {size // 2} {cs * 3 + 7}",
    ]


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cs", [512, 4096, 65536, 2 * MiB])
async def test_qemu_written_images_read_identically(tmp_path: Path, compat: str, cs: int) -> None:
    size = max(8 * MiB, 16 * cs)
    img = tmp_path / "a.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", f"compat={compat},cluster_size={cs}", img, str(size))
    qio(img, *pattern_cmds(size, cs))
    await assert_same(img, tmp_path)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
async def test_compressed_clusters(tmp_path: Path, ctype: str) -> None:
    src = tmp_path / "src.qcow2"
    qimg("create", "-q", "-f", "qcow2", src, "4M")
    qio(src, "write -P 0x61 0 1M", "write -P 0x62 1536k 100k", "write -z 2M 64k")
    dst = tmp_path / "c.qcow2"
    qimg("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", src, dst)
    # some clusters compressed, some rewritten in place afterwards
    qio(dst, "write -P 0x63 64k 4k")
    await assert_same(dst, tmp_path)
    d = await open_image(str(dst), "qcow2")
    try:
        assert d.format_specific() is not None
        fs = d.format_specific() or {}
        assert fs["data"]["compression-type"] == ctype
        comp = [e async for e in d.extents(0, d.size) if e.compressed]
        assert comp and all(e.offset is None and e.data for e in comp)
    finally:
        await d.close()


async def test_internal_snapshots_present(tmp_path: Path) -> None:
    img = tmp_path / "s.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "4M")
    qio(img, "write -P 1 0 2M")
    qimg("snapshot", "-c", "snap1", img)
    qio(img, "write -P 2 64k 64k", "write -z 1M 128k", "discard 1536k 64k")
    qimg("snapshot", "-c", "snap2", img)
    qio(img, "write -P 3 0 4k")
    await assert_same(img, tmp_path)
    d = await open_image(str(img), "qcow2")
    try:
        names = [s.name for s in d.snapshots]  # type: ignore[attr-defined]
        assert names == ["snap1", "snap2"]
        info = json.loads(run(peer("qemu-img"), "info", "--output=json", img).stdout)
        want = [(s["id"], s["name"], s["vm-state-size"], s["date-sec"], s["date-nsec"], s["vm-clock-sec"],
                 s["vm-clock-nsec"]) for s in info["snapshots"]]
        got = [(s.id, s.name, s.vm_state_size, s.date_sec, s.date_nsec, s.vm_clock_sec,
                s.vm_clock_subsec_nsec) for s in d.snapshots]  # type: ignore[attr-defined]
        assert got == want
    finally:
        await d.close()


async def test_backing_chain_depth_three(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(range(256)) * (3 * MiB // 256))  # 3 MiB: shorter than the images above it
    mid = tmp_path / "mid.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "raw", "-o", "cluster_size=4096", mid, "5M")
    qio(mid, "write -P 0x71 1M 8k", "write -z 2M 4k", "write -P 0x72 4M 4k")
    top1 = tmp_path / "top1.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", top1, "6M")
    qio(top1, "write -P 0x73 1028k 64k", "discard 2M 64k", "write -P 0x74 5M 4k")
    top2 = tmp_path / "top2.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-b", top1.name, "-F", "qcow2", "-o", "compat=0.10", top2, "8M")
    qio(top2, "write -P 0x75 7M 4k", "write -P 0x76 0 512")
    await assert_same(top2, tmp_path)
    await assert_map_equal(top2)


async def test_extended_l2_reads(tmp_path: Path) -> None:
    base = tmp_path / "b.qcow2"
    qimg("create", "-q", "-f", "qcow2", base, "4M")
    qio(base, "write -P 0x10 0 4M")
    img = tmp_path / "x.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", "-o",
         "extended_l2=on,cluster_size=64k", img, "4M")
    qio(img, "write -P 0x20 2k 2k", "write -P 0x21 70k 10k", "write -z 140k 4k", "discard 0 2k",
        "write -P 0x22 1M 64k", "write -z 1M 2k")
    await assert_same(img, tmp_path)
    await assert_map_equal(img)
    plain = tmp_path / "xp.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", plain, "4M")
    qio(plain, "write -P 1 0 2k", "write -P 2 68k 4k", "write -z 200k 16k", "write -z 140k 2k")
    await assert_map_equal(plain)
    await assert_same(plain, tmp_path)
    d = await open_image(str(img), "qcow2")
    try:
        fs = d.format_specific() or {}
        assert fs["data"]["extended-l2"] is True
    finally:
        await d.close()


async def test_odd_size(tmp_path: Path) -> None:
    img = tmp_path / "odd.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "1000000000")
    qio(img, "write -P 0x5a 999999000 1000", "write -P 0x5b 0 100")
    d = await open_image(str(img), "qcow2")
    try:
        assert d.size == 1000000000
        buf = bytearray(4096)
        await d.readinto(1000000000 - 4096, memoryview(buf))
        assert buf[-1000:] == b"\x5a" * 1000 and buf[:-1000] == bytes(3096)
        head = bytearray(200)
        await d.readinto(0, memoryview(head))
        assert head == b"\x5b" * 100 + bytes(100)
    finally:
        await d.close()


async def test_external_data_file(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'd.data'},data_file_raw=on", img, "2M")
    qio(img, "write -P 0x31 4k 8k", "write -P 0x32 1M 64k")
    await assert_same(img, tmp_path)
    img2 = tmp_path / "e.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'e.data'}", img2, "2M")
    qio(img2, "write -P 0x33 0 8k", "write -z 64k 64k")
    await assert_same(img2, tmp_path)


async def test_external_data_file_extended_l2(tmp_path: Path) -> None:
    # guest cluster 0 lives at offset 0 of the data file: an allocated cluster (COPIED) whose subclusters
    # are partly unallocated, not an invalid bitmap
    img = tmp_path / "x.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'x.data'},extended_l2=on", img, "4M")
    qio(img, "write -P 0x34 0 20k", "write -P 0x35 1M 4k", "write -z 2M 64k")
    await assert_same(img, tmp_path)
    await assert_map_equal(img)


# -- extents against qemu-img map ---------------------------------------------------------------------

def _norm(runs: list[Extent]) -> list[tuple[int, int, int, bool, bool, bool, int | None]]:
    return [(e.start, e.length, e.depth, e.present, e.zero, e.data, e.offset) for e in merge_extents(runs)]


async def assert_map_equal(path: Path) -> None:
    out = run(peer("qemu-img"), "map", "--output=json", path).stdout
    theirs = [Extent(m["start"], m["length"], m["data"], m["zero"], m["depth"], m.get("present", True),
                     m.get("offset")) for m in json.loads(out)]
    d = await open_image(str(path), "qcow2")
    try:
        ours = [e async for e in amerge_extents(d.extents(0, d.size))]
    finally:
        await d.close()
    # qemu-img reports offsets of backing layers relative to their own files, as we do
    assert _norm(ours) == _norm(theirs)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
async def test_extents_match_qemu_img_map(tmp_path: Path, compat: str) -> None:
    base = tmp_path / "base.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", base, "2M")
    qio(base, "write -P 1 0 1M", "write -z 1M 64k")
    top = tmp_path / "top.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", "-o", f"compat={compat}", top, "4M")
    qio(top, "write -P 2 64k 64k", "write -z 192k 64k", "write -P 3 256k 128k", "write -z 256k 64k",
        "discard 448k 64k", "write -P 4 3M 128k")
    await assert_map_equal(top)
    await assert_map_equal(base)
    plain = tmp_path / "plain.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", plain, "3M")
    qio(plain, "write -P 5 0 192k", "write -z 64k 64k", "write -z -u 128k 64k")
    await assert_map_equal(plain)


async def test_preallocated_metadata_holes_read_as_zero(tmp_path: Path) -> None:
    img = tmp_path / "pm.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", img, "2M")
    qio(img, "write -P 1 0 4k", "write -P 2 1M 64k")
    await assert_map_equal(img)
    await assert_same(img, tmp_path)
