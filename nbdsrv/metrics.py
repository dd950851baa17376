"""Prometheus metrics for `nbdsrv serve --metrics HOST:PORT`: the server's own counters, read when scraped.

Nothing here runs per request. The connections keep plain integer counters (server.Counters) and this
module's collector turns them into metric families at scrape time, on the event loop's thread, so it
sees every counter as one consistent snapshot and never races the requests that move them. The HTTP
side is a small asyncio handler for ``GET /metrics``: one request per connection, bounded in size and
time, answered with prometheus_client's text exposition.

Metric names (all prefixed ``nbdsrv_``):

- ``node_info{node}`` (always 1: the node's name, --node)
- ``uptime_seconds``; ``connections_open``, ``connections_handshaking``, ``connections_accepted_total``
- ``requests_total{command}``, ``read_bytes_total``, ``written_bytes_total``, ``errors_total{errno}``:
  the whole server since it started
- ``export_connections{export}``, ``export_requests_total{export,command}``,
  ``export_read_bytes_total{export}``, ``export_written_bytes_total{export}``,
  ``export_errors_total{export,errno}``, ``export_request_duration_seconds{export,command}`` (histogram):
  per export name, as clients chose it, over closed and open connections
- ``client_requests_total{client,peer,export,command}``, ``client_read_bytes_total``,
  ``client_written_bytes_total``, ``client_errors_total{...,errno}``, ``client_inflight_requests``:
  per open connection (``client`` is query-clients' id)
- ``admin_jobs{state}``: the admin socket's jobs by state, when a job manager is connected
- the ``process_*`` family of prometheus_client's process collector
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from nbdproto.constants import CMD_NAMES, CMD_READ, CMD_WRITE

from .config import ListenAddr
from .server import LATENCY_BOUNDS, Counters, NBDConnection, NBDServer, errno_name

log = logging.getLogger("nbdsrv.metrics")

JobsSource = Callable[[], dict[str, int]]

_COMMANDS = {cmd: name.lower() for cmd, name in CMD_NAMES.items()}
_LE = [floatToGoString(b) for b in LATENCY_BOUNDS] + ["+Inf"]  # type: ignore[no-untyped-call]
_MAX_HEAD = 16 * 1024
_READ_TIMEOUT = 10.0
_MAX_SCRAPERS = 16


def _commands(st: Counters, always: Iterable[int] = ()) -> Iterable[tuple[int, str]]:
    """The commands ``st`` has counts for (plus ``always``), with their label values."""
    keep = set(always)
    for cmd, name in _COMMANDS.items():
        if cmd in keep or st.ops[cmd]:
            yield cmd, name


class NBDCollector(Collector):
    """Reads an NBDServer's counters (and optionally a job manager's counts) into metric families."""

    def __init__(self, server: NBDServer, jobs: JobsSource | None = None) -> None:
        self.server = server
        self.jobs = jobs

    def describe(self) -> list[Metric]:
        # Nothing to check for clashes at registration, and no collect() then either.
        return []

    def collect(self) -> Iterable[Metric]:
        srv = self.server
        conns = sorted(srv.connections, key=lambda c: c.id)
        yield GaugeMetricFamily("nbdsrv_uptime_seconds", "Seconds since the server started.",
                                value=_uptime(srv))
        node = GaugeMetricFamily("nbdsrv_node_info", "Always 1; the node label is this server's name "
                                 "(--node), to tell nodes apart when one Prometheus scrapes several.",
                                 labels=["node"])
        node.add_metric([srv.node], 1)
        yield node
        yield GaugeMetricFamily("nbdsrv_connections_open", "NBD connections open now.", value=len(conns))
        yield GaugeMetricFamily("nbdsrv_connections_handshaking",
                                "NBD connections open now that are still in the handshake.",
                                value=srv.handshakes)
        yield CounterMetricFamily("nbdsrv_connections_accepted", "NBD connections accepted.",
                                  value=srv.connections_total)

        total = srv.totals()
        req = CounterMetricFamily("nbdsrv_requests", "NBD requests, by command.", labels=["command"])
        for cmd, name in _commands(total, (CMD_READ, CMD_WRITE)):
            req.add_metric([name], total.ops[cmd])
        yield req
        yield CounterMetricFamily("nbdsrv_read_bytes", "Bytes read by NBD clients.", value=total.bytes_read)
        yield CounterMetricFamily("nbdsrv_written_bytes", "Bytes written by NBD clients.",
                                  value=total.bytes_written)
        err = CounterMetricFamily("nbdsrv_errors", "NBD requests answered with an error, by errno.",
                                  labels=["errno"])
        for e, n in sorted(total.errors.items()):
            err.add_metric([errno_name(e)], n)
        yield err

        yield from self._exports(srv, conns)
        yield from self._clients(conns)

        jobs = GaugeMetricFamily("nbdsrv_admin_jobs", "Admin jobs, by state.", labels=["state"])
        if self.jobs is not None:
            try:
                counts = self.jobs()
            except Exception:
                log.exception("reading the job counts failed")
                counts = {}
            for state, n in sorted(counts.items()):
                jobs.add_metric([str(state)], n)
        yield jobs

    def _exports(self, srv: NBDServer, conns: list[NBDConnection]) -> Iterable[Metric]:
        per = srv.export_totals()
        open_by: dict[str, int] = {}
        for c in conns:
            if c.export_name is not None:
                open_by[c.export_name] = open_by.get(c.export_name, 0) + 1
        gauge = GaugeMetricFamily("nbdsrv_export_connections", "Connections using the export now.",
                                  labels=["export"])
        for name in sorted(set(per) | set(open_by)):
            gauge.add_metric([name], open_by.get(name, 0))
        yield gauge
        req = CounterMetricFamily("nbdsrv_export_requests", "NBD requests on the export, by command.",
                                  labels=["export", "command"])
        rd = CounterMetricFamily("nbdsrv_export_read_bytes", "Bytes read from the export.", labels=["export"])
        wr = CounterMetricFamily("nbdsrv_export_written_bytes", "Bytes written to the export.",
                                 labels=["export"])
        err = CounterMetricFamily("nbdsrv_export_errors", "Requests on the export answered with an error.",
                                  labels=["export", "errno"])
        lat = HistogramMetricFamily("nbdsrv_export_request_duration_seconds",
                                    "Time from a request's arrival to its reply, by command.",
                                    labels=["export", "command"])
        for name in sorted(per):
            st = per[name]
            for cmd, cname in _commands(st, (CMD_READ, CMD_WRITE)):
                req.add_metric([name, cname], st.ops[cmd])
                if st.ops[cmd]:
                    cum = 0
                    buckets = []
                    for le, n in zip(_LE, st.latency[cmd], strict=True):
                        cum += n
                        buckets.append((le, float(cum)))
                    lat.add_metric([name, cname], buckets, st.latency_sum[cmd])
            rd.add_metric([name], st.bytes_read)
            wr.add_metric([name], st.bytes_written)
            for e, n in sorted(st.errors.items()):
                err.add_metric([name, errno_name(e)], n)
        yield from (req, rd, wr, err, lat)

    def _clients(self, conns: list[NBDConnection]) -> Iterable[Metric]:
        labels = ["client", "peer", "export"]
        req = CounterMetricFamily("nbdsrv_client_requests", "NBD requests of the open connection.",
                                  labels=[*labels, "command"])
        rd = CounterMetricFamily("nbdsrv_client_read_bytes", "Bytes the open connection has read.",
                                 labels=labels)
        wr = CounterMetricFamily("nbdsrv_client_written_bytes", "Bytes the open connection has written.",
                                 labels=labels)
        err = CounterMetricFamily("nbdsrv_client_errors", "Requests of the open connection answered with "
                                  "an error.", labels=[*labels, "errno"])
        inflight = GaugeMetricFamily("nbdsrv_client_inflight_requests",
                                     "Requests of the open connection in flight now.", labels=labels)
        for c in conns:
            if c.export_name is None:
                continue
            values = [str(c.id), c.peer, c.export_name]
            st = c.stats
            for cmd, cname in _commands(st):
                req.add_metric([*values, cname], st.ops[cmd])
            rd.add_metric(values, st.bytes_read)
            wr.add_metric(values, st.bytes_written)
            for e, n in sorted(st.errors.items()):
                err.add_metric([*values, errno_name(e)], n)
            inflight.add_metric(values, c._inflight)
        yield from (req, rd, wr, err, inflight)


def reference() -> str:
    """The metrics table of docs/admin.md, from what the collector yields for an idle server."""
    from .exports import ExportRegistry
    from .pools import PoolSet

    rows = ["| metric | type | labels | what it counts |", "|---|---|---|---|"]
    for fam in NBDCollector(NBDServer(ExportRegistry(PoolSet())), jobs=dict).collect():
        name = fam.name + ("_total" if fam.type == "counter" else "")
        labels = ", ".join(f"`{label}`" for label in getattr(fam, "_labelnames", ()))
        rows.append(f"| `{name}` | {fam.type} | {labels} | {fam.documentation} |")
    rows.append("| `process_*` | | | prometheus_client's process metrics (CPU, memory, open files) |")
    return "\n".join(rows) + "\n"


def _uptime(srv: NBDServer) -> float:
    return time.monotonic() - srv.started


class MetricsServer:
    """The metrics endpoint: an HTTP listener on the event loop serving the collector's families."""

    def __init__(self, server: NBDServer, *, jobs: JobsSource | None = None) -> None:
        self.collector = NBDCollector(server, jobs)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        self._server: asyncio.AbstractServer | None = None
        self._scrapers = 0

    def set_jobs_source(self, fn: JobsSource | None) -> None:
        """Report ``fn()`` (job counts by state) as ``nbdsrv_admin_jobs``; None reports none."""
        self.collector.jobs = fn

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def listen(self, addr: ListenAddr) -> list[str]:
        """Start serving on ``addr`` (TCP or unix); returns the bound addresses."""
        if addr.unix is not None:
            srv = await asyncio.start_unix_server(self._handle, addr.unix, limit=_MAX_HEAD)
            self._server = srv
            return [f"unix:{addr.unix}"]
        srv = await asyncio.start_server(self._handle, addr.host, addr.port or 0, reuse_address=True,
                                         limit=_MAX_HEAD)
        self._server = srv
        out = []
        for s in srv.sockets:
            name = s.getsockname()
            out.append(f"[{name[0]}]:{name[1]}" if ":" in str(name[0]) else f"{name[0]}:{name[1]}")
        return out

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 5)
            except TimeoutError:
                pass
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._scrapers >= _MAX_SCRAPERS:
            writer.close()
            return
        self._scrapers += 1
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                return
            status, body, ctype = self._answer(head)
            method = head.split(b" ", 1)[0]
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode())
            if method != b"HEAD":
                writer.write(body)
            await asyncio.wait_for(writer.drain(), _READ_TIMEOUT)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._scrapers -= 1
            writer.close()

    def _answer(self, head: bytes) -> tuple[str, bytes, str]:
        text = "text/plain; charset=utf-8"
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return "400 Bad Request", b"bad request\n", text
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"only GET and HEAD\n", text
        if target not in (b"/metrics", b"/"):
            return "404 Not Found", b"the metrics are at /metrics\n", text
        try:
            return "200 OK", self.render(), CONTENT_TYPE_LATEST
        except Exception:
            log.exception("rendering the metrics failed")
            return "500 Internal Server Error", b"internal error\n", text
