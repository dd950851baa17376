"""Pure pieces of the qed and qcow formats: table codecs both ways and qed's geometry limits as qemu's."""

from __future__ import annotations

import struct
from array import array

from imagecore.formats.qcow.spec import probe as probe_qcow
from imagecore.formats.qed.driver import (
    cluster_size_valid,
    image_size_valid,
    max_image_size,
    table_size_valid,
)
from imagecore.formats.qed.spec import probe as probe_qed
from imagecore.formats.twolevel import decode_table, encode_table


def test_tables_round_trip_in_both_byte_orders() -> None:
    values = [0, 1, 0x50000, (1 << 63) | 12345, 2**64 - 1]
    raw_le = struct.pack("<5Q", *values)
    raw_be = struct.pack(">5Q", *values)
    assert list(decode_table(raw_le, False)) == values
    assert list(decode_table(raw_be, True)) == values
    assert encode_table(array("Q", values), False) == raw_le
    assert encode_table(array("Q", values), True) == raw_be


def test_qed_geometry_limits() -> None:
    assert [cs for cs in (2048, 4096, 6144, 65536, 64 << 20, 128 << 20) if cluster_size_valid(cs)] == \
        [4096, 65536, 64 << 20]
    assert [ts for ts in (0, 1, 2, 3, 16, 32) if table_size_valid(ts)] == [1, 2, 16]
    # 4 tables of 64 KiB clusters: 32768 entries per table, 2 GiB per L2, 64 TiB in all
    assert max_image_size(65536, 4) == 64 << 40
    assert image_size_valid(0, 65536, 4) and not image_size_valid(1000, 65536, 4)
    assert not image_size_valid((64 << 40) + 512, 65536, 4)


def test_probes_score_as_qemu() -> None:
    assert probe_qed(b"QED\0" + bytes(60), "x") == 100
    assert probe_qed(b"QED\1" + bytes(60), "x") == 0
    head = b"QFI\xfb" + (1).to_bytes(4, "big")
    assert probe_qcow(head + bytes(40), "x") == 100
    assert probe_qcow(b"QFI\xfb" + (2).to_bytes(4, "big") + bytes(40), "x") == 0
