"""Images whose L1 table, refcount table or an L2 entry point past the end of the file open for `check`
and are reported as qemu-img 7.2 reports them (exit 2, the same messages), and `check -r` repairs them as
far as qemu-img's repair does: a differential run on copies of the same damaged image."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.peers import imagecore_cmd, peer, run

PAST_END = 1 << 30


def damaged(work: Path, kind: str) -> Path:
    img = work / "a.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", img, "64M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x3c 0 1M", img)
    with open(img, "r+b") as f:
        if kind == "l1":
            f.seek(40)  # l1_table_offset
            f.write(struct.pack(">Q", PAST_END))
        elif kind == "reftable":
            f.seek(48)  # refcount_table_offset
            f.write(struct.pack(">Q", PAST_END))
        else:
            f.seek(40)
            l1 = struct.unpack(">Q", f.read(8))[0]
            f.seek(l1)
            l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
            f.seek(l2)
            f.write(struct.pack(">Q", (1 << 63) | PAST_END))  # the first data cluster's entry
    return img


def check(tool: list[str], img: Path, *extra: str) -> tuple[int, str, str]:
    p = subprocess.run([*tool, "check", *extra, str(img)], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout.replace(str(img), "IMG"), p.stderr.replace(str(img), "IMG").replace(
        "imagecore:", "qemu-img:")


@pytest.mark.parametrize("kind", ["l1", "reftable", "l2"])
@pytest.mark.parametrize("repair", [None, "leaks", "all"])
def test_past_end_tables_are_checked_and_repaired_as_qemu_img(tmp_path: Path, kind: str,
                                                             repair: str | None) -> None:
    src = damaged(tmp_path, kind)
    ours_img, qemu_img = tmp_path / "ours.qcow2", tmp_path / "qemu.qcow2"
    shutil.copy(src, ours_img)
    shutil.copy(src, qemu_img)
    extra = ["-r", repair] if repair else []
    q = check([peer("qemu-img")], qemu_img, *extra)
    o = check(imagecore_cmd(), ours_img, *extra)
    if repair is None:
        assert q[0] == 2
    assert (o[0], o[2]) == (q[0], q[2])
    # after a refcount rebuild the new structures may lie elsewhere: only the end offset may differ
    strip = [line for line in q[1].splitlines() if not line.startswith("Image end offset")]
    assert [line for line in o[1].splitlines() if not line.startswith("Image end offset")] == strip
    # repaired as far as qemu-img repairs the same image, and the guest data the same
    assert check([peer("qemu-img")], ours_img)[0] == check([peer("qemu-img")], qemu_img)[0]
    assert run(peer("qemu-img"), "compare", qemu_img, ours_img, check=False).returncode == 0


def test_an_image_with_tables_past_the_end_reads_as_qemu_reads_it_and_is_refused_for_writing(
        tmp_path: Path) -> None:
    img = damaged(tmp_path, "l1")
    # read-only, the L1 table past the end of the file reads as zeroes, as qemu's file layer reads it
    run(peer("qemu-img"), "convert", "-O", "raw", img, tmp_path / "qemu.raw")
    p = subprocess.run([*imagecore_cmd(), "convert", "-O", "raw", str(img), str(tmp_path / "ours.raw")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "ours.raw").read_bytes() == (tmp_path / "qemu.raw").read_bytes()
    # a writer refuses it rather than allocate over a table it cannot see
    before = img.read_bytes()
    p = subprocess.run([*imagecore_cmd(), "resize", str(img), "+1M"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1 and "Active L1 table extends past the end of the file" in p.stderr, p.stderr
    assert img.read_bytes() == before
