"""A sans-IO NBD client state machine: builds handshake options and requests, parses what a server sends.

Used by imagecore's nbd block driver, the pair tests (client and server cores wired in memory), tools and
benchmarks.
It is deliberately literal: every option and request is built explicitly by the caller, so tests can also
send malformed ones (``raw_option``, ``raw_request``). Use::

    cl = ClientConnection()
    cl.receive_data(greeting); cl.next_event()           # -> Greeting
    send(cl.client_flags())
    send(cl.opt_go("disk", [INFO_BLOCK_SIZE]))
    ... OptionReply events ...; after GO's ACK cl.transmission is True
    send(cl.request(CMD_READ, cookie=1, offset=0, length=4096))
    ... SimpleReply / Chunk events ...
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from . import constants as c
from .wire import (
    CLIENT_FLAGS_STRUCT,
    EXPORT_NAME_REPLY_STRUCT,
    EXTENDED_REPLY_STRUCT,
    EXTENDED_REQUEST_STRUCT,
    GREETING_STRUCT,
    OPTION_HEADER_STRUCT,
    OPTION_REPLY_HEADER_STRUCT,
    REQUEST_STRUCT,
    SIMPLE_REPLY_STRUCT,
    STRUCTURED_REPLY_STRUCT,
)


class ClientProtocolError(Exception):
    """The server sent something this client cannot parse."""


@dataclass(slots=True)
class Greeting:
    handshake_flags: int


@dataclass(slots=True)
class OptionReply:
    option: int
    reply_type: int
    payload: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.reply_type & c.REP_FLAG_ERROR)


@dataclass(slots=True)
class ExportNameReply:
    size: int
    transmission_flags: int
    zeroes: int  # how many padding bytes followed


@dataclass(slots=True)
class SimpleReply:
    cookie: int
    error: int
    data: bytes


@dataclass(slots=True)
class Chunk:
    cookie: int
    flags: int
    reply_type: int
    payload: bytes
    offset: int | None = None  # the request offset echoed by an extended header

    @property
    def done(self) -> bool:
        return bool(self.flags & c.REPLY_FLAG_DONE)


ClientEvent = Greeting | OptionReply | ExportNameReply | SimpleReply | Chunk


def _string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack(">I", len(raw)) + raw


class ClientConnection:
    """The client side of one NBD connection. No I/O."""

    def __init__(self, *, fixed_newstyle: bool = True, no_zeroes: bool = True) -> None:
        self.flags = (c.FLAG_C_FIXED_NEWSTYLE if fixed_newstyle else 0) | (
            c.FLAG_C_NO_ZEROES if no_zeroes else 0
        )
        self.structured = False
        self.extended = False
        self.transmission = False
        self._buf = bytearray()
        self._greeted = False
        self._last_option = 0
        self._reads: dict[int, int] = {}  # cookie -> READ length, to frame simple replies
        self._expect_export_name = False

    # --- building -------------------------------------------------------------------------------------------
    def client_flags(self) -> bytes:
        return CLIENT_FLAGS_STRUCT.pack(self.flags)

    def raw_option(self, option: int, data: bytes = b"", *, length: int | None = None,
                   magic: int = c.IHAVEOPT) -> bytes:
        """Any option, optionally with a lying length or magic."""
        self._last_option = option
        if option == c.OPT_EXPORT_NAME:
            self._expect_export_name = True
        return OPTION_HEADER_STRUCT.pack(magic, option, len(data) if length is None else length) + data

    def opt_export_name(self, name: str) -> bytes:
        return self.raw_option(c.OPT_EXPORT_NAME, name.encode())

    def opt_go(self, name: str, info: Iterable[int] = (), *, option: int = c.OPT_GO) -> bytes:
        reqs = list(info)
        data = _string(name) + struct.pack(f">H{len(reqs)}H", len(reqs), *reqs)
        return self.raw_option(option, data)

    def opt_info(self, name: str, info: Iterable[int] = ()) -> bytes:
        return self.opt_go(name, info, option=c.OPT_INFO)

    def opt_meta(self, option: int, name: str, queries: Iterable[str]) -> bytes:
        qs = list(queries)
        data = _string(name) + struct.pack(">I", len(qs)) + b"".join(_string(q) for q in qs)
        return self.raw_option(option, data)

    def request(self, cmd: int, *, cookie: int, offset: int = 0, length: int = 0, flags: int = 0,
                data: bytes = b"") -> bytes:
        """A request; for WRITE ``length`` defaults to ``len(data)``, and PAYLOAD_LEN is set if extended."""
        if cmd == c.CMD_WRITE:
            length = length or len(data)
            if self.extended:
                flags |= c.CMD_FLAG_PAYLOAD_LEN
        return self.raw_request(cmd, cookie=cookie, offset=offset, length=length, flags=flags) + data

    def raw_request(self, cmd: int, *, cookie: int, offset: int = 0, length: int = 0, flags: int = 0,
                    magic: int | None = None) -> bytes:
        if cmd == c.CMD_READ:
            self._reads[cookie] = length  # a simple reply's data length is only known from the request
        if self.extended:
            return EXTENDED_REQUEST_STRUCT.pack(
                c.EXTENDED_REQUEST_MAGIC if magic is None else magic, flags, cmd, cookie, offset, length)
        magic = c.REQUEST_MAGIC if magic is None else magic
        return REQUEST_STRUCT.pack(magic, flags, cmd, cookie, offset, length)

    # --- parsing -------------------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_event(self) -> ClientEvent | None:
        buf = self._buf
        if not self._greeted:
            if len(buf) < GREETING_STRUCT.size:
                return None
            nbdmagic, ihaveopt, hflags = GREETING_STRUCT.unpack_from(buf)
            if nbdmagic != c.NBDMAGIC or ihaveopt != c.IHAVEOPT:
                raise ClientProtocolError("bad greeting")
            del buf[: GREETING_STRUCT.size]
            self._greeted = True
            return Greeting(hflags)
        if not self.transmission:
            if self._expect_export_name:
                pad = 0 if self.flags & c.FLAG_C_NO_ZEROES else 124
                n = EXPORT_NAME_REPLY_STRUCT.size + pad
                if len(buf) < n:
                    return None
                size, tflags = EXPORT_NAME_REPLY_STRUCT.unpack_from(buf)
                del buf[:n]
                self._expect_export_name = False
                self.transmission = True
                return ExportNameReply(size, tflags, pad)
            hs = OPTION_REPLY_HEADER_STRUCT.size
            if len(buf) < hs:
                return None
            magic, option, rep_type, length = OPTION_REPLY_HEADER_STRUCT.unpack_from(buf)
            if magic != c.OPT_REPLY_MAGIC:
                raise ClientProtocolError(f"bad option reply magic 0x{magic:x}")
            if len(buf) < hs + length:
                return None
            payload = bytes(buf[hs : hs + length])
            del buf[: hs + length]
            if rep_type == c.REP_ACK:
                if option == c.OPT_STRUCTURED_REPLY:
                    self.structured = True
                elif option == c.OPT_EXTENDED_HEADERS:
                    self.structured = self.extended = True
                elif option == c.OPT_GO:
                    self.transmission = True
            return OptionReply(option, rep_type, payload)
        if len(buf) < 4:
            return None
        (magic,) = struct.unpack_from(">I", buf)
        if magic == c.SIMPLE_REPLY_MAGIC:
            hs = SIMPLE_REPLY_STRUCT.size
            if len(buf) < hs:
                return None
            _m, error, cookie = SIMPLE_REPLY_STRUCT.unpack_from(buf)
            n = self._reads.get(cookie, 0) if error == 0 else 0
            if len(buf) < hs + n:
                return None
            data = bytes(buf[hs : hs + n])
            del buf[: hs + n]
            self._reads.pop(cookie, None)
            return SimpleReply(cookie, error, data)
        if magic == c.STRUCTURED_REPLY_MAGIC:
            hs = STRUCTURED_REPLY_STRUCT.size
            if len(buf) < hs:
                return None
            _m, flags, rep_type, cookie, length = STRUCTURED_REPLY_STRUCT.unpack_from(buf)
            offset = None
        elif magic == c.EXTENDED_REPLY_MAGIC:
            hs = EXTENDED_REPLY_STRUCT.size
            if len(buf) < hs:
                return None
            _m, flags, rep_type, cookie, offset, length = EXTENDED_REPLY_STRUCT.unpack_from(buf)
        else:
            raise ClientProtocolError(f"bad reply magic 0x{magic:x}")
        if len(buf) < hs + length:
            return None
        payload = bytes(buf[hs : hs + length])
        del buf[: hs + length]
        if flags & c.REPLY_FLAG_DONE:
            self._reads.pop(cookie, None)
        return Chunk(cookie, flags, rep_type, payload, offset)

    def events(self) -> list[ClientEvent]:
        """All complete events buffered so far."""
        out: list[ClientEvent] = []
        while (ev := self.next_event()) is not None:
            out.append(ev)
        return out

    @property
    def pending(self) -> int:
        """Bytes received but not yet parsed."""
        return len(self._buf)
