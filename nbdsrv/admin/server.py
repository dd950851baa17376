"""The admin socket's transport: a Unix socket, one asyncio.Protocol per client, the command table behind it.

Only root and the server's own uid may connect (checked with SO_PEERCRED before the greeting). Each client's
commands run one at a time, in the order they arrive, and their answers go out in that order, as QMP's do.
Memory per client is bounded both ways: reading pauses while unparsed input or unsent output is over a
limit, so a client that pipelines thousands of commands without reading the answers is slowed, not fed;
events are not queued for a client that has stopped reading.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import socket
import struct
import time
from typing import Any, cast

from imagecore.errors import BlockError

from .commands import TABLE, AdminContext, CommandTable, version_record
from .wire import NO_ID, AdminConnection, Execute, Invalid, Negotiated, Runstate

log = logging.getLogger("nbdsrv.admin")

_HIGH_WATER = 1 << 20
_UCRED = struct.Struct("3i")


class ServerState(enum.Enum):
    """The admin server's life: created, then listening, then closing, then closed."""

    CREATED = "created"
    LISTENING = "listening"
    CLOSING = "closing"
    CLOSED = "closed"


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket, or None when the kernel does not say."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    _pid, uid, _gid = _UCRED.unpack(raw)
    return int(uid)


class AdminSession(asyncio.Protocol):
    """One admin client: the wire core fed from the socket, commands run in order on one task."""

    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.conn = AdminConnection(version_record())
        self.transport: asyncio.Transport | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._read_paused = False
        self._write_paused = False
        self._drained = asyncio.Event()
        self._drained.set()
        self.uid: int | None = None
        self.since = time.time()

    # -- asyncio.Protocol ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        self.uid = peer_uid(sock) if sock is not None else None
        if self.uid is None or self.uid not in (0, os.getuid()):
            log.warning("admin client refused", extra={"uid": self.uid})
            why = f"permission denied: uid {self.uid} may not use this socket"
            self.transport.write(self.conn.error(NO_ID, "GenericError", why))
            self.transport.close()
            return
        if self.server.state is not ServerState.LISTENING:
            self.transport.close()
            return
        self.server.clients.add(self)
        self.transport.write(self.conn.greeting())
        self._task = asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        if self.conn.buffered > self.conn.max_line + _HIGH_WATER and not self._read_paused:
            self._read_paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake.set()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self._wake.set()
        # keep our side open until the answers to what was already sent have gone out
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.clients.discard(self)
        self.conn.state = Runstate.CLOSED
        self._drained.set()
        self._wake.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._drained.clear()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._drained.set()

    # -- commands --------------------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_event(self, data: bytes) -> bool:
        """Queue an event line; dropped (False) for a client that has stopped reading what it is sent."""
        if self.transport is None or self.transport.is_closing() or not self.conn.accepts_events:
            return False
        if self.transport.get_write_buffer_size() > _HIGH_WATER:
            return False
        self.transport.write(data)
        return True

    async def _serve(self) -> None:
        try:
            while True:
                ev = self.conn.next_event()
                if ev is None:
                    if self.conn.state is Runstate.CLOSED:
                        break
                    if self._read_paused and self.transport is not None:
                        self._read_paused = False
                        self.transport.resume_reading()
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await self._answer(ev)
                # an answer not yet taken by the peer holds further commands back
                await self._drained.wait()
        except asyncio.CancelledError:
            pass
        finally:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

    async def _answer(self, ev: Execute | Negotiated | Invalid) -> None:
        if isinstance(ev, Invalid):
            self._send(self.conn.error(ev.id, ev.error_class, ev.desc))
        elif isinstance(ev, Negotiated):
            self._send(self.conn.reply(ev.id, {}))
        else:
            try:
                result = await self.server.table.run(self.server.ctx, ev.name, ev.arguments)
            except BlockError as exc:
                self._send(self.conn.error(ev.id, exc.json_class, str(exc)))
            except Exception as exc:  # a bug in a handler must cost one answer, not the server
                log.exception("admin command failed", extra={"command": ev.name})
                self._send(self.conn.error(ev.id, "GenericError", f"internal error: {exc}"))
            else:
                self._send(self.conn.reply(ev.id, result))


class AdminServer:
    """The listening admin socket and its clients."""

    def __init__(self, ctx: AdminContext, *, table: CommandTable = TABLE) -> None:
        self.ctx = ctx
        self.table = table
        self.state = ServerState.CREATED
        self.clients: set[AdminSession] = set()
        self.path: str | None = None
        self._server: asyncio.AbstractServer | None = None
        self.events_dropped = 0
        ctx.emit = self.emit

    async def listen(self, path: str) -> None:
        """Listen on ``path``: mode 0600 from the first moment, replacing a stale socket in one step."""
        sock = _private_socket(path)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: AdminSession(self), sock=sock)
        self.path = path
        self.state = ServerState.LISTENING

    async def listen_socket(self, sock: socket.socket) -> None:
        """Serve on a listening unix socket inherited by socket activation; its owner removes the path."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: AdminSession(self), sock=sock)
        self.state = ServerState.LISTENING

    def emit(self, name: str, data: dict[str, Any] | None) -> None:
        """Send an event to every negotiated client."""
        now = time.time()
        line: bytes | None = None
        for client in list(self.clients):
            line = line or client.conn.event(name, data, now)
            if not client.send_event(line) and client.conn.accepts_events:
                self.events_dropped += 1

    async def close(self) -> None:
        if self.state in (ServerState.CLOSING, ServerState.CLOSED):
            return
        self.state = ServerState.CLOSING
        if self._server is not None:
            self._server.close()
        for client in list(self.clients):
            if client.transport is not None:
                client.transport.close()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 5)
            except TimeoutError:
                pass
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.state = ServerState.CLOSED


def _private_socket(path: str) -> socket.socket:
    """A listening Unix socket at ``path`` that no one but its owner could ever connect to.

    Bound under a temporary name with a umask that leaves mode 0600, set listening, then renamed over
    ``path``, so there is no moment at which the socket exists with a wider mode.
    """
    import stat

    if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise BlockError(f"cannot listen on admin socket '{path}': it exists and is not a socket")
    head, tail = os.path.split(os.path.abspath(path))
    tmp = os.path.join(head, f".{tail}.{os.getpid()}.tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        old = os.umask(0o177)
        try:
            sock.bind(tmp)
        finally:
            os.umask(old)
        try:
            os.chmod(tmp, 0o600)
            sock.listen(64)
            os.rename(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        sock.close()
        raise BlockError(f"cannot listen on admin socket '{path}': {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


__all__ = ["AdminServer", "AdminSession", "ServerState", "peer_uid"]
