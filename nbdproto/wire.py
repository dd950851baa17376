"""NBD wire layouts: construct declarations (the readable reference, used on cold paths) and the precompiled
``struct`` codecs the hot paths use. tests/unit/test_proto_wire.py keeps each pair equal.

Request headers and reply headers (once per I/O) use ``struct.Struct`` objects, which are ~100x faster.
So do the payloads of the options every client sends (INFO/GO and the meta-context options): parsing them
with construct was 13 % of the server's work per connection. The rare options parse with construct.
"""

from __future__ import annotations

import struct
from typing import Any

import construct as cs

from .constants import MAX_STRING

# --- handshake ------------------------------------------------------------------------------------------
GREETING = cs.Struct(
    "nbdmagic" / cs.Int64ub,
    "ihaveopt" / cs.Int64ub,
    "handshake_flags" / cs.Int16ub,
)
GREETING_STRUCT = struct.Struct(">QQH")

CLIENT_FLAGS = cs.Struct("client_flags" / cs.Int32ub)
CLIENT_FLAGS_STRUCT = struct.Struct(">I")

OPTION_HEADER = cs.Struct(
    "magic" / cs.Int64ub,
    "option" / cs.Int32ub,
    "length" / cs.Int32ub,
)
OPTION_HEADER_STRUCT = struct.Struct(">QII")

OPTION_REPLY_HEADER = cs.Struct(
    "magic" / cs.Int64ub,
    "option" / cs.Int32ub,
    "reply_type" / cs.Int32ub,
    "length" / cs.Int32ub,
)
OPTION_REPLY_HEADER_STRUCT = struct.Struct(">QIII")

EXPORT_NAME_REPLY = cs.Struct("size" / cs.Int64ub, "transmission_flags" / cs.Int16ub)
EXPORT_NAME_REPLY_STRUCT = struct.Struct(">QH")

# A length-prefixed string as raw bytes; decoding and NUL checks are done by the caller so that an
# invalid name is an NBD_REP_ERR_INVALID, not an exception from inside construct.
_STRING32 = cs.Prefixed(cs.Int32ub, cs.GreedyBytes)

INFO_PAYLOAD = cs.Struct(
    "name" / _STRING32,
    "requests" / cs.PrefixedArray(cs.Int16ub, cs.Int16ub),
    cs.Terminated,
)
"""NBD_OPT_INFO / NBD_OPT_GO data."""

META_CONTEXT_PAYLOAD = cs.Struct(
    "name" / _STRING32,
    "queries" / cs.PrefixedArray(cs.Int32ub, _STRING32),
    cs.Terminated,
)
"""NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data."""

INFO_EXPORT = cs.Struct("info" / cs.Int16ub, "size" / cs.Int64ub, "transmission_flags" / cs.Int16ub)
INFO_EXPORT_STRUCT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = cs.Struct(
    "info" / cs.Int16ub, "minimum" / cs.Int32ub, "preferred" / cs.Int32ub, "maximum" / cs.Int32ub
)
INFO_BLOCK_SIZE_STRUCT = struct.Struct(">HIII")
INFO_TYPE_STRUCT = struct.Struct(">H")
META_CONTEXT_ID_STRUCT = struct.Struct(">I")
U32 = struct.Struct(">I")

# --- transmission: requests -----------------------------------------------------------------------------
REQUEST = cs.Struct(
    "magic" / cs.Int32ub,
    "flags" / cs.Int16ub,
    "type" / cs.Int16ub,
    "cookie" / cs.Int64ub,
    "offset" / cs.Int64ub,
    "length" / cs.Int32ub,
)
REQUEST_STRUCT = struct.Struct(">IHHQQI")

EXTENDED_REQUEST = cs.Struct(
    "magic" / cs.Int32ub,
    "flags" / cs.Int16ub,
    "type" / cs.Int16ub,
    "cookie" / cs.Int64ub,
    "offset" / cs.Int64ub,
    "length" / cs.Int64ub,
)
EXTENDED_REQUEST_STRUCT = struct.Struct(">IHHQQQ")

# --- transmission: replies ------------------------------------------------------------------------------
SIMPLE_REPLY = cs.Struct("magic" / cs.Int32ub, "error" / cs.Int32ub, "cookie" / cs.Int64ub)
SIMPLE_REPLY_STRUCT = struct.Struct(">IIQ")

STRUCTURED_REPLY = cs.Struct(
    "magic" / cs.Int32ub,
    "flags" / cs.Int16ub,
    "type" / cs.Int16ub,
    "cookie" / cs.Int64ub,
    "length" / cs.Int32ub,
)
STRUCTURED_REPLY_STRUCT = struct.Struct(">IHHQI")

EXTENDED_REPLY = cs.Struct(
    "magic" / cs.Int32ub,
    "flags" / cs.Int16ub,
    "type" / cs.Int16ub,
    "cookie" / cs.Int64ub,
    "offset" / cs.Int64ub,
    "length" / cs.Int64ub,
)
EXTENDED_REPLY_STRUCT = struct.Struct(">IHHQQQ")

# Chunk header and the fixed part of its payload packed in one call (the hot READ reply).
STRUCTURED_OFFSET_STRUCT = struct.Struct(">IHHQIQ")  # header + offset (OFFSET_DATA)
EXTENDED_OFFSET_STRUCT = struct.Struct(">IHHQQQQ")  # header + offset (OFFSET_DATA)
OFFSET_HOLE_STRUCT = struct.Struct(">QI")  # payload of OFFSET_HOLE
ERROR_STRUCT = struct.Struct(">IH")  # fixed part of ERROR / ERROR_OFFSET
OFFSET_STRUCT = struct.Struct(">Q")
BLOCK_STATUS_EXT_HEAD_STRUCT = struct.Struct(">II")  # context id, descriptor count

OFFSET_DATA_PAYLOAD = cs.Struct("offset" / cs.Int64ub, "data" / cs.GreedyBytes)
OFFSET_HOLE_PAYLOAD = cs.Struct("offset" / cs.Int64ub, "length" / cs.Int32ub)
ERROR_PAYLOAD = cs.Struct(
    "error" / cs.Int32ub,
    "message" / cs.PascalString(cs.Int16ub, "utf8"),
)
ERROR_OFFSET_PAYLOAD = cs.Struct(
    "error" / cs.Int32ub,
    "message" / cs.PascalString(cs.Int16ub, "utf8"),
    "offset" / cs.Int64ub,
)
BLOCK_STATUS_PAYLOAD = cs.Struct(
    "context_id" / cs.Int32ub,
    "descriptors" / cs.GreedyRange(cs.Struct("length" / cs.Int32ub, "flags" / cs.Int32ub)),
)
BLOCK_STATUS_EXT_PAYLOAD = cs.Struct(
    "context_id" / cs.Int32ub,
    "count" / cs.Int32ub,
    "descriptors" / cs.Array(cs.this.count, cs.Struct("length" / cs.Int64ub, "flags" / cs.Int64ub)),
)


def parse_option_payload(layout: Any, data: bytes) -> Any:
    """Parse an option payload with ``layout``; None when it is malformed (short, long, bad counts)."""
    try:
        return layout.parse(data)
    except (cs.ConstructError, ValueError, OverflowError, MemoryError):
        return None


_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


def _leading_name(data: bytes, after: int) -> int | None:
    """Where the export name that starts an option payload ends, when ``after`` more bytes follow it."""
    if len(data) < 4:
        return None
    pos = 4 + _U32.unpack_from(data, 0)[0]
    return pos if pos + after <= len(data) else None


def parse_info_payload(data: bytes) -> tuple[bytes, tuple[int, ...]] | None:
    """:data:`INFO_PAYLOAD` with ``struct``: (name, information requests), None when malformed."""
    pos = _leading_name(data, 2)
    if pos is None:
        return None
    count = _U16.unpack_from(data, pos)[0]
    if pos + 2 + 2 * count != len(data):
        return None
    return bytes(data[4:pos]), struct.unpack_from(f">{count}H", data, pos + 2)


def parse_meta_context_payload(data: bytes) -> tuple[bytes, list[bytes]] | None:
    """:data:`META_CONTEXT_PAYLOAD` with ``struct``: (name, queries), None when malformed. A query count
    beyond the payload stops at the first query that does not fit (each takes at least 4 bytes)."""
    pos = _leading_name(data, 4)
    if pos is None:
        return None
    n = len(data)
    name = bytes(data[4:pos])
    count = _U32.unpack_from(data, pos)[0]
    pos += 4
    queries: list[bytes] = []
    for _ in range(count):
        if pos + 4 > n:
            return None
        end = pos + 4 + _U32.unpack_from(data, pos)[0]
        if end > n:
            return None
        queries.append(bytes(data[pos + 4:end]))
        pos = end
    return (name, queries) if pos == n else None


def decode_string(raw: bytes) -> str | None:
    """A protocol string (UTF-8, no NUL, at most 4096 bytes), or None if ``raw`` is not one."""
    if len(raw) > MAX_STRING or b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def encode_message(message: str, limit: int = MAX_STRING) -> bytes:
    """An error or description string, cut to ``limit`` bytes without splitting a UTF-8 sequence."""
    raw = message.replace("\0", " ").encode("utf-8", "replace")
    if len(raw) > limit:
        raw = raw[:limit].decode("utf-8", "ignore").encode("utf-8")
    return raw
