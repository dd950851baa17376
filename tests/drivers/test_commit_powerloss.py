"""Power loss while a committed qcow2 overlay is emptied by rewriting it (qemu's make_completely_empty).

The overlay's data is in its base already (``qemu-img commit -d`` put it there). At every fdatasync of the
rewrite, each subset of the unsynced writes a cut may keep is materialised beside the base, and then must
read exactly as the base does (`qemu-img compare`), and after qemu's repair (`check -r all`, what opening
a dirty image read-write does) check clean and still read so. One overlay has its L1 table in the first
clusters, as images are made; the other had it moved to the end by a resize, with data in the clusters
the rewrite zeroes: there the old L1 table must be gone from the disk before they are.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from imagecore.formats.qcow2.empty import completely_emptiable, make_completely_empty
from tests.doubles.powerloss import CutPoint, PowerLossHostFile, PowerLossPlan, keep_sets
from tests.peers import peer, run


def _qemu_img(*args: str | Path, ok: tuple[int, ...] = (0,)) -> int:
    proc = run(peer("qemu-img"), *args, check=False)
    assert proc.returncode in ok, (args, proc.stdout, proc.stderr)
    return proc.returncode


def _overlay(work: Path, moved: bool) -> Path:
    qio = peer("qemu-io")
    base, top = work / "base.qcow2", work / "top.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", base, "8M")
    run(qio, "-f", "qcow2", "-c", "write -P 0x11 0 8M", base)
    if moved:
        # 512-byte clusters: one L1 cluster maps 2 MiB, so growing to 8 MiB moves the table to the end and
        # frees its first cluster, which the next write takes for data
        _qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", base.name, "-F", "qcow2",
                  top, "1M")
        run(qio, "-f", "qcow2", "-c", "write -P 0x22 0 64k", top)
        _qemu_img("resize", "-q", top, "8M")
        run(qio, "-f", "qcow2", "-c", "write -P 0x33 4M 8k", top)
    else:
        _qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
        run(qio, "-f", "qcow2", "-c", "write -P 0x22 0 1M", "-c", "write -z 2M 64k", "-c",
            "write -c -P 0x33 5M 64k", top)
    _qemu_img("commit", "-q", "-d", top)
    _qemu_img("compare", top, base)
    return top


@pytest.mark.parametrize("moved", [False, True], ids=["tables first", "L1 table moved to the end"])
async def test_rewrite_survives_a_cut_at_every_sync(work: Path, moved: bool) -> None:
    top = _overlay(work, moved)
    images: dict[str, tuple[str, bytes]] = {}

    def collect(point: CutPoint) -> None:
        for keep in keep_sets(len(point.pending)):
            img = point.materialise(keep)
            images.setdefault(hashlib.sha256(img).hexdigest(), (point.label, img))

    plan = PowerLossPlan(collect)
    hf = PowerLossHostFile.open(str(top), read_only=False)
    assert isinstance(hf, PowerLossHostFile)
    hf.plan = plan
    plan.attach(str(top), hf.fd)
    try:
        assert await completely_emptiable(hf)
        plan.label = "rewrite"
        await make_completely_empty(hf)
        plan.cut(str(top), "after")
    finally:
        hf.close()
    assert plan.boundaries >= 9
    bad: list[str] = []
    cut = work / "cut.qcow2"
    for digest, (label, img) in images.items():
        cut.write_bytes(img)
        if _qemu_img("compare", "-U", cut, work / "base.qcow2", ok=(0, 1, 2)):
            bad.append(f"{label} {digest[:12]}: reads differently from the base")
            continue
        _qemu_img("check", "-q", "-r", "all", cut, ok=(0, 1, 2, 3))
        if _qemu_img("check", "-q", cut, ok=(0, 1, 2, 3)) or \
                _qemu_img("compare", "-U", cut, work / "base.qcow2", ok=(0, 1, 2)):
            bad.append(f"{label} {digest[:12]}: not clean, or reads differently, after repair")
    print(f"make_completely_empty ({'moved' if moved else 'plain'} L1): {plan.boundaries} sync boundaries, "
          f"{len(images)} images, {len(bad)} bad")
    assert bad == []
    # the end state is qemu's: the image's tables and nothing else
    run(peer("qemu-img"), "check", top)
    assert top.stat().st_size == (3 + (4 if moved else 1)) * (512 if moved else 65536)
