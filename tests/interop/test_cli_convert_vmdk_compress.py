"""`convert -c -O vmdk` beside qemu-img 7.2: every sparse subformat takes it (streamOptimized stores its
grains compressed, as it always does; the hosted sparse ones store ordinary grains), the flat ones are
refused with qemu-img's "invalid cluster size" once the target is made; each result checks clean and
compares identical with the source, and qemu-img's results read back identical through imagecore."""

from __future__ import annotations

import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from tests.peers import imagecore_cmd, peer, run

SPARSE = ["", "monolithicSparse", "streamOptimized", "twoGbMaxExtentSparse"]
FLAT = ["monolithicFlat", "twoGbMaxExtentFlat"]


def _source(work: Path) -> Path:
    """A qcow2 of data, written zeroes, unallocated space and a grain only partly written, whose size is
    not a whole number of grains."""
    src = work / "src.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", src, "9000k")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x61 0 1M", "-c", "write -z 2M 1M",
        "-c", "write -P 7 5M 100k", "-c", "write -P 9 8960k 40k", src)
    return src


def _convert(work: Path, name: str, cmd: list[str], subformat: str) -> subprocess.CompletedProcess[bytes]:
    folder = work / name
    folder.mkdir()
    opts = ["-o", f"subformat={subformat}"] if subformat else []
    return subprocess.run([*cmd, "convert", "-c", "-O", "vmdk", *opts, "../src.qcow2", "t.vmdk"],
                          capture_output=True, cwd=folder, timeout=120)


def _grains(img: Path) -> list[tuple[int, bytes]]:
    """The (LBA, deflated grain) records of a stream-optimized extent, in file order."""
    data = img.read_bytes()
    overhead = struct.unpack_from("<Q", data, 68)[0]  # the header's overHead, in sectors
    pos, out = overhead * 512, []
    while pos + 12 <= len(data):
        lba, size = struct.unpack_from("<QI", data, pos)
        if size == 0:
            break
        out.append((lba, data[pos + 12:pos + 12 + size]))
        pos += -(-(12 + size) // 512) * 512
    return out


@pytest.mark.parametrize("subformat", SPARSE)
def test_compressed_vmdk_as_qemu_img(work: Path, subformat: str) -> None:
    src = _source(work)
    q = _convert(work, "q", [peer("qemu-img")], subformat)
    o = _convert(work, "o", imagecore_cmd(), subformat)
    assert (o.returncode, o.stdout, o.stderr) == (q.returncode, q.stdout, q.stderr) == (0, b"", b"")
    ours, theirs = work / "o" / "t.vmdk", work / "q" / "t.vmdk"
    assert sorted(p.name for p in (work / "o").iterdir()) == sorted(p.name for p in (work / "q").iterdir())
    run(peer("qemu-img"), "check", ours)
    run(peer("qemu-img"), "compare", src, ours)
    run(peer("qemu-img"), "compare", theirs, ours)
    # qemu-img's output read through imagecore
    res = subprocess.run([*imagecore_cmd(), "compare", str(src), str(theirs)], capture_output=True,
                         timeout=120)
    assert (res.returncode, res.stdout) == (0, b"Images are identical.\n"), res.stderr
    res = subprocess.run([*imagecore_cmd(), "convert", "-O", "raw", str(theirs), str(work / "back.raw")],
                         capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr
    run(peer("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", work / "back.raw", src)
    if subformat == "streamOptimized":
        # the same deflated grains, appended in guest order, as qemu-img's
        grains = _grains(ours)
        assert grains == _grains(theirs)
        assert [lba for lba, _ in grains] == sorted(lba for lba, _ in grains)
        assert all(len(zlib.decompress(g)) == 65536 for _, g in grains)


@pytest.mark.parametrize("subformat", FLAT)
def test_compressed_flat_vmdk_refused_as_qemu_img(work: Path, subformat: str) -> None:
    _source(work)
    q = _convert(work, "q", [peer("qemu-img")], subformat)
    o = _convert(work, "o", imagecore_cmd(), subformat)
    assert q.returncode == 1 and q.stderr == b"qemu-img: invalid cluster size\n"
    assert (o.returncode, o.stdout, o.stderr.replace(b"imagecore: ", b"qemu-img: ")) == \
        (q.returncode, q.stdout, q.stderr)
    # the target is made before the refusal, and stays, as qemu-img leaves it
    assert sorted(p.name for p in (work / "o").iterdir()) == sorted(p.name for p in (work / "q").iterdir())
