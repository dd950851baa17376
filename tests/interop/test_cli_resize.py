"""`imagecore resize` against `qemu-img resize` on copies of the same images: output, exit code, the new
virtual size, a clean `qemu-img check` and the guest data (kept below the old size, zeroes past it)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import imagecore_cmd, peer, run

Proc = subprocess.CompletedProcess[bytes]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("src")
    qi, qio = peer("qemu-img"), peer("qemu-io")
    run(qi, "create", "-q", "-f", "raw", d / "a.raw", "4M")
    run(qio, "-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x12 3M 1M", d / "a.raw")
    run(qi, "create", "-q", "-f", "qcow2", d / "a.qcow2", "8M")
    run(qio, "-f", "qcow2", "-c", "write -P 0x21 0 1M", "-c", "write -P 0x22 5M 1M", "-c",
        "write -P 0x23 7M 4k", d / "a.qcow2")
    run(qi, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", d / "small.qcow2", "1M")
    run(qio, "-f", "qcow2", "-c", "write -P 0x31 0 1M", d / "small.qcow2")
    run(qi, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", d / "wide.qcow2", "4M")
    run(qio, "-f", "qcow2", "-c", "write -P 0x32 0 4M", d / "wide.qcow2")
    run(qi, "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", d / "ext.qcow2", "8M")
    run(qio, "-f", "qcow2", "-c", "write -P 0x33 0 8M", d / "ext.qcow2")
    run(qi, "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", d / "top.qcow2")
    run(qio, "-f", "qcow2", "-c", "write -P 0x41 6M 64k", d / "top.qcow2")
    for name, compat in (("snap.qcow2", "1.1"), ("snap2.qcow2", "0.10")):
        run(qi, "create", "-q", "-f", "qcow2", "-o", f"compat={compat}", d / name, "1M")
        run(qio, "-f", "qcow2", "-c", "write -P 0x51 0 64k", d / name)
        run(qi, "snapshot", "-c", "s1", d / name)
    run(qi, "create", "-q", "-f", "vmdk", d / "a.vmdk", "1M")
    # overlays shorter than their backing file: growing one zeroes the new area (qemu's BDRV_REQ_ZERO_WRITE)
    run(qi, "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", d / "short.qcow2", "4M")
    run(qio, "-f", "qcow2", "-c", "write -P 0x61 0 4M", d / "short.qcow2")
    run(qi, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "a.qcow2", "-F", "qcow2",
        d / "short2.qcow2", "500k")
    # qemu's iotest 292: a shrink inside a cluster, then a grow; the rest of that cluster must read zeroes
    run(qi, "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", d / "cut.qcow2")
    run(qio, "-f", "qcow2", "-c", "write -P 0x62 0 1M", d / "cut.qcow2")
    run(qi, "resize", "-q", "--shrink", d / "cut.qcow2", "520k")
    return d


def both(images: Path, work: Path, args: list[str]) -> tuple[Proc, Proc]:
    for side in ("q", "o"):
        shutil.copytree(images, work / side)
    q = subprocess.run([peer("qemu-img"), "resize", *args], capture_output=True, cwd=work / "q", timeout=120)
    o = subprocess.run([*imagecore_cmd(), "resize", *args], capture_output=True, cwd=work / "o", timeout=120)
    assert b"Traceback" not in o.stderr
    assert (o.returncode, o.stdout) == (q.returncode, q.stdout)
    assert o.stderr.replace(b"imagecore", b"PROG") == q.stderr.replace(b"qemu-img", b"PROG")
    return q, o


def info(path: Path) -> dict[str, object]:
    return dict(json.loads(run(peer("qemu-img"), "info", "--output=json", "-U", path).stdout))


def verify(images: Path, work: Path, name: str, fmt: str) -> None:
    """imagecore's result has qemu's size, is consistent, and reads as qemu's result does."""
    ours, theirs, orig = work / "o" / name, work / "q" / name, images / name
    assert info(ours)["virtual-size"] == info(theirs)["virtual-size"]
    if fmt == "qcow2":
        run(peer("qemu-img"), "check", ours)
    # against qemu's result: the same guest data, and for a grow zeroes past the old end
    run(peer("qemu-img"), "compare", "-f", fmt, "-F", fmt, theirs, ours)
    if int(str(info(ours)["virtual-size"])) >= int(str(info(orig)["virtual-size"])):
        # compare without -s: the image that is longer must read zeroes past the other's end
        run(peer("qemu-img"), "compare", "-f", fmt, "-F", fmt, orig, ours)


GROWS = [
    (["-f", "raw", "a.raw", "6M"], "a.raw", "raw"),
    (["-f", "raw", "a.raw", "+1G"], "a.raw", "raw"),
    (["a.raw", "+1M"], "a.raw", "raw"),  # probed raw: qemu's warning, on both sides
    (["-f", "raw", "a.raw", "4097k"], "a.raw", "raw"),
    (["-q", "-f", "raw", "a.raw", "5M"], "a.raw", "raw"),
    (["-f", "raw", "--preallocation=falloc", "a.raw", "8M"], "a.raw", "raw"),
    (["-f", "raw", "--preallocation=full", "a.raw", "+2M"], "a.raw", "raw"),
    (["--shrink", "-f", "raw", "a.raw", "1536k"], "a.raw", "raw"),
    (["--shrink", "-f", "raw", "a.raw", "-3M"], "a.raw", "raw"),
    (["a.qcow2", "16M"], "a.qcow2", "qcow2"),
    (["a.qcow2", "+100G"], "a.qcow2", "qcow2"),
    (["a.qcow2", "8M"], "a.qcow2", "qcow2"),
    (["-q", "a.qcow2", "9M"], "a.qcow2", "qcow2"),
    # 512-byte clusters: one L1 cluster maps 64 L2 tables of 32 KiB each, so these need a bigger L1 table
    (["small.qcow2", "1G"], "small.qcow2", "qcow2"),
    (["small.qcow2", "+3M"], "small.qcow2", "qcow2"),
    (["wide.qcow2", "2G"], "wide.qcow2", "qcow2"),
    (["ext.qcow2", "+10G"], "ext.qcow2", "qcow2"),
    (["top.qcow2", "12M"], "top.qcow2", "qcow2"),
    (["short.qcow2", "8M"], "short.qcow2", "qcow2"),
    (["short.qcow2", "+1G"], "short.qcow2", "qcow2"),
    (["cut.qcow2", "567k"], "cut.qcow2", "qcow2"),
    (["snap.qcow2", "2G"], "snap.qcow2", "qcow2"),  # v3 with internal snapshots grows in qemu 7.2
    (["--preallocation=metadata", "a.qcow2", "20M"], "a.qcow2", "qcow2"),
    (["--preallocation=falloc", "small.qcow2", "3M"], "small.qcow2", "qcow2"),
    (["--preallocation=full", "ext.qcow2", "+8M"], "ext.qcow2", "qcow2"),
    (["--preallocation=falloc", "wide.qcow2", "1G"], "wide.qcow2", "qcow2"),
    (["--shrink", "a.qcow2", "5M"], "a.qcow2", "qcow2"),
    (["--shrink", "a.qcow2", "-3M"], "a.qcow2", "qcow2"),
    (["--shrink", "a.qcow2", "512"], "a.qcow2", "qcow2"),
    (["--shrink", "wide.qcow2", "1000k"], "wide.qcow2", "qcow2"),
    (["--shrink", "ext.qcow2", "3M"], "ext.qcow2", "qcow2"),
    (["--shrink", "small.qcow2", "100k"], "small.qcow2", "qcow2"),
]


@pytest.mark.parametrize(("args", "name", "fmt"), GROWS, ids=[" ".join(a) for a, _, _ in GROWS])
def test_resize(images: Path, tmp_path: Path, args: list[str], name: str, fmt: str) -> None:
    q, _ = both(images, tmp_path, args)
    assert q.returncode == 0
    verify(images, tmp_path, name, fmt)


def test_shrunk_qcow2_file_is_cut_as_qemu_cuts_it(images: Path, tmp_path: Path) -> None:
    both(images, tmp_path, ["--shrink", "wide.qcow2", "1000k"])
    assert (tmp_path / "o" / "wide.qcow2").stat().st_size == (tmp_path / "q" / "wide.qcow2").stat().st_size


def test_preallocation_allocates(images: Path, tmp_path: Path) -> None:
    both(images, tmp_path, ["-f", "raw", "--preallocation=full", "a.raw", "64M"])
    ours, theirs = (tmp_path / side / "a.raw" for side in ("o", "q"))
    # (both allocated, not an equal block count: delayed allocation makes that racy)
    assert ours.stat().st_blocks * 512 >= 64 << 20
    assert theirs.stat().st_blocks * 512 >= 64 << 20


@pytest.mark.parametrize("mode", ["falloc", "full"])
def test_qcow2_preallocation_allocates(images: Path, tmp_path: Path, mode: str) -> None:
    both(images, tmp_path, [f"--preallocation={mode}", "a.qcow2", "72M"])
    ours = tmp_path / "o" / "a.qcow2"
    assert ours.stat().st_blocks * 512 >= 64 << 20
    entries = json.loads(run(peer("qemu-img"), "map", "--output=json", ours).stdout)
    assert all(e["data"] for e in entries if e["start"] >= 8 << 20)


FAILS = [
    ["-f", "raw", "a.raw", "1M"], ["a.raw", "1M"], ["-f", "raw", "a.raw", "-1M"], ["-f", "raw", "a.raw", "0"],
    ["--shrink", "-f", "raw", "a.raw", "-10M"], ["-f", "raw", "a.raw", "1x"], ["-f", "raw", "a.raw", "9E"],
    ["-f", "raw", "a.raw", "+9E"], ["-f", "raw", "--preallocation=metadata", "a.raw", "8M"],
    ["--preallocation=x", "a.raw", "8M"], ["-f", "raw", "--preallocation=full", "--shrink", "a.raw", "1M"],
    ["-f", "raw", "--preallocation=full", "a.raw", "4M"], ["a.qcow2", "1M"], ["a.qcow2", "-1k"],
    ["snap2.qcow2", "2M"], ["short2.qcow2", "1M"], ["a.vmdk", "2M"], ["missing.qcow2", "1M"],
    ["-f", "qcow2", "a.raw", "8M"],
    ["a.raw"], [], ["-x", "a.raw", "1M"], ["--foo", "a.raw", "1M"], ["a.raw", "b.raw", "1M"], [".", "1M"],
]


@pytest.mark.parametrize("args", FAILS, ids=[" ".join(a) or "none" for a in FAILS])
def test_refusals(images: Path, tmp_path: Path, args: list[str]) -> None:
    q, _ = both(images, tmp_path, args)
    assert q.returncode == 1
    for name in ("a.raw", "a.qcow2", "snap2.qcow2", "short2.qcow2"):
        assert (tmp_path / "o" / name).read_bytes() == (images / name).read_bytes()


def test_qcow2_with_snapshots_keeps_them(images: Path, tmp_path: Path) -> None:
    both(images, tmp_path, ["snap.qcow2", "+1G"])
    out = run(peer("qemu-img"), "snapshot", "-l", tmp_path / "o" / "snap.qcow2").stdout
    assert b"s1" in out
    run(peer("qemu-img"), "snapshot", "-a", "s1", tmp_path / "o" / "snap.qcow2")
    run(peer("qemu-img"), "check", tmp_path / "o" / "snap.qcow2")


@pytest.mark.parametrize("args", [["--preallocation=full", "snap.qcow2", "8M"],
                                  ["--preallocation=falloc", "top.qcow2", "16M"]])
def test_unsupported_qcow2_cases_are_clear_refusals(images: Path, tmp_path: Path, args: list[str]) -> None:
    """What qemu 7.2 does and imagecore does not yet: one line of error, the image untouched."""
    shutil.copytree(images, tmp_path / "o")
    run(peer("qemu-img"), "resize", "-q", tmp_path / "o" / "snap.qcow2", "4M")
    name = args[-2]
    before = (tmp_path / "o" / name).read_bytes()
    o = subprocess.run([*imagecore_cmd(), "resize", *args], capture_output=True, cwd=tmp_path / "o",
                       timeout=60)
    assert o.returncode == 1
    assert o.stderr.startswith(b"imagecore: ") and b"not supported" in o.stderr and o.stderr.count(b"\n") == 1
    assert (tmp_path / "o" / name).read_bytes() == before


@pytest.mark.parametrize(("opts", "new"), [("cluster_size=512", "100k"), ("cluster_size=64k", "1000k"),
                                           ("cluster_size=512,refcount_bits=64", "100k"),
                                           ("cluster_size=4k", "2M"), ("extended_l2=on", "5M")])
def test_qcow2_shrink_with_snapshots(tmp_path: Path, opts: str, new: str) -> None:
    """The L2 table the new end cuts through is shared with the snapshot: the active image gets a copy, and
    the snapshot still reads as it was."""
    qi, qio = peer("qemu-img"), peer("qemu-io")
    for side in ("q", "o"):
        d = tmp_path / side
        d.mkdir()
        run(qi, "create", "-q", "-f", "qcow2", "-o", opts, d / "s.qcow2", "8M")
        run(qio, "-f", "qcow2", "-c", "write -P 1 0 8M", d / "s.qcow2")
        run(qi, "snapshot", "-c", "s1", d / "s.qcow2")
        run(qio, "-f", "qcow2", "-c", "write -P 2 64k 1M", d / "s.qcow2")
    run(qi, "convert", "-l", "s1", "-O", "raw", tmp_path / "o" / "s.qcow2", tmp_path / "snap.raw")
    q = subprocess.run([qi, "resize", "--shrink", "s.qcow2", new], capture_output=True, cwd=tmp_path / "q")
    o = subprocess.run([*imagecore_cmd(), "resize", "--shrink", "s.qcow2", new], capture_output=True,
                       cwd=tmp_path / "o")
    assert (o.returncode, o.stdout, o.stderr) == (q.returncode, q.stdout, q.stderr)
    ours = tmp_path / "o" / "s.qcow2"
    run(qi, "check", ours)
    run(qi, "compare", "-f", "qcow2", "-F", "qcow2", tmp_path / "q" / "s.qcow2", ours)
    assert ours.stat().st_size == (tmp_path / "q" / "s.qcow2").stat().st_size
    run(qi, "snapshot", "-a", "s1", ours)
    run(qi, "check", ours)
    run(qi, "compare", "-f", "raw", "-F", "qcow2", tmp_path / "snap.raw", ours)
    assert info(ours)["virtual-size"] == 8 << 20


@pytest.fixture
def held(images: Path, tmp_path: Path) -> Iterator[Path]:
    """Copies of the images with qemu-io holding a.qcow2 and a.raw open read-write, as VMs would."""
    shutil.copytree(images, tmp_path / "h")
    procs = [subprocess.Popen([peer("qemu-io"), "-f", fmt, name], cwd=tmp_path / "h", stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for fmt, name in (("qcow2", "a.qcow2"), ("raw", "a.raw"))]
    try:
        for proc in procs:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(b"read 0 512\n")
            proc.stdin.flush()
            proc.stdout.readline()
        yield tmp_path / "h"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_held_qcow2_same_lock_error(held: Path) -> None:
    before = (held / "a.qcow2").read_bytes()
    q = subprocess.run([peer("qemu-img"), "resize", "a.qcow2", "16M"], capture_output=True, cwd=held,
                       timeout=60)
    o = subprocess.run([*imagecore_cmd(), "resize", "a.qcow2", "16M"], capture_output=True, cwd=held,
                       timeout=60)
    assert q.returncode == o.returncode == 1
    assert o.stderr.replace(b"imagecore", b"PROG") == q.stderr.replace(b"qemu-img", b"PROG")
    assert b"lock" in o.stderr
    assert (held / "a.qcow2").read_bytes() == before


def test_held_raw_resizes_as_qemu_img_does(held: Path) -> None:
    """qemu-img's raw node shares every permission: a raw disk a VM has open is resized all the same."""
    q = subprocess.run([peer("qemu-img"), "resize", "-f", "raw", "a.raw", "16M"], capture_output=True,
                       cwd=held, timeout=60)
    o = subprocess.run([*imagecore_cmd(), "resize", "-f", "raw", "a.raw", "32M"], capture_output=True,
                       cwd=held, timeout=60)
    assert (o.returncode, o.stdout, o.stderr) == (q.returncode, q.stdout, q.stderr)
    assert (o.returncode, o.stdout, o.stderr) == (0, b"Image resized.\n", b"")
    assert (held / "a.raw").stat().st_size == 32 << 20


def test_shrink_gives_back_the_freed_clusters_inside_the_file(tmp_path: Path) -> None:
    """qemu's iotest 250: the clusters a shrink frees lose their blocks on disk (qemu discards them) even
    where the file keeps its length because a cluster still in use lies after them."""
    qi, qio = peer("qemu-img"), peer("qemu-io")
    src = tmp_path / "src"
    src.mkdir()
    run(qi, "create", "-q", "-f", "qcow2", "-o", "cluster_size=1M,preallocation=metadata", src / "p.qcow2",
        "40M")
    # the last guest clusters get the first host clusters, the first ones the last: a shrink keeps the tail
    run(qio, "-f", "qcow2", "-c", "discard 0 4M", "-c", "discard 36M 4M", "-c", "write -P 0x71 36M 4M",
        "-c", "write -P 0x72 0 4M", src / "p.qcow2")
    both(src, tmp_path, ["--shrink", "p.qcow2", "2M"])
    ours, theirs = tmp_path / "o" / "p.qcow2", tmp_path / "q" / "p.qcow2"
    assert ours.stat().st_size == theirs.stat().st_size
    assert ours.stat().st_blocks == theirs.stat().st_blocks
    assert ours.stat().st_blocks * 512 < (src / "p.qcow2").stat().st_blocks * 512 - (4 << 20)
    run(qi, "check", ours)
    run(qi, "compare", theirs, ours)
