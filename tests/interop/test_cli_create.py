"""`imagecore create` against `qemu-img create`: the Formatting line, -o help, sizes, and valid images."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.peers import imagecore_cmd, one_error_as_qemu, peer, run

Proc = subprocess.CompletedProcess[bytes]


def both(work: Path, *args: str) -> tuple[Proc, Proc]:
    """Run the same create line in two folders, so the names (and the Formatting line) are the same."""
    (work / "q").mkdir(exist_ok=True)
    (work / "o").mkdir(exist_ok=True)
    q = subprocess.run([peer("qemu-img"), *args], capture_output=True, cwd=work / "q", timeout=120)
    o = subprocess.run([*imagecore_cmd(), *args], capture_output=True, cwd=work / "o", timeout=120)
    assert b"Traceback" not in o.stderr
    return q, o


def info(path: Path) -> dict[str, object]:
    return dict(json.loads(run(peer("qemu-img"), "info", "--output=json", "-U", path).stdout))


@pytest.mark.parametrize("size", ["0", "1", "100", "512", "1k", "1K", "1.5G", "1.3M", "1.1k", "0x10",
                                  "3b", "4096B", "2T", " 5"])
def test_raw_sizes(work: Path, size: str) -> None:
    q, o = both(work, "create", "-f", "raw", "img.raw", size)
    assert (o.returncode, o.stdout) == (q.returncode, q.stdout)
    assert q.returncode == 0
    assert (work / "o" / "img.raw").stat().st_size == (work / "q" / "img.raw").stat().st_size
    assert info(work / "o" / "img.raw")["virtual-size"] == info(work / "q" / "img.raw")["virtual-size"]


@pytest.mark.parametrize("size", ["-5", "1Q", "1.5", "1e3", "9E", "", "1.5b", "abc"])
def test_bad_sizes(work: Path, size: str) -> None:
    q, o = both(work, "create", "-f", "raw", "img.raw", size)
    assert q.returncode == o.returncode == 1
    assert o.stdout == b""
    one_error_as_qemu(o, q)


@pytest.mark.parametrize("opts", ["preallocation=off", "preallocation=falloc", "preallocation=full"])
def test_raw_preallocation(work: Path, opts: str) -> None:
    q, o = both(work, "create", "-f", "raw", "-o", opts, "p.raw", "2M")
    assert (o.returncode, o.stdout) == (q.returncode, q.stdout) == (0, q.stdout)
    qi, oi = info(work / "q" / "p.raw"), info(work / "o" / "p.raw")
    assert qi["virtual-size"] == oi["virtual-size"]
    assert qi["actual-size"] == oi["actual-size"]


def test_help(work: Path) -> None:
    for args in (["-f", "raw", "-o", "help"], ["-f", "raw", "-o", "help", "x.raw"], ["-f", "raw", "-o", "?"],
                 ["-f", "qcow2", "-o", "help"], ["-f", "qcow2", "-o", "help", "x.qcow2"]):
        q, o = both(work, "create", *args)
        assert (o.returncode, o.stdout.decode()) == (q.returncode, q.stdout.decode())
        assert q.returncode == 0


@pytest.mark.parametrize("opts", [
    [],
    ["-o", "compat=0.10"],
    ["-o", "compat=1.1,cluster_size=4096"],
    ["-o", "cluster_size=2M,lazy_refcounts=on"],
    ["-o", "extended_l2=on,cluster_size=128k"],
    ["-o", "refcount_bits=8", "-o", "compression_type=zstd"],
    ["-o", "preallocation=metadata"],
    ["-o", "preallocation=falloc"],
    ["-q"],
])
def test_qcow2(work: Path, opts: list[str]) -> None:
    q, o = both(work, "create", "-f", "qcow2", *opts, "img.qcow2", "100M")
    assert (o.returncode, o.stdout.decode(), o.stderr) == (q.returncode, q.stdout.decode(), b"")
    ours_img = work / "o" / "img.qcow2"
    run(peer("qemu-img"), "check", ours_img)
    qi, oi = info(work / "q" / "img.qcow2"), info(ours_img)
    for key in ("virtual-size", "cluster-size", "format-specific", "dirty-flag"):
        assert oi.get(key) == qi.get(key), key
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "read -P 1 0 1M", ours_img)
    run(peer("qemu-img"), "check", ours_img)


def test_qcow2_backing(work: Path) -> None:
    for d in ("q", "o"):
        (work / d).mkdir(exist_ok=True)
        run(peer("qemu-img"), "create", "-f", "qcow2", work / d / "base.qcow2", "20M")
    for args in (["-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
                 ["-b", "base.qcow2", "-F", "qcow2", "top2.qcow2", "5M"],
                 ["-u", "-b", "missing.qcow2", "-F", "qcow2", "top3.qcow2", "1M"],
                 ["-o", "backing_file=base.qcow2,backing_fmt=qcow2", "top4.qcow2"]):
        q, o = both(work, "create", "-f", "qcow2", *args)
        assert (o.returncode, o.stdout.decode()) == (q.returncode, q.stdout.decode()), o.stderr.decode()
        assert q.returncode == 0
    run(peer("qemu-img"), "check", work / "o" / "top.qcow2")
    oi = info(work / "o" / "top.qcow2")
    assert oi["backing-filename"] == "base.qcow2" and oi["virtual-size"] == 20 << 20


@pytest.mark.parametrize("args", [
    ["-f", "qcow2", "-b", "base.qcow2", "nobf.qcow2"],
    ["-f", "raw", "-b", "x", "-F", "raw", "r.raw", "1M"],
    ["-f", "qcow2", "-b", "nonexist", "-F", "qcow2", "n.qcow2"],
    ["-f", "qcow2", "-o", "foo=bar", "n.qcow2", "1M"],
    ["-f", "raw", "-o", "foo=bar", "n.raw", "1M"],
    ["-f", "nope", "n", "1M"],
    ["-f", "raw", "big.raw", "1P"],
    ["-f", "qcow2", "n.qcow2"],
    ["-f", "qcow2", "-o", "size=1M", "n.qcow2", "2M"],
    ["-f", "raw", "-o", "preallocation=bad", "n.raw", "1M"],
    ["-f", "qcow2", "-o", "cluster_size=3000", "n.qcow2", "1M"],
    ["-f", "qcow2", "-o", "compat=2.0", "n.qcow2", "1M"],
    ["--nope"],
    [],
])
def test_create_errors(work: Path, args: list[str]) -> None:
    q, o = both(work, "create", *args)
    assert q.returncode == o.returncode == 1
    one_error_as_qemu(o, q)


@pytest.mark.parametrize("olist", [",", ",a=1", "cluster_size=64k,"])
def test_invalid_option_list_refused_as_qemu_img(tmp_path: Path, olist: str) -> None:
    ref, ours = both(tmp_path, "create", "-f", "qcow2", "-o", olist, "x.qcow2", "1M")
    assert ref.returncode == 1
    assert ours.returncode == ref.returncode
    assert ours.stderr.replace(b"imagecore:", b"qemu-img:") == ref.stderr
    assert not (tmp_path / "o" / "x.qcow2").exists()
