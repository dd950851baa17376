"""`imagecore info` against `qemu-img info`: the same JSON text and the same human text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import imagecore_cmd, peer, run

MiB = 1 << 20


def _run(args: list[str | Path], cwd: Path | None = None) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, cwd=cwd, timeout=120)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}: {proc.stderr.decode()}"
    return proc.stdout.decode()


def qimg(*args: str | Path, cwd: Path | None = None) -> str:
    return _run([peer("qemu-img"), *args], cwd)


def ours(*args: str | Path, cwd: Path | None = None) -> str:
    return _run([*imagecore_cmd(), *args], cwd)


def qio(img: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args: list[str | Path] = [peer("qemu-io"), "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, img)


def same_info(path: Path | str, *extra: str, cwd: Path | None = None) -> None:
    for output in ("json", "human"):
        want = qimg("info", f"--output={output}", *extra, path, cwd=cwd)
        got = ours("info", f"--output={output}", *extra, path, cwd=cwd)
        assert got == want, f"--output={output}\n--- qemu-img\n{want}\n--- imagecore\n{got}"


def test_raw_sparse(work: Path) -> None:
    img = work / "a.raw"
    qimg("create", "-f", "raw", img, "10M")
    qio(img, "write -P 1 1M 64k", fmt="raw")
    same_info(img)
    same_info(img, "-f", "raw")
    info = json.loads(ours("info", "--output=json", img))
    assert info["virtual-size"] == 10 * MiB and info["format"] == "raw"


def test_raw_odd_size_human(work: Path) -> None:
    img = work / "odd.img"
    img.write_bytes(b"\1" * 1000001)
    same_info(img)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cluster", ["4096", "65536", "2M"])
def test_qcow2_versions(work: Path, compat: str, cluster: str) -> None:
    img = work / "v.qcow2"
    qimg("create", "-f", "qcow2", "-o", f"compat={compat},cluster_size={cluster}", img, "1000000000")
    qio(img, "write -P 7 0 1M", "write -z 4M 1M")
    same_info(img)


def test_qcow2_v3_features(work: Path) -> None:
    img = work / "f.qcow2"
    qimg("create", "-f", "qcow2", "-o",
         "lazy_refcounts=on,refcount_bits=64,extended_l2=on,compression_type=zstd", img, "64M")
    qio(img, "write -P 3 0 256k")
    same_info(img)


def test_backing_chain(work: Path) -> None:
    base = work / "base.qcow2"
    mid = work / "mid.qcow2"
    top = work / "top.qcow2"
    raw = work / "raw.img"
    qimg("create", "-f", "raw", raw, "16M")
    qimg("create", "-f", "qcow2", "-b", "raw.img", "-F", "raw", base)
    qimg("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    qimg("create", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", top)
    qio(top, "write -P 9 0 64k")
    same_info(top)
    same_info(top, "--backing-chain")
    # relative names resolved against the image's folder, from another working directory
    same_info("top.qcow2", "--backing-chain", cwd=work)
    chain = json.loads(ours("info", "--output=json", "--backing-chain", top))
    assert [c["format"] for c in chain] == ["qcow2", "qcow2", "qcow2", "raw"]


def test_snapshots_and_compressed(work: Path) -> None:
    img = work / "s.qcow2"
    qimg("create", "-f", "qcow2", img, "8M")
    qio(img, "write -P 1 0 128k")
    qimg("snapshot", "-c", "first", img)
    qio(img, "write -c -P 2 1M 64k", "write -P 3 2M 64k")
    qimg("snapshot", "-c", "second-with-a-long-name", img)
    same_info(img)
    info = json.loads(ours("info", "--output=json", img))
    assert [s["name"] for s in info["snapshots"]] == ["first", "second-with-a-long-name"]


def test_dirty_and_corrupt_bits(work: Path) -> None:
    img = work / "d.qcow2"
    qimg("create", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "8M")
    qio(img, "write -P 1 0 64k")
    with img.open("r+b") as f:
        # incompatible features at byte 72: bit 0 dirty, bit 1 corrupt
        f.seek(72)
        f.write((3).to_bytes(8, "big"))
    same_info(img, "-U")


def test_missing_backing_file(work: Path) -> None:
    img = work / "orphan.qcow2"
    qimg("create", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", img, "1M")
    # plain info does not open the backing file, as qemu-img does not
    same_info(img)
    proc = subprocess.run([*imagecore_cmd(), "info", "--backing-chain", str(img)], capture_output=True)
    assert proc.returncode == 1
    assert proc.stderr.decode().startswith("imagecore: ") and proc.stderr.count(b"\n") == 1


@pytest.mark.parametrize("verb", [["info"], ["map", "--output=json"], ["check"]])
def test_short_verbs_load_only_what_they_use(work: Path, verb: list[str]) -> None:
    """A qcow2 info or map loads no vmdk, check, snapshot or uvloop code: start-up is most of their cost."""
    img = work / "s.qcow2"
    run(peer("qemu-img"), "create", "-f", "qcow2", img, "1M")
    probe = ("import sys, io\nfrom imagecore.cli import main\nsys.stdout = io.StringIO()\n"
             f"rc = main({[*verb, str(img)]!r})\nsys.stdout = sys.__stdout__\n"
             "print(rc, *sorted(m for m in sys.modules if m.startswith(('imagecore.formats', 'uvloop'))))")
    proc = subprocess.run([sys.executable, "-c", probe],
                          capture_output=True, text=True, timeout=60)
    rc, *loaded = proc.stdout.split()
    assert rc == "0", proc.stderr
    unwanted = {"uvloop", "imagecore.formats.vmdk.driver", "imagecore.formats.vmdk.descriptor"}
    if verb == ["check"]:
        assert "imagecore.formats.qcow2.check" in loaded
    else:
        assert "imagecore.formats.qcow2.driver" in loaded
        unwanted |= {"imagecore.formats.qcow2.check", "imagecore.formats.qcow2.snapshot"}
    assert not unwanted & set(loaded)
