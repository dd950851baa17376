"""`imagecore convert --bitmaps` (and --skip-broken-bitmaps) beside qemu-img 7.2: the same refusals and
messages, the same bitmaps in the target (names, granularities, flags, order) holding the same bits (read
by qemu-nbd -B), the same guest data (qemu-img compare) and qemu-img check clean; and a target's own
enabled bitmap recording what convert -n writes, as QEMU's does."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.bitmaps_util import bitmaps_of, check_clean, crash_qemu_writer, qemu_map
from tests.peers import imagecore_cmd, peer, run


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cvbm")
    qi, qio = peer("qemu-img"), peer("qemu-io")
    clean = d / "clean.qcow2"
    run(qi, "create", "-q", "-f", "qcow2", clean, "32M")
    run(qio, "-f", "qcow2", "-c", "write -P 1 0 2M", clean)
    run(qi, "bitmap", "--add", clean, "b0")
    run(qi, "bitmap", "--add", "-g", "512", clean, "fine")
    run(qi, "bitmap", "--add", "-g", "1M", clean, "slow")
    run(qio, "-f", "qcow2", "-c", "write -P 2 1M 64k", "-c", "write -P 3 20M 3M", "-c", "write 31M 1000",
        clean)
    run(qi, "bitmap", "--disable", clean, "slow")
    run(qio, "-f", "qcow2", "-c", "write -P 4 10M 4k", clean)
    broken = d / "broken.qcow2"
    shutil.copy(clean, broken)
    run(qi, "bitmap", "--add", broken, "lost")
    crash_qemu_writer(broken, "write 5M 4k")
    # QEMU's crash left every bitmap in use: keep one of them, and add two that are consistent
    for n in ("b0", "fine"):
        run(qi, "bitmap", "--remove", broken, n)
    run(qi, "bitmap", "--add", "-g", "4k", broken, "after")
    run(qi, "bitmap", "--add", "--disable", broken, "off")
    run(qio, "-f", "qcow2", "-c", "write 7M 8k", broken)
    run(qi, "create", "-q", "-f", "raw", d / "r.raw", "32M")
    run(qi, "create", "-q", "-f", "qcow2", d / "existing.qcow2", "32M")
    run(qi, "bitmap", "--add", d / "existing.qcow2", "slow")
    run(qi, "create", "-q", "-f", "qcow2", d / "bigger.qcow2", "64M")
    # targets whose own enabled bitmap records what convert writes into them, as any write does
    run(qi, "create", "-q", "-f", "qcow2", d / "tracked.qcow2", "32M")
    run(qio, "-f", "qcow2", "-c", "write -P 9 0 32M", d / "tracked.qcow2")
    run(qi, "bitmap", "--add", "-g", "4k", d / "tracked.qcow2", "tb")
    run(qi, "create", "-q", "-f", "qcow2", d / "fresh.qcow2", "32M")
    run(qi, "bitmap", "--add", "-g", "4k", d / "fresh.qcow2", "tb")
    return d


def tool(which: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    cmd = [*imagecore_cmd()] if which == "ours" else [peer("qemu-img")]
    return subprocess.run([*cmd, "convert", *args], capture_output=True, timeout=120, cwd=cwd)


def state(img: Path) -> tuple[list[dict[str, object]], dict[str, object]]:
    listed = bitmaps_of(img)
    return listed, {str(b["name"]): qemu_map(img, str(b["name"])) for b in listed}


CASES = [
    ["--bitmaps", "-O", "qcow2", "clean.qcow2", "t.qcow2"],
    ["--bitmaps", "-O", "qcow2", "-o", "cluster_size=4k", "clean.qcow2", "t.qcow2"],
    ["--bitmaps", "-O", "qcow2", "-o", "cluster_size=2M", "clean.qcow2", "t.qcow2"],
    ["--bitmaps", "-c", "-O", "qcow2", "clean.qcow2", "t.qcow2"],
    ["--bitmaps", "-O", "qcow2", "broken.qcow2", "t.qcow2"],
    ["--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", "broken.qcow2", "t.qcow2"],
    ["--skip-broken-bitmaps", "-O", "qcow2", "clean.qcow2", "t.qcow2"], ["--skip-broken-bitmaps"],
    ["--bitmaps", "-O", "raw", "clean.qcow2", "t.raw"],
    ["--bitmaps", "-O", "vmdk", "clean.qcow2", "t.vmdk"],
    ["--bitmaps", "-O", "qcow2", "-o", "compat=0.10", "clean.qcow2", "t.qcow2"],
    ["--bitmaps", "-O", "qcow2", "r.raw", "t.qcow2"],
    ["--bitmaps", "-f", "raw", "-O", "qcow2", "clean.qcow2", "t.qcow2"],
    ["--bitmaps", "-O", "qcow2", "clean.qcow2", "r.raw", "t.qcow2"],
    ["--bitmaps", "-n", "-O", "qcow2", "clean.qcow2", "existing.qcow2"],
    ["--bitmaps", "-n", "-O", "qcow2", "clean.qcow2", "bigger.qcow2"],
    ["-n", "-O", "qcow2", "clean.qcow2", "tracked.qcow2"],
    ["-n", "--target-is-zero", "-O", "qcow2", "clean.qcow2", "fresh.qcow2"],
]


@pytest.mark.parametrize("args", CASES, ids=[" ".join(a) for a in CASES])
def test_as_qemu_img(images: Path, tmp_path: Path, args: list[str]) -> None:
    results = {}
    for which in ("qemu", "ours"):
        work = tmp_path / which
        work.mkdir()
        for f in images.iterdir():
            shutil.copy(f, work / f.name)
        results[which] = tool(which, args, work)
    a, b = results["ours"], results["qemu"]
    assert (a.returncode, a.stdout) == (b.returncode, b.stdout), (a, b)
    assert a.stderr.replace(b"imagecore:", b"qemu-img:") == b.stderr, (a.stderr, b.stderr)
    target = args[-1] if len(args) > 1 else ""
    q, o = tmp_path / "qemu" / target, tmp_path / "ours" / target
    assert q.exists() == o.exists()
    if target.endswith(".qcow2") and q.exists():
        assert state(o) == state(q)
        check_clean(o)
        if b.returncode == 0:
            assert run(peer("qemu-img"), "compare", q, o).returncode == 0
