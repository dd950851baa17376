"""Admin commands for the NBD side of the server: exports, the clients connected to them, their counters."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Literal

from imagecore.errors import BlockError, InvalidArgumentError, NotFoundError

from ..cow import CowVolume
from ..server import NBDServer
from .table import AdminContext, command

# -- argument models ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ClientArg:
    id: int


@dataclass(frozen=True, slots=True)
class ExportAddArgs:
    volume: str
    name: str
    read_only: bool = False
    description: str | None = None
    snapshot: str | None = None
    cow: bool = False


@dataclass(frozen=True, slots=True)
class ExportRemoveArgs:
    name: str
    mode: Literal["safe", "hard"] = "safe"
    timeout: float = 30.0


class RemoveTimeoutError(BlockError):
    """export-remove (safe) gave up waiting for the export's clients; the export stays removed."""

    json_class = "GenericError"


def _server(ctx: AdminContext) -> NBDServer:
    if ctx.server is None:
        raise BlockError("no NBD server is attached to this admin socket")
    return ctx.server


# -- exports --------------------------------------------------------------------------------------------

@command("query-exports", returns="`[{name, volume, read-only, description, open, alias, snapshot?, cow?}]`")
async def query_exports(ctx: AdminContext, _: None) -> Any:
    """Every export name a client may open (what NBD_OPT_LIST lists), with the volume behind it, whether
    it is an alias added with export-add, and whether an instance of its image is open now; `snapshot`
    names the internal snapshot a snapshot export shows, and `cow` is true for a copy-on-write export."""
    out = []
    for name, desc in ctx.registry.list():
        entry = ctx.registry.entry(name)
        if entry is None:
            continue
        vol = entry.volume
        rec = {"name": name, "volume": entry.alias.volume if entry.alias else vol.volid or vol.path,
               "read-only": entry.read_only, "description": desc, "open": ctx.registry.is_open(vol),
               "alias": entry.alias is not None}
        if vol.snapshot is not None:
            rec["snapshot"] = vol.snapshot
        if isinstance(vol, CowVolume):
            rec["cow"] = True
        out.append(rec)
    return out


@command("export-add", args=ExportAddArgs, returns="`{name, volume, read-only, description}`")
async def export_add(ctx: AdminContext, args: ExportAddArgs) -> Any:
    """Export `volume` (a volume ID such as `local:100/vm-100-disk-0.qcow2`, or the name of an --image)
    under the further name `name`, listed by NBD_OPT_LIST and openable at once. The alias shares the
    image's one open instance with every other name of it. `read-only` true makes the alias read-only even
    where the volume is writable (a read-only volume stays read-only whatever it says); `description` is
    what NBD_OPT_LIST and NBD_INFO_DESCRIPTION show; `snapshot` (an id or a name) exports that internal
    snapshot of a qcow2 volume instead, read-only, as an instance of its own (qemu-nbd's -l); `cow` true
    makes the export copy-on-write (qemu-nbd's -s): clients may write, even over a template, but their
    writes go to a temporary overlay that all of the alias's clients share and that vanishes when the
    last of them disconnects; the volume is opened read-only and never changed. A name that
    is exported already is refused, and so is a name of the form `POOL:...` for a configured pool, except
    that a volume ID hidden by export-remove is brought back by adding it as itself (`name` and `volume`
    the same). Emits EXPORT_ADDED."""
    entry = ctx.registry.add_alias(args.name, args.volume, read_only=args.read_only,
                                   description=args.description, snapshot=args.snapshot, cow=args.cow)
    if args.snapshot is not None:
        try:
            await ctx.registry.describe(entry.name)  # the snapshot must exist: refuse it now, not at GO
        except BlockError:
            ctx.registry.remove(entry.name)
            raise
    ctx.emit("EXPORT_ADDED", {"name": entry.name})
    return {"name": entry.name, "volume": args.volume, "read-only": entry.read_only,
            "description": entry.description()}


@command("export-remove", args=ExportRemoveArgs, returns="`{name, clients}`")
async def export_remove(ctx: AdminContext, args: ExportRemoveArgs) -> Any:
    """Stop exporting `name`. The name leaves NBD_OPT_LIST at once and new NBD_OPT_GO for it are refused
    as an unknown export; EXPORT_REMOVED is emitted then. Mode `safe` (the default) leaves the clients that
    use the name alone and returns once the last of them has disconnected, or fails with GenericError after
    `timeout` seconds (default 30) while the export stays removed. Mode `hard` closes them: their requests
    in flight complete and the image is flushed, later requests get ESHUTDOWN, then the connections close;
    it returns when they have. An alias is deleted; a volume ID (or an --image name) is hidden until the
    server restarts or export-add brings it back as itself, and the volume itself is untouched (its
    aliases stay exported). `clients` is how many connections used the name when it was removed."""
    if args.timeout < 0:
        raise InvalidArgumentError("timeout must not be negative")
    server = _server(ctx)
    ctx.registry.remove(args.name)
    ctx.emit("EXPORT_REMOVED", {"name": args.name})
    conns = server.clients_of(args.name)
    if args.mode == "hard":
        await asyncio.gather(*(c.disconnect(f"export '{args.name}' was removed") for c in conns))
        return {"name": args.name, "clients": len(conns)}
    waits = [asyncio.ensure_future(c.gone.wait()) for c in conns]
    if waits:
        _done, pending = await asyncio.wait(waits, timeout=args.timeout)
        for w in pending:
            w.cancel()
        if pending:
            raise RemoveTimeoutError(
                f"export '{args.name}' is removed, but {len(pending)} of its clients are still "
                f"connected after {args.timeout:g} s")
    return {"name": args.name, "clients": len(conns)}


# -- clients --------------------------------------------------------------------------------------------

@command("query-clients", returns="`[{id, peer, since, state, export, read-only, structured-replies, "
                                  "extended-headers, meta-contexts, tls, tls-client?, requests, bytes-read, "
                                  "bytes-written, inflight}]`")
async def query_clients(ctx: AdminContext, _: None) -> Any:
    """Every NBD connection, by `id` (an integer that stays the same for the life of the connection):
    its peer, since when (seconds since the epoch), whether it is still in the handshake, the export it
    chose (absent until it has) and whether that is read-only, what it negotiated (structured replies,
    extended headers, the meta contexts it set), `tls` (true once the connection runs
    over TLS: after STARTTLS and a completed TLS handshake), `tls-client` (the verified client
    certificate's DN, when there is one), the requests it has sent, the bytes read and written for it
    and its requests in flight."""
    return ctx.clients()


@command("client-disconnect", args=ClientArg, returns="`{}`")
async def client_disconnect(ctx: AdminContext, args: ClientArg) -> Any:
    """Close the connection `id` (from query-clients): its requests in flight complete and the image is
    flushed, requests it sends meanwhile get ESHUTDOWN, then the connection closes; returns when it has. A
    connection still in the handshake is closed at once. An unknown `id` is NotFound."""
    conn = _server(ctx).find(args.id)
    if conn is None:
        raise NotFoundError(f"client {args.id} does not exist")
    await conn.disconnect("disconnected by the administrator")
    return {}


@command("query-server-stats", returns="`{connections: {open, total, handshaking}, requests, bytes-read, "
                                       "bytes-written, errors: {ERRNO: count}, uptime}`")
async def query_server_stats(ctx: AdminContext, _: None) -> Any:
    """What the NBD server has served since it started, over every connection, closed or open:
    connections open now (of which still in the handshake) and accepted in all, requests, bytes read and
    written, request errors by errno name (EIO, ENOSPC, ESHUTDOWN, ...), and seconds since it started."""
    server = ctx.server
    if server is None:
        return {"connections": {"open": 0, "total": 0, "handshaking": 0}, "requests": 0, "bytes-read": 0,
                "bytes-written": 0, "errors": {}, "uptime": round(time.monotonic() - ctx.started, 3)}
    return server.stats()
