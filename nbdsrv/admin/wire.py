"""The admin socket's wire protocol, sans-IO: QMP's greeting, negotiation, commands and replies as JSON lines.

The transport feeds received bytes to :meth:`AdminConnection.receive_data` and takes events from
:meth:`AdminConnection.next_event`; it turns answers into bytes with :meth:`reply`, :meth:`error` and
:meth:`event`. Nothing here reads a socket, a clock or a file.

What a peer can get wrong, and what it is answered (every answer leaves the connection usable):

    framing      a message longer than ``max_line``       GenericError, skipped to the end of its line
    JSON         not valid JSON, not UTF-8                 GenericError "JSON parse error, ..." (no id)
    message      not an object, no or bad ``execute``,     GenericError, with the id when there was one
                 ``arguments`` not an object, an
                 unexpected member
    negotiation  a command before ``qmp_capabilities``     CommandNotFound
                 ``qmp_capabilities`` a second time        CommandNotFound
                 a capability this server does not offer   GenericError
    command      an unknown name                           CommandNotFound (decided by the command table)

The texts are QEMU's own (qapi/qmp-dispatch.c), so scripts written against QMP read them unchanged.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from typing import Any

MAX_LINE = 1 << 20
# Outside strings: what changes the framing state, or a byte no JSON token contains.
_OUTSIDE = re.compile(rb'["{}\[\]\n]|[^ \t\r0-9,:.+\-eEtrufalsn]')
_IN_STRING = re.compile(rb'["\\]')
# The capabilities a client may enable; out-of-band execution is not offered.
CAPABILITIES: tuple[str, ...] = ()


class Runstate(enum.Enum):
    """Where one admin connection is: commands are refused until the client negotiates."""

    NEGOTIATING = "negotiating"
    RUNNING = "running"
    CLOSED = "closed"


class _NoId:
    """The id of a message that carried none (``None`` is a valid JSON id: null)."""

    def __repr__(self) -> str:
        return "NO_ID"


NO_ID: Any = _NoId()


@dataclass(frozen=True, slots=True)
class Execute:
    """A command to run: answer it with :meth:`AdminConnection.reply` or :meth:`AdminConnection.error`."""

    name: str
    arguments: dict[str, Any]
    id: Any = NO_ID


@dataclass(frozen=True, slots=True)
class Negotiated:
    """``qmp_capabilities`` succeeded: answer it with an empty return."""

    id: Any = NO_ID
    enabled: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Invalid:
    """A message refused by the protocol itself: send the error as it is."""

    error_class: str
    desc: str
    id: Any = NO_ID


AdminEvent = Execute | Negotiated | Invalid

_MEMBERS = frozenset({"execute", "arguments", "id"})


class AdminConnection:
    """The protocol state of one admin client."""

    def __init__(self, version: dict[str, Any], *, max_line: int = MAX_LINE) -> None:
        self.state = Runstate.NEGOTIATING
        self.max_line = max_line
        self._version = version
        self._buf = bytearray()
        # True while the rest of an over-long message is being thrown away, to the end of its line
        self._skipping = False
        self._reset_scan()

    # -- output ----------------------------------------------------------------------------------------
    def greeting(self) -> bytes:
        return _line({"QMP": {"version": self._version, "capabilities": list(CAPABILITIES)}})

    def reply(self, id: Any, value: Any) -> bytes:
        msg: dict[str, Any] = {"return": value}
        if id is not NO_ID:
            msg["id"] = id
        return _line(msg)

    def error(self, id: Any, error_class: str, desc: str) -> bytes:
        msg: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
        if id is not NO_ID:
            msg["id"] = id
        return _line(msg)

    def event(self, name: str, data: dict[str, Any] | None, timestamp: float) -> bytes:
        """An asynchronous event; QMP stamps it with the wall-clock time in seconds and microseconds."""
        seconds = int(timestamp)
        msg: dict[str, Any] = {"event": name}
        if data is not None:
            msg["data"] = data
        msg["timestamp"] = {"seconds": seconds, "microseconds": int((timestamp - seconds) * 1_000_000)}
        return _line(msg)

    @property
    def accepts_events(self) -> bool:
        """QMP sends events only once the client has negotiated."""
        return self.state is Runstate.RUNNING

    # -- input -----------------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed its side."""
        if not data:
            self.state = Runstate.CLOSED
            return
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into events: the transport pauses reading above a limit."""
        return len(self._buf)

    def next_event(self) -> AdminEvent | None:
        """The next complete message, or None until more data arrives.

        Messages are framed as QEMU's JSON streamer frames them: an object ends where its braces
        balance, with or without a newline after it (the ``qemu.qmp`` client sends none), so several
        may share a line and one may span lines. Anything else (a bare value, a byte no JSON token
        has) ends at the next newline and is answered with a parse error.
        """
        while True:
            if self._skipping:
                eol = self._buf.find(b"\n")
                if eol < 0:
                    del self._buf[:]
                    return None
                del self._buf[:eol + 1]
                self._skipping = False
                self._reset_scan()
            if self._pos == 0:
                # whitespace between messages is no part of either
                blank = len(self._buf) - len(self._buf.lstrip())
                del self._buf[:blank]
            end = self._scan()
            if end is None:
                if len(self._buf) > self.max_line:
                    self._skipping = True
                    return self._too_long()
                return None
            raw = bytes(self._buf[:end])
            del self._buf[:end]
            self._reset_scan()
            if len(raw) > self.max_line:
                return self._too_long()
            if raw.strip():
                return self._message(raw)

    def _reset_scan(self) -> None:
        self._pos = 0
        self._depth = 0
        self._in_string = False
        self._bad = False

    def _scan(self) -> int | None:
        """Where the message at the start of the buffer ends, scanning only bytes not seen before."""
        buf, pos = self._buf, self._pos
        n = len(buf)
        while pos < n:
            if self._in_string:
                m = _IN_STRING.search(buf, pos)
                if m is None:
                    pos = n
                    break
                pos = m.end()
                if m.group() == b"\\":
                    if pos >= n:
                        pos -= 1  # see the escaped byte together with its backslash next time
                        break
                    pos += 1
                else:
                    self._in_string = False
                continue
            if self._depth == 0 and not self._bad:
                # before a message: whitespace only, then a container opens it or a bare value starts
                while pos < n and buf[pos] in b" \t\r\n":
                    pos += 1
                if pos >= n:
                    break
                if buf[pos] not in b"{[":
                    self._bad = True  # a bare value or garbage: it ends at the end of its line
            m = _OUTSIDE.search(buf, pos)
            if m is None:
                pos = n
                break
            pos = m.end()
            c = m.group()
            if c == b"\n":
                if self._bad:
                    self._pos = pos
                    return pos
            elif c == b'"':
                self._in_string = True
            elif c in (b"{", b"["):
                self._depth += 1
            elif c in (b"}", b"]"):
                self._depth -= 1
                if self._depth <= 0 and not self._bad:
                    self._pos = pos
                    return pos
            else:
                self._bad = True  # a byte that starts no JSON token, as QEMU's lexer refuses it
        self._pos = pos
        return None

    def _too_long(self) -> Invalid:
        return Invalid("GenericError", f"JSON parse error, input message longer than {self.max_line} bytes")

    def _message(self, raw: bytes) -> AdminEvent:
        try:
            msg = json.loads(raw, parse_constant=_no_constant)
        except UnicodeDecodeError:
            return Invalid("GenericError", "JSON parse error, invalid UTF-8 sequence in string")
        except (ValueError, RecursionError) as exc:
            if isinstance(exc, RecursionError):
                text = "nesting too deep"
            else:
                text = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            return Invalid("GenericError", f"JSON parse error, {text}")
        if not isinstance(msg, dict):
            return Invalid("GenericError", "QMP input must be a JSON object")
        mid = msg.get("id", NO_ID)
        for key in msg:
            if key not in _MEMBERS:
                if key == "exec-oob":
                    return Invalid("GenericError", "QMP input member 'exec-oob' is unexpected", mid)
                return Invalid("GenericError", f"QMP input member '{key}' is unexpected", mid)
        if "execute" not in msg:
            return Invalid("GenericError", "QMP input lacks member 'execute'", mid)
        name = msg["execute"]
        if not isinstance(name, str):
            return Invalid("GenericError", "QMP input member 'execute' must be a string", mid)
        args = msg.get("arguments", {})
        if not isinstance(args, dict):
            return Invalid("GenericError", "QMP input member 'arguments' must be an object", mid)
        if name == "qmp_capabilities":
            return self._negotiate(args, mid)
        if self.state is Runstate.NEGOTIATING:
            return Invalid("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'",
                           mid)
        return Execute(name, args, mid)

    def _negotiate(self, args: dict[str, Any], mid: Any) -> AdminEvent:
        if self.state is not Runstate.NEGOTIATING:
            return Invalid("CommandNotFound", "Capabilities negotiation is already complete, command ignored",
                           mid)
        for key in args:
            if key != "enable":
                return Invalid("GenericError", f"Parameter '{key}' is unexpected", mid)
        enable = args.get("enable", [])
        if not isinstance(enable, list) or not all(isinstance(c, str) for c in enable):
            return Invalid("GenericError", "Invalid parameter type for 'enable', expected: array", mid)
        for cap in enable:
            if cap not in CAPABILITIES:
                return Invalid("GenericError", f"Capability '{cap}' not available", mid)
        self.state = Runstate.RUNNING
        return Negotiated(mid, tuple(enable))


def _no_constant(name: str) -> Any:
    # NaN and Infinity are Python's extension to JSON; QMP's parser refuses them
    raise ValueError(f"invalid keyword '{name}'")


def _line(msg: dict[str, Any]) -> bytes:
    # ensure_ascii keeps every line valid for clients that read bytes; separators as QEMU prints them
    return json.dumps(msg, separators=(", ", ": ")).encode() + b"\n"


__all__ = ["CAPABILITIES", "MAX_LINE", "NO_ID", "AdminConnection", "AdminEvent", "Execute", "Invalid",
           "Negotiated", "Runstate"]
