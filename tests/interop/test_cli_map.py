"""`imagecore map` against `qemu-img map`: JSON entries (merged on both sides) and the human table."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.peers import imagecore_cmd, peer, run

MiB = 1 << 20


def _run(args: list[str | Path], cwd: Path | None = None) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, cwd=cwd, timeout=120)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}: {proc.stderr.decode()}"
    return proc.stdout.decode()


def qimg(*args: str | Path) -> str:
    return _run([peer("qemu-img"), *args])


def ours(*args: str | Path) -> str:
    return _run([*imagecore_cmd(), *args])


def qio(img: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args: list[str | Path] = [peer("qemu-io"), "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, img)


def merged(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge adjacent entries of equal state, so different run boundaries compare equal."""
    outl: list[dict[str, Any]] = []
    for e in entries:
        if outl:
            p = outl[-1]
            same = all(p.get(k) == e.get(k) for k in ("depth", "present", "zero", "data")) and (
                ("offset" in p) == ("offset" in e))
            if same and p["start"] + p["length"] == e["start"] and (
                    "offset" not in p or p["offset"] + p["length"] == e["offset"]):
                p["length"] += e["length"]
                continue
        outl.append(dict(e))
    return outl


def same_map(img: Path, *extra: str) -> list[dict[str, Any]]:
    want = json.loads(qimg("map", "--output=json", *extra, img))
    got: list[dict[str, Any]] = json.loads(ours("map", "--output=json", *extra, img))
    assert merged(got) == merged(want)
    return got


def test_raw_sparse_exact_text(work: Path) -> None:
    img = work / "a.raw"
    qimg("create", "-f", "raw", img, "10M")
    qio(img, "write -P 1 1M 64k", "write -P 0 3M 64k", "write -P 2 9M 1M", fmt="raw")
    for extra in ([], ["--start-offset=1M", "--max-length=100k"], ["--start-offset=20M"],
                  ["--start-offset=1025", "--max-length=10"], ["--max-length=0"]):
        assert ours("map", "--output=json", *extra, img) == qimg("map", "--output=json", *extra, img)
        assert ours("map", *extra, img) == qimg("map", *extra, img)
    assert len(same_map(img)) >= 5


def test_qcow2_zero_compressed_discarded(work: Path) -> None:
    img = work / "z.qcow2"
    qimg("create", "-f", "qcow2", img, "16M")
    qio(img, "write -P 1 0 1M", "write -z 1M 1M", "write -c -P 2 2M 64k", "write -P 3 4M 1M",
        "discard 4M 256k", "write -z -u 6M 128k")
    got = same_map(img)
    assert any(e["zero"] and e["present"] for e in got)
    same_map(img, "--start-offset=100k", "--max-length=5M")
    # the human table refuses compressed clusters, as qemu-img does
    proc = subprocess.run([*imagecore_cmd(), "map", str(img)], capture_output=True)
    qproc = subprocess.run([peer("qemu-img"), "map", str(img)], capture_output=True)
    assert proc.returncode == qproc.returncode == 1
    assert b"compressed" in proc.stderr and b"Traceback" not in proc.stderr


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_qcow2_unaligned_windows(work: Path, compat: str) -> None:
    """Windows that start and end inside clusters of every kind clip the first and last runs as qemu-img."""
    img = work / "w.qcow2"
    qimg("create", "-f", "qcow2", "-o", f"compat={compat},cluster_size=4k", img, "2M")
    qio(img, "write -P 1 0 64k", "write -P 2 64k 8k", "write -z 72k 16k", "write -c -P 3 96k 4k",
        "write -P 4 200k 12k", "write -z -u 220k 4k", "write -P 5 1M 1M")
    if compat == "1.1":
        qio(img, "write -z 1028k 8k")  # zero clusters that keep their host offset
    for start, length in ((1, 10), (4095, 2), (5000, 70000), (70001, 30000), (98305, 4095), (99000, 200000),
                          (204800 + 17, 8192), (1048576 + 513, 1048576 - 1024), (2097151, 1)):
        same_map(img, f"--start-offset={start}", f"--max-length={length}")
    same_map(img)


def test_qcow2_human_table(work: Path) -> None:
    img = work / "h.qcow2"
    qimg("create", "-f", "qcow2", img, "16M")
    qio(img, "write -P 1 0 1M", "write -P 3 4M 1M", "write -z 8M 1M")
    assert ours("map", img) == qimg("map", img)


@pytest.mark.parametrize("cluster", ["4k", "64k", "1M"])
def test_backing_chain_depths(work: Path, cluster: str) -> None:
    base = work / "base.raw"
    mid = work / "mid.qcow2"
    top = work / "top.qcow2"
    qimg("create", "-f", "raw", base, "12M")
    qio(base, "write -P 1 0 2M", fmt="raw")
    qimg("create", "-f", "qcow2", "-o", f"cluster_size={cluster}", "-b", "base.raw", "-F", "raw", mid)
    qio(mid, "write -P 2 1M 2M", "write -z 5M 1M")
    qimg("create", "-f", "qcow2", "-o", f"cluster_size={cluster}", "-b", "mid.qcow2", "-F", "qcow2", top)
    qio(top, "write -P 3 2M 512k", "discard 5M 64k")
    got = same_map(top)
    assert {e["depth"] for e in got} >= {0, 1, 2}
    same_map(top, "--start-offset=1536k", "--max-length=4M")
    assert ours("map", top) == qimg("map", top)


def test_extended_l2_subclusters(work: Path) -> None:
    img = work / "x.qcow2"
    qimg("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", img, "4M")
    qio(img, "write -P 1 0 2k", "write -P 2 68k 4k", "write -z 200k 16k")
    same_map(img)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_json_streamed_in_batches_is_qemu_imgs_text(work: Path, batch: int, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The JSON is written a batch of entries at a time: every count of entries around a batch's end
    gives qemu-img's bytes, the empty image too."""
    from imagecore import cli

    monkeypatch.setattr(cli, "_MAP_BATCH", batch)
    img = work / "b.qcow2"
    counts = set()
    for writes in ([], ["write -P 1 0 64k"], ["write -P 1 64k 64k"],
                   ["write -P 1 64k 64k", "write -P 1 256k 64k"],
                   ["write -P 1 0 64k", "write -P 1 128k 64k", "write -P 1 256k 64k"]):
        qimg("create", "-q", "-f", "qcow2", img, "1M")
        if writes:
            qio(img, *writes)
        want = qimg("map", "--output=json", img)
        assert cli.main(["map", "--output=json", str(img)]) == 0
        assert capsys.readouterr().out == want
        counts.add(want.count("\n"))
    qimg("create", "-q", "-f", "qcow2", img, "0")
    assert cli.main(["map", "--output=json", str(img)]) == 0
    assert capsys.readouterr().out == qimg("map", "--output=json", img)
    assert counts == {1, 2, 3, 5, 6}


def test_json_of_a_map_that_fails_midway_is_qemu_imgs(work: Path) -> None:
    """An L2 table that cannot be read ends the map: the entries before it are printed as qemu-img prints
    them (each with its separator, no closing bracket), and the exit code is 1."""
    img = work / "c.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "8M")
    qio(img, "write -P 1 0 4k", "write -P 2 8k 4k", "write -P 3 3M 4k")
    with open(img, "r+b") as f:
        l1 = int.from_bytes(f.read(48)[40:48], "big")
        f.seek(l1 + 8)
        entry = int.from_bytes(f.read(8), "big")
        f.seek(l1 + 8)
        f.write((entry + 512).to_bytes(8, "big"))  # the second L2 table's offset, unaligned
    want = subprocess.run([peer("qemu-img"), "map", "-U", "--output=json", str(img)], capture_output=True)
    got = subprocess.run([*imagecore_cmd(), "map", "-U", "--output=json", str(img)], capture_output=True)
    assert want.returncode == got.returncode == 1
    assert got.stdout == want.stdout and got.stdout.endswith(b"},\n")
