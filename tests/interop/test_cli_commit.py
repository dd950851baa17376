"""`imagecore commit` against `qemu-img commit` on copies of the same backing chains: exit code, stdout,
stderr, then every image of the chain compared with qemu's result (`qemu-img compare`), `qemu-img check`
clean, the committed base's virtual size and the emptied top's map and file size."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.peers import imagecore_cmd, peer, run

Proc = subprocess.CompletedProcess[bytes]


def _qemu_io(img: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args: list[str] = []
    for c in cmds:
        args += ["-c", c]
    run(peer("qemu-io"), "-f", fmt, *args, img)


def _create(path: Path, size: str | None = None, *opts: str, backing: str | None = None,
            fmt: str = "qcow2", backing_fmt: str = "qcow2") -> None:
    args: list[str | Path] = ["create", "-q", "-f", fmt, *opts]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt]
    args.append(path)
    if size is not None:
        args.append(size)
    run(peer("qemu-img"), *args)


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder per scenario; the verbs run inside it, on copies."""
    root = tmp_path_factory.mktemp("chains")
    # three qcow2 layers: data in each, a zero cluster, a compressed cluster and a partial zero write on top
    d = root / "three"
    d.mkdir()
    _create(d / "base.qcow2", "4M")
    _qemu_io(d / "base.qcow2", "write -P 0x07 0 4M")
    _create(d / "mid.qcow2", backing="base.qcow2")
    _qemu_io(d / "mid.qcow2", "write -P 0x08 1M 1M")
    _create(d / "top.qcow2", backing="mid.qcow2")
    _qemu_io(d / "top.qcow2", "write -P 0x01 3M 64k", "write -z 512k 64k", "write -c -P 0x03 2M 64k",
             "write -z 1M 4k", "write -P 0x04 1500k 100k")
    _create(d / "lone.qcow2", "1M")
    _create(d / "r.raw", "1M", fmt="raw")
    # a raw base smaller than its overlay: it grows
    d = root / "raw"
    d.mkdir()
    _create(d / "base.raw", "1M", fmt="raw")
    _qemu_io(d / "base.raw", "write -P 0x07 0 1M", fmt="raw")
    _create(d / "top.qcow2", "4M", backing="base.raw", backing_fmt="raw")
    _qemu_io(d / "top.qcow2", "write -P 0x01 3M 64k", "write -z 512k 64k", "write -P 0x02 960k 128k")
    # a qcow2 base smaller than its overlay
    d = root / "small"
    d.mkdir()
    _create(d / "base.qcow2", "1M")
    _qemu_io(d / "base.qcow2", "write -P 0x07 0 1M")
    _create(d / "top.qcow2", "5M", backing="base.qcow2")
    _qemu_io(d / "top.qcow2", "write -P 0x01 4M 1M", "write -z 0 64k", "write -P 0x02 900k 200k")
    # overlays qemu empties by discarding every cluster: v2, internal snapshots
    d = root / "discard"
    d.mkdir()
    _create(d / "base.qcow2", "4M")
    _qemu_io(d / "base.qcow2", "write -P 0x07 0 4M")
    _create(d / "v2.qcow2", None, "-o", "compat=0.10", backing="base.qcow2")
    _qemu_io(d / "v2.qcow2", "write -P 0x01 3M 64k", "write -P 0x02 0 512")
    _create(d / "snap.qcow2", backing="base.qcow2")
    _qemu_io(d / "snap.qcow2", "write -P 0x01 1M 128k")
    run(peer("qemu-img"), "snapshot", "-c", "s1", d / "snap.qcow2")
    _qemu_io(d / "snap.qcow2", "write -P 0x02 1M 64k", "write -z 2M 64k")
    # subclusters, and small clusters over large ones
    d = root / "clusters"
    d.mkdir()
    _create(d / "base.qcow2", "4M", "-o", "cluster_size=1M")
    _qemu_io(d / "base.qcow2", "write -P 0x07 0 4M")
    _create(d / "ext.qcow2", None, "-o", "extended_l2=on", backing="base.qcow2")
    _qemu_io(d / "ext.qcow2", "write -P 0x01 4k 4k", "write -z 100k 2k", "write -P 0x02 2M 64k")
    _create(d / "small.qcow2", None, "-o", "cluster_size=4k", backing="base.qcow2")
    _qemu_io(d / "small.qcow2", "write -P 0x03 12k 8k", "write -z 1M 4k", "write -P 0x04 3M 1M")
    # an image between top and base shorter than both: past its end the top reads zeroes
    d = root / "short"
    d.mkdir()
    _create(d / "base.qcow2", "4M")
    _qemu_io(d / "base.qcow2", "write -P 0x07 0 4M")
    _create(d / "mid.qcow2", "2M", backing="base.qcow2")
    _create(d / "top.qcow2", "4M", backing="mid.qcow2")
    _qemu_io(d / "top.qcow2", "write -P 0x01 0 64k")
    # vmdk bases: one that would have to grow (qemu cannot), one that need not
    d = root / "vmdk"
    d.mkdir()
    _create(d / "small.vmdk", "1M", fmt="vmdk")
    _create(d / "big.vmdk", "4M", fmt="vmdk")
    _qemu_io(d / "big.vmdk", "write -P 0x07 0 2M", fmt="vmdk")
    for name, base in (("s.qcow2", "small.vmdk"), ("b.qcow2", "big.vmdk")):
        _create(d / name, "4M", backing=base, backing_fmt="vmdk")
        _qemu_io(d / name, "write -P 0x01 3M 64k", "write -z 1M 64k")
    return root


def both(chains: Path, work: Path, scenario: str, args: list[str]) -> tuple[Proc, Proc]:
    """Run qemu-img and imagecore commit on copies of one scenario: the same exit code and output."""
    for side in ("q", "o"):
        shutil.copytree(chains / scenario, work / side)
    q = subprocess.run([peer("qemu-img"), "commit", *args], capture_output=True, cwd=work / "q", timeout=120)
    o = subprocess.run([*imagecore_cmd(), "commit", *args], capture_output=True, cwd=work / "o", timeout=120)
    assert b"Traceback" not in o.stderr, o.stderr
    assert o.returncode == q.returncode, (o.stderr, q.stderr)
    assert o.stdout == q.stdout
    assert o.stderr.replace(b"imagecore", b"PROG") == q.stderr.replace(b"qemu-img", b"PROG")
    return q, o


def _map(path: Path) -> list[dict[str, Any]]:
    """qemu-img map's runs without host offsets (allocation order is each tool's own), re-merged."""
    out: list[dict[str, Any]] = []
    for e in json.loads(run(peer("qemu-img"), "map", "--output=json", "-U", path).stdout):
        e.pop("offset", None)
        if out and out[-1]["start"] + out[-1]["length"] == e["start"] and \
                {k: v for k, v in out[-1].items() if k not in ("start", "length")} == \
                {k: v for k, v in e.items() if k not in ("start", "length")}:
            out[-1]["length"] += e["length"]
        else:
            out.append(e)
    return out


def _info(path: Path) -> dict[str, Any]:
    return dict(json.loads(run(peer("qemu-img"), "info", "--output=json", "-U", path).stdout))


def verify(work: Path, top: str | None = None) -> None:
    """Every image reads as qemu's result does, qcow2 ones check clean, sizes agree; the top's map too."""
    for theirs in sorted((work / "q").iterdir()):
        ours = work / "o" / theirs.name
        fmt = theirs.suffix[1:]
        assert _info(ours)["virtual-size"] == _info(theirs)["virtual-size"], theirs.name
        run(peer("qemu-img"), "compare", "-U", "-f", fmt, "-F", fmt, theirs, ours)
        if fmt == "qcow2":
            run(peer("qemu-img"), "check", "-U", ours)
    if top is not None:
        ours, theirs = work / "o" / top, work / "q" / top
        assert _map(ours) == _map(theirs)
        assert ours.stat().st_size == theirs.stat().st_size


COMMITS = [
    ("three", ["top.qcow2"], "top.qcow2"),
    ("three", ["-q", "top.qcow2"], "top.qcow2"),
    ("three", ["-d", "top.qcow2"], "top.qcow2"),
    ("three", ["-b", "base.qcow2", "top.qcow2"], "top.qcow2"),
    ("three", ["-b", "mid.qcow2", "top.qcow2"], "top.qcow2"),
    ("three", ["-b", "./base.qcow2", "top.qcow2"], None),
    ("three", ["-f", "qcow2", "-t", "unsafe", "mid.qcow2"], "mid.qcow2"),
    ("three", ["-t", "none", "-r", "64M", "top.qcow2"], "top.qcow2"),
    ("raw", ["top.qcow2"], "top.qcow2"),
    ("small", ["top.qcow2"], "top.qcow2"),
    ("discard", ["v2.qcow2"], "v2.qcow2"),
    ("discard", ["snap.qcow2"], None),
    ("clusters", ["ext.qcow2"], "ext.qcow2"),
    ("clusters", ["small.qcow2"], "small.qcow2"),
    ("short", ["-b", "base.qcow2", "top.qcow2"], "top.qcow2"),
    ("short", ["top.qcow2"], "top.qcow2"),
    ("vmdk", ["b.qcow2"], "b.qcow2"),
]


@pytest.mark.parametrize(("scenario", "args", "top"), COMMITS,
                         ids=[f"{s}: {' '.join(a)}" for s, a, _ in COMMITS])
def test_commit(chains: Path, tmp_path: Path, scenario: str, args: list[str], top: str | None) -> None:
    q, _ = both(chains, tmp_path, scenario, args)
    assert q.returncode == 0
    verify(tmp_path, top)


def test_snapshot_survives_in_the_discarded_top(chains: Path, tmp_path: Path) -> None:
    both(chains, tmp_path, "discard", ["snap.qcow2"])
    ours, theirs = tmp_path / "o" / "snap.qcow2", tmp_path / "q" / "snap.qcow2"
    assert _map(ours) == _map(theirs)
    for side in (ours, theirs):
        run(peer("qemu-img"), "snapshot", "-a", "s1", side)
    run(peer("qemu-img"), "compare", theirs, ours)
    run(peer("qemu-img"), "check", ours)


def test_emptied_top_reads_through_to_the_base(chains: Path, tmp_path: Path) -> None:
    """The emptied top is qemu's fresh image: nothing allocated, the chain reads the committed base."""
    both(chains, tmp_path, "three", ["top.qcow2"])
    ours = tmp_path / "o" / "top.qcow2"
    assert all(e["depth"] >= 1 for e in _map(ours))
    # (the same length; qemu may leave a block more allocated by how it zeroes)
    assert _info(ours)["actual-size"] <= _info(tmp_path / "q" / "top.qcow2")["actual-size"]
    check = json.loads(run(peer("qemu-img"), "check", "--output=json", ours).stdout)
    assert check.get("allocated-clusters", 0) == 0 and check["image-end-offset"] == 4 * 65536
    run(peer("qemu-img"), "compare", chains / "three" / "top.qcow2", ours)


def test_progress(chains: Path, tmp_path: Path) -> None:
    for side in ("q", "o"):
        shutil.copytree(chains / "three", tmp_path / side)
    cmds = {"q": [peer("qemu-img")], "o": imagecore_cmd()}
    outs = {side: subprocess.run([*cmds[side], "commit", "-p", "top.qcow2"], capture_output=True,
                                 cwd=tmp_path / side, timeout=120) for side in cmds}
    for side, proc in outs.items():
        assert proc.returncode == 0, proc.stderr
        text = proc.stdout.decode()
        # how often qemu redraws depends on its job's timing: the shape is what must agree
        assert text.startswith("    (0.00/100%)\r")
        assert text.endswith("    (100.00/100%)\r\nImage committed.\n")
        values = [float(p.split("/")[0].strip(" (")) for p in text.split("\r")[:-1]]
        assert values == sorted(values), side
    verify(tmp_path, "top.qcow2")


FAILS = [
    ("three", ["lone.qcow2"]), ("three", ["-b", "nope", "top.qcow2"]),
    ("three", ["-b", "top.qcow2", "top.qcow2"]), ("three", ["-p", "-b", "nope", "top.qcow2"]),
    ("three", ["-b", "sub/base.qcow2", "top.qcow2"]), ("three", ["r.raw"]),
    ("three", ["-f", "raw", "top.qcow2"]), ("three", ["-r", "x", "top.qcow2"]),
    ("three", ["-r", "-1", "top.qcow2"]), ("three", ["-r", "9E", "top.qcow2"]),
    ("three", ["-t", "bogus", "top.qcow2"]), ("three", ["-x", "top.qcow2"]), ("three", []),
    ("three", ["top.qcow2", "mid.qcow2"]), ("three", ["missing.qcow2"]), ("three", ["."]),
    ("three", ["-b"]), ("vmdk", ["s.qcow2"]),
]


@pytest.mark.parametrize(("scenario", "args"), FAILS,
                         ids=[f"{s}: {' '.join(a) or 'none'}" for s, a in FAILS])
def test_refusals(chains: Path, tmp_path: Path, scenario: str, args: list[str]) -> None:
    q, _ = both(chains, tmp_path, scenario, args)
    assert q.returncode == 1
    for f in (chains / scenario).iterdir():
        if f.suffix == ".qcow2":  # nothing written (a vmdk base's header may be reopened and rewritten)
            assert (tmp_path / "o" / f.name).read_bytes() == f.read_bytes(), f.name


def test_missing_backing_files_are_named_level_by_level(chains: Path, tmp_path: Path) -> None:
    shutil.copytree(chains / "three", tmp_path / "src")
    (tmp_path / "src" / "base.qcow2").rename(tmp_path / "src" / "gone.qcow2")
    for args in (["top.qcow2"], ["mid.qcow2"]):
        q = subprocess.run([peer("qemu-img"), "commit", *args], capture_output=True, cwd=tmp_path / "src")
        o = subprocess.run([*imagecore_cmd(), "commit", *args], capture_output=True, cwd=tmp_path / "src")
        assert (o.returncode, o.stdout) == (q.returncode, q.stdout) == (1, b"")
        assert o.stderr.replace(b"imagecore", b"PROG") == q.stderr.replace(b"qemu-img", b"PROG")


def test_rate_limit_is_kept(chains: Path, tmp_path: Path) -> None:
    """-r caps the data copied per second: 2 MiB at 1 MiB/s takes about a second more than unlimited."""
    d = tmp_path / "w"
    d.mkdir()
    _create(d / "base.qcow2", "8M")
    _create(d / "top.qcow2", backing="base.qcow2")
    _qemu_io(d / "top.qcow2", "write -P 0x05 0 3M")
    began = time.monotonic()
    run(*imagecore_cmd(), "commit", "-q", "-r", "1M", d / "top.qcow2")
    took = time.monotonic() - began
    assert took >= 1.9, took
    run(peer("qemu-io"), "-c", "read -P 0x05 0 3M", d / "base.qcow2")


# -- locks: the holders of tests/interop/test_lock_matrix.py's kind, qemu-io read-write and read-only ------

@contextmanager
def _held(work: Path, args: list[str]) -> Iterator[None]:
    proc = subprocess.Popen([peer("qemu-io"), *args], cwd=work, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"read 0 512\n")
        proc.stdin.flush()
        assert b"read" in proc.stdout.readline()  # answered: the image is open with its locks
        yield
    finally:
        proc.kill()
        proc.wait()


LOCKS = [
    (["-r", "-f", "qcow2", "base.qcow2"], ["top.qcow2"]),
    (["-r", "-f", "qcow2", "base.qcow2"], ["-b", "base.qcow2", "top.qcow2"]),
    (["-r", "-f", "qcow2", "mid.qcow2"], ["top.qcow2"]),
    (["-f", "qcow2", "mid.qcow2"], ["top.qcow2"]),
    (["-r", "-f", "qcow2", "top.qcow2"], ["top.qcow2"]),
    (["-f", "qcow2", "top.qcow2"], ["-d", "top.qcow2"]),
    (["-f", "qcow2", "base.qcow2"], ["-b", "base.qcow2", "top.qcow2"]),
    (["-U", "-r", "-f", "qcow2", "mid.qcow2"], ["top.qcow2"]),
    (["-U", "-r", "-f", "qcow2", "mid.qcow2"], ["-b", "base.qcow2", "top.qcow2"]),
    (["-U", "-r", "-f", "qcow2", "base.qcow2"], ["-b", "base.qcow2", "top.qcow2"]),
]


@pytest.mark.parametrize(("holder", "args"), LOCKS, ids=[f"{' '.join(h)}: {' '.join(a)}" for h, a in LOCKS])
def test_locks(chains: Path, tmp_path: Path, holder: list[str], args: list[str]) -> None:
    outcomes = {}
    for side, cmd in (("q", [peer("qemu-img")]), ("o", imagecore_cmd())):
        work = tmp_path / side
        shutil.copytree(chains / "three", work)
        with _held(work, holder):
            p = subprocess.run([*cmd, "commit", *args], capture_output=True, cwd=work, timeout=60)
        prog = "qemu-img" if side == "q" else "imagecore"
        outcomes[side] = (p.returncode, p.stdout, p.stderr.replace(prog.encode(), b"PROG"))
    assert outcomes["o"] == outcomes["q"]
    if outcomes["q"][0] == 0:
        verify(tmp_path)
