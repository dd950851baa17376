"""`imagecore convert` against qemu-img convert, check and compare: same bytes, valid sparse targets."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.peers import imagecore_cmd, peer, run

MiB = 1 << 20


def qimg(*args: str | Path) -> str:
    return run(peer("qemu-img"), *args).stdout.decode()


def ours(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run([*imagecore_cmd(), *map(str, args)], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b""
    return proc


def qio(img: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args: list[str | Path] = [peer("qemu-io"), "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, img)


def actual_size(img: Path) -> int:
    return int(json.loads(qimg("info", "--output=json", img))["actual-size"])


def same_raw(src: Path, work: Path, *src_args: str) -> None:
    want = work / "want.raw"
    got = work / "got.raw"
    qimg("convert", *src_args, "-O", "raw", src, want)
    ours("convert", *src_args, "-O", "raw", src, got)
    assert want.stat().st_size == got.stat().st_size
    assert want.read_bytes() == got.read_bytes()
    # sparse: no more allocated than qemu-img's own output (plus one 64 KiB slack)
    assert actual_size(got) <= actual_size(want) + 65536


def patterned(work: Path, name: str = "p.qcow2", opts: str = "", size: str = "32M") -> Path:
    img = work / name
    qimg("create", "-f", "qcow2", *(["-o", opts] if opts else []), img, size)
    qio(img, "write -P 0x11 0 1M", "write -z 1M 1M", "write -P 0x22 3M 64k", "write -P 0 5M 256k",
        "write -P 0x33 8M 2M", "discard 9M 512k", "write -P 0x44 31M 1M")
    return img


@pytest.mark.parametrize("opts", ["compat=0.10", "compat=1.1", "cluster_size=4k", "cluster_size=2M",
                                  "extended_l2=on", "refcount_bits=1", "compression_type=zstd"])
def test_qcow2_to_raw_identical(work: Path, opts: str) -> None:
    src = patterned(work, opts=opts)
    if "0.10" not in opts:
        qio(src, "write -c -P 0x55 12M " + ("2M" if "2M" in opts else "128k"))
    same_raw(src, work)


def test_compressed_zlib_and_zstd(work: Path) -> None:
    for ctype in ("zlib", "zstd"):
        img = work / f"c-{ctype}.qcow2"
        raw = work / "data.raw"
        raw.write_bytes(bytes(range(256)) * 4096 * 4 + b"\0" * MiB + b"xyz" * 100000)
        qimg("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", raw, img)
        same_raw(img, work)


def test_snapshots_source(work: Path) -> None:
    img = patterned(work)
    qimg("snapshot", "-c", "s1", img)
    qio(img, "write -P 0x66 0 2M")
    same_raw(img, work)


def test_backing_chain_depth_3(work: Path) -> None:
    b0 = work / "b0.raw"
    qimg("create", "-f", "raw", b0, "20M")
    qio(b0, "write -P 1 0 8M", fmt="raw")
    prev, prev_fmt = b0, "raw"
    for i in range(1, 4):
        img = work / f"b{i}.qcow2"
        qimg("create", "-f", "qcow2", "-b", prev.name, "-F", prev_fmt, img)
        qio(img, f"write -P {i + 1} {i}M 1M", f"write -z {i + 4}M 512k")
        prev, prev_fmt = img, "qcow2"
    same_raw(prev, work)


def test_odd_size(work: Path) -> None:
    img = work / "odd.qcow2"
    qimg("create", "-f", "qcow2", img, "1000000000")
    qio(img, "write -P 7 0 64k", "write -P 8 999000000 512k")
    same_raw(img, work)


def test_raw_sources_and_concatenation(work: Path) -> None:
    a = work / "a.raw"
    b = work / "b.img"
    qimg("create", "-f", "raw", a, "3M")
    qio(a, "write -P 9 1M 4k", fmt="raw")
    b.write_bytes(b"\x07" * 1000 + b"\0" * 8192 + b"\x08" * 24)
    want = work / "want.raw"
    got = work / "got.raw"
    qimg("convert", "-f", "raw", "-O", "raw", a, b, want)
    ours("convert", "-f", "raw", "-O", "raw", a, b, got)
    assert want.read_bytes() == got.read_bytes()


@pytest.mark.parametrize("opts", ["compat=0.10", "compat=1.1", "cluster_size=4k", "cluster_size=1M",
                                  "compat=1.1,cluster_size=64k,lazy_refcounts=on"])
def test_to_qcow2_valid_and_equal(work: Path, opts: str) -> None:
    src = patterned(work, "src.qcow2")
    dst = work / "dst.qcow2"
    ours("convert", "-O", "qcow2", "-o", opts, src, dst)
    run(peer("qemu-img"), "check", dst)
    run(peer("qemu-img"), "compare", src, dst)
    info = json.loads(qimg("info", "--output=json", dst))
    assert info["format"] == "qcow2"
    twin = work / "twin.qcow2"
    qimg("convert", "-O", "qcow2", "-o", opts, src, twin)
    assert info["actual-size"] <= actual_size(twin) + int(info["cluster-size"])


def test_raw_to_qcow2_sparse(work: Path) -> None:
    src = work / "s.raw"
    qimg("create", "-f", "raw", src, "64M")
    qio(src, "write -P 1 0 1M", "write -P 0 10M 4M", "write -P 2 40M 64k", fmt="raw")
    dst = work / "d.qcow2"
    ours("convert", "-p", "-m", "4", "-W", "-t", "none", "-T", "writeback", "-O", "qcow2", src, dst)
    run(peer("qemu-img"), "check", dst)
    run(peer("qemu-img"), "compare", src, dst)
    assert actual_size(dst) < 3 * MiB
    full = work / "full.raw"
    ours("convert", "-S", "0", "-O", "raw", src, full)
    assert actual_size(full) >= 64 * MiB
    assert full.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("cluster", ["64k", "4k"])
def test_in_order_layout(work: Path, cluster: str) -> None:
    """Without -W the target's clusters lie in guest order, as qemu-img's do, though writes overlap."""
    src = work / "s.raw"
    qimg("create", "-f", "raw", src, "96M")
    qio(src, *(f"write -P {i + 1} {i * 3}M {1 + i % 2}M" for i in range(32)), fmt="raw")
    dst = work / "d.qcow2"
    ours("convert", "-m", "8", "-O", "qcow2", "-o", f"cluster_size={cluster}", src, dst)
    run(peer("qemu-img"), "check", dst)
    run(peer("qemu-img"), "compare", src, dst)
    hosts = [e["offset"] for e in json.loads(qimg("map", "--output=json", dst)) if e["data"]]
    twin = work / "twin.qcow2"
    qimg("convert", "-O", "qcow2", "-o", f"cluster_size={cluster}", src, twin)
    # new L2 tables split some runs; qemu-img's target has the same splits
    assert len(hosts) == len([e for e in json.loads(qimg("map", "--output=json", twin)) if e["data"]])
    assert hosts == sorted(hosts)


def test_backing_target(work: Path) -> None:
    base = work / "base.qcow2"
    qimg("create", "-f", "qcow2", base, "16M")
    qio(base, "write -P 1 0 8M")
    top = work / "top.qcow2"
    qimg("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qio(top, "write -P 2 1M 1M", "write -z 4M 1M")
    for how in (["-B", "base.qcow2", "-F", "qcow2"], ["-o", "backing_file=base.qcow2,backing_fmt=qcow2"]):
        dst = work / "dst.qcow2"
        ours("convert", "-O", "qcow2", *how, top, dst)
        run(peer("qemu-img"), "check", dst)
        run(peer("qemu-img"), "compare", top, dst)
        info = json.loads(qimg("info", "--output=json", dst))
        assert info["backing-filename"] == "base.qcow2"
        mapped = json.loads(qimg("map", "--output=json", dst))
        top_data = sum(e["length"] for e in mapped if e["depth"] == 0 and e["data"])
        assert top_data <= 1 * MiB  # only the top layer's data was copied


def test_existing_target_n(work: Path) -> None:
    src = patterned(work)
    dst = work / "pre.raw"
    dst.write_bytes(b"\xee" * 32 * MiB)
    ours("convert", "-n", "-O", "raw", src, dst)
    want = work / "want.raw"
    qimg("convert", "-O", "raw", src, want)
    assert dst.read_bytes() == want.read_bytes()
    run(peer("qemu-img"), "compare", "-f", "qcow2", "-F", "raw", src, dst)


def test_progress_output(work: Path) -> None:
    src = patterned(work)
    proc = ours("convert", "-p", "-O", "raw", src, work / "p.raw")
    text = proc.stdout.decode()
    assert text.startswith("    (0.00/100%)\r") and text.endswith("    (100.00/100%)\r\n")
    quiet = ours("convert", "-q", "-p", "-O", "raw", src, work / "q.raw")
    assert quiet.stdout == b""
