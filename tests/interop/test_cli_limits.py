"""Size limits of `imagecore create` per format, against qemu-img, and memory that does not grow with size.

Where qemu 7.2 and qemu 10 differ (a monolithicFlat extent the host cannot make, which 7.2 ignores), qemu 10
is the reference. Where qemu has no limit and silently writes a broken image (vmdk sparse extents past
2^48 - 32 MiB, whose grain count qemu rounds in 32 bits), imagecore refuses, and the test shows the image qemu
writes there is broken. Split vmdk subformats are never tried on qemu at huge sizes: it would make one file
per 2 GiB.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import imagecore_cmd, peer, qemu10, run

Proc = subprocess.CompletedProcess[bytes]

# The last size whose sparse vmdk qemu lays out correctly, and what ulimit -v allows a create.
VMDK_SPARSE_MAX = (2**32 - 512) * 65536
VM_LIMIT_KIB = 4_000_000


def limited(cmd: list[str], cwd: Path) -> Proc:
    """Run under a virtual memory cap and a time limit, so a regression fails instead of eating the host."""
    script = f"ulimit -v {VM_LIMIT_KIB}; exec \"$@\""
    return subprocess.run(["sh", "-c", script, "sh", *cmd], capture_output=True, cwd=cwd, timeout=60)


def both(work: Path, qemu_img: str, *args: str) -> tuple[Proc, Proc]:
    """The same create line for qemu-img and imagecore, each in its own folder under the same names."""
    (work / "q").mkdir(exist_ok=True)
    (work / "o").mkdir(exist_ok=True)
    q = limited([qemu_img, *args], work / "q")
    o = limited([*imagecore_cmd(), *args], work / "o")
    assert b"Traceback" not in o.stderr
    return q, o


def same_outcome(q: Proc, o: Proc) -> None:
    assert o.returncode == q.returncode, (q.stderr, o.stderr)
    assert o.stdout == q.stdout
    assert o.stderr.replace(b"imagecore: ", b"qemu-img: ") == q.stderr


CASES = [
    ("raw", [], "1E"),
    ("raw", [], "9223372036854775296"),  # 2^63 - 512: too large for any Linux file system
    ("raw", [], "9223372036854775807"),  # rounds up to 2^63, past off_t: EINVAL
    ("qcow2", [], "1E"),
    ("qcow2", [], "4E"),
    ("qcow2", ["-o", "cluster_size=512"], "2T"),
    ("qcow2", ["-o", "cluster_size=4k"], "128T"),
    ("qcow2", ["-o", "cluster_size=64k"], "32P"),
    ("qcow2", ["-o", "cluster_size=2M"], "4E"),
    ("vmdk", ["-o", "subformat=monolithicFlat"], "1E"),
]


@pytest.mark.parametrize(("fmt", "opts", "size"), CASES, ids=[f"{f}-{' '.join(o)}-{s}" for f, o, s in CASES])
def test_over_the_limit_as_qemu_img(work: Path, fmt: str, opts: list[str], size: str) -> None:
    args = ["create", "-f", fmt, *opts, f"img.{fmt}", size]
    q, o = both(work, qemu10("qemu-img"), *args)
    assert q.returncode == 1
    same_outcome(q, o)
    if fmt != "vmdk":  # qemu 7.2 ignores the failed truncate of a flat extent and exits 0
        q72 = limited([peer("qemu-img"), *args], work / "q")
        assert (q72.returncode, q72.stderr) == (q.returncode, q.stderr)


def test_qcow2_largest_legal_size_as_qemu_img(work: Path) -> None:
    q, o = both(work, peer("qemu-img"), "create", "-f", "qcow2", "-o", "cluster_size=2M", "img.qcow2", "1E")
    same_outcome(q, o)
    assert q.returncode == 0
    qi = json.loads(run(peer("qemu-img"), "info", "--output=json", work / "q" / "img.qcow2").stdout)
    oi = json.loads(run(peer("qemu-img"), "info", "--output=json", work / "o" / "img.qcow2").stdout)
    assert oi["virtual-size"] == qi["virtual-size"] == 1 << 60


def _gd_offsets(path: Path) -> tuple[int, int]:
    """(redundant GD, GD) sector offsets from a vmdk sparse header."""
    with path.open("rb") as f:
        head = f.read(80)
    rgd, gd = struct.unpack_from("<QQ", head, 48)
    return rgd, gd


@pytest.mark.parametrize("sub", ["monolithicSparse", "streamOptimized"])
def test_vmdk_sparse_limit(work: Path, sub: str) -> None:
    over = str(VMDK_SPARSE_MAX + 512)
    q, o = both(work, peer("qemu-img"), "create", "-f", "vmdk", "-o", f"subformat={sub}", "img.vmdk", over)
    assert o.returncode == 1
    assert o.stderr == b"imagecore: img.vmdk: The image size is too large for file format 'vmdk'\n"
    assert not (work / "o" / "img.vmdk").exists()
    # qemu exits 0 there, but its 32-bit grain count wrapped: the image has no grain tables at all.
    assert q.returncode == 0
    rgd, gd = _gd_offsets(work / "q" / "img.vmdk")
    assert gd == rgd
    # At 1E qemu's image does not even pass its own check.
    q, o = both(work, peer("qemu-img"), "create", "-f", "vmdk", "-o", f"subformat={sub}", "e.vmdk", "1E")
    assert (q.returncode, o.returncode) == (0, 1)
    assert o.stderr == b"imagecore: e.vmdk: The image size is too large for file format 'vmdk'\n"
    assert run(peer("qemu-img"), "check", work / "q" / "e.vmdk", check=False).returncode != 0


@pytest.mark.parametrize("sub", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
@pytest.mark.parametrize("size", ["1E", str(4096 * 2**31 + 512)])
def test_vmdk_split_limit_refused_before_any_file(work: Path, sub: str, size: str) -> None:
    # qemu would make one file per 2 GiB here; a descriptor lists at most 4096 extents (8 TiB)
    o = limited([*imagecore_cmd(), "create", "-f", "vmdk", "-o", f"subformat={sub}", "img.vmdk", size], work)
    assert o.returncode == 1
    assert o.stderr == b"imagecore: img.vmdk: The image size is too large for file format 'vmdk'\n"
    assert list(work.iterdir()) == []


_RSS_PROBE = """
import resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True)
sys.stderr.buffer.write(proc.stderr)
print(proc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _create_rss(work: Path, *args: str) -> tuple[int, int]:
    """Exit code and peak RSS (KiB) of an imagecore create, run under the virtual memory cap."""
    proc = limited([sys.executable, "-c", _RSS_PROBE, *imagecore_cmd(), "create", "-q", *args], work)
    assert proc.returncode == 0, proc.stderr
    rc, rss = proc.stdout.split()
    return int(rc), int(rss)


@pytest.mark.parametrize(("sub", "size"), [("monolithicSparse", str(VMDK_SPARSE_MAX)),
                                           ("streamOptimized", str(VMDK_SPARSE_MAX)),
                                           ("monolithicSparse", "64T")])
def test_vmdk_large_create_has_bounded_memory(work: Path, sub: str, size: str) -> None:
    # Two 32 MiB grain directories at the largest size: built whole, they took hundreds of MiB.
    rc, rss = _create_rss(work, "-f", "vmdk", "-o", f"subformat={sub}", "img.vmdk", size)
    assert rc == 0
    assert rss < 100 * 1024, f"peak RSS {rss} KiB"
    ref = work / "ref"
    ref.mkdir()
    run(peer("qemu-img"), "create", "-q", "-f", "vmdk", "-o", f"subformat={sub}", ref / "img.vmdk", size)
    # The same layout as qemu's, byte for byte apart from the random CID in the descriptor.
    assert os.path.getsize(work / "img.vmdk") == os.path.getsize(ref / "img.vmdk")
    a, b = _metadata(work / "img.vmdk"), _metadata(ref / "img.vmdk")
    assert a == b


def _metadata(path: Path) -> list[bytes]:
    """The header and both grain directories of a sparse vmdk (the tables between are holes)."""
    rgd, gd = _gd_offsets(path)
    with path.open("rb") as f:
        parts = [f.read(512)]
        (capacity,) = struct.unpack_from("<Q", parts[0], 12)
        gd_bytes = -(-capacity // (128 * 512)) * 4
        for off in (rgd, gd):
            f.seek(off * 512)
            parts.append(f.read(gd_bytes))
    return parts


def test_vmdk_1t_passes_qemu_img_check_and_info(work: Path) -> None:
    rc, rss = _create_rss(work, "-f", "vmdk", "o.vmdk", "1T")
    assert rc == 0 and rss < 100 * 1024
    run(peer("qemu-img"), "create", "-q", "-f", "vmdk", work / "q.vmdk", "1T")
    checks = [run(peer("qemu-img"), "check", "--output=json", work / n) for n in ("o.vmdk", "q.vmdk")]
    assert all(c.returncode == 0 for c in checks)
    assert [json.loads(c.stdout)["check-errors"] for c in checks] == [0, 0]
    infos = [json.loads(run(peer("qemu-img"), "info", "--output=json", work / n).stdout)
             for n in ("o.vmdk", "q.vmdk")]
    for i in infos:
        i.pop("filename")
        i["format-specific"]["data"].pop("cid")
        for e in i["format-specific"]["data"]["extents"]:
            e.pop("filename")
    assert infos[0] == infos[1]


def test_qcow2_largest_create_has_bounded_memory(work: Path) -> None:
    # 1 EiB at 2 MiB clusters: a 16 MiB L1 table, which qemu holds too; nothing else grows with the size
    rc, rss = _create_rss(work, "-f", "qcow2", "-o", "cluster_size=2M", "img.qcow2", "1E")
    assert rc == 0
    assert rss < 120 * 1024, f"peak RSS {rss} KiB"
    run(peer("qemu-img"), "check", work / "img.qcow2")


def test_qcow2_preallocated_plan_holds_nothing_per_table() -> None:
    from imagecore.formats.qcow2.create import plan_layout

    # two million L2 tables, planned without a list of them
    lay = plan_layout(1 << 60, 21, 4, 8, "metadata", False)
    assert len(lay.l2_clusters) == len(lay.data_start) == 1 << 21
    assert isinstance(lay.l2_clusters, range) and isinstance(lay.data_start, range)
    assert lay.data_start[0] == lay.l2_clusters[0] + 1
