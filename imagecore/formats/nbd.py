"""The nbd protocol driver: an NBD export as an image, over one connection (TCP or Unix socket) with
requests pipelined by cookie, as qemu's nbd block driver.

The protocol itself (handshake options, request and reply framing) is ``nbdproto``'s sans-IO client; this
module only does the asyncio I/O around it. It asks for structured replies and the ``base:allocation``
meta context, so that ``map`` and ``convert`` see the export's holes and zeroes.

A format other than raw layers over the export as qemu layers a format over a protocol: :class:`NbdFile`
is a :class:`~imagecore.hostio.HostFile` whose bytes are the export's, so the qcow2 and vmdk drivers run
over it unchanged. Their host I/O is partly synchronous (probing, lseek-like block status, writes from
worker threads), so every connection lives on one event loop of its own, in a thread of its own: a
coroutine on the caller's loop awaits it across threads, and a synchronous caller on any other thread
(the caller's loop included) blocks on it, while requests stay pipelined on the one connection.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import os
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nbdproto import constants as c
from nbdproto.client import (
    Chunk,
    ClientConnection,
    ClientEvent,
    ClientProtocolError,
    ExportNameReply,
    Greeting,
    OptionReply,
    SimpleReply,
)

from ..driver import (
    PROBE_BYTES,
    RAW_PROBE_WARNING,
    BlockDriver,
    Capabilities,
    ImageOpener,
    OpenContext,
    get_format,
    probe_bytes,
)
from ..errors import (
    BlockError,
    HostIOError,
    ImageFormatError,
    InvalidArgumentError,
    NoSpaceError,
    PermissionDeniedError,
    UnsupportedError,
)
from ..extent import Extent
from ..filenames import nbd_display_name, tls_context, verify_message
from ..hostio import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, HostFile

T = TypeVar("T")

# what one request may carry when the server names no maximum (qemu's NBD_MAX_BUFFER_SIZE)
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
# a block-status request covers at most this much (servers clip their answer anyway)
STATUS_WINDOW = 1 << 30
_READ_BUF = 256 * 1024

# the nbd driver's runtime options (qapi BlockdevOptionsNbd) as qemu-img accepts them
OPTIONS = ("driver", "server", "export", "tls-creds", "tls-hostname", "x-dirty-bitmap", "reconnect-delay",
           "open-timeout", "node-name", "read-only", "auto-read-only", "force-share", "discard", "cache",
           "detect-zeroes")


_OPTION_NAMES = {c.OPT_GO: "go", c.OPT_STARTTLS: "starttls", c.OPT_STRUCTURED_REPLY: "structured reply",
                 c.OPT_SET_META_CONTEXT: "set meta context"}


def option_error(rep: OptionReply) -> BlockError:
    """A refused option as qemu's client words it (nbd_handle_reply_err): its own line, a hint for a
    server that wants TLS, then the server's message."""
    opt = f"option {rep.option} ({_OPTION_NAMES.get(rep.option, 'unknown')})"
    heads = {c.REP_ERR_UNKNOWN: "Requested export not available",
             c.REP_ERR_POLICY: f"Denied by server for {opt}",
             c.REP_ERR_INVALID: f"Invalid parameters for {opt}",
             c.REP_ERR_PLATFORM: f"Server lacks support for {opt}",
             c.REP_ERR_TLS_REQD: f"TLS negotiation required before {opt}",
             c.REP_ERR_SHUTDOWN: f"Server shutting down before {opt}",
             c.REP_ERR_BLOCK_SIZE_REQD: f"Server requires INFO_BLOCK_SIZE for {opt}"}
    head = heads.get(rep.reply_type, f"Unknown error code when asking for {opt}")
    text = rep.payload.decode(errors="replace")
    exc: BlockError = (PermissionDeniedError(head) if rep.reply_type == c.REP_ERR_POLICY
                       else HostIOError(head))
    hints = []
    if rep.reply_type == c.REP_ERR_TLS_REQD:
        hints.append("Did you forget a valid tls-creds?")
    if text:
        hints.append(f"server reported: {text}")
    if hints:
        exc.hint = "\n".join(hints)
    return exc


def fill_read(reply: list[Chunk] | SimpleReply, offset: int, buf: memoryview) -> None:
    """Put the data of a READ reply for ``offset`` into ``buf`` (holes as zeroes); its error raised."""
    NbdConnection.check(reply)
    if isinstance(reply, SimpleReply):
        buf[:] = reply.data
        return
    for ch in reply:
        if ch.reply_type == c.REPLY_TYPE_OFFSET_DATA:
            (at,) = struct.unpack_from(">Q", ch.payload)
            data = memoryview(ch.payload)[8:]
            buf[at - offset : at - offset + len(data)] = data
        elif ch.reply_type == c.REPLY_TYPE_OFFSET_HOLE:
            at, n = struct.unpack_from(">QI", ch.payload)
            buf[at - offset : at - offset + n] = bytes(n)


def status_runs(reply: list[Chunk] | SimpleReply, ident_wanted: int | None) -> list[tuple[int, int]]:
    """The ``(length, flags)`` runs of a BLOCK_STATUS reply for the context ``ident_wanted``."""
    NbdConnection.check(reply)
    runs: list[tuple[int, int]] = []
    if isinstance(reply, list):
        for ch in reply:
            if ch.reply_type == c.REPLY_TYPE_BLOCK_STATUS and len(ch.payload) >= 12:
                (ident,) = struct.unpack_from(">I", ch.payload)
                if ident != ident_wanted:
                    continue
                for i in range(4, len(ch.payload) - 7, 8):
                    runs.append(struct.unpack_from(">II", ch.payload, i))
    if not runs:
        raise HostIOError("NBD server sent no block status")
    return runs


def aligned_runs(runs: list[tuple[int, int]], min_block: int) -> list[tuple[int, int]]:
    """Block status runs as qemu's nbd client takes them from a server with a minimum block size: up to
    the first run whose length is not a multiple of it, which is cut down to one, or, when shorter than a
    block, widened to a block of data (so that a 1000-byte file served in 512-byte blocks maps as 1024
    bytes of data, as qemu-img shows it)."""
    if min_block <= 1:
        return runs
    out: list[tuple[int, int]] = []
    for n, flags in runs:
        if n % min_block:
            out.append((n - n % min_block, flags) if n > min_block else (min_block, 0))
            break
        out.append((n, flags))
    return out


def nbd_error(code: int, what: str = "") -> BlockError:
    """An NBD errno (the Linux values) as imagecore's error, worded as strerror."""
    text = os.strerror(code) if code else "Input/output error"
    if what:
        text = f"{what}: {text}"
    if code == _errno.ENOSPC:
        return NoSpaceError(text)
    if code == _errno.EPERM:
        return PermissionDeniedError(text)
    if code == _errno.EINVAL:
        return InvalidArgumentError(text)
    if code in (_errno.ENOTSUP, _errno.EOPNOTSUPP):
        return UnsupportedError(text)
    err = HostIOError(text)
    err.errno = code or _errno.EIO
    return err


class _IoThread:
    """The event loop every NBD connection of this process lives on, run by a daemon thread."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def loop(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="nbd-io", daemon=True).start()
                cls._loop = loop
            return cls._loop


def _on_io_loop() -> bool:
    try:
        return asyncio.get_running_loop() is _IoThread._loop
    except RuntimeError:
        return False


async def on_io(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the connections' loop and await its result from the caller's loop."""
    if _on_io_loop():
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, _IoThread.loop()))


def on_io_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the connections' loop and block this thread until it is done (never called from
    that loop itself)."""
    return asyncio.run_coroutine_threadsafe(coro, _IoThread.loop()).result()


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[list[Chunk] | SimpleReply]
    chunks: list[Chunk] = field(default_factory=list)


class NbdConnection:
    """One negotiated NBD connection in transmission phase; requests may be in flight concurrently."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = ClientConnection()
        self.size = 0
        self.tflags = 0
        self.min_block, self.pref_block, self.max_block = 1, 4096, DEFAULT_MAX_PAYLOAD
        self.allocation_id: int | None = None
        self._cookie = 0
        self._pending: dict[int, _Pending] = {}
        self._reader_task: asyncio.Task[None] | None = None
        self._dead: BlockError | None = None
        self.tls = False

    # -- handshake ----------------------------------------------------------------------------------
    async def _event(self) -> ClientEvent:
        while True:
            ev = self.conn.next_event()
            if ev is not None:
                return ev
            try:
                data = await self.reader.read(_READ_BUF)
            except ssl.SSLError:
                data = b""
            if not data and self.tls:
                # the server refused us after the TLS handshake (a client certificate it does not take)
                raise HostIOError("Failed to read option reply: Cannot read from TLS channel: "
                                  "Software caused connection abort")
            if not data:
                raise HostIOError("Failed to read initial magic: "
                                  "Unexpected end-of-file before all data were read")
            self.conn.receive_data(data)

    async def _option_replies(self) -> list[OptionReply]:
        """The replies to the last option, up to and including its final one (ACK or an error)."""
        out: list[OptionReply] = []
        while True:
            ev = await self._event()
            if not isinstance(ev, OptionReply):
                raise HostIOError("Unexpected reply during the NBD handshake")
            out.append(ev)
            if ev.reply_type == c.REP_ACK or ev.is_error:
                return out

    async def handshake(self, export: str, tls: ssl.SSLContext | None = None,
                        hostname: str | None = None) -> None:
        greeting = await self._event()
        if not isinstance(greeting, Greeting):
            raise HostIOError("Unexpected reply during the NBD handshake")
        if not greeting.handshake_flags & c.FLAG_FIXED_NEWSTYLE:
            if tls is not None:
                raise UnsupportedError("Server does not support STARTTLS")
            raise UnsupportedError("Server does not support fixed newstyle negotiation")
        self.conn.flags = c.FLAG_C_FIXED_NEWSTYLE | (greeting.handshake_flags & c.FLAG_NO_ZEROES and
                                                     c.FLAG_C_NO_ZEROES)
        self.writer.write(self.conn.client_flags())
        if tls is not None:
            await self._starttls(tls, hostname)
        self.writer.write(self.conn.raw_option(c.OPT_STRUCTURED_REPLY))
        await self._option_replies()
        if self.conn.structured:
            self.writer.write(self.conn.opt_meta(c.OPT_SET_META_CONTEXT, export, [c.META_BASE_ALLOCATION]))
            for rep in await self._option_replies():
                if rep.reply_type == c.REP_META_CONTEXT and len(rep.payload) >= 4:
                    (ident,) = struct.unpack_from(">I", rep.payload)
                    if rep.payload[4:].decode(errors="replace") == c.META_BASE_ALLOCATION:
                        self.allocation_id = ident
        self.writer.write(self.conn.opt_go(export, [c.INFO_BLOCK_SIZE]))
        await self.writer.drain()
        while True:
            ev = await self._event()
            if isinstance(ev, ExportNameReply):  # only after NBD_OPT_EXPORT_NAME, which is never sent
                raise HostIOError("Unexpected reply during the NBD handshake")
            if not isinstance(ev, OptionReply):
                raise HostIOError("Unexpected reply during the NBD handshake")
            if ev.is_error:
                raise self._go_error(ev, export)
            if ev.reply_type == c.REP_INFO and len(ev.payload) >= 2:
                (kind,) = struct.unpack_from(">H", ev.payload)
                if kind == c.INFO_EXPORT and len(ev.payload) >= 12:
                    _k, self.size, self.tflags = struct.unpack_from(">HQH", ev.payload)
                elif kind == c.INFO_BLOCK_SIZE and len(ev.payload) >= 14:
                    _k, self.min_block, self.pref_block, self.max_block = struct.unpack_from(
                        ">HIII", ev.payload)
            elif ev.reply_type == c.REP_ACK:
                break
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    async def _starttls(self, ctx: ssl.SSLContext, hostname: str | None) -> None:
        """NBD_OPT_STARTTLS, then the TLS handshake over the same stream: everything after it, the rest
        of the option haggling included, is encrypted. Failures read as qemu's client words them."""
        self.writer.write(self.conn.raw_option(c.OPT_STARTTLS))
        await self.writer.drain()
        replies = await self._option_replies()
        last = replies[-1]
        if last.is_error:
            if last.reply_type == c.REP_ERR_UNSUP:
                raise UnsupportedError("Server don't support STARTTLS option")
            raise option_error(last)
        try:
            await self.writer.start_tls(ctx, server_hostname=hostname)
        except ssl.SSLCertVerificationError as exc:
            raise HostIOError(verify_message(exc, hostname)) from None
        except (ssl.SSLError, OSError) as exc:
            raise HostIOError(f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}") from None
        self.tls = True

    @staticmethod
    def _go_error(rep: OptionReply, export: str) -> BlockError:
        """qemu's wording of a refused NBD_OPT_GO: its own line, then the server's message."""
        return option_error(rep)

    # -- transmission -------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self.reader.read(_READ_BUF)
                if not data:
                    # qemu's client fails what was in flight with EIO when its server goes away
                    raise HostIOError("Input/output error")
                self.conn.receive_data(data)
                while (ev := self.conn.next_event()) is not None:
                    if isinstance(ev, SimpleReply):
                        p = self._pending.pop(ev.cookie, None)
                        if p is not None and not p.future.done():
                            p.future.set_result(ev)
                    elif isinstance(ev, Chunk):
                        q = self._pending.get(ev.cookie)
                        if q is None:
                            continue
                        q.chunks.append(ev)
                        if ev.done:
                            del self._pending[ev.cookie]
                            if not q.future.done():
                                q.future.set_result(q.chunks)
        except asyncio.CancelledError:
            raise
        except BlockError as exc:
            self._fail(exc)
        except Exception:  # a protocol error or a broken socket ends every request in flight
            self._fail(HostIOError("Input/output error"))

    def _fail(self, exc: BlockError) -> None:
        self._dead = exc
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(exc)
        self._pending.clear()

    async def request(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0,
                      data: bytes | memoryview = b"") -> list[Chunk] | SimpleReply:
        if self._dead is not None:
            raise self._dead
        self._cookie += 1
        cookie = self._cookie
        fut: asyncio.Future[list[Chunk] | SimpleReply] = asyncio.get_running_loop().create_future()
        self._pending[cookie] = _Pending(fut)
        try:
            if cmd == c.CMD_WRITE:
                self.writer.write(self.conn.raw_request(cmd, cookie=cookie, offset=offset, length=len(data),
                                                        flags=flags))
                self.writer.write(data)
            else:
                self.writer.write(self.conn.request(cmd, cookie=cookie, offset=offset, length=length,
                                                    flags=flags))
            await self.writer.drain()
        except (OSError, RuntimeError):
            self._pending.pop(cookie, None)
            self._fail(HostIOError("Input/output error"))
            raise HostIOError("Input/output error") from None
        return await fut

    async def ask(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0,
                  data: bytes | memoryview = b"") -> list[Chunk] | SimpleReply:
        """:meth:`request` from any event loop (the connection's own runs in the nbd-io thread)."""
        return await on_io(self.request(cmd, offset, length, flags=flags, data=data))

    def ask_sync(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0,
                 data: bytes | memoryview = b"") -> list[Chunk] | SimpleReply:
        """:meth:`request` from a thread that may block (any but the nbd-io thread)."""
        return on_io_sync(self.request(cmd, offset, length, flags=flags, data=data))

    @staticmethod
    def check(reply: list[Chunk] | SimpleReply) -> None:
        if isinstance(reply, SimpleReply):
            if reply.error:
                raise nbd_error(reply.error)
            return
        for ch in reply:
            if ch.reply_type & (1 << 15):
                code = struct.unpack_from(">I", ch.payload)[0] if len(ch.payload) >= 4 else _errno.EIO
                raise nbd_error(code)

    async def close(self) -> None:
        if self._reader_task is not None:
            try:
                if self._dead is None:
                    self.writer.write(self.conn.raw_request(c.CMD_DISC, cookie=0))
                    await self.writer.drain()
            except (OSError, RuntimeError):
                pass
            self._reader_task.cancel()
            try:
                await self._reader_task
            except (asyncio.CancelledError, Exception):
                pass
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


async def connect(opts: dict[str, Any]) -> NbdConnection:
    """Connect to the server the nbd options name and negotiate their export; errors as qemu words them."""
    server = opts.get("server")
    if not isinstance(server, dict) or not server:
        raise InvalidArgumentError("NBD server address missing")
    kind = server.get("type", "inet")
    export = str(opts.get("export", ""))
    tls: ssl.SSLContext | None = None
    hostname: str | None = None
    if opts.get("tls-creds") is not None:
        hostname = opts.get("tls-hostname")
        if hostname is None and kind == "inet" and server.get("host") is not None:
            hostname = str(server["host"])
        tls = tls_context(str(opts["tls-creds"]), None if hostname is None else str(hostname))
    try:
        if kind == "unix":
            path = server.get("path")
            if path is None:
                raise InvalidArgumentError("Parameter 'server.path' is missing")
            where = str(path)
            reader, writer = await asyncio.open_unix_connection(where, limit=_READ_BUF * 4)
        elif kind == "inet":
            host, port = server.get("host"), server.get("port", "10809")
            if host is None:
                raise InvalidArgumentError("Parameter 'server.host' is missing")
            where = f"{host}:{port}"
            reader, writer = await asyncio.open_connection(str(host), int(str(port)), limit=_READ_BUF * 4)
        else:
            raise InvalidArgumentError(f"Parameter 'server.type' does not accept value '{kind}'")
    except socket.gaierror as exc:
        # the name did not resolve: qemu's inet_connect words that with getaddrinfo's own text
        raise HostIOError(f"address resolution failed for {where}: {exc.strerror}") from None
    except OSError as exc:
        # asyncio words a refused connection itself ("Connect call failed ..."): qemu gives strerror
        why = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
        raise HostIOError(f"Failed to connect to '{where}': {why}") from None
    except ValueError:
        raise InvalidArgumentError(
            f"Parameter 'server.port' expects a port number, got '{server.get('port')}'") from None
    nc = NbdConnection(reader, writer)
    try:
        await nc.handshake(export, tls, hostname)
    except ClientProtocolError as exc:
        await nc.close()
        raise HostIOError(f"NBD handshake failed: {exc}") from None
    except OSError as exc:
        await nc.close()
        raise HostIOError(f"NBD handshake failed: {exc.strerror or exc}") from None
    except BaseException:
        await nc.close()
        raise
    return nc


class NbdDriver(BlockDriver):
    """An NBD export, read and written through the connection. ``format_name`` is ``raw`` when raw sits
    on top of the protocol (a URL, or ``driver=raw,file.driver=nbd``), ``nbd`` when the protocol is
    opened directly (``driver=nbd``), as qemu-img info reports them."""

    # qemu's bdrv_get_info fails for the nbd protocol: info then has no dirty-flag (and no disk size)
    reports_dirty = False

    format_name = "nbd"

    def __init__(self, nc: NbdConnection, opts: dict[str, Any], *, read_only: bool) -> None:
        self.nc = nc
        self.filename = nbd_display_name(opts)
        self.size = nc.size
        self.backing = None
        tf = nc.tflags
        writable = not read_only
        self.caps = Capabilities(
            writable=writable,
            zero=writable, fast_zero=writable and bool(tf & c.FLAG_SEND_FAST_ZERO),
            trim=writable and bool(tf & c.FLAG_SEND_TRIM), flush=True,
            fua=writable and bool(tf & c.FLAG_SEND_FUA), extents=True,
            multi_conn=bool(tf & c.FLAG_CAN_MULTI_CONN), cache=bool(tf & c.FLAG_SEND_CACHE),
            min_block=max(1, nc.min_block), pref_block=max(512, nc.pref_block),
            max_block=min(DEFAULT_MAX_PAYLOAD, nc.max_block or DEFAULT_MAX_PAYLOAD))

    def _step(self) -> int:
        return self.caps.max_block

    async def readinto(self, offset: int, buf: memoryview) -> None:
        step = self._step()
        jobs = [self._read_one(offset + i, buf[i : i + step]) for i in range(0, len(buf), step)]
        await asyncio.gather(*jobs)

    async def _read_one(self, offset: int, buf: memoryview) -> None:
        fill_read(await self.nc.ask(c.CMD_READ, offset, len(buf)), offset, buf)

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        step = self._step()
        flags = c.CMD_FLAG_FUA if fua and self.caps.fua else 0
        replies = await asyncio.gather(*[self.nc.ask(c.CMD_WRITE, offset + i, flags=flags,
                                                         data=data[i : i + step])
                                         for i in range(0, len(data), step)])
        for r in replies:
            NbdConnection.check(r)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool,
                           fua: bool = False) -> None:
        if length <= 0:
            return
        tf = self.nc.tflags
        if not tf & c.FLAG_SEND_WRITE_ZEROES or (fast and not tf & c.FLAG_SEND_FAST_ZERO):
            if fast:
                raise UnsupportedError("Operation not supported")
            zero = memoryview(bytes(min(length, self._step())))
            pos = 0
            while pos < length:
                n = min(length - pos, len(zero))
                await self.write(offset + pos, zero[:n], fua=fua)
                pos += n
            return
        flags = (0 if may_trim else c.CMD_FLAG_NO_HOLE) | (c.CMD_FLAG_FAST_ZERO if fast else 0)
        if fua and self.caps.fua:
            flags |= c.CMD_FLAG_FUA
        pos = 0
        step = 1 << 30  # a request's length is 32 bits
        while pos < length:
            n = min(length - pos, step)
            NbdConnection.check(await self.nc.ask(c.CMD_WRITE_ZEROES, offset + pos, n, flags=flags))
            pos += n

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if not self.nc.tflags & c.FLAG_SEND_TRIM or length <= 0:
            return  # a discard is advisory
        pos = 0
        while pos < length:
            n = min(length - pos, 1 << 30)
            NbdConnection.check(await self.nc.ask(c.CMD_TRIM, offset + pos, n))
            pos += n

    async def flush(self) -> None:
        if self.nc.tflags & c.FLAG_SEND_FLUSH:
            NbdConnection.check(await self.nc.ask(c.CMD_FLUSH))

    async def extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        end = offset + length
        pos = offset
        while pos < end:
            if self.nc.allocation_id is None:
                yield Extent(pos, end - pos, data=True, zero=False, offset=pos)
                return
            want = min(end - pos, STATUS_WINDOW)
            runs = status_runs(await self.nc.ask(c.CMD_BLOCK_STATUS, pos, want), self.nc.allocation_id)
            for n, flags in aligned_runs(runs, self.nc.min_block):
                n = min(n, end - pos)
                if n <= 0:
                    break
                yield Extent(pos, n, data=not flags & c.STATE_HOLE, zero=bool(flags & c.STATE_ZERO),
                             offset=pos)
                pos += n

    async def cache(self, offset: int, length: int) -> None:
        if self.nc.tflags & c.FLAG_SEND_CACHE and length > 0:
            NbdConnection.check(await self.nc.ask(c.CMD_CACHE, offset, min(length, 1 << 30)))

    async def close(self) -> None:
        await on_io(self.nc.close())


class RawOverNbdDriver(NbdDriver):
    """The raw format over the nbd protocol: what an NBD URL opens as, unless told otherwise."""

    format_name = "raw"


async def open_nbd(opts: dict[str, Any], *, read_only: bool, format_name: str = "nbd") -> NbdDriver:
    """Open the NBD export the options describe as the nbd protocol itself (``format_name`` "nbd") or
    as raw over it; a read-write open of a read-only export is refused as qemu refuses it."""
    nc = await _connect_checked(opts, read_only=read_only)
    cls = RawOverNbdDriver if format_name == "raw" else NbdDriver
    return cls(nc, opts, read_only=read_only or bool(nc.tflags & c.FLAG_READ_ONLY))


def _legacy_address(opts: dict[str, Any]) -> None:
    """The nbd driver's old ``host``/``port``/``path`` options, turned into ``server`` in place as qemu's
    nbd_process_legacy_socket_options turns them (with its refusals)."""
    path, host, port = opts.pop("path", None), opts.pop("host", None), opts.pop("port", None)
    if path is None and host is None and port is None:
        return
    if "server" in opts:
        raise InvalidArgumentError("Cannot use 'server' and path/host/port at the same time")
    if path is not None and host is not None:
        raise InvalidArgumentError("path and host may not be used at the same time")
    if path is not None:
        if port is not None:
            raise InvalidArgumentError("port may not be used without host")
        opts["server"] = {"type": "unix", "path": str(path)}
    elif host is not None:
        opts["server"] = {"type": "inet", "host": str(host),
                          "port": str(port) if port is not None else "10809"}


async def _connect_checked(opts: dict[str, Any], *, read_only: bool) -> NbdConnection:
    _legacy_address(opts)
    for key in opts:
        if key not in OPTIONS:
            raise InvalidArgumentError(f"Block protocol 'nbd' doesn't support the option '{key}'")
    nc = await on_io(connect(opts))
    if not read_only and nc.tflags & c.FLAG_READ_ONLY:
        await on_io(nc.close())
        raise PermissionDeniedError("Could not open image: Permission denied")
    return nc


async def open_image(opener: ImageOpener, opts: dict[str, Any], fmt: str | None, *, read_only: bool,
                     chain: tuple[tuple[int, int], ...] = (), options: dict[str, Any] | None = None,
                     display: str | None = None) -> BlockDriver:
    """Open the image an NBD export holds: as ``fmt`` over the nbd protocol, or, with no format named,
    as what the export's first bytes look like (qemu's probe, with its warning when that is raw and the
    open writes). Raw is the nbd driver itself; any other format runs over an :class:`NbdFile`."""
    nc = await _connect_checked(opts, read_only=read_only)
    try:
        ro = read_only or bool(nc.tflags & c.FLAG_READ_ONLY)
        if fmt is None:
            head = bytearray(PROBE_BYTES)
            n = min(PROBE_BYTES, nc.size)
            if n:
                fill_read(await nc.ask(c.CMD_READ, 0, n), 0, memoryview(head)[:n])
            fmt = probe_bytes(bytes(head), nbd_display_name(opts)) if n else "raw"
            if fmt == "raw" and not read_only and display is not None:
                opener.warn(RAW_PROBE_WARNING.format(path=display))
        if fmt == "raw":
            return RawOverNbdDriver(nc, opts, read_only=ro)
        spec = get_format(fmt)
        hf = NbdFile(nc, nbd_display_name(opts), read_only=ro)
        # no inode to tell a backing loop by: the name stands for it
        key = (-1, hash(hf.path))
        if key in chain:
            raise ImageFormatError(f"backing chain loop: '{hf.path}' is its own backing file")
        ctx = OpenContext(opener=opener, read_only=ro, path=hf.path, chain=(*chain, key),
                          options=dict(options or {}))
        return await spec.open(hf, ctx)
    except BaseException:
        await on_io(nc.close())
        raise


async def open_file(opts: dict[str, Any], *, read_only: bool) -> NbdFile:
    """The export as a host file, for a format's create."""
    nc = await _connect_checked(opts, read_only=read_only)
    return NbdFile(nc, nbd_display_name(opts), read_only=read_only)


class NbdFile(HostFile):
    """An NBD export as the host file a format driver reads and writes, as qemu's nbd protocol node under
    a format node: reads past the end read zeroes; writes past it fail with EINVAL and the export never
    grows (truncate may only shrink, which leaves the export as it is, as qemu's inexact truncate of an
    NBD node does); fdatasync is NBD_CMD_FLUSH; punch_hole and zero_range are NBD_CMD_WRITE_ZEROES with
    and without NBD_CMD_FLAG_NO_HOLE; the holes lseek finds are the runs block status calls zero. There
    is no file descriptor (``fd`` is -1) and so no lock, as qemu takes none over NBD."""

    local = False

    def __init__(self, nc: NbdConnection, name: str, *, read_only: bool) -> None:
        super().__init__(-1, name, read_only=read_only)
        self.nc = nc
        self._owner = True  # closing this handle closes the connection
        self._nowait = False
        self._step = max(4096, min(DEFAULT_MAX_PAYLOAD, nc.max_block or DEFAULT_MAX_PAYLOAD))

    def size(self) -> int:
        return self.nc.size

    def allocated_size(self) -> int:
        return self.nc.size  # unknown over NBD (qemu's "disk size: unavailable"); callers check ``local``

    # -- reads, on the connection's loop --------------------------------------------------------------
    async def _read(self, offset: int, buf: memoryview) -> int:
        n = max(0, min(len(buf), self.nc.size - offset))
        if n:
            step = self._step

            async def one(at: int, view: memoryview) -> None:
                fill_read(await self.nc.request(c.CMD_READ, at, len(view)), at, view)

            await asyncio.gather(*[one(offset + i, buf[i:min(i + step, n)]) for i in range(0, n, step)])
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)
        return n

    def read_nowait(self, offset: int, buf: memoryview) -> int:
        return 0

    async def readinto(self, offset: int, buf: memoryview) -> int:
        return await on_io(self._read(offset, buf))

    def readinto_sync(self, offset: int, buf: memoryview) -> int:
        return on_io_sync(self._read(offset, buf))

    def _read_full(self, offset: int, buf: memoryview) -> int:
        return self.readinto_sync(offset, buf)

    # -- writes ---------------------------------------------------------------------------------------
    async def _write(self, offset: int, bufs: Sequence[bytes | bytearray | memoryview]) -> None:
        total = sum(len(b) for b in bufs)
        if offset < 0 or offset + total > self.nc.size:
            raise nbd_error(_errno.EINVAL)
        data = memoryview(bufs[0] if len(bufs) == 1 else b"".join(bufs)).cast("B")
        step = self._step
        replies = await asyncio.gather(*[self.nc.request(c.CMD_WRITE, offset + i, data=data[i:i + step])
                                         for i in range(0, total, step)])
        for r in replies:
            NbdConnection.check(r)

    async def pwritev(self, offset: int, bufs: Sequence[bytes | bytearray | memoryview]) -> None:
        self._check_writable()
        await on_io(self._write(offset, bufs))

    def pwrite_sync(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_writable()
        on_io_sync(self._write(offset, [data]))

    def _write_full(self, offset: int, bufs: Sequence[bytes | bytearray | memoryview]) -> None:
        on_io_sync(self._write(offset, bufs))

    async def _zero(self, offset: int, length: int, *, may_trim: bool) -> None:
        end = min(offset + length, self.nc.size)
        if not self.nc.tflags & c.FLAG_SEND_WRITE_ZEROES:
            raise UnsupportedError("the NBD server cannot write zeroes")
        flags = 0 if may_trim else c.CMD_FLAG_NO_HOLE
        pos = offset
        while pos < end:
            n = min(end - pos, 1 << 30)
            NbdConnection.check(await self.nc.request(c.CMD_WRITE_ZEROES, pos, n, flags=flags))
            pos += n

    async def _fallocate(self, mode: int, offset: int, length: int) -> None:
        self._check_writable()
        if length <= 0:
            return
        if offset + length > self.nc.size and not mode & FALLOC_FL_KEEP_SIZE:
            raise InvalidArgumentError("Cannot grow NBD nodes")
        if mode & FALLOC_FL_PUNCH_HOLE:
            await on_io(self._zero(offset, length, may_trim=True))
        elif mode & FALLOC_FL_ZERO_RANGE:
            await on_io(self._zero(offset, length, may_trim=False))
        # a plain allocation of a range the export already has changes nothing

    def _fallocate_blocking(self, mode: int, offset: int, length: int) -> None:
        raise OSError(_errno.EOPNOTSUPP, "fallocate over NBD")

    async def truncate(self, size: int) -> None:
        self._check_writable()
        if size > self.nc.size:
            raise InvalidArgumentError("Cannot grow NBD nodes")

    def _truncate_blocking(self, size: int) -> None:
        if size > self.nc.size:
            raise OSError(_errno.EINVAL, "Cannot grow NBD nodes")

    async def _flush(self) -> None:
        if self.nc.tflags & c.FLAG_SEND_FLUSH:
            NbdConnection.check(await self.nc.request(c.CMD_FLUSH))

    async def fdatasync(self) -> None:
        if self.read_only or not self.sync_enabled:
            return
        upto = self._modified
        await on_io(self._flush())
        self._synced = max(self._synced, upto)

    def _datasync(self) -> None:
        on_io_sync(self._flush())

    def start_writeback(self) -> None:
        return None  # the server decides when its data reaches its disk

    # -- sparseness: block status --------------------------------------------------------------------
    async def _status(self, start: int, end: int, max_runs: int) -> list[tuple[int, int, bool]]:
        runs: list[tuple[int, int, bool]] = []
        pos = start
        size = self.nc.size
        while pos < end and len(runs) < max_runs:
            if pos >= size:
                runs.append((pos, end, False))
                break
            stop = min(end, size)
            if self.nc.allocation_id is None:
                got = [(stop - pos, 0)]
            else:
                want = min(stop - pos, STATUS_WINDOW)
                got = aligned_runs(status_runs(await self.nc.request(c.CMD_BLOCK_STATUS, pos, want),
                                               self.nc.allocation_id), self.nc.min_block)
            for n, flags in got:
                n = min(n, stop - pos)
                if n <= 0:
                    break
                data = not flags & c.STATE_ZERO
                if runs and runs[-1][2] == data and runs[-1][1] == pos:
                    runs[-1] = (runs[-1][0], pos + n, data)
                elif len(runs) < max_runs:
                    runs.append((pos, pos + n, data))
                else:
                    return runs
                pos += n
            if runs and not runs[-1][2] and pos >= size:
                runs[-1] = (runs[-1][0], end, False)  # a hole that reaches the end runs on past it
                break
        return runs

    def data_runs(self, start: int, end: int, max_runs: int = 1 << 62) -> list[tuple[int, int, bool]]:
        return on_io_sync(self._status(start, end, max_runs)) if start < end else []

    def iter_data_runs(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        # block status requests for a few runs first, more once the caller keeps asking
        batch = 1
        while start < end:
            runs = self.data_runs(start, end, batch)
            if not runs:
                return
            yield from runs
            start = runs[-1][1]
            batch = min(batch * 16, 1024)

    def _seek(self, offset: int, want_data: bool) -> int:
        size = self.nc.size
        if offset >= size:
            return max(offset, size)
        for s, _e, data in self.data_runs(offset, size):
            if data == want_data:
                return s
        return size

    def seek_data(self, offset: int) -> int:
        return self._seek(offset, True)

    def seek_hole(self, offset: int) -> int:
        return self._seek(offset, False)

    # -- lifetime ------------------------------------------------------------------------------------
    def view(self) -> NbdFile:
        """A read-only handle on the same connection, whose close leaves the connection open: for a
        second open of the image while this one is in use (a second connection may wait for good behind
        the first on a server of one client at a time, qemu-nbd's default)."""
        other = NbdFile(self.nc, self.path, read_only=True)
        other._owner = False
        return other

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._owner:
                on_io_sync(self.nc.close())

    def __repr__(self) -> str:
        return f"NbdFile({self.path!r}, read_only={self.read_only})"
