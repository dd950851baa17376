"""`imagecore bench` against `qemu-img bench`: the same lines (but for the time) and exit codes for the flag
combinations and refusals, what -w writes read back by qemu-io, and the flushes --flush-interval asks for."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from imagecore.ops import bench as bench_op
from tests.peers import imagecore_cmd, peer, qemu10, run

Proc = subprocess.CompletedProcess[bytes]
_TIME = re.compile(rb"Run completed in [0-9]+\.[0-9]{3} seconds\.")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bench")
    qi, qio = peer("qemu-img"), peer("qemu-io")
    run(qi, "create", "-q", "-f", "qcow2", d / "a.qcow2", "4M")
    run(qio, "-f", "qcow2", "-c", "write -P 0x11 0 2M", d / "a.qcow2")
    run(qi, "create", "-q", "-f", "raw", d / "r.raw", "1M")
    run(qi, "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", d / "top.qcow2")
    run(qi, "create", "-q", "-f", "qcow2", d / "empty.qcow2", "0")
    return d


def _norm(b: bytes) -> bytes:
    return _TIME.sub(b"Run completed in X seconds.", b)


def both(images: Path, work: Path, args: list[str], qemu: str | None = None) -> tuple[Proc, Proc]:
    """qemu-img (or ``qemu``) and imagecore bench on copies of the images: the same output and exit code."""
    for side in ("q", "o"):
        shutil.copytree(images, work / side)
    q = subprocess.run([qemu or peer("qemu-img"), "bench", *args], capture_output=True, cwd=work / "q",
                       timeout=120)
    o = subprocess.run([*imagecore_cmd(), "bench", *args], capture_output=True, cwd=work / "o", timeout=120)
    assert b"Traceback" not in o.stderr, o.stderr
    assert o.returncode == q.returncode, (o.stderr, q.stderr)
    assert _norm(o.stdout) == _norm(q.stdout)
    assert o.stderr.replace(b"imagecore", b"PROG") == q.stderr.replace(b"qemu-img", b"PROG")
    return q, o


RUNS = [
    ["a.qcow2"],  # the defaults: 75000 reads of 4 KiB, 64 in flight
    ["-c", "100", "-w", "a.qcow2"],
    ["-c", "64", "-d", "8", "-s", "64k", "-S", "128k", "-o", "4k", "a.qcow2"],
    ["-c", "300", "-d", "0x10", "-S", "1M", "a.qcow2"],  # wraps at the image's end
    ["-c", "100", "-w", "-d", "8", "--flush-interval=10", "a.qcow2"],
    ["-c", "100", "-w", "-d", "8", "--flush-interval=10", "--no-drain", "a.qcow2"],
    ["-c", "20", "-w", "--pattern=0x5a", "-f", "raw", "r.raw"],
    ["-c", "20", "-w", "r.raw"],  # probed raw, written: qemu's warning
    ["-c", "10", "-t", "none", "-n", "a.qcow2"], ["-c", "10", "-i", "io_uring", "-t", "unsafe", "a.qcow2"],
    ["-c", "10", "-i", "native", "-t", "directsync", "a.qcow2"], ["-c", "10", "-q", "-U", "a.qcow2"],
    ["-c", "0", "a.qcow2"], ["-c", "5", "-s", "0", "a.qcow2"], ["-c", "010", "-d", "+3", "top.qcow2"],
    ["-c", "0", "-d", "1", "--no-drain", "a.qcow2"],
]


@pytest.mark.parametrize("args", RUNS, ids=[" ".join(a) for a in RUNS])
def test_bench(images: Path, tmp_path: Path, args: list[str]) -> None:
    q, o = both(images, tmp_path, args)
    assert q.returncode == 0
    assert _TIME.search(o.stdout)
    for name in ("a.qcow2", "top.qcow2"):
        run(peer("qemu-img"), "check", tmp_path / "o" / name)
    run(peer("qemu-img"), "compare", tmp_path / "q" / "a.qcow2", tmp_path / "o" / "a.qcow2")


FAILS = [
    ["-c", "x", "a.qcow2"], ["-c", "-1", "a.qcow2"], ["-c", "2147483648", "a.qcow2"], ["-c", "1k", "a.qcow2"],
    ["-c", "", "a.qcow2"], ["-c", "5 ", "a.qcow2"], ["-c", "08", "a.qcow2"], ["-d", "x", "a.qcow2"],
    ["-d", "2147483648", "a.qcow2"], ["-o", "x", "a.qcow2"], ["-o", "-1", "a.qcow2"],
    ["-o", "20E", "a.qcow2"],
    ["-s", "1x", "a.qcow2"], ["-s", "2G", "a.qcow2"], ["-S", "x", "a.qcow2"], ["-S", "2G", "a.qcow2"],
    ["-t", "bogus", "a.qcow2"], ["-i", "bogus", "a.qcow2"], ["-c", "1", "-i", "native", "a.qcow2"],
    ["-c", "1", "-n", "a.qcow2"], ["-c", "1", "-n", "missing.qcow2"], ["--pattern=x", "a.qcow2"],
    ["--pattern=256", "a.qcow2"], ["--pattern=-1", "a.qcow2"], ["-c", "10", "--flush-interval=10", "a.qcow2"],
    ["-c", "10", "-w", "--flush-interval=10", "a.qcow2"], ["-w", "--flush-interval=x", "a.qcow2"],
    ["-c", "1", "a.qcow2", "r.raw"], [], ["-c", "1", "missing.qcow2"], ["-c", "1", "."],
    ["-c", "1", "-U", "-w", "a.qcow2"], ["-x", "a.qcow2"], ["-c", "1", "-c", "a.qcow2"],
    ["-c", "5", "-s", "2M", "-d", "2", "-o", "3M", "a.qcow2"],  # past the end: "Failed request"
    ["-c", "3", "-s", "512k", "-d", "1", "-S", "300k", "-o", "100k", "-w", "r.raw"],  # wraps past the end
]


@pytest.mark.parametrize("args", FAILS, ids=[" ".join(a) or "none" for a in FAILS])
def test_refusals(images: Path, tmp_path: Path, args: list[str]) -> None:
    q, _ = both(images, tmp_path, args)
    assert q.returncode == 1


def test_depth_zero_is_refused_as_qemu_10_refuses_it(images: Path, tmp_path: Path) -> None:
    """qemu-img 7.2 takes -d 0 and then waits forever; qemu 10 refuses it, and so does imagecore."""
    q, _ = both(images, tmp_path, ["-c", "10", "-d", "0", "a.qcow2"], qemu=qemu10("qemu-img"))
    assert q.returncode == 1 and b"queue depth" in q.stderr


def test_writes_land_where_qemu_img_puts_them(images: Path, tmp_path: Path) -> None:
    args = ["-w", "--pattern=0xa5", "-c", "24", "-d", "4", "-s", "64k", "-S", "96k", "-o", "1000k",
            "a.qcow2"]
    both(images, tmp_path, args)
    ours = tmp_path / "o" / "a.qcow2"
    run(peer("qemu-img"), "compare", tmp_path / "q" / "a.qcow2", ours)
    # request i lands at 1000k + i * 96k, the last at 3208k; around them the image is as it was
    run(peer("qemu-io"), "-c", "read -P 0xa5 1000k 64k", "-c", "read -P 0x11 1064k 32k", "-c",
        "read -P 0xa5 3208k 64k", "-c", "read -P 0x11 0 1000k", "-c", "read -P 0 3272k 824k", ours)
    run(peer("qemu-img"), "check", ours)


def test_empty_image_fails_requests_instead_of_dividing_by_zero(images: Path, tmp_path: Path) -> None:
    """qemu-img 7.2 dies of SIGFPE on an image of size 0 (it wraps offsets modulo the size)."""
    shutil.copytree(images, tmp_path / "o")
    o = subprocess.run([*imagecore_cmd(), "bench", "-c", "5", "-w", "-s", "0", "empty.qcow2"],
                       capture_output=True, cwd=tmp_path / "o", timeout=60)
    assert o.returncode == 0 and _TIME.search(o.stdout), o.stderr
    o = subprocess.run([*imagecore_cmd(), "bench", "-c", "5", "empty.qcow2"], capture_output=True,
                       cwd=tmp_path / "o", timeout=60)
    assert (o.returncode, o.stderr) == (1, b"imagecore: Failed request: Input/output error\n")


# Flush requests over 100 requests in flight 8 (or 1) at a time, one due after every 10: drained, one
# every tenth request; undrained, qemu's bench_cb asks again at each completion that still sees the same
# count of requests not yet sent, which at the end (none left to send) is each of the last 8.
@pytest.mark.parametrize(("drain", "depth", "flushes"), [(True, 8, 10), (False, 8, 17), (True, 1, 10),
                                                          (False, 1, 10)])
async def test_flush_interval_flushes(images: Path, tmp_path: Path, drain: bool, depth: int,
                                      flushes: int) -> None:
    shutil.copy(images / "a.qcow2", tmp_path / "a.qcow2")
    o = bench_op.BenchOptions(count=100, depth=depth, write=True, flush_interval=10, drain=drain,
                              pattern=0x3c)
    res = await bench_op.bench(str(tmp_path / "a.qcow2"), o)
    assert res.flushes == flushes
    assert res.header() == ["Sending 100 write requests, 4096 bytes each, "
                            f"{depth} in parallel (starting at offset 0, step size 4096)",
                            "Sending flush every 10 requests"]
    run(peer("qemu-io"), "-c", "read -P 0x3c 0 400k", tmp_path / "a.qcow2")


@contextmanager
def _held(work: Path, args: list[str]) -> Iterator[None]:
    proc = subprocess.Popen([peer("qemu-io"), *args], cwd=work, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"read 0 512\n")
        proc.stdin.flush()
        assert b"read" in proc.stdout.readline()
        yield
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(("holder", "args"), [
    (["-f", "qcow2", "a.qcow2"], ["-c", "1", "a.qcow2"]),
    (["-f", "qcow2", "a.qcow2"], ["-c", "1", "-U", "a.qcow2"]),
    (["-r", "-f", "qcow2", "a.qcow2"], ["-c", "1", "-w", "a.qcow2"]),
    (["-r", "-f", "qcow2", "a.qcow2"], ["-c", "1", "a.qcow2"]),
])
def test_locks(images: Path, tmp_path: Path, holder: list[str], args: list[str]) -> None:
    got = {}
    for side, cmd in (("q", [peer("qemu-img")]), ("o", imagecore_cmd())):
        shutil.copytree(images, tmp_path / side)
        with _held(tmp_path / side, holder):
            p = subprocess.run([*cmd, "bench", *args], capture_output=True, cwd=tmp_path / side, timeout=60)
        prog = b"qemu-img" if side == "q" else b"imagecore"
        got[side] = (p.returncode, _norm(p.stdout), p.stderr.replace(prog, b"PROG"))
    assert got["o"] == got["q"]
