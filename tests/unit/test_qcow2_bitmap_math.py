"""The pure half of persistent bitmaps: the bit layout (set_bits, clear_tail, bit_runs) against a list of
booleans, the directory's encoding against its decoding and qemu's checks, and the sizes qemu computes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagecore.errors import ImageFormatError
from imagecore.formats.qcow2 import bitmaps as B


def model_bits(buf: bytes | bytearray) -> list[bool]:
    return [bool(buf[i >> 3] >> (i & 7) & 1) for i in range(len(buf) * 8)]


def model_runs(bits: list[bool], first: int, end: int) -> list[tuple[int, int, bool]]:
    out: list[tuple[int, int, bool]] = []
    for i in range(first, end):
        if out and out[-1][2] == bits[i]:
            out[-1] = (out[-1][0], i + 1, bits[i])
        else:
            out.append((i, i + 1, bits[i]))
    return out


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.data())
def test_bit_runs_set_bits_and_clear_tail_match_a_list_of_bits(raw: bytes, data: st.DataObject) -> None:
    nbits = len(raw) * 8
    first = data.draw(st.integers(0, nbits - 1))
    end = data.draw(st.integers(first + 1, nbits))
    assert B.bit_runs(raw, first, end) == model_runs(model_bits(raw), first, end)
    buf = bytearray(raw)
    B.set_bits(buf, first, end)
    want = model_bits(raw)
    for i in range(first, end):
        want[i] = True
    assert model_bits(buf) == want
    cut = data.draw(st.integers(0, nbits))
    B.clear_tail(buf, cut)
    assert model_bits(buf) == [b and i < cut for i, b in enumerate(want)]


def test_bit_runs_skip_whole_bytes_of_zeroes_and_ones() -> None:
    buf = bytes(4096) + b"\xff" * 4096 + b"\x01"
    assert B.bit_runs(buf, 3, len(buf) * 8) == [(3, 32768, False), (32768, 65537, True),
                                                 (65537, 65544, False)]


def test_directory_round_trip_and_qemus_checks() -> None:
    cs, size = 65536, 64 << 20
    entries = [B.Bitmap("b0", B.BME_AUTO, 16, 5 * cs, 1), B.Bitmap("ünï", 0, 9, 6 * cs, 1),
               B.Bitmap("x" * 1023, B.BME_IN_USE | B.BME_AUTO, 31, 7 * cs, 1)]
    raw = B.encode_directory(entries)
    assert len(raw) % 8 == 0
    got = B.decode_directory(raw, 3, cs, size)
    assert [(e.name, e.flags, e.granularity_bits, e.table_offset, e.table_size) for e in got] == [
        (e.name, e.flags, e.granularity_bits, e.table_offset, e.table_size) for e in entries]
    assert [e.position for e in got] == [0, 32, 64]
    with pytest.raises(ImageFormatError, match="Less bitmaps"):
        B.decode_directory(raw, 4, cs, size)
    with pytest.raises(ImageFormatError, match="More bitmaps"):
        B.decode_directory(raw, 2, cs, size)
    with pytest.raises(ImageFormatError, match="Broken bitmap directory"):
        B.decode_directory(raw[:-8], 3, cs, size)
    # a consistent bitmap whose table cannot cover the image (one cluster of bits at 512 bytes each covers
    # 256 MiB), a misaligned table, reserved flags
    for bad in (B.Bitmap("s", 0, 9, cs, 1), B.Bitmap("m", 0, 16, cs + 512, 1), B.Bitmap("f", 8, 16, cs, 1)):
        with pytest.raises(ImageFormatError, match=f"Bitmap '{bad.name}' doesn't satisfy the constraints"):
            B.decode_directory(B.encode_directory([bad]), 1, cs, 1 << 30)
    # ... but an in-use one may be stale (qemu's rule: a resize it did not live to store)
    assert B.decode_directory(B.encode_directory([B.Bitmap("s", B.BME_IN_USE, 9, cs, 1)]), 1, cs, 1 << 30)


def test_sizes_and_constraints_as_qemu_computes_them() -> None:
    assert B.bitmap_bytes(64 << 20, 16) == 128 and B.table_entries(64 << 20, 16, 65536) == 1
    assert B.bitmap_bytes((64 << 20) + 1, 16) == 129
    assert B.table_entries(64 << 40, 16, 65536) == 2048  # 128 MiB of bits for 64 TiB at 64 KiB
    assert [B.default_granularity(c) for c in (512, 4096, 16384, 65536, 2 << 20)] == [
        4096, 4096, 16384, 65536, 65536]
    assert B.constraints_error(64 << 40, 65536, "b", 4096) == (
        "Too much space will be occupied by the bitmap. Use larger granularity")
    assert B.constraints_error(64 << 40, 65536, "b", 65536) is None
    assert B.constraints_error(1 << 20, 65536, "é" * 512, 65536) == (
        "Name length exceeds maximum (1023 characters)")
    assert B.check_table_entry(0, 512) and B.check_table_entry(B.TABLE_ALL_ONES, 512)
    assert not B.check_table_entry(1024 | B.TABLE_ALL_ONES, 512) and not B.check_table_entry(1 << 56, 512)
