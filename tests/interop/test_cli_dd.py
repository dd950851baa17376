"""`imagecore dd` against `qemu-img dd`: output sizes and contents for bs/count/skip, formats, and errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import imagecore_cmd, peer, run

MiB = 1 << 20


def qio(img: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args: list[str | Path] = [peer("qemu-io"), "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, img)


def info(img: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads(run(peer("qemu-img"), "info", "--output=json", img).stdout)
    return data


def dd_both(cwd: Path, *args: str, out: str = "out") -> tuple[subprocess.CompletedProcess[bytes], Path, Path]:
    """qemu-img dd into q.<out>, imagecore dd into o.<out>: same exit code, stdout and stderr (names
    swapped)."""
    q = subprocess.run([peer("qemu-img"), "dd", *args, f"of=q.{out}"], cwd=cwd, capture_output=True,
                       timeout=120)
    o = subprocess.run([*imagecore_cmd(), "dd", *args, f"of=o.{out}"], cwd=cwd, capture_output=True,
                       timeout=120)
    assert "Traceback" not in o.stderr.decode()
    assert (o.returncode, o.stdout) == (q.returncode, q.stdout), (o.stderr, q.stderr)
    theirs = o.stderr.replace(b"imagecore", b"qemu-img").replace(b"o." + out.encode(), b"q." + out.encode())
    assert theirs == q.stderr
    qp, op = cwd / f"q.{out}", cwd / f"o.{out}"
    assert qp.exists() == op.exists()
    return q, qp, op


def same_image(qp: Path, op: Path, fmt: str) -> None:
    qi, oi = info(qp), info(op)
    assert oi["format"] == qi["format"] == fmt
    assert oi["virtual-size"] == qi["virtual-size"]
    p = run(peer("qemu-img"), "compare", "-f", fmt, "-F", fmt, qp, op, check=False)
    assert p.returncode == 0 and p.stdout == b"Images are identical.\n", p.stdout + p.stderr


@pytest.fixture
def src(work: Path) -> Path:
    """in.qcow2 (3 MiB: data, a gap, zero clusters, an unaligned tail of data) and in.raw, its convert."""
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", work / "in.qcow2", "3M")
    qio(work / "in.qcow2", "write -P 7 0 1000", "write -P 9 1M 70k", "write -z 2M 64k", "write -P 5 3000k 5k")
    run(peer("qemu-img"), "convert", "-O", "raw", work / "in.qcow2", work / "in.raw")
    (work / "odd.raw").write_bytes(bytes(range(256)) * 19 + b"\x01" * 136)  # 5000 bytes: not sector aligned
    return work


OPERANDS = [
    [], ["bs=512", "skip=1", "count=2"], ["bs=1k", "count=3"], ["skip=100000"], ["bs=4k", "skip=3"],
    ["bs=1M", "count=2", "skip=1"], ["bs=64k", "skip=2"], ["bs=1.5k", "count=1"], ["count=0"],
    ["bs=3000", "count=400", "skip=7"], ["bs=1M", "count=10"], ["bs=0x1000", "skip=256"],
    ["count=1", "bs=2M"],
]


@pytest.mark.parametrize("operands", OPERANDS, ids=lambda o: " ".join(o) or "defaults")
@pytest.mark.parametrize(("source", "fmt"), [("in.qcow2", "qcow2"), ("in.raw", "raw"), ("odd.raw", "raw")])
@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_operands(src: Path, operands: list[str], source: str, fmt: str, out_fmt: str) -> None:
    q, qp, op = dd_both(src, "-f", fmt, "-O", out_fmt, *operands, f"if={source}")
    assert q.returncode == 0
    same_image(qp, op, out_fmt)


def test_vmdk_output_and_probed_input(src: Path) -> None:
    _, qp, op = dd_both(src, "-O", "vmdk", "bs=4k", "if=in.qcow2")
    same_image(qp, op, "vmdk")
    _, qp, op = dd_both(src, "bs=4k", "if=in.qcow2", out="raw")
    same_image(qp, op, "raw")
    run(peer("qemu-img"), "compare", "-F", "raw", src / "in.qcow2", op)


def test_skip_beyond_warns_and_makes_an_empty_image(src: Path) -> None:
    q, _, op = dd_both(src, "skip=10000", "if=in.raw")
    assert q.returncode == 0 and b"in.raw: cannot skip to specified offset" in q.stderr
    assert op.stat().st_size == 0


@pytest.mark.parametrize("args", [
    ["if=in.raw", "foo"], ["if=in.raw", "foo=1"], ["bs=0", "if=in.raw"], ["bs=1x", "if=in.raw"],
    ["bs=3G", "if=in.raw"], ["count=-1", "if=in.raw"], ["skip=k", "if=in.raw"], ["count=20E", "if=in.raw"],
    ["bs=", "if=in.raw"], ["-O", "foo", "if=in.raw"], ["-f", "qcow2", "if=in.raw"], ["if=nope"], ["if=dir"],
    ["-x", "if=in.raw"], ["-f"], ["if=orphan.qcow2"],
])
def test_errors(src: Path, args: list[str]) -> None:
    (src / "dir").mkdir()
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2",
        src / "orphan.qcow2", "1M")
    q, _, _ = dd_both(src, *args)
    assert q.returncode == 1


def test_missing_operands(src: Path) -> None:
    for args in (["if=in.raw"], ["of=x"], []):
        q = subprocess.run([peer("qemu-img"), "dd", *args], cwd=src, capture_output=True)
        o = subprocess.run([*imagecore_cmd(), "dd", *args], cwd=src, capture_output=True)
        assert (o.returncode, o.stdout) == (q.returncode, q.stdout) == (1, b"")
        assert o.stderr.replace(b"imagecore", b"qemu-img") == q.stderr
    assert not (src / "x").exists()


def test_output_in_missing_folder(src: Path) -> None:
    q, _, _ = dd_both(src, "-O", "qcow2", "if=in.raw", out="x/y")
    assert q.returncode == 1 and b"error while creating output image" in q.stderr


@pytest.fixture
def held(src: Path) -> Iterator[Path]:
    holder = subprocess.Popen([peer("qemu-io"), "-f", "qcow2", "in.qcow2"], cwd=src, stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        yield src
    finally:
        holder.kill()
        holder.wait()


def test_locks_against_a_writer(held: Path) -> None:
    q, _, _ = dd_both(held, "-f", "qcow2", "if=in.qcow2")
    assert q.returncode == 1
    q, qp, op = dd_both(held, "-U", "-f", "qcow2", "if=in.qcow2", out="u")
    assert q.returncode == 0
    same_image(qp, op, "raw")


def test_ops_result(src: Path) -> None:
    from imagecore.ops.dd import DdOptions, dd

    seen: list[tuple[int, int]] = []
    o = DdOptions(str(src / "in.qcow2"), str(src / "r.qcow2"), fmt="qcow2", out_fmt="qcow2", bs=64 * 1024,
                  count=20, skip=4)
    res = asyncio.run(dd(o, progress=lambda d, t: seen.append((d, t))))
    assert res.output_size == 16 * 64 * 1024 and not res.skip_beyond
    # the two clusters holding the data at 1 MiB only: zero and unallocated runs are neither read nor written
    assert res.bytes_copied == 128 * 1024
    assert seen[-1] == (res.output_size, res.output_size)
    run(peer("qemu-img"), "dd", "-f", "qcow2", "-O", "qcow2", "bs=64k", "count=20", "skip=4",
        f"if={src / 'in.qcow2'}", f"of={src / 'q.qcow2'}")
    same_image(src / "q.qcow2", src / "r.qcow2", "qcow2")
    from imagecore.errors import OperationCancelledError

    stop = asyncio.Event()
    stop.set()
    with pytest.raises(OperationCancelledError):
        asyncio.run(dd(DdOptions(str(src / "in.raw"), str(src / "c.raw")), cancel=stop))
    assert not (src / "c.raw").exists()

    async def cancel_midway() -> None:
        stop = asyncio.Event()
        o = DdOptions(str(src / "big.raw"), str(src / "c.qcow2"), fmt="raw", out_fmt="qcow2")

        def progress(done: int, total: int) -> None:
            if done >= 8 * MiB:
                stop.set()
        await dd(o, progress=progress, cancel=stop)

    with (src / "big.raw").open("wb") as f:
        f.write(b"\x5a" * 32 * MiB)
    with pytest.raises(OperationCancelledError):
        asyncio.run(cancel_midway())
    assert not (src / "c.qcow2").exists()
