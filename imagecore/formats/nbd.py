"""The nbd protocol driver: an NBD export as an image, over one connection (TCP or Unix socket) with
requests pipelined by cookie, as qemu's nbd block driver.

The protocol itself (handshake options, request and reply framing) is ``nbdproto``'s sans-IO client; this
module only does the asyncio I/O around it. It asks for structured replies and the ``base:allocation``
meta context, so that ``map`` and ``convert`` see the export's holes and zeroes.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import os
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

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

from ..driver import BlockDriver, Capabilities
from ..errors import (
    BlockError,
    HostIOError,
    InvalidArgumentError,
    NoSpaceError,
    PermissionDeniedError,
    UnsupportedError,
)
from ..extent import Extent
from ..filenames import nbd_display_name

# what one request may carry when the server names no maximum (qemu's NBD_MAX_BUFFER_SIZE)
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
# a block-status request covers at most this much (servers clip their answer anyway)
STATUS_WINDOW = 1 << 30
_READ_BUF = 256 * 1024

# the nbd driver's runtime options (qapi BlockdevOptionsNbd) as qemu-img accepts them
OPTIONS = ("driver", "server", "export", "tls-creds", "tls-hostname", "x-dirty-bitmap", "reconnect-delay",
           "open-timeout", "node-name", "read-only", "auto-read-only", "force-share", "discard", "cache",
           "detect-zeroes")


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

    # -- handshake ----------------------------------------------------------------------------------
    async def _event(self) -> ClientEvent:
        while True:
            ev = self.conn.next_event()
            if ev is not None:
                return ev
            data = await self.reader.read(_READ_BUF)
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

    async def handshake(self, export: str) -> None:
        greeting = await self._event()
        if not isinstance(greeting, Greeting):
            raise HostIOError("Unexpected reply during the NBD handshake")
        if not greeting.handshake_flags & c.FLAG_FIXED_NEWSTYLE:
            raise UnsupportedError("Server does not support fixed newstyle negotiation")
        self.conn.flags = c.FLAG_C_FIXED_NEWSTYLE | (greeting.handshake_flags & c.FLAG_NO_ZEROES and
                                                     c.FLAG_C_NO_ZEROES)
        self.writer.write(self.conn.client_flags())
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

    @staticmethod
    def _go_error(rep: OptionReply, export: str) -> BlockError:
        """qemu's wording of a refused NBD_OPT_GO: its own line, then the server's message."""
        heads = {c.REP_ERR_UNKNOWN: "Requested export not available",
                 c.REP_ERR_POLICY: "Denied by server for option 7 (go)",
                 c.REP_ERR_TLS_REQD: "TLS negotiation required before option 7 (go)",
                 c.REP_ERR_SHUTDOWN: "Server shutting down before option 7 (go)"}
        head = heads.get(rep.reply_type, "Server failed option 7 (go)")
        text = rep.payload.decode(errors="replace")
        exc: BlockError = (PermissionDeniedError(head) if rep.reply_type == c.REP_ERR_POLICY
                           else HostIOError(head))
        if text:
            exc.hint = f"server reported: {text}"
        return exc

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
    except OSError as exc:
        # asyncio words a refused connection itself ("Connect call failed ..."): qemu gives strerror
        why = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
        raise HostIOError(f"Failed to connect to '{where}': {why}") from None
    except ValueError:
        raise InvalidArgumentError(
            f"Parameter 'server.port' expects a port number, got '{server.get('port')}'") from None
    nc = NbdConnection(reader, writer)
    try:
        await nc.handshake(export)
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
        reply = await self.nc.request(c.CMD_READ, offset, len(buf))
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

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        step = self._step()
        flags = c.CMD_FLAG_FUA if fua and self.caps.fua else 0
        replies = await asyncio.gather(*[self.nc.request(c.CMD_WRITE, offset + i, flags=flags,
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
            NbdConnection.check(await self.nc.request(c.CMD_WRITE_ZEROES, offset + pos, n, flags=flags))
            pos += n

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if not self.nc.tflags & c.FLAG_SEND_TRIM or length <= 0:
            return  # a discard is advisory
        pos = 0
        while pos < length:
            n = min(length - pos, 1 << 30)
            NbdConnection.check(await self.nc.request(c.CMD_TRIM, offset + pos, n))
            pos += n

    async def flush(self) -> None:
        if self.nc.tflags & c.FLAG_SEND_FLUSH:
            NbdConnection.check(await self.nc.request(c.CMD_FLUSH))

    async def extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        end = offset + length
        pos = offset
        while pos < end:
            if self.nc.allocation_id is None:
                yield Extent(pos, end - pos, data=True, zero=False, offset=pos)
                return
            want = min(end - pos, STATUS_WINDOW)
            reply = await self.nc.request(c.CMD_BLOCK_STATUS, pos, want)
            NbdConnection.check(reply)
            runs: list[tuple[int, int]] = []
            if isinstance(reply, list):
                for ch in reply:
                    if ch.reply_type == c.REPLY_TYPE_BLOCK_STATUS and len(ch.payload) >= 12:
                        (ident,) = struct.unpack_from(">I", ch.payload)
                        if ident != self.nc.allocation_id:
                            continue
                        for i in range(4, len(ch.payload) - 7, 8):
                            runs.append(struct.unpack_from(">II", ch.payload, i))
            if not runs:
                raise HostIOError("NBD server sent no block status")
            for n, flags in runs:
                n = min(n, end - pos)
                if n <= 0:
                    break
                yield Extent(pos, n, data=not flags & c.STATE_HOLE, zero=bool(flags & c.STATE_ZERO),
                             offset=pos)
                pos += n

    async def cache(self, offset: int, length: int) -> None:
        if self.nc.tflags & c.FLAG_SEND_CACHE and length > 0:
            NbdConnection.check(await self.nc.request(c.CMD_CACHE, offset, min(length, 1 << 30)))

    async def close(self) -> None:
        await self.nc.close()


class RawOverNbdDriver(NbdDriver):
    """The raw format over the nbd protocol: what an NBD URL opens as, unless told otherwise."""

    format_name = "raw"


async def open_nbd(opts: dict[str, Any], *, read_only: bool, format_name: str = "nbd",
                   probe: bool = False) -> NbdDriver:
    """Open the NBD export the options describe; a read-write open of a read-only export is refused as
    qemu refuses it."""
    for key in opts:
        if key not in OPTIONS:
            raise InvalidArgumentError(f"Block protocol 'nbd' doesn't support the option '{key}'")
    nc = await connect(opts)
    if not read_only and nc.tflags & c.FLAG_READ_ONLY:
        await nc.close()
        raise PermissionDeniedError("Could not open image: Permission denied")
    cls = RawOverNbdDriver if format_name == "raw" else NbdDriver
    drv = cls(nc, opts, read_only=read_only or bool(nc.tflags & c.FLAG_READ_ONLY))
    if probe:
        try:
            await _refuse_other_formats(drv)
        except BaseException:
            await drv.close()
            raise
    return drv


async def _refuse_other_formats(drv: NbdDriver) -> None:
    """With no format named, qemu probes the export's first bytes: an export holding a qcow2 or vmdk
    image is opened as that format. imagecore opens only raw over NBD so far, so it refuses what a probe
    would have opened as something else rather than show the container's bytes as the disk."""
    from ..driver import PROBE_BYTES, probe_bytes

    head = bytearray(PROBE_BYTES)
    n = min(PROBE_BYTES, drv.size)
    if n:
        await drv.readinto(0, memoryview(head)[:n])
    fmt = probe_bytes(bytes(head), drv.filename) if n else "raw"
    if fmt != "raw":
        raise UnsupportedError(f"imagecore cannot open {fmt} images over NBD yet")
