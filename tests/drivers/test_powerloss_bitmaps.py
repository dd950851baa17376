"""Power loss over persistent dirty bitmaps: at every sync boundary, each state a cut may leave is a clean
image (leaks aside) whose bitmaps are in use (inconsistent: QEMU refuses them) or tell the truth: every
guest range that differs from the contents the session started with is dirty in them, and what was dirty
before stays dirty. A disabled bitmap is never touched, and a cleared bitmap is either as it was or empty.
Never silently wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagecore.driver import BlockDriver
from tests.bitmaps_util import Run
from tests.drivers.test_powerloss import Expect, Harness, open_drv, pattern, qcow2
from tests.peers import peer, run

KiB, MiB = 1 << 10, 1 << 20
SIZE = 4 * MiB


def runs_of(img: Path, name: str) -> list[Run] | None:
    """The bitmap as QEMU reads it, or None when QEMU refuses it (in use)."""
    info = json.loads(run(peer("qemu-img"), "info", "-U", "--output=json", img).stdout)
    found = [b for b in info["format-specific"]["data"].get("bitmaps", []) if b["name"] == name]
    assert found, f"bitmap {name} is gone"
    if "in-use" in found[0]["flags"]:
        return None
    out = run(peer("nbdinfo"), "--json", f"--map=qemu:dirty-bitmap:{name}", "--", "[", peer("qemu-nbd"), "-r",
              "-f", "qcow2", "-B", name, str(img), "]").stdout
    return [(e["offset"], e["length"], bool(e["type"] & 1)) for e in json.loads(out)]


def dirty_set(runs: list[Run], gran: int) -> set[int]:
    return {i for o, n, d in runs if d for i in range(o // gran, (o + n) // gran)}


class BitmapHarness(Harness):
    def __init__(self, work: Path, image: Path, original: bytes) -> None:
        super().__init__(work, "qcow2", image, exhaustive=16, samples=6)
        self.original = original  # guest contents when the session began
        self.before: dict[str, set[int]] = {}
        self.cleared: set[str] = set()
        self.in_use = 0
        self.told_truth = 0

    def snapshot_bitmaps(self) -> None:
        for name, gran in (("b0", 4096), ("coarse", 65536), ("frozen", 4096)):
            runs = runs_of(self.image, name)
            assert runs is not None
            self.before[name] = dirty_set(runs, gran)

    def _verify(self, img: bytes, exp: Expect) -> str | None:
        problem = super()._verify(img, exp)  # qemu-img check clean; flushed writes kept; cut.raw written
        if problem:
            return problem
        guest = self.raw_path.read_bytes()
        for name, gran in (("b0", 4096), ("coarse", 65536), ("frozen", 4096)):
            runs = runs_of(self.cut_path, name)
            if runs is None:
                if name == "frozen":
                    return "the disabled bitmap was marked in use"
                self.in_use += 1
                continue
            got = dirty_set(runs, gran)
            if name == "frozen" or name in self.cleared:
                if got != self.before[name] and not (name in self.cleared and not got):
                    return f"bitmap {name} changed: {sorted(got ^ self.before[name])[:8]}"
                continue
            changed = {i // gran for i in range(0, SIZE, 512) if guest[i:i + 512] != self.original[i:i + 512]}
            missing = (changed | self.before[name]) - got
            if missing:
                return f"bitmap {name} is consistent but misses granules {sorted(missing)[:8]}"
            self.told_truth += 1
        return None


def guest(work: Path, img: Path) -> bytes:
    out = work / "guest.raw"
    run(peer("qemu-img"), "convert", "-O", "raw", img, out)
    return out.read_bytes()


async def test_bitmaps_through_power_loss(work: Path) -> None:
    img = qcow2(work, SIZE, "cluster_size=4096")
    qi, qio = peer("qemu-img"), peer("qemu-io")
    run(qio, "-f", "qcow2", "-c", "write -P 3 0 1M", img)
    run(qi, "bitmap", "--add", "-g", "4k", img, "b0")
    run(qi, "bitmap", "--add", "-g", "64k", img, "coarse")
    run(qi, "bitmap", "--add", "-g", "4k", "--disable", img, "frozen")
    run(qio, "-f", "qcow2", "-c", "write -P 4 2M 8k", img)  # dirty in b0 and coarse before the session
    run(qi, "bitmap", "--enable", img, "frozen")
    run(qio, "-f", "qcow2", "-c", "write -P 5 3M 4k", img)
    run(qi, "bitmap", "--disable", img, "frozen")
    original = guest(work, img)
    assert len(original) == SIZE

    h = BitmapHarness(work, img, original)
    h.snapshot_bitmaps()
    h.start(original)
    d: BlockDriver = await open_drv(h)
    h.plan.label = "writes"
    await h.write(d, 100 * KiB, pattern(1, 12 * KiB))
    await h.write(d, 2 * MiB + 4 * KiB, pattern(2, 4 * KiB))
    await h.flush(d)
    await h.zero(d, 512 * KiB, 64 * KiB, may_trim=True)
    await h.trim(d, 3 * MiB + 64 * KiB, 64 * KiB)
    await h.write(d, SIZE - 4 * KiB, pattern(3, 4 * KiB))
    await h.close(d)
    h.report("bitmaps: writes, flush, zeroes, discard, close")
    assert h.in_use and h.told_truth  # both kinds of cut were seen

    # a clear, stored on close: the bitmap is as it was, or empty
    h2 = BitmapHarness(work, img, guest(work, img))
    h2.snapshot_bitmaps()
    h2.cleared = {"b0"}
    h2.start(h2.original)
    d = await open_drv(h2)
    tracker = d.bitmap_tracker()  # type: ignore[attr-defined]
    tracker.clear("b0")
    h2.plan.label = "clear"
    await h2.close(d)
    h2.report("bitmaps: clear")


async def test_the_harness_catches_a_bitmap_not_marked_in_use(work: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """Without the in-use flag on disk before the first write, a cut leaves a bitmap that looks
    consistent and misses a write: the checker must see it."""
    from imagecore.formats.qcow2.dirty import DirtyBitmaps

    async def skip(self: DirtyBitmaps) -> None:
        self.need_in_use = False

    monkeypatch.setattr(DirtyBitmaps, "_mark_in_use", skip)
    img = qcow2(work, SIZE, "cluster_size=4096")
    run(peer("qemu-img"), "bitmap", "--add", "-g", "4k", img, "b0")
    run(peer("qemu-img"), "bitmap", "--add", "-g", "64k", img, "coarse")
    run(peer("qemu-img"), "bitmap", "--add", "--disable", "-g", "4k", img, "frozen")
    h = BitmapHarness(work, img, guest(work, img))
    h.snapshot_bitmaps()
    h.start(h.original)
    d: BlockDriver = await open_drv(h)
    await h.write(d, 100 * KiB, pattern(1, 4 * KiB))
    await h.flush(d)
    await h.close(d)
    assert any("misses granules" in f for f in h.stats.failures), h.stats.failures
