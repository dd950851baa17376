"""vhdx against qemu-img 7.2: images each tool makes read back the same through the other, info/map/check
JSON and create's messages are qemu-img's, a dirty log replays as qemu replays it, and damaged images are
refused in qemu-img's words."""

from __future__ import annotations

import asyncio
import errno
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from imagecore.errors import BlockError
from imagecore.formats.vhdx.driver import VhdxDriver
from imagecore.formats.vhdx.layout import (
    HEADER1_OFFSET,
    HEADER2_OFFSET,
    Header,
    LogHeader,
    MiB,
    checksum,
    set_checksum,
)
from tests.doubles.faults import FaultOpener, FaultPlan
from tests.peers import imagecore_cmd, peer, run

OPTION_SETS = ["", "subformat=fixed", "subformat=fixed,block_state_zero=off", "block_state_zero=off",
               "block_size=1M,log_size=2M", "block_size=32M", "log_size=1500K,block_size=1500K"]


def ours(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*imagecore_cmd(), *map(str, args)], capture_output=True, timeout=120)


def qemu(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([peer("qemu-img"), *map(str, args)], capture_output=True, timeout=120)


def qemu_io(img: Path, *cmds: str) -> None:
    args: list[str] = []
    for c in cmds:
        args += ["-c", c]
    run(peer("qemu-io"), "-f", "vhdx", *args, img)


def same_error(a: subprocess.CompletedProcess[bytes], q: subprocess.CompletedProcess[bytes]) -> None:
    """imagecore's exit code and stderr are qemu-img's, the program name aside."""
    text = a.stderr.decode()
    assert "Traceback" not in text
    assert a.returncode == q.returncode, (text, q.stderr)
    assert text.replace("imagecore: ", "qemu-img: ") == q.stderr.decode(), (text, q.stderr)
    assert a.stdout == q.stdout


def info(proc: subprocess.CompletedProcess[bytes]) -> dict[str, object]:
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def with_data(tmp: Path, name: str, opts: str, size: str = "40M") -> Path:
    img = tmp / name
    run(peer("qemu-img"), "create", "-q", "-f", "vhdx", *(["-o", opts] if opts else []), img, size)
    qemu_io(img, "write -P 0x5a 100k 300k", "write -P 0xc3 9M 1M", "write -z 20M 64k",
            "write -P 0x11 39M 1M")
    return img


@pytest.mark.parametrize("opts", OPTION_SETS)
def test_qemu_made_images_read_back_identical_with_qemu_info_map_check(tmp_path: Path, opts: str) -> None:
    img = with_data(tmp_path, "q.vhdx", opts)
    run(*imagecore_cmd(), "convert", "-O", "raw", img, tmp_path / "ours.raw")
    run(peer("qemu-img"), "convert", "-O", "raw", img, tmp_path / "theirs.raw")
    assert (tmp_path / "ours.raw").read_bytes() == (tmp_path / "theirs.raw").read_bytes()
    for verb in (["info", "--output=json"], ["map", "--output=json"], ["check", "--output=json"], ["map"]):
        # (the human map fails in both: qemu's vhdx has no host offsets to show)
        same_error(ours(*verb, img), qemu(*verb, img))


@pytest.mark.parametrize("opts", OPTION_SETS)
def test_imagecore_made_images_are_laid_out_as_qemu_lays_them(tmp_path: Path, opts: str) -> None:
    a = ours("create", "-f", "vhdx", *(["-o", opts] if opts else []), tmp_path / "a.vhdx", "40M")
    q = qemu("create", "-f", "vhdx", *(["-o", opts] if opts else []), tmp_path / "q.vhdx", "40M")
    assert a.returncode == q.returncode == 0, a.stderr
    assert a.stdout.replace(b"a.vhdx", b"q.vhdx") == q.stdout
    run(peer("qemu-img"), "check", tmp_path / "a.vhdx")
    ia = info(qemu("info", "--output=json", tmp_path / "a.vhdx"))
    iq = info(qemu("info", "--output=json", tmp_path / "q.vhdx"))
    ia.pop("filename"), iq.pop("filename")
    assert ia == iq
    mine, theirs = (tmp_path / "a.vhdx").read_bytes(), (tmp_path / "q.vhdx").read_bytes()
    assert len(mine) == len(theirs)
    # region tables, log, BAT and metadata table are byte for byte qemu's; only the GUIDs (header and
    # page 83) and the sequence numbers are random
    assert mine[3 * 65536:5 * 65536] == theirs[3 * 65536:5 * 65536]
    meta = struct.unpack_from("<Q", mine, 3 * 65536 + 16 + 32 + 16)[0]
    assert mine[MiB:meta + 65536 + 16] == theirs[MiB:meta + 65536 + 16]
    assert mine[meta + 65536 + 32:] == theirs[meta + 65536 + 32:]


@pytest.mark.parametrize("opts", ["", "subformat=fixed", "block_state_zero=off,block_size=1M"])
def test_convert_both_ways_compare_equal(tmp_path: Path, opts: str) -> None:
    src = with_data(tmp_path, "src.vhdx", "")
    raw = tmp_path / "src.raw"
    run(peer("qemu-img"), "convert", "-O", "raw", src, raw)
    made = tmp_path / "made.vhdx"
    run(*imagecore_cmd(), "convert", "-O", "vhdx", *(["-o", opts] if opts else []), raw, made)
    run(peer("qemu-img"), "check", made)
    run(peer("qemu-img"), "compare", raw, made)
    back = tmp_path / "back.qcow2"
    run(*imagecore_cmd(), "convert", "-O", "qcow2", made, back)
    run(peer("qemu-img"), "compare", raw, back)
    # qemu-img's own convert to vhdx reads the same through imagecore
    theirs = tmp_path / "theirs.vhdx"
    run(peer("qemu-img"), "convert", "-O", "vhdx", *(["-o", opts] if opts else []), raw, theirs)
    run(*imagecore_cmd(), "compare", raw, theirs)
    m_a = ours("measure", "-O", "qcow2", made)
    m_q = qemu("measure", "-O", "qcow2", made)
    assert m_a.returncode == m_q.returncode == 0 and m_a.stdout == m_q.stdout


@pytest.mark.parametrize("opts,size", [
    ("block_size=3M", "1M"), ("log_size=5G", "1M"), ("subformat=foo", "1M"), ("", "65T"),
    ("block_state_zero=maybe", "1M"), ("log_size=0", "1M"), ("block_size=512M", "1M"),
    ("log_size=1500K,block_size=100K", "1001"), ("", "0"),
])
def test_create_messages_and_results_are_qemu_imgs(tmp_path: Path, opts: str, size: str) -> None:
    extra = ["-o", opts] if opts else []
    a = ours("create", "-f", "vhdx", *extra, tmp_path / "x.vhdx", size)
    q = qemu("create", "-f", "vhdx", *extra, tmp_path / "y.vhdx", size)
    assert a.returncode == q.returncode, (a.stderr, q.stderr)
    assert a.stdout.replace(b"x.vhdx", b"y.vhdx") == q.stdout
    assert a.stderr.decode().replace("imagecore: ", "qemu-img: ").replace("x.vhdx", "y.vhdx") == \
        q.stderr.decode()
    if a.returncode == 0:
        ia = info(qemu("info", "--output=json", tmp_path / "x.vhdx"))
        iq = info(qemu("info", "--output=json", tmp_path / "y.vhdx"))
        for d in (ia, iq):
            d.pop("filename")
        assert ia == iq


def test_backing_file_is_refused_as_qemu_refuses_it(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    run(peer("qemu-img"), "create", "-q", "-f", "vhdx", base, "1M")
    a = ours("create", "-f", "vhdx", "-b", base, "-F", "vhdx", tmp_path / "x.vhdx")
    q = qemu("create", "-f", "vhdx", "-b", base, "-F", "vhdx", tmp_path / "x.vhdx")
    assert a.returncode == q.returncode == 1
    assert a.stderr.decode().replace("imagecore: ", "qemu-img: ") == q.stderr.decode()


# -- the log ----------------------------------------------------------------------------------------

def _active(data: bytes) -> int:
    h1 = Header.parse(data[HEADER1_OFFSET:HEADER1_OFFSET + 80])
    h2 = Header.parse(data[HEADER2_OFFSET:HEADER2_OFFSET + 80])
    return HEADER1_OFFSET if h1.sequence > h2.sequence else HEADER2_OFFSET


def dirty_by_editing(img: Path) -> None:
    """Make the log of a qemu-written image dirty again: the active header names the last entry's log GUID
    and the BAT entry that entry wrote is put back as it was before (a ZERO block)."""
    data = bytearray(img.read_bytes())
    last = None
    for at in range(MiB, 2 * MiB, 4096):
        if data[at:at + 4] == b"loge":
            last = LogHeader.parse(data[at:at + 64])
    assert last is not None
    act = _active(bytes(data))
    hdr = Header.parse(bytes(data[act:act + 80]))
    hdr.log_guid = last.log_guid
    data[act:act + 4096] = hdr.block(bytes(data[act:act + 4096]))
    struct.pack_into("<Q", data, 2 * MiB + 16, 2)  # block 2's entry, as the block was before the write
    img.write_bytes(data)


def dirty_by_crash(img: Path) -> None:
    """Write to an unallocated block through imagecore and lose power right after its log entry is
    durable: the in-place BAT write, and everything after it, never reach the file."""

    async def go() -> None:
        plan = FaultPlan()
        drv = await FaultOpener(plan).open(str(img), "vhdx", read_only=False)
        assert isinstance(drv, VhdxDriver)
        check = plan.check
        seen = {"log": False, "dead": False}
        assert drv.log is not None
        log0, log1 = drv.log.state.offset, drv.log.state.offset + drv.log.state.length

        def power(kind: str, path: str, offset: int, length: int) -> None:
            if kind == "write" and log0 <= offset < log1:
                seen["log"] = True
            if kind == "write" and seen["log"] and drv.bat_offset <= offset < drv.bat_offset + drv.bat_length:
                seen["dead"] = True
            if seen["dead"] and kind in ("write", "sync", "truncate"):
                raise OSError(errno.EIO, "power lost")
            check(kind, path, offset, length)

        plan.check = power  # type: ignore[method-assign]
        with pytest.raises(BlockError):
            await drv.write(30 * MiB, memoryview(b"\xab" * 70000))
        assert seen["dead"]
        drv.hf.close()

    asyncio.run(go())


@pytest.mark.parametrize("how", ["edited", "crashed"])
def test_dirty_log_replays_as_qemu_replays_it(tmp_path: Path, how: str) -> None:
    img = tmp_path / "d.vhdx"
    run(peer("qemu-img"), "create", "-q", "-f", "vhdx", img, "64M")
    qemu_io(img, "write -P 0x11 100k 1M", "write -P 0x22 17M 4k")
    if how == "edited":
        dirty_by_editing(img)
    else:
        dirty_by_crash(img)
    # read-only opens refuse it, in qemu's words
    for verb in (["info"], ["check"], ["map"], ["convert", "-O", "raw", img, tmp_path / "no.raw"]):
        args = verb if verb[0] == "convert" else [*verb, img]
        same_error(ours(*args), qemu(*args))
    a, q = tmp_path / "a.vhdx", tmp_path / "q.vhdx"
    shutil.copy(img, a)
    shutil.copy(img, q)
    ra, rq = ours("check", "-r", "all", a), qemu("check", "-r", "all", q)
    assert ra.returncode == rq.returncode == 0, ra.stderr
    assert ra.stdout == rq.stdout and b"1 corruptions" in ra.stdout
    run(*imagecore_cmd(), "convert", "-O", "raw", a, tmp_path / "a.raw")
    run(peer("qemu-img"), "convert", "-O", "raw", q, tmp_path / "q.raw")
    assert (tmp_path / "a.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()
    # the replay wrote the same bytes: the files differ only in their headers' GUIDs and checksums
    da, dq = a.read_bytes(), q.read_bytes()
    assert len(da) == len(dq)
    assert da[:HEADER1_OFFSET] == dq[:HEADER1_OFFSET] and da[3 * 65536:] == dq[3 * 65536:]
    run(peer("qemu-img"), "check", a)
    if how == "crashed":
        data = (tmp_path / "a.raw").read_bytes()
        assert data[30 * MiB:30 * MiB + 70000] == b"\xab" * 70000
    # an image whose log imagecore replays (a read-write open) is clean for qemu
    b = tmp_path / "b.vhdx"
    shutil.copy(img, b)
    run(*imagecore_cmd(), "convert", "-n", "-O", "vhdx", tmp_path / "q.raw", b)
    run(peer("qemu-img"), "check", b)
    run(peer("qemu-img"), "compare", b, tmp_path / "q.raw")


# -- damaged images ---------------------------------------------------------------------------------

def _patch(data: bytearray, at: int, value: bytes) -> None:
    data[at:at + len(value)] = value


def _fix_region(data: bytearray) -> None:
    buf = bytearray(data[3 * 65536:4 * 65536])
    set_checksum(buf)
    data[3 * 65536:4 * 65536] = buf


def _header_edit(data: bytearray, **fields: object) -> None:
    for at in (HEADER1_OFFSET, HEADER2_OFFSET):
        hdr = Header.parse(bytes(data[at:at + 80]))
        for k, v in fields.items():
            setattr(hdr, k, v)
        data[at:at + 4096] = hdr.block(bytes(data[at:at + 4096]))


RT = 3 * 65536
META = 3 * MiB


def _damage(name: str, data: bytearray) -> bytearray:
    if name == "signature":
        _patch(data, 0, b"vhdxfilf")
    elif name == "both-header-crcs":
        _patch(data, HEADER1_OFFSET + 4, b"\1\2\3\4")
        _patch(data, HEADER2_OFFSET + 4, b"\1\2\3\4")
    elif name == "one-header-crc":
        _patch(data, HEADER2_OFFSET + 4, b"\1\2\3\4")
    elif name == "equal-sequences":
        _header_edit(data, sequence=7)
        h1 = HEADER1_OFFSET
        hdr = Header.parse(bytes(data[h1:h1 + 80]))
        hdr.data_write_guid = bytes(range(16))
        data[h1:h1 + 4096] = hdr.block(bytes(data[h1:h1 + 4096]))
    elif name == "identical-headers":  # as Disk2VHD writes them: not corrupt
        data[HEADER2_OFFSET:HEADER2_OFFSET + 4096] = data[HEADER1_OFFSET:HEADER1_OFFSET + 4096]
    elif name == "log-offset":
        _header_edit(data, log_offset=12345)
    elif name == "log-version":
        _header_edit(data, log_version=1)
    elif name == "log-length-odd":
        _header_edit(data, log_guid=b"x" * 16, log_length=MiB + 4096)
    elif name == "log-guid-no-entries":
        _header_edit(data, log_guid=b"y" * 16)
    elif name == "region-crc":
        _patch(data, RT + 4, b"\0\0\0\0")
    elif name == "region-count":
        struct.pack_into("<I", data, RT + 8, 5000)
        _fix_region(data)
    elif name == "region-overlap":
        struct.pack_into("<Q", data, RT + 16 + 32 + 16, MiB)  # the BAT over the log
        _fix_region(data)
    elif name == "regions-overlap-each-other":
        struct.pack_into("<Q", data, RT + 16 + 64 + 16, 2 * MiB)  # metadata over the BAT
        _fix_region(data)
    elif name == "region-required-unknown":
        struct.pack_into("<I", data, RT + 8, 3)
        struct.pack_into("<16sQII", data, RT + 16 + 64, b"z" * 16, 50 * MiB, MiB, 1)
        _fix_region(data)
    elif name == "bat-absurd":
        struct.pack_into("<QI", data, RT + 16 + 16, 2 * MiB, 0xFFF00000)  # a 4 GiB BAT in a small file
        _fix_region(data)
    elif name == "bat-too-small":
        struct.pack_into("<I", data, RT + 16 + 24, 8)
        _fix_region(data)
    elif name == "metadata-signature":
        _patch(data, META, b"metadatX")
    elif name == "metadata-count":
        struct.pack_into("<H", data, META + 10, 4000)
    elif name == "metadata-missing-item":
        struct.pack_into("<H", data, META + 10, 4)
    elif name == "metadata-duplicate":
        _patch(data, META + 32 + 32, bytes(data[META + 32:META + 48]))
    elif name == "block-size-zero":
        struct.pack_into("<I", data, META + 65536, 0)
    elif name == "block-size-odd":
        struct.pack_into("<I", data, META + 65536, 3 * MiB)
    elif name == "logical-sector-4k":
        struct.pack_into("<I", data, META + 65536 + 32, 4096)
    elif name == "logical-sector-odd":
        struct.pack_into("<I", data, META + 65536 + 32, 1000)
    elif name == "has-parent":
        struct.pack_into("<I", data, META + 65536 + 4, 2)
    elif name == "virtual-size-huge":
        struct.pack_into("<Q", data, META + 65536 + 8, 1 << 62)
    elif name == "bat-past-eof":
        struct.pack_into("<Q", data, 2 * MiB + 8, (900 * MiB) | 6)
    elif name == "bat-over-metadata":
        struct.pack_into("<Q", data, 2 * MiB + 8, (3 * MiB) | 6)
    elif name == "bat-partially-present":
        struct.pack_into("<Q", data, 2 * MiB + 8, 7)
    elif name == "truncated-header":
        del data[100000:]
    elif name == "truncated-metadata":
        del data[3 * MiB + 1000:]
    return data


DAMAGES = ["signature", "both-header-crcs", "one-header-crc", "identical-headers", "equal-sequences",
           "log-offset", "log-version", "log-length-odd", "log-guid-no-entries", "region-crc", "region-count",
           "region-overlap",
           "regions-overlap-each-other", "region-required-unknown", "bat-absurd", "bat-too-small",
           "metadata-signature", "metadata-count", "metadata-missing-item", "metadata-duplicate",
           "block-size-zero", "block-size-odd", "logical-sector-4k", "logical-sector-odd", "has-parent",
           "virtual-size-huge", "bat-past-eof", "bat-over-metadata", "bat-partially-present",
           "truncated-header", "truncated-metadata"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_images_are_refused_in_qemu_imgs_words(tmp_path: Path, damage: str) -> None:
    img = tmp_path / "h.vhdx"
    run(peer("qemu-img"), "create", "-q", "-f", "vhdx", img, "16M")
    qemu_io(img, "write -P 0x33 0 64k")
    img.write_bytes(bytes(_damage(damage, bytearray(img.read_bytes()))))
    for verb in (["info", "--output=json"], ["check"], ["map", "--output=json"]):
        same_error(ours(*verb, img), qemu(*verb, img))
    a = ours("convert", "-O", "raw", img, tmp_path / "a.raw")
    q = qemu("convert", "-O", "raw", img, tmp_path / "q.raw")
    assert a.returncode == q.returncode, (a.stderr, q.stderr)
    assert b"Traceback" not in a.stderr
    if a.returncode == 0:
        assert (tmp_path / "a.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()


def test_checksum_helper_matches_qemu_images(tmp_path: Path) -> None:
    img = tmp_path / "c.vhdx"
    run(peer("qemu-img"), "create", "-q", "-f", "vhdx", img, "1M")
    data = img.read_bytes()
    for at, n in ((HEADER1_OFFSET, 4096), (HEADER2_OFFSET, 4096), (RT, 65536)):
        assert checksum(data[at:at + n]) == struct.unpack_from("<I", data, at + 4)[0]


@pytest.mark.parametrize("where", ["dir", "missing/x.vhdx"])
def test_create_where_no_file_can_be_made(tmp_path: Path, where: str) -> None:
    (tmp_path / "dir").mkdir()
    target = tmp_path / where
    same_error(ours("create", "-f", "vhdx", target, "1M"), qemu("create", "-f", "vhdx", target, "1M"))
