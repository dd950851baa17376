"""`imagecore check` against `qemu-img check`: exit codes, JSON and summaries, clean to corrupt."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

from tests.peers import imagecore_cmd, peer, run


def both(*args: str | Path) -> tuple[subprocess.CompletedProcess[bytes], subprocess.CompletedProcess[bytes]]:
    q = subprocess.run([peer("qemu-img"), *map(str, args)], capture_output=True, timeout=120)
    o = subprocess.run([*imagecore_cmd(), *map(str, args)], capture_output=True, timeout=120)
    assert b"Traceback" not in o.stderr
    return q, o


def make(work: Path, name: str = "c.qcow2", cluster: int = 65536) -> Path:
    img = work / name
    run(peer("qemu-img"), "create", "-f", "qcow2", "-o", f"cluster_size={cluster}", img, "8M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 1 0 256k", "-c", "write -P 2 4M 64k", img)
    return img


def refcount_entry(img: Path, cluster_index: int) -> int:
    """File offset of the 16-bit refcount of ``cluster_index`` (first refcount block only)."""
    with img.open("rb") as f:
        hdr = f.read(104)
        cluster_bits = struct.unpack(">I", hdr[20:24])[0]
        rt_offset = struct.unpack(">Q", hdr[48:56])[0]
        f.seek(rt_offset)
        rb_offset: int = struct.unpack(">Q", f.read(8))[0]
    assert cluster_index < (1 << cluster_bits) // 2
    return rb_offset + 2 * cluster_index


def set_refcount(img: Path, cluster_index: int, value: int) -> None:
    off = refcount_entry(img, cluster_index)
    with img.open("r+b") as f:
        f.seek(off)
        f.write(struct.pack(">H", value))


def compare(img: Path, expect_rc: int, *extra: str) -> dict[str, object]:
    q, o = both("check", "--output=json", *extra, img)
    assert (o.returncode, o.stdout.decode()) == (q.returncode, q.stdout.decode()), o.stderr.decode()
    assert q.returncode == expect_rc
    qh, oh = both("check", *extra, img)
    assert (oh.returncode, oh.stdout.decode()) == (qh.returncode, qh.stdout.decode()), oh.stderr.decode()
    return dict(json.loads(o.stdout)) if o.stdout else {}


def test_raw_has_no_check(work: Path) -> None:
    img = work / "r.raw"
    run(peer("qemu-img"), "create", "-f", "raw", img, "1M")
    for extra in ([], ["--output=json"], ["-f", "raw"], ["-q"]):
        q, o = both("check", *extra, img)
        assert q.returncode == o.returncode == 63
        assert o.stderr.decode() == "imagecore: This image format does not support checks\n"
        assert o.stdout == q.stdout == b""


def test_clean(work: Path) -> None:
    img = make(work)
    info = compare(img, 0)
    assert info["check-errors"] == 0 and "leaks" not in info
    compare(img, 0, "-f", "qcow2")
    q, o = both("check", "-q", img)
    assert o.returncode == q.returncode == 0 and o.stdout == q.stdout == b""


def test_leak_then_repair(work: Path) -> None:
    img = make(work, cluster=4096)
    size = img.stat().st_size
    with img.open("r+b") as f:
        f.truncate(size + 2 * 4096)
    set_refcount(img, size // 4096, 1)
    set_refcount(img, size // 4096 + 1, 1)
    info = compare(img, 3)
    assert info["leaks"] == 2
    twin = work / "twin.qcow2"
    twin.write_bytes(img.read_bytes())
    q = subprocess.run([peer("qemu-img"), "check", "-r", "leaks", "--output=json", str(twin)],
                       capture_output=True)
    o = subprocess.run([*imagecore_cmd(), "check", "-r", "leaks", "--output=json", str(img)],
                       capture_output=True)
    assert o.returncode == q.returncode == 0, o.stderr.decode()
    fixed = json.loads(o.stdout)
    assert fixed["leaks-fixed"] == 2 and "leaks" not in fixed
    assert o.stdout.decode().replace(str(img), str(twin)) == q.stdout.decode()
    compare(img, 0)


def test_corruption(work: Path) -> None:
    img = make(work)
    with img.open("rb") as f:
        hdr = f.read(48)
    l1_offset = struct.unpack(">Q", hdr[40:48])[0]
    set_refcount(img, l1_offset // 65536, 0)
    info = compare(img, 2)
    assert int(str(info["corruptions"])) >= 1
    q, o = both("check", img)
    assert b"ERROR" in o.stderr and b"ERROR" in q.stderr


def test_nonexistent_and_garbage(work: Path) -> None:
    q, o = both("check", work / "nope.qcow2")
    assert q.returncode == o.returncode == 1
    assert o.stderr.decode().count("\n") == 1
    bad = work / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 600)
    q, o = both("check", "-f", "qcow2", bad)
    assert q.returncode == o.returncode == 1
    assert o.stderr.decode().startswith("imagecore: ") and o.stderr.decode().count("\n") == 1
