"""Block status as qemu reports it: `imagecore map` beside qemu-img map 7.2 (the same bytes) and 10, and
nbdsrv's base:allocation, qemu:allocation-depth and sparse reads beside qemu-nbd 7.2 and 10, over images
written by qemu-io, preallocated ones (metadata, falloc, full), images whose data clusters hold holes of
the host file (fallocate -p), extended L2, compressed clusters, external data files and backing chains.

qemu looks into the host file under a data cluster only in an image it takes for metadata-preallocated
(qcow2_detect_metadata_preallocation); the images with punched holes come on both sides of its threshold.
The verbs that act on block status follow: convert keeps a target as sparse as qemu-img's, compare -s
sees the same status, measure counts the same clusters.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers import imagecore_cmd, peer, qemu10, run

KiB, MiB = 1 << 10, 1 << 20


def qimg(cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([peer("qemu-img"), *args], capture_output=True, cwd=cwd, timeout=120)


def ours(cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.run([*imagecore_cmd(), *args], capture_output=True, cwd=cwd, env=env, timeout=120)


def qio(cwd: Path, img: str, *cmds: str, fmt: str = "qcow2") -> None:
    args: list[str] = [peer("qemu-io"), "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, img], check=True, capture_output=True, cwd=cwd, timeout=120)


def create(cwd: Path, img: str, size: str, *opts: str, fmt: str = "qcow2") -> None:
    got = qimg(cwd, "create", "-q", "-f", fmt, *opts, img, size)
    assert got.returncode == 0, got.stderr


def punch(path: Path, offset: int, length: int) -> None:
    """A hole in the host file (fallocate -p keeps the file's size)."""
    run(peer("fallocate"), "-p", "-o", str(offset), "-l", str(length), path)


def entries(cwd: Path, img: str) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = json.loads(qimg(cwd, "map", "--output=json", img).stdout)
    return got


def data_offsets(cwd: Path, img: str) -> list[int]:
    """Host offsets of the data runs qemu-img map shows, in guest order."""
    return [e["offset"] for e in entries(cwd, img) if e["data"] and not e["zero"] and "offset" in e]


def host_holes(cwd: Path, img: str) -> bool:
    """Whether qemu-img map shows a hole of the host file inside a data cluster (data that reads as zero)."""
    return any(e["data"] and e["zero"] for e in entries(cwd, img))


# -- the images ---------------------------------------------------------------------------------------
# each builder makes its images in a folder and returns the names of those to compare (relative names: a
# data file is opened relative to the working directory by qemu, and the human map prints names)

def _plain(d: Path) -> list[str]:
    create(d, "plain.qcow2", "8M")
    qio(d, "plain.qcow2", "write -P 1 0 1M", "write -P 2 3M 512k", "write -z 5M 1M", "write -P 4 6M 128k",
        "write -z 6M 64k", "discard 3M 64k")
    return ["plain.qcow2"]


def _punched(d: Path) -> list[str]:
    """Holes punched in data clusters of an image whose file stays mostly allocated: qemu reports data."""
    create(d, "punched.qcow2", "8M")
    qio(d, "punched.qcow2", "write -P 1 0 4M", "write -P 2 6M 64k")
    first, last = data_offsets(d, "punched.qcow2")[0], data_offsets(d, "punched.qcow2")[-1]
    punch(d / "punched.qcow2", first + 4 * KiB, 8 * KiB)
    punch(d / "punched.qcow2", first + 128 * KiB, 64 * KiB)
    punch(d / "punched.qcow2", last + 60 * KiB, 4 * KiB)
    assert not host_holes(d, "punched.qcow2")
    return ["punched.qcow2"]


def _punched_much(d: Path) -> list[str]:
    """Most of the data punched away: qemu takes the image for metadata-preallocated and shows the holes."""
    create(d, "much.qcow2", "8M")
    qio(d, "much.qcow2", "write -P 1 0 2M")
    first = data_offsets(d, "much.qcow2")[0]
    punch(d / "much.qcow2", first + 4 * KiB, 1 * MiB)
    assert host_holes(d, "much.qcow2")
    return ["much.qcow2"]


def _refcount_widths(d: Path) -> list[str]:
    """The metadata-preallocation test counts refcounts of every width, sub-byte ones too."""
    names = []
    for bits in (1, 4, 8, 64):
        name = f"rc{bits}.qcow2"
        create(d, name, "4M", "-o", f"refcount_bits={bits}")
        qio(d, name, "write -P 1 0 2M")
        punch(d / name, data_offsets(d, name)[0] + 4 * KiB, 1 * MiB)
        assert host_holes(d, name)
        names.append(name)
    create(d, "rc1-kept.qcow2", "4M", "-o", "refcount_bits=1")
    qio(d, "rc1-kept.qcow2", "write -P 1 0 2M")
    punch(d / "rc1-kept.qcow2", data_offsets(d, "rc1-kept.qcow2")[0] + 4 * KiB, 8 * KiB)
    assert not host_holes(d, "rc1-kept.qcow2")
    return [*names, "rc1-kept.qcow2"]


def _prealloc(d: Path) -> list[str]:
    names = []
    for mode in ("metadata", "falloc", "full"):
        name = f"pre-{mode}.qcow2"
        create(d, name, "8M", "-o", f"preallocation={mode}")
        qio(d, name, "write -P 1 1M 64k", "write -P 2 2M 4k", "write -z 3M 64k", "discard 4M 64k")
        names.append(name)
    # data written into a metadata-preallocated image, then a hole punched into it again
    qio(d, "pre-metadata.qcow2", "write -P 3 5M 256k")
    punch(d / "pre-metadata.qcow2", entries(d, "pre-metadata.qcow2")[0]["offset"] + 5 * MiB + 64 * KiB,
          8 * KiB)
    # made by imagecore
    assert ours(d, "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", "ours-meta.qcow2",
                "4M").returncode == 0
    qio(d, "ours-meta.qcow2", "write -P 1 64k 64k")
    return [*names, "ours-meta.qcow2"]


def _extended_l2(d: Path) -> list[str]:
    create(d, "xl2.qcow2", "4M", "-o", "extended_l2=on")
    qio(d, "xl2.qcow2", "write -P 1 0 2k", "write -P 2 68k 8k", "write -z 200k 16k", "write -P 3 1M 128k")
    punch(d / "xl2.qcow2", data_offsets(d, "xl2.qcow2")[-1] + 8 * KiB, 8 * KiB)
    create(d, "xl2-meta.qcow2", "4M", "-o", "extended_l2=on,preallocation=metadata")
    qio(d, "xl2-meta.qcow2", "write -P 1 0 2k", "write -P 2 68k 8k", "write -z 200k 16k")
    return ["xl2.qcow2", "xl2-meta.qcow2"]


def _compressed(d: Path) -> list[str]:
    create(d, "comp.qcow2", "4M")
    qio(d, "comp.qcow2", "write -c -P 1 0 64k", "write -P 2 64k 64k", "write -c -P 3 1M 128k")
    return ["comp.qcow2"]


def _data_file(d: Path) -> list[str]:
    create(d, "ext.qcow2", "4M", "-o", "data_file=ext.data")
    qio(d, "ext.qcow2", "write -P 1 0 1M", "write -P 2 2M 64k", "write -z 3M 64k")
    punch(d / "ext.data", 8 * KiB, 8 * KiB)
    create(d, "extraw.qcow2", "4M", "-o", "data_file=extraw.data,data_file_raw=on")
    qio(d, "extraw.qcow2", "write -P 1 0 1M")
    punch(d / "extraw.data", 8 * KiB, 8 * KiB)
    create(d, "extmeta.qcow2", "4M", "-o", "data_file=extmeta.data,preallocation=metadata")
    qio(d, "extmeta.qcow2", "write -P 1 0 64k")
    return ["ext.qcow2", "extraw.qcow2", "extmeta.qcow2"]


def _chains(d: Path) -> list[str]:
    create(d, "base-meta.qcow2", "8M", "-o", "preallocation=metadata")
    qio(d, "base-meta.qcow2", "write -P 1 0 1M")
    create(d, "top-meta.qcow2", "8M", "-b", "base-meta.qcow2", "-F", "qcow2")
    qio(d, "top-meta.qcow2", "write -P 2 512k 1M", "write -z 4M 64k")
    if not (d / "punched.qcow2").exists():
        _punched(d)
    create(d, "top-punched.qcow2", "8M", "-b", "punched.qcow2", "-F", "qcow2")
    qio(d, "top-punched.qcow2", "write -P 3 7M 64k")
    create(d, "sparse.raw", "4M", fmt="raw")
    qio(d, "sparse.raw", "write -P 1 1M 64k", fmt="raw")
    # backing files shorter than the layer above them, at the top and in the middle of a chain
    create(d, "top-raw.qcow2", "6M", "-b", "sparse.raw", "-F", "raw")
    qio(d, "top-raw.qcow2", "write -P 2 0 64k")
    create(d, "mid-raw.qcow2", "8M", "-b", "sparse.raw", "-F", "raw")
    qio(d, "mid-raw.qcow2", "write -P 3 7M 64k")
    create(d, "top-mid-raw.qcow2", "10M", "-b", "mid-raw.qcow2", "-F", "qcow2")
    create(d, "short-mid.qcow2", "4M", "-b", "base-meta.qcow2", "-F", "qcow2")
    qio(d, "short-mid.qcow2", "write -P 4 3M 64k")
    create(d, "top-long.qcow2", "8M", "-b", "short-mid.qcow2", "-F", "qcow2")
    qio(d, "top-long.qcow2", "write -P 5 6M 64k")
    create(d, "vbase.vmdk", "1M", fmt="vmdk")
    qio(d, "vbase.vmdk", "write -P 6 0 64k", fmt="vmdk")
    create(d, "vtop.vmdk", "2M", "-b", "vbase.vmdk", "-F", "vmdk", fmt="vmdk")
    qio(d, "vtop.vmdk", "write -P 7 1536k 64k", fmt="vmdk")
    return ["top-meta.qcow2", "top-punched.qcow2", "top-raw.qcow2", "top-mid-raw.qcow2", "top-long.qcow2",
            "sparse.raw", "vtop.vmdk"]


def _v2(d: Path) -> list[str]:
    create(d, "v2.qcow2", "4M", "-o", "compat=0.10")
    qio(d, "v2.qcow2", "write -P 1 0 1M")
    punch(d / "v2.qcow2", data_offsets(d, "v2.qcow2")[0] + 4 * KiB, 4 * KiB)
    create(d, "empty.qcow2", "0")
    return ["v2.qcow2", "empty.qcow2"]


BUILDERS: dict[str, Callable[[Path], list[str]]] = {
    "qemu-io": _plain, "punched": _punched, "punched-much": _punched_much,
    "refcount-widths": _refcount_widths, "preallocated": _prealloc,
    "extended-l2": _extended_l2, "compressed": _compressed, "data-file": _data_file,
    "backing-chain": _chains, "v2-and-empty": _v2,
}


def _fmt(name: str) -> str:
    return name.rsplit(".", 1)[1]


# -- map ------------------------------------------------------------------------------------------------

def _without_compressed(text: bytes) -> bytes:
    """qemu 10's map JSON less the "compressed" key it added: qemu 7.2's form otherwise."""
    return re.sub(rb', "compressed": (true|false)', b"", text)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_map_as_qemu_img(work: Path, kind: str) -> None:
    for name in BUILDERS[kind](work):
        fmt = ["-f", _fmt(name)]
        want = qimg(work, "map", "--output=json", *fmt, name)
        got = ours(work, "map", "--output=json", *fmt, name)
        assert (got.returncode, got.stdout, got.stderr) == (want.returncode, want.stdout, b""), name
        ten = subprocess.run([qemu10("qemu-img"), "map", "--output=json", *fmt, name], capture_output=True,
                             cwd=work, timeout=120)
        assert _without_compressed(ten.stdout) == got.stdout, name
        want, got = qimg(work, "map", *fmt, name), ours(work, "map", *fmt, name)
        assert (got.returncode, got.stdout) == (want.returncode, want.stdout), name
        if want.returncode:  # compressed clusters have no place in the human table
            assert got.stderr.decode().replace("imagecore: ", "qemu-img: ") == want.stderr.decode()


def test_detection_threshold(work: Path) -> None:
    """Punching ever more of the data away: qemu starts showing the holes once the file has allocated less
    than 9/10 of the clusters the refcounts claim; so does imagecore, at the same step."""
    create(work, "t.qcow2", "4M")
    qio(work, "t.qcow2", "write -P 1 0 4M")
    first = data_offsets(work, "t.qcow2")[0]
    seen = []
    done = 0
    for clusters in (0, 2, 4, 5, 6, 7, 8, 9, 10, 12, 16):
        if clusters > done:
            # each punched cluster keeps its first 4 KiB of data, so the map has a hole in each
            for c in range(done, clusters):
                punch(work / "t.qcow2", first + c * 64 * KiB + 4 * KiB, 60 * KiB)
            done = clusters
        want = qimg(work, "map", "--output=json", "t.qcow2")
        got = ours(work, "map", "--output=json", "t.qcow2")
        assert got.stdout == want.stdout, clusters
        seen.append(host_holes(work, "t.qcow2"))
    assert seen[0] is False and seen[-1] is True and seen == sorted(seen)


# -- NBD ------------------------------------------------------------------------------------------------

def _runs(cmd: list[str], cwd: Path) -> list[tuple[int, int, int]]:
    """nbdinfo --map --json as merged (offset, length, type) runs."""
    out: list[tuple[int, int, int]] = []
    for e in json.loads(subprocess.run(cmd, capture_output=True, check=True, cwd=cwd, timeout=120).stdout):
        if out and out[-1][2] == e["type"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], e["type"])
        else:
            out.append((e["offset"], e["length"], e["type"]))
    return out


def _holes(h: Any, size: int) -> list[tuple[int, int]]:
    """The ranges a structured read of the whole image answers with hole chunks, merged."""
    import nbd

    holes: list[tuple[int, int]] = []

    def chunk(buf: bytes, offset: int, status: int, err: list[int]) -> int:
        if status == nbd.READ_HOLE:
            holes.append((offset, len(buf)))
        return 0

    pos = 0
    while pos < size:
        n = min(size - pos, 16 * MiB)
        h.pread_structured(n, pos, chunk)
        pos += n
    holes.sort()
    merged: list[tuple[int, int]] = []
    for o, n in holes:
        if merged and merged[-1][0] + merged[-1][1] == o:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((o, n))
    return merged


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str], str]]:
    """Every image of every builder, each exported by one read-only nbdsrv under its name (built once for
    the tests that only read them)."""
    tmp_path = tmp_path_factory.mktemp("served")
    d = tmp_path / "img"
    d.mkdir()
    names: list[str] = []
    for build in BUILDERS.values():
        names += [n for n in build(d) if n not in names and n != "empty.qcow2"]
    sock = str(tmp_path / "nbd.sock")
    args = [sys.executable, "-m", "nbdsrv", "serve", "--listen", f"unix:{sock}", "--read-only"]
    for n in names:
        args += ["--image", str(d / n), "--name", n, "--format", _fmt(n)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    with open(tmp_path / "srv.log", "wb") as log:
        srv = subprocess.Popen(args, stdout=log, stderr=log, env=env)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            assert srv.poll() is None and time.monotonic() < deadline, (tmp_path / "srv.log").read_text()
            time.sleep(0.05)
        yield d, names, sock
    finally:
        srv.terminate()
        srv.wait(20)
    assert "Traceback" not in (tmp_path / "srv.log").read_text()


@pytest.mark.parametrize("ctx", ["base:allocation", "qemu:allocation-depth"])
def test_nbd_block_status_as_qemu_nbd(served: tuple[Path, list[str], str], ctx: str) -> None:
    d, names, sock = served
    nbdinfo = peer("nbdinfo")
    for n in names:
        got = _runs([nbdinfo, "--json", f"--map={ctx}", f"nbd+unix:///{n}?socket={sock}"], d)
        for qemu_nbd in (peer("qemu-nbd"), qemu10("qemu-nbd")):
            want = _runs([nbdinfo, "--json", f"--map={ctx}", "--",
                          "[", qemu_nbd, "-r", "-A", "-f", _fmt(n), n, "]"], d)
            assert got == want, (n, qemu_nbd)


def test_sparse_reads_as_qemu_nbd(served: tuple[Path, list[str], str]) -> None:
    """A structured read answers with hole chunks exactly where qemu-nbd does (where block status says
    zero), whatever the host file holds under a data cluster."""
    import nbd

    d, names, sock = served
    for n in names:
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///{n}?socket={sock}")
        size = h.get_size()
        got = _holes(h, size)
        h.shutdown()
        q = nbd.NBD()
        # in the images' folder: qemu-nbd opens a data file relative to its working directory
        q.connect_systemd_socket_activation(["env", "-C", str(d), peer("qemu-nbd"), "-r", "-f", _fmt(n), n])
        want = _holes(q, size)
        q.shutdown()
        assert got == want, n


# -- the verbs that act on block status -----------------------------------------------------------------

def _layout(d: Path, img: str, fmt: str) -> list[dict[str, Any]]:
    """A target's map without host offsets, merged again (the tools may place clusters in other orders)."""
    out: list[dict[str, Any]] = []
    for e in json.loads(qimg(d, "map", "--output=json", "-f", fmt, img).stdout):
        e.pop("offset", None)
        if out and all(out[-1][k] == e[k] for k in ("depth", "present", "zero", "data")):
            out[-1]["length"] += e["length"]
        else:
            out.append(e)
    return out


@pytest.mark.parametrize("kind", ["punched", "punched-much", "preallocated"])
def test_convert_as_sparse_as_qemu_img(work: Path, kind: str) -> None:
    for name in BUILDERS[kind](work):
        for fmt in ("qcow2", "raw"):
            for extra in ([], ["-S", "0"]):
                a, b = f"q-{name}.{fmt}", f"o-{name}.{fmt}"
                assert qimg(work, "convert", *extra, "-O", fmt, name, a).returncode == 0
                got = ours(work, "convert", *extra, "-O", fmt, name, b)
                assert got.returncode == 0, got.stderr
                assert _layout(work, b, fmt) == _layout(work, a, fmt), (name, fmt, extra)
                assert qimg(work, "compare", "-f", fmt, "-F", fmt, a, b).returncode == 0
                os.unlink(work / a)
                os.unlink(work / b)


def test_compare_strict_and_measure_as_qemu_img(work: Path) -> None:
    names = [*_plain(work), *_punched(work), *_punched_much(work), *_prealloc(work)]
    for a in names:
        for b in dict.fromkeys([*names[:3], "pre-metadata.qcow2", a]):
            want, got = qimg(work, "compare", "-s", a, b), ours(work, "compare", "-s", a, b)
            assert (got.returncode, got.stdout) == (want.returncode, want.stdout), (a, b)
        want, got = qimg(work, "measure", "--output=json", "-O", "qcow2", a), \
            ours(work, "measure", "--output=json", "-O", "qcow2", a)
        assert got.stdout == want.stdout, a


def test_unreadable_refcount_block_leaves_the_file_out(work: Path) -> None:
    """A refcount table entry no consistent image has (an unaligned refcount block) ends qemu's
    metadata-preallocation test with an error, taken for no: the map is the one without host holes."""
    create(work, "rc.qcow2", "4M")
    qio(work, "rc.qcow2", "write -P 1 0 2M")
    punch(work / "rc.qcow2", data_offsets(work, "rc.qcow2")[0] + 4 * KiB, 1 * MiB)
    assert host_holes(work, "rc.qcow2")
    with open(work / "rc.qcow2", "r+b") as f:
        reftable = int.from_bytes(f.read(56)[48:56], "big")
        f.seek(reftable)
        entry = int.from_bytes(f.read(8), "big")
        f.seek(reftable)
        f.write((entry + 512).to_bytes(8, "big"))
    want, got = qimg(work, "map", "--output=json", "rc.qcow2"), ours(work, "map", "--output=json", "rc.qcow2")
    assert (got.returncode, got.stdout) == (want.returncode, want.stdout) and want.returncode == 0
    assert not host_holes(work, "rc.qcow2")
