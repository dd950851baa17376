"""The admin command table: each row a name, a typed argument model, a return shape and a handler.

``query-commands``, ``query-qmp-schema`` and docs/admin.md are all derived from this one table. Handlers are
thin: they validate nothing themselves (the argument model did), call into pools, the export registry and
the NBD server, and return plain JSON-able values. Errors are the project's one hierarchy; the socket
server turns each into ``{"class": err.json_class, "desc": str(err)}``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

from imagecore.errors import BlockError, BusyError, InvalidArgumentError, NotFoundError

from ..formats import POOL_DISK_FORMATS
from ..pools import Pool
from ..reload import pool_in_use
from .table import TABLE, AdminContext, Command, CommandNotFoundError, CommandTable, command, version_record

# -- argument models ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PoolAddArgs:
    name: str
    path: str
    read_only: bool = False
    shared: bool = False


@dataclass(frozen=True, slots=True)
class PoolRemoveArgs:
    name: str
    force: bool = False


# -- server ---------------------------------------------------------------------------------------------

@command("query-version", returns="`{qemu: {major, minor, micro}, package}`")
async def query_version(ctx: AdminContext, _: None) -> Any:
    """The server's version, in the shape of QMP's query-version."""
    return version_record()


@command("query-status", returns="`{status, running, uptime, node}`")
async def query_status(ctx: AdminContext, _: None) -> Any:
    """Whether the server is running or shutting down, for how many seconds it has run, and the name of
    this node (`--node`, default the host name)."""
    status = "shutting-down" if ctx.stopping else "running"
    return {"status": status, "running": not ctx.stopping,
            "uptime": round(time.monotonic() - ctx.started, 3),
            "node": ctx.server.node if ctx.server is not None else ""}


@command("query-commands", returns="`[{name}]`")
async def query_commands(ctx: AdminContext, _: None) -> Any:
    """Every command this socket accepts (qmp_capabilities included), as QMP lists them."""
    return [{"name": "qmp_capabilities"}, *({"name": n} for n in TABLE.names())]


@command("query-qmp-schema", returns="`[SchemaInfo]`")
async def query_qmp_schema(ctx: AdminContext, _: None) -> Any:
    """Introspection: every command with its argument types, in QAPI's SchemaInfo shape."""
    return TABLE.schema()


@command("shutdown")
async def shutdown(ctx: AdminContext, _: None) -> Any:
    """Stop the server as SIGTERM does: in-flight requests finish and are flushed, then it exits."""
    ctx.request_stop()
    return {}


@command("reload-config", returns="`{pools-added, pools-removed, pools-in-use, changed, tls: {mode, "
                                  "credentials, verify-peer}}`")
async def reload_config(ctx: AdminContext, _: None) -> Any:
    """Re-read the configuration file and flags, as SIGHUP does: pools appear and go (a pool with an
    open volume stays), read-only flags, limits and the log level change, the TLS credentials (the
    certificate, key and CA files), the TLS mode and the access rules are loaded again for new
    connections; running connections are untouched. A file that does not parse, or credentials that do
    not load, change nothing and are the error."""
    if ctx.reload is None:
        raise BlockError("this server cannot re-read its configuration")
    return await ctx.reload()


# -- pools ----------------------------------------------------------------------------------

def _space(path: str) -> dict[str, int]:
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    return {"total": total, "used": total - st.f_bfree * st.f_frsize, "available": st.f_bavail * st.f_frsize}


@command("query-pools", returns="`[{name, path, type, shared, content, formats, read-only, active, total, "
                                "used, available}]`")
async def query_pools(ctx: AdminContext, _: None) -> Any:
    """Every pool with its content types and the space of its filesystem (of its RADOS pool for an RBD
    pool), as `pvesm status` shows it; `shared` says that other nodes serve it too."""
    out = []
    for pool in ctx.pools.pools.values():
        if pool.type == "rbd":
            out.append(await pool.status())  # type: ignore[attr-defined]
            continue
        rec: dict[str, Any] = {"name": pool.name, "path": pool.root, "type": "dir", "shared": pool.shared,
                               "content": ["images", "iso", "import"], "formats": sorted(POOL_DISK_FORMATS),
                               "read-only": pool.read_only}
        try:
            rec.update(_space(pool.root), active=True)
        except OSError:
            rec.update(total=0, used=0, available=0, active=False)
        out.append(rec)
    return out


@command("pool-add", args=PoolAddArgs, returns="`{name, path, read-only, shared}`")
async def pool_add(ctx: AdminContext, args: PoolAddArgs) -> Any:
    """Add a directory pool at run time (`pvesm add dir`; `shared` for one that other nodes serve too);
    it lasts until pool-remove or a restart, and reload-config leaves it alone."""
    if args.name in ctx.pools.pools:
        raise InvalidArgumentError(f"pool '{args.name}' already exists")
    if not os.path.isabs(args.path):
        raise InvalidArgumentError(f"pool path '{args.path}' must be absolute")
    pool = Pool(args.name, args.path, read_only=args.read_only, shared=args.shared)
    ctx.pools.add(pool)
    ctx.runtime_pools.add(pool.name)
    return {"name": pool.name, "path": pool.root, "read-only": pool.read_only, "shared": pool.shared}


@command("pool-remove", args=PoolRemoveArgs)
async def pool_remove(ctx: AdminContext, args: PoolRemoveArgs) -> Any:
    """Stop serving a pool (its files stay). Refused while an NBD client has one of its volumes open,
    unless `force`, which leaves those connections running on the images they have open."""
    pool = ctx.pools.pools.get(args.name)
    if pool is None:
        raise NotFoundError(f"pool '{args.name}' does not exist")
    if not args.force and pool_in_use(ctx.registry, pool):
        raise BusyError(f"pool '{args.name}' has volumes in use by NBD clients")
    ctx.pools.remove(args.name)
    ctx.runtime_pools.discard(args.name)
    return {}


# The other concerns' rows register when their modules are imported, after these (the docs keep this order).
from . import images, jobs, net, volumes  # noqa: E402,F401


def check_table() -> None:
    """Fail at import time on a row whose argument model is not a dataclass (a programming error)."""
    for cmd in TABLE:
        if cmd.args is not None and not dataclasses.is_dataclass(cmd.args):
            raise TypeError(f"{cmd.name}: arguments must be a dataclass")
        if not cmd.doc:
            raise TypeError(f"{cmd.name}: every command needs a docstring")


check_table()

__all__ = ["TABLE", "AdminContext", "Command", "CommandNotFoundError", "CommandTable", "InvalidArgumentError",
           "version_record"]
