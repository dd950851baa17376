"""The NBD transport: one asyncio.Protocol per connection feeding the sans-IO core, with backpressure.

Requests are pipelined and answered out of order: every command runs as its own task, except reads that
the driver can serve inline from the page cache (``readinto_nowait``), which are answered on the spot
without creating a task, and writes without FUA that the driver starts itself (``write_started``: done
inline, or a future whose callback replies). Reads of 64 KiB and more whose data the driver locates in the
page cache (``host_runs_nowait``) leave by sendfile(2) after their reply header, without a copy through
Python, on connections without TLS. Two caps bound what a connection may have in flight, a count of
requests and a sum of payload bytes; over either one, the connection stops reading from the socket and
stops taking events out of the core until enough requests have finished. While the transport's write
buffer is over its high-water mark the same happens, so a client that floods requests without reading
the replies only ever costs the caps plus the transport buffer.

A peer that breaks the protocol loses its connection; an operation that fails gets an errno reply; an
unexpected exception inside a request is logged and answered with EIO. Nothing a client does ends the
server.

Every connection counts what it serves in a :class:`Counters` of plain integers (requests by command,
bytes, errors by errno, a fixed-bucket latency histogram); the admin socket and the metrics endpoint read
them when asked, so a request costs a few integer additions and no call into any metrics library. A
connection's counters are folded into its export's totals when it closes.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import functools
import heapq
import itertools
import logging
import os
import socket
import ssl
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any, cast

from imagecore.driver import BlockDriver
from imagecore.errors import BlockError
from imagecore.hostio import aligned_buffer
from nbdproto.constants import (
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    OPT_EXPORT_NAME,
    OPT_GO,
)

from . import backend
from .access import Policy
from .config import ListenAddr
from .exports import Export, ExportRegistry
from .proto import (
    ConnectionClosed,
    Disconnect,
    ExportInfo,
    ExportInfoRequest,
    InvalidRequest,
    ListRequest,
    ProtocolConfig,
    ProtocolError,
    Ready,
    Request,
    Security,
    ServerConnection,
    StartTLS,
)
from .tls import Credentials, handshake_failure

log = logging.getLogger("nbdsrv.server")

_WRITE_HIGH_WATER = 4 * 1024 * 1024
_BATCH_BYTES = 256 * 1024
# the receive buffer's size: as much as a socket read returns at once here (uvloop reads 256 KiB too)
_RECV_BUFFER = 256 * 1024
# Reads at least this large are answered with hole chunks where the image reads as zeroes; smaller ones
# take the inline path, where one extent lookup would cost more than the bytes it saves.
_SPARSE_READ_MIN = 64 * 1024
# Reads at least this large are read into page-aligned buffers (imagecore.hostio.aligned_buffer). The
# heap puts a plain one at any 16-byte offset, and only one 16 past a 64-byte line copies slowly (1 MiB
# from the page cache: 140 µs against 62 µs). Finding the alignment costs about 1 µs (a 4 KiB buffer:
# 1.31 µs aligned, 0.34 µs plain), more than small reads lose to that chance.
_ALIGNED_READ_MIN = 64 * 1024


def _read_buffer(length: int) -> memoryview:
    return aligned_buffer(length) if length >= _ALIGNED_READ_MIN else memoryview(bytearray(length))


# Reads at least this large whose data the driver can locate in the page cache leave by sendfile(2).
_SENDFILE_MIN = 64 * 1024
# How long a closing connection may take to hand its last replies to a peer that has stopped reading.
_CLOSE_GRACE = 5.0
# The listen backlog, as nbdkit's (SOMAXCONN, which the kernel caps at net.core.somaxconn): a thousand
# clients connecting at once overflowed a backlog of 128, and libnbd gives up on EAGAIN
LISTEN_BACKLOG = socket.SOMAXCONN
# Seconds a connection in the handshake keeps its slot against newcomers after its greeting or its last
# answer (NBDServer.admit): enough for a client to send its first option, short against idle sockets.
HANDSHAKE_GRACE = 1.0
# Connections a sweep drops per loop turn
_SWEEP_BATCH = 32

# Upper bounds (seconds) of the request latency histogram's buckets; one more bucket holds the rest.
LATENCY_BOUNDS: tuple[float, ...] = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                     0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Counters are indexed by the NBD command number (READ 0 ... RESIZE 8).
_NCMDS = 9
_clock = time.perf_counter


class Counters:
    """What a connection (or an export, or the whole server) has served, as plain integers.

    ``ops`` and ``latency`` are indexed by NBD command number; ``latency[cmd]`` holds one count per bucket
    of LATENCY_BOUNDS plus one for slower requests, ``latency_sum[cmd]`` the seconds they took together.
    """

    __slots__ = ("bytes_read", "bytes_written", "errors", "latency", "latency_sum", "ops")

    def __init__(self) -> None:
        self.ops = [0] * _NCMDS
        self.bytes_read = 0
        self.bytes_written = 0
        self.errors: dict[int, int] = {}
        self.latency = [[0] * (len(LATENCY_BOUNDS) + 1) for _ in range(_NCMDS)]
        self.latency_sum = [0.0] * _NCMDS

    @property
    def requests(self) -> int:
        return sum(self.ops)

    def error(self, err: int) -> None:
        self.errors[err] = self.errors.get(err, 0) + 1

    def add(self, other: Counters) -> None:
        """Add ``other``'s counts to these."""
        for i in range(_NCMDS):
            self.ops[i] += other.ops[i]
            self.latency_sum[i] += other.latency_sum[i]
            mine, theirs = self.latency[i], other.latency[i]
            for j, n in enumerate(theirs):
                mine[j] += n
        self.bytes_read += other.bytes_read
        self.bytes_written += other.bytes_written
        for err, n in other.errors.items():
            self.errors[err] = self.errors.get(err, 0) + n


_SECURITY = {"off": Security.PLAINTEXT, "on": Security.TLS_OFFERED, "require": Security.TLS_REQUIRED}


def errno_name(err: int) -> str:
    return errno.errorcode.get(err, str(err))


class FileSlice:
    """A reply payload still in a host file: bytes ``[offset, offset + length)`` of ``fd``.

    It stands in for a buffer in the replies the protocol core builds (which only asks its length) and is
    sent by sendfile(2), or read into a buffer where the socket cannot take it at once. It must be sent
    before the loop runs anything else: the fd is the driver's, valid until the next await.
    """

    __slots__ = ("fd", "length", "offset")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length

    def __len__(self) -> int:
        return self.length

    def read(self) -> bytes:
        # os.pread fills a new bytes object without zeroing it first (a bytearray would be zero-filled)
        data = os.pread(self.fd, self.length, self.offset)
        if len(data) == self.length:
            return data
        parts = [data]
        done = len(data)
        while done < self.length:
            more = os.pread(self.fd, self.length - done, self.offset + done)
            if not more:
                break  # the file shrank meanwhile: the rest reads as zeroes
            parts.append(more)
            done += len(more)
        parts.append(bytes(self.length - done))
        return b"".join(parts)


class NBDConnection(asyncio.BufferedProtocol):
    """One client connection.

    A buffered protocol: the transport reads the rest of a WRITE payload straight into the request's
    buffer (the core's :meth:`~nbdsrv.proto.connection.ServerConnection.payload_buffer`), and everything
    else into the server's one receive buffer, whose bytes the core copies before the call returns.
    """

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self.id = next(server._ids)  # stable for the life of the connection, for the admin socket
        self.stats = Counters()
        # The TLS credentials and access rules in force when the connection arrived: a reload changes
        # them for later connections only.
        self.tls_creds: Credentials | None = server.tls_creds
        self.policy: Policy = server.policy
        self.conn = ServerConnection(server.proto_config, security=_SECURITY[server.tls_mode])
        self.tls_dn: str | None = None
        """The verified client certificate's subject DN (RFC 4514 order), once TLS is up."""
        self.tls_version: str | None = None
        self._tls_task: asyncio.Task[None] | None = None
        # What the TLS layer delivered before start_tls() returned (None when no upgrade is under way).
        self._tls_early: list[bytes] | None = None
        # Whether the peer has sent anything at all: the first to go when the handshake slots are full.
        self.progressed = False
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.since = time.time()  # wall clock, for query-clients
        self.export_name: str | None = None
        self.export: Export | None = None
        self.driver: BlockDriver | None = None
        self.read_only = False
        self._pending: Export | None = None
        self._pending_name = ""
        self._pending_driver: BlockDriver | None = None
        self._pending_info: ExportInfo | None = None
        # Why requests are now refused with ESHUTDOWN (an admin disconnect or an export removal).
        self._stopping: str | None = None
        self._announced = False
        self.gone = asyncio.Event()  # set once the connection is closed and its export released
        # INFO / META_CONTEXT answers of this handshake, so that a client asking several about one
        # export (nbdinfo --list: INFO, then LIST_META_CONTEXT) costs one describing open.
        self._described: tuple[str, ExportInfo] | None = None
        # In-flight work the connection must wait for before it releases its export: request tasks, and
        # the futures of writes started without a task (write_started)
        self._tasks: set[asyncio.Future[Any]] = set()
        self._inflight = 0
        self._inflight_bytes = 0
        self._max_requests = server.max_requests
        self._max_bytes = server.max_bytes
        self._read_paused = False
        self._write_paused = False
        self._waiting_answer = False
        self._ending = False
        self._closed = False
        self._finish_task: asyncio.Task[None] | None = None
        self._batch: list[Any] | None = None
        self._batch_bytes = 0
        self._into: memoryview | None = None  # the payload view get_buffer() handed out
        self._recv_view = server.recv_view  # looked up once: get_buffer() runs for every socket read
        # A duplicate of the socket for sendfile replies, from the transmission phase on (not over TLS).
        self._sock: socket.socket | None = None
        # Reads answered inline since the last batch flush, and when the first of them began.
        self._inline_reads = 0
        self._inline_t0 = 0.0
        self._handshake_timer: asyncio.TimerHandle | None = None
        # when the client was last answered in the handshake (loop time)
        self._answered_at = 0.0
        self._rejected = False
        # The peer's IP address, which the per-address caps count by; None for a unix-socket client.
        self.addr: str | None = None
        self.handshaking = False
        # waiting for a slot (NBDServer.queue_when_full), before any greeting
        self.queued = False

    # -- asyncio.Protocol --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            host = str(peer[0])
            self.peer = f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
        else:
            self.peer = "unix"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        self.addr = peer[0] if isinstance(peer, tuple) and peer else None
        srv = self.server
        if srv.queue_when_full and len(srv.connections) >= srv.max_connections and not srv.closing \
                and self.policy.admits(self.addr):
            # qemu-nbd -e N: the client over the limit waits, as it would in the listen backlog,
            # and gets its greeting when a slot frees; past the backlog qemu-nbd sets, it is not taken
            if len(srv.queued) >= srv.max_queued:
                log.warning("connection refused", extra={"peer": self.peer, "reason": "queue full"})
                self._closed = self._rejected = True
                transport.close()
                return
            self.queued = True
            srv.queued.append(self)
            return
        self.start()

    def start(self) -> None:
        """Count the connection in (or refuse it) and send the greeting."""
        transport = self.transport
        assert transport is not None
        self.queued = False
        refused = "address not allowed" if not self.policy.admits(self.addr) else self.server.admit(self)
        if refused is not None:
            # Closed before the greeting: the client sees EOF at once and nothing else is disturbed.
            log.warning("connection refused", extra={"peer": self.peer, "reason": refused})
            self._closed = self._rejected = True
            transport.close()
            return
        log.debug("connection opened", extra={"peer": self.peer})
        if self.server.closing:
            transport.close()
            return
        transport.write(self.conn.initial_data())
        loop = asyncio.get_running_loop()
        self._answered_at = loop.time()
        if self.server.handshake_timeout > 0:
            # A client that never finishes the handshake must not hold a connection slot forever.
            self._handshake_timer = loop.call_later(self.server.handshake_timeout, self._handshake_expired)

    def _handshake_answered(self) -> None:
        """The client completed an option and got its answer: it is making progress, so it has the
        handshake timeout again from now. nbdinfo --list asks INFO and LIST_META_CONTEXT of every export
        in a row, and libnbd 1.14 holds back the last part of each LIST_META_CONTEXT for 0.2 s (sent with
        MSG_MORE), so a listing of 10,000 exports takes half an hour whatever the server does: it must
        not be cut. A client that stalls, or trickles an option byte by byte, still meets the timeout (and
        the TLS handshake, which follows STARTTLS's answer); one that goes on asking holds a handshake
        slot, which the --max-handshakes eviction and shutdown still take from it."""
        loop = asyncio.get_running_loop()
        self._answered_at = now = loop.time()
        if self.handshaking:
            self.server._handshaking.move_to_end(self)
        t = self._handshake_timer
        if t is None:
            return
        t.cancel()
        self._handshake_timer = loop.call_at(now + self.server.handshake_timeout, self._handshake_expired)

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self.export is None and not self._closed:
            # The timer runs from accept to transmission, so it covers the TLS handshake as well.
            log.warning("handshake timed out", extra={"peer": self.peer,
                                                      "tls": "in progress" if self._tls_task else "no"})
            self.abort_handshake()

    def abort_handshake(self) -> None:
        """Drop a connection that has not reached transmission, at once (timeout, eviction, shutdown)."""
        self._ending = True
        if self._tls_task is not None:
            self._tls_task.cancel()
        self._flush_batch()
        if self.transport is not None and not self._closed:
            self.transport.abort()
        if not self._closed:
            self.connection_lost(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        view = self.conn.payload_buffer() if self._tls_early is None else None
        if view is not None:
            self._into = view
            return view
        # Shared by every connection: a transport fills it and calls buffer_updated() at once, and the
        # core copies what it needs before that returns.
        self._into = None
        return self._recv_view

    def buffer_updated(self, nbytes: int) -> None:
        into = self._into
        if into is None:
            self.data_received(self._recv_view[:nbytes])
            return
        self._into = None
        self.progressed = True
        self.conn.payload_received(nbytes)
        if nbytes == len(into):  # the payload is whole: its request can start
            self._process()

    def data_received(self, data: bytes | memoryview) -> None:
        self.progressed = True
        if self._tls_early is not None:
            # Decrypted already: once STARTTLS has paused the plaintext socket, only the TLS layer calls
            # here, and it may do so before start_tls() has returned. Kept for tls_established().
            self._tls_early.append(bytes(data))
            return
        self.conn.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        if self._tls_early is not None:
            self._tls_early.append(b"")
            return False
        self.conn.receive_data(b"")
        self._process()
        # Keep our half open: replies to requests still in flight are written before we close. (A TLS
        # transport cannot stay half open; asyncio would only warn.)
        return not self.conn.tls

    def connection_lost(self, exc: Exception | None) -> None:
        if self.queued:
            self.queued = False
            self._closed = self._rejected = True
            try:
                self.server.queued.remove(self)
            except ValueError:
                pass
            return
        self._close_sock()
        if self._rejected or (self._closed and self._finish_task is not None):
            return
        self._closed = True
        self.server.starved.discard(self)
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        log.debug("connection closed", extra={"peer": self.peer})
        # Requests still running are not cancelled: a driver must never be interrupted half-way through
        # an update. They finish, their replies are dropped, and then the export is released.
        self._write_paused = False
        if self._finish_task is None:
            self._ending = True
            self._finish_task = self._spawn(self._finish())

    def pause_writing(self) -> None:
        self._write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._maybe_resume()

    # -- flow control ------------------------------------------------------------------------------------
    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None and not self._closed:
            self._read_paused = True
            self.transport.pause_reading()

    def _over_caps(self) -> bool:
        if (self._inflight >= self._max_requests or self._inflight_bytes >= self._max_bytes
                or self._write_paused):
            return True
        srv = self.server
        if srv.inflight_bytes >= srv.max_total_bytes:
            # Starved by other connections: woken by the next request that finishes anywhere.
            srv.starved.add(self)
            return True
        return False

    def _maybe_resume(self) -> None:
        if self._closed or self._over_caps():
            return
        self._process()
        if self._read_paused and not self._over_caps() and not self._ending:
            self._read_paused = False
            assert self.transport is not None
            self.transport.resume_reading()

    def _write(self, bufs: list[Any], nbytes: int = 0) -> None:
        batch = self._batch
        if batch is None and not self._closed:
            # A reply from a finished task: hold it until the end of this loop iteration, so that
            # the replies of every request finishing in the same iteration leave in one syscall.
            batch = self._batch = []
            asyncio.get_running_loop().call_soon(self._flush_batch)
        if batch is not None:
            batch.extend(bufs)
            self._batch_bytes += nbytes
            if self._batch_bytes < _BATCH_BYTES:
                return
            bufs = batch
            self._batch = []
            self._batch_bytes = 0
        if bufs and not self._closed and self.transport is not None:
            self.transport.writelines(bufs)

    def _write_files(self, bufs: list[Any]) -> None:
        """A reply holding FileSlices, sent at once behind the replies batched so far: its fds are the
        driver's, valid now, and nothing may run between the driver's answer and the send."""
        batch = self._batch
        if batch:
            batch.extend(bufs)
            bufs = batch
            self._batch = []
            self._batch_bytes = 0
        self._send_files(bufs)

    def _send_files(self, bufs: list[Any]) -> None:
        """Send replies some of whose payloads are FileSlices, in order.

        Straight to the socket while the transport holds nothing unsent (else the bytes would overtake
        it): buffers by sendmsg, FileSlices by sendfile, so that the data goes from the page cache to the
        socket without a copy through Python. What the socket does not take at once is read into buffers
        and left to the transport.
        """
        tr = self.transport
        if tr is None or self._closed:
            return
        sock = self._sock
        i = 0
        n = len(bufs)
        if sock is not None and not tr.get_write_buffer_size() and not tr.is_closing():
            fd = sock.fileno()
            try:
                while i < n:
                    b = bufs[i]
                    if type(b) is FileSlice:
                        sent = os.sendfile(fd, b.fd, b.offset, b.length)
                        if sent < b.length:
                            bufs[i] = FileSlice(b.fd, b.offset + sent, b.length - sent)
                            break
                        i += 1
                        continue
                    j = i + 1
                    while j < n and j - i < 512 and type(bufs[j]) is not FileSlice:
                        j += 1
                    # MSG_MORE: a reply header waits for its payload instead of leaving in a segment alone
                    sent = sock.sendmsg(bufs[i:j], (), socket.MSG_MORE if j < n else 0)
                    while i < j and sent >= len(bufs[i]):
                        sent -= len(bufs[i])
                        i += 1
                    if i < j:
                        bufs[i] = memoryview(bufs[i])[sent:]
                        break
            except BlockingIOError:
                pass
            except OSError:
                # The transport finds out about a broken connection by itself; a socket that refuses
                # sendfile (EINVAL) gets buffered replies from now on.
                self._close_sock()
        if i < n:
            try:
                tr.writelines([b.read() if type(b) is FileSlice else b for b in bufs[i:]])
            except OSError as e:
                # Part of the reply may be on the wire already: the stream cannot continue.
                log.error("reading a reply's data failed", extra={"peer": self.peer, "error": str(e)})
                tr.abort()

    def _close_sock(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _flush_batch(self) -> None:
        batch, self._batch = self._batch, None
        self._batch_bytes = 0
        if batch and not self._closed and self.transport is not None:
            self.transport.writelines(batch)
        n = self._inline_reads
        if n:
            # The inline reads of this burst arrived together and their replies leave together, now:
            # one latency sample for all of them, so each costs no clock reading of its own.
            self._inline_reads = 0
            dt = _clock() - self._inline_t0
            stats = self.stats
            stats.latency[CMD_READ][bisect_left(LATENCY_BOUNDS, dt)] += n
            stats.latency_sum[CMD_READ] += dt * n

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- event dispatch ----------------------------------------------------------------------------------
    def _process(self) -> None:
        # Replies produced while draining one burst of input go out in one writelines() call: one
        # syscall for a whole queue depth of page-cache reads instead of one per reply.
        if self._batch is not None:
            self._process_events()
            return
        self._batch = []
        try:
            self._process_events()
        finally:
            self._flush_batch()

    def _process_events(self) -> None:
        conn = self.conn
        while not self._closed and not self._waiting_answer and not self._ending:
            if self._over_caps():
                self._pause_reading()
                return
            ev = conn.next_event()
            if ev is None:
                break
            if type(ev) is Request:
                self._request(ev)
            elif type(ev) is InvalidRequest:
                log.debug("invalid request", extra={"peer": self.peer, "error": ev.message})
                if 0 <= ev.cmd < _NCMDS:
                    self.stats.ops[ev.cmd] += 1
                self.stats.error(ev.errno)
                self._write(conn.reply_error(ev.cookie, ev.errno, ev.message))
            elif type(ev) is ExportInfoRequest:
                self._waiting_answer = True
                self._spawn(self._answer_export(ev))
            elif type(ev) is ListRequest:
                self._waiting_answer = True
                self._spawn(self._answer_list())
            elif type(ev) is StartTLS:
                self._start_tls(ev)
            elif type(ev) is Ready:
                self.export, self._pending = self._pending, None
                self.server.handshake_done(self)
                if self._handshake_timer is not None:
                    self._handshake_timer.cancel()
                    self._handshake_timer = None
                self.driver = self._pending_driver if self.export is not None else None
                self._pending_driver = None
                self.read_only = self.driver is None or not self.driver.caps.writable
                if self.server.zero_copy and not conn.tls and self.transport is not None:
                    self._sock = _dup_socket(self.transport)
                self.export_name = ev.export.name
                log.info("export opened", extra={"peer": self.peer, "export": ev.export.name,
                                                 "structured": conn.structured, "extended": conn.extended})
                self._announced = True
                self.server.event("CLIENT_CONNECTED", {"id": self.id, "peer": self.peer,
                                                       "export": ev.export.name})
            elif isinstance(ev, ProtocolError):
                log.warning("protocol error", extra={"peer": self.peer, "error": ev.message})
                self._write(conn.data_to_send())
                self._ending = True
                self._abort()
                return
            elif isinstance(ev, (Disconnect, ConnectionClosed)):
                self._write(conn.data_to_send())
                self._ending = True
                self._finish_task = self._spawn(self._finish())
                return
        out = conn.data_to_send()
        if out and self._handshake_timer is not None:
            self._handshake_answered()
        self._write(out)

    # -- TLS -------------------------------------------------------------------------------------------------
    def _start_tls(self, ev: StartTLS) -> None:
        assert self.transport is not None and self.tls_creds is not None
        # The ACK goes out in plaintext, and must leave before the transport is wrapped.
        self._flush_batch()
        self._batch = []
        self.transport.writelines(self.conn.data_to_send())
        self._handshake_answered()  # the TLS handshake has a whole timeout of its own
        if ev.discarded:
            log.warning("plaintext after STARTTLS discarded",
                        extra={"peer": self.peer, "bytes": ev.discarded})
        # Not one more plaintext byte is read: the TLS layer takes the socket over from here.
        self.transport.pause_reading()
        self._waiting_answer = True
        self._tls_early = []
        self._tls_task = self._spawn(self._upgrade(self.tls_creds))

    async def _upgrade(self, creds: Credentials) -> None:
        raw = self.transport
        assert raw is not None
        loop = asyncio.get_running_loop()
        timeout = self.server.handshake_timeout
        left = timeout - (loop.time() - self._answered_at) if timeout > 0 else 60.0
        try:
            new = await loop.start_tls(raw, self, creds.context, server_side=True,
                                       ssl_handshake_timeout=max(left, 0.1))
        except asyncio.CancelledError:
            raw.abort()
            raise
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError, RuntimeError) as exc:
            self._tls_early = None
            if not self._closed:
                log.warning("TLS handshake failed",
                            extra={"peer": self.peer, "reason": handshake_failure(exc)})
            self._tls_task = None
            self.abort_handshake()
            return
        self._tls_task = None
        early, self._tls_early = self._tls_early or [], None
        if new is None or self._closed:
            return
        self.transport = new
        new.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        sslobj = new.get_extra_info("ssl_object")
        if sslobj is not None:
            from .tls import dn_of

            cert = sslobj.getpeercert()
            self.tls_dn = dn_of(cert) if cert else None
            self.tls_version = sslobj.version()
        log.info("TLS established", extra={"peer": self.peer, "version": self.tls_version,
                                           "client": self.tls_dn or "-"})
        self.conn.tls_established()
        self._waiting_answer = False
        for data in early:
            self.conn.receive_data(data)
        self._process()

    def _abort(self) -> None:
        self._flush_batch()
        if self.transport is not None and not self._closed:
            self.transport.close()

    async def _finish(self) -> None:
        """Let in-flight requests write their replies, then close and release the export.

        The connection stays in ``server.connections`` until this is done, so a shutdown waits for its
        requests before it closes the images under them.
        """
        try:
            others = [t for t in self._tasks if t is not asyncio.current_task()]
            if others:
                await asyncio.gather(*others, return_exceptions=True)
            self._write(self.conn.data_to_send())
            # Release (flush, close, unlock) before closing the socket: a client that waits for our
            # end of the connection then finds the image free for qemu-img or a VM.
            await self._release()
            self._flush_batch()
            if self.transport is not None and not self._closed:
                self.transport.close()
        finally:
            self.server.forget(self)

    async def _release(self) -> None:
        exp, self.export, self.driver = self.export, None, None
        pending, self._pending, self._pending_driver = self._pending, None, None
        for e in (exp, pending):
            if e is not None:
                try:
                    await self.server.registry.release(e)
                except Exception:
                    log.exception("releasing an export failed")

    # -- handshake ---------------------------------------------------------------------------------------
    async def _answer_export(self, ev: ExportInfoRequest) -> None:
        # The export a connection asks about is kept open for the rest of the handshake: clients ask
        # SET_META_CONTEXT, INFO and GO about the same name in a row, and reopening for each costs time.
        info = None
        error: tuple[int, str] | None = None
        refusal = self.policy.check(ev.name, addr=self.addr, tls=self.conn.tls, dn=self.tls_dn)
        if refusal is not None:
            self._waiting_answer = False
            log.warning("export refused", extra={"peer": self.peer, "export": ev.name, "error": refusal[1],
                                                 "client": self.tls_dn or "-"})
            self._handshake_answered()
            self._write(self.conn.answer_export(None, refusal))
            self._process()
            return
        try:
            if ev.option not in (OPT_GO, OPT_EXPORT_NAME) and (
                    self._pending is None or self._pending_name != ev.name):
                # INFO, LIST_META_CONTEXT and SET_META_CONTEXT (nbdinfo --list, health checks) only
                # describe: no lock is taken and nothing stays open. Only GO opens the export.
                if self._described is not None and self._described[0] == ev.name:
                    info = self._described[1]
                else:
                    info = await self.server.registry.describe(ev.name)
                    if info is not None:
                        self._described = (ev.name, info)
            elif self._pending is None or self._pending_name != ev.name:
                old, self._pending = self._pending, None
                if old is not None:
                    await self.server.registry.release(old)
                exp = await self.server.registry.acquire(ev.name)
                if exp is not None and self.server.registry.entry(ev.name) is None:
                    # export-remove took the name away while the image was opening for it.
                    await self.server.registry.release(exp)
                    exp = None
                if self._closed:
                    if exp is not None:
                        await self.server.registry.release(exp)
                    return
                self._pending, self._pending_name = exp, ev.name
                if exp is not None:
                    # An alias may have settings of its own (read-only, a description) over the image.
                    self._pending_driver, self._pending_info = self.server.registry.view(ev.name, exp)
            if self._pending is not None and info is None:
                info = self._pending_info
        except BlockError as e:
            log.warning("export refused", extra={"peer": self.peer, "export": ev.name, "error": str(e)})
            error = backend.refusal(e)
        except Exception:
            log.exception("opening export %r failed", ev.name)
        finally:
            self._waiting_answer = False
        if self._closed:
            return
        self._handshake_answered()
        self._write(self.conn.answer_export(info, error))
        self._process()

    async def _answer_list(self) -> None:
        try:
            exports = await self.server.registry.list_probed()
            if not self.policy.trivial:
                # what this client may not open is not listed (the spec allows leaving TLS-only exports out)
                exports = [e for e in exports if self.policy.check(
                    e[0], addr=self.addr, tls=self.conn.tls, dn=self.tls_dn) is None]
        except Exception:
            log.exception("listing exports failed")
            exports = []
        finally:
            self._waiting_answer = False
        if self._closed:
            return
        self._handshake_answered()
        self._write(self.conn.answer_list(exports))
        self._process()

    # -- transmission ------------------------------------------------------------------------------------
    def _request(self, req: Request) -> None:
        driver = self.driver
        cmd = req.cmd
        stats = self.stats
        stats.ops[cmd] += 1
        if driver is None or self.server.closing:
            self._refuse(req)
            return
        if cmd == CMD_READ:
            if self._sock is not None and req.length >= _SENDFILE_MIN:
                try:
                    runs = driver.host_runs_nowait(req.offset, req.length)
                except Exception:
                    runs = None
                if runs is not None:
                    chunks: list[Any] = []
                    pos = req.offset
                    for n, fd, host in runs:
                        chunks.append((pos, FileSlice(fd, host, n) if fd >= 0 else n))
                        pos += n
                    if not self._inline_reads:
                        self._inline_t0 = _clock()
                    self._write_files(self.conn.reply_read(req.cookie, chunks, df=req.df))
                    stats.bytes_read += req.length
                    self._inline_reads += 1
                    return
            if (req.length >= _SPARSE_READ_MIN and self.conn.structured and not req.df and driver.caps.extents
                    and driver.sparse_reads):
                nbytes = req.length
                coro: Any = self._read_sparse(driver, req)
            else:
                buf = _read_buffer(req.length)
                if not self._inline_reads:
                    self._inline_t0 = _clock()
                try:
                    ok = driver.readinto_nowait(req.offset, buf)
                except Exception:
                    ok = False
                if ok:
                    self._write(self.conn.reply_read(req.cookie, ((req.offset, buf),), df=req.df),
                                req.length)
                    stats.bytes_read += req.length
                    self._inline_reads += 1
                    return
                nbytes = req.length
                coro = self._read(driver, req, buf)
        elif cmd == CMD_WRITE and not req.fua:
            # The driver starts the write itself: no task, and the reply leaves from a callback
            assert req.data is not None
            t0 = _clock()
            try:
                started = driver.write_started(req.offset, req.data)
            except Exception as e:
                self._fail(req, e)
                return
            if started is True:
                stats.bytes_written += req.length
                self._write(self.conn.reply_ok(req.cookie))
                dt = _clock() - t0
                stats.latency[CMD_WRITE][bisect_left(LATENCY_BOUNDS, dt)] += 1
                stats.latency_sum[CMD_WRITE] += dt
                return
            if started is not False:
                nbytes = req.length
                self._inflight += 1
                self._inflight_bytes += nbytes
                self.server.inflight_bytes += nbytes
                self._tasks.add(started)
                started.add_done_callback(self._tasks.discard)
                started.add_done_callback(functools.partial(self._write_done, req, nbytes, t0))
                return
            nbytes = req.length
            coro = self._command(driver, req)
        elif cmd == CMD_BLOCK_STATUS and self._block_status_nowait(driver, req):
            return
        else:
            nbytes = req.length if cmd == CMD_WRITE else 0
            coro = self._command(driver, req)
        self._inflight += 1
        self._inflight_bytes += nbytes
        self.server.inflight_bytes += nbytes
        task = self._spawn(coro)
        task.add_done_callback(functools.partial(self._done, nbytes, cmd, _clock()))

    def _block_status_nowait(self, driver: BlockDriver, req: Request) -> bool:
        """Answer a block-status request on the spot where every negotiated context's runs are found
        without awaiting (a raw file's lseeks): no task, and the reply leaves with this burst's others.
        `qemu-img map` over NBD asks one run per request: over a raw file of 16,384 runs it took
        1.08-1.13 s with a task per request and 0.75-0.76 s so (nbdkit: 0.51 s; server and client on
        one CPU). False: nothing was sent, use the task."""
        conn = self.conn
        t0 = _clock()
        runs: list[tuple[int, list[tuple[int, int]]]] = []
        try:
            for cid, name in conn.meta_contexts.items():
                got = backend.block_status_nowait(driver, name, req.offset, req.length, req_one=req.req_one)
                if got is None:
                    return False
                runs.append((cid, got))
        except BaseException as e:
            self._fail(req, e)
            return True
        out: list[Any] = []
        for cid, got in runs:
            out.extend(conn.reply_block_status(req.cookie, cid, got))
        self._write(out)
        dt = _clock() - t0
        stats = self.stats
        stats.latency[CMD_BLOCK_STATUS][bisect_left(LATENCY_BOUNDS, dt)] += 1
        stats.latency_sum[CMD_BLOCK_STATUS] += dt
        return True

    def _write_done(self, req: Request, nbytes: int, t0: float, fut: asyncio.Future[None]) -> None:
        exc = BlockError("write cancelled") if fut.cancelled() else fut.exception()
        if exc is None:
            self.stats.bytes_written += req.length
            self._write(self.conn.reply_ok(req.cookie))
        else:
            self._fail(req, exc)
        self._done(nbytes, CMD_WRITE, t0, fut)

    def _refuse(self, req: Request) -> None:
        why = self._stopping or "server is shutting down"
        self.stats.error(errno.ESHUTDOWN)
        self._write(self.conn.reply_error(req.cookie, errno.ESHUTDOWN, why))

    def _done(self, nbytes: int, cmd: int, t0: float, _task: object) -> None:
        dt = _clock() - t0
        stats = self.stats
        stats.latency[cmd][bisect_left(LATENCY_BOUNDS, dt)] += 1
        stats.latency_sum[cmd] += dt
        self._inflight -= 1
        self._inflight_bytes -= nbytes
        srv = self.server
        srv.inflight_bytes -= nbytes
        self._maybe_resume()
        if srv.starved and srv.inflight_bytes < srv.max_total_bytes:
            starved = list(srv.starved)
            srv.starved.clear()
            for c in starved:
                c._maybe_resume()

    async def _read(self, driver: BlockDriver, req: Request, buf: memoryview) -> None:
        try:
            await driver.readinto(req.offset, buf)
        except BaseException as e:
            self._fail(req, e)
            return
        self.stats.bytes_read += req.length
        self._write(self.conn.reply_read(req.cookie, ((req.offset, buf),), df=req.df))

    async def _read_sparse(self, driver: BlockDriver, req: Request) -> None:
        """A large read as data and hole chunks, so runs that read as zeroes cross the wire as 16 bytes."""
        try:
            runs: list[tuple[int, int, bool]] = []
            end = req.offset + req.length
            async for e in driver.extents(req.offset, req.length):
                start, stop = max(e.start, req.offset), min(e.end, end)
                if stop <= start:
                    continue
                if runs and runs[-1][2] == e.zero and runs[-1][0] + runs[-1][1] == start:
                    runs[-1] = (runs[-1][0], runs[-1][1] + stop - start, e.zero)
                else:
                    runs.append((start, stop - start, e.zero))
            covered = sum(r[1] for r in runs)
            chunks: list[Any] = []
            if covered != req.length or not any(zero for _, _, zero in runs):
                buf = _read_buffer(req.length)
                if not driver.readinto_nowait(req.offset, buf):
                    await driver.readinto(req.offset, buf)
                chunks.append((req.offset, buf))
            else:
                for start, length, zero in runs:
                    if zero:
                        chunks.append((start, length))
                    else:
                        piece = _read_buffer(length)
                        if not driver.readinto_nowait(start, piece):
                            await driver.readinto(start, piece)
                        chunks.append((start, piece))
        except BaseException as e:
            self._fail(req, e)
            return
        self.stats.bytes_read += req.length
        self._write(self.conn.reply_read(req.cookie, chunks))

    async def _command(self, driver: BlockDriver, req: Request) -> None:
        conn = self.conn
        cmd = req.cmd
        try:
            if cmd == CMD_WRITE:
                assert req.data is not None
                await driver.write(req.offset, req.data, fua=req.fua)
                self.stats.bytes_written += req.length
                out = conn.reply_ok(req.cookie)
            elif cmd == CMD_WRITE_ZEROES:
                await driver.write_zeroes(req.offset, req.length, may_trim=not req.no_hole,
                                          fast=req.fast_zero, fua=req.fua)
                out = conn.reply_ok(req.cookie)
            elif cmd == CMD_FLUSH:
                await driver.flush()
                out = conn.reply_ok(req.cookie)
            elif cmd == CMD_TRIM:
                await driver.trim(req.offset, req.length, fua=req.fua)
                out = conn.reply_ok(req.cookie)
            elif cmd == CMD_CACHE:
                await driver.cache(req.offset, req.length)
                out = conn.reply_ok(req.cookie)
            elif cmd == CMD_BLOCK_STATUS:
                out = []
                for cid, name in list(conn.meta_contexts.items()):
                    runs = await backend.block_status(driver, name, req.offset, req.length,
                                                      req_one=req.req_one)
                    out.extend(conn.reply_block_status(req.cookie, cid, runs))
            else:
                out = conn.reply_error(req.cookie, errno.EINVAL, f"unsupported command {req.name}")
        except BaseException as e:
            self._fail(req, e)
            return
        self._write(out)

    def _fail(self, req: Request, e: BaseException) -> None:
        if isinstance(e, asyncio.CancelledError):
            raise e
        if isinstance(e, BlockError):
            if log.isEnabledFor(logging.DEBUG):
                log.debug("request failed", extra={"peer": self.peer, "cmd": req.name, "offset": req.offset,
                                                   "length": req.length, "error": str(e)})
            self.stats.error(e.errno)
            self._write(self.conn.reply_error(req.cookie, e.errno, str(e)))
            return
        if not isinstance(e, Exception):
            raise e
        log.error("request raised", exc_info=e, extra={"peer": self.peer, "cmd": req.name})
        self.stats.error(errno.EIO)
        self._write(self.conn.reply_error(req.cookie, errno.EIO, "internal error"))

    # -- shutdown ----------------------------------------------------------------------------------------
    async def drain_and_close(self) -> None:
        """For shutdown: wait for in-flight requests, then close."""
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.transport is not None and not self._closed:
            self.transport.close()
        await self._release()
        if self._finish_task is not None:
            await asyncio.gather(self._finish_task, return_exceptions=True)
        self.server.forget(self)

    async def _flush(self, driver: BlockDriver) -> None:
        try:
            await driver.flush()
        except BlockError as e:
            log.error("flush before disconnect failed", extra={"peer": self.peer, "error": str(e)})

    async def disconnect(self, reason: str) -> None:
        """Close this connection on the server's initiative (client-disconnect, export-remove hard).

        Requests already in flight complete and their replies are sent; requests that arrive from now on
        are answered with ESHUTDOWN; the image is flushed (if the connection could write) before the
        socket is closed, so every write the client saw acknowledged is on disk when it sees EOF.
        Returns once the connection is gone and its export released.
        """
        if self.gone.is_set():
            return
        if self.export is None:
            # Still in the handshake: nothing to drain.
            self._ending = True
            self._abort()
        elif self._stopping is None:
            self._stopping = reason
            exp, driver, self.driver = self.export, self.driver, None
            tasks = [t for t in self._tasks if t is not asyncio.current_task() and t is not self._finish_task]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if driver is not None and not self.read_only and self.export is exp and not self._closed:
                # A task of the connection's own, so that a close by the peer meanwhile waits for it
                # before the export is released.
                await asyncio.gather(self._spawn(self._flush(driver)), return_exceptions=True)
            log.info("disconnecting client", extra={"peer": self.peer, "export": self.export_name,
                                                    "reason": reason})
            self._ending = True
            self._flush_batch()
            if self.transport is not None and not self._closed:
                self.transport.close()
        try:
            await asyncio.wait_for(self.gone.wait(), _CLOSE_GRACE)
        except TimeoutError:
            # The peer does not take its last replies: drop them, the data is flushed already.
            if self.transport is not None:
                self.transport.abort()
            await self.gone.wait()


class NBDServer:
    """Listening sockets plus the set of live connections, sharing one export registry."""

    # Large reads served from the page cache by sendfile(2) on connections without TLS (False: every
    # reply is copied into a buffer first, as over TLS).
    zero_copy = True

    def __init__(self, registry: ExportRegistry, *, max_requests: int = 64, max_bytes: int = 64 << 20,
                 max_total_bytes: int = 256 << 20, handshake_timeout: float = 10.0,
                 max_connections: int = 1024, max_connections_per_address: int = 128,
                 max_handshakes: int = 128, max_handshakes_per_address: int = 16,
                 socket_mode: int | None = None, socket_group: int | None = None,
                 proto_config: ProtocolConfig | None = None, tls_mode: str = "off",
                 tls_creds: Credentials | None = None, policy: Policy | None = None) -> None:
        self.registry = registry
        # What new connections get; a reload replaces them, running connections keep their own.
        self.tls_mode = tls_mode
        self.tls_creds = tls_creds
        self.policy = policy or Policy()
        self.max_connections = max_connections
        self.max_connections_per_address = max_connections_per_address
        self.max_handshakes = max_handshakes
        self.max_handshakes_per_address = max_handshakes_per_address
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.handshakes = 0
        # Per peer IP address: [connections, of which still in the handshake]
        self._per_addr: dict[str, list[int]] = {}
        self.max_total_bytes = max_total_bytes
        self.inflight_bytes = 0
        self.starved: set[NBDConnection] = set()
        self.handshake_timeout = handshake_timeout
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        # WRITE payloads are received into page-aligned buffers (see imagecore.hostio.aligned_buffer), not
        # zero-filled first: the core hands a request over only once the socket has filled all of it
        unzeroed = functools.partial(aligned_buffer, zeroed=False)
        self.proto_config = dataclasses.replace(proto_config or ProtocolConfig(), payload_buffer=unzeroed)
        # What every connection receives into, except the rest of a WRITE payload (NBDConnection)
        self.recv_view = memoryview(bytearray(_RECV_BUFFER))
        self.connections: set[NBDConnection] = set()
        self.closing = False
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[str] = []
        self._ids = itertools.count(1)
        self.started = time.monotonic()
        self.node = ""  # this node's name (--node), for logs, metrics and query-status
        self.connections_total = 0
        # Counters of connections that have closed, for the whole server and per export name chosen.
        self.retired = Counters()
        self.retired_by_export: dict[str, Counters] = {}
        # Called with (event name, data) for the admin socket's events; set by the composition root.
        self.on_event: Callable[[str, dict[str, Any]], None] | None = None
        # Called with each connection once it is counted out (qemu-nbd's exit after the last client).
        self.on_closed: Callable[[NBDConnection], None] | None = None
        # Over max_connections, a new client waits for a slot instead of being closed (qemu-nbd -e).
        self.queue_when_full = False
        self.queued: collections.deque[NBDConnection] = collections.deque()
        self._sweep: asyncio.Handle | None = None
        # the connections in the handshake, least recently answered first (see admit)
        self._handshaking: collections.OrderedDict[NBDConnection, None] = collections.OrderedDict()
        # at most this many wait so (qemu-nbd's listen backlog: -e N, or SOMAXCONN with -t or -e 0)
        self.max_queued = 1 << 30

    def event(self, name: str, data: dict[str, Any]) -> None:
        if self.on_event is not None:
            try:
                self.on_event(name, data)
            except Exception:
                log.exception("sending event %s failed", name)

    # -- connection accounting ---------------------------------------------------------------------------
    # Each connection may buffer a whole 32 MiB payload before it becomes a request, so the number of
    # connections is what bounds that memory. Connections still in the handshake have a cap of their own,
    # and every peer address a smaller share of both, so that neither idle VM disks nor clients that
    # connect and say nothing can take every slot, and one address cannot lock out another.
    #
    # When every handshake slot is taken, a new connection is not refused: the connection that has the
    # weakest claim to its slot is dropped instead: one that has not finished TLS, from the address that
    # holds the most handshake slots, that has sent nothing, the oldest. So idle or slow sockets, however
    # many, cannot lock out a client that completes its handshake (1,000 of them are measured in
    # tests/interop/test_nbd_tls_hardening.py), and a client mid-handshake is the last to go.
    #
    # Only a connection that has had HANDSHAKE_GRACE since its greeting or its last answer is dropped for
    # a newcomer, though: a thousand clients connecting at once (VMs starting together) have sent nothing
    # yet either, and dropping them for each other would let none through. While none has had its grace,
    # newcomers are admitted past max_handshakes (still within max_connections; at that bound the old
    # rule applies to every connection), and a sweep brings the count back down once the grace of the
    # silent ones is over.
    def admit(self, conn: NBDConnection) -> str | None:
        """Count ``conn`` in, or return why it is refused."""
        counts = self._per_addr.get(conn.addr) if conn.addr is not None else None
        if counts is not None:
            if counts[0] >= self.max_connections_per_address:
                return "too many connections from this address"
            if counts[1] >= self.max_handshakes_per_address:
                return "too many connections in the handshake from this address"
        if self.handshakes >= self.max_handshakes and not self._evict(stale_only=True):
            if len(self.connections) < self.max_connections:
                self._arm_sweep()
            elif not self._evict(stale_only=False):
                return "too many connections in the handshake"
        if len(self.connections) >= self.max_connections:
            return "too many connections"
        if conn.addr is not None:
            if counts is None:
                counts = self._per_addr[conn.addr] = [0, 0]
            counts[0] += 1
            counts[1] += 1
        self.connections.add(conn)
        self.connections_total += 1
        self.handshakes += 1
        conn.handshaking = True
        self._handshaking[conn] = None
        return None

    def _evict(self, *, stale_only: bool, count: int = 1) -> int:
        """Drop the ``count`` handshaking connections with the weakest claims to their slots (with
        ``stale_only``, of those past their HANDSHAKE_GRACE); returns how many were dropped."""
        def claim(c: NBDConnection) -> tuple[bool, int, bool, float]:
            held = self._per_addr[c.addr][1] if c.addr is not None else 0
            return (c.conn.tls, -held, c.progressed, c.since)

        if stale_only:
            # _handshaking is in order of last answer: the stale ones are its head, and a burst of new
            # connections costs no scan
            since = asyncio.get_running_loop().time() - HANDSHAKE_GRACE
            candidates = list(itertools.takewhile(lambda c: c._answered_at <= since, self._handshaking))
        else:
            candidates = list(self._handshaking)
        candidates = [c for c in candidates if not c._closed]
        # one ranking for the whole batch: a sweep after a burst drops hundreds at once
        victims = [min(candidates, key=claim)] if count == 1 and candidates else \
            heapq.nsmallest(count, candidates, key=claim)
        if len(victims) == 1:
            log.warning("handshake slots full: dropping a connection", extra={"peer": victims[0].peer})
        elif victims:
            log.warning("handshake slots full: dropping connections", extra={"count": len(victims)})
        for victim in victims:
            self.handshake_done(victim)
            victim.abort_handshake()
        return len(victims)

    def _arm_sweep(self) -> None:
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(HANDSHAKE_GRACE / 2, self._sweep_handshakes)

    def _sweep_handshakes(self) -> None:
        """Back down to max_handshakes after a burst, dropping only connections past their grace, a batch
        per loop turn so that the clients being served meanwhile are not held up."""
        self._sweep = None
        excess = self.handshakes - self.max_handshakes
        if excess <= 0 or self.closing:
            return
        batch = min(excess, _SWEEP_BATCH)
        dropped = self._evict(stale_only=True, count=batch)
        if dropped == batch and excess > batch:
            self._sweep = asyncio.get_running_loop().call_soon(self._sweep_handshakes)
        elif dropped < excess:
            self._arm_sweep()

    def handshake_done(self, conn: NBDConnection) -> None:
        if conn.handshaking:
            conn.handshaking = False
            self._handshaking.pop(conn, None)
            self.handshakes -= 1
            if conn.addr is not None:
                self._per_addr[conn.addr][1] -= 1

    def clients(self) -> list[dict[str, Any]]:
        """One record per connection, for the admin socket's query-clients."""
        out: list[dict[str, Any]] = []
        for conn in sorted(self.connections, key=lambda c: c.id):
            st = conn.stats
            proto = conn.conn
            rec: dict[str, Any] = {
                "id": conn.id, "peer": conn.peer, "since": round(conn.since, 3),
                "state": "handshake" if conn.handshaking else "transmission",
                "structured-replies": proto.structured, "extended-headers": proto.extended,
                "meta-contexts": list(proto.meta_contexts.values()) if conn.export_name is not None else [],
                "tls": proto.tls, "requests": st.requests, "bytes-read": st.bytes_read,
                "bytes-written": st.bytes_written, "inflight": conn._inflight}
            if conn.export_name is not None:
                rec["export"] = conn.export_name
                rec["read-only"] = conn.read_only
            if conn.tls_dn is not None:
                rec["tls-client"] = conn.tls_dn
            out.append(rec)
        return out

    def find(self, conn_id: int) -> NBDConnection | None:
        for conn in self.connections:
            if conn.id == conn_id:
                return conn
        return None

    def clients_of(self, name: str) -> list[NBDConnection]:
        """Connections using export ``name``, or holding it open in the handshake."""
        return [c for c in self.connections
                if c.export_name == name or (c._pending is not None and c._pending_name == name)]

    def totals(self) -> Counters:
        """Counters of the whole server: closed connections plus the live ones."""
        out = Counters()
        out.add(self.retired)
        for conn in list(self.connections):
            out.add(conn.stats)
        return out

    def export_totals(self) -> dict[str, Counters]:
        """Counters per export name (as clients chose it): closed connections plus the live ones."""
        out: dict[str, Counters] = {}
        for name, st in self.retired_by_export.items():
            out[name] = total = Counters()
            total.add(st)
        for conn in list(self.connections):
            if conn.export_name is not None:
                c = out.get(conn.export_name)
                if c is None:
                    c = out[conn.export_name] = Counters()
                c.add(conn.stats)
        return out

    def stats(self) -> dict[str, Any]:
        """query-server-stats' answer."""
        t = self.totals()
        return {"connections": {"open": len(self.connections), "total": self.connections_total,
                                "handshaking": self.handshakes},
                "requests": t.requests, "bytes-read": t.bytes_read, "bytes-written": t.bytes_written,
                "errors": {errno_name(e): n for e, n in sorted(t.errors.items())},
                "uptime": round(time.monotonic() - self.started, 3)}

    def forget(self, conn: NBDConnection) -> None:
        """Count ``conn`` out (idempotent)."""
        if conn not in self.connections:
            return
        self.handshake_done(conn)
        self.connections.discard(conn)
        self.retired.add(conn.stats)
        if conn.export_name is not None:
            per = self.retired_by_export.get(conn.export_name)
            if per is None:
                per = self.retired_by_export[conn.export_name] = Counters()
            per.add(conn.stats)
        if conn.addr is not None:
            counts = self._per_addr[conn.addr]
            counts[0] -= 1
            if counts[0] == 0:
                del self._per_addr[conn.addr]
        conn.gone.set()
        if self.on_closed is not None:
            self.on_closed(conn)
        while self.queued and len(self.connections) < self.max_connections and not self.closing:
            self.queued.popleft().start()
        if conn._announced:
            self.event("CLIENT_DISCONNECTED", {"id": conn.id, "peer": conn.peer, "export": conn.export_name})

    def _factory(self) -> Callable[[], NBDConnection]:
        return lambda: NBDConnection(self)

    async def listen(self, addr: ListenAddr) -> list[str]:
        """Start listening on ``addr``; returns the bound addresses (to report an ephemeral port)."""
        loop = asyncio.get_running_loop()
        if addr.fd is not None:
            # inherited by socket activation: already bound and listening; its owner removes any path
            from .activation import adopt

            sock = adopt(addr.fd)
            if sock.family == socket.AF_UNIX:
                srv = await loop.create_unix_server(self._factory(), sock=sock, backlog=LISTEN_BACKLOG)
            else:
                srv = await loop.create_server(self._factory(), sock=sock, backlog=LISTEN_BACKLOG)
            self._servers.append(srv)
            name = sock.getsockname()
            return [f"{addr}={name[0]}:{name[1]}" if isinstance(name, tuple) else f"{addr}={name or '?'}"]
        if addr.unix is not None:
            path = addr.unix
            sock = self._unix_socket(path)
            srv = await loop.create_unix_server(self._factory(), sock=sock, backlog=LISTEN_BACKLOG)
            self._unix_paths.append(path)
        else:
            srv = await loop.create_server(self._factory(), addr.host, addr.port or 0, reuse_address=True,
                                           backlog=LISTEN_BACKLOG)
        self._servers.append(srv)
        bound = []
        for s in srv.sockets:
            # A unix socket keeps the temporary name it was bound to: report the one it was renamed to.
            name = addr.unix if addr.unix is not None else s.getsockname()
            bound.append(name if isinstance(name, str) else f"{name[0]}:{name[1]}")
        return bound

    async def serve_socket(self, sock: socket.socket) -> NBDConnection:
        """Serve one connection already accepted elsewhere (--stdio: the socket on stdin/stdout)."""
        loop = asyncio.get_running_loop()
        _, proto = await loop.connect_accepted_socket(self._factory(), sock=sock)
        return proto

    def _unix_socket(self, path: str) -> socket.socket:
        """A listening unix socket at ``path`` that has its mode and group before anyone can see it.

        It is bound under a temporary name in the same directory, given its mode and group, set listening
        and only then renamed over ``path``: a client never finds it with the wrong permissions, and a
        stale socket left at ``path`` is replaced in one step.
        """
        if os.path.lexists(path) and not _is_socket(path):
            raise OSError(errno.EADDRINUSE, f"{path} exists and is not a socket")
        head, tail = os.path.split(path)
        tmp = os.path.join(head, f".{tail}.{os.getpid()}.tmp")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            sock.bind(tmp)
            try:
                if self.socket_group is not None:
                    os.chown(tmp, -1, self.socket_group)
                if self.socket_mode is not None:
                    os.chmod(tmp, self.socket_mode)
                sock.listen(LISTEN_BACKLOG)
                os.rename(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    def ports(self) -> list[int]:
        out = []
        for srv in self._servers:
            for s in srv.sockets:
                name = s.getsockname()
                if isinstance(name, tuple):
                    out.append(int(name[1]))
        return out

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish (new ones get ESHUTDOWN), flush and close."""
        self.closing = True
        for srv in self._servers:
            srv.close()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        while self.queued:
            waiting = self.queued.popleft()
            waiting.queued = False
            waiting._closed = waiting._rejected = True
            if waiting.transport is not None:
                waiting.transport.abort()
        # Clients that have not finished the handshake (authenticated or not) hold nothing and are owed
        # nothing: they are dropped at once, so that no peer can hold the server at shutdown by stalling
        # its handshake (qemu CVE-2024-7409).
        for conn in [c for c in self.connections if c.handshaking]:
            conn.abort_handshake()
        conns = list(self.connections)
        if conns:
            await asyncio.gather(*(c.drain_and_close() for c in conns), return_exceptions=True)
        await self.registry.close_all()
        for srv in self._servers:
            try:
                await asyncio.wait_for(srv.wait_closed(), 5)
            except TimeoutError:
                pass
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass


def _dup_socket(transport: asyncio.Transport) -> socket.socket | None:
    """A socket object of our own on the transport's connection, for sendfile; None if there is none.

    A duplicate descriptor, so that it never closes the transport's; closed with the connection."""
    s = transport.get_extra_info("socket")
    if s is None:
        return None
    try:
        dup = socket.socket(fileno=os.dup(s.fileno()))
        dup.setblocking(False)
    except OSError:
        return None
    return dup


def _is_socket(path: str) -> bool:
    import stat

    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False
