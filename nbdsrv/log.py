"""Structured logging on stderr: logfmt or JSON lines, with the fields passed as ``extra=``.

With JSON lines (for container log collectors) every line the process writes to stderr is one JSON object:
records, start-up errors (`report_error`), argument errors, Python warnings and any uncaught exception
(a traceback must never happen, but if one does it arrives as one record with the traceback in "exc").
The format is chosen by --log-format, the configuration file, or $NBDSRV_LOG_FORMAT; setup_logging puts
the choice in the environment, so that the job workers the server starts log the same way.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

ENV_FORMAT = "NBDSRV_LOG_FORMAT"

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


def early_format(argv: list[str]) -> str:
    """The log format before the configuration is read (for errors in reading it): --log-format in
    ``argv``, else $NBDSRV_LOG_FORMAT, else logfmt."""
    fmt = os.environ.get(ENV_FORMAT, "")
    for i, arg in enumerate(argv):
        if arg == "--log-format" and i + 1 < len(argv):
            fmt = argv[i + 1]
        elif arg.startswith("--log-format="):
            fmt = arg.split("=", 1)[1]
    return fmt if fmt in ("logfmt", "json") else "logfmt"


def _uncaught(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("nbdsrv").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or issubclass(args.exc_type, SystemExit):
        return
    logging.getLogger("nbdsrv").critical("uncaught exception in a thread",
                                         exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
                                         extra={"thread_name": args.thread.name if args.thread else None})


class NodeFilter(logging.Filter):
    """Puts ``node=NAME`` on every record, so that the lines of several nodes serving one pool can be
    merged and still be told apart."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "node"):
            record.node = self.node
        return True


def setup_logging(level: str = "info", fmt: str = "logfmt", node: str | None = None) -> None:
    """Send the ``nbdsrv`` and ``imagecore`` loggers to stderr in the chosen format, warnings provoked by
    peers rate-limited (:class:`PeerFloodFilter`), and with them Python's warnings and any uncaught
    exception; with ``node``, every record carries ``node=NAME``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else LogfmtFormatter())
    handler.addFilter(PeerFloodFilter())
    if node is not None:
        handler.addFilter(NodeFilter(node))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.captureWarnings(True)
    sys.excepthook = _uncaught
    threading.excepthook = _uncaught_in_thread
    os.environ[ENV_FORMAT] = fmt


def report_error(message: str, fmt: str) -> None:
    """A fatal error before or outside the loggers (bad arguments, configuration, start-up): qemu-nbd's
    "nbdsrv: MESSAGE" line in logfmt, one JSON record in json."""
    if fmt == "json":
        record = logging.LogRecord("nbdsrv", logging.ERROR, __file__, 0, message, None, None)
        sys.stderr.write(JSONFormatter().format(record) + "\n")
    else:
        sys.stderr.write(f"nbdsrv: {message}\n")
    sys.stderr.flush()
