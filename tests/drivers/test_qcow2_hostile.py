"""Hostile qcow2 images: each fails quickly with a one-line ImageFormatError, never a hang or traceback."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from imagecore.errors import BlockError, CorruptImageError, ImageFormatError, UnsupportedError
from imagecore.formats import open_image
from imagecore.formats.qcow2 import layout
from imagecore.formats.qcow2.tables import compressed_entry
from tests.peers import peer, run


def make(tmp: Path, *opts: str, size: str = "4M", writes: tuple[str, ...] = ()) -> Path:
    img = tmp / "h.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", *opts, img, size)
    if writes:
        args: list[str] = []
        for w in writes:
            args += ["-c", w]
        run(peer("qemu-io"), "-f", "qcow2", *args, img)
    return img


def put(path: Path, offset: int, fmt: str, *values: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def put2(path: Path, a: tuple[int, str, int], b: tuple[int, str, int]) -> None:
    put(path, *a)
    put(path, *b)


def get(path: Path, offset: int, fmt: str) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int(struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0])


async def expect_open_error(path: Path, exc: type[BlockError] = ImageFormatError,
                            match: str | None = None, read: bool = False, read_only: bool = True) -> None:
    t0 = time.monotonic()
    with pytest.raises(exc, match=match) as ei:
        d = await open_image(str(path), "qcow2", read_only=read_only)
        try:
            if read:
                buf = bytearray(65536)
                for off in range(0, min(d.size, 4 << 20), len(buf)):
                    await d.readinto(off, memoryview(buf)[:min(len(buf), d.size - off)])
        finally:
            await d.close()
    assert time.monotonic() - t0 < 10
    msg = str(ei.value)
    assert msg and "\n" not in msg


def l2_offset(path: Path) -> int:
    l1 = get(path, 40, ">Q")
    return get(path, l1, ">Q") & layout.L1E_OFFSET_MASK


Mutator = Callable[[Path], None]

HEADER_CASES: dict[str, tuple[Mutator, str]] = {
    "bad magic": (lambda p: put(p, 0, ">I", 0x51464900), "^Image is not in qcow2 format$"),
    "cluster bits": (lambda p: put(p, 20, ">I", 31), "^Unsupported cluster size: 2\\^31$"),
    "l1 unaligned": (lambda p: put(p, 40, ">Q", 0x30200), "^Active L1 table offset invalid$"),
    "l1 absurd size": (lambda p: put(p, 36, ">I", 0x7FFFFFFF), "^Active L1 table too large$"),
    "l1 too small": (lambda p: put(p, 36, ">I", 0), "^L1 table is too small$"),
    "reftable unaligned": (lambda p: put(p, 48, ">Q", 0x10100), "^Reference count table offset invalid$"),
    "reftable absurd": (lambda p: put(p, 56, ">I", 0x7FFFFFFF), "^Reference count table too large$"),
    "reftable none": (lambda p: put(p, 56, ">I", 0), "^Image does not contain a reference count table$"),
    "snapshots absurd": (lambda p: put(p, 60, ">I", 0xFFFFFFFF), "^Snapshot table too large$"),
    "header length past cluster": (lambda p: put(p, 100, ">I", 1 << 20),
                                   "^qcow2 header exceeds cluster size$"),
    "header length short": (lambda p: put(p, 100, ">I", 50), "^qcow2 header too short$"),
    "backing name outside cluster": (lambda p: put2(p, (8, ">Q", 65530), (16, ">I", 100)),
                                     "^Backing file name too long$"),
    "backing offset outside cluster": (lambda p: put(p, 8, ">Q", 65537), "^Invalid backing file offset$"),
    "size absurd": (lambda p: put(p, 24, ">Q", 1 << 62), "^Image is too big$"),
    "refcount order": (lambda p: put(p, 96, ">I", 7), "Reference count entry width"),
    "extension past cluster": (lambda p: put(p, 112, ">II", 0x12345678, 0x7FFFFFFF),
                               "^Header extension too large$"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
async def test_hostile_header(tmp_path: Path, case: str) -> None:
    img = make(tmp_path, writes=("write -P 1 0 64k",))
    mutate, match = HEADER_CASES[case]
    mutate(img)
    await expect_open_error(img, match=match)
    await expect_open_error(img, match=match, read_only=False)


# Tables past the end of the file (or over the header): qemu opens these, reading zeroes there; so does a
# read-only open here (the image reads as qemu reads it), while a writer refuses them rather than
# allocate over a table it cannot see, or write the header through one.
PAST_END_CASES: dict[str, tuple[Mutator, str]] = {
    "l1 past eof": (lambda p: put(p, 40, ">Q", 1 << 40), "Active L1 table extends past the end of the file"),
    "l1 past file end": (lambda p: put(p, 36, ">I", 4 << 20),
                         "Active L1 table extends past the end of the file"),
    "l1 over the header": (lambda p: put(p, 40, ">Q", 0), "Active L1 table overlaps the image header"),
    "reftable past eof": (lambda p: put(p, 48, ">Q", 1 << 40),
                          "Reference count table extends past the end of the file"),
    "reftable past file end": (lambda p: put(p, 56, ">I", 100),
                               "Reference count table extends past the end of the file"),
    "reftable over the header": (lambda p: put(p, 48, ">Q", 0),
                                 "Reference count table overlaps the image header"),
    "snapshot table past eof": (lambda p: put2(p, (60, ">I", 3), (64, ">Q", 1 << 40)),
                                "Snapshot table exceeds the end of the file"),
}


@pytest.mark.parametrize("case", sorted(PAST_END_CASES))
async def test_tables_past_the_end_open_read_only(tmp_path: Path, case: str) -> None:
    img = make(tmp_path, writes=("write -P 1 0 64k",))
    mutate, match = PAST_END_CASES[case]
    mutate(img)
    d = await open_image(str(img), "qcow2")
    try:
        buf = bytearray(4096)
        if "l1" not in case:
            await d.readinto(0, memoryview(buf))
            assert buf == b"\x01" * 4096  # the data is still found through the L1 and L2 tables
    finally:
        await d.close()
    await expect_open_error(img, match=f"^{match}$", read_only=False)


async def test_truncated_files(tmp_path: Path) -> None:
    img = make(tmp_path, writes=("write -P 1 0 1M",))
    data = img.read_bytes()
    for cut in (0, 10, 71, 100):
        img.write_bytes(data[:cut])
        await expect_open_error(img)
    # cut after the header: qemu reads the rest as zeroes, and so does a read-only open
    img.write_bytes(data[:4096])
    await expect_open_error(img, read_only=False)
    # the metadata survives but the data and L2 tables are cut off
    img.write_bytes(data[:5 * 65536 + 100])
    await expect_open_error(img, CorruptImageError, read=True)


async def test_l2_pointer_past_eof_and_unaligned(tmp_path: Path) -> None:
    img = make(tmp_path, writes=("write -P 1 0 64k",))
    l1 = get(img, 40, ">Q")
    put(img, l1, ">Q", layout.L1E_COPIED | (1 << 45))
    await expect_open_error(img, CorruptImageError, match="L2 table", read=True)
    put(img, l1, ">Q", layout.L1E_COPIED | 0x50200)
    await expect_open_error(img, CorruptImageError, match="L2 table", read=True)


async def test_data_cluster_pointers(tmp_path: Path) -> None:
    img = make(tmp_path, writes=("write -P 1 0 128k",))
    l2 = l2_offset(img)
    put(img, l2, ">Q", layout.L2E_COPIED | (1 << 44))
    await expect_open_error(img, CorruptImageError, match="past the end", read=True)
    put(img, l2, ">Q", layout.L2E_COPIED | 0x50200)
    await expect_open_error(img, CorruptImageError, match="unaligned", read=True)


async def test_garbage_compressed_cluster(tmp_path: Path) -> None:
    img = make(tmp_path, writes=("write -P 1 0 128k",))
    l2 = l2_offset(img)
    host = get(img, l2, ">Q") & layout.L2E_OFFSET_MASK
    put(img, host, ">QQ", 0xDEADBEEFDEADBEEF, 0x0123456789ABCDEF)
    put(img, l2, ">Q", compressed_entry(host, 3000, 16))
    await expect_open_error(img, ImageFormatError, match="ecompress", read=True)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
async def test_compression_bomb_is_bounded(tmp_path: Path, ctype: str) -> None:
    import zlib

    import zstandard

    img = make(tmp_path, "-o", f"compression_type={ctype}", writes=("write -P 1 0 128k",))
    l2 = l2_offset(img)
    host = get(img, l2, ">Q") & layout.L2E_OFFSET_MASK
    payload = bytes(1 << 24)  # decompresses to 16 MiB, far more than a cluster
    if ctype == "zlib":
        co = zlib.compressobj(9, zlib.DEFLATED, -12)
        blob = co.compress(payload) + co.flush()
    else:
        blob = zstandard.ZstdCompressor().compress(payload)
    blob = blob[:60000]
    with open(img, "r+b") as f:
        f.seek(host)
        f.write(blob)
    put(img, l2, ">Q", compressed_entry(host, len(blob), 16))
    d = await open_image(str(img), "qcow2")
    try:
        buf = bytearray(65536)
        await d.readinto(0, memoryview(buf))  # a prefix of zeroes: the cap, not the bomb, decides
        assert buf == bytes(65536)
    finally:
        await d.close()


async def test_backing_chain_loop(tmp_path: Path) -> None:
    a = tmp_path / "a.qcow2"
    b = tmp_path / "b.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", a, "1M")
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", "-b", a.name, "-F", "qcow2", b, "1M")
    # point a at b: a -> b -> a
    raw = bytearray(a.read_bytes())
    h = layout.parse_header(bytes(raw[:65536]), len(raw))
    h.backing_file = b.name
    h.set_extension(layout.EXT_BACKING_FORMAT, b"qcow2")
    with open(a, "r+b") as f:
        f.write(layout.encode_header(h))
    await expect_open_error(b, match="loop")
    # and an image that is its own backing file
    h.backing_file = a.name
    with open(a, "r+b") as f:
        f.write(layout.encode_header(h))
    await expect_open_error(a, match="loop")


async def test_unknown_incompatible_feature(tmp_path: Path) -> None:
    img = make(tmp_path)
    put(img, 72, ">Q", 1 << 40)
    unknown = r"^Unsupported qcow2 feature\(s\): Unknown incompatible feature: 10000000000$"
    await expect_open_error(img, UnsupportedError, match=unknown)


async def test_refcount_block_past_eof_on_write(tmp_path: Path) -> None:
    img = make(tmp_path, writes=("write -P 1 0 64k",))
    rt = get(img, 48, ">Q")
    put(img, rt, ">Q", 1 << 40)
    d = await open_image(str(img), "qcow2", read_only=False)
    try:
        with pytest.raises(CorruptImageError) as ei:
            await d.write(1 << 20, memoryview(b"x" * 4096))
        assert "\n" not in str(ei.value)
    finally:
        await d.close()


async def test_data_cluster_overlapping_metadata(tmp_path: Path) -> None:
    img = make(tmp_path, writes=("write -P 1 0 64k",))
    l2 = l2_offset(img)
    put(img, l2, ">Q", layout.L2E_COPIED | l2)  # the data cluster is the L2 table itself
    d = await open_image(str(img), "qcow2", read_only=False)
    try:
        with pytest.raises(CorruptImageError, match="overlaps the L2 table"):
            await d.write(0, memoryview(b"x" * 512))
    finally:
        await d.close()
    assert get(img, 72, ">Q") & layout.INCOMPAT_CORRUPT
    assert get(img, l2 + 8, ">Q") == 0  # nothing was written over the table


async def test_tables_pointing_at_other_metadata(tmp_path: Path) -> None:
    img = make(tmp_path, writes=("write -P 1 0 64k",))
    l1 = get(img, 40, ">Q")
    rt = get(img, 48, ">Q")
    put(img, l1, ">Q", layout.L1E_COPIED | rt)  # the L2 table is the refcount table
    d = await open_image(str(img), "qcow2", read_only=False)
    try:
        with pytest.raises(CorruptImageError, match="overlaps the refcount table"):
            await d.write(0, memoryview(b"x" * 512))
    finally:
        await d.close()
    img2 = tmp_path / "h2.qcow2"
    img.rename(img2)
    img = make(tmp_path, writes=("write -P 1 0 64k",))
    rt = get(img, 48, ">Q")
    put(img, rt, ">Q", rt)  # the first refcount block is the refcount table
    d = await open_image(str(img), "qcow2", read_only=False)
    try:
        with pytest.raises(CorruptImageError, match="Refcount block"):
            await d.write(1 << 20, memoryview(b"x" * 512))
    finally:
        await d.close()
