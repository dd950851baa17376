"""`imagecore measure` against `qemu-img measure`: sizes, -o options, images with data and backing files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.peers import imagecore_cmd, peer, run

Proc = subprocess.CompletedProcess[bytes]


def both(cwd: Path, *args: str) -> tuple[Proc, Proc]:
    q = subprocess.run([peer("qemu-img"), "measure", *args], capture_output=True, cwd=cwd, timeout=120)
    o = subprocess.run([*imagecore_cmd(), "measure", *args], capture_output=True, cwd=cwd, timeout=120)
    assert b"Traceback" not in o.stderr
    return q, o


def same(q: Proc, o: Proc) -> None:
    assert (o.returncode, o.stdout) == (q.returncode, q.stdout)
    assert o.stderr.replace(b"imagecore", b"PROG") == q.stderr.replace(b"qemu-img", b"PROG")


SIZES = ["0", "1", "1M", "1.5G", "100T"]
OPTIONS = ["", "cluster_size=512", "cluster_size=4k", "cluster_size=2M", "refcount_bits=1",
           "refcount_bits=64", "extended_l2=on", "extended_l2=on,cluster_size=16k", "preallocation=metadata",
           "preallocation=falloc", "preallocation=full,cluster_size=1M", "compat=0.10", "lazy_refcounts=on",
           "backing_file=x", "cluster_size=512,refcount_bits=8"]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("opts", OPTIONS)
def test_sizes_and_options(tmp_path: Path, size: str, opts: str) -> None:
    extra = ["-o", opts] if opts else []
    q, o = both(tmp_path, "--output=json" if size == "1M" else "--output=human", "-O", "qcow2", *extra,
                "--size", size)
    same(q, o)
    assert q.returncode == 0 or b"image size is too large" in q.stderr


@pytest.mark.parametrize("args", [
    [], ["--size", "1G", "x.raw"], ["-f", "raw"], ["-l", "s"], ["a", "b"], ["--size", "x"], ["--size", "-1"],
    ["--size", "1G", "-O", "vmdk"], ["--size", "1G", "-O", "vpc"], ["--size", "1G", "-O", "foo"],
    ["--size", "1G", "-O", "cloop"], ["--size", "1G", "--output=yaml"],
    ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=1000"],
    ["--size", "1G", "-O", "qcow2", "-o", "compat=v2"],
    ["--size", "1G", "-O", "qcow2", "-o", "refcount_bits=3"],
    ["--size", "1G", "-O", "qcow2", "-o", "compat=0.10,refcount_bits=8"],
    ["--size", "1G", "-O", "qcow2", "-o", "preallocation=x"], ["--size", "1G", "-O", "qcow2", "-o", "foo=1"],
    ["--size", "1G", "-O", "qcow2", "-o", "extended_l2=x"],
    ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=x"],
    ["--size", "1G", "-O", "qcow2", "-o", "help"], ["--size", "1G", "-O", "qcow2", "-o", ","],
    ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=512,extended_l2=on"],
    ["--size", "1E", "-O", "qcow2"], ["--size", "1G", "-O", "raw", "-o", "cluster_size=4k"],
    ["-O", "qcow2", "missing.qcow2"],
])
def test_errors(tmp_path: Path, args: list[str]) -> None:
    q, o = both(tmp_path, *args)
    same(q, o)
    assert q.returncode == 1


@pytest.fixture
def images(tmp_path: Path) -> Path:
    qi = peer("qemu-img")
    run(qi, "create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "4M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -z 2M 64k", "-c",
        "write -P 9 2500k 3k", tmp_path / "base.qcow2")
    run(qi, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", tmp_path / "top.qcow2")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 2 3M 100k", tmp_path / "top.qcow2")
    run(qi, "create", "-q", "-f", "raw", tmp_path / "r.raw", "3M")
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 3 1000 5000", "-c", "write -P 4 1500k 70k",
        tmp_path / "r.raw")
    run(qi, "create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4k", tmp_path / "v2.qcow2", "5M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 5 10k 1M", tmp_path / "v2.qcow2")
    return tmp_path


@pytest.mark.parametrize("image", ["base.qcow2", "top.qcow2", "r.raw", "v2.qcow2"])
@pytest.mark.parametrize("opts", ["", "cluster_size=512", "cluster_size=2M", "compat=0.10", "backing_file=x",
                                  "preallocation=full", "extended_l2=on", "refcount_bits=1"])
def test_from_images(images: Path, image: str, opts: str) -> None:
    extra = ["-o", opts] if opts else []
    for out in ("human", "json"):
        q, o = both(images, f"--output={out}", "-O", "qcow2", *extra, image)
        same(q, o)
        assert q.returncode == 0
    q, o = both(images, "-O", "raw", image)
    same(q, o)


@pytest.mark.parametrize("size", ["0", "1", "511", "1M", "1.5G"])
def test_raw(tmp_path: Path, size: str) -> None:
    q, o = both(tmp_path, "--size", size)
    same(q, o)
    assert q.returncode == 0


def test_forced_format_and_missing_snapshot(images: Path) -> None:
    for args in (["-f", "raw", "-O", "qcow2", "top.qcow2"], ["-O", "qcow2", "-l", "nosuch", "top.qcow2"],
                 ["-f", "qcow2", "r.raw"], ["-O", "vmdk", "top.qcow2"], ["-O", "qcow2", str(images)]):
        q, o = both(images, *args)
        same(q, o)


def test_required_size_is_enough(images: Path) -> None:
    """What measure says a converted image needs is what qemu-img convert then uses, or more."""
    o = run(*imagecore_cmd(), "measure", "--output=json", "-O", "qcow2", images / "top.qcow2")
    required = json.loads(o.stdout)["required"]
    run(peer("qemu-img"), "convert", "-O", "qcow2", images / "top.qcow2", images / "conv.qcow2")
    assert (images / "conv.qcow2").stat().st_size <= required


@pytest.fixture
def special(tmp_path: Path) -> Path:
    qi, qio = peer("qemu-img"), peer("qemu-io")
    run(qi, "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", tmp_path / "meta.qcow2", "8M")
    run(qio, "-f", "qcow2", "-c", "write -P 1 1M 1M", tmp_path / "meta.qcow2")
    run(qi, "create", "-q", "-f", "qcow2", "-o", "preallocation=falloc", tmp_path / "falloc.qcow2", "8M")
    run(qi, "create", "-q", "-f", "qcow2", tmp_path / "bitmaps.qcow2", "8M")
    run(qio, "-f", "qcow2", "-c", "write -P 1 0 1M", tmp_path / "bitmaps.qcow2")
    run(qi, "bitmap", "--add", tmp_path / "bitmaps.qcow2", "b0")
    run(qi, "bitmap", "--add", "-g", "4k", tmp_path / "bitmaps.qcow2", "a-bitmap-with-a-longer-name")
    run(qi, "create", "-q", "-f", "qcow2", tmp_path / "snap.qcow2", "4M")
    run(qio, "-f", "qcow2", "-c", "write -P 1 0 64k", tmp_path / "snap.qcow2")
    run(qi, "snapshot", "-c", "s1", tmp_path / "snap.qcow2")
    run(qio, "-f", "qcow2", "-c", "write -P 2 1M 2M", tmp_path / "snap.qcow2")
    return tmp_path


@pytest.mark.parametrize("args", [
    ["meta.qcow2"], ["falloc.qcow2"], ["bitmaps.qcow2"], ["--output=json", "bitmaps.qcow2"],
    ["-o", "compat=0.10", "bitmaps.qcow2"], ["-o", "cluster_size=512", "bitmaps.qcow2"],
    ["snap.qcow2"], ["-l", "s1", "snap.qcow2"], ["-l", "1", "snap.qcow2"],
    ["-l", "snapshot.name=s1", "snap.qcow2"], ["-l", "snapshot.id=1,snapshot.name=x", "snap.qcow2"],
    ["-l", "snapshot.foo=1", "snap.qcow2"], ["-l", "nosuch", "snap.qcow2"],
    ["-l", "s1", "-f", "raw", "snap.qcow2"],
])
def test_preallocated_bitmaps_and_snapshots(special: Path, args: list[str]) -> None:
    """Metadata preallocation (qemu then asks the file for holes), persistent bitmaps, internal snapshots."""
    q, o = both(special, "-O", "qcow2", *args)
    same(q, o)


def test_held_images(images: Path) -> None:
    """A qcow2 image a VM writes is refused as qemu-img refuses it; a raw one is measured, as qemu-img's raw
    node shares every permission."""
    procs = [subprocess.Popen([peer("qemu-io"), "-f", fmt, name], cwd=images, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for fmt, name in (("qcow2", "base.qcow2"), ("raw", "r.raw"))]
    try:
        for proc in procs:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(b"read 0 512\n")
            proc.stdin.flush()
            proc.stdout.readline()
        for args in (["-O", "qcow2", "base.qcow2"], ["-O", "qcow2", "r.raw"], ["-f", "raw", "r.raw"],
                     ["-O", "qcow2", "-U", "base.qcow2"]):
            q, o = both(images, *args)
            same(q, o)
        assert b"lock" in both(images, "base.qcow2")[1].stderr
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
