"""The construct declarations and the precompiled structs of nbdproto.wire describe the same bytes."""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdproto import constants as c
from nbdproto import wire

PAIRS = [
    (wire.GREETING, wire.GREETING_STRUCT),
    (wire.CLIENT_FLAGS, wire.CLIENT_FLAGS_STRUCT),
    (wire.OPTION_HEADER, wire.OPTION_HEADER_STRUCT),
    (wire.OPTION_REPLY_HEADER, wire.OPTION_REPLY_HEADER_STRUCT),
    (wire.EXPORT_NAME_REPLY, wire.EXPORT_NAME_REPLY_STRUCT),
    (wire.INFO_EXPORT, wire.INFO_EXPORT_STRUCT),
    (wire.INFO_BLOCK_SIZE, wire.INFO_BLOCK_SIZE_STRUCT),
    (wire.REQUEST, wire.REQUEST_STRUCT),
    (wire.EXTENDED_REQUEST, wire.EXTENDED_REQUEST_STRUCT),
    (wire.SIMPLE_REPLY, wire.SIMPLE_REPLY_STRUCT),
    (wire.STRUCTURED_REPLY, wire.STRUCTURED_REPLY_STRUCT),
    (wire.EXTENDED_REPLY, wire.EXTENDED_REPLY_STRUCT),
]


def _fields(layout: Any) -> list[str]:
    return [sc.name for sc in layout.subcons if sc.name]


@pytest.mark.parametrize("layout,st", PAIRS, ids=lambda x: getattr(x, "format", "construct"))
def test_construct_and_struct_agree(layout: Any, st: struct.Struct) -> None:
    assert layout.sizeof() == st.size
    rnd = random.Random(st.format)
    for _ in range(200):
        raw = rnd.randbytes(st.size)
        parsed = layout.parse(raw)
        values = st.unpack(raw)
        assert [parsed[f] for f in _fields(layout)] == list(values)
        assert layout.build(dict(zip(_fields(layout), values, strict=True))) == raw
        assert st.pack(*values) == raw


def test_combined_reply_structs_are_header_plus_payload() -> None:
    st = wire.STRUCTURED_OFFSET_STRUCT.pack(c.STRUCTURED_REPLY_MAGIC, 1, 1, 7, 16, 99)
    q99 = struct.pack(">Q", 99)
    assert st == wire.STRUCTURED_REPLY_STRUCT.pack(c.STRUCTURED_REPLY_MAGIC, 1, 1, 7, 16) + q99
    ex = wire.EXTENDED_OFFSET_STRUCT.pack(c.EXTENDED_REPLY_MAGIC, 1, 1, 7, 5, 16, 99)
    assert ex == wire.EXTENDED_REPLY_STRUCT.pack(c.EXTENDED_REPLY_MAGIC, 1, 1, 7, 5, 16) + q99
    assert wire.OFFSET_HOLE_PAYLOAD.build({"offset": 5, "length": 6}) == wire.OFFSET_HOLE_STRUCT.pack(5, 6)
    msg = wire.ERROR_STRUCT.pack(5, 2) + b"hi"
    parsed = wire.ERROR_PAYLOAD.parse(msg)
    assert parsed.error == 5 and parsed.message == "hi"


def test_option_payload_layouts() -> None:
    data = struct.pack(">I", 4) + b"disk" + struct.pack(">HHH", 2, c.INFO_NAME, c.INFO_BLOCK_SIZE)
    p = wire.parse_option_payload(wire.INFO_PAYLOAD, data)
    assert p.name == b"disk" and list(p.requests) == [1, 3]
    assert wire.parse_option_payload(wire.INFO_PAYLOAD, data + b"x") is None
    assert wire.parse_option_payload(wire.INFO_PAYLOAD, data[:-1]) is None
    meta = struct.pack(">I", 1) + b"d" + struct.pack(">I", 2) + struct.pack(">I", 5) + b"base:"
    meta += struct.pack(">I", 0)
    p = wire.parse_option_payload(wire.META_CONTEXT_PAYLOAD, meta)
    assert p.name == b"d" and list(p.queries) == [b"base:", b""]
    # a count far beyond the payload ends in "malformed", not in a long loop or a big allocation
    bad = struct.pack(">I", 1) + b"d" + struct.pack(">I", 0xFFFFFFFF)
    assert wire.parse_option_payload(wire.META_CONTEXT_PAYLOAD, bad) is None


def _by_construct(layout: Any, data: bytes) -> Any:
    p = wire.parse_option_payload(layout, data)
    if p is None:
        return None
    if layout is wire.INFO_PAYLOAD:
        return bytes(p.name), tuple(p.requests)
    return bytes(p.name), [bytes(q) for q in p.queries]


@st.composite
def _option_payloads(draw: Any) -> bytes:
    """Well-formed INFO and meta-context payloads, then (mostly) damaged: cut, extended, counts changed."""
    name = draw(st.binary(max_size=16))
    head = struct.pack(">I", len(name)) + name
    if draw(st.booleans()):
        reqs = draw(st.lists(st.integers(0, 0xFFFF), max_size=6))
        data = head + struct.pack(f">H{len(reqs)}H", len(reqs), *reqs)
    else:
        queries = draw(st.lists(st.binary(max_size=12), max_size=4))
        data = head + struct.pack(">I", len(queries))
        data += b"".join(struct.pack(">I", len(q)) + q for q in queries)
    how = draw(st.sampled_from(["keep", "cut", "extend", "poke", "random"]))
    if how == "cut" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif how == "extend":
        data += draw(st.binary(min_size=1, max_size=8))
    elif how == "poke" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    elif how == "random":
        data = draw(st.binary(max_size=40))
    return data


@settings(max_examples=400, deadline=None)
@given(_option_payloads())
def test_option_payload_struct_parsers_equal_construct(data: bytes) -> None:
    """The struct parsers of the INFO/GO and meta-context payloads give what the construct layouts give,
    None (malformed) included."""
    assert wire.parse_info_payload(data) == _by_construct(wire.INFO_PAYLOAD, data)
    assert wire.parse_meta_context_payload(data) == _by_construct(wire.META_CONTEXT_PAYLOAD, data)


def test_block_status_payload_layouts() -> None:
    raw = struct.pack(">I4I", 3, 10, 1, 20, 2)
    p = wire.BLOCK_STATUS_PAYLOAD.parse(raw)
    assert p.context_id == 3 and [(d.length, d.flags) for d in p.descriptors] == [(10, 1), (20, 2)]
    raw = wire.BLOCK_STATUS_EXT_HEAD_STRUCT.pack(3, 1) + struct.pack(">QQ", 1 << 40, 3)
    p = wire.BLOCK_STATUS_EXT_PAYLOAD.parse(raw)
    assert p.count == 1 and p.descriptors[0].length == 1 << 40


@pytest.mark.parametrize("raw,expected", [
    (b"disk", "disk"), (b"", ""), ("é".encode(), "é"), (b"a\0b", None), (b"\xff", None), (b"a" * 4097, None),
    (b"a" * 4096, "a" * 4096),
])
def test_decode_string(raw: bytes, expected: str | None) -> None:
    assert wire.decode_string(raw) == expected


def test_encode_message_cuts_on_character_boundaries() -> None:
    assert wire.encode_message("é" * 3000) == ("é" * 2048).encode()
    assert wire.encode_message("a\0b") == b"a b"


def test_magics_spell_what_the_spec_says() -> None:
    assert c.NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert c.IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"
    assert c.REP_ERR_TOO_BIG == 0x80000009 and c.REPLY_TYPE_ERROR_OFFSET == 0x8002
