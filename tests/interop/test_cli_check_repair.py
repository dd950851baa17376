"""`imagecore check` and `check -r leaks|all` beside `qemu-img check` (7.2) on broken images.

Each image is made by qemu-img and qemu-io, then broken by editing its bytes (tests/interop/check_damage.py).
On copies of it both tools run `check`, `check --output=json`, `check -r leaks`, `check -r all` (human and
JSON): exit code, stdout and stderr must be the same. Then the images each tool repaired are checked by
qemu-img: the same verdict, and where qemu's repair leaves a clean image, the same guest data
(`qemu-img compare` of the two repaired twins).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.interop.check_damage import DAMAGE
from tests.peers import imagecore_cmd, peer, run


def _run(tool: list[str], img: Path, *args: str) -> tuple[int, str, str]:
    p = subprocess.run([*tool, "check", *args, str(img)], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in p.stderr, p.stderr
    out = p.stdout.replace(str(img), "IMG")
    err = p.stderr.replace(str(img), "IMG").replace("imagecore:", "qemu-img:")
    return p.returncode, out, err


def _both(src: Path, work: Path, *args: str) -> tuple[Path, Path]:
    """Run both tools on fresh copies of ``src``; assert the same exit code, stdout and stderr."""
    ours, theirs = work / "ours.qcow2", work / "theirs.qcow2"
    shutil.copy(src, ours)
    shutil.copy(src, theirs)
    q = _run([peer("qemu-img")], theirs, *args)
    o = _run(imagecore_cmd(), ours, *args)
    assert o == q, f"check {' '.join(args)}\nqemu-img: {q}\nimagecore: {o}"
    return ours, theirs


def _compare(a: Path, b: Path) -> int:
    return run(peer("qemu-img"), "compare", "-f", "qcow2", "-F", "qcow2", a, b, check=False).returncode


def _verdict(img: Path) -> tuple[int, dict[str, object]]:
    p = run(peer("qemu-img"), "check", "--output=json", img, check=False)
    report = json.loads(p.stdout) if p.stdout.strip() else {}
    report.pop("filename", None)
    return p.returncode, report


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_check_and_repair_like_qemu_img(work: Path, damage: str) -> None:
    src = work / "src.qcow2"
    DAMAGE[damage](src)
    before = run(peer("qemu-img"), "check", src, check=False).returncode
    assert before != 0, "the damage must be visible to qemu-img"
    _both(src, work)
    _both(src, work, "--output=json")
    for mode in ("leaks", "all"):
        _both(src, work, "-r", mode, "--output=json")
        ours, theirs = _both(src, work, "-r", mode)
        # what each repair left, as qemu-img sees it: the same verdict and report
        assert _verdict(ours) == _verdict(theirs)
        if _verdict(theirs)[0] == 0:
            # the same guest data; where qemu-img cannot read its own repaired image (a compressed
            # cluster on top of other metadata, zero clusters in a v2 image) it cannot read ours either
            itself = _compare(theirs, theirs)
            assert _compare(ours, theirs) == itself
            if itself:
                assert ours.read_bytes() == theirs.read_bytes()


def test_healthy_fragmented_and_shared_images_like_qemu_img(work: Path) -> None:
    """The counting a run of clusters at a time gives qemu's figures on scattered writes, clusters
    shared with a snapshot, zero clusters and 512-byte clusters."""
    from tests.interop.check_damage import make

    img = make(work / "f.qcow2", "64M", writes=tuple(
        f"write -P {i % 250 + 1} {(i * 7919) % 1000 * 64}k 64k" for i in range(300)))
    _both(img, work)
    run(peer("qemu-img"), "snapshot", "-c", "s", img)
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 9 0 4M", "-c", "write -z 8M 1M", img)
    _both(img, work, "--output=json")
    small = make(work / "s.qcow2", "4M", "cluster_size=512", writes=("write -P 1 0 1M", "write -P 2 3M 4k"))
    _both(small, work)
