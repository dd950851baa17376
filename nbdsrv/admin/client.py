"""A small async client for the admin socket, and the `nbdsrv admin` command built on it.

    async with await AdminClient.connect("/run/nbdsrv/admin.sock") as c:
        pools = await c.execute("query-pools")
        vols = await c.execute("volume-list", {"pool": "local", "vmid": 100})

Errors the server answers with are raised as :class:`AdminError`, which keeps the server's error class
(``err.error_class``) and text; a connection that breaks raises :class:`AdminConnectionError`. Events are
queued on :attr:`AdminClient.events` as they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sys
from types import TracebackType
from typing import Any

from imagecore.errors import BlockError

DEFAULT_SOCKET = "/run/nbdsrv/admin.sock"


class AdminError(BlockError):
    """An error object the server answered a command with."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.json_class = error_class


class AdminConnectionError(BlockError):
    """The admin socket could not be reached, or closed under a command."""


class AdminClient:
    """One negotiated connection to the admin socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 greeting: dict[str, Any]) -> None:
        self._reader = reader
        self._writer = writer
        self.greeting = greeting
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader_task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, path: str = DEFAULT_SOCKET) -> AdminClient:
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=16 << 20)
            line = await reader.readline()
        except OSError as exc:
            raise AdminConnectionError(f"cannot connect to admin socket '{path}': "
                                       f"{exc.strerror or exc}") from None
        try:
            greeting = json.loads(line)
        except ValueError:
            greeting = None
        if not isinstance(greeting, dict) or "QMP" not in greeting:
            writer.close()
            if isinstance(greeting, dict) and isinstance(greeting.get("error"), dict):
                err = greeting["error"]
                raise AdminError(str(err.get("class")), str(err.get("desc")))
            raise AdminConnectionError(f"'{path}' did not greet as an admin socket")
        client = cls(reader, writer, greeting)
        try:
            await client.execute("qmp_capabilities")
        except BaseException:
            await client.close()
            raise
        return client

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run ``command`` and return what it returned; raises AdminError with the server's error."""
        mid = next(self._ids)
        msg: dict[str, Any] = {"execute": command, "id": mid}
        if arguments:
            msg["arguments"] = arguments
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[mid] = fut
        try:
            self._writer.write(json.dumps(msg).encode() + b"\n")
            await self._writer.drain()
            answer = await fut
        except (OSError, EOFError) as exc:
            raise AdminConnectionError(f"admin socket closed: {exc}") from None
        finally:
            self._pending.pop(mid, None)
        if "error" in answer:
            err = answer["error"]
            raise AdminError(str(err.get("class")), str(err.get("desc")))
        return answer.get("return")

    async def _read(self) -> None:
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                msg = json.loads(line)
                if "event" in msg:
                    self.events.put_nowait(msg)
                    continue
                fut = self._pending.get(msg.get("id")) if isinstance(msg.get("id"), int) else None
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (OSError, ValueError) as exc:
            self._fail(AdminConnectionError(f"admin socket: {exc}"))
            return
        self._fail(AdminConnectionError("admin socket closed by the server"))

    def _fail(self, exc: BaseException) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)

    async def close(self) -> None:
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


# -- `nbdsrv admin COMMAND key=value ...` -------------------------------------------------------------

def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses as JSON (numbers, true, objects), else the plain string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_pairs(pairs: list[str]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AdminError("GenericError", f"argument '{pair}' is not KEY=VALUE")
        args[key] = parse_value(value)
    return args


def render_human(value: Any) -> str:
    """A readable table for a list of records, ``key: value`` lines for one record."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        keys: list[str] = []
        for rec in value:
            keys.extend(k for k in rec if k not in keys and not isinstance(rec[k], (dict, list)))
        rows = [[_cell(rec.get(k)) for k in keys] for rec in value]
        widths = [max(len(k), *(len(r[i]) for r in rows)) for i, k in enumerate(keys)]
        lines = ["  ".join(k.upper().ljust(w) for k, w in zip(keys, widths, strict=True)).rstrip()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        return "\n".join(lines)
    if isinstance(value, dict):
        return "\n".join(f"{k}: {_cell(v)}" for k, v in value.items())
    return _cell(value)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


class ProgressBar:
    """A one-line bar redrawn on a terminal (stderr); nothing at all when stderr is not a terminal."""

    WIDTH = 40

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.shown = False

    def update(self, job_id: str, status: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        frac = min(max(done / total if total > 0 else 0.0, 0.0), 1.0)
        fill = int(frac * self.WIDTH)
        self.stream.write(f"\r{job_id} {status:<9} [{'#' * fill}{'.' * (self.WIDTH - fill)}] "
                          f"{frac * 100:5.1f}%")
        self.stream.flush()
        self.shown = True

    def end(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


async def wait_job(client: AdminClient, job_id: str, bar: ProgressBar | None = None) -> dict[str, Any]:
    """Follow a job's JOB_STATUS_CHANGE events until it concludes; returns its query-jobs record."""
    bar = bar or ProgressBar()
    waiter = asyncio.ensure_future(client.execute("job-wait", {"id": job_id}))
    try:
        while not waiter.done():
            getter = asyncio.ensure_future(client.events.get())
            await asyncio.wait({waiter, getter}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            ev = getter.result()
            data = ev.get("data") or {}
            if ev.get("event") == "JOB_STATUS_CHANGE" and data.get("id") == job_id:
                bar.update(job_id, str(data.get("status")), int(data.get("current-progress", 0)),
                           int(data.get("total-progress", 1)))
        record: dict[str, Any] = waiter.result()
    finally:
        waiter.cancel()
    bar.update(job_id, record["status"], record["current-progress"], record["total-progress"])
    bar.end()
    return record


async def run_command(socket_path: str, command: str, pairs: list[str], *, human: bool,
                      wait: bool = False) -> str:
    args = parse_pairs(pairs)
    async with await AdminClient.connect(socket_path) as client:
        result = await client.execute(command, args)
        if wait and isinstance(result, dict) and isinstance(result.get("job-id"), str):
            record = await wait_job(client, result["job-id"])
            await client.execute("job-dismiss", {"id": record["id"]})
            result = record
            if "error" in record:
                text = render_human(record) if human else json.dumps(record, indent=2)
                raise JobFailedError(f"job {record['id']} failed: {record['error']}", text)
    return render_human(result) if human else json.dumps(result, indent=2)


class JobFailedError(BlockError):
    """A job waited for with --wait concluded with an error; ``rendered`` is its record as printed."""

    def __init__(self, message: str, rendered: str) -> None:
        super().__init__(message)
        self.rendered = rendered


def default_socket() -> str:
    return os.environ.get("NBDSRV_ADMIN_SOCKET", DEFAULT_SOCKET)


__all__ = ["DEFAULT_SOCKET", "AdminClient", "AdminConnectionError", "AdminError", "JobFailedError",
           "ProgressBar", "default_socket", "parse_pairs", "render_human", "run_command", "wait_job"]
