"""Hostile qcow2 headers, differential: the header fields of an image qemu-img made are edited one or several
at a time, and every verb refuses the result with qemu-img 7.2's exact stderr and exit code (the check that
qemu's qcow2_do_open makes first wins when several apply), or accepts it as qemu-img does."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from tests.peers import imagecore_cmd, peer, run

Edit = tuple[int, ...] | tuple[int, str, int] | tuple[int, str, int, int]

# (offset, struct format, value) edits of the header of a 4 MiB image with one 64 KiB cluster written
CASES: dict[str, list[Edit]] = {
    "magic": [(0, ">I", 0x12345678)],
    "version 4": [(4, ">I", 4)],
    "cluster bits 8": [(20, ">I", 8)],
    "cluster bits 22": [(20, ">I", 22)],
    "header length 100": [(100, ">I", 100)],
    "header length past cluster": [(100, ">I", 70000)],
    "backing offset past cluster": [(8, ">Q", 65537), (16, ">I", 4)],
    "backing name too long": [(8, ">Q", 512), (16, ">I", 1024)],
    "backing name past cluster end": [(8, ">Q", 65530), (16, ">I", 100)],
    "backing name of NULs": [(8, ">Q", 512), (16, ">I", 1023)],
    "compression type 7": [(100, ">I", 112), (104, ">B", 7)],
    "zstd without its bit": [(100, ">I", 112), (104, ">B", 1)],
    "compression bit with zlib": [(72, ">Q", 8)],
    "unknown incompatible features": [(72, ">Q", (1 << 20) | (1 << 33))],
    "extended L2 with 4 KiB clusters": [(72, ">Q", 16), (20, ">I", 12)],
    "refcount order 7": [(96, ">I", 7)],
    "unknown encryption": [(32, ">I", 9)],
    "AES encryption": [(32, ">I", 1)],
    "no refcount table": [(56, ">I", 0)],
    "refcount table too large": [(56, ">I", 129)],
    "refcount table unaligned": [(48, ">Q", 0x10001)],
    "refcount table at the end of int64": [(48, ">Q", (1 << 63) - 65536)],
    "too many snapshots": [(60, ">I", 65537)],
    "snapshot table unaligned": [(64, ">Q", 0x1234)],
    "L1 too large": [(36, ">I", 4194305)],
    "L1 unaligned": [(40, ">Q", 0x30001)],
    "L1 at the end of int64": [(40, ">Q", (1 << 63) - 65536)],
    "L1 too small": [(36, ">I", 0)],
    "size too big": [(24, ">Q", 1 << 62)],
    "size near 2^64": [(24, ">Q", (1 << 64) - 1)],
    "data file bit without a name": [(72, ">Q", 4)],
    "raw data without a data file": [(88, ">Q", 2)],
    "extension too large": [(112, ">II", 0x12345678, 0xFFFFFF)],
    "backing format name of 16 bytes": [(112, ">II", 0xE2792ACA, 16)],
    "bitmaps extension of 8 bytes": [(112, ">II", 0x23852875, 8)],
    # several problems: qemu's first check wins
    "version, cluster bits and refcount table": [(4, ">I", 3), (20, ">I", 40), (48, ">Q", 1)],
    "no refcount table and L1 too large": [(56, ">I", 0), (36, ">I", 0xFFFFFFFF)],
    "refcount table and snapshots unaligned": [(48, ">Q", 0x10001), (64, ">Q", 0x1234)],
    "snapshots and L1 unaligned": [(64, ">Q", 0x1234), (40, ">Q", 0x30001)],
    "compression bit and unknown feature": [(72, ">Q", 8 | 1 << 20)],
    "L1 too small and refcount order": [(36, ">I", 0), (96, ">I", 7)],
}

# the verbs that open the image with other flags than info (no I/O) and check (BDRV_O_CHECK): a read-only
# and a read-write open, a write of the file alone, and the snapshot table's reader
OTHER_VERBS = {
    "map": ["map", "x.qcow2"],
    "convert": ["convert", "-O", "raw", "x.qcow2", "out.raw"],
    "resize": ["resize", "x.qcow2", "8M"],
    "snapshot": ["snapshot", "-l", "x.qcow2"],
    "amend": ["amend", "-o", "lazy_refcounts=on", "x.qcow2"],
}
OTHER_CASES = ["backing offset past cluster", "zstd without its bit", "no refcount table",
               "snapshot table unaligned", "L1 unaligned", "data file bit without a name",
               "raw data without a data file", "extension too large", "AES encryption"]

_WRITTEN: dict[str, bytes] = {}


def _image(work: Path, edits: list[Edit]) -> bytes:
    if "good" not in _WRITTEN:
        good = work / "good.qcow2"
        run(peer("qemu-img"), "create", "-q", "-f", "qcow2", good, "4M")
        run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 1 0 64k", good)
        _WRITTEN["good"] = good.read_bytes()
    data = bytearray(_WRITTEN["good"])
    assert struct.unpack_from(">I", data, 100)[0] == 112  # the extensions start at 112
    for offset, fmt, *values in edits:
        assert isinstance(offset, int) and isinstance(fmt, str)
        struct.pack_into(fmt, data, offset, *values)
    return bytes(data)


def _both(work: Path, image: bytes, args: list[str]) -> None:
    results = []
    for name, cmd in (("qemu", [peer("qemu-img")]), ("ours", imagecore_cmd())):
        d = work / name
        d.mkdir(exist_ok=True)
        (d / "x.qcow2").write_bytes(image)
        (d / "out.raw").unlink(missing_ok=True)
        p = subprocess.run([*cmd, *args], capture_output=True, cwd=d, timeout=120)
        assert b"Traceback" not in p.stderr, p.stderr
        results.append((p.returncode, p.stderr.replace(b"imagecore: ", b"qemu-img: "),
                        p.stdout if p.returncode == 0 else b""))
    assert results[1] == results[0]


@pytest.mark.parametrize("verb", ["info", "check"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_header_refusals_as_qemu_img(work: Path, case: str, verb: str) -> None:
    image = _image(work, CASES[case])
    _both(work, image, [verb, "x.qcow2"])


@pytest.mark.parametrize("verb", sorted(OTHER_VERBS))
@pytest.mark.parametrize("case", OTHER_CASES)
def test_header_refusals_of_other_verbs(work: Path, case: str, verb: str) -> None:
    _both(work, _image(work, CASES[case]), OTHER_VERBS[verb])


def _with_second_backing_format(image: bytes, fmt: bytes) -> bytes:
    """The image with a second backing-format extension after the others (as qemu's iotest 114 makes with
    qcow2.py add-header-ext); the backing file name moves to 4 KiB to make room."""
    data = bytearray(image)
    bf_off, bf_len = struct.unpack_from(">QI", data, 8)
    name = bytes(data[bf_off:bf_off + bf_len])
    exts, pos = [], 112
    while True:
        etype, elen = struct.unpack_from(">II", data, pos)
        if etype == 0:
            break
        exts.append((etype, bytes(data[pos + 8:pos + 8 + elen])))
        pos += 8 + (elen + 7) // 8 * 8
    exts.append((0xE2792ACA, fmt))
    area = b"".join(struct.pack(">II", t, len(d)) + d + b"\0" * (-len(d) % 8) for t, d in exts)
    area += b"\0" * 8
    assert 112 + len(area) <= 4096
    data[112:4096 + 1024] = area + b"\0" * (4096 + 1024 - 112 - len(area))
    data[4096:4096 + len(name)] = name
    struct.pack_into(">Q", data, 8, 4096)
    return bytes(data)


@pytest.mark.parametrize("args", [["info", "x.qcow2"], ["info", "--output=json", "x.qcow2"],
                                  ["check", "x.qcow2"], ["map", "x.qcow2"]], ids=lambda a: " ".join(a))
def test_the_last_of_two_backing_format_extensions_wins(work: Path, args: list[str]) -> None:
    """qemu reads the header extensions in order and the last one of a type replaces the ones before."""
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", work / "base.qcow2", "4M")
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        work / "top.qcow2", "4M")
    image = _with_second_backing_format((work / "top.qcow2").read_bytes(), b"foo")
    for name in ("qemu", "ours"):
        (work / name).mkdir(exist_ok=True)
        (work / name / "base.qcow2").write_bytes((work / "base.qcow2").read_bytes())
    _both(work, image, args)
    if args[:2] == ["info", "x.qcow2"]:
        shown = subprocess.run([*imagecore_cmd(), *args], capture_output=True, cwd=work / "ours", check=True)
        assert b"backing file format: foo\n" in shown.stdout


def _extensions(image: bytes) -> list[tuple[int, bytes]]:
    exts, pos = [], 112
    while True:
        etype, elen = struct.unpack_from(">II", image, pos)
        if etype == 0:
            return exts
        exts.append((etype, image[pos + 8:pos + 8 + elen]))
        pos += 8 + (elen + 7) // 8 * 8


def _with_extensions(image: bytes, exts: list[tuple[int, bytes]], incompatible: int) -> bytes:
    """``image`` (without a backing file) with these header extensions and incompatible feature bits."""
    data = bytearray(image)
    area = b"".join(struct.pack(">II", t, len(d)) + d + b"\0" * (-len(d) % 8) for t, d in exts) + b"\0" * 8
    assert 112 + len(area) <= 4096
    data[112:4096] = area + b"\0" * (4096 - 112 - len(area))
    struct.pack_into(">Q", data, 72, incompatible)
    return bytes(data)


FEATURES = 0x6803F857
SHORT_TABLE = b"\x00\x3fTest feature"  # one entry of 14 bytes, as qemu's iotest 036 writes it


@pytest.mark.parametrize("tables", ["short", "own then short", "short then own", "none"])
@pytest.mark.parametrize("verb", ["info", "check"])
def test_unknown_features_named_as_qemu_names_them(work: Path, tables: str, verb: str) -> None:
    """The refusal names unknown incompatible bits from the image's feature table: qemu reads a table
    shorter than an entry as if zero-padded, and of two tables the last one."""
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", work / "f.qcow2", "1M")
    image = (work / "f.qcow2").read_bytes()
    own = [e for e in _extensions(image) if e[0] == FEATURES]
    assert own, "qemu-img writes a feature table"
    exts = {"short": [(FEATURES, SHORT_TABLE)], "own then short": [*own, (FEATURES, SHORT_TABLE)],
            "short then own": [(FEATURES, SHORT_TABLE), *own], "none": []}[tables]
    _both(work, _with_extensions(image, exts, (1 << 63) | (1 << 62)), [verb, "x.qcow2"])


@pytest.mark.parametrize("args", [["check"], ["check", "-r", "leaks"], ["check", "-r", "all"]],
                         ids=lambda a: " ".join(a))
def test_unknown_autoclear_bits_go_on_a_writable_open(work: Path, args: list[str]) -> None:
    """qemu clears the autoclear bits it does not know whenever it opens an image writable, a repairing
    check included (qemu's iotest 036); a read-only check leaves them."""
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", work / "a.qcow2", "1M")
    image = bytearray((work / "a.qcow2").read_bytes())
    struct.pack_into(">Q", image, 88, (1 << 63) | (1 << 5))
    results = []
    for name, cmd in (("qemu", [peer("qemu-img")]), ("ours", imagecore_cmd())):
        d = work / name
        d.mkdir()
        (d / "x.qcow2").write_bytes(bytes(image))
        p = subprocess.run([*cmd, *args, "x.qcow2"], capture_output=True, cwd=d, timeout=120)
        results.append((p.returncode, p.stdout, p.stderr, (d / "x.qcow2").read_bytes()))
    assert results[1] == results[0]
    autoclear = struct.unpack_from(">Q", results[0][3], 88)[0]
    assert autoclear == (0 if "-r" in args else (1 << 63) | (1 << 5))
