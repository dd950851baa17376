"""`convert -c` onto qcow2 beside qemu-img 7.2: zlib and zstd, compressible and incompressible clusters,
sparse sources with holes smaller than a cluster, an image size that is not a multiple of the cluster
size, and overwrites of compressed clusters afterwards. The copy must read back identical
(qemu-img compare), pass qemu-img check, and hold as many compressed clusters as qemu-img's."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.peers import imagecore_cmd, peer, run


def source(work: Path, kind: str) -> Path:
    path = work / f"{kind}.raw"
    with open(path, "wb") as f:
        if kind == "text":  # compresses well
            f.write((b"the quick brown fox jumps over the lazy dog. " * 200000)[:8 << 20])
        elif kind == "random":  # does not compress: written as normal clusters
            f.write(os.urandom(4 << 20))
        elif kind == "mixed":  # text, random, 4 KiB holes and an odd size
            f.truncate((6 << 20) + 12345)
            for i in range(0, 6 << 20, 96 << 10):
                f.seek(i)
                f.write(os.urandom(8 << 10) if i % (3 << 20) else b"block %d " % i * 900)
    return path


def compressed(img: Path) -> int:
    data = json.loads(run(peer("qemu-img"), "check", "--output=json", img).stdout)
    assert data.get("corruptions", 0) == 0 and data.get("leaks", 0) == 0, data
    return int(data.get("compressed-clusters", 0))


@pytest.mark.parametrize("kind", ["text", "random", "mixed"])
@pytest.mark.parametrize("opts", ["cluster_size=65536", "compression_type=zstd", "cluster_size=4096"])
def test_compressed_convert_as_qemu_img(tmp_path: Path, kind: str, opts: str) -> None:
    src = source(tmp_path, kind)
    q, o = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
    run(peer("qemu-img"), "convert", "-c", "-O", "qcow2", "-o", opts, src, q)
    p = subprocess.run([*imagecore_cmd(), "convert", "-c", "-O", "qcow2", "-o", opts, str(src), str(o)],
                       capture_output=True)
    assert (p.returncode, p.stdout, p.stderr) == (0, b"", b"")
    assert run(peer("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", src, o).returncode == 0
    assert compressed(o) == compressed(q)
    if kind != "random":
        assert o.stat().st_size <= q.stat().st_size * 1.1 + (1 << 16)
    # a compressed image stays sound when written afterwards, by qemu and by our own driver
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x5c 4k 8k", o)
    p = subprocess.run([*imagecore_cmd(), "convert", "-O", "raw", str(o), str(tmp_path / "back.raw")],
                       capture_output=True)
    assert p.returncode == 0
    compressed(o)
    ref = tmp_path / "ref.raw"
    run(peer("qemu-img"), "convert", "-O", "raw", o, ref)
    back = tmp_path / "back.raw"
    assert run(peer("qemu-img"), "compare", "-f", "raw", "-F", "raw", ref, back).returncode == 0


def test_compressed_convert_from_a_qcow2_chain(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", base, "8M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x11 0 3M", "-c", "write -z 4M 1M", base)
    top = tmp_path / "top.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x22 1M 4k", "-c", "write -P 0x33 6M 100k", top)
    out = tmp_path / "out.qcow2"
    p = subprocess.run([*imagecore_cmd(), "convert", "-c", "-O", "qcow2", str(top), str(out)],
                       capture_output=True)
    assert p.returncode == 0, p.stderr
    assert run(peer("qemu-img"), "compare", top, out).returncode == 0
    assert compressed(out) > 0
