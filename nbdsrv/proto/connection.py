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
  always preserved if the transport writes every list it gets, in the order it gets them.
- While an ``ExportInfoRequest`` or ``ListRequest`` is unanswered, ``next_event()`` returns None; the
  server may look the export up asynchronously and call ``answer_*`` later.
- Transmission replies (``reply_*``) may be called in any order and from any task of the event loop;
  they are cheap and keep no per-request state except for BLOCK_STATUS (to clip to the request).
- ``errno`` arguments are host errno values; the core maps them to the NBD table.
- ``receive_data`` never raises for bad input: bad input becomes ``InvalidRequest`` or ``ProtocolError``.
  It raises RuntimeError only if called after EOF was fed.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .constants import MAX_OPTION_LENGTH, MAX_PAYLOAD
from .events import Event, ExportInfo

Buffer = bytes | bytearray | memoryview
Chunk = tuple[int, Buffer] | tuple[int, int]
"""A READ reply chunk: ``(offset, buffer)`` for data or ``(offset, length)`` for a known-zero hole."""


class Phase(enum.Enum):
    """Where the connection is."""

    HANDSHAKE = "handshake"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ProtocolConfig:
    """Server-wide protocol policy.

    ``max_payload``: largest READ/WRITE length accepted (the spec's 32 MiB default).
    ``max_option_length``: largest option payload buffered; longer ones are drained and refused.
    ``structured_replies`` / ``extended_headers``: whether the server agrees to these options.
    ``max_block_status_bytes``: bound on the descriptors of one block status chunk (qemu: 1 MiB).
    ``send_block_size_always``: send NBD_INFO_BLOCK_SIZE to INFO/GO even when not requested.
    """

    max_payload: int = MAX_PAYLOAD
    max_option_length: int = MAX_OPTION_LENGTH
    structured_replies: bool = True
    extended_headers: bool = True
    max_block_status_bytes: int = 1 << 20
    send_block_size_always: bool = True


class ServerConnection:
    """One NBD server connection, from the greeting to the end of transmission. No I/O."""

    def __init__(self, config: ProtocolConfig | None = None) -> None:
        self.config = config or ProtocolConfig()
        self.phase = Phase.HANDSHAKE
        self.export: ExportInfo | None = None
        """The export being served (set when ``Ready`` is emitted)."""
        self.structured = False
        """Structured replies negotiated (also true with extended headers)."""
        self.extended = False
        """Extended headers negotiated."""
        self.meta_contexts: dict[int, str] = {}
        """Negotiated meta contexts: id -> name. Block status replies go once per id, in this order."""
        self.transmission_flags = 0
        """The 16-bit transmission flags sent for ``export``."""

    # --- input ----------------------------------------------------------------------------------------
    def initial_data(self) -> bytes:
        """The greeting to send first: NBDMAGIC, IHAVEOPT, server handshake flags."""
        raise NotImplementedError

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes read from the peer; ``b""`` means EOF. The data is copied; the caller may reuse it."""
        raise NotImplementedError

    def next_event(self) -> Event | None:
        """The next event, or None when more data (or an answer to a pending request) is needed."""
        raise NotImplementedError

    def data_to_send(self) -> list[Buffer]:
        """Take the handshake replies the core produced on its own (may be empty)."""
        raise NotImplementedError

    # --- handshake answers ------------------------------------------------------------------------------
    def answer_export(self, info: ExportInfo | None) -> list[Buffer]:
        """Answer the pending ``ExportInfoRequest``: the export's description, or None if it doesn't exist."""
        raise NotImplementedError

    def answer_list(self, exports: Iterable[str | tuple[str, str]]) -> list[Buffer]:
        """Answer the pending ``ListRequest`` with export names or (name, description) pairs."""
        raise NotImplementedError

    # --- transmission replies -----------------------------------------------------------------------------
    def reply_ok(self, cookie: int) -> list[Buffer]:
        """Success without data (WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE)."""
        raise NotImplementedError

    def reply_error(
        self, cookie: int, errno: int, message: str = "", *, offset: int | None = None
    ) -> list[Buffer]:
        """Failure with a host errno. ``message`` goes out with structured replies; ``offset`` makes it an
        ERROR_OFFSET chunk (a READ that failed at that offset)."""
        raise NotImplementedError

    def reply_read(self, cookie: int, chunks: Sequence[Chunk], *, df: bool = False) -> list[Buffer]:
        """A successful READ. ``chunks`` cover the request in order: ``(offset, buffer)`` for data,
        ``(offset, length)`` for known zeroes. Without structured replies (or with ``df``) holes are sent
        as zero bytes in one data payload."""
        raise NotImplementedError

    def reply_block_status(
        self, cookie: int, context_id: int, extents: Sequence[tuple[int, int]], *, done: bool | None = None
    ) -> list[Buffer]:
        """One context's block status: ``extents`` are (length, flags) from the request offset onwards.

        The core clips them to the request (REQ_ONE: one extent; per-reply descriptor cap; 32-bit lengths
        without extended headers). ``done`` defaults to "this was the last negotiated context"."""
        raise NotImplementedError
