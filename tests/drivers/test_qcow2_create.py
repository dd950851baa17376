"""qcow2 create against qemu-img: byte equality, `qemu-img check`/`info` of the result, option errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from imagecore.driver import ImageOpener
from imagecore.errors import BlockError, InvalidArgumentError, NotFoundError
from imagecore.formats.qcow2.create import create_qcow2
from imagecore.formats.qcow2.spec import CREATE_OPTIONS
from imagecore.units import parse_option_size as parse_size
from tests.peers import peer, run

MiB = 1 << 20


async def make(path: Path, size: int, **opts: str) -> Path:
    await create_qcow2(str(path), size, dict(opts), opener=ImageOpener())
    return path


def qemu_make(path: Path, size: int | None, **opts: str) -> Path:
    args = ["-o", ",".join(f"{k}={v}" for k, v in opts.items())] if opts else []
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", *args, path,
        *([str(size)] if size is not None else []))
    return path


def info(path: Path, cwd: Path | None = None) -> dict[str, Any]:
    proc = run(peer("qemu-img"), "info", "--output=json", path)
    out: dict[str, Any] = json.loads(proc.stdout)
    for k in ("filename", "actual-size", "full-backing-filename"):
        out.pop(k, None)
    return out


def qemu_check(path: Path) -> dict[str, Any]:
    proc = run(peer("qemu-img"), "check", "--output=json", path, check=False)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


SIMPLE = [
    (MiB, {}),
    (0, {}),
    (1000, {}),
    (5 * MiB, {"cluster_size": "4k"}),
    (5 * MiB, {"compat": "0.10"}),
    (5 * MiB, {"compat": "v2", "preallocation": "metadata"}),
    (MiB, {"cluster_size": "512", "refcount_bits": "1"}),
    (MiB, {"cluster_size": "512", "refcount_bits": "64"}),
    (3 << 30, {"cluster_size": "2M"}),
    (5 * MiB, {"preallocation": "metadata"}),
    (5 * MiB, {"preallocation": "metadata", "cluster_size": "4k"}),
    (5 * MiB, {"preallocation": "falloc", "cluster_size": "4k"}),
    (3 * MiB, {"preallocation": "full", "cluster_size": "16k", "extended_l2": "on"}),
    (5 * MiB, {"lazy_refcounts": "on", "extended_l2": "on", "compression_type": "zstd"}),
    (7 * MiB, {"refcount_bits": "8", "cluster_size": "8k", "compat": "1.1"}),
]


@pytest.mark.parametrize(("size", "opts"), SIMPLE)
async def test_byte_equal_to_qemu_img(work: Path, size: int, opts: dict[str, str]) -> None:
    ours = await make(work / "ours.qcow2", size, **opts)
    theirs = qemu_make(work / "theirs.qcow2", size, **opts)
    assert ours.read_bytes() == theirs.read_bytes()
    qemu_check(ours)


async def test_byte_equal_with_backing(work: Path) -> None:
    qemu_make(work / "base.qcow2", 3 * MiB)
    ours = await make(work / "ours.qcow2", -1, backing_file="base.qcow2", backing_fmt="qcow2")
    theirs = work / "theirs.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    ours = await make(work / "ours.qcow2", 5 * MiB, backing_file="base.qcow2", backing_fmt="qcow2",
                      extended_l2="on", preallocation="metadata")
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        "-o", "extended_l2=on,preallocation=metadata", theirs, "5M")
    assert ours.read_bytes() == theirs.read_bytes()


MATRIX = [
    {"compat": compat, "cluster_size": cs, "refcount_bits": rb}
    for compat in ("0.10", "1.1")
    for cs in ("512", "4k", "64k", "2M")
    for rb in ("1", "16", "64")
    if compat == "1.1" or rb == "16"
] + [
    {"lazy_refcounts": "on"},
    {"extended_l2": "on", "cluster_size": "32k"},
    {"compression_type": "zstd"},
    {"preallocation": "metadata", "cluster_size": "512", "refcount_bits": "64"},
    {"preallocation": "metadata", "cluster_size": "4k", "refcount_bits": "1"},
    {"preallocation": "falloc", "cluster_size": "512"},
    {"preallocation": "full", "cluster_size": "4k", "refcount_bits": "2"},
    {"preallocation": "full", "compat": "0.10"},
]


@pytest.mark.parametrize("opts", MATRIX, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
async def test_qemu_accepts(work: Path, opts: dict[str, str]) -> None:
    size = 6 * MiB + 512
    ours = await make(work / "ours.qcow2", size, **opts)
    theirs = qemu_make(work / "theirs.qcow2", size, **opts)
    res = qemu_check(ours)
    assert res["total-clusters"] == -(-size // (1 << (parse_size("c", opts.get("cluster_size", "64k"))
                                                       .bit_length() - 1)))
    assert info(ours) == info(theirs)
    if opts.get("preallocation") in ("falloc", "full"):
        assert os.stat(ours).st_blocks * 512 >= size
    # the image is usable: qemu writes to it and it stays consistent
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 5 1M 300k", "-c", "read -P 5 1M 300k", ours)
    qemu_check(ours)


async def test_many_refcount_blocks_and_large_l1(work: Path) -> None:
    """100 GiB with 512-byte clusters: a 25 MiB L1, 200 refcount blocks, a 4-cluster refcount table."""
    img = await make(work / "big.qcow2", 100 << 30, cluster_size="512")
    res = qemu_check(img)
    assert res["image-end-offset"] == os.path.getsize(img) + 512 - os.path.getsize(img) % 512 \
        or res["image-end-offset"] == os.path.getsize(img)
    data = info(img)
    assert data["virtual-size"] == 100 << 30 and data["cluster-size"] == 512


async def test_metadata_preallocation_many_refblocks(work: Path) -> None:
    img = await make(work / "m.qcow2", 4 * MiB, cluster_size="512", refcount_bits="16",
                     preallocation="metadata")
    res = qemu_check(img)
    assert res["allocated-clusters"] == 8192
    theirs = qemu_make(work / "t.qcow2", 4 * MiB, cluster_size="512", preallocation="metadata")
    assert info(img) == info(theirs)


async def test_too_large(work: Path) -> None:
    proc = run(peer("qemu-img"), "create", "-q", "-f", "qcow2", "-o", "cluster_size=512",
               work / "t.qcow2", "64T", check=False)
    with pytest.raises(InvalidArgumentError) as exc:
        await make(work / "o.qcow2", 64 << 40, cluster_size="512")
    assert proc.returncode == 1
    assert proc.stderr.decode().strip().endswith(str(exc.value))


async def test_backing_relative_absolute_and_size_from_backing(work: Path) -> None:
    sub = work / "sub"
    sub.mkdir()
    base = qemu_make(sub / "base.qcow2", 3 * MiB)
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 9 0 64k", base)
    rel = await make(sub / "rel.qcow2", -1, backing_file="base.qcow2", backing_fmt="qcow2")
    absolute = await make(work / "abs.qcow2", 8 * MiB, backing_file=str(base), backing_fmt="qcow2")
    raw = work / "base.raw"
    raw.write_bytes(bytes(2 * MiB))
    v2 = await make(work / "v2.qcow2", -1, backing_file="base.raw", backing_fmt="raw", compat="0.10")
    for img, size, name, fmt in ((rel, 3 * MiB, "base.qcow2", "qcow2"),
                                 (absolute, 8 * MiB, str(base), "qcow2"),
                                 (v2, 2 * MiB, "base.raw", "raw")):
        qemu_check(img)
        data = info(img)
        assert data["virtual-size"] == size
        assert data["backing-filename"] == name
        assert data["backing-filename-format"] == fmt
    run(peer("qemu-io"), "-f", "qcow2", "-c", "read -P 9 0 64k", rel)


async def test_external_data_file(work: Path) -> None:
    data = work / "d.raw"
    img = await make(work / "x.qcow2", 2 * MiB, data_file=str(data), data_file_raw="on")
    assert data.stat().st_size == 2 * MiB
    qemu_check(img)
    spec = info(img)["format-specific"]["data"]
    assert spec["data-file"] == str(data) and spec["data-file-raw"] is True
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 3 64k 64k", img)
    assert data.read_bytes()[65536:131072] == b"\x03" * 65536
    qemu_check(img)
    img2 = await make(work / "y.qcow2", MiB, data_file=str(work / "e.raw"))
    theirs = qemu_make(work / "t.qcow2", MiB, data_file=str(work / "f.raw"))
    assert info(img2)["format-specific"]["data"].keys() == info(theirs)["format-specific"]["data"].keys()
    qemu_check(img2)


ERRORS = [
    {"cluster_size": "1000"},
    {"cluster_size": "4M"},
    {"cluster_size": "abc"},
    {"compat": "0.9"},
    {"compat": "0.10", "lazy_refcounts": "on"},
    {"refcount_bits": "3"},
    {"refcount_bits": "128"},
    {"compat": "0.10", "refcount_bits": "8"},
    {"data_file_raw": "on"},
    {"compression_type": "lz4"},
    {"compat": "0.10", "compression_type": "zstd"},
    {"extended_l2": "on", "cluster_size": "4k"},
    {"compat": "0.10", "extended_l2": "on"},
    {"backing_fmt": "qcow2"},
    {"preallocation": "bogus"},
    {"lazy_refcounts": "maybe"},
    {"backing_file": "b.qcow2", "backing_fmt": "qcow2", "preallocation": "metadata"},
    {"compat": "0.10", "data_file": "x.raw"},
]


@pytest.mark.parametrize("opts", ERRORS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
async def test_option_errors_match_qemu_img(work: Path, opts: dict[str, str]) -> None:
    if "backing_file" in opts:
        qemu_make(work / "b.qcow2", MiB)
    proc = run(peer("qemu-img"), "create", "-q", "-f", "qcow2", "-o",
               ",".join(f"{k}={v}" for k, v in opts.items()), work / "t.qcow2", "1M", check=False)
    assert proc.returncode == 1
    with pytest.raises(BlockError) as exc:
        await make(work / "o.qcow2", MiB, **opts)
    assert exc.value.exit_code == 1
    prefix = f"qemu-img: {work / 't.qcow2'}: "
    assert proc.stderr.decode().rstrip("\n") == prefix + str(exc.value)
    assert not (work / "o.qcow2").exists()


async def test_no_size_without_backing(work: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="Image creation needs a size parameter"):
        await make(work / "o.qcow2", -1)


async def test_encryption_refused(work: Path) -> None:
    with pytest.raises(BlockError):
        await make(work / "o.qcow2", MiB, **{"encrypt.format": "luks"})


def test_option_list_matches_help() -> None:
    proc = run(peer("qemu-img"), "create", "-f", "qcow2", "-o", "help")
    listed = []
    for line in proc.stdout.decode().splitlines():
        line = line.strip()
        if "=<" in line and " - " in line:
            name, rest = line.split("=<", 1)
            kind, helptext = rest.split(">", 1)
            listed.append((name, kind.split()[0], helptext.split(" - ", 1)[1]))
    kinds = {"str": "string", "bool": "bool", "num": "number", "size": "size"}
    # -o help lists them sorted; the spec keeps qemu's order (the Formatting line's)
    assert [(n, kinds[k], h) for n, k, h in listed] == [
        (o.name, o.type, o.help) for o in sorted(CREATE_OPTIONS, key=lambda o: o.name)]


async def test_missing_backing_file(work: Path) -> None:
    proc = run(peer("qemu-img"), "create", "-q", "-f", "qcow2", "-b", work / "nope.qcow2", "-F", "qcow2",
               work / "t.qcow2", "1M", check=False)
    assert proc.returncode == 1
    with pytest.raises(NotFoundError) as exc:
        await make(work / "o.qcow2", MiB, backing_file=str(work / "nope.qcow2"), backing_fmt="qcow2")
    # qemu-img's error, then its hint on a line of its own
    assert proc.stderr.decode().splitlines() == [f"qemu-img: {work / 't.qcow2'}: {exc.value}",
                                                 (exc.value.hint or "").rstrip("\n")]
    assert not (work / "o.qcow2").exists()
    await create_qcow2(str(work / "u.qcow2"), MiB, {"backing_file": "nope.qcow2", "backing_fmt": "qcow2"},
                       opener=ImageOpener(), unsafe=True)
    assert info(work / "u.qcow2")["backing-filename"] == "nope.qcow2"
