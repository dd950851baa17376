"""`imagecore compare` against `qemu-img compare`: verdicts, offsets, exit codes and messages, byte-exact."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import imagecore_cmd, peer, run

MiB = 1 << 20


Proc = subprocess.CompletedProcess[bytes]


def _pair(cwd: Path, *args: str) -> tuple[Proc, Proc]:
    q = subprocess.run([peer("qemu-img"), "compare", *args], cwd=cwd, capture_output=True, timeout=120)
    o = subprocess.run([*imagecore_cmd(), "compare", *args], cwd=cwd, capture_output=True, timeout=120)
    return q, o


def same(cwd: Path, *args: str, code: int | None = None) -> str:
    """Run both; exit code and stdout identical, stderr identical once the program names are swapped."""
    q, o = _pair(cwd, *args)
    assert "Traceback" not in o.stderr.decode()
    assert (o.returncode, o.stdout) == (q.returncode, q.stdout), (o.stderr, q.stderr)
    assert o.stderr.replace(b"imagecore", b"qemu-img") == q.stderr
    if code is not None:
        assert q.returncode == code, q.stderr
    return q.stdout.decode()


def qio(img: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args: list[str | Path] = [peer("qemu-io"), "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, img)


def qimg(*args: str | Path) -> None:
    run(peer("qemu-img"), *args)


@pytest.fixture
def pair(work: Path) -> Path:
    """a.raw (8 MiB, sparse with data runs) and a.qcow2, its convert."""
    qimg("create", "-q", "-f", "raw", work / "a.raw", "8M")
    qio(work / "a.raw", "write -P 0x11 0 100k", "write -P 0x22 1M 3M", "write -P 0x33 7M 4k", fmt="raw")
    qimg("convert", "-f", "raw", "-O", "qcow2", work / "a.raw", work / "a.qcow2")
    return work


@pytest.mark.parametrize("args", [
    ["a.raw", "a.qcow2"], ["a.qcow2", "a.raw"], ["-f", "raw", "-F", "qcow2", "a.raw", "a.qcow2"],
    ["-q", "a.raw", "a.qcow2"], ["-U", "a.qcow2", "a.qcow2"]])
def test_identical_raw_and_qcow2(pair: Path, args: list[str]) -> None:
    out = same(pair, *args, code=0)
    assert out == ("" if "-q" in args else "Images are identical.\n")


@pytest.mark.parametrize(("at", "length", "where"), [
    (MiB + 700, 10, MiB + 512),          # inside data on both sides: the sector's start
    (3 * MiB + 3, 1, 3 * MiB),           # the second 2 MiB chunk of a long data run
    (5 * MiB + 1000, 3, 5 * MiB + 512),  # data on one side only, unallocated on the other
    (0, 1, 0),
])
def test_mismatch_at_known_offset(pair: Path, at: int, length: int, where: int) -> None:
    qio(pair / "a.qcow2", f"write -P 0x7f {at} {length}")
    for args in (["a.raw", "a.qcow2"], ["a.qcow2", "a.raw"]):
        assert same(pair, *args, code=1) == f"Content mismatch at offset {where}!\n"
    assert same(pair, "-q", "a.raw", "a.qcow2", code=1) == ""


def test_mismatch_on_raw_side_against_unallocated(pair: Path) -> None:
    qio(pair / "a.raw", "write -P 0x01 6000000 1", fmt="raw")
    at = 6000000 - 6000000 % 512
    assert same(pair, "a.qcow2", "a.raw", code=1) == f"Content mismatch at offset {at}!\n"


def test_different_sizes(pair: Path) -> None:
    qimg("convert", "-O", "qcow2", pair / "a.raw", pair / "big.qcow2")
    qimg("resize", "-q", pair / "big.qcow2", "12M")
    warned = "Warning: Image size mismatch!\nImages are identical.\n"
    assert same(pair, "a.raw", "big.qcow2", code=0) == warned
    assert same(pair, "big.qcow2", "a.raw", code=0) == warned
    assert same(pair, "-s", "a.raw", "big.qcow2", code=1) == "Strict mode: Image size mismatch!\n"
    qio(pair / "big.qcow2", "write -P 0x44 10M 4k")
    assert same(pair, "a.raw", "big.qcow2", code=1) == (
        f"Warning: Image size mismatch!\nContent mismatch at offset {10 * MiB}!\n")
    # a mismatch in the common part comes without the warning
    qio(pair / "big.qcow2", "write -P 0x45 2M 1")
    assert same(pair, "a.raw", "big.qcow2", code=1) == f"Content mismatch at offset {2 * MiB}!\n"


def test_zero_against_unallocated(work: Path) -> None:
    for name in ("zero.qcow2", "unalloc.qcow2"):
        qimg("create", "-q", "-f", "qcow2", work / name, "4M")
    qio(work / "zero.qcow2", "write -z 0 2M", "write -P 0 2M 1M")  # zero clusters, then zeroes as data
    qimg("create", "-q", "-f", "raw", work / "dense.raw", "4M")
    qio(work / "dense.raw", "write -P 0 0 4M", fmt="raw")
    for a, b in (("zero.qcow2", "unalloc.qcow2"), ("unalloc.qcow2", "dense.raw"),
                 ("zero.qcow2", "dense.raw")):
        assert same(work, a, b, code=0) == "Images are identical.\n"
        same(work, "-s", a, b)  # strict mode compares block status: whatever qemu-img says, we say


def test_strict_identical_and_block_status(pair: Path) -> None:
    assert same(pair, "-s", "a.qcow2", "a.qcow2", code=0) == "Images are identical.\n"
    assert same(pair, "-s", "a.raw", "a.raw", code=0) == "Images are identical.\n"
    assert same(pair, "-s", "a.raw", "a.qcow2", code=1).startswith("Strict mode: Offset ")


def test_backing_chain_equals_its_flattened_convert(work: Path) -> None:
    qimg("create", "-q", "-f", "qcow2", work / "base.qcow2", "6M")
    qio(work / "base.qcow2", "write -P 0xaa 0 3M")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", work / "top.qcow2")
    qio(work / "top.qcow2", "write -P 0xbb 1M 64k", "write -z 2M 64k", "write -P 0xcc 5M 4k")
    qimg("convert", "-O", "qcow2", work / "top.qcow2", work / "flat.qcow2")
    qimg("convert", "-O", "raw", work / "top.qcow2", work / "flat.raw")
    for other in ("flat.qcow2", "flat.raw"):
        assert same(work, "top.qcow2", other, code=0) == "Images are identical.\n"
        assert same(work, other, "top.qcow2", code=0) == "Images are identical.\n"
    assert same(work, "top.qcow2", "base.qcow2", code=1) == f"Content mismatch at offset {MiB}!\n"


@pytest.mark.parametrize("args", [
    ["a.raw", "nope"], ["nope", "a.raw"], ["-f", "qcow2", "a.raw", "a.qcow2"],
    ["-F", "foo", "a.raw", "a.qcow2"],
    ["-T", "bogus", "a.raw", "a.qcow2"], ["dir", "a.raw"], ["-p", "a.raw", "nope"], ["a.raw"],
    ["a.raw", "a.qcow2", "a.raw"], ["-x", "a.raw", "a.qcow2"], ["orphan.qcow2", "a.raw"], ["-f"],
])
def test_errors(pair: Path, args: list[str]) -> None:
    (pair / "dir").mkdir()
    qimg("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", pair / "orphan.qcow2", "8M")
    q, _ = _pair(pair, *args)
    assert q.returncode in (1, 2)
    same(pair, *args)


def test_progress_meter(pair: Path) -> None:
    qimg("create", "-q", "-f", "raw", pair / "small.raw", "5000")
    qio(pair / "small.raw", "write -P 3 0 4000", fmt="raw")
    qimg("convert", "-O", "qcow2", pair / "small.raw", pair / "small.qcow2")
    out = same(pair, "-p", "small.raw", "small.raw", code=0)
    assert out.startswith("    (0.00/100%)\r") and out.endswith("Images are identical.\n\n")
    same(pair, "-p", "-s", "a.raw", "small.raw", code=1)
    for args in (["a.raw", "a.qcow2"], ["a.qcow2", "a.raw"]):  # data, holes and 2 MiB steps: many redraws
        assert same(pair, "-p", *args, code=0).count("\r") > 4
    assert same(pair, "-p", "-q", "a.raw", "a.qcow2", code=0) == ""


@pytest.fixture
def held(pair: Path) -> Iterator[Path]:
    holder = subprocess.Popen([peer("qemu-io"), "-f", "qcow2", "a.qcow2"], cwd=pair, stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        yield pair
    finally:
        holder.kill()
        holder.wait()


def test_locks_against_a_writer(held: Path) -> None:
    same(held, "a.raw", "a.qcow2", code=2)
    assert same(held, "-U", "a.raw", "a.qcow2", code=0) == "Images are identical.\n"


def test_ops_result(pair: Path) -> None:
    from imagecore.ops.compare import compare

    seen: list[tuple[int, int]] = []
    res = asyncio.run(compare(str(pair / "a.raw"), str(pair / "a.qcow2"), "raw", "qcow2",
                              progress=lambda d, t: seen.append((d, t))))
    assert res.identical and res.offset is None and not res.size_mismatch
    assert seen[0] == (0, 8 * MiB) and seen[-1] == (8 * MiB, 8 * MiB)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    qio(pair / "a.qcow2", "write -P 9 7M 1")
    res = asyncio.run(compare(str(pair / "a.raw"), str(pair / "a.qcow2")))
    assert not res.identical and res.offset == 7 * MiB and res.exit_code == 1
    assert os.path.exists(pair / "a.qcow2")
    from imagecore.errors import OperationCancelledError

    stop = asyncio.Event()
    stop.set()
    with pytest.raises(OperationCancelledError):
        asyncio.run(compare(str(pair / "a.raw"), str(pair / "a.qcow2"), cancel=stop))
