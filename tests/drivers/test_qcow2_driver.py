"""The qcow2 driver writing images that qemu-img then checks and compares; safety and feature bits."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagecore.errors import CorruptImageError, ReadOnlyError, UnsupportedError
from imagecore.extent import Extent, amerge_extents, merge_extents
from imagecore.formats import open_image
from imagecore.formats.qcow2 import layout
from imagecore.formats.qcow2.driver import Qcow2Driver
from tests.peers import REPO, peer, run

MiB = 1 << 20


def qimg(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return run(peer("qemu-img"), *args, check=check)


def qio(path: Path, *cmds: str) -> None:
    args: list[str] = []
    for c in cmds:
        args += ["-c", c]
    run(peer("qemu-io"), "-f", "qcow2", *args, path)


def assert_check_clean(path: Path, *, allow_leaks: bool = False) -> None:
    proc = qimg("check", "--output=json", path, check=False)
    ok = (0, 3) if allow_leaks else (0,)
    assert proc.returncode in ok, proc.stdout.decode() + proc.stderr.decode()
    rep = json.loads(proc.stdout)
    assert rep.get("corruptions", 0) == 0 and rep.get("check-errors", 0) == 0
    if not allow_leaks:
        assert rep.get("leaks", 0) == 0


async def open_rw(path: Path) -> Qcow2Driver:
    d = await open_image(str(path), "qcow2", read_only=False)
    assert isinstance(d, Qcow2Driver)
    return d


async def read_all(d: Qcow2Driver) -> bytes:
    buf = bytearray(d.size)
    await d.readinto(0, memoryview(buf))
    return bytes(buf)


def apply_trim(model: bytearray, d: Qcow2Driver, off: int, n: int) -> None:
    """What a trim does to what the guest reads: whole clusters read as zeroes, except on v2 with backing."""
    cs = d.cs
    a = -(-off // cs) * cs
    b = (off + n) // cs * cs
    if off + n == d.size:
        b = -(-(off + n) // cs) * cs
    if b > a and (d.v3 or d.backing is None) and not d.external_data:
        model[a:min(b, d.size)] = bytes(min(b, d.size) - a)


async def run_pattern(d: Qcow2Driver, model: bytearray) -> None:
    cs, size = d.cs, d.size
    ops: list[tuple[str, int, int, int]] = [
        ("w", 0, 3 * cs, 0x11),
        ("w", cs // 2, cs, 0x22),
        ("z", 4 * cs, 2 * cs, 1),
        ("w", 8 * cs + 100, 5000, 0x33),
        ("t", cs, cs, 0),
        ("w", size - 3 * cs, 3 * cs, 0x44),
        ("z", size - 2 * cs, cs, 0),
        ("w", size // 2, 3 * cs + 7, 0x55),
        ("z", size // 2 + 100, cs + 50, 1),
        ("t", size // 2 - 10, 2 * cs + 20, 0),
        ("w", 5 * cs - 10, 20, 0x66),
        ("f", 0, 0, 0),
        ("w", 1, cs - 2, 0x77),
        ("z", 0, 2 * cs, 0),
        ("t", 6 * cs, 3 * cs, 0),
        ("w", 7 * cs, 4096, 0x78),
    ]
    for op, off, n, arg in ops:
        if op == "w":
            data = bytes([arg]) * n
            await d.write(off, memoryview(data))
            model[off:off + n] = data
        elif op == "z":
            await d.write_zeroes(off, n, may_trim=bool(arg), fast=False)
            model[off:off + n] = bytes(n)
        elif op == "t":
            await d.trim(off, n)
            apply_trim(model, d, off, n)
        else:
            await d.flush()


@pytest.mark.parametrize("backing", [False, True], ids=["plain", "backed"])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cs", [512, 4096, 65536, 2 * MiB])
async def test_written_image_checks_clean_and_compares(tmp_path: Path, compat: str, cs: int,
                                                       backing: bool) -> None:
    size = max(4 * MiB, 16 * cs)
    img = tmp_path / "w.qcow2"
    opts = f"compat={compat},cluster_size={cs}"
    if backing:
        base = tmp_path / "base.qcow2"
        qimg("create", "-q", "-f", "qcow2", base, str(size - cs // 2 - 512))  # shorter than the image
        qio(base, f"write -P 0xa5 0 {size - cs // 2 - 512}")
        qimg("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", "-o", opts, img, str(size))
    else:
        qimg("create", "-q", "-f", "qcow2", "-o", opts, img, str(size))
    ref = tmp_path / "ref.raw"
    qimg("convert", "-O", "raw", img, ref)
    model = bytearray(ref.read_bytes())
    d = await open_rw(img)
    try:
        await run_pattern(d, model)
        got = await read_all(d)
        assert len(got) == len(model)
        bad = next((i for i in range(0, len(got), 512) if got[i:i + 512] != model[i:i + 512]), None)
        assert bad is None, f"first difference in sector at {bad}"

    finally:
        await d.close()
    ref.write_bytes(model)
    assert_check_clean(img)
    qimg("compare", "-q", "-f", "qcow2", "-F", "raw", img, ref)
    await assert_map_equal(img)


async def assert_map_equal(path: Path) -> None:
    out = qimg("map", "--output=json", path).stdout
    theirs = [Extent(m["start"], m["length"], m["data"], m["zero"], m["depth"], m.get("present", True),
                     m.get("offset")) for m in json.loads(out)]
    d = await open_image(str(path), "qcow2")
    try:
        ours = [e async for e in amerge_extents(d.extents(0, d.size))]
    finally:
        await d.close()
    key = [(e.start, e.length, e.depth, e.present, e.zero, e.data, e.offset) for e in merge_extents(ours)]
    want = [(e.start, e.length, e.depth, e.present, e.zero, e.data, e.offset) for e in merge_extents(theirs)]
    assert key == want


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
async def test_refcount_widths(tmp_path: Path, bits: int) -> None:
    img = tmp_path / "r.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", f"refcount_bits={bits},cluster_size=4096", img, "2M")
    qimg("snapshot", "-c", "s1", img) if bits > 1 else None
    model = bytearray(2 * MiB)
    d = await open_rw(img)
    try:
        await run_pattern(d, model)
    finally:
        await d.close()
    assert_check_clean(img)
    ref = tmp_path / "r.raw"
    ref.write_bytes(model)
    qimg("compare", "-q", "-f", "qcow2", "-F", "raw", img, ref)


async def test_refcount_table_grows(tmp_path: Path) -> None:
    img = tmp_path / "g.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", img, "6M")
    before = layout.parse_header_fields(img.read_bytes()[:512])
    data = os.urandom(6 * MiB)
    d = await open_rw(img)
    try:
        for off in range(0, len(data), 192 * 1024):
            await d.write(off, memoryview(data)[off:off + 192 * 1024])
    finally:
        await d.close()
    after = layout.parse_header_fields(img.read_bytes()[:512])
    assert after.refcount_table_offset != before.refcount_table_offset
    assert after.refcount_table_clusters > before.refcount_table_clusters
    assert_check_clean(img)
    ref = tmp_path / "g.raw"
    ref.write_bytes(data)
    qimg("compare", "-q", "-f", "qcow2", "-F", "raw", img, ref)


async def test_racing_allocations_both_land(tmp_path: Path) -> None:
    img = tmp_path / "c.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "8M")
    d = await open_rw(img)
    try:
        # two halves of one unallocated cluster, then many small writes into a few clusters
        await asyncio.gather(d.write(0, memoryview(b"\x01" * 32768)),
                             d.write(32768, memoryview(b"\x02" * 32768)))
        jobs = [d.write(1 * MiB + i * 4096, memoryview(bytes([i + 1]) * 4096)) for i in range(64)]
        await asyncio.gather(*jobs)
        got = bytearray(65536)
        await d.readinto(0, memoryview(got))
        assert got == b"\x01" * 32768 + b"\x02" * 32768
        got = bytearray(64 * 4096)
        await d.readinto(1 * MiB, memoryview(got))
        assert got == b"".join(bytes([i + 1]) * 4096 for i in range(64))
        assert len(d.inflight) == 0
    finally:
        await d.close()
    assert_check_clean(img)


_CHILD = r"""
import asyncio, sys
sys.path.insert(0, sys.argv[2])
from imagecore.formats import open_image
async def main():
    d = await open_image(sys.argv[1], "qcow2", read_only=False)
    i = 0
    while True:
        await d.write(i * 8192 + 100, memoryview(bytes([i % 250 + 1]) * 5000))
        if i % 7 == 3:
            await d.trim((i - 3) * 8192, 4096 * 2)
        if i % 5 == 0:
            await d.flush()
            print(i, flush=True)
        i += 1
asyncio.run(main())
"""


async def test_sigkill_leaves_only_leaks(tmp_path: Path) -> None:
    img = tmp_path / "k.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "64M")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(img), str(REPO)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    last = -1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        last = int(line)
        if last >= 300:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last >= 0, "the writer never flushed"
    assert_check_clean(img, allow_leaks=True)
    d = await open_image(str(img), "qcow2")
    try:
        for i in range(last + 1):
            buf = bytearray(5000)
            await d.readinto(i * 8192 + 100, memoryview(buf))
            if i % 7 == 0:
                if i + 3 <= last:  # trimmed by a flushed request
                    assert buf == bytes(5000), f"flushed trim {i + 3} lost"
                continue
            assert buf == bytes([i % 250 + 1]) * 5000, f"flushed write {i} lost"
    finally:
        await d.close()


async def test_snapshots_are_preserved_by_copy_on_write(tmp_path: Path) -> None:
    img = tmp_path / "s.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "2M")
    qio(img, "write -P 0x41 0 1M")
    qimg("snapshot", "-c", "before", img)
    d = await open_rw(img)
    try:
        await d.write(4096 + 10, memoryview(b"\x42" * 100))
        await d.write_zeroes(8192, 8192, may_trim=True, fast=False)
        await d.trim(65536, 65536)
        await d.write(600 * 1024, memoryview(b"\x43" * 200 * 1024))
        got = bytearray(4096)
        await d.readinto(4096, memoryview(got))
        assert got == b"\x41" * 10 + b"\x42" * 100 + b"\x41" * (4096 - 110)
    finally:
        await d.close()
    assert_check_clean(img)
    snap = tmp_path / "snap.raw"
    qimg("convert", "-O", "raw", "-l", "snapshot.name=before", img, snap)
    assert snap.read_bytes() == b"\x41" * MiB + bytes(MiB)


async def test_lazy_refcounts_dirty_bit(tmp_path: Path) -> None:
    img = tmp_path / "l.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "1M")
    d = await open_rw(img)
    try:
        await d.write(0, memoryview(b"x" * 4096))
        await d.flush()
        hdr = layout.parse_header_fields(img.read_bytes()[:4096])
        assert hdr.incompatible_features & layout.INCOMPAT_DIRTY
        ro = await open_image(str(img), "qcow2")
        try:
            assert ro.is_dirty()
            buf = bytearray(4096)
            await ro.readinto(0, memoryview(buf))
            assert buf == b"x" * 4096
        finally:
            await ro.close()
    finally:
        await d.close()
    hdr = layout.parse_header_fields(img.read_bytes()[:4096])
    assert not hdr.incompatible_features & layout.INCOMPAT_DIRTY
    assert_check_clean(img)


def _patch_u64(path: Path, offset: int, fn: object) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        (v,) = struct.unpack(">Q", f.read(8))
        f.seek(offset)
        f.write(struct.pack(">Q", fn(v)))  # type: ignore[operator]


async def test_corrupt_bit_allows_read_only_only(tmp_path: Path) -> None:
    img = tmp_path / "c.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "1M")
    _patch_u64(img, 72, lambda v: v | layout.INCOMPAT_CORRUPT)
    with pytest.raises(CorruptImageError, match="corrupt"):
        await open_rw(img)
    d = await open_image(str(img), "qcow2")
    try:
        fs = d.format_specific() or {}
        assert fs["data"]["corrupt"] is True
        with pytest.raises((ReadOnlyError, CorruptImageError)):
            await d.write(0, memoryview(b"a"))
    finally:
        await d.close()


async def test_runtime_inconsistency_marks_corrupt(tmp_path: Path) -> None:
    img = tmp_path / "c.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "1M")
    qio(img, "write -P 1 0 64k")
    hdr = layout.parse_header_fields(img.read_bytes()[:512])
    raw = img.read_bytes()
    l2 = struct.unpack(">Q", raw[hdr.l1_table_offset:hdr.l1_table_offset + 8])[0] & layout.L1E_OFFSET_MASK
    _patch_u64(img, l2, lambda v: (v & ~layout.L2E_OFFSET_MASK) | (1 << 40))  # far past the end
    d = await open_rw(img)
    try:
        with pytest.raises(CorruptImageError) as ei:
            await d.readinto(0, memoryview(bytearray(512)))
        assert "\n" not in str(ei.value)
        with pytest.raises(CorruptImageError):
            await d.write(128 * 1024, memoryview(b"b" * 512))
    finally:
        await d.close()
    hdr = layout.parse_header_fields(img.read_bytes()[:512])
    assert hdr.incompatible_features & layout.INCOMPAT_CORRUPT


async def test_autoclear_bits_cleared_and_unknown_extensions_kept(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "1M")
    raw = bytearray(img.read_bytes())
    h = layout.parse_header(bytes(raw[:65536]), len(raw))
    h.extensions.append(layout.Extension(0x1234ABCD, b"keep me"))
    h.autoclear_features |= (1 << 7) | layout.AUTOCLEAR_BITMAPS
    head = layout.encode_header(h)
    with open(img, "r+b") as f:
        f.write(head)
    d = await open_rw(img)
    try:
        await d.write(0, memoryview(b"z" * 1000))
    finally:
        await d.close()
    raw = bytearray(img.read_bytes())
    h2 = layout.parse_header(bytes(raw[:65536]), len(raw))
    assert h2.autoclear_features == 0
    assert h2.extension(0x1234ABCD) == b"keep me"
    assert_check_clean(img)


async def test_fast_zero_and_format_specific(tmp_path: Path) -> None:
    for compat in ("0.10", "1.1"):
        img = tmp_path / f"f{compat}.qcow2"
        qimg("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", img, "1M")
        d = await open_rw(img)
        try:
            with pytest.raises(UnsupportedError):
                await d.write_zeroes(100, 1000, may_trim=True, fast=True)
            await d.write(0, memoryview(b"q" * 131072))
            await d.write_zeroes(0, 65536, may_trim=True, fast=True)
            if compat == "0.10":
                with pytest.raises(UnsupportedError):
                    await d.write_zeroes(65536, 65536, may_trim=False, fast=True)
            buf = bytearray(131072)
            await d.readinto(0, memoryview(buf))
            assert buf == bytes(65536) + b"q" * 65536
            info = json.loads(qimg("info", "-U", "--output=json", img).stdout)
            assert d.format_specific() == info["format-specific"]
            assert d.cluster_size() == info["cluster-size"]
        finally:
            await d.close()
        assert_check_clean(img)


async def test_nowait_read_path(tmp_path: Path) -> None:
    img = tmp_path / "n.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "4M")
    qio(img, "write -P 0x5c 0 256k")
    d = await open_image(str(img), "qcow2")
    try:
        buf = bytearray(4096)
        await d.readinto(8192, memoryview(buf))  # loads the L2 table
        buf2 = bytearray(4096)
        hits = sum(d.readinto_nowait(i * 4096, memoryview(buf2)) for i in range(60))
        assert hits > 0 and buf2 == b"\x5c" * 4096
        assert d.readinto_nowait(3 * MiB, memoryview(buf2)) and buf2 == bytes(4096)
    finally:
        await d.close()


async def test_raw_backing_beyond_its_end_reads_zeroes(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x99" * 10000)
    img = tmp_path / "t.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "raw", "-o", "cluster_size=4096", img, "1M")
    d = await open_rw(img)
    try:
        await d.write(9000, memoryview(b"\x01" * 10))  # COW across the backing file's end
        buf = bytearray(16384)
        await d.readinto(0, memoryview(buf))
        assert buf == b"\x99" * 9000 + b"\x01" * 10 + b"\x99" * 990 + bytes(16384 - 10000)
        assert d.backing_filename() == "base.raw" and d.backing_format() == "raw"
    finally:
        await d.close()
    assert_check_clean(img)


@pytest.mark.parametrize("backing", [False, True], ids=["plain", "backed"])
async def test_extended_l2_writes(tmp_path: Path, backing: bool) -> None:
    img = tmp_path / "x.qcow2"
    size = 4 * MiB
    if backing:
        base = tmp_path / "base.qcow2"
        qimg("create", "-q", "-f", "qcow2", base, str(size))
        qio(base, f"write -P 0x5a 0 {size}")
        qimg("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", "-o",
             "extended_l2=on,cluster_size=32k", img, str(size))
    else:
        qimg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=32k", img, str(size))
    qio(img, "write -P 0x61 1k 1k", "write -z 40k 2k", "write -P 0x62 100k 3k", "discard 128k 32k")
    ref = tmp_path / "ref.raw"
    qimg("convert", "-O", "raw", img, ref)
    model = bytearray(ref.read_bytes())
    d = await open_rw(img)
    try:
        await run_pattern(d, model)
        await d.write(100 * 1024 + 512, memoryview(b"\x63" * 100))  # into a partly allocated cluster
        model[100 * 1024 + 512:100 * 1024 + 612] = b"\x63" * 100
        assert await read_all(d) == bytes(model)
    finally:
        await d.close()
    ref.write_bytes(model)
    assert_check_clean(img)
    qimg("compare", "-q", "-f", "qcow2", "-F", "raw", img, ref)
    await assert_map_equal(img)


@pytest.mark.parametrize("raw_flag", ["on", "off"])
async def test_external_data_file_writes(tmp_path: Path, raw_flag: str) -> None:
    img = tmp_path / "d.qcow2"
    data = tmp_path / "d.data"
    qimg("create", "-q", "-f", "qcow2", "-o", f"data_file={data},data_file_raw={raw_flag}", img, "4M")
    qio(img, "write -P 0x41 0 64k", "write -P 0x42 1M 4k")
    ref = tmp_path / "ref.raw"
    qimg("convert", "-O", "raw", img, ref)
    model = bytearray(ref.read_bytes())
    d = await open_rw(img)
    try:
        await run_pattern(d, model)
        assert await read_all(d) == bytes(model)
        with pytest.raises(UnsupportedError):
            await d.write_zeroes(0, 65536, may_trim=True, fast=True)
    finally:
        await d.close()
    ref.write_bytes(model)
    assert_check_clean(img)
    qimg("compare", "-q", "-f", "qcow2", "-F", "raw", img, ref)
    if raw_flag == "on":
        # the data file alone stays a valid raw image of the guest
        assert data.read_bytes()[:len(model)].ljust(len(model), b"\0") == bytes(model)


@pytest.mark.parametrize("opts", ["compat=0.10", "compat=1.1", "lazy_refcounts=on,extended_l2=on",
                                  "compression_type=zstd,refcount_bits=8", "data_file"])
async def test_format_specific_matches_qemu_img_info(tmp_path: Path, opts: str) -> None:
    img = tmp_path / "i.qcow2"
    if opts == "data_file":
        opts = f"data_file={tmp_path / 'i.data'},data_file_raw=on"
    qimg("create", "-q", "-f", "qcow2", "-o", opts, img, "1M")
    info = json.loads(qimg("info", "--output=json", img).stdout)
    d = await open_image(str(img), "qcow2")
    try:
        fs = d.format_specific()
        assert fs == info["format-specific"]
        assert fs is not None and list(fs["data"]) == list(info["format-specific"]["data"])
        assert d.is_dirty() == info["dirty-flag"]
    finally:
        await d.close()


def test_under_uvloop(tmp_path: Path) -> None:
    import uvloop

    img = tmp_path / "u.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "4M")
    model = bytearray(4 * MiB)

    async def main() -> None:
        d = await open_rw(img)
        try:
            jobs = [d.write(i * 6000, memoryview(bytes([i + 1]) * 5000)) for i in range(200)]
            await asyncio.gather(*jobs)
            for i in range(200):
                model[i * 6000:i * 6000 + 5000] = bytes([i + 1]) * 5000
            await asyncio.gather(d.write_zeroes(100000, 50000, may_trim=True, fast=False),
                                 d.trim(400000, 80000), d.flush())
            model[100000:150000] = bytes(50000)
            apply_trim(model, d, 400000, 80000)
            assert await read_all(d) == bytes(model)
        finally:
            await d.close()

    uvloop.run(main())
    assert_check_clean(img)
    ref = tmp_path / "u.raw"
    ref.write_bytes(model)
    qimg("compare", "-q", "-f", "qcow2", "-F", "raw", img, ref)


async def test_dirty_image_is_repaired_on_read_write_open(tmp_path: Path) -> None:
    img = tmp_path / "k.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,lazy_refcounts=on", img, "64M")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(img), str(REPO)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    last = -1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and last < 100:
        line = proc.stdout.readline()
        if not line:
            break
        last = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last >= 0
    assert layout.parse_header_fields(img.read_bytes()[:4096]).incompatible_features & layout.INCOMPAT_DIRTY
    d = await open_rw(img)
    try:
        assert not d.is_dirty()
        buf = bytearray(5000)
        await d.readinto(1 * 8192 + 100, memoryview(buf))
        assert buf == bytes([2]) * 5000
        await d.write(0, memoryview(b"after" * 100))
    finally:
        await d.close()
    hdr = layout.parse_header_fields(img.read_bytes()[:4096])
    assert not hdr.incompatible_features & layout.INCOMPAT_DIRTY
    assert_check_clean(img)


async def test_small_cache_budget_stays_bounded(tmp_path: Path) -> None:
    import random

    from imagecore.driver import ImageOpener

    img = tmp_path / "b.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "4M")
    d = await ImageOpener().open(str(img), "qcow2", read_only=False, options={"cache_size": 8192})
    assert isinstance(d, Qcow2Driver)
    model = bytearray(4 * MiB)
    rnd = random.Random(7)
    try:
        for i in range(400):
            off = rnd.randrange(0, 4 * MiB - 3000)
            data = bytes([i % 255 + 1]) * rnd.randrange(1, 3000)
            await d.write(off, memoryview(data))
            model[off:off + len(data)] = data
            assert len(d.l2cache) <= d.l2cache.capacity + 1
            assert d.refs is not None and len(d.refs.cache) <= d.refs.cache.capacity + 4
        assert await read_all(d) == bytes(model)
    finally:
        await d.close()
    assert_check_clean(img)
    ref = tmp_path / "b.raw"
    ref.write_bytes(model)
    qimg("compare", "-q", "-f", "qcow2", "-F", "raw", img, ref)


async def test_reads_see_old_mapping_until_the_new_one_is_linked(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"A" * MiB)
    img = tmp_path / "t.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "raw", img, "1M")
    d = await open_rw(img)
    seen: set[bytes] = set()
    try:
        written = asyncio.Event()

        async def reader() -> None:
            # Read until the write has landed (however slow the host is), then a few more times.
            after = 0
            deadline = asyncio.get_running_loop().time() + 60
            while after < 20 and asyncio.get_running_loop().time() < deadline:
                buf = bytearray(65536)
                await d.readinto(0, memoryview(buf))
                seen.update({bytes(buf[:4096]), bytes(buf[-4096:])})
                assert buf in (b"A" * 65536, b"B" * 65536), "a read saw a half-linked cluster"
                after += written.is_set()
                await asyncio.sleep(0)

        async def writer() -> None:
            await asyncio.sleep(0)
            await d.write(0, memoryview(b"B" * 65536))
            written.set()

        await asyncio.gather(reader(), writer(), reader())
    finally:
        await d.close()
    assert b"B" * 4096 in seen
    assert_check_clean(img)
