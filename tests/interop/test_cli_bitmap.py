"""`imagecore bitmap` beside `qemu-img bitmap` 7.2 on copies of the same images: the same exit code and
messages (qemu's node names, "#blockNNN" counters that differ between its own runs, aside), the same
bitmaps afterwards (qemu-img info), the same bits in them (read by qemu-nbd -B), and qemu-img check clean;
and each tool using the bitmaps the other made."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.bitmaps_util import bitmaps_of, check_clean, crash_qemu_writer, expected, qemu_map
from tests.interop.nbdsrv_fixture import qemu_io_holding
from tests.peers import imagecore_cmd, peer, run

MiB = 1 << 20
NODE = re.compile(rb"#block[0-9]+")


def tool(which: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    cmd = [*imagecore_cmd()] if which == "ours" else [peer("qemu-img")]
    return subprocess.run([*cmd, "bitmap", *args], capture_output=True, timeout=60, cwd=cwd)


def same(a: subprocess.CompletedProcess[bytes], b: subprocess.CompletedProcess[bytes]) -> None:
    assert (a.returncode, a.stdout) == (b.returncode, b.stdout), (a, b)
    ours = a.stderr.replace(b"imagecore:", b"qemu-img:").replace(b"'imagecore --help'", b"'qemu-img --help'")
    assert NODE.sub(b"#block", ours) == NODE.sub(b"#block", b.stderr), (a.stderr, b.stderr)
    assert b"Traceback" not in a.stderr


def io(img: Path, *cmds: str) -> None:
    args: list[str] = []
    for c in cmds:
        args += ["-c", c]
    run(peer("qemu-io"), "-f", "qcow2", *args, img)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a.qcow2: b0 (64k, enabled, written to), slow (1M, disabled, written to), broken (in use);
    other.qcow2: same size, its own bitmaps; small.qcow2: smaller; v2.qcow2; r.raw."""
    d = tmp_path_factory.mktemp("bitmaps")
    qi = peer("qemu-img")
    a = d / "a.qcow2"
    run(qi, "create", "-q", "-f", "qcow2", a, "64M")
    run(qi, "bitmap", "--add", a, "broken")
    crash_qemu_writer(a, "write 5M 64k")
    run(qi, "bitmap", "--add", a, "b0")
    run(qi, "bitmap", "--add", "-g", "1M", a, "slow")
    io(a, "write 0 64k", "write 10M 3M", "write 40M 512")
    run(qi, "bitmap", "--disable", a, "slow")
    io(a, "write 50M 64k")
    o = d / "other.qcow2"
    run(qi, "create", "-q", "-f", "qcow2", o, "64M")
    run(qi, "bitmap", "--add", "-g", "4k", o, "ob")
    io(o, "write 20M 4k", "write 63M 1M")
    run(qi, "create", "-q", "-f", "qcow2", d / "small.qcow2", "32M")
    run(qi, "bitmap", "--add", d / "small.qcow2", "b0")
    run(qi, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", d / "v2.qcow2", "16M")
    run(qi, "create", "-q", "-f", "raw", d / "r.raw", "16M")
    return d


def state(img: Path) -> tuple[list[dict[str, object]], dict[str, object]]:
    """The bitmaps qemu-img lists, and what QEMU reads in each consistent one."""
    listed = bitmaps_of(img)
    maps = {str(b["name"]): qemu_map(img, str(b["name"])) for b in listed
            if "in-use" not in b["flags"]}  # type: ignore[operator]
    return listed, maps


def compare(images: Path, tmp_path: Path, args: list[str], *, files: tuple[str, ...] = ("a.qcow2",)) -> None:
    """Run ``qemu-img bitmap ARGS`` and ``imagecore bitmap ARGS`` on copies of ``files`` and compare."""
    results = {}
    for which in ("qemu", "ours"):
        work = tmp_path / which
        work.mkdir()
        for f in ("a.qcow2", "other.qcow2", "small.qcow2", "v2.qcow2", "r.raw"):
            shutil.copy(images / f, work / f)
        results[which] = tool(which, args, work)
    same(results["ours"], results["qemu"])
    for f in files:
        q, o = tmp_path / "qemu" / f, tmp_path / "ours" / f
        if f.endswith(".qcow2"):
            assert state(o) == state(q), (args, f)
            check_clean(o)
        else:
            assert o.read_bytes() == q.read_bytes()


CASES = [
    # the command line
    [], ["a.qcow2", "b0"], ["--add", "a.qcow2"], ["--add", "a.qcow2", "b0", "extra"], ["--add"],
    ["-g", "64k", "a.qcow2", "b0"], ["--remove", "-g", "64k", "a.qcow2", "b0"],
    ["--merge", "b0", "-F", "qcow2", "a.qcow2", "x"], ["--add", "-b", "other.qcow2", "a.qcow2", "x"],
    ["--add", "-g", "abc", "a.qcow2", "x"], ["--add", "-g", "-1", "a.qcow2", "x"],
    ["--add", "-g", "1k5", "a.qcow2", "x"], ["--add", "-g", "8E", "a.qcow2", "x"], ["--add", "-g"],
    ["--bogus", "a.qcow2", "x"], ["--add", "-U", "a.qcow2", "x"],
    # add
    ["--add", "a.qcow2", "new"], ["--add", "-g", "0", "a.qcow2", "new"],
    ["--add", "-g", "512", "a.qcow2", "new"],
    ["--add", "-g", "2G", "a.qcow2", "new"], ["--add", "-g", "4G", "a.qcow2", "new"],
    ["--add", "-g", "4294967808", "a.qcow2", "new"], ["--add", "-g", "1.5k", "a.qcow2", "new"],
    ["--add", "-g", "3000", "a.qcow2", "new"], ["--add", "--granularity", "128k", "a.qcow2", "new"],
    ["--add", "a.qcow2", "b0"], ["--add", "a.qcow2", "broken"], ["--add", "a.qcow2", ""],
    ["--add", "a.qcow2", "x" * 1023], ["--add", "a.qcow2", "x" * 1024], ["--add", "a.qcow2", "é" * 600],
    ["--add", "--disable", "a.qcow2", "new"], ["--add", "--add", "a.qcow2", "new"],
    ["--add", "v2.qcow2", "new"], ["--add", "-f", "raw", "r.raw", "new"], ["--add", "r.raw", "new"],
    ["--add", "-f", "raw", "a.qcow2", "new"],
    # remove, clear, enable, disable
    ["--remove", "a.qcow2", "b0"], ["--remove", "a.qcow2", "broken"], ["--remove", "a.qcow2", "nope"],
    ["--clear", "a.qcow2", "b0"], ["--clear", "a.qcow2", "broken"], ["--clear", "a.qcow2", "nope"],
    ["--enable", "a.qcow2", "slow"], ["--enable", "a.qcow2", "broken"], ["--disable", "a.qcow2", "b0"],
    ["--disable", "a.qcow2", "nope"], ["--remove", "r.raw", "x"], ["--clear", "-f", "raw", "r.raw", "x"],
    ["--enable", "--disable", "--clear", "a.qcow2", "b0"], ["--remove", "--add", "a.qcow2", "b0"],
    ["--remove", "--remove", "a.qcow2", "b0"],
    # merge
    ["--merge", "slow", "a.qcow2", "b0"], ["--merge", "b0", "a.qcow2", "slow"],
    ["--merge", "b0", "--merge", "slow", "a.qcow2", "slow"], ["--merge", "b0", "a.qcow2", "b0"],
    ["--add", "-g", "4k", "--merge", "b0", "--merge", "slow", "--disable", "a.qcow2", "mix"],
    ["--merge", "nope", "a.qcow2", "b0"], ["--merge", "b0", "a.qcow2", "nope"],
    ["--merge", "broken", "a.qcow2", "b0"], ["--merge", "b0", "a.qcow2", "broken"],
    ["--merge", "ob", "-b", "other.qcow2", "a.qcow2", "b0"],
    ["--merge", "ob", "-b", "other.qcow2", "-F", "qcow2", "a.qcow2", "b0"],
    ["--merge", "b0", "-b", "small.qcow2", "a.qcow2", "b0"],
    ["--merge", "b0", "-b", "r.raw", "a.qcow2", "b0"],
    ["--merge", "b0", "-b", "nope.qcow2", "a.qcow2", "b0"],
    ["--merge", "b0", "-b", "a.qcow2", "a.qcow2", "b0"],
    ["--merge", "b0", "-b", "other.qcow2", "a.qcow2", "b0"],
    ["--add", "--merge", "ob", "-b", "other.qcow2", "a.qcow2", "fromother"],
    # opening
    ["--add", "nope.qcow2", "x"], ["--add", "-f", "foo", "a.qcow2", "x"],
    ["--add", "-f", "qcow2", "r.raw", "x"],
]


@pytest.mark.parametrize("args", CASES, ids=[" ".join(a)[:60] or "(none)" for a in CASES])
def test_as_qemu_img(images: Path, tmp_path: Path, args: list[str]) -> None:
    files = ("a.qcow2",) + (("other.qcow2",) if "other.qcow2" in args else ())
    compare(images, tmp_path, args, files=files)


def test_an_image_in_use_is_refused_as_qemu_img_refuses_it(images: Path, tmp_path: Path) -> None:
    img = tmp_path / "held.qcow2"
    shutil.copy(images / "a.qcow2", img)
    with qemu_io_holding(img, "qcow2"):
        same(tool("ours", ["--add", "held.qcow2", "x"], tmp_path), tool("qemu", ["--add", "held.qcow2", "x"],
                                                                          tmp_path))


def test_bitmaps_made_by_imagecore_are_used_by_qemu_and_the_other_way_round(tmp_path: Path) -> None:
    qi = peer("qemu-img")
    img = tmp_path / "x.qcow2"
    run(qi, "create", "-q", "-f", "qcow2", img, "32M")
    run(*imagecore_cmd(), "bitmap", "--add", img, "ours")
    run(*imagecore_cmd(), "bitmap", "--add", "-g", "8k", "--disable", img, "frozen")
    io(img, "write 1M 64k")
    run(qi, "bitmap", "--add", img, "theirs")
    io(img, "write 8M 4k")
    run(qi, "bitmap", "--merge", "theirs", img, "frozen")
    run(*imagecore_cmd(), "bitmap", "--merge", "ours", "--enable", img, "theirs")
    run(qi, "bitmap", "--clear", img, "ours")
    io(img, "write 16M 4k")
    listed, maps = state(img)
    assert [(b["name"], b["granularity"], b["flags"]) for b in listed] == [
        ("ours", 65536, ["auto"]), ("frozen", 8192, []), ("theirs", 65536, ["auto"])]
    assert maps == {"ours": expected(32 * MiB, 65536, [(16 * MiB, 4096)]),
                    # a merge sets whole runs of the source's granularity: 64k of the 8k bitmap
                    "frozen": expected(32 * MiB, 8192, [(8 * MiB, 65536)]),
                    "theirs": expected(32 * MiB, 65536, [(MiB, 65536), (8 * MiB, 4096), (16 * MiB, 4096)])}
    run(*imagecore_cmd(), "bitmap", "--remove", img, "theirs")
    run(qi, "bitmap", "--remove", img, "frozen")
    run(*imagecore_cmd(), "bitmap", "--remove", img, "ours")
    assert bitmaps_of(img) == []
    check_clean(img)


def _ours_and_qemu(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess[bytes],
                                                    subprocess.CompletedProcess[bytes]]:
    o = subprocess.run([*imagecore_cmd(), *args], capture_output=True, timeout=60, cwd=cwd)
    q = subprocess.run([peer("qemu-img"), *[a.replace("ours", "qemu") for a in args]], capture_output=True,
                       timeout=60, cwd=cwd)
    return o, q


@pytest.mark.parametrize("size", ["100G", "64M", "+512", "--shrink 63M", "--shrink 1M"])
def test_resize_resizes_the_bitmaps_as_qemu_img(images: Path, tmp_path: Path, size: str) -> None:
    """qemu-img resize takes the bitmaps to the new size (a table too short would make QEMU refuse the
    image); an inconsistent bitmap refuses any resize."""
    for name in ("ours", "qemu"):
        shutil.copy(images / "a.qcow2", tmp_path / f"{name}.qcow2")
        run(peer("qemu-img"), "bitmap", "--remove", tmp_path / f"{name}.qcow2", "broken")
        shutil.copy(images / "a.qcow2", tmp_path / f"{name}-broken.qcow2")
    for img in ("ours.qcow2", "ours-broken.qcow2"):
        o, q = _ours_and_qemu("resize", *size.split(), img, cwd=tmp_path)
        same(o, q)
        qimg = tmp_path / img.replace("ours", "qemu")
        assert state(tmp_path / img) == state(qimg)
        check_clean(tmp_path / img)


def test_snapshot_revert_is_refused_with_bitmaps_as_qemu_img(images: Path, tmp_path: Path) -> None:
    for name in ("ours", "qemu"):
        shutil.copy(images / "other.qcow2", tmp_path / f"{name}.qcow2")
        run(peer("qemu-img"), "snapshot", "-c", "s", tmp_path / f"{name}.qcow2")
    for sn in ("s", "nope"):
        o, q = _ours_and_qemu("snapshot", "-a", sn, "ours.qcow2", cwd=tmp_path)
        same(o, q)


@pytest.mark.parametrize("output", ["human", "json"])
def test_check_of_an_image_with_bitmaps_in_use_as_qemu_img(images: Path, tmp_path: Path, output: str) -> None:
    """qemu-img 7.2's check says nothing of bitmaps in use (they are inconsistent, not corrupt): neither
    does ours; and both count the bitmaps' clusters as referenced."""
    shutil.copy(images / "a.qcow2", tmp_path / "a.qcow2")
    o, q = _ours_and_qemu("check", f"--output={output}", "a.qcow2", cwd=tmp_path)
    same(o, q)
    assert o.returncode == 0
