"""Structured logging on stderr: logfmt or JSON lines, with the fields passed as ``extra=``."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key, value in vars(record).items():
        if key not in _STANDARD and not key.startswith("_"):
            out[key] = value
    if record.exc_info and record.exc_info[0] is not None:
        out["exc"] = logging.Formatter().formatException(record.exc_info)
    return out


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str)


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\n\t\\'):
        return json.dumps(text)
    return text


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items())


class PeerFloodFilter(logging.Filter):
    """Bounds the warnings that peers can provoke (refused connections, failed TLS handshakes, protocol
    errors): each message passes at most ``burst`` times per ``window`` seconds, so that a flood of hostile
    connections cannot fill the disk or bury other lines. The first one let through after a window with
    suppressed lines carries ``suppressed=N``, how many of that message were dropped."""

    def __init__(self, burst: int = 20, window: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.window, self.clock = burst, window, clock
        # message -> [window start, passed in it, suppressed since the last one passed]
        self.seen: dict[str, list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not hasattr(record, "peer"):
            return True
        now = self.clock()
        state = self.seen.get(record.msg) if isinstance(record.msg, str) else None
        if state is None:
            if len(self.seen) > 1024:  # messages are a fixed set; a bound all the same
                self.seen.clear()
            state = self.seen[str(record.msg)] = [now, 0, 0]
        if now - state[0] >= self.window:
            state[0], state[1] = now, 0
        if state[1] >= self.burst:
            state[2] += 1
            return False
        state[1] += 1
        if state[2]:
            record.suppressed = int(state[2])
            state[2] = 0
        return True


def setup_logging(level: str = "info", fmt: str = "logfmt") -> None:
    """Send the ``nbdsrv`` and ``imagecore`` loggers to stderr in the chosen format, warnings provoked by
    peers rate-limited (:class:`PeerFloodFilter`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else LogfmtFormatter())
    handler.addFilter(PeerFloodFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
