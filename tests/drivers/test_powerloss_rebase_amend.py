"""Power loss during rebase and amend: a cut at any sync boundary leaves an image that `qemu-img check` finds
free of corruption (leaks allowed) and that reads exactly as before (rebase and amend never change what the
guest sees), with the old or the new header.

The harness is test_powerloss.py's: every fdatasync offers the durable state plus each chosen subset of the
writes since the previous one.
"""

from __future__ import annotations

from pathlib import Path

from imagecore.ops.amend import amend
from imagecore.ops.rebase import rebase
from tests.drivers.test_powerloss import Harness
from tests.peers import peer, run

KiB = 1 << 10


def qimg(*args: str | Path) -> None:
    run(peer("qemu-img"), *args)


def qio(img: Path, *cmds: str) -> None:
    args: list[str] = []
    for c in cmds:
        args += ["-c", c]
    run(peer("qemu-io"), "-f", "qcow2", *args, img)


def guest(img: Path, work: Path) -> bytes:
    raw = work / "view.raw"
    qimg("convert", "-U", "-O", "raw", img, raw)
    return raw.read_bytes()


def chain(work: Path) -> Path:
    """base <- mid <- top, 4 KiB clusters (more clusters, more boundaries), data in every layer."""
    base, mid, top = work / "base.qcow2", work / "mid.qcow2", work / "top.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base, "512k")
    qio(base, "write -P 1 0 256k")
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.qcow2", "-F", "qcow2", mid)
    qio(mid, "write -P 2 64k 128k", "write -z 300k 8k", "write -c -P 3 400k 8k")
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "mid.qcow2", "-F", "qcow2", top)
    qio(top, "write -P 4 100k 10k")
    return top


async def test_safe_rebase(work: Path) -> None:
    top = chain(work)
    h = Harness(work, "qcow2", top, exhaustive=32, samples=12)
    h.start(guest(top, work))
    h.plan.label = "rebase onto base"
    await rebase(str(top), "qcow2", "base.qcow2", "qcow2", opener=h.opener)
    h.plan.cut(str(top), "after rebase")
    assert b"base.qcow2" in top.read_bytes()[:4096]
    h.report("safe rebase")


async def test_flattening_rebase(work: Path) -> None:
    top = chain(work)
    h = Harness(work, "qcow2", top, exhaustive=32, samples=12)
    h.start(guest(top, work))
    h.plan.label = "rebase -b ''"
    await rebase(str(top), "qcow2", "", opener=h.opener)
    h.plan.cut(str(top), "after rebase")
    h.report("flattening rebase")


async def test_unsafe_rebase_onto_a_copy(work: Path) -> None:
    """-u onto an identical copy of the backing file: the view is the same with either header, and the
    header cluster is one write, kept or dropped whole (qemu writes it the same way; a storage device that
    tore that write in pieces would leave a mixed header, with qemu too)."""
    top = chain(work)
    (work / "mid-copy.qcow2").write_bytes((work / "mid.qcow2").read_bytes())
    h = Harness(work, "qcow2", top)
    h.start(guest(top, work))
    h.plan.label = "rebase -u"
    await rebase(str(top), "qcow2", "mid-copy.qcow2", "qcow2", unsafe=True, opener=h.opener)
    h.plan.cut(str(top), "after rebase -u")
    h.report("unsafe rebase")


async def amend_under_cuts(work: Path, img: Path, options: str, name: str) -> None:
    h = Harness(work, "qcow2", img, exhaustive=32, samples=12)
    h.start(guest(img, work))
    h.plan.label = f"amend {options}"
    await amend(str(img), "qcow2", options, opener=h.opener)
    h.plan.cut(str(img), "after amend")
    h.report(name)


async def test_refcount_width_with_snapshots(work: Path) -> None:
    img = work / "r.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "512k")
    qio(img, "write -P 5 0 200k")
    qimg("snapshot", "-c", "s1", img)
    qio(img, "write -P 6 64k 32k")
    await amend_under_cuts(work, img, "refcount_bits=64", "refcount_bits 16 -> 64")
    await amend_under_cuts(work, img, "refcount_bits=2", "refcount_bits 64 -> 2")


async def test_downgrade_expanding_zero_clusters(work: Path) -> None:
    top = chain(work)
    qio(top, "write -z 200k 16k", "write -z 260k 4k")
    qimg("snapshot", "-c", "s1", top)
    qio(top, "write -z -u 8k 8k", "write -P 7 12k 4k")
    await amend_under_cuts(work, top, "compat=0.10", "downgrade with zero clusters over a backing file")


async def test_upgrade_and_lazy_refcounts(work: Path) -> None:
    img = work / "v2.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,compat=0.10", img, "256k")
    qio(img, "write -P 8 0 64k")
    qimg("snapshot", "-c", "s1", img)
    await amend_under_cuts(work, img, "compat=1.1,lazy_refcounts=on,refcount_bits=8", "upgrade")
