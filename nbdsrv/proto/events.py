"""Events returned by ``ServerConnection.next_event()``, and ``ExportInfo``, the server's answer on an export.

Handshake phase:

- ``ExportInfoRequest(name, option)``: the client named an export (EXPORT_NAME, INFO, GO,
  LIST_META_CONTEXT, SET_META_CONTEXT). The core pauses (``next_event()`` returns None) until the server
  calls ``conn.answer_export(ExportInfo | None)``; None means "no such export".
- ``ListRequest()``: NBD_OPT_LIST. Answer with ``conn.answer_list([(name, description), ...])``.
- ``Ready(export)``: EXPORT_NAME or GO succeeded; the transmission phase starts with this export.
- ``StartTLS(discarded)``: the client asked for TLS and the core acknowledged it (the ACK is in
  ``conn.data_to_send()``). Write that, stop reading plaintext, run the TLS handshake on the connection,
  then call ``conn.tls_established()``; if the handshake fails, close. Bytes the client sent after
  STARTTLS in plaintext were dropped (``discarded`` of them), never parsed.

Transmission phase:

- ``Request``: a valid command (READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS). Already
  validated against the export and the negotiation; the server just performs it and replies.
- ``InvalidRequest(cookie, errno, message, cmd)``: the request failed validation; answer it with
  ``conn.reply_error(cookie, errno, message)``. Its WRITE payload, if any, was consumed.

Either phase:

- ``Disconnect()``: the client asked to end (NBD_CMD_DISC, or NBD_OPT_ABORT after whose ACK, found in
  ``conn.data_to_send()``, the server closes). Finish in-flight replies, write them, then close.
- ``ConnectionClosed()``: clean end of stream (EOF at a message boundary). Close.
- ``ProtocolError(message)``: the peer broke the protocol (bad magic, truncated message at EOF, payload
  over the limit, unknown client flags, an unknown export with EXPORT_NAME, ...). The connection is dead:
  write ``conn.data_to_send()`` then close. A WRITE over the payload limit gives an ``InvalidRequest``
  (answer it) immediately followed by ``ProtocolError``.

After ``Disconnect``, ``ConnectionClosed`` or ``ProtocolError``, ``next_event()`` returns the same
terminal event again forever, so a loop that calls it never spins on new input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nbdproto.constants import (
    CMD_FLAG_DF,
    CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    CMD_NAMES,
    META_BASE_ALLOCATION,
)


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the server tells the core about one export; the core derives the wire flags from it.

    Block sizes: ``min_block`` (1 = byte-granular), ``pref_block``, ``max_block`` (largest request the
    server accepts; 32 MiB unless smaller). ``meta_contexts`` lists the contexts this export can answer
    block status for, e.g. ("base:allocation", "qemu:allocation-depth").
    """

    name: str
    size: int
    read_only: bool = False
    description: str = ""
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = True
    can_cache: bool = True
    can_multi_conn: bool = True
    rotational: bool = False
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = 32 * 1024 * 1024
    meta_contexts: tuple[str, ...] = field(default=(META_BASE_ALLOCATION,))


class Event:
    """Base class of every event."""

    __slots__ = ()


@dataclass(slots=True)
class ExportInfoRequest(Event):
    """The client named an export; answer with ``conn.answer_export(info or None)``.

    ``option`` is the NBD_OPT_* that asked (constants.OPT_GO etc.): with OPT_GO / OPT_EXPORT_NAME a
    successful answer commits the connection to this export (a ``Ready`` event follows).
    """

    name: str
    option: int


@dataclass(slots=True)
class ListRequest(Event):
    """NBD_OPT_LIST: answer with ``conn.answer_list(exports)``."""


@dataclass(slots=True)
class Ready(Event):
    """The handshake finished; transmission starts on ``export``."""

    export: ExportInfo


@dataclass(slots=True)
class StartTLS(Event):
    """NBD_OPT_STARTTLS was acknowledged: upgrade the connection, then call ``conn.tls_established()``.

    ``discarded`` counts the plaintext bytes that followed STARTTLS in the buffer and were dropped."""

    discarded: int = 0


@dataclass(slots=True)
class Request(Event):
    """A validated transmission request.

    ``cmd`` is a constants.CMD_* value, ``flags`` the raw command flags, ``cookie`` the 64-bit cookie to
    echo in the reply. ``data`` is the WRITE payload (a memoryview the core no longer touches), else None.
    For BLOCK_STATUS, reply once per id in ``conn.meta_contexts``.
    """

    cmd: int
    flags: int
    cookie: int
    offset: int
    length: int
    data: memoryview | None = None

    @property
    def fua(self) -> bool:
        return bool(self.flags & CMD_FLAG_FUA)

    @property
    def no_hole(self) -> bool:
        return bool(self.flags & CMD_FLAG_NO_HOLE)

    @property
    def df(self) -> bool:
        return bool(self.flags & CMD_FLAG_DF)

    @property
    def req_one(self) -> bool:
        return bool(self.flags & CMD_FLAG_REQ_ONE)

    @property
    def fast_zero(self) -> bool:
        return bool(self.flags & CMD_FLAG_FAST_ZERO)

    @property
    def name(self) -> str:
        return CMD_NAMES.get(self.cmd, f"CMD_{self.cmd}")


@dataclass(slots=True)
class InvalidRequest(Event):
    """A request that failed validation: reply with ``conn.reply_error(cookie, errno, message)``.

    ``errno`` is a host errno (errno.EINVAL, errno.EPERM, errno.ENOSPC, ...).
    """

    cookie: int
    errno: int
    message: str
    cmd: int


@dataclass(slots=True)
class Disconnect(Event):
    """The client asked to disconnect (NBD_CMD_DISC or NBD_OPT_ABORT)."""


@dataclass(slots=True)
class ConnectionClosed(Event):
    """The peer closed its end at a message boundary."""


@dataclass(slots=True)
class ProtocolError(Event):
    """The peer broke the protocol; the connection is dead."""

    message: str


TERMINAL_EVENTS = (Disconnect, ConnectionClosed, ProtocolError)
