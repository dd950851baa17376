"""The vmdk driver against qemu-img and qemu-io: reads, writes, map, create and hostile images."""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagecore.driver import BlockDriver, ImageOpener, get_format
from imagecore.errors import (
    BlockError,
    CorruptImageError,
    ImageFormatError,
    NotFoundError,
    PermissionDeniedError,
    ReadOnlyError,
    UnsupportedError,
)
from imagecore.formats.vmdk.create import create_vmdk
from imagecore.formats.vmdk.driver import VmdkDriver
from imagecore.formats.vmdk.spec import probe
from tests.peers import peer, run

MiB = 1 << 20
GRAIN = 64 * 1024


def qemu_img(*args: str | os.PathLike[str], check: bool = True) -> Any:
    return run(peer("qemu-img"), *args, check=check)


def qemu_io(path: Path, *cmds: str, fmt: str = "vmdk") -> None:
    args: list[str] = []
    for c in cmds:
        args += ["-c", c]
    run(peer("qemu-io"), "-f", fmt, *args, str(path))


async def open_rw(path: Path, *, read_only: bool = False) -> VmdkDriver:
    drv = await ImageOpener().open(str(path), "vmdk", read_only=read_only)
    assert isinstance(drv, VmdkDriver)
    return drv


async def read(drv: BlockDriver, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await drv.readinto(offset, memoryview(buf))
    return bytes(buf)


def to_raw(path: Path, out: Path) -> bytes:
    qemu_img("convert", "-f", "vmdk", "-O", "raw", path, out)
    return out.read_bytes()


async def our_map(drv: BlockDriver) -> list[dict[str, Any]]:
    out = []
    async for e in drv.extents(0, drv.size):
        d: dict[str, Any] = {"start": e.start, "length": e.length, "depth": e.depth, "present": e.present,
                             "zero": e.zero, "data": e.data}
        if e.offset is not None:
            d["offset"] = e.offset
        out.append(d)
    return out


def qemu_map(path: Path) -> list[dict[str, Any]]:
    return list(json.loads(qemu_img("map", "--output=json", "-f", "vmdk", path).stdout))


def check_ok(path: Path) -> None:
    proc = qemu_img("check", "-f", "vmdk", path, check=False)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def assert_tables_mirrored(path: Path) -> int:
    """Every grain table equals its redundant copy; returns the number of allocated grains."""
    raw = path.read_bytes()
    capacity, grain = struct.unpack_from("<QQ", raw, 12)
    gtes = struct.unpack_from("<I", raw, 44)[0]
    rgd_offset, gd_offset = struct.unpack_from("<QQ", raw, 48)
    count = -(-capacity // (grain * gtes))
    gd = struct.unpack_from(f"<{count}I", raw, gd_offset * 512)
    rgd = struct.unpack_from(f"<{count}I", raw, rgd_offset * 512)
    allocated = 0
    for a, b in zip(gd, rgd, strict=True):
        assert (a == b == 0) or (a != 0 and b != 0 and a != b)
        if a:
            gt = raw[a * 512:a * 512 + gtes * 4]
            assert gt == raw[b * 512:b * 512 + gtes * 4]
            allocated += sum(1 for (e,) in struct.iter_unpack("<I", gt) if e > 1)
    return allocated


PATTERNS = (
    "write -P 0xaa 0 100k",
    "write -P 0x55 60k 8k",          # across a grain boundary, over allocated data
    "write -P 0x11 1000000 12345",   # unaligned
    "write -P 0x22 3M 64k",
    "write -z 3M 4k",
)


# -- reads of qemu-made images ------------------------------------------------------------------------

@pytest.mark.parametrize("opts", ["subformat=monolithicSparse", "subformat=monolithicFlat",
                                  "subformat=monolithicSparse,zeroed_grain=on"])
async def test_read_matches_qemu(work: Path, opts: str) -> None:
    img = work / "disk.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", opts, img, "5M")
    qemu_io(img, *PATTERNS, "write -z 128k 128k", "write -P 0x33 5177344 65536")
    ref = to_raw(img, work / "ref.raw")
    drv = await open_rw(img, read_only=True)
    try:
        assert drv.size == 5 * MiB
        assert await read(drv, 0, drv.size) == ref
        # small unaligned reads across grain boundaries
        for off, n in ((65535, 2), (1000000, 12345), (5 * MiB - 7, 7), (0, 1)):
            assert await read(drv, off, n) == ref[off:off + n]
        assert await our_map(drv) == qemu_map(img)
    finally:
        await drv.close()


async def test_read_two_gb_split(work: Path) -> None:
    img = work / "split.vmdk"
    size = 2 * 1024 * MiB + 4 * MiB
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", img, str(size))
    assert (work / "split-s001.vmdk").exists() and (work / "split-s002.vmdk").exists()
    edge = 2 * 1024 * MiB
    qemu_io(img, "write -P 0x44 0 64k", f"write -P 0x66 {edge - 100000} 300000",
            f"write -P 0x77 {size - 512} 512")
    ref = work / "ref.raw"
    qemu_img("convert", "-f", "vmdk", "-O", "raw", img, ref)
    drv = await open_rw(img, read_only=True)
    try:
        assert drv.size == size
        with ref.open("rb") as f:
            for off, n in ((0, 4 * MiB), (edge - 4 * MiB, 8 * MiB - 4096), (size - MiB, MiB)):
                f.seek(off)
                assert await read(drv, off, n) == f.read(n), off
        assert await our_map(drv) == qemu_map(img)
        info = drv.format_specific()
        assert info is not None
        assert info["data"]["create-type"] == "twoGbMaxExtentSparse"
        assert [e["format"] for e in info["data"]["extents"]] == ["SPARSE", "SPARSE"]
    finally:
        await drv.close()


async def test_read_stream_optimized(work: Path) -> None:
    src = work / "src.raw"
    data = bytearray(3 * MiB)
    rnd = random.Random(7)
    data[0:200000] = rnd.randbytes(200000)
    data[MiB:MiB + 70000] = b"vmdk" * 17500
    data[3 * MiB - 100:] = b"\x01" * 100
    src.write_bytes(data)
    img = work / "stream.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, img)
    drv = await open_rw(img, read_only=True)
    try:
        assert await read(drv, 0, drv.size) == bytes(data)
        assert await read(drv, 65530, 20) == bytes(data[65530:65550])
        ours = await our_map(drv)
        assert ours == qemu_map(img)
        info = drv.format_specific()
        assert info is not None and info["data"]["create-type"] == "streamOptimized"
        assert info["data"]["extents"][0]["compressed"] is True
    finally:
        await drv.close()
    drv = await open_rw(img)
    try:
        assert not drv.caps.writable
        with pytest.raises(UnsupportedError, match="streamOptimized"):
            await drv.write(0, memoryview(b"x" * 512))
    finally:
        await drv.close()


def _vmware_stream(path: Path, data: bytes, grain_sectors: int = 128) -> None:
    """A stream-optimized file laid out as VMware writes it: markers, GTs after grains, GD and a footer."""
    sector = 512
    gb = grain_sectors * sector
    capacity = len(data) // sector
    grains = -(-capacity // grain_sectors)
    gts = -(-grains // 512)
    desc = (f'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
            f'createType="streamOptimized"\n\nRW {capacity} SPARSE "x.vmdk"\n').encode()

    def header(gd_offset: int) -> bytes:
        h = struct.pack("<4sIIQQQQIQQQB4sH", b"KDMV", 3, 1 | (1 << 16) | (1 << 17), capacity, grain_sectors,
                        1, 20, 512, 0, gd_offset, 128, 0, b"\n \r\n", 1)
        return h + bytes(sector - len(h))

    out = bytearray(header(0xFFFFFFFFFFFFFFFF))
    out += desc + bytes(20 * sector - len(desc))
    out += bytes(128 * sector - len(out))
    gtes = [0] * (gts * 512)
    for g in range(grains):
        chunk = data[g * gb:(g + 1) * gb]
        if not any(chunk):
            continue
        comp = zlib.compress(chunk)
        gtes[g] = len(out) // sector
        rec = struct.pack("<QI", g * grain_sectors, len(comp)) + comp
        out += rec + bytes(-len(rec) % sector)
    gd = []
    for t in range(gts):
        out += struct.pack("<QII", 4, 0, 1) + bytes(sector - 16)   # GT marker
        gd.append(len(out) // sector)
        out += struct.pack("<512I", *gtes[t * 512:(t + 1) * 512])
    out += struct.pack("<QII", 1, 0, 2) + bytes(sector - 16)       # GD marker
    gd_offset = len(out) // sector
    raw_gd = struct.pack(f"<{gts}I", *gd)
    out += raw_gd + bytes(-len(raw_gd) % sector)
    out += struct.pack("<QII", 1, 0, 3) + bytes(sector - 16)       # footer marker
    out += header(gd_offset)
    out += bytes(sector)                                           # end-of-stream marker
    path.write_bytes(bytes(out))


async def test_read_vmware_stream_with_footer(work: Path) -> None:
    data = bytearray(2 * MiB)
    data[4096:70000] = random.Random(3).randbytes(70000 - 4096)
    data[MiB + 5:MiB + 9] = b"abcd"
    img = work / "vmware.vmdk"
    _vmware_stream(img, bytes(data))
    assert to_raw(img, work / "ref.raw") == bytes(data)  # qemu agrees with the fixture
    drv = await open_rw(img, read_only=True)
    try:
        assert drv.size == len(data)
        assert await read(drv, 0, drv.size) == bytes(data)
    finally:
        await drv.close()


async def test_backing_chain_read_and_map(work: Path) -> None:
    base = work / "base.vmdk"
    top = work / "top.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", base, "4M")
    qemu_io(base, "write -P 0x01 0 1M", "write -P 0x02 2M 64k")
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", top)
    qemu_io(top, "write -P 0x03 512k 4k")
    ref = to_raw(top, work / "ref.raw")
    drv = await open_rw(top, read_only=True)
    try:
        assert drv.backing is not None and drv.backing_filename() == "base.vmdk"
        assert drv.backing_format() == "vmdk"
        assert await read(drv, 0, drv.size) == ref
        assert await our_map(drv) == qemu_map(top)
        info = drv.format_specific()
        base_info = drv.backing.format_specific()
        assert info is not None and base_info is not None
        assert info["data"]["parent-cid"] == base_info["data"]["cid"]
    finally:
        await drv.close()


# -- writes, checked by qemu -------------------------------------------------------------------------

def _ops(size: int, seed: int) -> list[tuple[str, int, int, int]]:
    rnd = random.Random(seed)
    ops: list[tuple[str, int, int, int]] = [
        ("w", 0, 100 * 1024, 0xA1),
        ("w", 60 * 1024, 8 * 1024, 0xA2),        # overlaps the previous write and a grain boundary
        ("w", 1000001, 12345, 0xA3),             # unaligned
        ("z", 64 * 1024, 64 * 1024, 0),          # whole grain
        ("z", 1000100, 100, 0),                  # partial grain
        ("w", size - 3000, 3000, 0xA4),          # the tail
    ]
    for _ in range(20):
        off = rnd.randrange(0, size - 1)
        n = rnd.randrange(1, min(200 * 1024, size - off) + 1)
        ops.append((rnd.choice("wwz"), off, n, rnd.randrange(256)))
    return ops


async def _apply(drv: BlockDriver, model: bytearray, ops: list[tuple[str, int, int, int]]) -> None:
    for kind, off, n, pat in ops:
        if kind == "w":
            data = bytes([pat]) * n
            await drv.write(off, memoryview(data))
            model[off:off + n] = data
        else:
            await drv.write_zeroes(off, n, may_trim=False, fast=False)
            model[off:off + n] = bytes(n)


@pytest.mark.parametrize("opts", ["subformat=monolithicSparse", "subformat=monolithicFlat",
                                  "subformat=monolithicSparse,zeroed_grain=on",
                                  "subformat=twoGbMaxExtentFlat"])
async def test_writes_read_back_by_qemu(work: Path, opts: str) -> None:
    img = work / "w.vmdk"
    size = 4 * MiB + 512
    qemu_img("create", "-q", "-f", "vmdk", "-o", opts, img, str(size))
    qemu_io(img, "write -P 0x5a 2M 256k")
    model = bytearray(to_raw(img, work / "before.raw"))
    drv = await open_rw(img)
    cid_before = drv.cid
    try:
        assert drv.caps.writable
        await _apply(drv, model, _ops(size, 1))
        assert await read(drv, 0, size) == bytes(model)
        await drv.flush()
        assert drv.cid != cid_before
    finally:
        await drv.close()
    ref = work / "ref.raw"
    ref.write_bytes(model)
    assert qemu_img("compare", "-f", "vmdk", "-F", "raw", img, ref, check=False).returncode == 0
    check_ok(img)
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["format-specific"]["data"]["cid"] != cid_before


async def test_concurrent_writes_to_one_grain(work: Path) -> None:
    img = work / "c.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", img, "1M")
    drv = await open_rw(img)
    model = bytearray(MiB)
    try:
        # 16 writers into the same unallocated grain, plus overlapping identical writes into another
        jobs = []
        for i in range(16):
            data = bytes([i + 1]) * 4096
            model[i * 4096:(i + 1) * 4096] = data
            jobs.append(drv.write(i * 4096, memoryview(data)))
        same = b"\xee" * 10000
        model[200000:210000] = same
        jobs += [drv.write(200000, memoryview(same)) for _ in range(8)]
        await asyncio.gather(*jobs)
        assert await read(drv, 0, MiB) == bytes(model)
        mapped = [e for e in await our_map(drv) if e["data"]]
        # exactly one grain each: grain 0 and grain 3 (which holds 200000..210000)
        assert sum(e["length"] for e in mapped) == 2 * GRAIN
    finally:
        await drv.close()
    assert assert_tables_mirrored(img) == 2
    ref = work / "ref.raw"
    ref.write_bytes(model)
    assert qemu_img("compare", "-f", "vmdk", "-F", "raw", img, ref, check=False).returncode == 0
    check_ok(img)


async def test_write_over_backing_copies_the_rest_of_the_grain(work: Path) -> None:
    base = work / "base.vmdk"
    top = work / "top.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", base, "2M")
    qemu_io(base, "write -P 0x01 0 2M")
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", top)
    drv = await open_rw(top)
    model = bytearray(b"\x01" * (2 * MiB))
    try:
        await drv.write(1000, memoryview(b"\x09" * 3000))
        model[1000:4000] = b"\x09" * 3000
        await drv.write_zeroes(GRAIN, GRAIN, may_trim=False, fast=False)
        model[GRAIN:2 * GRAIN] = bytes(GRAIN)
        assert await read(drv, 0, 2 * MiB) == bytes(model)
    finally:
        await drv.close()
    ref = work / "ref.raw"
    ref.write_bytes(model)
    assert qemu_img("compare", "-f", "vmdk", "-F", "raw", top, ref, check=False).returncode == 0
    check_ok(top)


async def test_grain_table_allocation(work: Path) -> None:
    """A directory entry of 0 (as some writers leave them) gets a new grain table on first write."""
    img = work / "gt.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", img, "64M")
    raw = bytearray(img.read_bytes())
    gd_offset, rgd_offset = struct.unpack_from("<Q", raw, 56)[0], struct.unpack_from("<Q", raw, 48)[0]
    for table in (gd_offset, rgd_offset):
        struct.pack_into("<I", raw, table * 512 + 4, 0)   # second grain table: gone
    img.write_bytes(raw)
    drv = await open_rw(img)
    try:
        await drv.write(33 * MiB + 5, memoryview(b"hello"))
        assert await read(drv, 33 * MiB, 10) == b"\0" * 5 + b"hello"
    finally:
        await drv.close()
    assert assert_tables_mirrored(img) == 1
    out = work / "out.raw"
    qemu_img("convert", "-f", "vmdk", "-O", "raw", img, out)
    with out.open("rb") as f:
        f.seek(33 * MiB)
        assert f.read(10) == b"\0" * 5 + b"hello"
    check_ok(img)


async def test_read_only_refuses_writes(work: Path) -> None:
    img = work / "ro.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", img, "1M")
    drv = await open_rw(img, read_only=True)
    try:
        assert not drv.caps.writable
        with pytest.raises(ReadOnlyError):
            await drv.write(0, memoryview(b"x"))
    finally:
        await drv.close()


# -- create --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    {},
    {"subformat": "monolithicFlat"},
    {"subformat": "twoGbMaxExtentSparse"},
    {"subformat": "twoGbMaxExtentFlat"},
    {"subformat": "streamOptimized"},
    {"zeroed_grain": "on", "adapter_type": "lsilogic", "hwversion": "7"},
    {"compat6": "on", "toolsversion": "1234"},
])
async def test_create_accepted_by_qemu(work: Path, options: dict[str, str]) -> None:
    img = work / "new.vmdk"
    size = 3 * MiB + 1000
    await create_vmdk(str(img), size, dict(options), opener=ImageOpener())
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["virtual-size"] == 3 * MiB + 1024
    subformat = options.get("subformat", "monolithicSparse")
    assert info["format-specific"]["data"]["create-type"] == subformat
    check_ok(img)
    drv = await open_rw(img, read_only=True)
    try:
        assert drv.format_specific() == {**info["format-specific"]}
        assert drv.cluster_size() == info.get("cluster-size")
        text = drv._desc_text
        if options.get("adapter_type") == "lsilogic":
            assert 'ddb.adapterType = "lsilogic"' in text and 'ddb.geometry.heads = "255"' in text
        if "hwversion" in options:
            assert 'ddb.virtualHWVersion = "7"' in text
        if options.get("compat6") == "on":
            assert 'ddb.virtualHWVersion = "6"' in text and 'ddb.toolsVersion = "1234"' in text
    finally:
        await drv.close()
    if subformat != "streamOptimized":
        qemu_io(img, "write -P 0x42 1M 100k", "write -z 0 64k")
        drv = await open_rw(img)
        try:
            assert await read(drv, MiB, 100 * 1024) == b"\x42" * (100 * 1024)
            await drv.write(2 * MiB, memoryview(b"\x43" * 5000))
        finally:
            await drv.close()
        out = to_raw(img, work / "out.raw")
        assert out[2 * MiB:2 * MiB + 5000] == b"\x43" * 5000
        check_ok(img)


async def test_create_with_backing(work: Path) -> None:
    base = work / "base.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", base, "2M")
    qemu_io(base, "write -P 0x61 0 2M")
    top = work / "top.vmdk"
    await create_vmdk(str(top), 2 * MiB, {"backing_file": "base.vmdk", "backing_fmt": "vmdk"},
                      opener=ImageOpener())
    info = json.loads(qemu_img("info", "--output=json", top).stdout)
    assert info["backing-filename"] == "base.vmdk"
    base_info = json.loads(qemu_img("info", "--output=json", base).stdout)
    assert info["format-specific"]["data"]["parent-cid"] == base_info["format-specific"]["data"]["cid"]
    assert to_raw(top, work / "out.raw") == b"\x61" * (2 * MiB)
    check_ok(top)


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"subformat": "monolithicFlat", "zeroed_grain": "on"}, UnsupportedError, "zeroed grain"),
    ({"subformat": "monolithicFlat", "backing_file": "x.vmdk"}, UnsupportedError, "backing file"),
    ({"compat6": "on", "hwversion": "7"}, BlockError, "compat6 cannot be enabled"),
    ({"subformat": "bogus"}, BlockError, "invalid parameter value: bogus"),
    ({"adapter_type": "scsi"}, BlockError, "invalid parameter value: scsi"),
    ({"backing_file": "x", "backing_fmt": "raw"}, BlockError, "must be a vmdk image"),
])
async def test_create_bad_options(work: Path, options: dict[str, str], error: type[BlockError],
                                  message: str) -> None:
    with pytest.raises(error, match=message):
        await create_vmdk(str(work / "bad.vmdk"), MiB, options, opener=ImageOpener())


def test_registered_and_probe() -> None:
    spec = get_format("vmdk")
    assert spec.create is not None and spec.create.__name__ == create_vmdk.__name__
    names = [o.name for o in spec.create_options]
    assert names == ["size", "adapter_type", "backing_file", "backing_fmt", "compat6", "hwversion",
                     "toolsversion", "subformat", "zeroed_grain"]
    assert probe(b"KDMV" + bytes(508), "x") == 100
    assert probe(b"# Disk DescriptorFile\nversion=1\nCID=1\n", "x") == 100
    assert probe(b"version=4\n", "x") == 0
    assert probe(b"QFI\xfb", "x") == 0


# -- hostile images --------------------------------------------------------------------------------------

def _sparse(work: Path, name: str = "h.vmdk") -> tuple[Path, bytearray]:
    img = work / name
    qemu_img("create", "-q", "-f", "vmdk", img, "1M")
    return img, bytearray(img.read_bytes())


@pytest.mark.parametrize(("field", "fmt", "value", "message"), [
    (0, "4s", b"KDMX", "not a valid|descriptor"),
    (4, "I", 9, "Unsupported VMDK version 9"),
    (20, "Q", 1 << 40, "Invalid granularity"),
    (20, "Q", 0, "L1 entry size is invalid"),
    (44, "I", 100000, "L2 table size too big"),
    (56, "Q", 1 << 40, "beyond the end of the file"),
    (48, "Q", 1 << 40, "beyond the end of the file"),
    (64, "Q", 1 << 40, "File truncated"),
    (12, "Q", 1 << 45, "L1 size too big"),  # qemu's bound comes first (iotest 059, afl9)
    (12, "Q", 1 << 41, "capacity"),
    (77, "H", 7, "compression algorithm"),
])
async def test_hostile_headers(work: Path, field: int, fmt: str, value: object, message: str) -> None:
    img, raw = _sparse(work)
    struct.pack_into("<" + fmt, raw, field, value)
    img.write_bytes(raw)
    with pytest.raises(BlockError, match=message) as info:
        await open_rw(img, read_only=True)
    assert isinstance(info.value, ImageFormatError | UnsupportedError)
    assert "\n" not in str(info.value)


async def test_hostile_grain_table_and_compressed_grain(work: Path) -> None:
    img, raw = _sparse(work)
    gd_offset = struct.unpack_from("<Q", raw, 56)[0]
    struct.pack_into("<I", raw, gd_offset * 512, 0x7FFFFFF0)   # grain table far past EOF
    img.write_bytes(raw)
    drv = await open_rw(img, read_only=True)
    try:
        with pytest.raises(CorruptImageError, match="beyond the end"):
            await read(drv, 0, 4096)
    finally:
        await drv.close()

    src = work / "s.raw"
    src.write_bytes(b"\x07" * MiB)
    stream = work / "s.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, stream)
    raw = bytearray(stream.read_bytes())
    overhead = struct.unpack_from("<Q", raw, 64)[0]
    struct.pack_into("<I", raw, overhead * 512 + 8, 1 << 30)      # absurd compressed size
    stream.write_bytes(raw)
    drv = await open_rw(stream, read_only=True)
    try:
        with pytest.raises(CorruptImageError, match="invalid size"):
            await read(drv, 0, 4096)
    finally:
        await drv.close()
    struct.pack_into("<I", raw, overhead * 512 + 8, 100)
    raw[overhead * 512 + 12:overhead * 512 + 112] = b"\xff" * 100   # not a zlib stream
    stream.write_bytes(raw)
    drv = await open_rw(stream, read_only=True)
    try:
        with pytest.raises(CorruptImageError, match="corrupt"):
            await read(drv, 0, 4096)
    finally:
        await drv.close()


@pytest.mark.parametrize(("text", "error", "message"), [
    (b"hello world\n" * 3, ImageFormatError, "^invalid VMDK image descriptor$"),
    (b'# Disk DescriptorFile\nversion=1\nCID=zz\ncreateType="monolithicFlat"\n', ImageFormatError,
     "not hexadecimal"),
    (b'version=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\n', ImageFormatError, "no extents"),
    (b'version=1\nCID=1\ncreateType="fancy"\nRW 8 FLAT "x" 0\n', UnsupportedError, "Unsupported image type"),
    (b'version=1\nCID=1\ncreateType="monolithicFlat"\nRW 8 FLAT "x"\n', ImageFormatError,
     "Invalid extent line"),
    (b'version=1\nCID=1\ncreateType="monolithicFlat"\nRW 8 WEIRD "x" 0\n', ImageFormatError,
     "^Invalid extent line: RW 8 WEIRD \"x\" 0$"),
    (b'version=1\nCID=1\ncreateType="monolithicFlat"\nRW 8 WEIRD "x"\n', ImageFormatError,
     "Unsupported extent type"),
    (b'version=1\nCID=1\ncreateType="monolithicFlat"\nRW 8 FLAT "missing-flat.vmdk" 0\n', NotFoundError,
     "missing-flat"),
    (b'version=1\nCID=1\ncreateType="monolithicFlat"\n' + b'RW 8 ZERO\n' * 5000, ImageFormatError,
     "more than 4096 extents"),
    (b"\x00\x01\x02garbage", ImageFormatError, "^invalid VMDK image descriptor$"),
    (b"x", ImageFormatError, "too small"),
])
async def test_hostile_descriptors(work: Path, text: bytes, error: type[BlockError], message: str) -> None:
    img = work / "d.vmdk"
    img.write_bytes(text)
    with pytest.raises(error, match=message) as info:
        await open_rw(img, read_only=True)
    assert "\n" not in str(info.value)


async def test_huge_descriptor_is_bounded(work: Path) -> None:
    img = work / "big.vmdk"
    with img.open("wb") as f:
        f.write(b"# " + b"x" * (4 * MiB) + b"\n")
    with pytest.raises(ImageFormatError):
        await open_rw(img, read_only=True)


async def test_extent_names_go_through_the_opener(work: Path) -> None:
    """A pool confines extent files by overriding resolve; the driver must not bypass it."""
    (work / "inside-flat.vmdk").write_bytes(bytes(4096))
    img = work / "d.vmdk"
    img.write_bytes(b'version=1\nCID=1\ncreateType="monolithicFlat"\nRW 8 FLAT "/etc/passwd" 0\n')

    class Confined(ImageOpener):
        def resolve(self, name: str, relative_to: str | None) -> str:
            path = super().resolve(name, relative_to)
            if not os.path.realpath(path).startswith(str(work) + os.sep):
                raise PermissionDeniedError(f"'{name}' is outside the pool")
            return path

    with pytest.raises(PermissionDeniedError, match="outside the pool"):
        await Confined().open(str(img), "vmdk", read_only=True)
    img.write_bytes(b'version=1\nCID=1\ncreateType="monolithicFlat"\nRW 8 FLAT "inside-flat.vmdk" 0\n')
    drv = await Confined().open(str(img), "vmdk", read_only=True)
    try:
        assert drv.size == 4096
    finally:
        await drv.close()


async def test_write_across_split_extents(work: Path) -> None:
    img = work / "split.vmdk"
    size = 2 * 1024 * MiB + 2 * MiB
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", img, str(size))
    edge = 2 * 1024 * MiB
    data = random.Random(5).randbytes(300000)
    drv = await open_rw(img)
    try:
        await drv.write(edge - 100000, memoryview(data))
        await drv.write_zeroes(edge - 50000, 1000, may_trim=False, fast=False)
        expect = bytearray(data)
        expect[50000:51000] = bytes(1000)
        assert await read(drv, edge - 100000, 300000) == bytes(expect)
    finally:
        await drv.close()
    out = work / "all.raw"
    qemu_img("convert", "-f", "vmdk", "-O", "raw", img, out)
    with out.open("rb") as f:
        f.seek(edge - 100000)
        assert f.read(300000) == bytes(expect)
    check_ok(img)
    assert json.loads(qemu_img("check", "--output=json", img).stdout)["check-errors"] == 0


async def test_check_agrees_with_qemu(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from imagecore.driver import OpenContext
    from imagecore.formats.vmdk.driver import check_vmdk
    from imagecore.hostio import HostFile

    img, raw = _sparse(work)
    qemu_io(img, "write -P 1 0 128k")
    hf = HostFile.open(str(img), read_only=True)
    result = await check_vmdk(hf, OpenContext(opener=ImageOpener(), read_only=True, path=str(img)), None)
    assert result.corruptions == 0 and result.check_errors == 0
    raw = bytearray(img.read_bytes())
    gd_offset = struct.unpack_from("<Q", raw, 56)[0]
    gt = struct.unpack_from("<I", raw, gd_offset * 512)[0]
    struct.pack_into("<I", raw, gt * 512 + 4 * 5, 0x100000)   # grain 5 points past EOF
    img.write_bytes(raw)
    assert qemu_img("check", img, check=False).returncode == 1
    hf = HostFile.open(str(img), read_only=True)
    with pytest.raises(BlockError, match="Invalid argument"):
        await check_vmdk(hf, OpenContext(opener=ImageOpener(), read_only=True, path=str(img)), None)
    assert "ERROR: cluster offset for sector 640 points after EOF" in capsys.readouterr().err


async def test_hand_written_descriptor_with_offsets(work: Path) -> None:
    """FLAT extents at an offset and VMFS extents, read and written, as qemu sees them.

    (No blank line right before an extent line: qemu's sscanf then reads the next line twice.)
    """
    rnd = random.Random(11)
    (work / "a.bin").write_bytes(rnd.randbytes(8 * 512 + MiB))
    (work / "b.bin").write_bytes(rnd.randbytes(MiB))
    img = work / "hand.vmdk"
    img.write_bytes(b'# Disk DescriptorFile\r\nversion=1\r\nCID=0000abcd\r\nparentCID=ffffffff\r\n'
                    b'createType="vmfs"\r\n# Extent description\r\nRW 2048 FLAT "a.bin" 8\r\n'
                    b'RW 2048 VMFS "b.bin"\r\n'
                    b'ddb.adapterType = "lsilogic"\r\n')
    ref = to_raw(img, work / "ref.raw")
    assert len(ref) == 2 * MiB
    drv = await open_rw(img)
    try:
        assert drv.size == 2 * MiB and drv.cluster_size() is None
        assert await read(drv, 0, drv.size) == ref
        assert drv.readinto_nowait(MiB - 10, memoryview(bytearray(20))) is False  # crosses extents
        buf = bytearray(4096)
        if drv.readinto_nowait(MiB + 4096, memoryview(buf)):
            assert bytes(buf) == ref[MiB + 4096:MiB + 8192]
        await drv.write(MiB - 100, memoryview(b"\x99" * 200))
    finally:
        await drv.close()
    assert (work / "a.bin").read_bytes()[8 * 512 + MiB - 100:] == b"\x99" * 100
    assert (work / "b.bin").read_bytes()[:100] == b"\x99" * 100
    assert "CID=0000abcd" not in img.read_text()   # a new CID for the changed image
    out = to_raw(img, work / "out.raw")
    assert out[MiB - 100:MiB + 100] == b"\x99" * 200


async def test_zero_and_read_only_extents(work: Path) -> None:
    (work / "ro.bin").write_bytes(b"\x05" * 4096)
    img = work / "mixed.vmdk"
    img.write_bytes(b'version=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
                    b'RW 8 ZERO\nRDONLY 8 FLAT "ro.bin" 0\n')
    drv = await open_rw(img)
    try:
        assert drv.size == 8192 and not drv.caps.writable
        assert await read(drv, 0, 8192) == bytes(4096) + b"\x05" * 4096
        assert [(e.start, e.length, e.data, e.zero) for e in [x async for x in drv.extents(0, 8192)]] == [
            (0, 4096, False, True), (4096, 4096, True, False)]
        with pytest.raises(UnsupportedError):
            await drv.write(0, memoryview(b"x"))
        with pytest.raises(ReadOnlyError):
            await drv.write(4096, memoryview(b"x"))
    finally:
        await drv.close()


async def test_nowait_reads_hit_the_page_cache(work: Path) -> None:
    img = work / "n.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", img, "1M")
    qemu_io(img, "write -P 0x3c 0 128k")
    drv = await open_rw(img, read_only=True)
    try:
        assert await read(drv, 0, 4096) == b"\x3c" * 4096      # loads the grain table
        buf = bytearray(4096)
        ok = drv.readinto_nowait(8192, memoryview(buf))
        assert ok is False or bytes(buf) == b"\x3c" * 4096
        assert drv.readinto_nowait(GRAIN - 100, memoryview(bytearray(200))) is False   # spans grains
    finally:
        await drv.close()


async def test_fifo_extent_is_refused(work: Path) -> None:
    os.mkfifo(work / "pipe")
    img = work / "f.vmdk"
    img.write_bytes(b'version=1\nCID=1\ncreateType="monolithicFlat"\nRW 8 FLAT "pipe" 0\n')
    with pytest.raises(ImageFormatError, match="not a regular file"):
        await asyncio.wait_for(open_rw(img, read_only=True), 10)


def test_concurrent_writes_under_uvloop(work: Path) -> None:
    """The allocation registry under uvloop: many writers over few grains, overlapping ranges disjoint."""
    import uvloop

    img = work / "u.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", img, "2M")
    model = bytearray(2 * MiB)
    rnd = random.Random(9)
    writes = []
    for i in range(64):
        off = i * 30000 + rnd.randrange(100)
        n = rnd.randrange(1, 29000)
        data = bytes([i % 250 + 1]) * n
        model[off:off + n] = data
        writes.append((off, data))

    async def go() -> bytes:
        drv = await open_rw(img)
        try:
            await asyncio.gather(*(drv.write(off, memoryview(d)) for off, d in writes))
            return await read(drv, 0, 2 * MiB)
        finally:
            await drv.close()

    assert uvloop.run(go()) == bytes(model)
    ref = work / "ref.raw"
    ref.write_bytes(model)
    assert qemu_img("compare", "-f", "vmdk", "-F", "raw", img, ref, check=False).returncode == 0
    check_ok(img)


_SIZE = 2 * MiB + 512
_op = st.tuples(st.sampled_from("wwz"), st.integers(0, _SIZE - 1), st.integers(1, 150_000),
                st.integers(0, 255))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, min_size=1, max_size=10), zeroed=st.booleans(), backing=st.booleans())
def test_random_operations_match_a_model(tmp_path_factory: pytest.TempPathFactory,
                                         ops: list[tuple[str, int, int, int]], zeroed: bool,
                                         backing: bool) -> None:
    work = tmp_path_factory.mktemp("prop")
    img = work / "p.vmdk"
    model = bytearray(_SIZE)
    if backing:
        base = work / "base.vmdk"
        qemu_img("create", "-q", "-f", "vmdk", base, str(_SIZE))
        qemu_io(base, "write -P 0x7e 0 1M")
        model[:MiB] = b"\x7e" * MiB
        qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", img)
    else:
        qemu_img("create", "-q", "-f", "vmdk", "-o", f"zeroed_grain={'on' if zeroed else 'off'}", img,
                 str(_SIZE))
    clipped = [(k, off, min(n, _SIZE - off), pat) for k, off, n, pat in ops]

    async def go() -> bytes:
        drv = await open_rw(img)
        try:
            await _apply(drv, model, clipped)
            return await read(drv, 0, _SIZE)
        finally:
            await drv.close()

    assert asyncio.run(go()) == bytes(model)
    ref = work / "ref.raw"
    ref.write_bytes(model)
    assert qemu_img("compare", "-f", "vmdk", "-F", "raw", img, ref, check=False).returncode == 0
    check_ok(img)


async def test_grain_directory_memory_is_bounded_per_image(work: Path) -> None:
    """The same huge-directory extent listed twice must not double the memory it may take."""
    big = work / "big-s001.vmdk"
    entries = 9 * 1024 * 1024          # 36 MiB of directory, legal once, too much twice
    header = struct.pack("<4sIIQQQQIQQQB4sH", b"KDMV", 1, 1, entries, 1, 0, 0, 1, 0, 1, 0, 0,
                         b"\n \r\n", 0)
    with big.open("wb") as f:
        f.write(header + bytes(512 - len(header)))
        f.truncate(512 + entries * 4)
    img = work / "twice.vmdk"
    img.write_bytes(b'version=1\nCID=1\ncreateType="twoGbMaxExtentSparse"\n'
                    + f'RW {entries} SPARSE "big-s001.vmdk"\n'.encode() * 2)
    with pytest.raises(ImageFormatError, match="too big in total"):
        await open_rw(img, read_only=True)
    img.write_bytes(b'version=1\nCID=1\ncreateType="twoGbMaxExtentSparse"\n'
                    + f'RW {entries} SPARSE "big-s001.vmdk"\n'.encode())
    drv = await open_rw(img, read_only=True)
    try:
        assert drv.size == entries * 512
        assert await read(drv, 12345, 100) == bytes(100)
    finally:
        await drv.close()


async def test_stream_optimized_appends_like_convert(work: Path) -> None:
    """Sequential writes (data and zero runs inside grains) into a new streamOptimized image."""
    img = work / "so.vmdk"
    size = 2 * MiB + 4096
    await create_vmdk(str(img), size, {"subformat": "streamOptimized"}, opener=ImageOpener())
    rnd = random.Random(21)
    model = bytearray(size)
    drv = await open_rw(img)
    try:
        assert not drv.caps.writable      # never exported read-write
        pos = 0
        while pos < size:
            n = min(size - pos, rnd.choice((4096, 12288, 65536, 200704)))
            if rnd.random() < 0.3:
                await drv.write_zeroes(pos, n, may_trim=True, fast=False)
            else:
                data = rnd.randbytes(n)
                await drv.write(pos, memoryview(data))
                model[pos:pos + n] = data
            # what is written reads back at once, even while its grain is still being assembled
            assert await read(drv, pos, n) == bytes(model[pos:pos + n])
            pos += n
        with pytest.raises(UnsupportedError, match="allocated cluster"):
            await drv.write(0, memoryview(b"\0" * 512))
        with pytest.raises(UnsupportedError, match="sector-aligned"):
            await drv.write(size - 4096 + 1, memoryview(b"x"))
    finally:
        await drv.close()
    ref = work / "ref.raw"
    ref.write_bytes(model)
    assert qemu_img("compare", "-f", "vmdk", "-F", "raw", img, ref, check=False).returncode == 0
    check_ok(img)
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["format-specific"]["data"]["extents"][0]["compressed"] is True


async def test_stream_with_footer_refuses_writes(work: Path) -> None:
    img = work / "vmware.vmdk"
    _vmware_stream(img, bytes(MiB))
    drv = await open_rw(img)
    try:
        with pytest.raises(UnsupportedError, match="footer"):
            await drv.write(0, memoryview(b"\1" * 512))
    finally:
        await drv.close()
