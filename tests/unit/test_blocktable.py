"""The block table helpers and the layouts built on them: record offsets as the specs give them, table
encoding both ways, and vpc's geometry rounding against sizes qemu-img 7.2 gives."""

from __future__ import annotations

from array import array

import pytest

from imagecore.formats.blocktable import Layout, decode_table, encode_entries
from imagecore.formats.parallels.spec import HEADER as PARALLELS_HEADER
from imagecore.formats.vdi.spec import HEADER as VDI_HEADER
from imagecore.formats.vpc.spec import DYN_HEADER, FOOTER, checksum, rounded_geometry


def test_layout_offsets_are_the_specs() -> None:
    assert VDI_HEADER.offset("signature") == 0x40
    assert VDI_HEADER.offset("offset_bmap") == 0x154
    assert VDI_HEADER.offset("disk_size") == 0x170
    assert VDI_HEADER.offset("blocks_allocated") == 0x184
    assert VDI_HEADER.offset("uuid_link") == 0x1A8
    assert FOOTER.offset("current_size") == 0x30
    assert FOOTER.offset("checksum") == 0x40
    assert DYN_HEADER.offset("max_table_entries") == 0x1C
    assert DYN_HEADER.offset("block_size") == 0x20
    assert PARALLELS_HEADER.offset("inuse") == 0x2C
    assert PARALLELS_HEADER.offset("data_off") == 0x30


def test_layout_round_trip_and_short_input() -> None:
    rec = Layout(">", (("a", "I"), ("b", "4s"), ("c", "Q")))
    raw = rec.pack({"a": 7, "b": b"xy", "c": 1 << 40})
    assert len(raw) == rec.size == 16
    assert rec.unpack(raw) == {"a": 7, "b": b"xy\0\0", "c": 1 << 40}
    assert rec.unpack(raw[:4]) == {"a": 7, "b": b"\0\0\0\0", "c": 0}  # zero-filled, as past EOF


@pytest.mark.parametrize("big", [False, True])
def test_table_encoding_both_ways(big: bool) -> None:
    table = array("I", [0, 1, 0xFFFFFFFF, 0x12345678])
    raw = encode_entries(table, 0, 4, big_endian=big)
    assert raw[12:16] == (b"\x12\x34\x56\x78" if big else b"\x78\x56\x34\x12")
    assert decode_table(raw, 4, big_endian=big) == table
    assert list(decode_table(raw[:6], 4, big_endian=big))[2:] == [0, 0]


def test_vpc_checksum_ignores_its_own_field() -> None:
    rec = bytearray(FOOTER.pack({"cookie": b"conectix", "checksum": 0xDEADBEEF}))
    assert checksum(bytes(rec), FOOTER.offset("checksum")) == ~sum(b"conectix") & 0xFFFFFFFF


@pytest.mark.parametrize(("size", "force", "sectors"), [
    (10 << 20, False, 10514432 // 512), (1000, False, 34816 // 512), (4 << 20, True, 8192),
    (0, False, 0), (3 << 40, False, (3 << 40) // 512),
])
def test_vpc_size_rounding_as_qemu_img(size: int, force: bool, sectors: int) -> None:
    _, got = rounded_geometry(size, force)
    assert got == sectors
