"""How `imagecore` fails, against qemu-img in the same test: SIGUSR1, and what a failed `convert` leaves."""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.peers import imagecore_cmd, peer, qemu10, run

Proc = subprocess.CompletedProcess[bytes]


def qemu_img() -> str:
    return peer("qemu-img")


def both(cwd: Path, *args: str) -> tuple[Proc, Proc]:
    q = subprocess.run([qemu_img(), *args], capture_output=True, cwd=cwd, timeout=120)
    o = subprocess.run([*imagecore_cmd(), *args], capture_output=True, cwd=cwd, timeout=120)
    assert b"Traceback" not in o.stderr
    return q, o


def same(q: Proc, o: Proc) -> None:
    assert (o.returncode, o.stdout) == (q.returncode, q.stdout)
    assert o.stderr.replace(b"imagecore: ", b"qemu-img: ") == q.stderr


# -- SIGUSR1 ------------------------------------------------------------------------------------------

PROGRESS_LINE = re.compile(rb"^    \(\d{1,3}\.\d\d/100%\)$")


def _data_file(path: Path, size: int) -> None:
    block = (b"imagecore progress " * 3449)[:65536]
    with path.open("wb") as f:
        for _ in range(size // len(block)):
            f.write(block)


def _convert_with_sigusr1(cmd: list[str], work: Path, target: Path) -> Proc:
    """Run a slow convert, send SIGUSR1 once it is copying, and return how it ended."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=work)
    deadline = time.monotonic() + 60
    sent = False
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            copied = target.stat().st_blocks * 512
        except FileNotFoundError:
            copied = 0
        if copied >= 16 << 20:
            proc.send_signal(signal.SIGUSR1)
            sent = True
            break
        time.sleep(0.005)
    stdout, stderr = proc.communicate(timeout=120)
    assert sent, "the convert ended before it could be signalled; make the source larger"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("tool", ["qemu-img", "imagecore"])
def test_sigusr1_prints_progress_without_p(work: Path, tool: str) -> None:
    _data_file(work / "src.raw", 512 << 20)
    cmd = ([qemu_img()] if tool == "qemu-img" else imagecore_cmd())
    p = _convert_with_sigusr1([*cmd, "convert", "-t", "writethrough", "-O", "raw", "src.raw", "dst.raw"],
                              work, work / "dst.raw")
    assert p.returncode == 0, p.stderr
    assert p.stdout == b""
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and PROGRESS_LINE.match(lines[0]), p.stderr


@pytest.mark.parametrize("tool", ["qemu-img", "imagecore"])
def test_sigusr1_ignored_with_p(work: Path, tool: str) -> None:
    _data_file(work / "src.raw", 512 << 20)
    cmd = ([qemu_img()] if tool == "qemu-img" else imagecore_cmd())
    args = ["convert", "-p", "-t", "writethrough", "-O", "raw", "src.raw", "dst.raw"]
    p = _convert_with_sigusr1([*cmd, *args], work, work / "dst.raw")
    assert p.returncode == 0, p.stderr
    assert p.stderr == b""
    assert p.stdout.endswith(b"    (100.00/100%)\r\n")


# -- what a failed convert leaves ---------------------------------------------------------------------

def test_compress_onto_raw_refused_before_the_target_exists(work: Path) -> None:
    run(qemu_img(), "create", "-q", "-f", "raw", work / "src.raw", "1M")
    q, o = both(work, "convert", "-c", "-O", "raw", "src.raw", "dst.raw")
    assert q.returncode == 1
    same(q, o)
    assert not (work / "dst.raw").exists()


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk"])
def test_compress_refusal_creates_no_target(work: Path, fmt: str) -> None:
    # qemu writes these compressed; where our driver cannot yet, -c is refused before anything is created
    run(qemu_img(), "create", "-q", "-f", "raw", work / "src.raw", "1M")
    o = subprocess.run([*imagecore_cmd(), "convert", "-c", "-O", fmt, "src.raw", f"dst.{fmt}"],
                       capture_output=True, cwd=work, timeout=60)
    if o.returncode == 0:
        assert run(qemu_img(), "check", work / f"dst.{fmt}").returncode == 0
        return
    assert o.stderr == f"imagecore: Compressed writes are not supported by the {fmt} driver yet\n".encode()
    assert not (work / f"dst.{fmt}").exists()


def _corrupt_compressed_source(work: Path) -> Path:
    """A qcow2 of compressed clusters whose cluster 30 no longer inflates: reading it is EIO."""
    data = work / "data.raw"
    data.write_bytes((b"hello world line\n" * 250000)[: 4 << 20])
    src = work / "src.qcow2"
    run(qemu_img(), "convert", "-c", "-O", "qcow2", data, src)
    with src.open("r+b") as f:
        header = f.read(72)
        (l1_offset,) = struct.unpack_from(">Q", header, 40)
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2_offset + 8 * 30)
        entry = struct.unpack(">Q", f.read(8))[0]
        assert entry >> 62 == 1  # compressed
        f.seek(entry & ((1 << 54) - 1))
        f.write(b"\xff" * 64)
    return src


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_read_error_midway_as_qemu_img(work: Path, fmt: str) -> None:
    # qemu-img (7.2 and 10) keeps the partial target it made; so do we, and the error names the read
    _corrupt_compressed_source(work)
    results = []
    for name, cmd in (("q", [qemu_img()]), ("q10", [qemu10("qemu-img")]), ("o", imagecore_cmd())):
        p = subprocess.run([*cmd, "convert", "-O", fmt, "src.qcow2", f"{name}.{fmt}"], capture_output=True,
                           cwd=work, timeout=60)
        results.append(p)
        assert p.returncode == 1
        assert os.path.exists(work / f"{name}.{fmt}")
        message = rb"[a-z-]+: error while reading at byte \d+: Input/output error\n"
        assert re.fullmatch(message, p.stderr), p.stderr
    assert results[0].stderr == results[1].stderr
    if fmt == "raw":
        assert (work / "o.raw").stat().st_size == (work / "q.raw").stat().st_size
