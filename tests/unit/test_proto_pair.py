"""Pair tests: the sans-IO client wired to the server core in memory, over an in-memory disk.

``Pair`` is also the harness of tests/property/test_proto_fuzz.py.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable, Sequence

import pytest

from nbdproto import constants as c
from nbdproto.client import (
    Chunk,
    ClientConnection,
    ClientEvent,
    ExportNameReply,
    Greeting,
    OptionReply,
    SimpleReply,
)
from nbdsrv.proto.connection import Buffer, Phase, ProtocolConfig, ServerConnection
from nbdsrv.proto.events import (
    TERMINAL_EVENTS,
    ConnectionClosed,
    Disconnect,
    Event,
    ExportInfo,
    ExportInfoRequest,
    InvalidRequest,
    ListRequest,
    ProtocolError,
    Ready,
    Request,
)

DISK = 1 << 20
BLOCK = 4096
BASE = c.META_BASE_ALLOCATION
DEPTH = c.META_QEMU_ALLOCATION_DEPTH


def default_exports() -> dict[str, ExportInfo]:
    return {
        "disk": ExportInfo("disk", DISK, description="test disk", meta_contexts=(BASE, DEPTH)),
        "ro": ExportInfo("ro", DISK, read_only=True, can_trim=False, can_zero=False, can_fast_zero=False,
                         can_flush=False, can_fua=False),
        "aligned": ExportInfo("aligned", DISK, min_block=512, meta_contexts=(BASE,)),
        "plain": ExportInfo("plain", DISK, can_flush=False, can_fua=False, can_trim=False, can_zero=False,
                            can_fast_zero=False, can_cache=False, can_multi_conn=False, meta_contexts=()),
        "big": ExportInfo("big", 8 << 30, meta_contexts=(BASE,)),
    }


class MemoryApp:
    """The server application behind a core: answers its events from in-memory disks."""

    def __init__(self, server: ServerConnection, exports: dict[str, ExportInfo],
                 disks: dict[str, bytearray], holes: bool = False) -> None:
        self.server = server
        self.exports = exports
        self.disks = disks
        self.holes = holes

    # --- the in-memory server application -------------------------------------------------------------------
    def handle(self, ev: Event) -> list[Buffer]:
        s = self.server
        if isinstance(ev, ExportInfoRequest):
            return s.answer_export(self.exports.get(ev.name))
        if isinstance(ev, ListRequest):
            return s.answer_list([(n, i.description) for n, i in self.exports.items()])
        if isinstance(ev, InvalidRequest):
            return s.reply_error(ev.cookie, ev.errno, ev.message)
        if isinstance(ev, Request):
            return self.execute(ev)
        return []

    def execute(self, req: Request) -> list[Buffer]:
        s = self.server
        assert s.export is not None
        disk = self.disks.get(s.export.name)
        off, n = req.offset, req.length
        if req.cmd == c.CMD_READ:
            data = bytes(disk[off : off + n]) if disk is not None else bytes(n)
            return s.reply_read(req.cookie, self.read_chunks(off, data), df=req.df)
        if req.cmd == c.CMD_WRITE:
            assert req.data is not None and len(req.data) == n
            if disk is not None:
                disk[off : off + n] = req.data
            return s.reply_ok(req.cookie)
        if req.cmd in (c.CMD_WRITE_ZEROES, c.CMD_TRIM):
            if disk is not None:
                disk[off : off + n] = bytes(n)
            return s.reply_ok(req.cookie)
        if req.cmd in (c.CMD_FLUSH, c.CMD_CACHE):
            return s.reply_ok(req.cookie)
        if req.cmd == c.CMD_BLOCK_STATUS:
            out: list[Buffer] = []
            for cid, name in s.meta_contexts.items():
                out.extend(s.reply_block_status(req.cookie, cid, self.extents(name, off, n)))
            return out
        return s.reply_error(req.cookie, errno.EINVAL, "unexpected command")

    def read_chunks(self, off: int, data: bytes) -> list[tuple[int, Buffer] | tuple[int, int]]:
        if not self.holes:
            return [(off, memoryview(data))]
        chunks: list[tuple[int, Buffer] | tuple[int, int]] = []
        for i in range(0, len(data), BLOCK):
            piece = data[i : i + BLOCK]
            if piece.count(0) == len(piece):
                chunks.append((off + i, len(piece)))
            else:
                chunks.append((off + i, memoryview(piece)))
        return chunks

    def extents(self, name: str, off: int, length: int) -> list[tuple[int, int]]:
        """Runs from ``off`` up to two blocks past the request (the core must clip them)."""
        assert self.server.export is not None
        size = self.server.export.size
        if name == DEPTH:
            return [(size - off, 1)]
        disk = self.disks.get(self.server.export.name)
        if disk is None:
            return [(size - off, c.STATE_HOLE | c.STATE_ZERO)]
        end = min(size, off + length + 2 * BLOCK)
        runs: list[tuple[int, int]] = []
        pos = off
        while pos < end:
            nxt = min(end, (pos // BLOCK + 1) * BLOCK)
            zero = disk[pos:nxt].count(0) == nxt - pos
            flags = c.STATE_HOLE | c.STATE_ZERO if zero else 0
            if runs and runs[-1][1] == flags:
                runs[-1] = (runs[-1][0] + nxt - pos, flags)
            else:
                runs.append((nxt - pos, flags))
            pos = nxt
        return runs


class Pair(MemoryApp):
    """A client core and a server core joined in memory; the server side runs a bytearray-backed disk."""

    def __init__(self, exports: dict[str, ExportInfo] | None = None, *, config: ProtocolConfig | None = None,
                 fixed: bool = True, no_zeroes: bool = True, holes: bool = False) -> None:
        exports = default_exports() if exports is None else exports
        disks = {n: bytearray(i.size) for n, i in exports.items() if i.size <= 64 << 20}
        super().__init__(ServerConnection(config), exports, disks, holes)
        self.client = ClientConnection(fixed_newstyle=fixed, no_zeroes=no_zeroes)
        self.events: list[Event] = []
        self.wire: list[bytes] = []  # everything the server wrote
        self.deliver([self.server.initial_data()])
        greeting = self.client.next_event()
        assert isinstance(greeting, Greeting)
        self.greeting = greeting

    # --- plumbing -----------------------------------------------------------------------------------------
    def deliver(self, bufs: Iterable[Buffer]) -> None:
        data = b"".join(bytes(b) for b in bufs)
        if data:
            self.wire.append(data)
            self.client.receive_data(data)

    def send(self, data: bytes, step: int | None = None) -> list[ClientEvent]:
        if step:
            for i in range(0, len(data), step):
                self.server.receive_data(data[i : i + step])
                self.run()
        else:
            self.server.receive_data(data)
            self.run()
        return self.client.events()

    def eof(self) -> list[ClientEvent]:
        self.server.receive_data(b"")
        self.run()
        return self.client.events()

    def run(self) -> None:
        s = self.server
        while (ev := s.next_event()) is not None:
            self.events.append(ev)
            self.deliver(self.handle(ev))
            if isinstance(ev, TERMINAL_EVENTS):
                break
        self.deliver(s.data_to_send())

    @property
    def terminal(self) -> Event | None:
        return self.events[-1] if self.events and isinstance(self.events[-1], TERMINAL_EVENTS) else None

    # --- client conveniences --------------------------------------------------------------------------------
    def handshake(self, name: str = "disk", *, info: Sequence[int] = (), structured: bool = False,
                  extended: bool = False, meta: Sequence[str] = (), export_name: bool = False,
                  step: int | None = None) -> list[ClientEvent]:
        cl = self.client
        evs = self.send(cl.client_flags(), step)
        if extended:
            evs += self.send(cl.raw_option(c.OPT_EXTENDED_HEADERS), step)
        if structured:
            evs += self.send(cl.raw_option(c.OPT_STRUCTURED_REPLY), step)
        if meta:
            evs += self.send(cl.opt_meta(c.OPT_SET_META_CONTEXT, name, meta), step)
        if export_name:
            evs += self.send(cl.opt_export_name(name), step)
        else:
            evs += self.send(cl.opt_go(name, info), step)
        return evs

    def req(self, cmd: int, *, cookie: int = 1, offset: int = 0, length: int = 0, flags: int = 0,
            data: bytes = b"", step: int | None = None) -> list[ClientEvent]:
        return self.send(self.client.request(cmd, cookie=cookie, offset=offset, length=length, flags=flags,
                                             data=data), step)


def replies(evs: Sequence[ClientEvent], option: int | None = None) -> list[tuple[int, bytes]]:
    return [(e.reply_type, e.payload) for e in evs
            if isinstance(e, OptionReply) and (option is None or e.option == option)]


def infos(evs: Sequence[ClientEvent]) -> dict[int, bytes]:
    out = {}
    for e in evs:
        if isinstance(e, OptionReply) and e.reply_type == c.REP_INFO:
            (t,) = struct.unpack_from(">H", e.payload)
            out[t] = e.payload[2:]
    return out


def error_of(evs: Sequence[ClientEvent]) -> int:
    """The NBD errno of the single (simple or structured) error reply in ``evs``."""
    for e in evs:
        if isinstance(e, SimpleReply):
            return e.error
        if isinstance(e, Chunk) and e.reply_type & 0x8000:
            return int(struct.unpack_from(">I", e.payload)[0])
    raise AssertionError(f"no reply in {evs}")


def error_message(evs: Sequence[ClientEvent]) -> str:
    for e in evs:
        if isinstance(e, Chunk) and e.reply_type & 0x8000:
            _err, n = struct.unpack_from(">IH", e.payload)
            return e.payload[6 : 6 + n].decode()
    raise AssertionError("no error chunk")


def read_data(evs: Sequence[ClientEvent], offset: int, length: int) -> bytes:
    """Reassemble a READ reply (simple or structured) into bytes; holes read as zeroes."""
    out = bytearray(length)
    seen = 0
    for e in evs:
        if isinstance(e, SimpleReply):
            assert e.error == 0
            return e.data
        assert isinstance(e, Chunk)
        if e.reply_type == c.REPLY_TYPE_OFFSET_DATA:
            (o,) = struct.unpack_from(">Q", e.payload)
            d = e.payload[8:]
            out[o - offset : o - offset + len(d)] = d
            seen += len(d)
        elif e.reply_type == c.REPLY_TYPE_OFFSET_HOLE:
            o, n = struct.unpack_from(">QI", e.payload)
            seen += n
        elif e.reply_type != c.REPLY_TYPE_NONE:
            raise AssertionError(f"unexpected chunk {e}")
    assert seen == length
    assert isinstance(evs[-1], Chunk) and evs[-1].done
    return bytes(out)


def block_status(e: Chunk) -> tuple[int, list[tuple[int, int]]]:
    if e.reply_type == c.REPLY_TYPE_BLOCK_STATUS:
        (cid,) = struct.unpack_from(">I", e.payload)
        vals = struct.unpack_from(f">{(len(e.payload) - 4) // 4}I", e.payload, 4)
    else:
        assert e.reply_type == c.REPLY_TYPE_BLOCK_STATUS_EXT
        cid, count = struct.unpack_from(">II", e.payload)
        vals = struct.unpack_from(f">{2 * count}Q", e.payload, 8)
        assert len(e.payload) == 8 + 16 * count
    return cid, list(zip(vals[::2], vals[1::2], strict=True))


# ================================================================================================ handshake


def test_greeting_is_fixed_newstyle_no_zeroes() -> None:
    data = ServerConnection().initial_data()
    assert data == b"NBDMAGICIHAVEOPT" + struct.pack(">H", c.FLAG_FIXED_NEWSTYLE | c.FLAG_NO_ZEROES)


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_reply_and_zero_padding(no_zeroes: bool) -> None:
    p = Pair(no_zeroes=no_zeroes)
    p.send(p.client.client_flags())
    before = sum(map(len, p.wire))
    evs = p.send(p.client.opt_export_name("disk"))
    assert len(evs) == 1 and isinstance(evs[0], ExportNameReply)
    assert evs[0].size == DISK
    assert sum(map(len, p.wire)) - before == (10 if no_zeroes else 134)
    flags = evs[0].transmission_flags
    assert flags & c.FLAG_HAS_FLAGS and not flags & c.FLAG_READ_ONLY
    assert not flags & c.FLAG_SEND_DF  # no structured replies negotiated
    assert isinstance(p.events[-1], Ready) and p.server.phase is Phase.TRANSMISSION


def test_export_name_unknown_closes_without_reply() -> None:
    p = Pair()
    p.send(p.client.client_flags())
    before = len(p.wire)
    p.send(p.client.opt_export_name("nope"))
    assert isinstance(p.terminal, ProtocolError) and "nope" in p.terminal.message
    assert len(p.wire) == before
    assert p.server.phase is Phase.CLOSED


def test_go_defaults_send_export_and_byte_granular_block_size() -> None:
    p = Pair()
    evs = p.handshake("aligned")
    inf = infos(evs)
    size, flags = struct.unpack(">QH", inf[c.INFO_EXPORT])
    assert size == DISK and flags & c.FLAG_SEND_FLUSH and flags & c.FLAG_CAN_MULTI_CONN
    # GO without an NBD_INFO_BLOCK_SIZE request: advertise minimum 1 (the client never agreed to more)
    assert struct.unpack(">III", inf[c.INFO_BLOCK_SIZE]) == (1, 4096, 32 << 20)
    assert replies(evs)[-1] == (c.REP_ACK, b"")
    assert isinstance(p.events[-1], Ready) and p.client.transmission
    # ... so unaligned requests are served
    evs = p.req(c.CMD_READ, offset=1, length=3)
    assert read_data(evs, 1, 3) == b"\0\0\0"


def test_go_with_block_size_enforces_alignment() -> None:
    p = Pair()
    evs = p.handshake("aligned", info=[c.INFO_BLOCK_SIZE])
    assert struct.unpack(">III", infos(evs)[c.INFO_BLOCK_SIZE])[0] == 512
    evs = p.req(c.CMD_READ, offset=1, length=512)
    assert error_of(evs) == c.NBD_EINVAL
    evs = p.req(c.CMD_WRITE, offset=512, data=b"x" * 100, cookie=2)
    assert error_of(evs) == c.NBD_EINVAL
    evs = p.req(c.CMD_READ, offset=512, length=512, cookie=3)
    assert read_data(evs, 512, 512) == bytes(512)


def test_info_with_each_info_type_then_go() -> None:
    p = Pair()
    p.send(p.client.client_flags())
    evs = p.send(p.client.opt_info("disk", [c.INFO_NAME, c.INFO_DESCRIPTION, c.INFO_BLOCK_SIZE, 77]))
    inf = infos(evs)
    assert inf[c.INFO_NAME] == b"disk"
    assert inf[c.INFO_DESCRIPTION] == b"test disk"
    assert struct.unpack(">III", inf[c.INFO_BLOCK_SIZE]) == (1, 4096, 32 << 20)
    assert struct.unpack(">QH", inf[c.INFO_EXPORT])[0] == DISK
    assert replies(evs)[-1] == (c.REP_ACK, b"")
    assert p.server.phase is Phase.HANDSHAKE and not p.client.transmission
    evs = p.send(p.client.opt_go("disk"))
    assert p.client.transmission


def test_info_unknown_export_and_block_size_required() -> None:
    p = Pair()
    p.send(p.client.client_flags())
    evs = p.send(p.client.opt_info("missing"))
    assert replies(evs) == [(c.REP_ERR_UNKNOWN, b"export 'missing' not present")]
    evs = p.send(p.client.opt_info("aligned"))
    assert replies(evs)[-1][0] == c.REP_ERR_BLOCK_SIZE_REQD
    evs = p.send(p.client.opt_go("missing"))
    assert replies(evs)[-1][0] == c.REP_ERR_UNKNOWN
    assert p.server.phase is Phase.HANDSHAKE  # the connection survives
    p.send(p.client.opt_go("disk"))
    assert p.client.transmission


def test_list() -> None:
    p = Pair()
    p.send(p.client.client_flags())
    evs = p.send(p.client.raw_option(c.OPT_LIST))
    rs = replies(evs)
    assert rs[-1] == (c.REP_ACK, b"")
    servers = rs[:-1]
    assert len(servers) == len(p.exports)
    t, payload = servers[0]
    (n,) = struct.unpack_from(">I", payload)
    assert t == c.REP_SERVER and payload[4 : 4 + n] == b"disk" and payload[4 + n :] == b"test disk"
    evs = p.send(p.client.raw_option(c.OPT_LIST, b"junk"))
    assert replies(evs)[0][0] == c.REP_ERR_INVALID


def test_abort_acks_then_disconnects() -> None:
    p = Pair()
    p.send(p.client.client_flags())
    evs = p.send(p.client.raw_option(c.OPT_ABORT))
    assert replies(evs) == [(c.REP_ACK, b"")]
    assert isinstance(p.terminal, Disconnect)
    assert p.server.next_event() == Disconnect()  # sticky


@pytest.mark.parametrize("option", [99, c.OPT_PEEK_EXPORT, 0xFFFFFFFF])
def test_unknown_option_is_unsupported_and_survivable(option: int) -> None:
    p = Pair()
    p.send(p.client.client_flags())
    evs = p.send(p.client.raw_option(option, b"whatever"))
    assert replies(evs)[0][0] == c.REP_ERR_UNSUP
    p.send(p.client.opt_go("disk"))
    assert p.client.transmission


def test_starttls_is_refused_by_policy() -> None:
    p = Pair()
    p.send(p.client.client_flags())
    assert replies(p.send(p.client.raw_option(c.OPT_STARTTLS)))[0][0] == c.REP_ERR_POLICY
    assert replies(p.send(p.client.raw_option(c.OPT_STARTTLS, b"x")))[0][0] == c.REP_ERR_INVALID


@pytest.mark.parametrize("data", [
    struct.pack(">I", 100) + b"disk" + struct.pack(">H", 0),  # name length past the payload
    struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0) + b"extra",  # trailing data
    struct.pack(">I", 4) + b"disk" + struct.pack(">H", 3) + struct.pack(">H", 1),  # too few info requests
    struct.pack(">I", 4) + b"di\0k" + struct.pack(">H", 0),  # NUL in the name
    struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0),  # not UTF-8
    struct.pack(">I", 5000) + b"a" * 5000 + struct.pack(">H", 0),  # name over 4096 bytes
    b"",
    b"\0\0",
])
@pytest.mark.parametrize("option", [c.OPT_GO, c.OPT_INFO])
def test_malformed_info_go_is_invalid_and_survivable(data: bytes, option: int) -> None:
    p = Pair()
    p.send(p.client.client_flags())
    evs = p.send(p.client.raw_option(option, data))
    assert replies(evs) and replies(evs)[0][0] == c.REP_ERR_INVALID
    p.send(p.client.opt_go("disk"))
    assert p.client.transmission


@pytest.mark.parametrize("option", [c.OPT_LIST_META_CONTEXT, c.OPT_SET_META_CONTEXT])
@pytest.mark.parametrize("data", [
    struct.pack(">I", 4) + b"disk" + struct.pack(">I", 2) + struct.pack(">I", 3) + b"abc",  # too few queries
    struct.pack(">I", 4) + b"disk" + struct.pack(">I", 1) + struct.pack(">I", 99) + b"abc",  # query past end
    struct.pack(">I", 4) + b"disk" + struct.pack(">I", 0) + b"x",  # trailing
    struct.pack(">I", 9) + b"disk",
])
def test_malformed_meta_context_is_invalid(option: int, data: bytes) -> None:
    p = Pair()
    p.send(p.client.client_flags())
    p.send(p.client.raw_option(c.OPT_STRUCTURED_REPLY))
    evs = p.send(p.client.raw_option(option, data))
    assert replies(evs) == [(c.REP_ERR_INVALID, replies(evs)[0][1])]
    p.send(p.client.opt_go("disk"))
    assert p.client.transmission


@pytest.mark.parametrize("option", [c.OPT_INFO, 0])
def test_oversized_option_is_drained_and_refused_without_buffering(option: int) -> None:
    p = Pair()
    p.send(p.client.client_flags())
    big = 1 << 20
    p.send(p.client.raw_option(option, b"", length=big))
    for _ in range(big // 65536):
        p.send(b"\xaa" * 65536)
        assert len(p.server._buf) < 70000
    cl = ClientConnection()
    cl.receive_data(b"".join(p.wire))
    last = cl.events()[-1]
    assert isinstance(last, OptionReply) and (last.option, last.reply_type) == (option, c.REP_ERR_TOO_BIG)
    p.send(p.client.opt_go("disk"))
    assert p.client.transmission


@pytest.mark.parametrize("length", [(32 << 20) + 1, 0xFFFFFFFF])
def test_absurd_option_length_closes(length: int) -> None:
    p = Pair()
    p.send(p.client.client_flags())
    p.send(p.client.raw_option(c.OPT_GO, b"", length=length))
    assert isinstance(p.terminal, ProtocolError)


def test_export_name_over_4096_closes() -> None:
    p = Pair()
    p.send(p.client.client_flags())
    p.send(p.client.raw_option(c.OPT_EXPORT_NAME, b"a" * 5000))
    assert isinstance(p.terminal, ProtocolError)


def test_without_fixed_newstyle_only_export_name() -> None:
    p = Pair(fixed=False)
    p.send(p.client.client_flags())
    evs = p.send(p.client.opt_export_name("disk"))
    assert isinstance(evs[0], ExportNameReply)
    p2 = Pair(fixed=False)
    p2.send(p2.client.client_flags())
    p2.send(p2.client.opt_go("disk"))
    assert isinstance(p2.terminal, ProtocolError)


def test_unknown_client_flags_close() -> None:
    p = Pair()
    p.send(struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | 0x80))
    assert isinstance(p.terminal, ProtocolError) and "client flags" in p.terminal.message


def test_bad_option_magic_closes() -> None:
    p = Pair()
    p.send(p.client.client_flags())
    p.send(p.client.raw_option(c.OPT_GO, b"", magic=0x1234))
    assert isinstance(p.terminal, ProtocolError)


def test_structured_and_extended_negotiation_rules() -> None:
    p = Pair()
    p.send(p.client.client_flags())
    assert replies(p.send(p.client.raw_option(c.OPT_STRUCTURED_REPLY))) == [(c.REP_ACK, b"")]
    assert replies(p.send(p.client.raw_option(c.OPT_STRUCTURED_REPLY)))[0][0] == c.REP_ERR_INVALID
    assert replies(p.send(p.client.raw_option(c.OPT_STRUCTURED_REPLY, b"x")))[0][0] == c.REP_ERR_INVALID
    assert replies(p.send(p.client.raw_option(c.OPT_EXTENDED_HEADERS))) == [(c.REP_ACK, b"")]
    assert replies(p.send(p.client.raw_option(c.OPT_STRUCTURED_REPLY)))[0][0] == c.REP_ERR_EXT_HEADER_REQD
    assert replies(p.send(p.client.raw_option(c.OPT_EXTENDED_HEADERS)))[0][0] == c.REP_ERR_INVALID
    assert p.server.structured and p.server.extended


def test_disabled_extensions_are_unsupported() -> None:
    p = Pair(config=ProtocolConfig(structured_replies=False, extended_headers=False))
    p.send(p.client.client_flags())
    assert replies(p.send(p.client.raw_option(c.OPT_STRUCTURED_REPLY)))[0][0] == c.REP_ERR_UNSUP
    assert replies(p.send(p.client.raw_option(c.OPT_EXTENDED_HEADERS)))[0][0] == c.REP_ERR_UNSUP


def test_set_meta_context_requires_structured_replies() -> None:
    p = Pair()
    p.send(p.client.client_flags())
    evs = p.send(p.client.opt_meta(c.OPT_SET_META_CONTEXT, "disk", [BASE]))
    assert replies(evs)[0][0] == c.REP_ERR_INVALID
    # LIST is allowed without (as qemu-nbd does)
    evs = p.send(p.client.opt_meta(c.OPT_LIST_META_CONTEXT, "disk", [BASE]))
    assert replies(evs)[-1] == (c.REP_ACK, b"")


def _contexts(evs: Sequence[ClientEvent]) -> list[tuple[int, str]]:
    return [(struct.unpack_from(">I", pl)[0], pl[4:].decode())
            for t, pl in replies(evs) if t == c.REP_META_CONTEXT]


@pytest.mark.parametrize("queries,expected", [
    ([], [BASE, DEPTH]),
    (["base:"], [BASE]),
    (["qemu:"], [DEPTH]),
    (["base:allocation"], [BASE]),
    (["nope:", "nope:x", "nocolon", "base:unknown"], []),
    (["qemu:allocation-depth", "base:"], [BASE, DEPTH]),
])
def test_list_meta_context_queries(queries: list[str], expected: list[str]) -> None:
    p = Pair()
    p.send(p.client.client_flags())
    p.send(p.client.raw_option(c.OPT_STRUCTURED_REPLY))
    evs = p.send(p.client.opt_meta(c.OPT_LIST_META_CONTEXT, "disk", queries))
    assert [n for _i, n in _contexts(evs)] == expected
    assert all(i == 0 for i, _n in _contexts(evs))
    assert replies(evs)[-1] == (c.REP_ACK, b"")


def test_set_meta_context_assigns_ids_and_ignores_wildcards() -> None:
    p = Pair()
    p.send(p.client.client_flags())
    p.send(p.client.raw_option(c.OPT_STRUCTURED_REPLY))
    evs = p.send(p.client.opt_meta(c.OPT_SET_META_CONTEXT, "disk", ["base:", "qemu:", "x:y"]))
    assert _contexts(evs) == [] and replies(evs) == [(c.REP_ACK, b"")]
    evs = p.send(p.client.opt_meta(c.OPT_SET_META_CONTEXT, "disk", [DEPTH, BASE]))
    ctx = _contexts(evs)
    assert sorted(n for _i, n in ctx) == [BASE, DEPTH]
    assert len({i for i, _n in ctx}) == 2
    assert p.server.meta_contexts == dict(ctx)
    evs = p.send(p.client.opt_meta(c.OPT_SET_META_CONTEXT, "missing", [BASE]))
    assert replies(evs)[0][0] == c.REP_ERR_UNKNOWN
    assert p.server.meta_contexts == {}  # a failed SET still replaces the selection


def test_meta_contexts_dropped_when_go_names_another_export() -> None:
    p = Pair()
    p.send(p.client.client_flags())
    p.send(p.client.raw_option(c.OPT_STRUCTURED_REPLY))
    p.send(p.client.opt_meta(c.OPT_SET_META_CONTEXT, "disk", [BASE]))
    p.send(p.client.opt_go("aligned"))
    assert p.server.meta_contexts == {}
    evs = p.req(c.CMD_BLOCK_STATUS, length=4096)
    assert error_of(evs) == c.NBD_EINVAL and "not negotiated" in error_message(evs)


def test_eof_in_handshake() -> None:
    p = Pair()
    p.send(p.client.client_flags())
    p.eof()
    assert isinstance(p.terminal, ConnectionClosed)
    p = Pair()
    p.send(p.client.client_flags() + p.client.opt_go("disk")[:10])
    p.eof()
    assert isinstance(p.terminal, ProtocolError)


def test_answers_out_of_turn_are_programming_errors() -> None:
    s = ServerConnection()
    with pytest.raises(RuntimeError):
        s.answer_export(None)
    with pytest.raises(RuntimeError):
        s.answer_list([])


def test_handshake_pauses_until_answered() -> None:
    s = ServerConnection()
    cl = ClientConnection()
    s.receive_data(cl.client_flags() + cl.raw_option(c.OPT_STRUCTURED_REPLY) + cl.opt_go("disk"))
    ev = s.next_event()
    assert ev == ExportInfoRequest("disk", c.OPT_GO)
    assert s.awaiting_answer and s.next_event() is None and s.next_event() is None
    out = s.answer_export(default_exports()["disk"])
    cl.receive_data(s.initial_data() + b"".join(bytes(b) for b in out))
    kinds = [(e.option, e.reply_type) for e in cl.events()[1:] if isinstance(e, OptionReply)]
    # the STRUCTURED_REPLY ACK produced before the pause comes first
    assert kinds[0] == (c.OPT_STRUCTURED_REPLY, c.REP_ACK) and kinds[-1] == (c.OPT_GO, c.REP_ACK)
    assert s.next_event() == Ready(default_exports()["disk"])
    assert s.transmission_flags & c.FLAG_SEND_DF


# ============================================================================================= transmission


@pytest.mark.parametrize("mode", ["simple", "extended"])
def test_write_payload_received_in_place(mode: str) -> None:
    # A buffered transport: the header and the payload's first bytes through receive_data(), the rest
    # written into payload_buffer() in pieces, then a pipelined READ through receive_data() again.
    p = Pair()
    p.handshake(structured=False, extended=mode == "extended")
    s = p.server
    assert s.payload_buffer() is None
    payload = bytes(range(251)) * 400
    wire = p.client.request(c.CMD_WRITE, cookie=3, offset=4096, data=payload)
    head = len(wire) - len(payload) + 1000
    p.send(wire[:head])
    assert not any(isinstance(e, Request) and e.cmd == c.CMD_WRITE for e in p.events)
    pos = head
    while pos < len(wire):
        view = s.payload_buffer()
        assert view is not None and len(view) == len(wire) - pos
        n = min(len(view), 7777)
        view[:n] = wire[pos:pos + n]
        s.payload_received(n)
        pos += n
    assert s.payload_buffer() is None  # whole: nothing more belongs there
    p.run()
    w = p.events[-1]
    assert isinstance(w, Request) and w.cmd == c.CMD_WRITE and bytes(w.data or b"") == payload
    assert [getattr(e, "error", 0) for e in p.client.events()] == [0]  # the WRITE's reply
    evs = p.req(c.CMD_READ, offset=4096, length=len(payload), cookie=4)
    assert read_data(evs, 4096, len(payload)) == payload


def _stale(length: int) -> memoryview:
    return memoryview(bytearray(b"\xee" * length))  # as an unzeroed buffer may hold another's bytes


@pytest.mark.parametrize("cut", [0, 1, 4095, 65534])
def test_unzeroed_payload_buffer_is_handed_over_only_filled(cut: int) -> None:
    """The server receives WRITE payloads into buffers it does not zero (nbdsrv.server): a request must
    appear only once its payload filled the buffer whole, and a payload cut short by EOF never does."""
    payload = bytes(range(1, 256)) * 257
    for whole in (True, False):
        p = Pair(config=ProtocolConfig(payload_buffer=_stale))
        p.handshake(structured=True, extended=False)
        wire = p.client.request(c.CMD_WRITE, cookie=5, offset=0, data=payload)
        head = len(wire) - len(payload) + cut
        p.send(wire[:head])
        pos = head
        end = len(wire) if whole else len(wire) - 1
        while pos < end:
            assert not any(isinstance(e, Request) and e.cmd == c.CMD_WRITE for e in p.events)
            view = p.server.payload_buffer()
            assert view is not None
            n = min(len(view), 5000, end - pos)
            view[:n] = wire[pos:pos + n]
            p.server.payload_received(n)
            pos += n
        p.run()
        writes = [e for e in p.events if isinstance(e, Request) and e.cmd == c.CMD_WRITE]
        if whole:
            assert len(writes) == 1 and bytes(writes[0].data or b"") == payload
        else:
            assert writes == []
            p.eof()
            assert isinstance(p.terminal, ProtocolError)
            assert not any(isinstance(e, Request) and e.cmd == c.CMD_WRITE for e in p.events)


@pytest.mark.parametrize("mode", ["simple", "structured", "extended"])
def test_write_then_read_round_trip(mode: str) -> None:
    p = Pair()
    p.handshake(structured=mode == "structured", extended=mode == "extended")
    payload = bytes(range(256)) * 32
    evs = p.req(c.CMD_WRITE, offset=8192, data=payload, flags=c.CMD_FLAG_FUA, cookie=7)
    assert error_of(evs) == 0 if mode != "extended" else evs[0].reply_type == c.REPLY_TYPE_NONE  # type: ignore[union-attr]
    w = p.events[-1]
    assert isinstance(w, Request) and w.fua and w.cmd == c.CMD_WRITE and bytes(w.data or b"") == payload
    evs = p.req(c.CMD_READ, offset=8192 - 100, length=8292, cookie=8)
    assert read_data(evs, 8092, 8292) == bytes(100) + payload
    if mode == "extended":
        assert all(isinstance(e, Chunk) and e.offset == 8092 for e in evs)
        assert p.client.extended


def test_extended_replies_echo_request_offset() -> None:
    p = Pair()
    p.handshake(extended=True)
    evs = p.req(c.CMD_FLUSH, cookie=3)
    assert isinstance(evs[0], Chunk) and evs[0].reply_type == c.REPLY_TYPE_NONE and evs[0].done
    evs = p.req(c.CMD_WRITE_ZEROES, offset=4096, length=4096, cookie=4)
    assert isinstance(evs[0], Chunk) and evs[0].offset == 4096
    evs = p.req(c.CMD_READ, offset=1 << 30, length=1, cookie=5)
    assert isinstance(evs[0], Chunk) and evs[0].offset == 1 << 30 and error_of(evs) == c.NBD_EINVAL


@pytest.mark.parametrize("mode", ["simple", "structured", "extended"])
def test_sparse_read_holes_and_df(mode: str) -> None:
    p = Pair(holes=True)
    p.handshake(structured=mode == "structured", extended=mode == "extended")
    p.req(c.CMD_WRITE, offset=BLOCK, data=b"y" * BLOCK)
    evs = p.req(c.CMD_READ, offset=0, length=3 * BLOCK, cookie=2)
    assert read_data(evs, 0, 3 * BLOCK) == bytes(BLOCK) + b"y" * BLOCK + bytes(BLOCK)
    if mode == "simple":
        assert len(evs) == 1 and isinstance(evs[0], SimpleReply)
        assert error_of(p.req(c.CMD_READ, offset=0, length=BLOCK, flags=c.CMD_FLAG_DF, cookie=3)) == 22
        return
    types = [e.reply_type for e in evs if isinstance(e, Chunk)]
    assert types == [c.REPLY_TYPE_OFFSET_HOLE, c.REPLY_TYPE_OFFSET_DATA, c.REPLY_TYPE_OFFSET_HOLE]
    assert [e.done for e in evs if isinstance(e, Chunk)] == [False, False, True]
    evs = p.req(c.CMD_READ, offset=0, length=3 * BLOCK, flags=c.CMD_FLAG_DF, cookie=3)
    assert [e.reply_type for e in evs if isinstance(e, Chunk)] == [c.REPLY_TYPE_OFFSET_DATA]
    assert read_data(evs, 0, 3 * BLOCK) == bytes(BLOCK) + b"y" * BLOCK + bytes(BLOCK)


def test_command_flags_reach_the_server() -> None:
    p = Pair()
    p.handshake(structured=True)
    p.req(c.CMD_WRITE_ZEROES, offset=0, length=BLOCK,
          flags=c.CMD_FLAG_NO_HOLE | c.CMD_FLAG_FAST_ZERO | c.CMD_FLAG_FUA)
    r = p.events[-1]
    assert isinstance(r, Request) and r.no_hole and r.fast_zero and r.fua and r.name == "WRITE_ZEROES"
    p.req(c.CMD_TRIM, offset=0, length=BLOCK, flags=c.CMD_FLAG_FUA, cookie=2)
    r = p.events[-1]
    assert isinstance(r, Request) and r.cmd == c.CMD_TRIM and r.fua
    p.req(c.CMD_CACHE, offset=0, length=BLOCK, cookie=3)
    assert isinstance(p.events[-1], Request) and p.events[-1].cmd == c.CMD_CACHE
    evs = p.req(c.CMD_FLUSH, cookie=4)
    assert error_of(evs) == 0 and isinstance(p.events[-1], Request)
    p.req(c.CMD_READ, offset=0, length=BLOCK, flags=c.CMD_FLAG_DF, cookie=5)
    r = p.events[-1]
    assert isinstance(r, Request) and r.df
    p.req(c.CMD_DISC, cookie=6)
    assert isinstance(p.terminal, Disconnect)


def test_zero_length_requests_pass_as_qemu_nbd() -> None:
    p = Pair()
    p.handshake(structured=True)
    evs = p.req(c.CMD_READ, offset=0, length=0)
    assert [e.reply_type for e in evs if isinstance(e, Chunk)] == [c.REPLY_TYPE_NONE]
    evs = p.req(c.CMD_WRITE, offset=DISK, data=b"", cookie=2)
    assert error_of(evs) == 0


def _go(p: Pair, name: str = "disk", **kw: object) -> None:
    p.handshake(name, **kw)  # type: ignore[arg-type]
    assert p.client.transmission


@pytest.mark.parametrize("name,cmd,offset,length,flags,data,expected", [
    ("disk", c.CMD_READ, DISK - 1, 2, 0, b"", c.NBD_EINVAL),
    ("disk", c.CMD_READ, 1 << 62, 1, 0, b"", c.NBD_EINVAL),
    ("disk", c.CMD_WRITE, DISK - 1, 0, 0, b"ab", c.NBD_EINVAL),
    ("disk", c.CMD_WRITE_ZEROES, DISK, 1, 0, b"", c.NBD_EINVAL),
    ("disk", c.CMD_TRIM, DISK, 1, 0, b"", c.NBD_EINVAL),
    ("disk", c.CMD_CACHE, DISK, 1, 0, b"", c.NBD_EINVAL),
    ("disk", c.CMD_READ, 0, 1, c.CMD_FLAG_REQ_ONE, b"", c.NBD_EINVAL),
    ("disk", c.CMD_READ, 0, 1, c.CMD_FLAG_DF, b"", c.NBD_EINVAL),  # DF without structured replies
    ("disk", c.CMD_WRITE, 0, 0, c.CMD_FLAG_NO_HOLE, b"abc", c.NBD_EINVAL),
    ("disk", c.CMD_READ, 0, 1, 0x8000, b"", c.NBD_EINVAL),
    ("disk", c.CMD_BLOCK_STATUS, 0, 512, 0, b"", c.NBD_EINVAL),  # no meta context
    ("disk", 42, 0, 1, 0, b"", c.NBD_EINVAL),
    ("disk", c.CMD_RESIZE, 0, 1, 0, b"", c.NBD_EINVAL),
    ("disk", c.CMD_READ, 0, (32 << 20) + 1, 0, b"", c.NBD_EINVAL),
    ("ro", c.CMD_WRITE, 0, 0, 0, b"abc", c.NBD_EPERM),
    ("ro", c.CMD_READ, 0, 1, c.CMD_FLAG_FUA, b"", c.NBD_EINVAL),  # FUA not advertised
    ("ro", c.CMD_FLUSH, 0, 0, 0, b"", c.NBD_EINVAL),  # FLUSH not advertised
    ("ro", c.CMD_TRIM, 0, 1, 0, b"", c.NBD_EPERM),
    ("plain", c.CMD_TRIM, 0, 1, 0, b"", c.NBD_EINVAL),
    ("plain", c.CMD_WRITE_ZEROES, 0, 1, 0, b"", c.NBD_EINVAL),
    ("plain", c.CMD_CACHE, 0, 1, 0, b"", c.NBD_EINVAL),
    ("plain", c.CMD_WRITE_ZEROES, 0, 1, c.CMD_FLAG_FAST_ZERO, b"", c.NBD_EINVAL),
])
def test_invalid_requests(name: str, cmd: int, offset: int, length: int, flags: int, data: bytes,
                          expected: int) -> None:
    p = Pair()
    _go(p, name)
    evs = p.req(cmd, offset=offset, length=length, flags=flags, data=data, cookie=9)
    assert error_of(evs) == expected
    inv = p.events[-1]
    assert isinstance(inv, InvalidRequest) and inv.cookie == 9 and inv.cmd == cmd and inv.message
    # a refused WRITE's payload was consumed: the stream is still in step
    evs = p.req(c.CMD_READ, offset=0, length=4, cookie=10)
    assert read_data(evs, 0, 4) == bytes(4)
    assert p.terminal is None


def test_requests_over_the_advertised_maximum_are_refused() -> None:
    p = Pair({"small": ExportInfo("small", DISK, max_block=65536)})
    evs = p.handshake("small", info=[c.INFO_BLOCK_SIZE])
    assert struct.unpack(">III", infos(evs)[c.INFO_BLOCK_SIZE])[2] == 65536
    assert error_of(p.req(c.CMD_READ, length=65537)) == c.NBD_EINVAL
    # a WRITE under the 32 MiB hard limit is consumed and refused; the connection stays in step
    assert error_of(p.req(c.CMD_WRITE, data=b"w" * 65537, cookie=2)) == c.NBD_EINVAL
    assert read_data(p.req(c.CMD_READ, length=65536, cookie=3), 0, 65536) == bytes(65536)


def test_past_end_errno_can_follow_the_spec() -> None:
    p = Pair(config=ProtocolConfig(enospc_past_end=True))
    _go(p)
    assert error_of(p.req(c.CMD_WRITE, offset=DISK, data=b"a")) == c.NBD_ENOSPC
    assert error_of(p.req(c.CMD_WRITE_ZEROES, offset=DISK, length=1)) == c.NBD_ENOSPC
    assert error_of(p.req(c.CMD_TRIM, offset=DISK, length=1)) == c.NBD_EINVAL


def test_structured_errors_carry_a_message() -> None:
    p = Pair()
    _go(p, "ro", structured=True)
    evs = p.req(c.CMD_WRITE, data=b"x" * 10)
    assert error_of(evs) == c.NBD_EPERM and error_message(evs) == "export is read-only"
    assert isinstance(evs[0], Chunk) and evs[0].done


@pytest.mark.parametrize("host,nbd", [
    (errno.EPERM, 1), (errno.EROFS, 1), (errno.EIO, 5), (errno.ENOMEM, 12), (errno.EINVAL, 22),
    (errno.ENOSPC, 28), (errno.EDQUOT, 28), (errno.EFBIG, 28), (errno.EOVERFLOW, 75), (errno.ENOTSUP, 95),
    (errno.ESHUTDOWN, 108), (errno.ENOENT, 22), (errno.EBUSY, 22), (0, 22),
])
def test_errno_mapping(host: int, nbd: int) -> None:
    p = Pair()
    _go(p)
    p.deliver(p.server.reply_error(5, host, "m"))
    evs = p.client.events()
    assert evs == [SimpleReply(5, nbd, b"")]


def test_error_offset_chunk() -> None:
    p = Pair()
    _go(p, structured=True)
    p.client.request(c.CMD_READ, cookie=5, length=10)
    p.deliver(p.server.reply_error(5, errno.EIO, "bad sector", offset=1234))
    (e,) = p.client.events()
    assert isinstance(e, Chunk) and e.reply_type == c.REPLY_TYPE_ERROR_OFFSET
    err, n = struct.unpack_from(">IH", e.payload)
    assert err == 5 and e.payload[6 : 6 + n] == b"bad sector"
    assert struct.unpack_from(">Q", e.payload, 6 + n)[0] == 1234


def test_long_error_messages_are_cut_to_4096_bytes() -> None:
    p = Pair()
    _go(p, structured=True)
    p.deliver(p.server.reply_error(5, errno.EIO, "é" * 5000))
    (e,) = p.client.events()
    assert isinstance(e, Chunk)
    _err, n = struct.unpack_from(">IH", e.payload)
    assert n <= 4096 and e.payload[6:].decode() == "é" * (n // 2)


def test_oversized_write_is_answered_then_closes() -> None:
    p = Pair()
    _go(p)
    evs = p.send(p.client.raw_request(c.CMD_WRITE, cookie=3, length=(32 << 20) + 1) + b"x" * 100)
    assert error_of(evs) == c.NBD_EINVAL
    assert isinstance(p.events[-2], InvalidRequest) and isinstance(p.terminal, ProtocolError)
    assert p.server.phase is Phase.CLOSED


def test_bad_request_magic_closes() -> None:
    p = Pair()
    _go(p)
    p.send(p.client.raw_request(c.CMD_READ, cookie=1, length=1, magic=0x12560953))
    assert isinstance(p.terminal, ProtocolError) and "magic" in p.terminal.message


def test_truncated_header_at_eof() -> None:
    p = Pair()
    _go(p)
    p.send(p.client.request(c.CMD_READ, cookie=1, length=1)[:20])
    p.eof()
    assert isinstance(p.terminal, ProtocolError)


def test_truncated_write_payload_at_eof() -> None:
    p = Pair()
    _go(p)
    p.send(p.client.request(c.CMD_WRITE, cookie=1, data=b"z" * 1000)[:500])
    assert p.events[-1] == Ready(p.exports["disk"])
    p.eof()
    assert isinstance(p.terminal, ProtocolError)


def test_clean_eof_between_requests() -> None:
    p = Pair()
    _go(p)
    p.req(c.CMD_FLUSH)
    p.eof()
    assert isinstance(p.terminal, ConnectionClosed)
    s = ServerConnection()
    s.receive_data(b"")
    with pytest.raises(RuntimeError):
        s.receive_data(b"more")


def test_large_write_in_pieces_is_collected_without_growth() -> None:
    p = Pair({"disk": ExportInfo("disk", 8 << 20)})
    _go(p)
    payload = bytes(range(251)) * (4 * 1024 * 1024 // 251)
    msg = p.client.request(c.CMD_WRITE, cookie=1, offset=0, data=payload)
    for i in range(0, len(msg), 65536):
        p.send(msg[i : i + 65536])
        assert len(p.server._buf) <= 65536
    w = p.events[-1]
    assert isinstance(w, Request) and w.data is not None and bytes(w.data) == payload
    assert p.disks["disk"][: len(payload)] == payload


def test_many_requests_in_one_buffer() -> None:
    p = Pair()
    _go(p, structured=True)
    msg = b"".join(p.client.request(c.CMD_READ, cookie=i, offset=i * 512, length=512) for i in range(500))
    evs = p.send(msg)
    reads = [e for e in p.events if isinstance(e, Request)]
    assert [r.cookie for r in reads] == list(range(500))
    assert len(evs) == 500 and all(isinstance(e, Chunk) and e.done for e in evs)


def test_write_with_pipelined_requests_after_it() -> None:
    p = Pair()
    _go(p)
    msg = p.client.request(c.CMD_WRITE, cookie=1, offset=0, data=b"a" * 3000)
    msg += p.client.request(c.CMD_READ, cookie=2, offset=0, length=3000)
    evs = p.send(msg, step=7)
    assert read_data(evs[1:], 0, 3000) == b"a" * 3000


# --------------------------------------------------------------------------------------------- block status


@pytest.mark.parametrize("extended", [False, True])
def test_block_status_two_contexts(extended: bool) -> None:
    p = Pair()
    _go(p, structured=not extended, extended=extended, meta=[BASE, DEPTH])
    ids = {n: i for i, n in p.server.meta_contexts.items()}
    p.req(c.CMD_WRITE, offset=BLOCK, data=b"d" * BLOCK)
    evs = p.req(c.CMD_BLOCK_STATUS, offset=0, length=3 * BLOCK + 100, cookie=2)
    chunks = [e for e in evs if isinstance(e, Chunk)]
    assert len(chunks) == 2 and [e.done for e in chunks] == [False, True]
    got = dict(block_status(e) for e in chunks)
    z = c.STATE_HOLE | c.STATE_ZERO
    # the disk model reports runs past the request (two blocks more, the whole disk for the depth): the
    # extent that reaches the request's end is the last, and it runs on (the spec allows it)
    assert got[ids[BASE]] == [(BLOCK, z), (BLOCK, 0), (3 * BLOCK + 100, z)]
    assert got[ids[DEPTH]] == [(DISK, 1)]
    if extended:
        assert all(e.reply_type == c.REPLY_TYPE_BLOCK_STATUS_EXT and e.offset == 0 for e in chunks)
    # never past the export's end
    evs = p.req(c.CMD_BLOCK_STATUS, offset=DISK - 2 * BLOCK, length=100, cookie=3)
    got = dict(block_status(e) for e in evs if isinstance(e, Chunk))
    assert got[ids[BASE]] == [(2 * BLOCK, z)] and got[ids[DEPTH]] == [(2 * BLOCK, 1)]


def test_block_status_final_extent_within_32_bits() -> None:
    """Without extended headers a descriptor's length is 32 bits: a final extent that would run on past
    that is cut at the last multiple of 4 KiB (of the block size, if larger) that fits."""
    p = Pair()
    _go(p, name="big", structured=True, meta=[BASE])
    evs = p.req(c.CMD_BLOCK_STATUS, offset=0, length=BLOCK, cookie=2)
    ((_cid, runs),) = [block_status(e) for e in evs if isinstance(e, Chunk)]
    assert runs == [(0xFFFFF000, c.STATE_HOLE | c.STATE_ZERO)]
    evs = p.req(c.CMD_BLOCK_STATUS, offset=0, length=BLOCK, flags=c.CMD_FLAG_REQ_ONE, cookie=3)
    ((_cid, runs),) = [block_status(e) for e in evs if isinstance(e, Chunk)]
    assert runs == [(BLOCK, c.STATE_HOLE | c.STATE_ZERO)]


def test_block_status_req_one() -> None:
    p = Pair()
    _go(p, structured=True, meta=[BASE])
    p.req(c.CMD_WRITE, offset=BLOCK, data=b"d" * BLOCK)
    evs = p.req(c.CMD_BLOCK_STATUS, offset=0, length=100, flags=c.CMD_FLAG_REQ_ONE, cookie=2)
    (e,) = evs
    assert isinstance(e, Chunk) and e.done
    assert block_status(e)[1] == [(100, c.STATE_HOLE | c.STATE_ZERO)]
    evs = p.req(c.CMD_BLOCK_STATUS, offset=0, length=DISK, flags=c.CMD_FLAG_REQ_ONE, cookie=3)
    assert isinstance(evs[0], Chunk) and block_status(evs[0])[1] == [(BLOCK, c.STATE_HOLE | c.STATE_ZERO)]


def test_block_status_descriptor_cap() -> None:
    p = Pair(config=ProtocolConfig(max_block_status_bytes=8 * 3))
    _go(p, structured=True, meta=[BASE])
    for i in range(0, 10, 2):
        p.req(c.CMD_WRITE, offset=i * BLOCK, data=b"d" * BLOCK, cookie=100 + i)
    evs = p.req(c.CMD_BLOCK_STATUS, offset=0, length=10 * BLOCK, cookie=2)
    assert isinstance(evs[0], Chunk)
    assert len(block_status(evs[0])[1]) == 3


def test_block_status_errors() -> None:
    p = Pair()
    _go(p, structured=True, meta=[BASE])
    assert error_of(p.req(c.CMD_BLOCK_STATUS, offset=0, length=0)) == c.NBD_EINVAL
    assert error_of(p.req(c.CMD_BLOCK_STATUS, offset=DISK, length=1)) == c.NBD_EINVAL
    assert error_of(p.req(c.CMD_BLOCK_STATUS, offset=0, length=1, flags=c.CMD_FLAG_DF)) == c.NBD_EINVAL
    # a server that found nothing to say gets an error chunk, not an empty descriptor list
    p.client.raw_request(c.CMD_BLOCK_STATUS, cookie=77)
    p.deliver(p.server.reply_block_status(77, 0, [(0, 0)]))
    assert error_of(p.client.events()) == c.NBD_EIO


def test_block_status_64bit_lengths_with_extended_headers() -> None:
    p = Pair()
    _go(p, "big", extended=True, meta=[BASE])
    evs = p.req(c.CMD_BLOCK_STATUS, offset=0, length=6 << 30, cookie=2)
    (e,) = evs
    assert isinstance(e, Chunk) and e.reply_type == c.REPLY_TYPE_BLOCK_STATUS_EXT
    # the final extent runs on to where the run ends, the export's end
    assert block_status(e)[1] == [(8 << 30, c.STATE_HOLE | c.STATE_ZERO)]
    # a 64-bit effect length on TRIM is fine with extended headers
    p.req(c.CMD_TRIM, offset=0, length=5 << 30, cookie=3)
    assert isinstance(p.events[-1], Request) and p.events[-1].length == 5 << 30


def test_block_status_32bit_cap_without_extended_headers() -> None:
    p = Pair()
    _go(p, "big", structured=True, meta=[BASE])
    p.client.raw_request(c.CMD_BLOCK_STATUS, cookie=2)
    p.send(p.client.raw_request(c.CMD_BLOCK_STATUS, cookie=2, offset=0, length=0xFFFFFFFF))
    p.client.events()
    p.deliver(p.server.reply_block_status(2, 0, [(6 << 30, 3), (1, 0)]))
    (e,) = p.client.events()
    assert isinstance(e, Chunk)
    assert block_status(e)[1] == [(0xFFFFFFFF, 3)]


def test_extended_payload_on_other_commands_is_consumed_then_refused() -> None:
    p = Pair()
    _go(p, extended=True, meta=[BASE])
    msg = p.client.raw_request(c.CMD_BLOCK_STATUS, cookie=1, length=12, flags=c.CMD_FLAG_PAYLOAD_LEN)
    evs = p.send(msg + b"\0" * 12 + p.client.request(c.CMD_READ, cookie=2, length=4))
    assert error_of(evs[:1]) == c.NBD_EINVAL
    assert read_data(evs[1:], 0, 4) == bytes(4)


def test_compact_request_in_extended_mode_closes() -> None:
    p = Pair()
    _go(p, extended=True)
    p.send(struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_READ, 1, 0, 1) + b"\0" * 4)
    assert isinstance(p.terminal, ProtocolError)


def test_export_name_after_extended_headers_closes() -> None:
    p = Pair()
    p.send(p.client.client_flags())
    p.send(p.client.raw_option(c.OPT_EXTENDED_HEADERS))
    p.send(p.client.opt_export_name("disk"))
    assert isinstance(p.terminal, ProtocolError)


def test_data_after_terminal_is_dropped() -> None:
    p = Pair()
    _go(p)
    p.req(c.CMD_DISC)
    p.server.receive_data(b"x" * 100000)
    assert len(p.server._buf) == 0 and p.server.next_event() == Disconnect()


# ------------------------------------------------------------------------------------------------ framing


def _session(p: Pair, step: int | None) -> list[ClientEvent]:
    cl = p.client
    evs = p.send(cl.client_flags(), step)
    evs += p.send(cl.raw_option(c.OPT_LIST), step)
    evs += p.send(cl.opt_info("disk", [c.INFO_NAME, c.INFO_BLOCK_SIZE]), step)
    evs += p.send(cl.raw_option(c.OPT_STRUCTURED_REPLY), step)
    evs += p.send(cl.opt_meta(c.OPT_SET_META_CONTEXT, "disk", [BASE, DEPTH]), step)
    evs += p.send(cl.opt_go("disk"), step)
    msg = cl.request(c.CMD_WRITE, cookie=1, offset=100, data=b"q" * 5000)
    msg += cl.request(c.CMD_READ, cookie=2, offset=0, length=9000)
    msg += cl.request(c.CMD_READ, cookie=3, offset=DISK, length=1)
    msg += cl.request(c.CMD_BLOCK_STATUS, cookie=4, offset=0, length=DISK)
    msg += cl.request(c.CMD_TRIM, cookie=5, offset=0, length=512)
    msg += cl.request(c.CMD_DISC, cookie=6)
    evs += p.send(msg, step)
    return evs


def test_byte_by_byte_framing_gives_the_same_session() -> None:
    whole = Pair(holes=True)
    evs_whole = _session(whole, None)
    bytewise = Pair(holes=True)
    evs_bytes = _session(bytewise, 1)
    assert evs_bytes == evs_whole
    assert bytewise.events == whole.events
    assert b"".join(bytewise.wire) == b"".join(whole.wire)
    assert isinstance(whole.terminal, Disconnect)
    assert read_data([e for e in evs_whole if isinstance(e, Chunk) and e.cookie == 2], 0, 9000)[100:5100] == (
        b"q" * 5000)
