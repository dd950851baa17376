"""The vhdx driver on its own: BAT indices past the sector bitmap entries, concurrent allocation, and
hostile logs (absurd lengths and counts, zero runs past the file) refused in bounded time and memory."""

from __future__ import annotations

import asyncio
import resource
import struct
import time
from pathlib import Path

import pytest

from imagecore.driver import ImageOpener
from imagecore.errors import BlockError
from imagecore.formats.vhdx.create import create_vhdx
from imagecore.formats.vhdx.driver import VhdxDriver
from imagecore.formats.vhdx.layout import (
    DESC_SIGNATURE,
    HEADER1_OFFSET,
    HEADER2_OFFSET,
    LOG_SECTOR,
    ZERO_SIGNATURE,
    Header,
    LogDescriptor,
    LogHeader,
    MiB,
    checksum,
    crc32c,
    data_sector,
)
from tests.peers import peer, run


def test_crc32c_is_castagnoli() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"6789", crc32c(b"12345")) == 0xE3069283


async def _open(path: Path, read_only: bool = False) -> VhdxDriver:
    drv = await ImageOpener().open(str(path), "vhdx", read_only=read_only)
    assert isinstance(drv, VhdxDriver)
    return drv


def test_blocks_past_a_sector_bitmap_entry(tmp_path: Path) -> None:
    """With 1 MiB blocks a bitmap entry follows every 4096 payload entries: blocks beyond it are found
    one entry further on, as qemu finds them."""
    img = tmp_path / "big.vhdx"

    async def go() -> None:
        await create_vhdx(str(img), 5 << 30, {"block_size": "1M"}, opener=ImageOpener())
        drv = await _open(img)
        try:
            await drv.write((4 << 30) - 4096, memoryview(b"\x5a" * 8192))  # across the bitmap entry
            await drv.write((4 << 30) + 700 * MiB, memoryview(b"\xa5" * 4096))
        finally:
            await drv.close()

    asyncio.run(go())
    run(peer("qemu-img"), "check", img)
    run(peer("qemu-io"), "-f", "vhdx", "-c", f"read -P 0x5a {(4 << 30) - 4096} 8192",
        "-c", f"read -P 0xa5 {(4 << 30) + 700 * MiB} 4096", "-c", f"read -P 0 {(4 << 30) + 4096} 1M", img)
    data = img.read_bytes()
    bat = struct.unpack_from("<Q", data, 3 * 65536 + 16 + 16)[0]
    assert struct.unpack_from("<Q", data, bat + 4095 * 8)[0] & 7 == 6
    assert struct.unpack_from("<Q", data, bat + 4096 * 8)[0] == 0  # the bitmap entry is left alone
    assert struct.unpack_from("<Q", data, bat + 4097 * 8)[0] & 7 == 6


def test_concurrent_writes_to_one_new_block_allocate_it_once(tmp_path: Path) -> None:
    img = tmp_path / "c.vhdx"
    run(peer("qemu-img"), "create", "-q", "-f", "vhdx", "-o", "block_size=1M", img, "8M")

    async def go() -> int:
        drv = await _open(img)
        try:
            before = drv.hf.size()
            await asyncio.gather(*(drv.write(2 * MiB + i * 65536, memoryview(bytes([i + 1]) * 65536))
                                   for i in range(16)))
            return drv.hf.size() - before
        finally:
            await drv.close()

    assert asyncio.run(go()) <= 2 * MiB  # one block (and the alignment to 1 MiB before it)
    run(peer("qemu-img"), "check", img)
    for i in range(16):
        run(peer("qemu-io"), "-f", "vhdx", "-c", f"read -P {i + 1} {2 * MiB + i * 65536} 65536", img)


# -- hostile logs ---------------------------------------------------------------------------------

def _set_log(data: bytearray, *, guid: bytes, length: int | None = None) -> None:
    for at in (HEADER1_OFFSET, HEADER2_OFFSET):
        hdr = Header.parse(bytes(data[at:at + 80]))
        hdr.log_guid = guid
        if length is not None:
            hdr.log_length = length
        data[at:at + 4096] = hdr.block(bytes(data[at:at + 4096]))


def _entry(guid: bytes, seq: int, descs: list[LogDescriptor], datas: list[bytes], size: int,
           count: int | None = None) -> bytes:
    nsec = -(-(len(descs) + 2) // 128)
    head = bytearray(nsec * LOG_SECTOR)
    for i, d in enumerate(descs):
        head[64 + 32 * i:96 + 32 * i] = d.pack()
    hdr = LogHeader(0, (nsec + len(datas)) * LOG_SECTOR, 0, seq, len(descs) if count is None else count,
                    guid, size, size)
    head[:64] = hdr.pack()
    entry = bytearray(head + b"".join(datas))
    entry[4:8] = checksum(entry).to_bytes(4, "little")
    return bytes(entry)


def _base(tmp_path: Path) -> bytearray:
    img = tmp_path / "base.vhdx"
    run(peer("qemu-img"), "create", "-q", "-f", "vhdx", "-o", "block_size=1M", img, "16M")
    return bytearray(img.read_bytes())


def _refused(img: Path) -> str:
    async def go() -> str:
        try:
            drv = await _open(img)
        except BlockError as exc:
            return str(exc)
        await drv.close()
        return ""

    return asyncio.run(go())


def test_a_log_entry_written_by_hand_replays_in_qemu_and_here(tmp_path: Path) -> None:
    """A data descriptor over the BAT's first sector and a zero descriptor over the last MiB of the file:
    qemu and imagecore replay them to the same bytes."""
    data = _base(tmp_path)
    guid = b"G" * 16
    sector = bytearray(data[2 * MiB:2 * MiB + LOG_SECTOR])
    struct.pack_into("<Q", sector, 8, (7 * MiB) | 6)  # block 1 present at 7 MiB
    body, lead, trail = data_sector(bytes(sector), 5)
    data[7 * MiB:8 * MiB] = b"\x77" * MiB
    descs = [LogDescriptor(DESC_SIGNATURE, trail, lead, 2 * MiB, 5),
             LogDescriptor(ZERO_SIGNATURE, 0, 4 * LOG_SECTOR, 7 * MiB, 5)]
    entry = _entry(guid, 5, descs, [body], len(data))
    data[MiB:MiB + len(entry)] = entry
    _set_log(data, guid=guid)
    a, q = tmp_path / "a.vhdx", tmp_path / "q.vhdx"
    a.write_bytes(data)
    q.write_bytes(data)
    run(peer("qemu-img"), "check", "-r", "all", q)

    async def go() -> None:
        drv = await _open(a)
        assert drv.log_replayed
        await drv.close()

    asyncio.run(go())
    run(peer("qemu-img"), "convert", "-O", "raw", q, tmp_path / "q.raw")
    run(peer("qemu-img"), "convert", "-O", "raw", a, tmp_path / "a.raw")
    raw = (tmp_path / "a.raw").read_bytes()
    assert raw == (tmp_path / "q.raw").read_bytes()
    assert raw[MiB:MiB + 4 * LOG_SECTOR] == bytes(4 * LOG_SECTOR)  # guest block 1 is at 7 MiB
    assert raw[MiB + 4 * LOG_SECTOR:2 * MiB] == b"\x77" * (MiB - 4 * LOG_SECTOR)


def test_absurd_log_length_is_searched_in_bounded_time_and_memory(tmp_path: Path) -> None:
    data = _base(tmp_path)
    _set_log(data, guid=b"H" * 16, length=0xFFF00000)  # a 4 GiB log in an 8 MiB file
    img = tmp_path / "h.vhdx"
    img.write_bytes(data)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.monotonic()
    # no entry in it is valid (nothing to replay); then the log overlaps the BAT, as qemu finds
    text = _refused(img)
    assert time.monotonic() - began < 60
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200 * 1024  # KiB
    assert "".join(f"qemu-img: {line}\n" for line in text.splitlines()) == subprocess_stderr(img)


def test_descriptor_area_larger_than_the_file_is_refused_unread(tmp_path: Path) -> None:
    data = _base(tmp_path)
    guid = b"I" * 16
    entry = bytearray(_entry(guid, 1, [], [], len(data)))
    hdr = LogHeader.parse(entry)
    hdr.descriptor_count = 100_000_000
    hdr.entry_length = 0xFFF00000
    entry[:64] = hdr.pack()
    data[MiB:MiB + len(entry)] = entry
    _set_log(data, guid=guid, length=0xFFF00000)
    img = tmp_path / "d.vhdx"
    img.write_bytes(data)
    assert _refused(img).endswith("Invalid argument")
    q = subprocess_stderr(img)
    assert q.endswith("Invalid argument\n")


def subprocess_stderr(img: Path) -> str:
    return run(peer("qemu-img"), "info", img, check=False).stderr.decode()


def test_zero_descriptor_past_the_file_is_refused(tmp_path: Path) -> None:
    """qemu would write those zeroes sector by sector however far they reach (here 1 PiB): refused."""
    data = _base(tmp_path)
    guid = b"J" * 16
    descs = [LogDescriptor(ZERO_SIGNATURE, 0, 1 << 50, 4 * MiB, 1)]
    entry = _entry(guid, 1, descs, [], len(data))
    data[MiB:MiB + len(entry)] = entry
    _set_log(data, guid=guid)
    img = tmp_path / "z.vhdx"
    img.write_bytes(data)
    size = img.stat().st_size
    assert _refused(img).endswith("Invalid argument")
    assert img.stat().st_size == size


def test_read_only_open_of_a_dirty_log_is_refused(tmp_path: Path) -> None:
    data = _base(tmp_path)
    guid = b"K" * 16
    descs = [LogDescriptor(ZERO_SIGNATURE, 0, LOG_SECTOR, 4 * MiB, 3)]
    entry = _entry(guid, 3, descs, [], len(data))
    data[MiB:MiB + len(entry)] = entry
    _set_log(data, guid=guid)
    img = tmp_path / "r.vhdx"
    img.write_bytes(data)

    async def go() -> None:
        with pytest.raises(BlockError) as err:
            await _open(img, read_only=True)
        assert "contains a log that needs to be replayed" in str(err.value)
        assert err.value.hint is not None and "qemu-img check -r all" in err.value.hint

    asyncio.run(go())
    assert img.read_bytes() == bytes(data)  # a read-only open wrote nothing


def test_replay_write_the_host_refuses_fails_the_open_as_qemus(tmp_path: Path) -> None:
    """A data descriptor aimed 4 EiB into the file: the host refuses the write (EFBIG), and so does the
    open, with qemu-img's words."""
    data = _base(tmp_path)
    guid = b"F" * 16
    body, lead, trail = data_sector(bytes(LOG_SECTOR), 1)
    entry = _entry(guid, 1, [LogDescriptor(DESC_SIGNATURE, trail, lead, 1 << 62, 1)], [body], len(data))
    data[MiB:MiB + len(entry)] = entry
    _set_log(data, guid=guid)
    a, q = tmp_path / "a.vhdx", tmp_path / "q.vhdx"
    a.write_bytes(data)
    q.write_bytes(data)
    text = _refused(a)
    theirs = run(peer("qemu-img"), "check", "-r", "all", q, check=False).stderr.decode()
    assert f"qemu-img: Could not open '{q}': {text.replace(str(a), str(q))}\n" == theirs
