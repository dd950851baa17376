"""Power loss over the qcow2 and vmdk drivers: every state a cut at a sync boundary may leave is consistent.

Each workload runs through :class:`tests.doubles.powerloss.PowerLossOpener`. At every fdatasync (and at the
end) the durable contents plus each chosen subset of the unsynced writes are written to a file that real
``qemu-img check`` must find free of corruption (leaks are allowed, exit 0 or 3), and that ``qemu-img
convert`` must read back with every guest write flushed before the cut in place. Each test prints its
figure: sync boundaries, distinct images materialised, corruptions and lost flushed writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imagecore.driver import BlockDriver
from imagecore.formats.qcow2.snapshot import snapshot_create, snapshot_delete
from tests.doubles.powerloss import CutPoint, PowerLossHostFile, PowerLossOpener, PowerLossPlan, keep_sets
from tests.peers import peer, run

COPIED = 1 << 63
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
KiB = 1 << 10
MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class Expect:
    """What a cut must keep: the guest contents at the last completed flush, except ranges changed since."""

    flushed: bytes
    dirty: tuple[tuple[int, int], ...]
    digest: bytes  # of ``flushed``, computed once per flush: the guest may be hundreds of MiB


@dataclass(slots=True)
class Stats:
    boundaries: int = 0
    images: int = 0
    repaired: int = 0
    corruptions: int = 0
    lost: int = 0
    failures: list[str] = field(default_factory=list)
    seen: set[bytes] = field(default_factory=set)


class Harness:
    """Runs the checker at each cut and keeps the guest's model of what it wrote and flushed."""

    def __init__(self, work: Path, fmt: str, image: Path, *, tear: int | None = None,
                 exhaustive: int = 64, samples: int = 24, snapshot_window: bool = False) -> None:
        self.work = work
        self.snapshot_window = snapshot_window
        self.fmt = fmt
        self.image = image
        self.exhaustive = exhaustive
        self.samples = samples
        self.stats = Stats()
        self.plan = PowerLossPlan(self.check_cut, tear=tear)
        self.opener = PowerLossOpener(self.plan)
        self.model = bytearray()
        self.dirty: list[tuple[int, int]] = []
        # the materialised image sits next to the original, so a relative backing name resolves the same
        self.cut_path = image.with_name("cut-" + image.name)
        self.raw_path = work / "cut.raw"

    # -- the guest's side ---------------------------------------------------------------------------
    def start(self, contents: bytes) -> None:
        self.model = bytearray(contents)
        self.dirty = []
        self._publish(bytes(self.model))

    def _publish(self, flushed: bytes | None = None) -> None:
        prev = self.plan.expect
        if flushed is None and isinstance(prev, Expect):
            self.plan.expect = Expect(prev.flushed, tuple(self.dirty), prev.digest)
            return
        base = flushed or b""
        self.plan.expect = Expect(base, tuple(self.dirty), hashlib.blake2b(base, digest_size=16).digest())

    async def modify(self, d: BlockDriver, off: int, n: int, op: Callable[[], Awaitable[None]]) -> None:
        """Run one guest request over ``[off, off+n)``: unknown until the next flush returns."""
        self.dirty.append((off, n))
        self._publish()
        await op()
        buf = bytearray(n)
        await d.readinto(off, memoryview(buf))
        self.model[off:off + n] = buf

    async def write(self, d: BlockDriver, off: int, data: bytes, *, fua: bool = False) -> None:
        await self.modify(d, off, len(data), lambda: d.write(off, memoryview(data), fua=fua))
        assert self.model[off:off + len(data)] == data
        if fua:
            self._flushed()

    async def zero(self, d: BlockDriver, off: int, n: int, *, may_trim: bool) -> None:
        await self.modify(d, off, n, lambda: d.write_zeroes(off, n, may_trim=may_trim, fast=False))
        assert self.model[off:off + n] == bytes(n)

    async def trim(self, d: BlockDriver, off: int, n: int) -> None:
        await self.modify(d, off, n, lambda: d.trim(off, n))

    async def flush(self, d: BlockDriver) -> None:
        await d.flush()
        self._flushed()

    def _flushed(self) -> None:
        self.dirty = []
        self._publish(bytes(self.model))

    async def close(self, d: BlockDriver) -> None:
        self.plan.label = "close"
        await d.close()
        self._flushed()
        self.plan.cut(str(self.image), "end")

    # -- the cut's side ------------------------------------------------------------------------------
    def check_cut(self, point: CutPoint) -> None:
        st = self.stats
        st.boundaries += 1
        exp = point.expect
        assert isinstance(exp, Expect)
        tag = exp.digest + repr(exp.dirty).encode()
        for keep in keep_sets(len(point.pending), exhaustive=self.exhaustive, samples=self.samples,
                              seed=st.boundaries):
            img = point.materialise(keep)
            key = hashlib.blake2b(img, digest_size=16).digest() + tag
            if key in st.seen:
                continue
            st.seen.add(key)
            st.images += 1
            problem = self._verify(img, exp)
            if problem:
                kept = "".join("1" if k else "0" for k in keep)
                where = f"{point.label} boundary {st.boundaries} keep={kept}"
                if len(st.failures) < 5:
                    saved = self.work / f"failed-{len(st.failures)}-{self.image.name}"
                    saved.write_bytes(img)
                    where += f" (saved as {saved})"
                st.failures.append(f"{where}: {problem}")

    def _verify(self, img: bytes, exp: Expect) -> str | None:
        self.cut_path.write_bytes(img)
        proc = run(peer("qemu-img"), "check", "-f", self.fmt, "--output=json", self.cut_path, check=False)
        out = proc.stdout.decode(errors="replace")
        rep: dict[str, int] = {}
        if proc.stdout.strip().startswith(b"{"):
            rep = json.loads(out)
        if proc.returncode == 2 and self.snapshot_window and not rep.get("check-errors", 0) \
                and self._benign_snapshot_window():
            self.stats.repaired += 1
        elif proc.returncode not in (0, 3) or rep.get("corruptions", 0) or rep.get("check-errors", 0):
            self.stats.corruptions += 1
            return f"qemu-img check exited {proc.returncode}: {out[:300]} {proc.stderr.decode()[:300]}"
        conv = run(peer("qemu-img"), "convert", "-f", self.fmt, "-O", "raw", self.cut_path, self.raw_path,
                   check=False)
        if conv.returncode != 0:
            self.stats.corruptions += 1
            return f"qemu-img convert exited {conv.returncode}: {conv.stderr.decode()[:300]}"
        got = memoryview(self.raw_path.read_bytes())
        want = memoryview(exp.flushed)
        if len(got) != len(want):
            self.stats.lost += 1
            return f"the guest reads {len(got)} bytes, not {len(want)}"
        # compare everything outside the ranges changed since the last flush, without copying
        pos = 0
        for off, n in [*sorted(exp.dirty), (len(want), 0)]:
            if off > pos and got[pos:off] != want[pos:off]:
                first = next(i for i in range(pos, off) if got[i] != want[i])
                self.stats.lost += 1
                return f"a flushed write is lost (first difference at guest offset {first})"
            pos = max(pos, off + n)
        return None

    def _benign_snapshot_window(self) -> bool:
        """A cut inside snapshot create or delete, where refcounts and COPIED flags cannot change at once.

        qemu-img check counts a COPIED flag that disagrees with the refcount as a corruption. It is harmless
        when the flag is set on a cluster whose only reference is the active table (the extra refcount is a
        leak: nothing else can see the cluster) or clear on a cluster of refcount 1 (one needless copy on
        write). Anything else, such as a refcount below the references, is not; and ``check -r all`` must
        leave a clean image.
        """
        proc = run(peer("qemu-img"), "check", "-f", self.fmt, self.cut_path, check=False)
        text = (proc.stdout + proc.stderr).decode()  # qemu-img prints the ERROR and Leaked lines to stderr
        leaked: dict[int, int] = {}
        for leak in re.finditer(r"Leaked cluster (\d+) refcount=\d+ reference=(\d+)", text):
            leaked[int(leak[1])] = int(leak[2])
        for line in text.splitlines():
            if not line.startswith("ERROR"):
                continue
            m = re.match(r"ERROR OFLAG_COPIED (?:L2|data) cluster: .*_entry=([0-9a-f]+) refcount=(\d+)", line)
            if m is None:
                return False
            entry, refcount = int(m[1], 16), int(m[2])
            if entry & COPIED:
                if leaked.get((entry & OFFSET_MASK) // self.cluster_bytes) != 1:
                    return False
            elif refcount != 1:
                return False
        fixed = self.work / "repaired.qcow2"
        fixed.write_bytes(self.cut_path.read_bytes())
        rep = run(peer("qemu-img"), "check", "-r", "all", "-f", self.fmt, fixed, check=False)
        again = run(peer("qemu-img"), "check", "-f", self.fmt, fixed, check=False)
        return rep.returncode == 0 and again.returncode == 0

    @property
    def cluster_bytes(self) -> int:
        info = json.loads(run(peer("qemu-img"), "info", "-U", "--output=json", self.image).stdout)
        return int(info["cluster-size"])

    def report(self, name: str) -> None:
        st = self.stats
        extra = f", {st.repaired} inside a snapshot update (flags/leaks only, repaired clean)" \
            if self.snapshot_window else ""
        print(f"\npower loss {name}: {st.boundaries} sync boundaries, {st.images} cut images materialised"
              f"{extra}, {st.corruptions} corruptions, {st.lost} lost flushed writes")
        assert st.boundaries > 0 and st.images > 0
        assert not st.failures, "\n".join(st.failures)


def qimg(*args: str | Path) -> None:
    run(peer("qemu-img"), *args)


def pattern(seed: int, n: int) -> bytes:
    return bytes((seed * 7 + i * 13) & 0xFF for i in range(n)) if seed else bytes(n)


def qcow2(work: Path, size: int, *opts: str, backing: Path | None = None) -> Path:
    img = work / "img.qcow2"
    args: list[str | Path] = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    if backing is not None:
        args += ["-b", str(backing), "-F", "raw"]
    qimg(*args, img, str(size))
    return img


async def open_drv(h: Harness) -> BlockDriver:
    return await h.opener.open(str(h.image), h.fmt, read_only=False)


# -- qcow2 ---------------------------------------------------------------------------------------------

async def test_qcow2_first_allocation(work: Path) -> None:
    img = qcow2(work, 1 * MiB, "cluster_size=4096")
    h = Harness(work, "qcow2", img)
    h.start(bytes(1 * MiB))
    d = await open_drv(h)
    h.plan.label = "first allocation"
    await h.write(d, 0, pattern(1, 3 * 4096))
    await h.flush(d)
    await h.write(d, 10000, pattern(2, 5000))
    await h.write(d, 512 * KiB + 100, pattern(3, 300), fua=True)
    await h.write(d, 1 * MiB - 4096, pattern(4, 4096))
    await h.flush(d)
    await h.close(d)
    h.report("qcow2 first allocation")


async def test_qcow2_first_allocation_torn(work: Path) -> None:
    """Writes torn into 512-byte sectors: a cut may keep part of a table or cluster write."""
    img = qcow2(work, 1 * MiB, "cluster_size=4096")
    h = Harness(work, "qcow2", img, tear=512, exhaustive=64, samples=48)
    h.start(bytes(1 * MiB))
    d = await open_drv(h)
    h.plan.label = "torn allocation"
    await h.write(d, 4096, pattern(5, 2 * 4096))
    await h.flush(d)
    await h.write(d, 300 * KiB + 7, pattern(6, 1000))
    await h.flush(d)
    await h.close(d)
    h.report("qcow2 torn first allocation")


async def test_qcow2_cow_over_backing(work: Path) -> None:
    base = work / "base.raw"
    base_data = pattern(9, 512 * KiB)
    base.write_bytes(base_data)
    img = qcow2(work, 512 * KiB, "cluster_size=4096", backing=base)
    h = Harness(work, "qcow2", img)
    h.start(base_data)
    d = await open_drv(h)
    h.plan.label = "cow"
    await h.write(d, 5 * 4096 + 100, pattern(10, 100))  # the rest of the cluster comes from the backing
    await h.flush(d)
    await h.write(d, 8 * 4096 - 50, pattern(11, 4196))  # the tail of one cluster and the head of the next
    await h.flush(d)
    await h.write(d, 5 * 4096 + 3000, pattern(12, 200))  # into the now allocated cluster
    await h.zero(d, 20 * 4096 + 10, 100, may_trim=False)  # zeroes over backing data must be stored
    await h.flush(d)
    await h.close(d)
    h.report("qcow2 COW over a backing file")


async def test_qcow2_discard_and_reuse(work: Path) -> None:
    """Freed clusters are handed out again: no cut may show a new owner's data under an old reference."""
    img = qcow2(work, 1 * MiB, "cluster_size=4096")
    h = Harness(work, "qcow2", img)
    h.start(bytes(1 * MiB))
    d = await open_drv(h)
    h.plan.label = "discard"
    await h.write(d, 0, pattern(20, 8 * 4096))
    await h.flush(d)
    await h.trim(d, 2 * 4096, 3 * 4096)
    await h.flush(d)
    await h.write(d, 600 * KiB, pattern(21, 3 * 4096))  # may take the freed clusters
    await h.flush(d)
    await h.trim(d, 600 * KiB, 4096)
    await h.write(d, 2 * 4096, pattern(22, 4096))
    await h.flush(d)
    await h.close(d)
    h.report("qcow2 discard and reuse")


async def test_qcow2_compressed_writes(work: Path) -> None:
    """convert -c's path: compressed clusters packed into shared host clusters, then overwritten by
    compressed and by normal writes. No cut may show a cluster whose data or refcount was not on disk."""
    img = qcow2(work, 512 * KiB, "cluster_size=4096")
    h = Harness(work, "qcow2", img)
    h.start(bytes(512 * KiB))
    d = await open_drv(h)
    h.plan.label = "compressed"
    text = b"compressible text for a packed cluster. " * 400
    for i in range(6):  # several clusters' compressed bytes share one host cluster
        data = text[i:i + 4096]
        await h.modify(d, i * 4096, 4096, lambda o=i * 4096, b=data: d.write_compressed(o, memoryview(b)))
    await h.flush(d)
    await h.modify(d, 2 * 4096, 8192,
                   lambda: d.write_compressed(2 * 4096, memoryview(text[100:100 + 8192])))
    await h.write(d, 4 * 4096 + 10, pattern(30, 100))  # a normal write over a compressed cluster
    await h.flush(d)
    await h.close(d)
    h.report("qcow2 compressed writes")


async def test_qcow2_write_zeroes(work: Path) -> None:
    img = qcow2(work, 1 * MiB, "cluster_size=4096")
    h = Harness(work, "qcow2", img)
    h.start(bytes(1 * MiB))
    d = await open_drv(h)
    h.plan.label = "write zeroes"
    await h.write(d, 0, pattern(30, 6 * 4096))
    await h.flush(d)
    await h.zero(d, 4096, 2 * 4096, may_trim=True)
    await h.flush(d)
    await h.zero(d, 4 * 4096, 4096, may_trim=False)
    await h.zero(d, 5 * 4096 + 100, 1000, may_trim=False)  # part of an allocated cluster
    await h.zero(d, 100 * 4096 + 100, 1000, may_trim=False)  # part of an unallocated cluster
    await h.flush(d)
    await h.write(d, 4096, pattern(31, 4096))
    await h.flush(d)
    await h.close(d)
    h.report("qcow2 write zeroes")


async def test_qcow2_refcount_and_l2_growth(work: Path) -> None:
    """512-byte clusters: a refcount block covers 128 KiB of host and an L2 table 32 KiB of guest, so a few
    hundred allocations add refcount blocks, L2 tables and grow the refcount table."""
    size = 3 * MiB // 2
    img = qcow2(work, size, "cluster_size=512")
    h = Harness(work, "qcow2", img, exhaustive=4, samples=2)
    h.start(bytes(size))
    d = await open_drv(h)
    h.plan.label = "refcount growth"
    stride = 4608  # nine clusters: every few writes start a new L2 table
    n = 0
    for i in range(size // stride):
        await h.write(d, i * stride, pattern(40 + i % 200, 700))
        n += 1
        if n % 25 == 0:
            await h.flush(d)
    await h.flush(d)
    await h.close(d)
    assert os.path.getsize(img) > 256 * KiB  # several refcount blocks' worth of host clusters
    h.report("qcow2 refcount-block and L2 growth")


async def test_qcow2_internal_snapshots(work: Path) -> None:
    """Snapshot create, a write into clusters the snapshot shares (copied on write), snapshot delete."""
    img = qcow2(work, 256 * KiB, "cluster_size=4096")
    h = Harness(work, "qcow2", img, snapshot_window=True)
    h.start(bytes(256 * KiB))
    d = await open_drv(h)
    h.plan.label = "before snapshot"
    await h.write(d, 0, pattern(50, 4 * 4096))
    await h.write(d, 50 * 4096, pattern(51, 4096))
    await h.close(d)

    h.plan.label = "snapshot create"
    hf = PowerLossHostFile.open(str(img), read_only=False)
    assert isinstance(hf, PowerLossHostFile)
    hf.plan = h.plan
    h.plan.attach(str(img), hf.fd)
    try:
        await snapshot_create(hf, "s1")
    finally:
        hf.close()
    h.plan.cut(str(img), "after snapshot create")

    d = await open_drv(h)
    h.plan.label = "write into a shared cluster"
    await h.write(d, 4096 + 10, pattern(52, 100))
    await h.write(d, 50 * 4096, pattern(53, 4096))
    await h.flush(d)
    await h.close(d)

    h.plan.label = "snapshot delete"
    hf = PowerLossHostFile.open(str(img), read_only=False)
    assert isinstance(hf, PowerLossHostFile)
    hf.plan = h.plan
    h.plan.attach(str(img), hf.fd)
    try:
        await snapshot_delete(hf, "s1")
    finally:
        hf.close()
    h.plan.cut(str(img), "after snapshot delete")
    h.report("qcow2 internal snapshots")


# -- qcow2 resize ------------------------------------------------------------------------------------

class ResizeCuts:
    """The checker for a resize: every cut must pass ``qemu-img check`` (leaks allowed) and read as the old
    image or the new one. The guest size is the old or the new one; below both, the old data; past the old
    end, zeroes; between a shrink's new and old end, each cluster its old data or zeroes (the unmapping
    of several L2 tables is one sync)."""

    def __init__(self, work: Path, image: Path, old: bytes, new_size: int, cluster: int) -> None:
        self.work, self.image, self.old, self.new_size, self.cluster = work, image, old, new_size, cluster
        self.stats = Stats()
        self.plan = PowerLossPlan(self.check_cut)
        self.cut_path = image.with_name("cut-" + image.name)
        self.raw_path = work / "cut.raw"

    def check_cut(self, point: CutPoint) -> None:
        st = self.stats
        st.boundaries += 1
        for keep in keep_sets(len(point.pending), exhaustive=16, samples=8, seed=st.boundaries):
            for img, tag in self._states(point, point.materialise(keep)):
                key = hashlib.blake2b(img + b"/" + tag, digest_size=16).digest()
                if key in st.seen:
                    continue
                st.seen.add(key)
                st.images += 1
                problem = self._verify(img)
                if problem:
                    kept = "".join("1" if k else "0" for k in keep)
                    st.failures.append(f"{point.label} ({Path(point.path).name}) boundary {st.boundaries} "
                                       f"keep={kept}: {problem}")

    def _states(self, point: CutPoint, cut: bytes) -> Iterator[tuple[bytes, bytes]]:
        """The image files a cut leaves (the image's bytes, and a tag that tells them apart otherwise)."""
        yield cut, b""

    def name(self) -> str:
        """How qemu-img is given the cut image."""
        return str(self.cut_path)

    def _verify(self, img: bytes) -> str | None:
        self.cut_path.write_bytes(img)
        proc = run(peer("qemu-img"), "check", "--output=json", self.name(), check=False)
        rep = json.loads(proc.stdout) if proc.stdout.strip().startswith(b"{") else {}
        if proc.returncode not in (0, 3) or rep.get("corruptions", 0) or rep.get("check-errors", 0):
            self.stats.corruptions += 1
            return f"qemu-img check exited {proc.returncode}: {proc.stderr.decode()[:300]}"
        conv = run(peer("qemu-img"), "convert", "-O", "raw", self.name(), self.raw_path, check=False)
        if conv.returncode != 0:
            self.stats.corruptions += 1
            return f"qemu-img convert exited {conv.returncode}: {conv.stderr.decode()[:300]}"
        got = self.raw_path.read_bytes()
        old, cs = self.old, self.cluster
        if len(got) not in (len(old), self.new_size):
            self.stats.lost += 1
            return f"the guest reads {len(got)} bytes, neither the old size nor the new one"
        keep = min(len(old), self.new_size)
        if got[:keep] != old[:keep] or got[len(old):] != bytes(max(len(got) - len(old), 0)):
            self.stats.lost += 1
            return "the guest data changed"
        for c in range(keep, min(len(got), len(old)), cs):
            part = got[c:c + cs]
            if part != old[c:c + cs] and part != bytes(len(part)):
                self.stats.lost += 1
                return f"the cluster at guest offset {c} is neither its old data nor zeroes"
        return None

    async def run(self, size: int, prealloc: str = "off") -> None:
        from imagecore.formats.qcow2.resize import resize

        hf = PowerLossHostFile.open(str(self.image), read_only=False)
        assert isinstance(hf, PowerLossHostFile)
        hf.plan = self.plan
        self.plan.label = f"resize to {size}"
        self.plan.attach(str(self.image), hf.fd)
        try:
            await resize(hf, size, prealloc)
        finally:
            hf.close()
        self.plan.cut(str(self.image), "after resize")
        self._report(size, prealloc)

    async def run_op(self, size: int) -> None:
        """The whole ``resize`` verb (its own opens and locks) through a power-loss opener."""
        from imagecore.ops.resize import resize

        self.plan.label = f"resize verb to {size}"
        await resize(str(self.image), "qcow2", size, opener=PowerLossOpener(self.plan, lock=True))
        self.plan.cut(str(self.image), "after resize")
        self._report(size, "off")

    def _report(self, size: int, prealloc: str) -> None:
        st = self.stats
        print(f"\npower loss resize to {size} ({prealloc}): {st.boundaries} sync boundaries, {st.images} cut "
              f"images materialised, {st.corruptions} corruptions, {st.lost} lost or changed")
        assert st.boundaries > 1 and st.images > 0
        assert not st.failures, "\n".join(st.failures[:5])


async def test_qcow2_resize_grow_with_new_tables(work: Path) -> None:
    """A grow that needs a new L1 table, with metadata preallocation: new L2 tables, refcount blocks and a
    larger refcount table (512-byte clusters, 64-bit refcounts: one refcount table cluster covers 2 MiB)."""
    img = qcow2(work, 1 * MiB, "cluster_size=512", "refcount_bits=64")
    qio(img, "write -P 0x61 0 256k", "write -P 0x62 900k 100k")
    old = qemu_read(work, img)
    cuts = ResizeCuts(work, img, old, 3 * MiB, 512)
    await cuts.run(3 * MiB, "metadata")
    info = json.loads(run(peer("qemu-img"), "info", "--output=json", img).stdout)
    assert info["virtual-size"] == 3 * MiB


async def test_qcow2_resize_shrink_through_a_snapshot_table(work: Path) -> None:
    """A shrink through an L2 table a snapshot shares (copied first), refcount blocks left empty and the
    file's tail cut."""
    img = qcow2(work, 1 * MiB, "cluster_size=512")
    qio(img, "write -P 0x63 0 1M")
    qimg("snapshot", "-c", "s1", img)
    qio(img, "write -P 0x64 64k 64k")
    old = qemu_read(work, img)
    cuts = ResizeCuts(work, img, old, 40 * KiB, 512)
    await cuts.run(40 * KiB)
    run(peer("qemu-img"), "check", img)


class DataFileResizeCuts(ResizeCuts):
    """ResizeCuts for an image with an external data file: at each sync boundary of either file, the other
    is taken as synced so far and with every write since (the two states a cut may leave it in, as far as
    this file's boundary orders them), and qemu-img is given both files (a json: name)."""

    def __init__(self, work: Path, image: Path, data: Path, old: bytes, new_size: int, cluster: int) -> None:
        super().__init__(work, image, old, new_size, cluster)
        self.data = data
        self.cut_data = work / "cut.data"
        self._data_bytes = b""

    def name(self) -> str:
        self.cut_data.write_bytes(self._data_bytes)
        return "json:" + json.dumps({"driver": "qcow2",
                                     "file": {"driver": "file", "filename": str(self.cut_path)},
                                     "data-file": {"driver": "file", "filename": str(self.cut_data)}})

    def _states(self, point: CutPoint, cut: bytes) -> Iterator[tuple[bytes, bytes]]:
        mine_is_image = point.path == str(self.image)
        other = self.plan.files.get(str(self.data) if mine_is_image else str(self.image))
        others = [b""]
        if other is not None:
            whole = CutPoint("", "", bytes(other.durable), tuple(other.pending), None)
            others = list(dict.fromkeys([whole.durable, whole.materialise([True] * len(whole.pending))]))
        for theirs in others:
            img, self._data_bytes = (cut, theirs) if mine_is_image else (theirs, cut)
            yield img, self._data_bytes

    async def run_data_file_op(self, size: int, prealloc: str) -> None:
        from imagecore.ops.resize import resize

        self.plan.label = f"resize verb to {size}"
        await resize(str(self.image), "qcow2", size, preallocation=prealloc, shrink=True,
                     opener=PowerLossOpener(self.plan, lock=True))
        self.plan.cut(str(self.image), "after resize")
        self.plan.cut(str(self.data), "after resize")
        self._report(size, prealloc)


@pytest.mark.parametrize(("raw", "new", "prealloc"), [("on", 3 * MiB, "off"), ("off", 3 * MiB, "off"),
                                                      ("off", 3 * MiB, "falloc"), ("off", 40 * KiB, "off"),
                                                      ("on", 40 * KiB, "off")])
async def test_qcow2_resize_with_a_data_file(work: Path, raw: str, new: int, prealloc: str) -> None:
    """Grows (data_file_raw: its tables map the grown part one to one; 512-byte clusters, so new L1 and L2
    tables) and shrinks of an image with an external data file: every cut of either file reads as the old
    image or the new one and passes qemu-img check."""
    def here(*args: str) -> None:  # qemu opens a relative data file name from its working directory
        subprocess.run(list(args), cwd=work, check=True, capture_output=True, timeout=120)

    here(peer("qemu-img"), "create", "-q", "-f", "qcow2", "-o",
         f"cluster_size=512,data_file=a.data,data_file_raw={raw}", "a.qcow2", str(MiB))
    here(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x67 0 64k", "-c", "write -P 0x68 900k 100k",
         "a.qcow2")
    here(peer("qemu-img"), "convert", "-O", "raw", "a.qcow2", "orig.raw")
    old = (work / "orig.raw").read_bytes()
    cuts = DataFileResizeCuts(work, work / "a.qcow2", work / "a.data", old, new, 512)
    await cuts.run_data_file_op(new, prealloc)
    here(peer("qemu-img"), "check", "a.qcow2")
    here(peer("qemu-img"), "convert", "-O", "raw", "a.qcow2", "new.raw")
    assert (work / "new.raw").read_bytes() == (old + bytes(new))[:new]


@pytest.mark.parametrize("cluster", [4096, 512])
async def test_qcow2_resize_over_a_longer_backing_file(work: Path, cluster: int) -> None:
    """A grow of an image whose backing file reaches past its end: the new part is zeroed before the
    header shows it, so no cut lets the backing file's data appear there (old size unaligned to a
    cluster: the zeroing copies the head of the cluster it cuts; with 512-byte clusters the L1 table
    moves too)."""
    base = work / "base.raw"
    base.write_bytes(b"\x5a" * (2 * MiB))
    img = work / "img.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", "-b", str(base), "-F", "raw", img,
         str(MiB - 1536))
    qio(img, "write -P 0x65 0 64k", "write -P 0x66 1020k 512")
    old = qemu_read(work, img)
    cuts = ResizeCuts(work, img, old, 3 * MiB, cluster)
    await cuts.run_op(3 * MiB)
    got = qemu_read(work, img)
    assert got == old + bytes(3 * MiB - len(old))
    run(peer("qemu-img"), "check", img)


def qio(img: Path, *cmds: str) -> None:
    args: list[str | Path] = []
    for c in cmds:
        args += ["-c", c]
    run(peer("qemu-io"), "-f", "qcow2", *args, img)


def qemu_read(work: Path, img: Path) -> bytes:
    out = work / "orig.raw"
    qimg("convert", "-O", "raw", img, out)
    return out.read_bytes()


# -- vmdk ----------------------------------------------------------------------------------------------

def vmdk(work: Path, size: int, *, backing: Path | None = None) -> Path:
    img = work / "img.vmdk"
    args: list[str | Path] = ["create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "vmdk"]
    qimg(*args, img, str(size))
    return img



async def test_vmdk_allocation(work: Path) -> None:
    size = 8 * MiB
    img = vmdk(work, size)
    h = Harness(work, "vmdk", img)
    h.start(bytes(size))
    d = await open_drv(h)
    h.plan.label = "vmdk allocation"
    await h.write(d, 0, pattern(60, 64 * KiB))
    await h.flush(d)
    await h.write(d, 100 * KiB, pattern(61, 3000))  # part of a grain: the rest reads as zeroes
    await h.write(d, 5 * MiB + 512, pattern(62, 70 * KiB))  # across two grains
    await h.flush(d)
    await h.zero(d, 64 * KiB + 512, 4096, may_trim=False)
    await h.trim(d, 0, 64 * KiB)  # advisory: vmdk keeps the data
    await h.write(d, 100 * KiB + 1000, pattern(63, 100))
    await h.flush(d)
    await h.close(d)
    h.report("vmdk allocation")



async def test_vmdk_cow_over_backing(work: Path) -> None:
    size = 4 * MiB
    base = vmdk(work, size)
    run(peer("qemu-io"), "-f", "vmdk", "-c", "write -P 0x46 0 256k", base)
    base_data = b"\x46" * (256 * KiB)
    parent = base.rename(work / "base.vmdk")
    img = vmdk(work, size, backing=parent)
    h = Harness(work, "vmdk", img)
    h.start(base_data + bytes(size - len(base_data)))
    d = await open_drv(h)
    h.plan.label = "vmdk cow"
    await h.write(d, 10 * KiB, pattern(71, 1000))  # the rest of the grain comes from the parent
    await h.flush(d)
    await h.write(d, 128 * KiB - 100, pattern(72, 200))
    await h.flush(d)
    await h.close(d)
    h.report("vmdk COW over a parent")



async def test_harness_catches_a_driver_that_skips_syncs(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The figure means something: with every other fdatasync skipped (a driver that forgets to order its
    writes), the cuts show corruption or lost flushed writes."""
    calls = 0
    real = PowerLossHostFile._datasync

    def forgetful(self: PowerLossHostFile) -> None:
        nonlocal calls
        calls += 1
        if calls % 2:
            return  # neither a boundary nor durable: the changes stay pending
        real(self)

    monkeypatch.setattr(PowerLossHostFile, "_datasync", forgetful)
    img = qcow2(work, 1 * MiB, "cluster_size=4096")
    h = Harness(work, "qcow2", img)
    h.start(bytes(1 * MiB))
    d = await open_drv(h)
    for i in range(6):
        await h.write(d, i * 70000, pattern(i + 1, 5000))
    await h.flush(d)
    await h.trim(d, 0, 8192)
    await h.write(d, 500000, pattern(9, 9000))
    await h.flush(d)
    await h.close(d)
    assert h.stats.corruptions + h.stats.lost > 0, f"{h.stats.images} cut images, none found wrong"


async def test_vmdk_grain_tables_under_cache_pressure(work: Path) -> None:
    """Grain tables over two 32 MiB spans with room for one in the cache: changed tables are written back
    (after a sync) when the budget is exceeded, and are never evicted before."""
    size = 64 * MiB
    img = vmdk(work, size)
    h = Harness(work, "vmdk", img, exhaustive=8, samples=4)
    h.start(bytes(size))
    d = await open_drv(h)
    from imagecore.formats.vmdk.sparse import SparseExtent

    for ext in getattr(d, "extents_", []):
        if isinstance(ext, SparseExtent):
            ext._limits.gt_tables_per_extent = 1  # what a huge image meets with the default budget
    h.plan.label = "vmdk grain tables"
    span = 32 * MiB
    for i in range(2):
        await h.write(d, i * span + 4096 * i, pattern(80 + i, 5000))
    await h.flush(d)
    for i in (1, 0, 1):
        await h.write(d, i * span + 8 * MiB, pattern(90 + i, 3000))
    await h.flush(d)
    await h.close(d)
    h.report("vmdk grain tables under cache pressure")
