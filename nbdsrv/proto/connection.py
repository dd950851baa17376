"""The server side of one NBD connection as a sans-IO state machine (the shape of h11).

Use::

    conn = ServerConnection(ProtocolConfig())
    transport.write(conn.initial_data())          # fixed newstyle greeting
    # on every chunk read from the socket (b"" at EOF):
    conn.receive_data(data)
    while (ev := conn.next_event()) is not None:
        match ev:
            case ExportInfoRequest(name, option): out = conn.answer_export(lookup(name))   # or None
            case ListRequest():                   out = conn.answer_list([(name, descr), ...])
            case Ready(export):                   ...  # transmission starts on export
            case StartTLS():                      write data_to_send(), upgrade, conn.tls_established()
            case Request(cmd=CMD_READ):           out = conn.reply_read(ev.cookie, chunks, df=ev.df)
            case Request(cmd=CMD_WRITE):          ...; out = conn.reply_ok(ev.cookie)
            case Request(cmd=CMD_BLOCK_STATUS):   for cid in conn.meta_contexts: conn.reply_block_status(...)
            case InvalidRequest():                out = conn.reply_error(ev.cookie, ev.errno, ev.message)
            case Disconnect() | ConnectionClosed() | ProtocolError(): flush, then close
        transport.writelines(out)
    transport.writelines(conn.data_to_send())     # replies the core wrote itself during the handshake

Rules:

- Every method that returns ``list[bytes | memoryview]`` returns buffers to write in that order. During the
  handshake the core answers most options itself; those replies queue up and are returned by
  ``data_to_send()`` and also prepended to whatever the next ``answer_*`` call returns, so output order is
  always preserved if the transport writes every list it gets, in the order it gets them. After
  ``Disconnect`` / ``ProtocolError`` call ``data_to_send()`` once more (NBD_OPT_ABORT's ACK is there).
- While an ``ExportInfoRequest`` or ``ListRequest`` is unanswered, ``next_event()`` returns None; the
  server may look the export up asynchronously and call ``answer_*`` later. Bytes that arrive meanwhile
  are buffered (pause reading if that matters).
- Transmission replies (``reply_*``) may be called in any order and from any task of the event loop;
  they are cheap and keep no per-request state except for BLOCK_STATUS (to clip to the request) and,
  with extended headers, the request offset each reply header must echo.
- ``errno`` arguments are host errno values; the core maps them to the NBD table (unknown -> EINVAL).
- ``receive_data`` never raises for bad input: bad input becomes ``InvalidRequest`` or ``ProtocolError``.
  It raises RuntimeError only if called after EOF was fed; after a terminal event input is dropped.

TLS: ``ServerConnection(config, security=Security.TLS_OFFERED)`` (or ``TLS_REQUIRED``) offers STARTTLS;
which options are legal before and after it is ``negotiation.OPTION_TABLE``. On STARTTLS the core emits
``StartTLS``, drops every plaintext byte it holds or receives until ``tls_established()``, and then
starts the negotiation over with a fresh ``Negotiated``.

What the core checks before a ``Request`` reaches the server (qemu-nbd's choices where the spec leaves
one; errors are EINVAL unless noted):

- unknown command; a payload (extended PAYLOAD_LEN) on anything but WRITE (payload consumed);
- READ / WRITE / CACHE longer than the advertised maximum payload (a WRITE over ``config.max_payload``
  cannot be skipped safely: ``InvalidRequest`` then ``ProtocolError``, as qemu-nbd answers and hangs up);
- WRITE / TRIM / WRITE_ZEROES on a read-only export: EPERM (payload consumed);
- offset + length past the end (FLUSH excepted): EINVAL, which is what qemu-nbd puts on the wire even
  for writes (``ProtocolConfig.enospc_past_end`` gives the spec's ENOSPC for WRITE / WRITE_ZEROES);
- flags not valid for the command or not advertised (FUA needs SEND_FUA, DF needs structured replies,
  FAST_ZERO needs SEND_FAST_ZERO, REQ_ONE only on BLOCK_STATUS, NO_HOLE only on WRITE_ZEROES);
- FLUSH / TRIM / WRITE_ZEROES / CACHE not advertised; BLOCK_STATUS without a negotiated meta context or
  with length 0;
- alignment to the minimum block size, only if the client asked for NBD_INFO_BLOCK_SIZE in NBD_OPT_GO
  (otherwise GO advertises a minimum of 1, like qemu-nbd, and the server must cope with any alignment).

Zero-length READ / WRITE / TRIM / WRITE_ZEROES / CACHE pass as requests (qemu-nbd serves them); a READ of
length 0 is answered with ``reply_read(cookie, [])``. FLUSH carries whatever offset/length the client sent.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from nbdproto import constants as c
from nbdproto.constants import MAX_OPTION_LENGTH, MAX_PAYLOAD, nbd_errno
from nbdproto.wire import (
    BLOCK_STATUS_EXT_HEAD_STRUCT,
    CLIENT_FLAGS_STRUCT,
    ERROR_STRUCT,
    EXPORT_NAME_REPLY_STRUCT,
    EXTENDED_OFFSET_STRUCT,
    EXTENDED_REPLY_STRUCT,
    EXTENDED_REQUEST_STRUCT,
    GREETING_STRUCT,
    INFO_BLOCK_SIZE_STRUCT,
    INFO_EXPORT_STRUCT,
    INFO_TYPE_STRUCT,
    OFFSET_HOLE_STRUCT,
    OFFSET_STRUCT,
    OPTION_HEADER_STRUCT,
    OPTION_REPLY_HEADER_STRUCT,
    REQUEST_STRUCT,
    SIMPLE_REPLY_STRUCT,
    STRUCTURED_OFFSET_STRUCT,
    STRUCTURED_REPLY_STRUCT,
    U32,
    decode_string,
    encode_message,
    parse_info_payload,
    parse_meta_context_payload,
)

from .events import (
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
    StartTLS,
)
from .negotiation import UPGRADES, Negotiated, Security, Verdict, verdict

Buffer = bytes | bytearray | memoryview
Chunk = tuple[int, Buffer] | tuple[int, int]
"""A READ reply chunk: ``(offset, buffer)`` for data or ``(offset, length)`` for a known-zero hole."""

_ZEROS = memoryview(bytes(1 << 20))
_NO_ZEROES_PAD = bytes(124)

# Handshake / transmission sub-states.
_S_FLAGS = 0
_S_OPTIONS = 1
_S_WAIT = 2
_S_TRANSMISSION = 3
_S_DONE = 4
_S_TLS = 5  # STARTTLS acknowledged: waiting for the transport's TLS handshake

# Commands that address a range of the export (range, alignment checks).
_RANGE_CMDS = frozenset(
    {c.CMD_READ, c.CMD_WRITE, c.CMD_TRIM, c.CMD_CACHE, c.CMD_WRITE_ZEROES, c.CMD_BLOCK_STATUS}
)
_WRITE_CMDS = frozenset({c.CMD_WRITE, c.CMD_TRIM, c.CMD_WRITE_ZEROES})
_KNOWN_CMDS = frozenset(
    {c.CMD_READ, c.CMD_WRITE, c.CMD_FLUSH, c.CMD_TRIM, c.CMD_CACHE, c.CMD_WRITE_ZEROES, c.CMD_BLOCK_STATUS}
)

_REQUEST_UNPACK_FROM = REQUEST_STRUCT.unpack_from
_REQUEST_MAGIC = c.REQUEST_MAGIC
_SIMPLE_MAGIC = c.SIMPLE_REPLY_MAGIC
_STRUCTURED_MAGIC = c.STRUCTURED_REPLY_MAGIC
_DONE = c.REPLY_FLAG_DONE
_OFFSET_DATA = c.REPLY_TYPE_OFFSET_DATA
_SIMPLE_PACK = SIMPLE_REPLY_STRUCT.pack
_STRUCTURED_PACK = STRUCTURED_REPLY_STRUCT.pack
_EXTENDED_PACK = EXTENDED_REPLY_STRUCT.pack
_STRUCTURED_OFFSET_PACK = STRUCTURED_OFFSET_STRUCT.pack
_EXTENDED_OFFSET_PACK = EXTENDED_OFFSET_STRUCT.pack


def _zeros(n: int) -> list[Buffer]:
    """``n`` zero bytes as shared read-only slices (holes inside a simple or DF reply)."""
    out: list[Buffer] = []
    step = len(_ZEROS)
    while n > 0:
        k = min(n, step)
        out.append(_ZEROS[:k])
        n -= k
    return out


def _sanitize(name: str) -> str:
    return name if len(name) < 80 else name[:80] + "..."


class Phase(enum.Enum):
    """Where the connection is."""

    HANDSHAKE = "handshake"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


def _plain_buffer(length: int) -> memoryview:
    return memoryview(bytearray(length))


@dataclass(frozen=True, slots=True)
class ProtocolConfig:
    """Server-wide protocol policy.

    ``max_payload``: largest READ/WRITE length accepted (the spec's 32 MiB default).
    ``max_option_length``: largest option payload buffered; longer ones are drained and refused.
    ``structured_replies`` / ``extended_headers``: whether the server agrees to these options.
    ``max_block_status_bytes``: bound on the descriptors of one block status chunk (qemu: 1 MiB).
    ``send_block_size_always``: send NBD_INFO_BLOCK_SIZE to INFO/GO even when not requested.
    ``enospc_past_end``: answer WRITE / WRITE_ZEROES beyond the end with ENOSPC (the spec's SHOULD)
    instead of EINVAL (what qemu-nbd puts on the wire).
    ``payload_buffer``: allocates the buffer a WRITE payload is received into (the server gives one that
    starts on a page boundary, which the kernel copies into and out of faster). It need not be zeroed: a
    WRITE request is handed over only once its payload has filled the buffer whole.
    """

    max_payload: int = MAX_PAYLOAD
    max_option_length: int = MAX_OPTION_LENGTH
    structured_replies: bool = True
    extended_headers: bool = True
    max_block_status_bytes: int = 1 << 20
    send_block_size_always: bool = True
    enospc_past_end: bool = False
    payload_buffer: Callable[[int], memoryview] = _plain_buffer


class ServerConnection:
    """One NBD server connection, from the greeting to the end of transmission. No I/O."""

    def __init__(self, config: ProtocolConfig | None = None, *,
                 security: Security = Security.PLAINTEXT) -> None:
        self.config = config or ProtocolConfig()
        self.phase = Phase.HANDSHAKE
        self.security = security
        """Where the handshake stands with TLS (see negotiation.OPTION_TABLE)."""
        self.negotiated = Negotiated()
        """What the options so far have settled; replaced whole when TLS starts."""
        self.discarded = 0
        """Plaintext bytes thrown away after STARTTLS."""
        self.transmission_flags = 0
        """The 16-bit transmission flags sent for ``export``."""
        self.client_flags = 0
        """The client's handshake flags."""

        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._state = _S_FLAGS
        self._fast = False  # in transmission with nothing pending: try the READ fast path first
        self._out: list[Buffer] = []
        self._queued: Event | None = None
        self._terminal: Event | None = None
        self._fixed = False
        self._no_zeroes = False
        # Bytes of the stream to throw away (an oversized option, the payload of a refused request),
        # then what to do: reply to this option / emit this event.
        self._skip = 0
        self._skip_option: int | None = None
        self._skip_event: Event | None = None
        # An unanswered ExportInfoRequest / ListRequest.
        self._pending_option = 0
        self._pending_name = ""
        self._pending_info: tuple[int, ...] = ()
        self._pending_queries: list[bytes] = []
        # A WRITE payload arriving in pieces.
        self._payload: memoryview | None = None
        self._payload_fill = 0
        self._payload_event: Request | None = None
        # Transmission parameters, fixed by _enter_transmission.
        self._size = 0
        self._read_only = False
        self._align_mask = 0
        self._max_payload = self.config.max_payload
        self._valid_flags: dict[int, int] = {}
        self._supported: frozenset[int] = frozenset()
        self._bad_read_flags = 0xFFFF
        self._hdr = REQUEST_STRUCT
        self._req_magic = c.REQUEST_MAGIC
        # What was negotiated, frozen when transmission starts (read on every reply).
        self._structured = False
        self._extended = False
        # BLOCK_STATUS cookie -> [offset, length, req_one, replies still due]
        self._bs: dict[int, list[int]] = {}
        # With extended headers every reply echoes the request offset: cookie -> offset.
        self._ext_offsets: dict[int, int] = {}

    @property
    def structured(self) -> bool:
        """Structured replies negotiated (also true with extended headers)."""
        return self.negotiated.structured

    @property
    def extended(self) -> bool:
        """Extended headers negotiated."""
        return self.negotiated.extended

    @property
    def meta_contexts(self) -> dict[int, str]:
        """Negotiated meta contexts: id -> name. Block status replies go once per id, in this order."""
        return self.negotiated.meta_contexts

    @property
    def export(self) -> ExportInfo | None:
        """The export being served (set when ``Ready`` is emitted)."""
        return self.negotiated.export

    @property
    def tls(self) -> bool:
        """True once the connection runs over TLS."""
        return self.security is Security.TLS

    def tls_established(self) -> None:
        """The transport finished the TLS handshake that ``StartTLS`` asked for: negotiation starts over.

        Everything negotiated in plaintext is forgotten at once (one new ``Negotiated``), and options are
        read again from the first byte that arrives over TLS."""
        if self._state != _S_TLS:
            raise RuntimeError("tls_established() without a pending StartTLS")
        self.negotiated = Negotiated()
        self.security = UPGRADES[self.security]
        self._state = _S_OPTIONS

    # --- input ----------------------------------------------------------------------------------------
    def initial_data(self) -> bytes:
        """The greeting to send first: NBDMAGIC, IHAVEOPT, server handshake flags."""
        return GREETING_STRUCT.pack(c.NBDMAGIC, c.IHAVEOPT, c.FLAG_FIXED_NEWSTYLE | c.FLAG_NO_ZEROES)

    @property
    def awaiting_answer(self) -> bool:
        """True while an ExportInfoRequest or ListRequest waits for ``answer_*``."""
        return self._state == _S_WAIT

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes read from the peer; ``b""`` means EOF. The data is copied; the caller may reuse it."""
        if self._state == _S_DONE:
            return  # the connection is over; drop whatever still arrives
        if self._eof:
            raise RuntimeError("receive_data() after EOF")
        n = len(data)
        if n == 0:
            self._eof = True
            return
        if self._state == _S_TLS:
            self.discarded += n  # plaintext between STARTTLS and the handshake: never parsed
            return
        if self._payload is not None:
            # A WRITE payload is being collected: the buffer is empty, copy straight into the payload.
            need = len(self._payload) - self._payload_fill
            if n <= need:
                self._payload[self._payload_fill : self._payload_fill + n] = data
                self._payload_fill += n
                return
            mv = memoryview(data)
            self._payload[self._payload_fill :] = mv[:need]
            self._payload_fill += need
            data = mv[need:]
            n -= need
        if self._skip:
            if n <= self._skip:
                self._skip -= n
                return
            data = memoryview(data)[self._skip :]
            n -= self._skip
            self._skip = 0
        buf = self._buf
        if self._pos:
            if self._pos >= len(buf):
                buf.clear()
            else:
                del buf[: self._pos]  # O(1) amortised in CPython: moves the start pointer
            self._pos = 0
        buf += data

    def payload_buffer(self) -> memoryview | None:
        """While a WRITE payload is being collected, the part of it still to come, for a transport that
        can receive bytes in place: the peer's next bytes belong there, so they need not pass through
        :meth:`receive_data`'s copy. None otherwise. Report what was written with :meth:`payload_received`."""
        payload = self._payload
        if payload is None or self._payload_fill >= len(payload) or self._state != _S_TRANSMISSION:
            return None
        return payload[self._payload_fill :]

    def payload_received(self, n: int) -> None:
        """``n`` bytes from the peer were written at the start of the view :meth:`payload_buffer` gave."""
        assert self._payload is not None and 0 <= n <= len(self._payload) - self._payload_fill
        self._payload_fill += n

    def next_event(self) -> Event | None:
        """The next event, or None when more data (or an answer to a pending request) is needed."""
        if self._fast:
            # The hot path: a plain READ that needs no validation beyond these comparisons.
            buf = self._buf
            pos = self._pos
            if len(buf) - pos >= 28:
                magic, flags, cmd, cookie, offset, length = _REQUEST_UNPACK_FROM(buf, pos)
                if (
                    cmd == 0
                    and magic == _REQUEST_MAGIC
                    and not flags & self._bad_read_flags
                    and length <= self._max_payload
                    and offset + length <= self._size
                    and not (offset | length) & self._align_mask
                ):
                    self._pos = pos + 28
                    return Request(0, flags, cookie, offset, length)
        ev = self._next_event_slow()
        self._fast = (
            self._state == _S_TRANSMISSION
            and not self._extended
            and self._queued is None
            and self._payload is None
            and self._skip_event is None
        )
        return ev

    def _next_event_slow(self) -> Event | None:
        if self._queued is not None:
            ev, self._queued = self._queued, None
            return ev
        if self._terminal is not None:
            return self._terminal
        state = self._state
        if state == _S_TRANSMISSION:
            return self._next_request()
        if state == _S_WAIT:
            return None
        if state == _S_TLS:
            return self._terminate(ConnectionClosed()) if self._eof else None
        return self._next_handshake()

    def data_to_send(self) -> list[Buffer]:
        """Take the handshake replies the core produced on its own (may be empty)."""
        out, self._out = self._out, []
        return out

    # --- helpers ------------------------------------------------------------------------------------------
    def _terminate(self, ev: Event) -> Event:
        self._terminal = ev
        self._fast = False
        self._state = _S_DONE
        self.phase = Phase.CLOSED
        self._buf = bytearray()
        self._pos = 0
        self._payload = None
        self._skip = 0
        return ev

    def _fail(self, message: str) -> Event:
        return self._terminate(ProtocolError(message))

    def _need_more(self, what: str) -> Event | None:
        if not self._eof:
            return None
        if self._pos < len(self._buf) or self._skip or self._payload is not None:
            return self._fail(f"connection closed in the middle of {what}")
        return self._terminate(ConnectionClosed())

    def _drop(self) -> None:
        """Drop buffered bytes towards ``_skip``."""
        avail = len(self._buf) - self._pos
        k = min(avail, self._skip)
        self._pos += k
        self._skip -= k

    # --- handshake ------------------------------------------------------------------------------------------
    def _rep(self, option: int, rep_type: int, payload: bytes = b"") -> None:
        self._out.append(OPTION_REPLY_HEADER_STRUCT.pack(c.OPT_REPLY_MAGIC, option, rep_type, len(payload)))
        if payload:
            self._out.append(payload)

    def _rep_err(self, option: int, rep_type: int, message: str) -> None:
        self._rep(option, rep_type, encode_message(message))

    def _next_handshake(self) -> Event | None:
        while True:
            buf = self._buf
            if self._state == _S_FLAGS:
                if len(buf) - self._pos < 4:
                    return self._need_more("the client flags")
                (flags,) = CLIENT_FLAGS_STRUCT.unpack_from(buf, self._pos)
                self._pos += 4
                if flags & ~c.CLIENT_FLAGS_KNOWN:
                    return self._fail(f"unknown client flags 0x{flags:x}")
                self.client_flags = flags
                self._fixed = bool(flags & c.FLAG_C_FIXED_NEWSTYLE)
                self._no_zeroes = bool(flags & c.FLAG_C_NO_ZEROES)
                self._state = _S_OPTIONS
                continue
            if self._skip_option is not None:
                self._drop()
                if self._skip:
                    return self._need_more("an option")
                option, self._skip_option = self._skip_option, None
                self._rep_err(option, c.REP_ERR_TOO_BIG, f"option {c.OPT_NAMES.get(option, option)} too long")
                continue
            if len(buf) - self._pos < 16:
                return self._need_more("an option header")
            magic, option, length = OPTION_HEADER_STRUCT.unpack_from(buf, self._pos)
            if magic != c.IHAVEOPT:
                return self._fail(f"bad option magic 0x{magic:x}")
            if not self._fixed and option != c.OPT_EXPORT_NAME:
                return self._fail(f"option {option} without fixed newstyle negotiation")
            if length > self.config.max_payload:
                return self._fail(f"option length {length} is larger than {self.config.max_payload}")
            if option == c.OPT_EXPORT_NAME and length > c.MAX_NAME_LENGTH:
                return self._fail(f"export name of {length} bytes")
            if length > self.config.max_option_length:
                self._pos += 16
                self._skip = length
                self._skip_option = option
                continue
            if len(buf) - self._pos < 16 + length:
                return self._need_more("an option")
            start = self._pos + 16
            data = bytes(buf[start : start + length])
            self._pos = start + length
            ev = self._option(option, data)
            if ev is not None:
                return ev

    def _option(self, option: int, data: bytes) -> Event | None:
        name = c.OPT_NAMES.get(option, "unknown")
        neg = self.negotiated
        if option == c.OPT_STARTTLS and data:
            self._rep_err(option, c.REP_ERR_INVALID, f"option '{name}' has unexpected length")
            return None
        v = verdict(self.security, option)
        if v is Verdict.TLS_REQD:
            self._rep_err(option, c.REP_ERR_TLS_REQD, f"TLS is required before option '{name}'")
            return None
        if v is Verdict.CLOSE:
            return self._fail(f"option '{name}' before TLS, which this server requires")
        if v is Verdict.POLICY:
            self._rep_err(option, c.REP_ERR_POLICY, "TLS not configured")
            return None
        if v is Verdict.INVALID:
            self._rep_err(option, c.REP_ERR_INVALID, "TLS is already negotiated")
            return None
        if option == c.OPT_EXPORT_NAME:
            if neg.extended:
                return self._fail("EXPORT_NAME after extended headers were negotiated")
            export = decode_string(data)
            if export is None:
                return self._fail("invalid export name")
            return self._wait(option, export)
        if option == c.OPT_ABORT:
            self._rep(option, c.REP_ACK)
            return self._terminate(Disconnect())
        if option in (c.OPT_LIST, c.OPT_STARTTLS, c.OPT_STRUCTURED_REPLY, c.OPT_EXTENDED_HEADERS) and data:
            self._rep_err(option, c.REP_ERR_INVALID, f"option '{name}' has unexpected length")
            return None
        if option == c.OPT_LIST:
            self._pending_option = option
            self._state = _S_WAIT
            return ListRequest()
        if option == c.OPT_STARTTLS:
            # Verdict.UPGRADE. Whatever the client sent after STARTTLS is plaintext that arrived before
            # the upgrade: it is thrown away, never parsed (nbdkit CVE-2021-3716).
            self._rep(option, c.REP_ACK)
            discarded = len(self._buf) - self._pos
            self._buf = bytearray()
            self._pos = 0
            self._state = _S_TLS
            self.discarded += discarded
            return StartTLS(discarded)
        if option == c.OPT_STRUCTURED_REPLY:
            if neg.extended:
                self._rep_err(option, c.REP_ERR_EXT_HEADER_REQD, "extended headers already negotiated")
            elif neg.structured:
                self._rep_err(option, c.REP_ERR_INVALID, "structured reply already negotiated")
            elif not self.config.structured_replies:
                self._rep_err(option, c.REP_ERR_UNSUP, "structured replies are disabled")
            else:
                neg.structured = True
                self._rep(option, c.REP_ACK)
        elif option == c.OPT_EXTENDED_HEADERS:
            if neg.extended:
                self._rep_err(option, c.REP_ERR_INVALID, "extended headers already negotiated")
            elif not self.config.extended_headers:
                self._rep_err(option, c.REP_ERR_UNSUP, "extended headers are disabled")
            else:
                neg.extended = neg.structured = True
                self._rep(option, c.REP_ACK)
        elif option in (c.OPT_INFO, c.OPT_GO):
            info = parse_info_payload(data)
            if info is None:
                self._rep_err(option, c.REP_ERR_INVALID, f"malformed option '{name}'")
                return None
            export = decode_string(info[0])
            if export is None:
                self._rep_err(option, c.REP_ERR_INVALID, "invalid export name")
                return None
            self._pending_info = info[1]
            return self._wait(option, export)
        elif option in (c.OPT_LIST_META_CONTEXT, c.OPT_SET_META_CONTEXT):
            if option == c.OPT_SET_META_CONTEXT:
                # The spec: SET replaces the previous selection even when it fails.
                neg.meta_contexts = {}
                neg.meta_export = None
                if not neg.structured:
                    self._rep_err(option, c.REP_ERR_INVALID,
                                  f"request option '{name}' when structured reply is not negotiated")
                    return None
            meta = parse_meta_context_payload(data)
            if meta is None:
                self._rep_err(option, c.REP_ERR_INVALID, f"malformed option '{name}'")
                return None
            export = decode_string(meta[0])
            if export is None:
                self._rep_err(option, c.REP_ERR_INVALID, "invalid export name")
                return None
            self._pending_queries = meta[1]
            return self._wait(option, export)
        else:
            self._rep_err(option, c.REP_ERR_UNSUP, f"unsupported option {option} ({name})")
        return None

    def _wait(self, option: int, export: str) -> Event:
        self._pending_option = option
        self._pending_name = export
        self._state = _S_WAIT
        return ExportInfoRequest(export, option)

    # --- handshake answers ------------------------------------------------------------------------------
    def answer_export(self, info: ExportInfo | None,
                      error: tuple[int, str] | None = None) -> list[Buffer]:
        """Answer the pending ``ExportInfoRequest``: the export's description, or None if it doesn't exist.

        ``error`` is ``(NBD_REP_ERR_*, message)`` for an export that exists but was refused (locked,
        shut down, outside policy); without it a None ``info`` is answered as an unknown name.
        """
        option = self._pending_option
        if self._state != _S_WAIT or option == c.OPT_LIST:
            raise RuntimeError("answer_export() without a pending ExportInfoRequest")
        self._state = _S_OPTIONS
        self._pending_option = 0
        name = self._pending_name
        if option == c.OPT_EXPORT_NAME:
            if info is None:
                # EXPORT_NAME cannot fail politely: the reason goes only into our own log via _fail.
                self._fail(error[1][:1024] if error else f"export '{_sanitize(name)}' not present")
                return self.data_to_send()
            flags = self._enter_transmission(info, name, 0)
            self._out.append(EXPORT_NAME_REPLY_STRUCT.pack(info.size, flags))
            if not self._no_zeroes:
                self._out.append(_NO_ZEROES_PAD)
            self._queued = Ready(info)
            return self.data_to_send()
        if info is None:
            if error is not None:
                self._rep_err(option, error[0], error[1][:1024])
            else:
                self._rep_err(option, c.REP_ERR_UNKNOWN, f"export '{_sanitize(name)}' not present")
            return self.data_to_send()
        if option in (c.OPT_INFO, c.OPT_GO):
            self._answer_info(option, name, info)
        else:
            self._answer_meta(option, name, info)
        return self.data_to_send()

    def _answer_info(self, option: int, name: str, info: ExportInfo) -> None:
        requests = self._pending_info
        want_block_size = c.INFO_BLOCK_SIZE in requests
        if c.INFO_NAME in requests:
            self._rep(option, c.REP_INFO, INFO_TYPE_STRUCT.pack(c.INFO_NAME) + encode_message(info.name))
        if info.description:
            self._rep(option, c.REP_INFO,
                      INFO_TYPE_STRUCT.pack(c.INFO_DESCRIPTION) + encode_message(info.description))
        min_block = max(1, info.min_block)
        if want_block_size or self.config.send_block_size_always:
            # Without a BLOCK_SIZE request GO promises byte granularity (as qemu-nbd), so a client that
            # never learnt the constraints may still send unaligned requests; the server must cope.
            minimum = min_block if (option == c.OPT_INFO or want_block_size) else 1
            preferred = self._preferred(info, minimum)
            maximum = self._maximum(info, minimum)
            self._rep(option, c.REP_INFO,
                      INFO_BLOCK_SIZE_STRUCT.pack(c.INFO_BLOCK_SIZE, minimum, preferred, maximum))
        flags = self._flags_for(info)
        self._rep(option, c.REP_INFO, INFO_EXPORT_STRUCT.pack(c.INFO_EXPORT, info.size, flags))
        if option == c.OPT_INFO and not want_block_size and min_block > 1:
            self._rep_err(option, c.REP_ERR_BLOCK_SIZE_REQD, "request NBD_INFO_BLOCK_SIZE to use this export")
            return
        self._rep(option, c.REP_ACK)
        if option == c.OPT_GO:
            self._enter_transmission(info, name, min_block if want_block_size else 1)
            self._queued = Ready(info)

    def _answer_meta(self, option: int, name: str, info: ExportInfo) -> None:
        available = list(dict.fromkeys(info.meta_contexts))
        listing = option == c.OPT_LIST_META_CONTEXT
        selected: set[str] = set()
        if listing and not self._pending_queries:
            selected.update(available)
        for raw in self._pending_queries:
            query = decode_string(raw)
            if query is None or ":" not in query:
                continue  # unknown namespaces and unusable queries are ignored, as the spec asks
            if query.endswith(":"):
                if listing:  # "base:", "qemu:" ... list a whole namespace; SET ignores them
                    selected.update(n for n in available if n.startswith(query))
            elif query in available:
                selected.add(query)
        chosen = {i: n for i, n in enumerate(available) if n in selected}
        for i, n in chosen.items():
            self._rep(option, c.REP_META_CONTEXT, U32.pack(0 if listing else i) + encode_message(n))
        self._rep(option, c.REP_ACK)
        if not listing:
            self.negotiated.meta_contexts = chosen
            self.negotiated.meta_export = name

    def answer_list(self, exports: Iterable[str | tuple[str, str]]) -> list[Buffer]:
        """Answer the pending ``ListRequest`` with export names or (name, description) pairs."""
        if self._state != _S_WAIT or self._pending_option != c.OPT_LIST:
            raise RuntimeError("answer_list() without a pending ListRequest")
        self._state = _S_OPTIONS
        self._pending_option = 0
        for e in exports:
            name, description = (e, "") if isinstance(e, str) else e
            raw = encode_message(name)
            self._rep(c.OPT_LIST, c.REP_SERVER, U32.pack(len(raw)) + raw + encode_message(description))
        self._rep(c.OPT_LIST, c.REP_ACK)
        return self.data_to_send()

    @staticmethod
    def _preferred(info: ExportInfo, minimum: int) -> int:
        return max(info.pref_block, minimum, 512)

    def _maximum(self, info: ExportInfo, minimum: int) -> int:
        """The largest READ/WRITE payload, as advertised and enforced: never below the preferred size."""
        return max(min(info.max_block, self.config.max_payload, 0xFFFFFFFF), self._preferred(info, minimum))

    def _flags_for(self, info: ExportInfo) -> int:
        f = c.FLAG_HAS_FLAGS
        if info.read_only:
            f |= c.FLAG_READ_ONLY
        if info.can_flush:
            f |= c.FLAG_SEND_FLUSH
        if info.can_fua:
            f |= c.FLAG_SEND_FUA
        if info.rotational:
            f |= c.FLAG_ROTATIONAL
        if info.can_trim:
            f |= c.FLAG_SEND_TRIM
        if info.can_zero:
            f |= c.FLAG_SEND_WRITE_ZEROES
            if info.can_fast_zero:
                f |= c.FLAG_SEND_FAST_ZERO
        if self.negotiated.structured:
            f |= c.FLAG_SEND_DF
        if info.can_multi_conn:
            f |= c.FLAG_CAN_MULTI_CONN
        if info.can_cache:
            f |= c.FLAG_SEND_CACHE
        return f

    def _enter_transmission(self, info: ExportInfo, name: str, align: int) -> int:
        neg = self.negotiated
        if neg.meta_export != name:
            neg.meta_contexts = {}  # contexts were negotiated for another export
        flags = self._flags_for(info)
        neg.export = info
        self._structured = neg.structured
        self._extended = neg.extended
        self.transmission_flags = flags
        self.phase = Phase.TRANSMISSION
        self._state = _S_TRANSMISSION
        self._size = info.size
        self._read_only = info.read_only
        self._align_mask = align - 1 if align > 1 and align & (align - 1) == 0 else 0
        self._max_payload = self._maximum(info, max(1, info.min_block) if align > 1 else 1)
        fua = c.CMD_FLAG_FUA if flags & c.FLAG_SEND_FUA else 0
        self._valid_flags = {
            c.CMD_READ: fua | (c.CMD_FLAG_DF if neg.structured else 0),
            c.CMD_WRITE: fua | (c.CMD_FLAG_PAYLOAD_LEN if neg.extended else 0),
            c.CMD_FLUSH: fua,
            c.CMD_TRIM: fua,
            c.CMD_CACHE: fua,
            c.CMD_WRITE_ZEROES: fua | c.CMD_FLAG_NO_HOLE
            | (c.CMD_FLAG_FAST_ZERO if flags & c.FLAG_SEND_FAST_ZERO else 0),
            c.CMD_BLOCK_STATUS: fua | c.CMD_FLAG_REQ_ONE,
        }
        self._bad_read_flags = ~self._valid_flags[c.CMD_READ] & 0xFFFF
        supported = {c.CMD_READ, c.CMD_WRITE}
        if flags & c.FLAG_SEND_FLUSH:
            supported.add(c.CMD_FLUSH)
        if flags & c.FLAG_SEND_TRIM:
            supported.add(c.CMD_TRIM)
        if flags & c.FLAG_SEND_WRITE_ZEROES:
            supported.add(c.CMD_WRITE_ZEROES)
        if flags & c.FLAG_SEND_CACHE:
            supported.add(c.CMD_CACHE)
        if neg.meta_contexts:
            supported.add(c.CMD_BLOCK_STATUS)
        self._supported = frozenset(supported)
        if neg.extended:
            self._hdr = EXTENDED_REQUEST_STRUCT
            self._req_magic = c.EXTENDED_REQUEST_MAGIC
        return flags

    # --- transmission: requests ---------------------------------------------------------------------------
    def _next_request(self) -> Event | None:
        if self._payload is not None:
            if self._payload_fill < len(self._payload):
                return self._need_more("a WRITE payload")
            ev = self._payload_event
            self._payload = None
            self._payload_event = None
            return ev
        if self._skip_event is not None:
            if self._skip:
                self._drop()
                if self._skip:
                    return self._need_more("a request payload")
            ev2, self._skip_event = self._skip_event, None
            return ev2
        buf = self._buf
        pos = self._pos
        hdr = self._hdr
        if len(buf) - pos < hdr.size:
            return self._need_more("a request header")
        magic, flags, cmd, cookie, offset, length = hdr.unpack_from(buf, pos)
        self._pos = pos + hdr.size
        if magic != self._req_magic:
            return self._fail(f"bad request magic 0x{magic:08x}")
        if self._extended:
            self._ext_offsets[cookie] = offset
        if (
            cmd == 0  # READ, the hot path
            and not flags & self._bad_read_flags
            and length <= self._max_payload
            and offset + length <= self._size
            and not (offset | length) & self._align_mask
        ):
            return Request(0, flags, cookie, offset, length)
        return self._request(flags, cmd, cookie, offset, length)

    def _request(self, flags: int, cmd: int, cookie: int, offset: int, length: int) -> Event | None:
        if cmd == c.CMD_DISC:
            return self._terminate(Disconnect())
        payload = length if (cmd == c.CMD_WRITE or (self._extended and flags & c.CMD_FLAG_PAYLOAD_LEN)) else 0
        if payload > self.config.max_payload:
            # The payload cannot be skipped safely: answer, then hang up (as qemu-nbd).
            self._terminate(ProtocolError(f"request payload of {payload} bytes is larger than the maximum"))
            self._queued = self._terminal
            return InvalidRequest(cookie, 22, f"len ({payload}) is larger than max len "
                                  f"({self.config.max_payload})", cmd)
        problem = self._validate(cmd, flags, offset, length, payload)
        if problem is not None:
            errno_, message = problem
            ev: Event = InvalidRequest(cookie, errno_, message, cmd)
            if payload:
                self._skip = payload
                self._skip_event = ev
                self._drop()
                if self._skip:
                    return self._need_more("a request payload")
                self._skip_event = None
            return ev
        if cmd == c.CMD_WRITE:
            return self._write(flags, cookie, offset, length)
        if cmd == c.CMD_BLOCK_STATUS:
            ncontexts = len(self.negotiated.meta_contexts)
            self._bs[cookie] = [offset, length, flags & c.CMD_FLAG_REQ_ONE, ncontexts]
        return Request(cmd, flags, cookie, offset, length)

    def _validate(
        self, cmd: int, flags: int, offset: int, length: int, payload: int
    ) -> tuple[int, str] | None:
        name = c.CMD_NAMES.get(cmd, str(cmd))
        if cmd not in _KNOWN_CMDS:
            return 22, f"invalid request type ({cmd}) received"
        if payload and cmd != c.CMD_WRITE:
            return 22, f"{name} does not take a payload"
        if cmd in (c.CMD_READ, c.CMD_WRITE, c.CMD_CACHE) and length > self._max_payload:
            return 22, f"len ({length}) is larger than max len ({self._max_payload})"
        if self._read_only and cmd in _WRITE_CMDS:
            return 1, "export is read-only"
        if cmd in _RANGE_CMDS and (offset > self._size or length > self._size - offset):
            errno_ = 28 if self.config.enospc_past_end and cmd in (c.CMD_WRITE, c.CMD_WRITE_ZEROES) else 22
            return errno_, f"operation past EOF; offset: {offset}, length: {length}, size: {self._size}"
        if flags & ~self._valid_flags[cmd]:
            return 22, f"unsupported flags for command {name} (got 0x{flags:x})"
        if cmd not in self._supported:
            if cmd == c.CMD_BLOCK_STATUS:
                return 22, "CMD_BLOCK_STATUS not negotiated"
            return 22, f"{name} was not advertised"
        if cmd == c.CMD_BLOCK_STATUS and length == 0:
            return 22, "need non-zero length"
        m = self._align_mask
        if m and cmd in _RANGE_CMDS and (offset & m or (length & m and offset + length != self._size)):
            return 22, f"request not aligned to the minimum block size {m + 1}"
        return None

    def _write(self, flags: int, cookie: int, offset: int, length: int) -> Event | None:
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail >= length:
            data = buf[pos : pos + length]
            self._pos = pos + length
            return Request(c.CMD_WRITE, flags, cookie, offset, length, memoryview(data))
        # Collect the rest straight from receive_data() into a buffer of the final size (no regrowth).
        payload = self.config.payload_buffer(length)
        with memoryview(buf) as view:
            payload[:avail] = view[pos:]
        buf.clear()
        self._pos = 0
        self._payload = payload
        self._payload_fill = avail
        self._payload_event = Request(c.CMD_WRITE, flags, cookie, offset, length, payload)
        return self._need_more("a WRITE payload")

    # --- transmission replies -----------------------------------------------------------------------------
    def _chunk_header(self, flags: int, rep_type: int, cookie: int, length: int) -> bytes:
        if self._extended:
            if flags & c.REPLY_FLAG_DONE:
                offset = self._ext_offsets.pop(cookie, 0)
            else:
                offset = self._ext_offsets.get(cookie, 0)
            return _EXTENDED_PACK(c.EXTENDED_REPLY_MAGIC, flags, rep_type, cookie, offset, length)
        return _STRUCTURED_PACK(c.STRUCTURED_REPLY_MAGIC, flags, rep_type, cookie, length)

    def reply_ok(self, cookie: int) -> list[Buffer]:
        """Success without data (WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE)."""
        if self._extended:
            return [self._chunk_header(c.REPLY_FLAG_DONE, c.REPLY_TYPE_NONE, cookie, 0)]
        return [_SIMPLE_PACK(c.SIMPLE_REPLY_MAGIC, 0, cookie)]

    def reply_error(
        self, cookie: int, errno: int, message: str = "", *, offset: int | None = None
    ) -> list[Buffer]:
        """Failure with a host errno. ``message`` goes out with structured replies; ``offset`` makes it an
        ERROR_OFFSET chunk (a READ that failed at that offset)."""
        err = nbd_errno(errno)
        self._bs.pop(cookie, None)
        if not self._structured:
            return [_SIMPLE_PACK(c.SIMPLE_REPLY_MAGIC, err, cookie)]
        msg = encode_message(message)
        if offset is None:
            payload = ERROR_STRUCT.pack(err, len(msg)) + msg
            rep_type = c.REPLY_TYPE_ERROR
        else:
            payload = ERROR_STRUCT.pack(err, len(msg)) + msg + OFFSET_STRUCT.pack(offset)
            rep_type = c.REPLY_TYPE_ERROR_OFFSET
        return [self._chunk_header(c.REPLY_FLAG_DONE, rep_type, cookie, len(payload)), payload]

    def reply_read(self, cookie: int, chunks: Sequence[Chunk], *, df: bool = False) -> list[Buffer]:
        """A successful READ. ``chunks`` cover the request in order: ``(offset, buffer)`` for data,
        ``(offset, length)`` for known zeroes. Without structured replies (or with ``df``) holes are sent
        as zero bytes in one data payload."""
        if len(chunks) == 1:
            off, data = chunks[0]
            if not isinstance(data, int):
                # The hot path: one data chunk.
                if not self._structured:
                    return [_SIMPLE_PACK(_SIMPLE_MAGIC, 0, cookie), data]
                n = len(data)
                if n and not self._extended:
                    head = _STRUCTURED_OFFSET_PACK(_STRUCTURED_MAGIC, _DONE, _OFFSET_DATA, cookie, 8 + n, off)
                    return [head, data]
                if n:
                    base = self._ext_offsets.pop(cookie, off)
                    head = _EXTENDED_OFFSET_PACK(c.EXTENDED_REPLY_MAGIC, _DONE, _OFFSET_DATA, cookie, base,
                                                 8 + n, off)
                    return [head, data]
        if not self._structured:
            out: list[Buffer] = [_SIMPLE_PACK(c.SIMPLE_REPLY_MAGIC, 0, cookie)]
            for _off, data in chunks:
                if isinstance(data, int):
                    out.extend(_zeros(data))
                else:
                    out.append(data)
            return out
        items = [(o, d) for o, d in chunks if (d if isinstance(d, int) else len(d)) > 0]
        if not items:
            return [self._chunk_header(c.REPLY_FLAG_DONE, c.REPLY_TYPE_NONE, cookie, 0)]
        has_hole = any(isinstance(d, int) for _o, d in items)
        if df and (len(items) > 1 or has_hole):
            # Don't fragment: one OFFSET_DATA chunk with the holes spelt out as zeroes.
            bufs: list[Buffer] = []
            for _o, d in items:
                if isinstance(d, int):
                    bufs.extend(_zeros(d))
                else:
                    bufs.append(d)
            total = sum(len(b) for b in bufs)
            head = self._chunk_header(c.REPLY_FLAG_DONE, c.REPLY_TYPE_OFFSET_DATA, cookie, 8 + total)
            return [head, OFFSET_STRUCT.pack(items[0][0]), *bufs]
        out = []
        last = len(items) - 1
        for i, (o, d) in enumerate(items):
            fl = c.REPLY_FLAG_DONE if i == last else 0
            if isinstance(d, int):
                out.append(self._chunk_header(fl, c.REPLY_TYPE_OFFSET_HOLE, cookie, 12))
                out.append(OFFSET_HOLE_STRUCT.pack(o, d))
            else:
                out.append(self._chunk_header(fl, c.REPLY_TYPE_OFFSET_DATA, cookie, 8 + len(d)))
                out.append(OFFSET_STRUCT.pack(o))
                out.append(d)
        return out

    def reply_block_status(
        self, cookie: int, context_id: int, extents: Iterable[tuple[int, int]], *, done: bool | None = None
    ) -> list[Buffer]:
        """One context's block status: ``extents`` are (length, flags) from the request offset onwards.

        The core clips them to the request: REQ_ONE, one extent within it; otherwise the extent that
        reaches the request's end is the last, and it may run on past it (the spec allows it where the
        server knows that much anyway) but never past the export, and without extended headers not past
        what 32 bits hold, cut at a multiple of the block size. Also a per-reply descriptor cap.
        ``done`` defaults to "this was the last negotiated context"."""
        state = self._bs.get(cookie)
        if state is None:
            offset, want, req_one, remaining = 0, None, False, 1
        else:
            offset, want, req_one_i, remaining = state
            req_one = bool(req_one_i)
        cap = max(1, self.config.max_block_status_bytes // (16 if self._extended else 8))
        wide = self._extended
        flat: list[int] = []
        total = 0
        for length, flags in extents:
            if length <= 0:
                continue
            if want is not None and length >= want - total:
                # the final extent
                inside = want - total
                if req_one:
                    length = inside
                else:
                    length = min(length, self._size - offset - total)
                    if not wide and length > 0xFFFFFFFF:
                        unit = max(self._align_mask + 1, 4096)
                        length = max(inside, 0xFFFFFFFF // unit * unit)
                want = total
            elif not wide and length > 0xFFFFFFFF:
                length = 0xFFFFFFFF
                want = total  # stop here: the next extent would start elsewhere
            flat.append(length)
            flat.append(flags & (0xFFFFFFFFFFFFFFFF if wide else 0xFFFFFFFF))
            total += length
            if req_one or len(flat) >= 2 * cap or (want is not None and total >= want):
                break
        if not flat:
            return self.reply_error(cookie, 5, "no block status available")
        if done is None:
            remaining -= 1
            done = remaining <= 0
            if state is not None:
                state[3] = remaining
        if done:
            self._bs.pop(cookie, None)
        n = len(flat) // 2
        if wide:
            payload = BLOCK_STATUS_EXT_HEAD_STRUCT.pack(context_id, n) + struct.pack(f">{2 * n}Q", *flat)
            rep_type = c.REPLY_TYPE_BLOCK_STATUS_EXT
        else:
            payload = struct.pack(f">I{2 * n}I", context_id, *flat)
            rep_type = c.REPLY_TYPE_BLOCK_STATUS
        head = self._chunk_header(c.REPLY_FLAG_DONE if done else 0, rep_type, cookie, len(payload))
        return [head, payload]
