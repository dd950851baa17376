"""The composition root of `nbdsrv serve`: pools, registry and server wired together, run until a signal."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from imagecore.errors import BlockError

from .activation import notify, notify_reloading
from .admin.commands import AdminContext
from .admin.jobs import JobManager
from .admin.server import AdminServer
from .config import ListenAddr, ServerConfig
from .exports import ExportRegistry
from .metrics import MetricsServer
from .pools import PoolSet, pool_from_config
from .reload import apply as apply_config
from .server import NBDConnection, NBDServer
from .tls import server_security

log = logging.getLogger("nbdsrv")
T = TypeVar("T")


def stdio_socket() -> socket.socket:
    """The connection libnbd's nbd_connect_command (or nbdkit -s's users) hands us on stdin/stdout.

    The socket is taken off descriptors 0 and 1, which then point at /dev/null and stderr: nothing but
    the protocol may reach the peer, so a stray print can no longer corrupt the stream.
    """
    from .activation import is_socket

    if not is_socket(0):
        raise BlockError("--stdio needs a socket on stdin (as nbd_connect_command passes it)")
    fd = os.dup(0)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def write_pid_file(path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def build(cfg: ServerConfig) -> NBDServer:
    pools = PoolSet([pool_from_config(p) for p in cfg.pools])
    registry = ExportRegistry(pools, cfg.images, read_only=cfg.read_only)
    mode, creds, policy = server_security(cfg)
    server = NBDServer(registry, tls_mode=mode, tls_creds=creds, policy=policy,
                     max_requests=cfg.max_requests, max_bytes=cfg.max_bytes,
                     max_total_bytes=cfg.max_total_bytes, handshake_timeout=cfg.handshake_timeout,
                     max_connections=cfg.max_connections,
                     max_connections_per_address=cfg.max_connections_per_address,
                     max_handshakes=cfg.max_handshakes,
                     max_handshakes_per_address=cfg.max_handshakes_per_address,
                     socket_mode=cfg.socket_mode, socket_group=cfg.socket_group)
    server.node = cfg.node
    return server


class Reloader:
    """Re-reads the configuration for reload-config and SIGHUP, one reload at a time."""

    def __init__(self, server: NBDServer, source: Callable[[], ServerConfig] | None) -> None:
        self.server = server
        self.source = source
        self.runtime_pools: set[str] = set()
        self._lock = asyncio.Lock()

    async def __call__(self) -> dict[str, Any]:
        if self.source is None:
            raise BlockError("this server was not started from a configuration that can be re-read")
        async with self._lock:
            cfg = self.source()  # raises BlockError with the file's own complaint; nothing is changed then
            return apply_config(self.server, cfg, runtime_pools=self.runtime_pools)

    def on_sighup(self) -> None:
        async def reload() -> None:
            notify_reloading()
            try:
                await self()
            except BlockError as exc:
                log.error("configuration reload failed", extra={"error": str(exc)})
            finally:
                notify("READY=1")
        asyncio.get_running_loop().create_task(reload())


async def start_admin(cfg: ServerConfig, server: NBDServer, stop: asyncio.Event,
                      reloader: Reloader) -> AdminServer:
    """Serve the admin socket beside the NBD listeners, sharing their pools and export registry."""
    ctx = AdminContext(pools=server.registry.pools, registry=server.registry, request_stop=stop.set,
                       clients=server.clients, server=server, reload=reloader,
                       runtime_pools=reloader.runtime_pools)
    admin = AdminServer(ctx)
    server.on_event = admin.emit  # CLIENT_CONNECTED / CLIENT_DISCONNECTED
    jobs = JobManager(admin.emit)
    jobs.start()  # the warm workers start in the background; the first operation waits for one if need be
    ctx.jobs = jobs
    if cfg.admin_fd is not None:
        from .activation import adopt

        await admin.listen_socket(adopt(cfg.admin_fd))
        log.info("admin socket listening", extra={"path": f"fd:{cfg.admin_fd}"})
    else:
        assert cfg.admin_socket is not None
        await admin.listen(cfg.admin_socket)
        log.info("admin socket listening", extra={"path": cfg.admin_socket})
    return admin


async def start_metrics(addr: ListenAddr, server: NBDServer) -> MetricsServer:
    """Serve Prometheus metrics over HTTP at ``addr``, read from the server's counters when scraped."""
    metrics = MetricsServer(server)
    try:
        bound = await metrics.listen(addr)
    except OSError as exc:
        raise BlockError(f"cannot listen for metrics on {addr}: {exc.strerror or exc}") from None
    log.info("metrics listening", extra={"address": ", ".join(bound)})
    return metrics


def raise_fd_limit(cfg: ServerConfig) -> None:
    """Lift the soft open-file limit to the hard one: every connection is a descriptor, and the common
    soft default of 1024 is no more than max_connections alone."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > soft):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    # Images, listening sockets and the thread pool need descriptors too.
    if soft != resource.RLIM_INFINITY and soft < cfg.max_connections + 64:
        log.warning("open-file limit is below max_connections",
                    extra={"limit": soft, "max_connections": cfg.max_connections})


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_request_buffers() -> None:
    """Let a freed request buffer stay in the heap for the next request.

    By default glibc serves an allocation of 128 KiB or more (a large WRITE payload, a READ buffer) with a
    fresh mmap, unmapped again when it is freed: every such request faults its pages in one by one and
    zeroes them. Measured with 1 MiB writes at QD8 over a Unix socket: 1.7 to 2.0 GiB/s before, 2.4 to 2.7
    after. With fixed thresholds the heap serves blocks up to 32 MiB (the largest payload) and gives free
    memory back to the system once more than 128 MiB of it lies at the top, so what the server holds stays
    bounded by its peak of buffered requests (max_total_bytes). Without glibc nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 128 << 20)


async def serve(cfg: ServerConfig, reload: Callable[[], ServerConfig] | None = None,
                on_ready: Callable[[], None] | None = None) -> int:
    """Listen, announce readiness, serve until SIGTERM/SIGINT, then shut down gracefully.

    ``reload`` builds the configuration again (from the same file and flags) for SIGHUP and reload-config.
    ``on_ready`` is called once everything listens (qemu-nbd --fork: the parent may exit then).
    With ``cfg.persistent`` False the server stops once the last client that reached transmission has
    gone (qemu-nbd without -t); with ``cfg.stdio`` it serves the one connection on stdin and stops.
    """
    raise_fd_limit(cfg)
    keep_request_buffers()
    server = build(cfg)
    server.queue_when_full = cfg.queue_when_full
    server.max_queued = cfg.max_queued
    # as qemu-nbd -B does, refuse to start when a bitmap given with --bitmap is missing or inconsistent
    await server.registry.check_image_bitmaps()
    if cfg.hold_images:
        for img in cfg.images:
            # a reference never released: close_all() at shutdown flushes and closes it
            await server.registry.acquire(img.name or "")
    for addr in cfg.listen:
        try:
            bound = await server.listen(addr)
        except OSError as exc:
            raise BlockError(f"cannot listen on {addr}: {exc.strerror or exc}") from None
        log.info("listening", extra={"address": ", ".join(bound)})
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    if not cfg.persistent or cfg.stdio:
        def closed(conn: NBDConnection) -> None:
            # a client that only listed or probed does not end a one-shot server, as in qemu-nbd;
            # the one --stdio connection ends it however it went
            if not server.connections and (cfg.stdio or conn.export_name is not None):
                server.closing = True  # no client waiting for a slot is started now
                stop.set()
        server.on_closed = closed
    if cfg.stdio:
        await server.serve_socket(stdio_socket())
    metrics = await start_metrics(cfg.metrics, server) if cfg.metrics is not None else None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloader = Reloader(server, reload)
    loop.add_signal_handler(signal.SIGHUP, reloader.on_sighup)
    admin = (await start_admin(cfg, server, stop, reloader)
             if cfg.admin_socket or cfg.admin_fd is not None else None)
    # the pid file says "ready", as READY=1 does: every socket, the admin one too, is listening by then
    if cfg.pid_file:
        try:
            write_pid_file(cfg.pid_file)
        except OSError as exc:
            raise BlockError(f"cannot write pid file '{cfg.pid_file}': {exc.strerror or exc}") from None
    if metrics is not None and admin is not None:
        assert admin.ctx.jobs is not None
        metrics.set_jobs_source(admin.ctx.jobs.counts)
    notify("READY=1")
    if on_ready is not None:
        on_ready()
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        notify("STOPPING=1")
        if admin is not None:
            admin.ctx.stopping = True
            admin.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        if admin is not None and admin.ctx.jobs is not None:
            await admin.ctx.jobs.close()  # cancelled jobs remove their partial targets
        await server.shutdown()
        if admin is not None:
            await admin.close()
        if metrics is not None:
            await metrics.close()
        if cfg.pid_file:
            try:
                os.unlink(cfg.pid_file)
            except OSError:
                pass
    log.info("stopped", extra={"loop": type(loop).__module__})
    return 0


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed, else on the default asyncio loop.

    NBDSRV_LOOP=asyncio forces the default loop, so the tests can run the server on both.
    """
    if os.environ.get("NBDSRV_LOOP") == "asyncio":
        return asyncio.run(coro)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: T = uvloop.run(coro)
    return result
