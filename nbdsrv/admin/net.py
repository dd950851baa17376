"""Admin commands for the NBD side of the server: exports and the clients connected to them."""

from __future__ import annotations

from typing import Any

from .table import AdminContext, command

# -- exports --------------------------------------------------------------------------------------------

@command("query-exports", returns="`[{name, volume, read-only, description, open}]`")
async def query_exports(ctx: AdminContext, _: None) -> Any:
    """Every export name a client may open, with whether an instance of its image is open now."""
    out = []
    for name, desc in ctx.registry.list():
        vol = ctx.registry.lookup(name)
        if vol is None:
            continue
        read_only = vol.read_only or ctx.registry.read_only
        out.append({"name": name, "volume": vol.volid or vol.path, "read-only": read_only,
                    "description": desc, "open": ctx.registry.is_open(vol)})
    return out


@command("query-clients", returns="`[{peer, since, state, inflight, export, read-only}]`")
async def query_clients(ctx: AdminContext, _: None) -> Any:
    """Every NBD connection: its peer, since when (seconds since the epoch), whether it is still in
    the handshake, its requests in flight and the export it chose."""
    return ctx.clients()
