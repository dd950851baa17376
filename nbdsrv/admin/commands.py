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
from typing import Any, Literal

from imagecore.driver import get_format
from imagecore.errors import (
    BlockError,
    ImageLockedError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)

from ..pools import FORMATS_BY_EXT, Pool, PoolOpener, Volume
from .table import TABLE, AdminContext, Command, CommandNotFoundError, CommandTable, command, version_record

# -- argument models ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PoolArg:
    pool: str


@dataclass(frozen=True, slots=True)
class VolumeListArgs:
    pool: str
    vmid: int | None = None
    content: Literal["images", "iso"] | None = None


@dataclass(frozen=True, slots=True)
class VolumeArg:
    volid: str


# -- server ---------------------------------------------------------------------------------------------

@command("query-version", returns="`{qemu: {major, minor, micro}, package}`")
async def query_version(ctx: AdminContext, _: None) -> Any:
    """The server's version, in the shape of QMP's query-version."""
    return version_record()


@command("query-status", returns="`{status, running, uptime}`")
async def query_status(ctx: AdminContext, _: None) -> Any:
    """Whether the server is running or shutting down, and for how many seconds it has run."""
    status = "shutting-down" if ctx.stopping else "running"
    return {"status": status, "running": not ctx.stopping,
            "uptime": round(time.monotonic() - ctx.started, 3)}


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


# -- pools and volumes ----------------------------------------------------------------------------------

def _pool(ctx: AdminContext, name: str) -> Pool:
    pool = ctx.pools.pools.get(name)
    if pool is None:
        raise NotFoundError(f"pool '{name}' does not exist")
    return pool


def _space(path: str) -> dict[str, int]:
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    return {"total": total, "used": total - st.f_bfree * st.f_frsize, "available": st.f_bavail * st.f_frsize}


@command("query-pools", returns="`[{name, path, type, content, formats, read-only, active, total, used, "
                                "available}]`")
async def query_pools(ctx: AdminContext, _: None) -> Any:
    """Every pool with its content types and the space of its filesystem, as `pvesm status` shows it."""
    out = []
    for pool in ctx.pools.pools.values():
        rec: dict[str, Any] = {"name": pool.name, "path": pool.root, "type": "dir",
                               "content": ["images", "iso"], "formats": sorted(FORMATS_BY_EXT.values()),
                               "read-only": pool.read_only}
        try:
            rec.update(_space(pool.root), active=True)
        except OSError:
            rec.update(total=0, used=0, available=0, active=False)
        out.append(rec)
    return out


def _volume_record(vol: Volume) -> dict[str, Any]:
    vmid: int | None = None
    if vol.kind in ("images", "base"):
        vmid = int(vol.volid.partition(":")[2].partition("/")[0])
    content = "iso" if vol.kind == "iso" else "images"
    rec: dict[str, Any] = {"volid": vol.volid, "format": "iso" if vol.kind == "iso" else vol.fmt,
                           "content": content, "read-only": vol.read_only,
                           "template": vol.kind == "base"}
    if vmid is not None:
        rec["vmid"] = vmid
    try:
        rec["file-size"] = os.stat(vol.path).st_size
    except OSError:
        pass
    return rec


@command("volume-list", args=VolumeListArgs,
         returns="`[{volid, format, content, vmid, read-only, template, file-size}]`")
async def volume_list(ctx: AdminContext, args: VolumeListArgs) -> Any:
    """The volumes of a pool, optionally of one VMID or one content type, as `pvesm list` lists them."""
    pool = _pool(ctx, args.pool)
    out = []
    for vol in pool.volumes():
        rec = _volume_record(vol)
        if args.vmid is not None and rec.get("vmid") != args.vmid:
            continue
        if args.content is not None and rec["content"] != args.content:
            continue
        out.append(rec)
    return out


def _volume(ctx: AdminContext, volid: str) -> Volume:
    vol = ctx.pools.lookup(volid)
    if vol is None:
        pool, sep, _ = volid.partition(":")
        if sep and pool not in ctx.pools.pools:
            raise NotFoundError(f"pool '{pool}' does not exist")
        raise NotFoundError(f"volume '{volid}' does not exist")
    return vol


@command("volume-path", args=VolumeArg, returns="`{path}`")
async def volume_path(ctx: AdminContext, args: VolumeArg) -> Any:
    """The host path of a volume (`pvesm path`)."""
    return {"path": _volume(ctx, args.volid).path}


@dataclass(frozen=True, slots=True)
class VolumeAllocArgs:
    pool: str
    vmid: int
    size: int  # bytes, as QMP's blockdev-create takes it
    format: Literal["raw", "qcow2", "vmdk"] = "raw"
    name: str | None = None


# How many disk-N names volume-alloc tries before giving up: several nodes may allocate at once.
MAX_DISK_INDEX = 4096


def _alloc_name(pool: Pool, vmid: int, fmt: str, name: str | None) -> str:
    """Reserve a volume file with O_EXCL: the next free ``vm-VMID-disk-N``, or ``name`` when given."""
    folder = os.path.join(pool.root, "images", str(vmid))
    os.makedirs(folder, exist_ok=True)
    if name is not None:
        if not name.startswith(f"vm-{vmid}-") or "/" in name or not name[len(f"vm-{vmid}-"):]:
            raise InvalidArgumentError(f"illegal name '{name}' - should be 'vm-{vmid}-*'")
        candidates = [name]
    else:
        candidates = [f"vm-{vmid}-disk-{n}" for n in range(MAX_DISK_INDEX)]
    for stem in candidates:
        path = os.path.join(folder, f"{stem}.{fmt}")
        if any(os.path.lexists(os.path.join(folder, f"{stem}.{ext}")) for ext in FORMATS_BY_EXT):
            continue  # disk-N is taken in any format
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except FileExistsError:
            continue  # another node or client took it between the check and the create
        os.close(fd)
        return path
    if name is not None:
        raise InvalidArgumentError(f"volume '{name}' already exists")
    raise InvalidArgumentError(f"unable to allocate a disk name for VM {vmid}")


@command("volume-alloc", args=VolumeAllocArgs, returns="`{volid, path, format, size}`")
async def volume_alloc(ctx: AdminContext, args: VolumeAllocArgs) -> Any:
    """Create a new disk of a VM in a pool (`pvesm alloc`): the next free `vm-VMID-disk-N`, reserved with
    O_EXCL so that concurrent allocations get different names."""
    pool = _pool(ctx, args.pool)
    if pool.read_only:
        raise PermissionDeniedError(f"pool '{pool.name}' is read-only")
    if not 0 < args.vmid < 1 << 31:
        raise InvalidArgumentError(f"invalid VMID {args.vmid}")
    if args.size <= 0:
        raise InvalidArgumentError("Parameter 'size' expects a positive number of bytes")
    spec = get_format(args.format)
    assert spec.create is not None
    size = args.size
    path = _alloc_name(pool, args.vmid, args.format, args.name)
    opener = PoolOpener(pool.root, lock=True)
    try:
        # the write lock on the reservation, as qemu-img create takes it, for the whole create
        held = opener.open_file(path, read_only=False)
        try:
            await spec.create(path, size, {}, opener=opener, unsafe=False)
        finally:
            held.close()
    except BaseException:
        os.unlink(path)  # the reservation is ours alone: nobody else can have opened it yet
        raise
    volid = f"{pool.name}:{args.vmid}/{os.path.basename(path)}"
    return {"volid": volid, "path": path, "format": args.format, "size": size}


@command("volume-free", args=VolumeArg, returns="{}")
async def volume_free(ctx: AdminContext, args: VolumeArg) -> Any:
    """Delete a volume (`pvesm free`), refused while this server exports it or another process (a VM,
    qemu-img) holds its image."""
    vol = _volume(ctx, args.volid)
    if vol.pool is None or vol.kind == "iso":
        raise PermissionDeniedError(f"volume '{args.volid}' cannot be freed here")
    if vol.pool.read_only:
        raise PermissionDeniedError(f"pool '{vol.pool.name}' is read-only")
    if ctx.registry.is_open(vol):
        raise ImageLockedError(f"volume '{args.volid}' is in use by an NBD client")
    opener = PoolOpener(vol.pool.root, lock=True)
    hf = opener.open_file(vol.path, read_only=False)  # the write lock proves nobody else holds it
    try:
        os.unlink(vol.path)
    except OSError as exc:
        raise BlockError(f"cannot remove '{vol.path}': {exc.strerror}") from None
    finally:
        hf.close()
    return {}


# The other concerns' rows register when their modules are imported, after these (the docs keep this order).
from . import net  # noqa: E402,F401


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
