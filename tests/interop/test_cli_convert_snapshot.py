"""`convert -l`: an internal snapshot of the source converted instead of the active image, beside
qemu-img 7.2 (the same output, byte for byte through qemu-img compare, and the same refusals)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.peers import imagecore_cmd, peer, run


@pytest.fixture
def snapped(tmp_path: Path) -> Path:
    img = tmp_path / "s.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", img, "16M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x11 0 2M", img)
    run(peer("qemu-img"), "snapshot", "-c", "one", img)
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x22 1M 2M", "-c", "write -z 8M 1M", img)
    run(peer("qemu-img"), "snapshot", "-c", "two", img)
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x33 0 4M", img)
    run(peer("qemu-img"), "resize", "-q", img, "32M")  # the active image is larger than its snapshots
    return img


@pytest.mark.parametrize("param", ["one", "1", "two", "snapshot.name=two", "snapshot.id=1",
                                   "snapshot.id=2,snapshot.name=two"])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_a_snapshot_as_qemu_img(snapped: Path, param: str, fmt: str) -> None:
    work = snapped.parent
    q, o = work / f"q-{param}.{fmt}", work / f"o-{param}.{fmt}"
    run(peer("qemu-img"), "convert", "-O", fmt, "-l", param, snapped, q)
    p = subprocess.run([*imagecore_cmd(), "convert", "-O", fmt, "-l", param, str(snapped), str(o)],
                       capture_output=True)
    assert (p.returncode, p.stdout, p.stderr) == (0, b"", b"")
    assert run(peer("qemu-img"), "compare", "-f", fmt, "-F", fmt, q, o).returncode == 0
    info = run(peer("qemu-img"), "info", "--output=json", o).stdout
    assert b'"virtual-size": 16777216' in info  # the snapshot's size, not the active image's
    if fmt == "qcow2":
        run(peer("qemu-img"), "check", o)


def test_refusals(snapped: Path, tmp_path: Path) -> None:
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(1 << 20))
    for args in (["-l", "nope", snapped], ["-l", "snapshot.id=1,snapshot.name=two", snapped],
                 ["-l", "snapshot.foo=1", snapped], ["-f", "raw", "-l", "x", raw],
                 ["-l", "1", snapped, snapped]):
        out = tmp_path / "out.raw"
        q = subprocess.run([peer("qemu-img"), "convert", "-O", "raw", *map(str, args), str(out)],
                           capture_output=True)
        o = subprocess.run([*imagecore_cmd(), "convert", "-O", "raw", *map(str, args), str(out)],
                           capture_output=True)
        assert (o.returncode, o.stdout) == (q.returncode, q.stdout) and q.returncode == 1
        assert o.stderr.replace(b"imagecore:", b"qemu-img:") == q.stderr, (o.stderr, q.stderr)
