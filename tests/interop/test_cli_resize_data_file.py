"""`imagecore resize` of a qcow2 image with an external data file, beside `qemu-img resize` on a copy of
the same image: the data file takes the new size as qemu gives it (exactly, or to the end of the last
mapped cluster when the grow preallocates; a data_file_raw image always maps the grown part), the maps
and guest data agree, and both images pass `qemu-img check`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.interop.nbdsrv_fixture import qemu_io_holding
from tests.peers import imagecore_cmd, peer

CASES = [
    # data_file_raw, --preallocation, new size
    ("on", "off", "2M"), ("on", "off", "3146240"), ("on", "off", "512K"),
    ("off", "off", "2M"), ("off", "metadata", "3146240"), ("off", "falloc", "2M"),
    ("off", "full", "2M"), ("off", "off", "512K"), ("off", "off", "4G"),
]


def _make(d: Path, raw: str) -> None:
    d.mkdir()
    # qemu opens a relative data file name from its working directory (7.2 and 10 alike), so every peer
    # runs in the image's directory
    _in(d, peer("qemu-img"), "create", "-q", "-f", "qcow2", "-o", f"data_file=a.data,data_file_raw={raw}",
        "a.qcow2", "1M")
    _in(d, peer("qemu-io"), "-f", "qcow2", "-c", "write -P 7 0 64k", "-c", "write -P 9 960k 64k", "a.qcow2")


def _in(d: Path, *args: str) -> bytes:
    return subprocess.run(list(args), capture_output=True, cwd=d, check=True, timeout=120).stdout


def _resize(cmd: list[str], d: Path, prealloc: str, size: str, *, shrink: bool) -> tuple[int, bytes, bytes]:
    args = [*cmd, "resize", *(["--shrink"] if shrink else []), f"--preallocation={prealloc}", "a.qcow2", size]
    p = subprocess.run(args, capture_output=True, cwd=d, timeout=120)
    return p.returncode, p.stdout.replace(b"qemu-img", b"PROG"), p.stderr.replace(b"qemu-img", b"PROG")


def _map(d: Path) -> list[dict[str, object]]:
    return list(json.loads(_in(d, peer("qemu-img"), "map", "--output=json", "a.qcow2")))


@pytest.mark.parametrize(("raw", "prealloc", "size"), CASES)
def test_resize_with_a_data_file_as_qemu_img(tmp_path: Path, raw: str, prealloc: str, size: str) -> None:
    q, o = tmp_path / "q", tmp_path / "o"
    _make(q, raw)
    _make(o, raw)
    shrink = size == "512K"
    want = _resize([peer("qemu-img")], q, prealloc, size, shrink=shrink)
    got = _resize([*imagecore_cmd()], o, prealloc, size, shrink=shrink)
    assert got == (want[0], want[1], want[2].replace(b"PROG", b"imagecore")) and got[0] == 0
    qd, od = (q / "a.data").stat(), (o / "a.data").stat()
    assert od.st_size == qd.st_size
    assert od.st_blocks == qd.st_blocks  # the same blocks allocated (falloc, full, metadata's tail)
    assert _map(o) == _map(q)
    _in(o, peer("qemu-img"), "check", "a.qcow2")
    for d in (q, o):
        _in(d, peer("qemu-img"), "convert", "-O", "raw", "a.qcow2", "guest.raw")
    assert (o / "guest.raw").read_bytes() == (q / "guest.raw").read_bytes()
    if not shrink:
        # the old data is still there and the new part reads zeroes
        _in(o, peer("qemu-io"), "-f", "qcow2", "-c", "read -P 7 0 64k", "-c", "read -P 9 960k 64k",
            "-c", "read -P 0 1M 64k", "a.qcow2")


def test_a_raw_writer_of_the_data_file_does_not_stop_the_resize(tmp_path: Path) -> None:
    """qemu-img's lock on the data file shares every permission (the image's own lock is what keeps other
    users out): a qemu-io holding the data file as raw does not stop the resize, one holding the image
    does, with qemu-img's message."""
    _make(tmp_path / "d", "off")
    d = tmp_path / "d"
    for target, fmt in (("a.data", "raw"), ("a.qcow2", "qcow2")):
        with qemu_io_holding(target, fmt, cwd=d):
            before = (d / "a.data").stat().st_size
            o = subprocess.run([*imagecore_cmd(), "resize", "a.qcow2", f"{before * 2}"], capture_output=True,
                               cwd=d, timeout=60)
            if fmt == "raw":
                assert (o.returncode, o.stderr) == (0, b"")
                assert (d / "a.data").stat().st_size == before * 2
            else:
                assert o.returncode == 1 and b'Failed to get "write" lock' in o.stderr
                assert (d / "a.data").stat().st_size == before
