"""qcow2 check against `qemu-img check`: clean, leaking, corrupt and hostile images, and repair."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from imagecore.driver import CheckResult, ImageOpener, OpenContext
from imagecore.errors import BlockError, ImageFormatError, InvalidArgumentError
from imagecore.formats.qcow2.check import check_qcow2
from imagecore.formats.qcow2.layout import parse_header
from imagecore.formats.qcow2.snapshot import encode_snapshot_table, read_snapshot_table, snapshot_info_json
from imagecore.formats.qcow2.tables import pack_refcounts, unpack_refcounts
from imagecore.hostio import HostFile
from tests.peers import peer, qemu10, run

FIELDS = {
    "corruptions": "corruptions",
    "leaks": "leaks",
    "check_errors": "check-errors",
    "total_clusters": "total-clusters",
    "allocated_clusters": "allocated-clusters",
    "fragmented_clusters": "fragmented-clusters",
    "compressed_clusters": "compressed-clusters",
    "image_end_offset": "image-end-offset",
}


def qemu_check(path: Path) -> tuple[dict[str, Any], list[str]]:
    proc = run(peer("qemu-img"), "check", "--output=json", path, check=False)
    assert proc.returncode in (0, 2, 3), proc.stderr
    human = run(peer("qemu-img"), "check", path, check=False)
    lines = [ln for ln in human.stderr.decode().splitlines() if ln.strip()]
    return json.loads(proc.stdout), lines


async def ours(path: Path, repair: str | None = None) -> CheckResult:
    hf = HostFile.open(str(path), read_only=repair is None)
    try:
        ctx = OpenContext(opener=ImageOpener(), read_only=repair is None, path=str(path))
        return await check_qcow2(hf, ctx, repair)
    finally:
        hf.close()


async def agree(path: Path) -> CheckResult:
    """Check with both tools and assert the counters and the messages are the same."""
    expect, lines = qemu_check(path)
    res = await ours(path)
    for attr, key in FIELDS.items():
        assert (getattr(res, attr) or 0) == expect.get(key, 0), (attr, res, expect)
    assert res.messages == lines
    return res


def qcow2(path: Path, size: str = "4M", *opts: str) -> Path:
    args = ["-o", ",".join(opts)] if opts else []
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", *args, path, size)
    return path


def qio(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args: list[str] = []
    for c in cmds:
        args += ["-c", c]
    run(peer("qemu-io"), "-f", fmt, *args, path)


def header(path: Path) -> dict[str, int]:
    d = path.read_bytes()[:112]
    (_m, _v, _bfo, _bfs, cbits, size, _c, l1_size, l1_off, rt_off, rt_clusters, nb_snap,
     _snap_off) = struct.unpack_from(">IIQIIQIIQQIIQ", d)
    order = struct.unpack_from(">I", d, 96)[0] if _v >= 3 else 4
    return {"cluster_bits": cbits, "cs": 1 << cbits, "size": size, "l1_size": l1_size, "l1": l1_off,
            "rt": rt_off, "rt_clusters": rt_clusters, "order": order, "nb_snap": nb_snap}


def l2_entry(path: Path, index: int) -> tuple[int, int]:
    """(file offset of the L2 entry for guest cluster ``index``, its value)."""
    h = header(path)
    d = path.read_bytes()
    per = h["cs"] // 8
    l1e = struct.unpack_from(">Q", d, h["l1"] + 8 * (index // per))[0]
    pos = (l1e & 0x00FFFFFFFFFFFE00) + 8 * (index % per)
    return pos, struct.unpack_from(">Q", d, pos)[0]


def set_refcount(path: Path, cluster: int, value: int) -> None:
    h = header(path)
    d = bytearray(path.read_bytes())
    per = h["cs"] * 8 >> h["order"]
    rb = struct.unpack_from(">Q", d, h["rt"] + 8 * (cluster // per))[0]
    block = unpack_refcounts(bytes(d[rb:rb + h["cs"]]), h["order"])
    block[cluster % per] = value
    d[rb:rb + h["cs"]] = pack_refcounts(block, h["order"], h["cs"])
    path.write_bytes(bytes(d))


def poke(path: Path, offset: int, value: int) -> None:
    d = bytearray(path.read_bytes())
    struct.pack_into(">Q", d, offset, value)
    path.write_bytes(bytes(d))


# -- clean images ------------------------------------------------------------------------------------

async def test_empty_and_written(work: Path) -> None:
    img = qcow2(work / "a.qcow2")
    res = await agree(img)
    assert res.corruptions == res.leaks == 0 and res.allocated_clusters == 0
    qio(img, "write -P 1 0 1M", "write -P 2 2M 64k", "write -z 3M 64k")
    res = await agree(img)
    assert res.allocated_clusters == 17


async def test_snapshots_and_fragmentation(work: Path) -> None:
    img = qcow2(work / "s.qcow2")
    qio(img, "write -P 1 0 1M", "write -P 2 3M 64k")
    run(peer("qemu-img"), "snapshot", "-c", "one", img)
    qio(img, "write -P 3 0 128k", "write -P 4 1M 64k")
    run(peer("qemu-img"), "snapshot", "-c", "two", img)
    qio(img, "discard 64k 64k", "write -P 5 2M 64k")
    res = await agree(img)
    assert (res.fragmented_clusters or 0) > 0


@pytest.mark.parametrize("opts", [("compression_type=zlib",), ("compression_type=zstd",),
                                  ("cluster_size=4k",), ("cluster_size=512", "refcount_bits=1")])
async def test_compressed(work: Path, opts: tuple[str, ...]) -> None:
    src = qcow2(work / "src.qcow2", "1M")
    qio(src, "write -P 7 0 300k", "write -P 9 600k 4k")
    dst = work / "c.qcow2"
    run(peer("qemu-img"), "convert", "-c", "-O", "qcow2", "-o", ",".join(opts), src, dst)
    res = await agree(dst)
    assert (res.compressed_clusters or 0) > 0


@pytest.mark.parametrize("opts", [("compat=0.10",), ("refcount_bits=64",), ("refcount_bits=2",),
                                  ("extended_l2=on",), ("lazy_refcounts=on",), ("cluster_size=2M",)])
async def test_formats(work: Path, opts: tuple[str, ...]) -> None:
    img = qcow2(work / "f.qcow2", "8M", *opts)
    qio(img, "write -P 1 0 100k", "write -P 2 5M 12k", "write -z 6M 1M")
    await agree(img)


async def test_backing_and_bitmaps(work: Path) -> None:
    base = qcow2(work / "base.qcow2")
    qio(base, "write -P 1 0 2M")
    top = work / "top.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qio(top, "write -P 2 64k 64k")
    run(peer("qemu-img"), "bitmap", "--add", top, "bm0")
    run(qemu10("qemu-img"), "bitmap", "--add", "-g", "512k", top, "bm1")
    qio(top, "write -P 3 1M 64k")
    await agree(top)
    await agree(base)


# -- broken images -----------------------------------------------------------------------------------

async def test_leak_detected_and_repaired(work: Path) -> None:
    img = qcow2(work / "l.qcow2")
    qio(img, "write -P 1 0 256k")
    set_refcount(img, 0, 2)  # the header cluster
    with open(img, "ab") as f:  # an orphan cluster with refcount 1
        f.write(bytes(65536))
    set_refcount(img, img.stat().st_size // 65536 - 1, 1)
    res = await agree(img)
    assert res.leaks == 2 and res.corruptions == 0
    assert "Leaked cluster 0 refcount=2 reference=1" in res.messages
    fixed = await ours(img, "leaks")
    assert fixed.leaks_fixed == 2 and fixed.leaks == 0
    after, _ = qemu_check(img)
    assert after.get("leaks", 0) == 0 and after.get("corruptions", 0) == 0


async def test_zeroed_refcount_is_corruption_and_repaired(work: Path) -> None:
    img = qcow2(work / "z.qcow2")
    qio(img, "write -P 1 0 256k")
    _pos, e = l2_entry(img, 1)
    set_refcount(img, (e & 0x00FFFFFFFFFFFE00) >> 16, 0)
    res = await agree(img)
    assert res.corruptions == 2  # the refcount and the COPIED flag that no longer matches it
    fixed = await ours(img, "all")
    assert fixed.corruptions == 0 and fixed.corruptions_fixed >= 1
    after, lines = qemu_check(img)
    assert after.get("corruptions", 0) == 0 and after.get("leaks", 0) == 0, lines
    qio(img, "read -P 1 0 256k")


async def test_copied_flag(work: Path) -> None:
    img = qcow2(work / "c.qcow2")
    qio(img, "write -P 1 0 256k")
    pos, e = l2_entry(img, 2)
    poke(img, pos, e & ~(1 << 63))
    h = header(img)
    l1e = struct.unpack_from(">Q", img.read_bytes(), h["l1"])[0]
    poke(img, h["l1"], l1e & ~(1 << 63))
    res = await agree(img)
    assert res.corruptions == 2
    assert any(m.startswith("ERROR OFLAG_COPIED L2 cluster: l1_index=0") for m in res.messages)
    fixed = await ours(img, "all")
    assert fixed.corruptions_fixed == 2 and fixed.corruptions == 0
    after, _ = qemu_check(img)
    assert after.get("corruptions", 0) == 0


async def test_l2_entry_past_eof_and_unaligned(work: Path) -> None:
    img = qcow2(work / "e.qcow2")
    qio(img, "write -P 1 0 256k")
    pos, e = l2_entry(img, 0)
    poke(img, pos, (1 << 63) | (1 << 40))
    pos, e = l2_entry(img, 1)
    poke(img, pos, e + 512)
    res = await agree(img)
    assert res.corruptions >= 2


async def test_refcount_table_entry_broken(work: Path) -> None:
    img = qcow2(work / "r.qcow2")
    qio(img, "write -P 1 0 64k")
    h = header(img)
    rb = struct.unpack_from(">Q", img.read_bytes(), h["rt"])[0]
    poke(img, h["rt"] + 8, rb)  # a second table entry pointing at the same block
    res = await agree(img)
    assert res.corruptions > 0


# -- hostile images ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mutate", ["truncated", "magic", "cluster_bits", "l1_huge", "reftable_huge",
                                    "snapshots_huge", "snapshot_extra", "version"])
async def test_hostile_headers(work: Path, mutate: str) -> None:
    img = qcow2(work / "h.qcow2", "1M")
    qio(img, "write -P 1 0 64k")
    d = bytearray(img.read_bytes())
    if mutate == "truncated":
        d = d[:50]
    elif mutate == "magic":
        d[0] = 0
    elif mutate == "cluster_bits":
        struct.pack_into(">I", d, 20, 40)
    elif mutate == "l1_huge":
        struct.pack_into(">I", d, 36, 0x7FFFFFFF)
    elif mutate == "reftable_huge":
        struct.pack_into(">I", d, 56, 0x7FFFFFFF)
    elif mutate == "snapshots_huge":
        struct.pack_into(">IQ", d, 60, 60000, 65536)
    elif mutate == "snapshot_extra":
        struct.pack_into(">IQ", d, 60, 1, 0x30000)
        d += bytes(65536)
        struct.pack_into(">QIHHIIQII", d, 0x30000, 0, 0, 1, 1, 0, 0, 0, 0, 0xFFFFFFF0)
    elif mutate == "version":
        struct.pack_into(">I", d, 4, 9)
    img.write_bytes(bytes(d))
    with pytest.raises(BlockError) as info:
        await ours(img)
    assert "\n" not in str(info.value)
    if mutate in ("truncated", "magic", "cluster_bits", "l1_huge"):
        assert isinstance(info.value, ImageFormatError)
    if mutate == "snapshot_extra":  # the check reads the table itself and stops, as qemu-img's does
        assert str(info.value) == "File too large"
        partial: CheckResult = info.value.check_result  # type: ignore[attr-defined]
        assert partial.messages[0] == (
            "imagecore: ERROR failed to read the snapshot table: Too much extra metadata in snapshot "
            "table entry 0")


async def test_snapshot_entry_past_eof(work: Path) -> None:
    img = qcow2(work / "p.qcow2", "1M")
    d = bytearray(img.read_bytes())
    struct.pack_into(">IQ", d, 60, 2, 0x30000)
    d += bytes(0x30000 + 48 - len(d)) if len(d) < 0x30000 + 48 else b""
    struct.pack_into(">QIHHIIQII", d, 0x30000, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    img.write_bytes(bytes(d[:0x30000 + 48]))
    # qemu's check reads the entries past the end as zeroes: two incomplete entries
    res = await agree(img)
    assert res.messages[:2] == ["ERROR snapshot table entry 0 is incomplete",
                                "ERROR snapshot table entry 1 is incomplete"]


async def test_l1_pointing_everywhere_stays_bounded(work: Path) -> None:
    """Every L1 entry names the same L2 table and every L2 entry the same far-away cluster."""
    img = qcow2(work / "b.qcow2", "64M", "cluster_size=4k")
    qio(img, "write -P 1 0 4k")
    h = header(img)
    d = bytearray(img.read_bytes())
    pos, _e = l2_entry(img, 0)
    l2 = pos & ~4095
    for i in range(h["l1_size"]):
        struct.pack_into(">Q", d, h["l1"] + 8 * i, (1 << 63) | l2)
    for i in range(512):
        struct.pack_into(">Q", d, l2 + 8 * i, (1 << 63) | (1 << 50))
    img.write_bytes(bytes(d))
    res = await ours(img)
    assert res.corruptions > 0
    expect, _ = qemu_check(img)
    assert res.corruptions == expect["corruptions"]


# -- repair, side by side with qemu-img check -r -------------------------------------------------------

def _leak(img: Path) -> None:
    set_refcount(img, 0, 2)
    with open(img, "ab") as f:
        f.write(bytes(65536))
    set_refcount(img, img.stat().st_size // 65536 - 1, 1)


def _zero(img: Path) -> None:
    _pos, e = l2_entry(img, 1)
    set_refcount(img, (e & 0x00FFFFFFFFFFFE00) >> 16, 0)


def _low(img: Path) -> None:
    run(peer("qemu-img"), "snapshot", "-c", "s", img)
    _pos, e = l2_entry(img, 1)
    set_refcount(img, (e & 0x00FFFFFFFFFFFE00) >> 16, 1)


def _copied(img: Path) -> None:
    pos, e = l2_entry(img, 2)
    poke(img, pos, e & ~(1 << 63))


def _reftable(img: Path) -> None:
    h = header(img)
    rb = struct.unpack_from(">Q", img.read_bytes(), h["rt"])[0]
    poke(img, h["rt"] + 8, rb)


def _high(img: Path) -> None:
    _pos, e = l2_entry(img, 1)
    set_refcount(img, (e & 0x00FFFFFFFFFFFE00) >> 16, 3)


def _past_end(img: Path) -> None:
    pos, e = l2_entry(img, 2)
    poke(img, pos, (e & ~0x00FFFFFFFFFFFE00) | (img.stat().st_size + (1 << 20)) & ~0xFFFF)


def _on_reftable(img: Path) -> None:
    """A data cluster that is the refcount table (overlapping metadata)."""
    pos, e = l2_entry(img, 3)
    poke(img, pos, (e & ~0x00FFFFFFFFFFFE00) | header(img)["rt"])


def _on_l1(img: Path) -> None:
    """A data cluster that is the L1 table."""
    pos, e = l2_entry(img, 0)
    poke(img, pos, (e & ~0x00FFFFFFFFFFFE00) | header(img)["l1"])


def _l2_shared(img: Path) -> None:
    """Two guest clusters naming one host cluster: the refcount is one too low."""
    _p1, e1 = l2_entry(img, 1)
    pos, _e = l2_entry(img, 2)
    poke(img, pos, e1)


@pytest.mark.parametrize("mode", ["leaks", "all"])
@pytest.mark.parametrize("damage", [_leak, _zero, _low, _copied, _reftable, _high, _past_end, _on_reftable,
                                    _on_l1, _l2_shared], ids=lambda f: f.__name__[1:])
async def test_repair_like_qemu(work: Path, damage: Any, mode: str) -> None:
    img = qcow2(work / "i.qcow2")
    qio(img, "write -P 1 0 256k")
    damage(img)
    twin = work / "twin.qcow2"
    twin.write_bytes(img.read_bytes())
    proc = run(peer("qemu-img"), "check", "--output=json", "-r", mode, twin, check=False)
    if proc.returncode == 1:  # qemu gives up: the refcount structure needs a rebuild
        with pytest.raises(BlockError, match="Input/output error") as exc:
            await ours(img, mode)
        partial = getattr(exc.value, "check_result", None)
        assert partial is not None
        assert partial.messages == [ln for ln in proc.stderr.decode().splitlines()
                                    if ln and not ln.startswith("qemu-img:")]
        return
    expect = json.loads(proc.stdout)
    res = await ours(img, mode)
    assert res.leaks_fixed == expect.get("leaks-fixed", 0)
    assert res.corruptions_fixed == expect.get("corruptions-fixed", 0)
    after, lines = qemu_check(img)
    twin_after, _ = qemu_check(twin)
    for key in ("corruptions", "leaks", "check-errors"):
        assert after.get(key, 0) == twin_after.get(key, 0), lines
    if not twin_after.get("corruptions", 0):
        # the guest data qemu-img's own repair keeps is the data ours keeps
        cmp = run(peer("qemu-img"), "compare", "-f", "qcow2", "-F", "qcow2", img, twin, check=False)
        assert cmp.returncode == 0, cmp.stdout
        if damage in (_leak, _zero, _low, _copied, _high):
            qio(img, "read -P 1 0 256k")


# -- snapshot table, data files, dirty images ----------------------------------------------------------

async def test_snapshot_table_parse_and_encode(work: Path) -> None:
    img = qcow2(work / "s.qcow2")
    qio(img, "write -P 1 0 64k")
    for name in ("first", "second snapshot", "x" * 200):
        run(peer("qemu-img"), "snapshot", "-c", name, img)
    hf = HostFile.open(str(img), read_only=True)
    try:
        h = parse_header(await hf.pread(0, 65536), hf.size())
        table = await read_snapshot_table(hf, h)
        raw = await hf.pread(h.snapshots_offset, table.size)
    finally:
        hf.close()
    assert [s.name for s in table.snapshots] == ["first", "second snapshot", "x" * 200]
    assert encode_snapshot_table(table.snapshots)[:len(raw)] == raw
    info = json.loads(run(peer("qemu-img"), "info", "--output=json", img).stdout)
    assert [snapshot_info_json(s) for s in table.snapshots] == info["snapshots"]
    await agree(img)


async def test_external_data_file_image(work: Path) -> None:
    img = work / "x.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", "-o", f"data_file={work / 'x.raw'}", img, "4M")
    qio(img, "write -P 4 0 1M", "write -z 2M 64k")
    res = await agree(img)
    assert res.allocated_clusters == 16  # qemu counts the mapped clusters only


async def test_dirty_lazy_refcount_image(work: Path) -> None:
    img = qcow2(work / "d.qcow2", "4M", "lazy_refcounts=on")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 1 0 512k", "-c", "abort", img, check=False)
    assert header(img)["cluster_bits"] == 16 and img.read_bytes()[79] & 1  # dirty
    res = await agree(img)
    assert res.corruptions > 0
    await ours(img, "all")
    assert not img.read_bytes()[79] & 3
    after, lines = qemu_check(img)
    assert after.get("corruptions", 0) == 0 and after.get("leaks", 0) == 0, lines
    qio(img, "read -P 1 0 512k")


async def test_shared_tables_do_not_hang(work: Path) -> None:
    """A 1M-entry L1, every entry naming one L2 whose every entry names one data cluster, shared by 200
    snapshots: walked naively that is 200 * 2^20 * 8192 references."""
    import asyncio

    img = qcow2(work / "h.qcow2", "1M")
    qio(img, "write -P 1 0 64k")
    cs = 65536
    pos, e = l2_entry(img, 0)
    l2 = pos & ~(cs - 1)
    d = bytearray(img.read_bytes())
    for i in range(cs // 8):
        struct.pack_into(">Q", d, l2 + 8 * i, e)
    n = 1 << 20
    l1_off = -(-len(d) // cs) * cs
    d += bytes(l1_off - len(d)) + struct.pack(">Q", (1 << 63) | l2) * n
    snap_off = len(d)
    for _ in range(200):
        d += struct.pack(">QIHHIIQII", l1_off, n, 1, 1, 0, 0, 0, 0, 0) + b"1s" + bytes(6)
    struct.pack_into(">IQ", d, 36, n, l1_off)
    struct.pack_into(">IQ", d, 60, 200, snap_off)
    img.write_bytes(bytes(d))
    res = await asyncio.wait_for(ours(img), 120)
    assert res.corruptions > 0 and res.allocated_clusters == n * (cs // 8)
    assert len(res.messages) <= 100_002


# -- offline snapshot operations -------------------------------------------------------------------------

async def _snap(img: Path, op: str, name: str = "") -> Any:
    from imagecore.formats.qcow2 import snapshot as snap

    hf = HostFile.open(str(img), read_only=op == "list")
    try:
        if op == "create":
            return await snap.snapshot_create(hf, name)
        if op == "delete":
            return await snap.snapshot_delete(hf, name)
        if op == "apply":
            return await snap.snapshot_apply(hf, name)
        return await snap.snapshot_list(hf)
    finally:
        hf.close()


def qemu_clean(img: Path) -> None:
    res, lines = qemu_check(img)
    assert not res.get("corruptions") and not res.get("leaks") and not res.get("check-errors"), lines


@pytest.mark.parametrize("opts", [(), ("cluster_size=512",), ("compat=0.10",), ("extended_l2=on",),
                                  ("refcount_bits=4", "cluster_size=4k")])
async def test_snapshot_create_apply_delete(work: Path, opts: tuple[str, ...]) -> None:
    img = qcow2(work / "s.qcow2", "2M", *opts)
    qio(img, "write -P 1 0 512k")
    first = await _snap(img, "create", "one")
    assert first.id == "1"
    qemu_clean(img)
    qio(img, "write -P 2 0 64k", "write -P 3 1M 64k")
    await _snap(img, "create", "two")
    qio(img, "write -P 4 0 1M")
    qemu_clean(img)
    listed = run(peer("qemu-img"), "snapshot", "-l", img).stdout.decode()
    assert " one " in listed and " two " in listed
    await _snap(img, "apply", "two")
    qemu_clean(img)
    qio(img, "read -P 2 0 64k", "read -P 1 64k 448k", "read -P 3 1M 64k")
    await _snap(img, "apply", "1")
    qio(img, "read -P 1 0 512k", "read -P 0 1M 64k")
    await _snap(img, "delete", "one")
    qemu_clean(img)
    assert [s.name for s in await _snap(img, "list")] == ["two"]
    run(peer("qemu-img"), "snapshot", "-d", "two", img)
    qemu_clean(img)
    qio(img, "read -P 1 0 512k")
    run(peer("qemu-img"), "snapshot", "-c", "q", img)
    await _snap(img, "delete", "q")
    qemu_clean(img)
    await agree(img)


async def test_snapshot_many_on_small_clusters(work: Path) -> None:
    """512-byte clusters: the snapshots' L1 copies and tables need new refcount blocks and table space."""
    img = qcow2(work / "m.qcow2", "4M", "cluster_size=512")
    qio(img, "write -P 7 0 4M")
    for i in range(40):
        await _snap(img, "create", f"s{i}")
    qemu_clean(img)
    for i in range(0, 40, 2):
        await _snap(img, "delete", f"s{i}")
    qemu_clean(img)
    qio(img, "read -P 7 0 4M")
    await agree(img)


async def test_snapshot_errors(work: Path) -> None:
    from imagecore.errors import NotFoundError

    img = qcow2(work / "e.qcow2", "1M")
    with pytest.raises(NotFoundError, match="snapshot not found"):
        await _snap(img, "delete", "nope")
    with pytest.raises(NotFoundError):
        await _snap(img, "apply", "nope")
    one = qcow2(work / "one.qcow2", "1M", "refcount_bits=1", "cluster_size=4k")
    qio(one, "write -P 1 0 64k")
    with pytest.raises(InvalidArgumentError):
        await _snap(one, "create", "x")
    qemu_clean(one)  # refused before anything was written


async def test_snapshot_grows_refcount_table(work: Path) -> None:
    """An image whose refcount table is full: the snapshots' clusters need a new, larger table."""
    from imagecore.formats.qcow2.create import create_qcow2

    img = work / "g.qcow2"
    await create_qcow2(str(img), 8020 * 1024, {"cluster_size": "512", "preallocation": "metadata"},
                       opener=ImageOpener())
    assert header(img)["rt_clusters"] == 1
    qio(img, "write -P 5 0 64k")
    for i in range(12):
        await _snap(img, "create", f"s{i}")
    assert header(img)["rt_clusters"] > 1
    qemu_clean(img)
    await _snap(img, "delete", "s3")
    await _snap(img, "apply", "s5")
    qemu_clean(img)
    qio(img, "read -P 5 0 64k")
    await agree(img)


async def test_every_reftable_entry_names_one_block(work: Path) -> None:
    img = qcow2(work / "t.qcow2", "1M")
    qio(img, "write -P 1 0 128k")
    h = header(img)
    d = bytearray(img.read_bytes())
    rb = struct.unpack_from(">Q", d, h["rt"])[0]
    for i in range(1, h["cs"] // 8):
        struct.pack_into(">Q", d, h["rt"] + 8 * i, rb)
    img.write_bytes(bytes(d))
    res = await agree(img)
    assert res.corruptions >= h["cs"] // 8 - 1
