"""`imagecore amend` against `qemu-img amend` (7.2) on copies of the same images: exit code, stdout (the -p
meter, -o help), stderr, then the result: `qemu-img info --output=json` alike, `qemu-img check` clean, the
guest view of the image and of every internal snapshot unchanged and equal to qemu's result."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.peers import imagecore_cmd, peer, run

Proc = subprocess.CompletedProcess[bytes]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("amend")
    qi, qio = peer("qemu-img"), peer("qemu-io")

    def sh(*args: str) -> None:
        # in d, with relative names: qemu names an external data file relative to the working directory
        subprocess.run(list(args), cwd=d, check=True, capture_output=True, timeout=60)

    def create(name: str, size: str, *opts: str) -> None:
        sh(qi, "create", "-q", "-f", "qcow2", *opts, name, size)

    def io(name: str, *cmds: str) -> None:
        args: list[str] = []
        for c in cmds:
            args += ["-c", c]
        sh(qio, "-f", "qcow2", *args, name)

    # v3 with data, zero clusters without a host cluster (-u) and with one (a zeroed data cluster)
    create("v3.qcow2", "4M")
    io("v3.qcow2", "write -P 1 0 1M", "write -z -u 1M 128k", "write -P 2 2M 128k", "write -z 2M 64k",
       "write -c -P 3 3M 64k")
    # the same over a backing file: zero clusters must become data clusters of zeroes in v2
    create("base.qcow2", "4M")
    io("base.qcow2", "write -P 9 0 4M")
    create("top.qcow2", "4M", "-b", "base.qcow2", "-F", "qcow2")
    io("top.qcow2", "write -P 1 0 64k", "write -z -u 1M 128k", "write -P 2 2M 128k", "write -z 2M 64k")
    # internal snapshots: zero clusters in the snapshot's tables too, and shared ones
    create("snap.qcow2", "4M", "-b", "base.qcow2", "-F", "qcow2")
    io("snap.qcow2", "write -P 1 0 256k", "write -z -u 1M 64k")
    sh(qi, "snapshot", "-c", "s1", "snap.qcow2")
    io("snap.qcow2", "write -P 2 64k 64k", "write -z -u 3M 64k")
    sh(qi, "snapshot", "-c", "s2", "snap.qcow2")
    io("snap.qcow2", "write -P 3 2M 64k")
    create("snapnb.qcow2", "4M")
    io("snapnb.qcow2", "write -P 1 0 256k", "write -z -u 1M 64k")
    sh(qi, "snapshot", "-c", "s1", "snapnb.qcow2")
    io("snapnb.qcow2", "write -P 4 128k 64k")
    # v2 images, with a snapshot
    create("v2.qcow2", "4M", "-o", "compat=0.10")
    io("v2.qcow2", "write -P 5 0 512k")
    sh(qi, "snapshot", "-c", "s1", "v2.qcow2")
    io("v2.qcow2", "write -P 6 0 64k")
    # refcount widths, with snapshots raising refcounts to 2
    create("r16.qcow2", "4M")
    io("r16.qcow2", "write -P 7 0 1M")
    sh(qi, "snapshot", "-c", "s1", "r16.qcow2")
    io("r16.qcow2", "write -P 8 512k 64k")
    create("r64.qcow2", "4M", "-o", "refcount_bits=64")
    io("r64.qcow2", "write -P 7 0 1M")
    sh(qi, "snapshot", "-c", "s1", "r64.qcow2")
    create("r8.qcow2", "1M", "-o", "refcount_bits=8")
    create("small.qcow2", "2M", "-o", "cluster_size=512")
    io("small.qcow2", "write -P 10 0 1M")
    sh(qi, "snapshot", "-c", "s1", "small.qcow2")
    create("lazy.qcow2", "4M", "-o", "lazy_refcounts=on")
    io("lazy.qcow2", "write -P 11 0 64k")
    create("df.qcow2", "4M", "-o", "data_file=df.data")
    io("df.qcow2", "write -P 12 0 64k")
    create("dr.qcow2", "4M", "-o", "data_file=dr.data,data_file_raw=on")
    create("zs.qcow2", "4M", "-o", "compression_type=zstd")
    io("zs.qcow2", "write -c -P 13 0 64k")
    create("zs0.qcow2", "4M", "-o", "compression_type=zstd")
    io("zs0.qcow2", "write -P 13 0 64k")
    create("el.qcow2", "4M", "-o", "extended_l2=on")
    create("bm.qcow2", "4M")
    io("bm.qcow2", "write -P 14 0 64k")
    sh(qi, "bitmap", "--add", "bm.qcow2", "b0")
    sh(qi, "bitmap", "--add", "--disable", "bm.qcow2", "b1")
    create("resized.qcow2", "4M")
    sh(qi, "snapshot", "-c", "s1", "resized.qcow2")
    sh(qi, "resize", "-q", "resized.qcow2", "8M")
    sh(qi, "create", "-q", "-f", "raw", "a.raw", "1M")
    sh(qi, "create", "-q", "-f", "vmdk", "a.vmdk", "1M")
    return d


def clone(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-a", src, dst], check=True, timeout=60)


def both(images: Path, work: Path, args: list[str]) -> tuple[Proc, Proc]:
    for side in ("q", "o"):
        clone(images, work / side)
    q = subprocess.run([peer("qemu-img"), "amend", *args], capture_output=True, cwd=work / "q", timeout=120)
    o = subprocess.run([*imagecore_cmd(), "amend", *args], capture_output=True, cwd=work / "o", timeout=120)
    assert b"Traceback" not in o.stderr
    assert (o.returncode, o.stdout) == (q.returncode, q.stdout), (o.stderr, q.stderr)
    assert o.stderr.replace(b"imagecore", b"PROG") == q.stderr.replace(b"qemu-img", b"PROG")
    return q, o


def qemu_img(side: Path, *args: str) -> Proc:
    return subprocess.run([peer("qemu-img"), *args], capture_output=True, cwd=side, timeout=60)


def info(side: Path, name: str) -> dict[str, Any]:
    proc = qemu_img(side, "info", "--output=json", "-U", name)
    assert proc.returncode == 0, proc.stderr
    out = dict(json.loads(proc.stdout))
    out.pop("actual-size", None)
    return out


def snapshots(side: Path, name: str) -> list[str]:
    return [s["name"] for s in info(side, name).get("snapshots", [])]


def same_view(a: Path, b: Path, name: str) -> None:
    """The image and each of its snapshots read alike in folders ``a`` and ``b`` (each read in its own
    folder: qemu names a data file relative to the working directory)."""
    raws = []
    for side in (a, b):
        out = side / f"{name}.raw"
        proc = qemu_img(side, "convert", "-U", "-O", "raw", name, out.name)
        assert proc.returncode == 0, proc.stderr
        raws.append(out)
    run(peer("qemu-img"), "compare", "-f", "raw", "-F", "raw", *raws)
    for snap in snapshots(a, name):
        raws = []
        for side in (a, b):
            out = side / f"{name}.{snap}.raw"
            proc = qemu_img(side, "convert", "-U", "-l", snap, "-O", "raw", name, out.name)
            assert proc.returncode == 0, proc.stderr
            raws.append(out)
        run(peer("qemu-img"), "compare", "-f", "raw", "-F", "raw", *raws)


def verify(images: Path, work: Path, name: str) -> None:
    ours, theirs = work / "o", work / "q"
    assert info(ours, name) == info(theirs, name)
    check = qemu_img(ours, "check", name)
    assert check.returncode == 0, check.stdout + check.stderr
    same_view(theirs, ours, name)
    same_view(images, ours, name)


CHANGES = [
    (["-o", "compat=0.10", "v3.qcow2"], "v3.qcow2"),
    (["-p", "-o", "compat=0.10", "v3.qcow2"], "v3.qcow2"),
    (["-o", "compat=v2", "top.qcow2"], "top.qcow2"),
    (["-p", "-o", "compat=0.10", "snap.qcow2"], "snap.qcow2"),
    (["-o", "compat=0.10", "snapnb.qcow2"], "snapnb.qcow2"),
    (["-o", "compat=0.10", "lazy.qcow2"], "lazy.qcow2"),
    (["-o", "compat=0.10", "zs0.qcow2"], "zs0.qcow2"),
    (["-p", "-o", "compat=1.1", "v2.qcow2"], "v2.qcow2"),
    (["-o", "compat=v3,lazy_refcounts=on", "v2.qcow2"], "v2.qcow2"),
    (["-o", "compat=1.1,refcount_bits=8", "v2.qcow2"], "v2.qcow2"),
    (["-o", "refcount_bits=64", "r16.qcow2"], "r16.qcow2"),
    (["-p", "-o", "refcount_bits=2", "r16.qcow2"], "r16.qcow2"),
    (["-o", "refcount_bits=8", "r64.qcow2"], "r64.qcow2"),
    (["-o", "refcount_bits=0x10,compat=0.10", "r64.qcow2"], "r64.qcow2"),
    (["-o", "refcount_bits=1", "r8.qcow2"], "r8.qcow2"),
    (["-p", "-o", "refcount_bits=64", "small.qcow2"], "small.qcow2"),
    (["-o", "refcount_bits=4", "small.qcow2"], "small.qcow2"),
    (["-o", "lazy_refcounts=on", "v3.qcow2"], "v3.qcow2"),
    (["-o", "lazy_refcounts", "v3.qcow2"], "v3.qcow2"),
    (["-o", "lazy_refcounts=off", "lazy.qcow2"], "lazy.qcow2"),
    (["-q", "-p", "-o", "lazy_refcounts=off", "lazy.qcow2"], "lazy.qcow2"),
    (["-o", "data_file=df2.data", "df.qcow2"], "df.qcow2"),
    (["-o", "data_file_raw=off", "dr.qcow2"], "dr.qcow2"),
    (["-o", "data_file_raw=on", "dr.qcow2"], "dr.qcow2"),
    (["-o", "data_file_raw=off", "v3.qcow2"], "v3.qcow2"),
    (["-o", "backing_file=base.qcow2,backing_fmt=qcow2", "top.qcow2"], "top.qcow2"),
    (["-o", "size=8M", "v3.qcow2"], "v3.qcow2"),
    (["-o", "size=2M", "v3.qcow2"], "v3.qcow2"),
    (["-o", "size=0", "v3.qcow2"], "v3.qcow2"),
    (["-o", "size=6M,lazy_refcounts=on", "snap.qcow2"], "snap.qcow2"),
    (["-f", "qcow2", "-t", "none", "--force", "-o", "lazy_refcounts=on", "v3.qcow2"], "v3.qcow2"),
    # persistent bitmaps stay (and consistent): amend writes no guest data
    (["-o", "lazy_refcounts=on,refcount_bits=64", "bm.qcow2"], "bm.qcow2"),
    (["-t", "unsafe", "-o", "compat=0.10", "-o", "lazy_refcounts=off", "v3.qcow2"], "v3.qcow2"),
]


@pytest.mark.parametrize(("args", "name"), CHANGES, ids=[" ".join(a) for a, _ in CHANGES])
def test_amend(images: Path, tmp_path: Path, args: list[str], name: str) -> None:
    q, _ = both(images, tmp_path, args)
    assert q.returncode == 0
    if name == "df.qcow2":
        for side in ("q", "o"):
            (tmp_path / side / "df.data").rename(tmp_path / side / "df2.data")
    if "size=" in " ".join(args) and "size=0" not in args[-2]:
        ours, theirs = tmp_path / "o", tmp_path / "q"
        assert info(ours, name) == info(theirs, name)
        assert qemu_img(ours, "check", name).returncode == 0
        same_view(theirs, ours, name)
        return
    verify(images, tmp_path, name)


def test_downgrade_keeps_a_shared_cluster_under_a_zero_cluster(tmp_path: Path) -> None:
    """A zero cluster of the active image whose host cluster a snapshot still reads: qemu 7.2 writes zeroes
    into it, into the snapshot's data too, and leaves an error for check; imagecore gives the active image a
    cluster of its own, so that the snapshot keeps its data and the image stays consistent."""
    qi, qio = peer("qemu-img"), peer("qemu-io")
    img = tmp_path / "s.qcow2"
    run(qi, "create", "-q", "-f", "qcow2", img, "1M")
    run(qio, "-c", "write -P 1 0 256k", img)
    run(qi, "snapshot", "-c", "s1", img)
    run(qio, "-c", "write -z 0 64k", img)  # keeps the host cluster: a zero cluster over the shared data
    run(*imagecore_cmd(), "amend", "-o", "compat=0.10", img)
    run(qi, "check", img)
    run(qio, "-c", "read -P 0 0 64k", "-c", "read -P 1 64k 192k", img)
    run(qi, "snapshot", "-a", "s1", img)
    run(qio, "-c", "read -P 1 0 256k", img)


FAILS = [
    [], ["v3.qcow2"], ["-o", "compat=1.1"], ["-o", "compat=1.1", "v3.qcow2", "v2.qcow2"],
    ["-o", "compat=1.1", "nope.qcow2"], ["-p", "-o", "compat=1.1", "nope.qcow2"], ["-o", "", "v3.qcow2"],
    ["-o", ",compat=1.1", "v3.qcow2"], ["-o", "compat=1.1,", "v3.qcow2"],
    ["-t", "foo", "-o", "compat=1.1", "v3.qcow2"],
    ["-o", "foo=bar", "v3.qcow2"], ["-p", "-o", "foo=bar", "v3.qcow2"], ["-o", "cluster_size=4k", "v3.qcow2"],
    ["-o", "cluster_size=abc", "v3.qcow2"], ["-o", "cluster_size=4k,foo=1", "v3.qcow2"],
    ["-o", "preallocation=full", "v3.qcow2"], ["-o", "extended_l2=on", "v3.qcow2"],
    ["-o", "compression_type=zstd", "v3.qcow2"], ["-o", "encryption=on", "v3.qcow2"],
    ["-o", "encrypt.format=luks", "v3.qcow2"], ["-o", "encrypt.new-secret=x", "v3.qcow2"],
    ["-o", "compat=0.9,encrypt.keyslot=1", "v3.qcow2"], ["-o", "compat=0.9", "v3.qcow2"],
    ["-p", "-o", "compat=0.9", "v3.qcow2"], ["-o", "compat", "v3.qcow2"],
    ["-o", "refcount_bits=3", "v3.qcow2"],
    ["-o", "refcount_bits=128", "v3.qcow2"], ["-o", "refcount_bits=abc", "v3.qcow2"],
    ["-o", "refcount_bits=-1", "v3.qcow2"], ["-o", "refcount_bits=3,compat=0.9", "v3.qcow2"],
    ["-o", "lazy_refcounts=maybe", "v3.qcow2"], ["-o", "size=abc", "v3.qcow2"],
    ["-o", "size=3000000", "v3.qcow2"],
    ["-o", "size=abc,foo=1", "v3.qcow2"], ["-o", "foo=1,size=abc", "v3.qcow2"],
    ["-o", "help=1", "v3.qcow2"], ["-o", "data_file=x", "v3.qcow2"], ["-o", "data_file_raw=on", "v3.qcow2"],
    ["-o", "data_file_raw=on", "df.qcow2"], ["-o", "data_file=x,refcount_bits=3", "v3.qcow2"],
    ["-o", "backing_file=other.qcow2", "top.qcow2"], ["-o", "backing_fmt=raw", "top.qcow2"],
    ["-o", "backing_file=base.qcow2", "top.qcow2"], ["-o", "backing_file=", "v3.qcow2"],
    ["-o", "lazy_refcounts=on", "v2.qcow2"], ["-o", "compat=0.10,lazy_refcounts=on", "v3.qcow2"],
    ["-o", "refcount_bits=8", "v2.qcow2"], ["-o", "refcount_bits=1", "r16.qcow2"],
    ["-o", "compat=0.10", "r8.qcow2"], ["-o", "compat=0.10", "el.qcow2"], ["-o", "compat=0.10", "df.qcow2"],
    ["-o", "compat=0.10", "zs.qcow2"], ["-o", "compat=0.10", "resized.qcow2"], ["-o", "compat=1.1", "a.raw"],
    ["-f", "raw", "-o", "compat=1.1", "a.raw"], ["-o", "compat=1.1", "a.vmdk"],
    ["-f", "qcow2", "-o", "compat=1.1", "a.raw"], ["-f", "foo", "-o", "compat=1.1", "v3.qcow2"],
    ["-f", "raw", "-o", "help"], ["-f", "foo", "-o", "help"], ["-o", "help", "a.raw"], ["-x", "v3.qcow2"],
    ["-o"], ["-o", "size=2M", "v2.qcow2"],
]


@pytest.mark.parametrize("args", FAILS, ids=[" ".join(a) or "none" for a in FAILS])
def test_refusals(images: Path, tmp_path: Path, args: list[str]) -> None:
    q, _ = both(images, tmp_path, args)
    assert q.returncode == 1
    name = args[-1] if args and (images / args[-1]).is_file() and args[-1].endswith(".qcow2") else "v3.qcow2"
    # what a refusal leaves (nothing, or the steps qemu takes before it) is what qemu-img leaves
    assert info(tmp_path / "o", name) == info(tmp_path / "q", name)


def test_a_refused_downgrade_after_zero_expansion(images: Path, tmp_path: Path) -> None:
    """A zstd image with compressed clusters is refused only after its zero clusters became v2 clusters, as
    qemu orders it: the image is still v3 and consistent, and reads as before."""
    both(images, tmp_path, ["-o", "compat=0.10", "zs.qcow2"])
    verify(images, tmp_path, "zs.qcow2")


@pytest.mark.parametrize("args", [["-o", "help", "v3.qcow2"], ["-f", "qcow2", "-o", "help"],
                                  ["-p", "-f", "qcow2", "-o", "help"],
                                  ["-f", "qcow2", "-o", "help,compat=1.1", "x"], ["-o", "?", "v3.qcow2"]])
def test_help(images: Path, tmp_path: Path, args: list[str]) -> None:
    q, _ = both(images, tmp_path, args)
    assert q.returncode == 0 and b"Amend options for 'qcow2':" in q.stdout


def test_downgrade_with_bitmaps_as_qemu(tmp_path: Path) -> None:
    """qemu 7.2 keeps the bitmaps extension in the v2 header (v2 readers then see them as inconsistent, and
    check reports their clusters as leaked); imagecore's result is the same image."""
    qi = peer("qemu-img")
    for side in ("q", "o"):
        (tmp_path / side).mkdir()
        run(qi, "create", "-q", "-f", "qcow2", tmp_path / side / "b.qcow2", "1M")
        run(qi, "bitmap", "--add", tmp_path / side / "b.qcow2", "b0")
    q = qemu_img(tmp_path / "q", "amend", "-o", "compat=0.10", "b.qcow2")
    o = subprocess.run([*imagecore_cmd(), "amend", "-o", "compat=0.10", "b.qcow2"], capture_output=True,
                       cwd=tmp_path / "o")
    assert (o.returncode, o.stdout, o.stderr) == (q.returncode, q.stdout, q.stderr)
    assert info(tmp_path / "o", "b.qcow2") == info(tmp_path / "q", "b.qcow2")
    checks = [qemu_img(tmp_path / side, "check", "b.qcow2") for side in ("q", "o")]
    assert checks[0].returncode == checks[1].returncode == 3
    assert checks[0].stdout.count(b"leaked") == checks[1].stdout.count(b"leaked")


@contextmanager
def held(path: Path, *flags: str) -> Iterator[None]:
    proc = subprocess.Popen([peer("qemu-io"), *flags, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"help\n")
        proc.stdin.flush()
        proc.stdout.readline()
        time.sleep(0.1)
        yield
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(("holder", "flags"), [("v3.qcow2", ("-r",)), ("top.qcow2", ()), ("base.qcow2", ())])
def test_locks(images: Path, tmp_path: Path, holder: str, flags: tuple[str, ...]) -> None:
    """The image is written (any holder refuses it); its backing file is opened as qemu-img opens it."""
    name = "v3.qcow2" if holder == "v3.qcow2" else "top.qcow2"
    results = []
    for side, cmd in (("q", [peer("qemu-img")]), ("o", imagecore_cmd())):
        clone(images, tmp_path / side)
        with held(tmp_path / side / holder, *flags):
            results.append(subprocess.run([*cmd, "amend", "-o", "lazy_refcounts=on", name],
                                          capture_output=True, cwd=tmp_path / side, timeout=60))
    q, o = results
    assert (o.returncode, o.stdout) == (q.returncode, q.stdout)
    assert o.stderr.replace(b"imagecore", b"PROG") == q.stderr.replace(b"qemu-img", b"PROG")
    assert info(tmp_path / "o", name) == info(tmp_path / "q", name)


@pytest.mark.parametrize(("verb", "args"), [("amend", ["-o", "lazy_refcounts=on"]),
                                             ("rebase", ["-u", "-b", "x.qcow2", "-F", "qcow2"]),
                                             ("rebase", ["-b", ""])])
def test_corrupt_image_is_refused(tmp_path: Path, verb: str, args: list[str]) -> None:
    """An image marked corrupt does not open read-write, for these verbs as for qemu-img's."""
    results = []
    for side, cmd in (("q", [peer("qemu-img")]), ("o", imagecore_cmd())):
        (tmp_path / side).mkdir()
        img = tmp_path / side / "c.qcow2"
        run(peer("qemu-img"), "create", "-q", "-f", "qcow2", img, "1M")
        with img.open("r+b") as f:
            f.seek(72)
            f.write((2).to_bytes(8, "big"))  # the corrupt bit
        results.append(subprocess.run([*cmd, verb, *args, "c.qcow2"], capture_output=True,
                                      cwd=tmp_path / side))
    q, o = results
    assert q.returncode == o.returncode == 1
    assert o.stderr.replace(b"imagecore", b"PROG") == q.stderr.replace(b"qemu-img", b"PROG")


@pytest.mark.parametrize("args", [["amend", "-o", "lazy_refcounts=off"], ["amend", "-o", "refcount_bits=8"],
                                  ["rebase", "-u", "-b", "", "-F", "qcow2"]])
def test_dirty_image_is_repaired_first(tmp_path: Path, args: list[str]) -> None:
    """A lazy-refcounts image that was not closed cleanly (dirty, refcounts stale) is repaired by the open,
    as qemu's read-write open repairs it, before anything is changed."""
    for side, cmd in (("q", [peer("qemu-img")]), ("o", imagecore_cmd())):
        (tmp_path / side).mkdir()
        img = tmp_path / side / "d.qcow2"
        run(peer("qemu-img"), "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "1M")
        run(peer("qemu-io"), "-c", "write -P 3 0 64k", img)
        with img.open("r+b") as f:
            f.seek(72)
            f.write((1).to_bytes(8, "big"))  # the dirty bit, as a crash with lazy refcounts leaves it
        p = subprocess.run([*cmd, *args, "d.qcow2"], capture_output=True, cwd=tmp_path / side)
        assert p.returncode == 0, p.stderr
        run(peer("qemu-img"), "check", img)
    assert info(tmp_path / "o", "d.qcow2") == info(tmp_path / "q", "d.qcow2")
    same_view(tmp_path / "q", tmp_path / "o", "d.qcow2")
