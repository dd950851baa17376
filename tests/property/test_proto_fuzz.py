"""Property tests of the NBD protocol core: framing independence, and hostile input never escapes as an
exception, a hang or unbounded buffering."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdproto import constants as c
from nbdproto.client import Chunk, ClientConnection, ClientEvent, SimpleReply
from nbdsrv.proto.connection import ProtocolConfig
from nbdsrv.proto.events import (
    TERMINAL_EVENTS,
    ConnectionClosed,
    Disconnect,
    Event,
    ExportInfoRequest,
    InvalidRequest,
    ListRequest,
    ProtocolError,
    Ready,
    Request,
)
from tests.unit.test_proto_pair import BASE, DEPTH, DISK, Pair

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODES = st.sampled_from(["simple", "structured", "extended"])

# (cmd, offset, length, flags): mostly valid, some not
OPS = st.lists(
    st.tuples(
        st.sampled_from([c.CMD_READ, c.CMD_WRITE, c.CMD_WRITE_ZEROES, c.CMD_TRIM, c.CMD_FLUSH, c.CMD_CACHE,
                         c.CMD_BLOCK_STATUS, 9]),
        st.integers(0, DISK + 4096),
        st.integers(0, 20000),
        st.sampled_from([0, 0, 0, c.CMD_FLAG_FUA, c.CMD_FLAG_DF, c.CMD_FLAG_REQ_ONE, c.CMD_FLAG_NO_HOLE,
                         0x40]),
    ),
    max_size=12,
)


def client_stream(mode: str, ops: list[tuple[int, int, int, int]]) -> tuple[bytes, dict[int, int]]:
    """Everything a client sends in one session, built without looking at the replies, and the READ
    lengths a client needs to frame simple replies."""
    cl = ClientConnection()
    out = cl.client_flags() + cl.raw_option(c.OPT_LIST)
    out += cl.opt_info("disk", [c.INFO_NAME, c.INFO_BLOCK_SIZE])
    if mode == "extended":
        out += cl.raw_option(c.OPT_EXTENDED_HEADERS)
    elif mode == "structured":
        out += cl.raw_option(c.OPT_STRUCTURED_REPLY)
    if mode != "simple":
        out += cl.opt_meta(c.OPT_SET_META_CONTEXT, "disk", [BASE, DEPTH])
    out += cl.opt_go("disk")
    cl.extended = mode == "extended"
    for i, (cmd, off, n, fl) in enumerate(ops):
        data = bytes([i % 251 + 1]) * n if cmd == c.CMD_WRITE else b""
        out += cl.request(cmd, cookie=i, offset=off, length=n, flags=fl, data=data)
    out += cl.request(c.CMD_DISC, cookie=999)
    return out, dict(cl._reads)


def run_split(data: bytes, reads: dict[int, int], cuts: list[int]) -> tuple[Pair, list[ClientEvent]]:
    p = Pair(holes=True)
    p.client._reads.update(reads)
    evs: list[ClientEvent] = []
    prev = 0
    for cut in [*sorted({min(x, len(data)) for x in cuts}), len(data)]:
        if cut > prev:  # an empty piece would mean EOF
            evs += p.send(data[prev:cut])
            prev = cut
    return p, evs


@SETTINGS
@given(mode=MODES, ops=OPS, cuts=st.lists(st.integers(0, 200000), max_size=40))
def test_random_chunking_gives_the_same_events(mode: str, ops: list[tuple[int, int, int, int]],
                                               cuts: list[int]) -> None:
    data, reads = client_stream(mode, ops)
    whole, client_events = run_split(data, reads, [])
    split, split_client_events = run_split(data, reads, cuts)
    assert split.events == whole.events
    assert split_client_events == client_events
    assert b"".join(split.wire) == b"".join(whole.wire)
    assert isinstance(whole.terminal, Disconnect)
    # every request got exactly one final reply, and what the core let through is within the export
    done = {e.cookie for e in client_events
            if isinstance(e, SimpleReply) or (isinstance(e, Chunk) and e.done)}
    asked = {ev.cookie for ev in whole.events if isinstance(ev, (Request, InvalidRequest))}
    assert asked == done == set(range(len(ops)))
    for ev in whole.events:
        if isinstance(ev, Request) and ev.cmd != c.CMD_FLUSH:
            assert ev.offset + ev.length <= DISK


def _drive(p: Pair, data: bytes, chunk: int) -> None:
    for i in range(0, len(data), chunk):
        p.send(data[i : i + chunk])
        assert len(p.server._buf) <= len(data) + 16
        if p.terminal is not None:
            break
    p.eof()
    # after EOF the core always reaches an end: nothing is left waiting forever
    for _ in range(3):
        p.run()
    assert p.terminal is not None or p.server.awaiting_answer
    for ev in p.events:
        assert isinstance(ev, Event)


def _check_only(p: Pair, allowed: tuple[type, ...], start: int = 0) -> None:
    for ev in p.events[start:]:
        assert isinstance(ev, allowed + TERMINAL_EVENTS), ev


@SETTINGS
@given(garbage=st.binary(max_size=3000), chunk=st.integers(1, 700))
def test_garbage_in_the_handshake(garbage: bytes, chunk: int) -> None:
    p = Pair()
    _drive(p, garbage, chunk)
    _check_only(p, (ExportInfoRequest, ListRequest, Ready, Request, InvalidRequest))


@SETTINGS
@given(prefix=st.sampled_from([b"", struct.pack(">I", 3), struct.pack(">I", 3) + b"IHAVEOPT"]),
       body=st.binary(max_size=3000), chunk=st.integers(1, 700))
def test_garbage_after_client_flags_and_option_magic(prefix: bytes, body: bytes, chunk: int) -> None:
    p = Pair()
    _drive(p, prefix + body, chunk)
    if prefix and body[:8] != b"IHAVEOPT" and len(prefix) == 4 and len(body) >= 8:
        assert isinstance(p.terminal, ProtocolError)


@SETTINGS
@given(mode=MODES, garbage=st.binary(max_size=4000), chunk=st.integers(1, 900))
def test_garbage_after_the_handshake(mode: str, garbage: bytes, chunk: int) -> None:
    p = Pair()
    p.handshake(structured=mode == "structured", extended=mode == "extended")
    assert p.client.transmission
    _drive(p, garbage, chunk)
    if garbage:
        assert isinstance(p.terminal, (ProtocolError, ConnectionClosed, Disconnect))


HEADERS = st.lists(
    st.tuples(
        st.integers(0, 0xFFFF),  # flags
        st.integers(0, 12),  # type
        st.integers(0, 2**64 - 1),  # cookie
        st.one_of(st.integers(0, DISK + 10), st.integers(0, 2**64 - 1)),  # offset
        st.one_of(st.integers(0, 9000), st.integers(0, 2**32 - 1)),  # length
    ),
    max_size=10,
)


@SETTINGS
@given(mode=MODES, headers=HEADERS, tail=st.binary(max_size=2000), chunk=st.integers(1, 5000))
def test_well_framed_random_requests(mode: str, headers: list[tuple[int, int, int, int, int]], tail: bytes,
                                     chunk: int) -> None:
    """Valid magic, random everything else: each one is either served in range or refused, never a crash."""
    p = Pair(config=ProtocolConfig(max_payload=1 << 20))
    p.handshake(structured=mode == "structured", extended=mode == "extended", meta=[BASE] if mode != "simple"
                else ())
    cl = p.client
    start = len(p.events)
    # cookies made unique: a client that reuses one while it is in flight cannot frame simple READ replies
    # (their length is known only from the request), so the test client would misread the server's replies
    seen: set[int] = set()
    reqs = []
    for f, t, k, o, n in headers:
        while k in seen:
            k = (k + 1) % 2**64
        seen.add(k)
        reqs.append(cl.raw_request(t, cookie=k, offset=o, length=n, flags=f))
    data = b"".join(reqs)
    _drive(p, data + tail, chunk)
    _check_only(p, (Request, InvalidRequest), start)
    for ev in p.events:
        if isinstance(ev, Request):
            if ev.cmd != c.CMD_FLUSH:
                assert ev.offset + ev.length <= DISK
            if ev.cmd == c.CMD_WRITE:
                assert ev.data is not None and len(ev.data) == ev.length


_OPTION_CODES = st.sampled_from([c.OPT_EXPORT_NAME, c.OPT_ABORT, c.OPT_LIST, c.OPT_STARTTLS, c.OPT_INFO,
                                 c.OPT_GO, c.OPT_STRUCTURED_REPLY, c.OPT_LIST_META_CONTEXT,
                                 c.OPT_SET_META_CONTEXT, c.OPT_EXTENDED_HEADERS, 77])


@SETTINGS
@given(options=st.lists(st.tuples(_OPTION_CODES, st.binary(max_size=40)), max_size=12),
       chunk=st.integers(1, 300))
def test_tls_required_serves_nothing_before_the_upgrade(options: list[tuple[int, bytes]], chunk: int) -> None:
    """With TLS required, no sequence of well-framed options reaches an export, a list or transmission
    in plaintext, and whatever follows a STARTTLS is dropped."""
    from nbdsrv.proto.connection import ServerConnection
    from nbdsrv.proto.events import StartTLS
    from nbdsrv.proto.negotiation import Security

    p = Pair()
    p.server = ServerConnection(security=Security.TLS_REQUIRED)
    data = p.client.client_flags() + b"".join(
        struct.pack(">QII", c.IHAVEOPT, opt, len(body)) + body for opt, body in options)
    _drive(p, data, chunk)
    seen_starttls = False
    for ev in p.events:
        assert not isinstance(ev, ExportInfoRequest | ListRequest | Ready | Request | InvalidRequest), ev
        if isinstance(ev, StartTLS):
            assert not seen_starttls  # nothing after the first STARTTLS is ever parsed
            seen_starttls = True
