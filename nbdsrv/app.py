"""The composition root of `nbdsrv serve`: pools, registry and server wired together, run until a signal."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from imagecore.errors import BlockError

from .admin.commands import AdminContext
from .admin.jobs import JobManager
from .admin.server import AdminServer
from .config import ListenAddr, ServerConfig
from .exports import ExportRegistry
from .metrics import MetricsServer
from .pools import Pool, PoolSet
from .reload import apply as apply_config
from .server import NBDServer
from .tls import server_security

log = logging.getLogger("nbdsrv")
T = TypeVar("T")


def sd_notify(state: str) -> None:
    """Tell systemd (or anything listening on NOTIFY_SOCKET) about our state; silent without it."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify failed", extra={"error": str(exc)})


def write_pid_file(path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def build(cfg: ServerConfig) -> NBDServer:
    pools = PoolSet([Pool(p.name, p.path, read_only=p.read_only) for p in cfg.pools])
    registry = ExportRegistry(pools, cfg.images, read_only=cfg.read_only)
    mode, creds, policy = server_security(cfg)
    return NBDServer(registry, tls_mode=mode, tls_creds=creds, policy=policy,
                     max_requests=cfg.max_requests, max_bytes=cfg.max_bytes,
                     max_total_bytes=cfg.max_total_bytes, handshake_timeout=cfg.handshake_timeout,
                     max_connections=cfg.max_connections,
                     max_connections_per_address=cfg.max_connections_per_address,
                     max_handshakes=cfg.max_handshakes,
                     max_handshakes_per_address=cfg.max_handshakes_per_address,
                     socket_mode=cfg.socket_mode, socket_group=cfg.socket_group)


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
            try:
                await self()
            except BlockError as exc:
                log.error("configuration reload failed", extra={"error": str(exc)})
        asyncio.get_running_loop().create_task(reload())


async def start_admin(cfg: ServerConfig, server: NBDServer, stop: asyncio.Event,
                      reloader: Reloader) -> AdminServer:
    """Serve the admin socket beside the NBD listeners, sharing their pools and export registry."""
    assert cfg.admin_socket is not None
    ctx = AdminContext(pools=server.registry.pools, registry=server.registry, request_stop=stop.set,
                       clients=server.clients, server=server, reload=reloader,
                       runtime_pools=reloader.runtime_pools)
    admin = AdminServer(ctx)
    server.on_event = admin.emit  # CLIENT_CONNECTED / CLIENT_DISCONNECTED
    jobs = JobManager(admin.emit)
    jobs.start()  # the warm workers start in the background; the first operation waits for one if need be
    ctx.jobs = jobs
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


async def serve(cfg: ServerConfig, reload: Callable[[], ServerConfig] | None = None) -> int:
    """Listen, announce readiness, serve until SIGTERM/SIGINT, then shut down gracefully.

    ``reload`` builds the configuration again (from the same file and flags) for SIGHUP and reload-config.
    """
    raise_fd_limit(cfg)
    server = build(cfg)
    # as qemu-nbd -B does, refuse to start when a bitmap given with --bitmap is missing or inconsistent
    await server.registry.check_image_bitmaps()
    for addr in cfg.listen:
        try:
            bound = await server.listen(addr)
        except OSError as exc:
            raise BlockError(f"cannot listen on {addr}: {exc.strerror or exc}") from None
        log.info("listening", extra={"address": ", ".join(bound)})
    metrics = await start_metrics(cfg.metrics, server) if cfg.metrics is not None else None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloader = Reloader(server, reload)
    loop.add_signal_handler(signal.SIGHUP, reloader.on_sighup)
    admin = await start_admin(cfg, server, stop, reloader) if cfg.admin_socket else None
    # the pid file says "ready", as READY=1 does: every socket, the admin one too, is listening by then
    if cfg.pid_file:
        try:
            write_pid_file(cfg.pid_file)
        except OSError as exc:
            raise BlockError(f"cannot write pid file '{cfg.pid_file}': {exc.strerror or exc}") from None
    if metrics is not None and admin is not None:
        assert admin.ctx.jobs is not None
        metrics.set_jobs_source(admin.ctx.jobs.counts)
    sd_notify("READY=1")
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        sd_notify("STOPPING=1")
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
