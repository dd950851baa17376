"""`imagecore rebase` against `qemu-img rebase` (7.2; qemu 10 for -c) on copies of the same chains: exit code,
stdout (the -p meter), stderr, then the result: `qemu-img info --output=json` alike (backing-filename,
backing-filename-format, full-backing-filename), `qemu-img check` clean, the guest view unchanged in safe
mode and equal to qemu's result, and `qemu-img map --output=json` alike, so that exactly what qemu copies is
copied."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.peers import imagecore_cmd, peer, qemu10, run

Proc = subprocess.CompletedProcess[bytes]
MiB = 1 << 20


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("chains")
    qi, qio = peer("qemu-img"), peer("qemu-io")

    def io(img: str, *cmds: str, fmt: str = "qcow2") -> None:
        args: list[str] = []
        for c in cmds:
            args += ["-c", c]
        # in d: qemu names a data file relative to the working directory
        subprocess.run([qio, "-f", fmt, *args, img], cwd=d, check=True, capture_output=True, timeout=60)

    def create(name: str, *args: str) -> None:
        # the size, when given, comes last, after the file name; relative names (a data file) stay in d
        size = [args[-1]] if args and args[-1][:1].isdigit() else []
        subprocess.run([qi, "create", "-q", *args[:len(args) - len(size)], name, *size], cwd=d, check=True,
                       capture_output=True, timeout=60)

    # A <- B <- C, with data, zero and compressed clusters in every layer
    create("A.qcow2", "-f", "qcow2", "8M")
    io("A.qcow2", "write -P 1 0 3M", "write -z 4M 64k", "write -c -P 5 5M 128k", "write -P 6 7M 1M")
    create("B.qcow2", "-f", "qcow2", "-b", "A.qcow2", "-F", "qcow2")
    io("B.qcow2", "write -P 2 1M 1M", "write -z 2M 192k", "write -c -P 7 6M 128k", "write -P 1 2560k 64k",
       "write -P 8 4M 4k")
    create("C.qcow2", "-f", "qcow2", "-b", "B.qcow2", "-F", "qcow2")
    io("C.qcow2", "write -P 3 7M 512", "write -z 3M 64k", "write -P 4 1M 4k")
    # an image outside the chain whose content partly equals B's view
    create("N.qcow2", "-f", "qcow2", "8M")
    io("N.qcow2", "write -P 2 1M 1M", "write -P 9 5M 1M", "write -P 1 0 512k")
    # bases smaller and larger than their overlays, raw and qcow2
    create("S.qcow2", "-f", "qcow2", "2M")
    io("S.qcow2", "write -P 11 0 2M")
    create("L.qcow2", "-f", "qcow2", "16M")
    io("L.qcow2", "write -P 12 0 4M", "write -P 12 12M 1M")
    create("R.raw", "-f", "raw", "6M")
    io("R.raw", "write -P 1 0 1M", "write -P 13 3M 1M", fmt="raw")  # sparse: copies cost its data only
    create("T.qcow2", "-f", "qcow2", "-b", "S.qcow2", "-F", "qcow2", "4M")
    io("T.qcow2", "write -P 14 512k 64k", "write -z 3M 64k")
    create("U.qcow2", "-f", "qcow2", "-b", "L.qcow2", "-F", "qcow2", "8M")
    io("U.qcow2", "write -P 15 1M 64k")
    # standalone, 4 KiB clusters, extended L2 (subclusters), a raw external data file kept raw
    create("P.qcow2", "-f", "qcow2", "-o", "cluster_size=4k", "8M")
    create("Q.qcow2", "-f", "qcow2", "-o", "cluster_size=512", "1M")
    io("P.qcow2", "write -P 16 100k 10k")
    create("X.qcow2", "-f", "qcow2", "-o", "extended_l2=on", "-b", "A.qcow2", "-F", "qcow2")
    io("X.qcow2", "write -P 17 10k 6k", "write -P 18 1M 100k")
    create("D.qcow2", "-f", "qcow2", "-o", "data_file=D.data,data_file_raw=on", "8M")
    io("D.qcow2", "write -P 19 0 64k")
    # relative names in a folder of their own
    (d / "sub").mkdir()
    create("sub/base.qcow2", "-f", "qcow2", "4M")
    io("sub/base.qcow2", "write -P 20 0 2M")
    create("sub/mid.qcow2", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2")
    io("sub/mid.qcow2", "write -P 21 1M 2M")
    create("sub/top.qcow2", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2")
    # vmdk: qemu copies, then cannot change the parent name
    create("vb.vmdk", "-f", "vmdk", "1M")
    io("vb.vmdk", "write -P 22 0 64k", fmt="vmdk")
    create("vt.vmdk", "-f", "vmdk", "-b", "vb.vmdk", "-F", "vmdk")
    io("vt.vmdk", "write -P 23 512k 4k", fmt="vmdk")
    create("raw.raw", "-f", "raw", "1M")
    # an overlay with persistent bitmaps: rebase -u keeps them as qemu-img does
    create("BM.qcow2", "-f", "qcow2", "-b", "A.qcow2", "-F", "qcow2")
    io("BM.qcow2", "write -P 24 64k 64k")
    subprocess.run([qi, "bitmap", "--add", "BM.qcow2", "b0"], cwd=d, check=True, timeout=60)
    return d


def clone(src: Path, dst: Path) -> None:
    """A copy of the fixture folder, holes kept (cp finds them; shutil would write them out)."""
    subprocess.run(["cp", "-a", src, dst], check=True, timeout=60)


def both(images: Path, work: Path, args: list[str], *, qemu: str | None = None) -> tuple[Proc, Proc]:
    """Run qemu-img and imagecore with ``args`` on copies of ``images``; the same exit code and output."""
    for side in ("q", "o"):
        clone(images, work / side)
    q = subprocess.run([qemu or peer("qemu-img"), "rebase", *args], capture_output=True, cwd=work / "q",
                       timeout=120)
    o = subprocess.run([*imagecore_cmd(), "rebase", *args], capture_output=True, cwd=work / "o", timeout=120)
    assert b"Traceback" not in o.stderr
    assert (o.returncode, o.stdout) == (q.returncode, q.stdout), (o.stderr, q.stderr)
    assert o.stderr.replace(b"imagecore", b"PROG") == q.stderr.replace(b"qemu-img", b"PROG")
    return q, o


def info(path: Path) -> dict[str, Any]:
    """qemu-img info --output=json, run in the image's side of the work folder (names relative to it)."""
    side = path.parent if path.parent.name != "sub" else path.parent.parent
    proc = subprocess.run([peer("qemu-img"), "info", "--output=json", "-U", str(path.relative_to(side))],
                          capture_output=True, cwd=side, timeout=60, check=True)
    out = dict(json.loads(proc.stdout))
    out.pop("actual-size", None)
    if out["format"] == "vmdk":
        # a vmdk image gets a new random CID at its first write
        out["format-specific"]["data"].pop("cid", None)
    return out


def mapping(path: Path, cwd: Path) -> list[dict[str, Any]]:
    proc = subprocess.run([peer("qemu-img"), "map", "--output=json", "-U", str(path.relative_to(cwd))],
                          capture_output=True, cwd=cwd, timeout=60, check=True)
    entries = json.loads(proc.stdout)
    for e in entries:
        e.pop("offset", None)
    return list(entries)


def compare(a: Path, b: Path, *extra: str) -> None:
    run(peer("qemu-img"), "compare", "-U", *extra, a, b)


# Images whose subclusters the qcow2 driver allocates a whole cluster at a time (qemu allocates them one by
# one): the same content, the map at cluster granularity.
WHOLE_CLUSTERS = frozenset({"X.qcow2"})


def verify(images: Path, work: Path, name: str, *, same_view: bool = True, fmt: str = "qcow2") -> None:
    """imagecore's result: qemu's info, clean, qemu's guest view (the old one in safe mode), qemu's map."""
    ours, theirs = work / "o" / name, work / "q" / name
    assert info(ours) == info(theirs)
    if fmt == "qcow2":
        run(peer("qemu-img"), "check", ours)
    compare(theirs, ours)
    if same_view:
        compare(images / name, ours)
    if name not in WHOLE_CLUSTERS:
        assert mapping(ours, work / "o") == mapping(theirs, work / "q")


SAFE = [
    # onto an image of the old chain: only what B defines is compared
    (["-b", "A.qcow2", "-F", "qcow2", "C.qcow2"], "C.qcow2"),
    (["-p", "-b", "A.qcow2", "-F", "qcow2", "C.qcow2"], "C.qcow2"),
    (["-q", "-p", "-b", "A.qcow2", "-F", "qcow2", "C.qcow2"], "C.qcow2"),
    # onto an image outside the chain, partly equal
    (["-b", "N.qcow2", "-F", "qcow2", "C.qcow2"], "C.qcow2"),
    (["-p", "-b", "N.qcow2", "-F", "qcow2", "B.qcow2"], "B.qcow2"),
    # flattening
    (["-b", "", "C.qcow2"], "C.qcow2"),
    (["-p", "-b", "", "B.qcow2"], "B.qcow2"),
    (["-b", "", "-F", "qcow2", "T.qcow2"], "T.qcow2"),
    # a raw new backing, smaller than the image
    (["-b", "R.raw", "-F", "raw", "C.qcow2"], "C.qcow2"),
    # the old backing smaller than the image (zeroes written past its end), new ones smaller and larger
    (["-b", "L.qcow2", "-F", "qcow2", "T.qcow2"], "T.qcow2"),
    (["-b", "S.qcow2", "-F", "qcow2", "U.qcow2"], "U.qcow2"),
    (["-b", "A.qcow2", "-F", "qcow2", "U.qcow2"], "U.qcow2"),
    # a standalone image gets a backing file: where it reads zeroes and the new one data, zeroes are written
    (["-b", "S.qcow2", "-F", "qcow2", "P.qcow2"], "P.qcow2"),
    # the same backing file again, under another name: nothing to copy
    (["-b", "./B.qcow2", "-F", "qcow2", "C.qcow2"], "C.qcow2"),
    # subclusters
    (["-b", "N.qcow2", "-F", "qcow2", "X.qcow2"], "X.qcow2"),
    (["-b", "", "X.qcow2"], "X.qcow2"),
    # relative names resolve against the image's folder, and are stored as given
    (["-b", "base.qcow2", "-F", "qcow2", "sub/top.qcow2"], "sub/top.qcow2"),
    (["-b", "../N.qcow2", "-F", "qcow2", "sub/mid.qcow2"], "sub/mid.qcow2"),
    # -U shares the new backing file; -t/-T take qemu's cache modes
    (["-U", "-t", "none", "-T", "directsync", "-b", "N.qcow2", "-F", "qcow2", "C.qcow2"], "C.qcow2"),
    (["-t", "unsafe", "-b", "A.qcow2", "-F", "qcow2", "C.qcow2"], "C.qcow2"),
    (["-f", "qcow2", "-b", "A.qcow2", "-F", "qcow2", "C.qcow2"], "C.qcow2"),
]


@pytest.mark.parametrize(("args", "name"), SAFE, ids=[" ".join(a) for a, _ in SAFE])
def test_safe_rebase(images: Path, tmp_path: Path, args: list[str], name: str) -> None:
    q, _ = both(images, tmp_path, args)
    assert q.returncode == 0
    verify(images, tmp_path, name)


UNSAFE = [
    (["-u", "-b", "N.qcow2", "-F", "qcow2", "C.qcow2"], "C.qcow2"),
    (["-u", "-b", "R.raw", "-F", "raw", "C.qcow2"], "C.qcow2"),
    (["-p", "-u", "-b", "gone.qcow2", "-F", "qcow2", "C.qcow2"], "C.qcow2"),
    (["-u", "C.qcow2"], "C.qcow2"),
    (["-u", "-b", "", "-F", "qcow2", "B.qcow2"], "B.qcow2"),
    (["-u", "-b", "A.qcow2", "-F", "qcow2", "P.qcow2"], "P.qcow2"),
    (["-u", "-b", "x" * 370, "-F", "qcow2", "C.qcow2"], "C.qcow2"),
    (["-u", "-b", "../L.qcow2", "-F", "qcow2", "sub/top.qcow2"], "sub/top.qcow2"),
    (["-u", "-b", "N.qcow2", "-F", "qcow2", "BM.qcow2"], "BM.qcow2"),
]


@pytest.mark.parametrize(("args", "name"), UNSAFE, ids=[" ".join(a)[:60] for a, _ in UNSAFE])
def test_unsafe_rebase(images: Path, tmp_path: Path, args: list[str], name: str) -> None:
    q, _ = both(images, tmp_path, args)
    assert q.returncode == 0
    ours, theirs = tmp_path / "o" / name, tmp_path / "q" / name
    assert info(ours) == info(theirs)
    # only the header changed: every cluster stays where it was
    assert ours.read_bytes()[65536:] == (images / name).read_bytes()[65536:]


def test_unsafe_rebase_keeps_everything_else_of_the_header(images: Path, tmp_path: Path) -> None:
    """The header is rewritten in qemu's layout: the same bytes as qemu's, extensions and all."""
    both(images, tmp_path, ["-u", "-b", "N.qcow2", "-F", "qcow2", "C.qcow2"])
    ours, theirs = (tmp_path / side / "C.qcow2" for side in ("o", "q"))
    assert ours.read_bytes()[:65536] == theirs.read_bytes()[:65536]


FAILS = [
    [], ["C.qcow2"], ["-b", "A.qcow2"], ["-b", "A.qcow2", "C.qcow2", "B.qcow2"],
    ["-b", "nope.qcow2", "-F", "qcow2", "C.qcow2"], ["-b", "nope.qcow2", "-F", "qcow2", "sub/top.qcow2"],
    ["-u", "-b", "nope.qcow2", "C.qcow2"], ["-b", "A.qcow2", "-F", "foo", "C.qcow2"],
    ["-u", "-b", "A.qcow2", "-F", "foo", "C.qcow2"], ["-f", "foo", "-b", "A.qcow2", "C.qcow2"],
    ["-t", "foo", "-b", "A.qcow2", "C.qcow2"], ["-T", "foo", "-b", "A.qcow2", "C.qcow2"],
    ["-p", "-t", "foo", "-b", "A.qcow2", "C.qcow2"], ["-b", "A.qcow2", "-F", "qcow2", "nope.qcow2"],
    ["-p", "-b", "", "nope.qcow2"], ["-f", "raw", "-b", "", "raw.raw"], ["-p", "-f", "raw", "-u", "raw.raw"],
    ["-f", "raw", "-b", "A.qcow2", "-F", "qcow2", "raw.raw"],
    ["-u", "-b", "x" * 1100, "-F", "qcow2", "C.qcow2"],
    ["-u", "-b", "y" * 380, "-F", "qcow2", "Q.qcow2"], ["-b", "A.qcow2", "-F", "qcow2", "D.qcow2"],
    ["-b", "R.raw", "-F", "qcow2", "C.qcow2"], ["-b", "C.qcow2", "-F", "qcow2", "C.qcow2"], ["-x", "C.qcow2"],
    ["-b"], ["-b", "A.qcow2", "-F", "qcow2", "sub"],
]


@pytest.mark.parametrize("args", FAILS, ids=[" ".join(a)[:60] or "none" for a in FAILS])
def test_refusals(images: Path, tmp_path: Path, args: list[str]) -> None:
    q, _ = both(images, tmp_path, args)
    assert q.returncode == 1
    for name in ("C.qcow2", "P.qcow2", "Q.qcow2", "raw.raw", "D.qcow2"):
        assert (tmp_path / "o" / name).read_bytes() == (images / name).read_bytes()


@pytest.mark.parametrize("args", [["-b", "A.qcow2", "C.qcow2"], ["-p", "-b", "N.qcow2", "C.qcow2"],
                                  ["-b", "", "vt.vmdk"], ["-b", "vb.vmdk", "-F", "vmdk", "vt.vmdk"]])
def test_copies_then_refuses_the_header_change(images: Path, tmp_path: Path, args: list[str]) -> None:
    """Without -F (safe mode), or on vmdk, qemu-img copies what differs and then fails to switch: the copy
    stays (the guest view is the old one) and so does the backing file."""
    q, _ = both(images, tmp_path, args)
    assert q.returncode == 1
    name = args[-1]
    verify(images, tmp_path, name, fmt="vmdk" if name.endswith(".vmdk") else "qcow2")


def test_missing_old_backing_file(images: Path, tmp_path: Path) -> None:
    """Safe mode opens the old chain (and fails without it, as qemu-img); -u does not need it."""
    for side in ("q", "o"):
        clone(images, tmp_path / side)
        (tmp_path / side / "B.qcow2").rename(tmp_path / side / "B-moved.qcow2")
    for args in (["-b", "A.qcow2", "-F", "qcow2", "C.qcow2"], ["-u", "-b", "B-moved.qcow2", "-F", "qcow2",
                                                               "C.qcow2"]):
        q = subprocess.run([peer("qemu-img"), "rebase", *args], capture_output=True, cwd=tmp_path / "q")
        o = subprocess.run([*imagecore_cmd(), "rebase", *args], capture_output=True, cwd=tmp_path / "o")
        assert (o.returncode, o.stdout) == (q.returncode, q.stdout)
        assert o.stderr.replace(b"imagecore", b"PROG") == q.stderr.replace(b"qemu-img", b"PROG")
    assert info(tmp_path / "o" / "C.qcow2") == info(tmp_path / "q" / "C.qcow2")
    compare(images / "C.qcow2", tmp_path / "o" / "C.qcow2")


@contextmanager
def held(path: Path, *flags: str) -> Iterator[None]:
    """qemu-io holding ``path`` open (read-write unless -r is given) while the block runs."""
    proc = subprocess.Popen([peer("qemu-io"), *flags, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"help\n")
        proc.stdin.flush()
        proc.stdout.readline()  # qemu-io answers: the image is open and locked
        time.sleep(0.1)
        yield
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(("holder", "flags", "args"), [
    ("C.qcow2", ("-r",), ["-b", "A.qcow2", "-F", "qcow2", "C.qcow2"]),
    ("C.qcow2", ("-r",), ["-u", "-U", "-b", "A.qcow2", "-F", "qcow2", "C.qcow2"]),
    ("A.qcow2", (), ["-b", "N.qcow2", "-F", "qcow2", "C.qcow2"]),
    ("A.qcow2", (), ["-u", "-b", "N.qcow2", "-F", "qcow2", "C.qcow2"]),
    ("N.qcow2", (), ["-b", "N.qcow2", "-F", "qcow2", "C.qcow2"]),
    ("N.qcow2", (), ["-U", "-b", "N.qcow2", "-F", "qcow2", "C.qcow2"]),
])
def test_locks(images: Path, tmp_path: Path, holder: str, flags: tuple[str, ...], args: list[str]) -> None:
    """The lock bytes of qemu-img rebase: the image written, its old chain read, -U for the new backing
    file only."""
    results = []
    for side, cmd in (("q", [peer("qemu-img")]), ("o", imagecore_cmd())):
        clone(images, tmp_path / side)
        with held(tmp_path / side / holder, *flags):
            results.append(subprocess.run([*cmd, "rebase", *args], capture_output=True, cwd=tmp_path / side,
                                          timeout=60))
    q, o = results
    assert (o.returncode, o.stdout) == (q.returncode, q.stdout)
    assert o.stderr.replace(b"imagecore", b"PROG") == q.stderr.replace(b"qemu-img", b"PROG")
    assert info(tmp_path / "o" / "C.qcow2") == info(tmp_path / "q" / "C.qcow2")


COMPRESSED = [
    (["-c", "-b", "A.qcow2", "-F", "qcow2", "C.qcow2"], "C.qcow2"),
    (["-c", "-b", "", "C.qcow2"], "C.qcow2"),
    (["-c", "-b", "N.qcow2", "-F", "qcow2", "B.qcow2"], "B.qcow2"),
    (["-c", "-b", "L.qcow2", "-F", "qcow2", "T.qcow2"], "T.qcow2"),
    (["-c", "-b", "S.qcow2", "-F", "qcow2", "P.qcow2"], "P.qcow2"),
]


@pytest.mark.parametrize(("args", "name"), COMPRESSED, ids=[" ".join(a) for a, _ in COMPRESSED])
def test_compressed_rebase_as_qemu_10(images: Path, tmp_path: Path, args: list[str], name: str) -> None:
    """-c (qemu 10; 7.2 has no -c): the clusters copied are compressed; the view, the backing file and the
    consistency are qemu 10's, and so is where data is (compressed or not)."""
    q, _ = both(images, tmp_path, args, qemu=qemu10("qemu-img"))
    assert q.returncode == 0
    ours, theirs = tmp_path / "o" / name, tmp_path / "q" / name
    assert info(ours) == info(theirs)
    run(peer("qemu-img"), "check", ours)
    compare(theirs, ours)
    compare(images / name, ours)

    def compressed(path: Path) -> list[tuple[int, int, bool]]:
        out = json.loads(run(qemu10("qemu-img"), "map", "--output=json", "-U", path).stdout)
        return [(e["start"], e["length"], e["compressed"]) for e in out if e["depth"] == 0 and e["data"]]

    assert compressed(ours) == compressed(theirs)


def test_compression_refused_where_the_format_has_none(images: Path, tmp_path: Path) -> None:
    q, _ = both(images, tmp_path, ["-c", "-f", "raw", "-b", "A.qcow2", "-F", "qcow2", "raw.raw"],
                qemu=qemu10("qemu-img"))
    assert q.returncode == 1 and b"Compression not supported for this file format" in q.stderr


def test_rebased_image_is_used_by_qemu(images: Path, tmp_path: Path) -> None:
    """After a safe rebase onto a member of the chain, the middle layer can go: the image reads the same."""
    both(images, tmp_path, ["-b", "A.qcow2", "-F", "qcow2", "C.qcow2"])
    (tmp_path / "o" / "B.qcow2").unlink()
    compare(images / "C.qcow2", tmp_path / "o" / "C.qcow2")
    run(peer("qemu-io"), "-c", "read -P 3 7M 512", "-c", "read -P 2 1052672 1020k",
        tmp_path / "o" / "C.qcow2")
