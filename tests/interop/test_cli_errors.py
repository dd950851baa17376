"""Bad arguments and hostile images: one line on stderr, exit 1 like qemu-img, never a traceback or a hang."""

from __future__ import annotations

import struct
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.peers import REPO, imagecore_cmd, one_error_as_qemu, peer, run


def ours(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*imagecore_cmd(), *map(str, args)], capture_output=True, timeout=60, cwd=cwd)


def qemu(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([peer("qemu-img"), *map(str, args)], capture_output=True, timeout=60, cwd=cwd)


def one_line_error(proc: subprocess.CompletedProcess[bytes], code: int = 1) -> str:
    text = proc.stderr.decode()
    assert proc.returncode == code, text
    assert "Traceback" not in text
    assert text.startswith("imagecore: ") and text.count("\n") == 1, text
    return text


def good_qcow2(work: Path) -> bytes:
    img = work / "good.qcow2"
    run(peer("qemu-img"), "create", "-f", "qcow2", img, "4M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 1 0 64k", img)
    return img.read_bytes()


def patched(work: Path, name: str, at: int, fmt: str, value: int) -> Path:
    data = bytearray(good_qcow2(work))
    struct.pack_into(fmt, data, at, value)
    img = work / name
    img.write_bytes(bytes(data))
    return img


HOSTILE = [
    ("bad-version", 4, ">I", 7),
    ("huge-cluster-bits", 20, ">I", 40),
    ("tiny-cluster-bits", 20, ">I", 2),
    ("huge-l1", 36, ">I", 0xFFFFFFFF),
    ("l1-past-eof", 40, ">Q", 1 << 50),
    ("unaligned-l1", 40, ">Q", 0x30001),
    ("refcount-table-past-eof", 48, ">Q", 1 << 52),
    ("huge-refcount-clusters", 56, ">I", 0xFFFFFFFF),
    ("backing-name-huge", 16, ">I", 0xFFFFFF),
    ("backing-offset-past-eof", 8, ">Q", 1 << 40),
    ("huge-snapshots", 60, ">I", 0xFFFFFFFF),
    ("huge-size", 24, ">Q", 1 << 62),
    ("header-length-huge", 100, ">I", 0xFFFFFFF0),
]


@pytest.mark.parametrize(("name", "at", "fmt", "value"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_qcow2_headers(work: Path, name: str, at: int, fmt: str, value: int) -> None:
    img = patched(work, name + ".qcow2", at, fmt, value)
    for verb in (["info"], ["info", "--output=json"], ["map", "--output=json"]):
        q = qemu(*verb, "-f", "qcow2", img)
        o = ours(*verb, "-f", "qcow2", img)
        # Where qemu-img refuses, so do we; where it is lenient we may still refuse, but only cleanly.
        if q.returncode != 0 or o.returncode != 0:
            one_line_error(o)
    q = qemu("convert", "-f", "qcow2", "-O", "raw", img, work / "q.raw")
    o = ours("convert", "-f", "qcow2", "-O", "raw", img, work / "o.raw")
    if q.returncode != 0 or o.returncode != 0:
        one_line_error(o)
    else:
        assert (work / "q.raw").read_bytes() == (work / "o.raw").read_bytes()


def test_truncated_and_garbage(work: Path) -> None:
    data = good_qcow2(work)
    for n in (3, 50, 103, 200, 0x10000, 0x30000):
        img = work / f"t{n}.qcow2"
        img.write_bytes(data[:n])
        for verb in ("info", "map"):
            q = qemu(verb, "-f", "qcow2", img)
            o = ours(verb, "-f", "qcow2", img)
            if q.returncode != 0:
                one_line_error(o)
    garbage = work / "garbage.bin"
    garbage.write_bytes(b"\x00QFI" * 1000)
    one_line_error(ours("info", "-f", "qcow2", garbage))
    one_line_error(ours("check", "-f", "qcow2", garbage))
    # probed, garbage is raw, as qemu-img says
    assert ours("info", "--output=json", garbage).stdout == qemu("info", "--output=json", garbage).stdout


@pytest.mark.parametrize("args", [
    ["info", "missing.img"],
    ["info", "."],
    ["check", "."],
    ["convert", "-O", "raw", ".", "out.raw"],
    ["map", "missing.img"],
    ["check", "missing.img"],
    ["convert", "-O", "raw", "missing.img", "out.raw"],
    ["info", "-f", "nope", "x.raw"],
    ["info", "--output=xml", "x.raw"],
    ["info"],
    ["info", "a", "b"],
    ["map", "--start-offset=zz", "x.raw"],
    ["check", "-r", "everything", "x.raw"],
    ["convert", "-O", "nope", "x.raw", "out.img"],
    ["convert", "-O", "qcow2", "-o", "foo=bar", "x.raw", "out.qcow2"],
    ["convert", "-m", "0", "x.raw", "out.raw"],
    ["convert", "-m", "99", "x.raw", "out.raw"],
    ["convert", "-S", "1000", "x.raw", "out.raw"],
    ["convert", "x.raw"],
    ["convert", "--target-is-zero", "x.raw", "out.raw"],
    ["convert", "-n", "-B", "b", "x.raw", "out.raw"],
    ["info", "--bogus", "x.raw"],
    ["info", "-Z", "x.raw"],
    ["frobnicate"],
    [],
])
def test_bad_arguments(work: Path, args: list[str]) -> None:
    run(peer("qemu-img"), "create", "-f", "raw", work / "x.raw", "1M")
    q = qemu(*args, cwd=work)
    o = ours(*args, cwd=work)
    assert q.returncode != 0
    assert o.returncode == 1
    one_error_as_qemu(o, q)


def test_help_and_version() -> None:
    for flag in ("--help", "-h"):
        o = ours(flag)
        assert o.returncode == 0 and b"convert" in o.stdout and b"Supported formats:" in o.stdout
    for flag in ("--version", "-V"):
        o = ours(flag)
        # qemu-img's shape: "qemu-img version 7.2.22 (Debian ...)" and a second line; the version is
        # pyproject.toml's, the one place it is written
        q = run(peer("qemu-img"), flag).stdout.decode().splitlines()
        version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
        lines = o.stdout.decode().splitlines()
        assert o.returncode == 0 and len(lines) == len(q) == 2, (lines, q)
        assert lines[0] == f"imagecore version {version} (nbdsrv {version})"
        assert q[0].startswith("qemu-img version 7.2.")
    o = ours("info", "--help")
    assert o.returncode == 0 and b"info" in o.stdout


@pytest.mark.parametrize("m", ["0", "17", "x", "16"])
def test_convert_coroutine_bounds_are_qemu_img_7_2s(work: Path, m: str) -> None:
    run(peer("qemu-img"), "create", "-f", "raw", work / "x.raw", "1M")
    q = qemu("convert", "-m", m, "-O", "raw", "x.raw", "q.raw", cwd=work)
    o = ours("convert", "-m", m, "-O", "raw", "x.raw", "o.raw", cwd=work)
    assert (o.returncode, o.stdout) == (q.returncode, q.stdout)
    assert o.stderr.replace(b"imagecore:", b"qemu-img:") == q.stderr


@pytest.mark.parametrize("verb", [["info"], ["map"], ["check"], ["check", "-r", "all"], ["snapshot", "-l"],
                                  ["snapshot", "-c", "x"], ["measure", "-O", "qcow2"]])
@pytest.mark.parametrize("target", ["missing.img", "folder"])
def test_missing_files_and_directories_as_qemu_img(work: Path, verb: list[str], target: str) -> None:
    """A read-only open words a directory as qemu's file driver does, a read-write one as open(2)."""
    (work / "folder").mkdir(exist_ok=True)
    q = qemu(*verb, target, cwd=work)
    o = ours(*verb, target, cwd=work)
    assert (o.returncode, o.stdout) == (q.returncode, q.stdout)
    assert o.stderr.replace(b"imagecore:", b"qemu-img:") == q.stderr


@pytest.mark.parametrize("sparse", ["3", "17M", "x", "16M", "0", "4k"])
def test_convert_sparse_sizes_as_qemu_img_7_2(work: Path, sparse: str) -> None:
    run(peer("qemu-img"), "create", "-f", "raw", work / "x.raw", "1M")
    q = qemu("convert", "-S", sparse, "-O", "raw", "x.raw", "q.raw", cwd=work)
    o = ours("convert", "-S", sparse, "-O", "raw", "x.raw", "o.raw", cwd=work)
    assert (o.returncode, o.stdout) == (q.returncode, q.stdout)
    assert o.stderr.replace(b"imagecore:", b"qemu-img:") == q.stderr


@pytest.mark.parametrize("arg", ["--start-offset=x", "--max-length=x", "--start-offset=-1"])
def test_map_offsets_refused_as_qemu_img(work: Path, arg: str) -> None:
    run(peer("qemu-img"), "create", "-f", "qcow2", work / "x.qcow2", "1M")
    q = qemu("map", arg, "x.qcow2", cwd=work)
    o = ours("map", arg, "x.qcow2", cwd=work)
    assert (o.returncode, o.stdout) == (q.returncode, q.stdout)
    assert o.stderr.replace(b"imagecore:", b"qemu-img:") == q.stderr
