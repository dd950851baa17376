"""imagecore's image locks against a qemu-io holder, with qemu-img 7.2 as the oracle in every cell."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import imagecore_cmd, peer, run

VERBS = [
    ["info", "a.qcow2"], ["info", "-U", "a.qcow2"], ["check", "a.qcow2"], ["check", "-U", "a.qcow2"],
    ["check", "-r", "all", "a.qcow2"], ["check", "-r", "all", "-U", "a.qcow2"], ["map", "a.qcow2"],
    ["map", "-U", "a.qcow2"], ["convert", "-O", "raw", "a.qcow2", "o.raw"],
    ["convert", "-U", "-O", "raw", "a.qcow2", "o.raw"], ["convert", "-O", "qcow2", "b.qcow2", "a.qcow2"],
    ["convert", "-n", "-O", "qcow2", "b.qcow2", "a.qcow2"], ["create", "-f", "qcow2", "a.qcow2", "64M"],
]


def _outcome(cmd: list[str], cwd: Path, prog: str) -> tuple[int, str]:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)
    return p.returncode, p.stderr.replace(prog + ":", "PROG:")


@pytest.fixture
def held(tmp_path: Path) -> Iterator[Path]:
    for name in ("a.qcow2", "b.qcow2"):
        run(peer("qemu-img"), "create", "-q", "-f", "qcow2", tmp_path / name, "64M")
    holder = subprocess.Popen([peer("qemu-io"), "-f", "qcow2", "a.qcow2"], cwd=tmp_path,
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        yield tmp_path
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: " ".join(v))
def test_verb_against_qemu_io_holder(held: Path, verb: list[str]) -> None:
    want = _outcome([peer("qemu-img"), *verb], held, "qemu-img")
    got = _outcome([*imagecore_cmd(), *verb], held, "imagecore")
    assert got == want


@pytest.mark.parametrize("raw", [False, True])
def test_convert_onto_own_source_refused(tmp_path: Path, raw: bool) -> None:
    fmt, name = ("raw", "a.raw") if raw else ("qcow2", "a.qcow2")
    src = tmp_path / name
    run(peer("qemu-img"), "create", "-q", "-f", fmt, src, "1M")
    run(peer("qemu-io"), "-f", fmt, "-c", "write -P 0x5a 0 64k", src)
    (tmp_path / "link").hardlink_to(src)
    for target in (name, "link"):
        p = subprocess.run([*imagecore_cmd(), "convert", "-O", fmt, name, target], cwd=tmp_path,
                           capture_output=True, text=True)
        assert p.returncode == 1
        assert 'Failed to get "write" lock' in p.stderr
    run(peer("qemu-io"), "-f", fmt, "-c", "read -P 0x5a 0 64k", src)


def test_create_backed_by_itself_refused(tmp_path: Path) -> None:
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", tmp_path / "x.qcow2", "1M")
    (tmp_path / "y.qcow2").symlink_to("x.qcow2")
    for backing in ("x.qcow2", "y.qcow2"):
        p = subprocess.run([*imagecore_cmd(), "create", "-f", "qcow2", "-b", backing, "-F", "qcow2",
                            "x.qcow2", "1G"], cwd=tmp_path, capture_output=True, text=True)
        assert p.returncode == 1
        assert p.stderr == ("imagecore: x.qcow2: Error: Trying to create an image with the same filename "
                            "as the backing file\n")
    run(peer("qemu-img"), "check", "-q", tmp_path / "x.qcow2")
