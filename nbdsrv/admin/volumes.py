"""Admin commands for volumes, with Proxmox VE's naming: list, path, alloc, free, info, templates, clones.

Names follow Proxmox VE's "dir" storage exactly: a VM's disks are ``images/<VMID>/vm-<VMID>-disk-<N>.<fmt>``,
a template's ``base-<VMID>-disk-<N>.<fmt>`` (read-only), and a linked clone is a qcow2 overlay in the new
VMID's directory whose backing file is the base, named relatively (``../<VMID>/base-...``) as Proxmox
writes it. New names are reserved with O_EXCL, so two allocations at once never get the same one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from imagecore.errors import (
    BlockError,
    BusyError,
    ImageLockedError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from imagecore.hostio import HostFile
from imagecore.units import INT64_MAX, parse_size

from ..formats import PoolDiskFormat
from ..pools import FORMATS_BY_EXT, Pool, PoolOpener, Volume
from ..rbdpool import RbdPool
from .jobs import jobs_of
from .table import AdminContext, command


@dataclass(frozen=True, slots=True)
class VolumeListArgs:
    pool: str
    vmid: int | None = None
    content: Literal["images", "iso", "import"] | None = None


@dataclass(frozen=True, slots=True)
class VolumeArg:
    volid: str


def _volume_record(vol: Volume) -> dict[str, Any]:
    vmid: int | None = None
    if vol.kind in ("images", "base") and not isinstance(vol.pool, RbdPool):
        vmid = int(vol.volid.partition(":")[2].partition("/")[0])
    content = vol.kind if vol.kind in ("iso", "import") else "images"
    rec: dict[str, Any] = {"volid": vol.volid, "format": "iso" if vol.kind == "iso" else vol.fmt,
                           "content": content, "read-only": vol.read_only,
                           "template": vol.kind == "base"}
    if isinstance(vol.pool, RbdPool):
        vmid = int(vol.volid.partition(":")[2].split("-")[1])
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
    pool = ctx.pool(args.pool)
    await pool.relist()
    out = []
    for vol in pool.volumes():
        rec = _volume_record(vol)
        if args.vmid is not None and rec.get("vmid") != args.vmid:
            continue
        if args.content is not None and rec["content"] != args.content:
            continue
        out.append(rec)
    return out


@command("volume-path", args=VolumeArg, returns="`{path}`")
async def volume_path(ctx: AdminContext, args: VolumeArg) -> Any:
    """The host path of a volume (`pvesm path`)."""
    return {"path": ctx.volume(args.volid).path}


@dataclass(frozen=True, slots=True)
class VolumeAllocArgs:
    pool: str
    vmid: int
    size: int | str  # bytes, or a string with a suffix ("32G")
    format: PoolDiskFormat = "raw"
    name: str | None = None
    options: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class TemplateArgs:
    pool: str
    vmid: int


# How many disk-N names volume-alloc tries before giving up: several nodes may allocate at once.
MAX_DISK_INDEX = 4096


def check_vmid(vmid: int) -> None:
    if not 100 <= vmid <= 999_999_999:
        raise InvalidArgumentError(f"invalid VMID {vmid}: a VMID is a number from 100 to 999999999")


def check_size(size: int | str) -> int:
    """A size argument in bytes: a number, or a string with qemu's suffixes (``"32G"``, ``"1.5T"``)."""
    value = parse_size(size) if isinstance(size, str) else size
    if not 0 < value <= INT64_MAX:
        raise InvalidArgumentError(f"Parameter 'size' expects a number of bytes from 1 to {INT64_MAX}")
    return value


def volid_of(pool: Pool, vmid: int, path: str) -> str:
    return f"{pool.name}:{vmid}/{os.path.basename(path)}"


def busy_check(ctx: AdminContext, vol: Volume, *, writes: bool) -> None:
    """Refuse an operation on a volume this server has open for a client: any that writes it, and one
    that reads it while it is exported read-write (the image may change under the read)."""
    if ctx.registry.is_open(vol) and (writes or not (vol.read_only or ctx.registry.read_only)):
        raise BusyError(f"volume '{vol.volid}' is in use by an NBD client")


def alloc_name(pool: Pool, vmid: int, fmt: str, name: str | None) -> str:
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
        base = "base-" + stem[len("vm-"):]
        siblings = [os.path.join(folder, f"{n}.{ext}") for ext in FORMATS_BY_EXT for n in (stem, base)]
        siblings.remove(path)
        if any(os.path.lexists(p) for p in siblings):
            continue  # disk-N is taken in any format, by a disk or by a template
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except FileExistsError:
            continue  # another node or client took it between the check and the create
        os.close(fd)
        if any(os.path.lexists(p) for p in siblings):
            # another node reserved disk-N in another format between our check and our create: O_EXCL
            # cannot see that, so both step back (neither name is served twice; at worst both move on)
            remove_reserved(path)
            continue
        return path
    if name is not None:
        raise InvalidArgumentError(f"volume '{name}' already exists")
    raise InvalidArgumentError(f"unable to allocate a disk name for VM {vmid}")


def format_options(options: dict[str, Any]) -> dict[str, str]:
    """Format options as qemu-img's -o takes them: every value a string (true/false as on/off)."""
    out: dict[str, str] = {}
    for key, value in options.items():
        if isinstance(value, bool):
            out[key] = "on" if value else "off"
        elif isinstance(value, (int, str)):
            out[key] = str(value)
        else:
            raise InvalidArgumentError(f"Invalid parameter type for 'options.{key}', expected: string")
    return out


async def create_volume(ctx: AdminContext, pool: Pool, vmid: int, fmt: str, name: str | None,
                        size: int | None, options: dict[str, str]) -> dict[str, Any]:
    """Reserve a volume name and create the image on it in a worker; nothing is left if that fails."""
    path = alloc_name(pool, vmid, fmt, name)
    try:
        res = await jobs_of(ctx).call("create", {"root": pool.root, "path": path, "format": fmt, "size": size,
                                                 "options": options})
    except BaseException:
        remove_reserved(path)
        raise
    volid = volid_of(pool, vmid, path)
    ctx.emit("VOLUME_ALLOCATED", {"volid": volid, "path": path})
    out: dict[str, Any] = {"volid": volid, "path": path, "format": fmt}
    out.update({k: res[k] for k in ("size", "formatting") if k in res})
    return out


def remove_reserved(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def alloc_volume(ctx: AdminContext, pool_name: str, vmid: int, size: int | str, fmt: str,
                       name: str | None, options: dict[str, Any] | None) -> dict[str, Any]:
    """volume-alloc and image-create: check the arguments, then create_volume."""
    pool = ctx.pool(pool_name)
    if pool.read_only:
        raise PermissionDeniedError(f"pool '{pool.name}' is read-only")
    check_vmid(vmid)
    nbytes = check_size(size)
    if isinstance(pool, RbdPool):
        if fmt != "raw" or options:
            raise InvalidArgumentError(f"pool '{pool.name}' is an RBD pool: its volumes are raw images")
        out = await pool.alloc(vmid, nbytes, name)
        ctx.emit("VOLUME_ALLOCATED", {"volid": out["volid"], "path": out["path"]})
        return out
    opts = format_options(options or {})
    for key in ("backing_file", "backing_fmt", "data_file"):
        if key in opts:
            # files are named by volume here: a backing file comes from clone-linked
            raise InvalidArgumentError(f"option '{key}' is not accepted here; use clone-linked")
    return await create_volume(ctx, pool, vmid, fmt, name, nbytes, opts)


@command("volume-alloc", args=VolumeAllocArgs, returns="`{volid, path, format, size, formatting}`")
async def volume_alloc(ctx: AdminContext, args: VolumeAllocArgs) -> Any:
    """Create a new disk of a VM in a pool (`pvesm alloc`): the next free `vm-VMID-disk-N` (or `name`),
    reserved with O_EXCL so that concurrent allocations get different names, made by the format's own
    create in a job worker, with any of its `-o` options."""
    return await alloc_volume(ctx, args.pool, args.vmid, args.size, args.format, args.name, args.options)


@command("volume-free", args=VolumeArg, returns="{}")
async def volume_free(ctx: AdminContext, args: VolumeArg) -> Any:
    """Delete a volume (`pvesm free`), refused while this server exports it or another process (a VM,
    qemu-img) holds its image."""
    vol = ctx.volume(args.volid)
    if vol.pool is None or vol.kind in ("iso", "import"):
        raise PermissionDeniedError(f"volume '{args.volid}' cannot be freed here")
    if vol.pool.read_only:
        raise PermissionDeniedError(f"pool '{vol.pool.name}' is read-only")
    busy_check(ctx, vol, writes=True)
    if isinstance(vol.pool, RbdPool):
        await vol.pool.free(vol)  # its exclusive lock proves that no node and no VM uses it
        ctx.emit("VOLUME_FREED", {"volid": vol.volid})
        return {}
    if vol.kind == "base":
        clones = await linked_clones(ctx, vol)
        if clones:
            raise BusyError(f"base volume '{vol.volid}' is still in use by linked clones: "
                            + ", ".join(clones))
    opener = PoolOpener(vol.pool.root, lock=True)
    hf = held(opener, vol)  # the write lock proves nobody else holds it
    try:
        os.unlink(vol.path)
    except OSError as exc:
        raise BlockError(f"cannot remove '{vol.path}': {exc.strerror}") from None
    finally:
        hf.close()
    ctx.emit("VOLUME_FREED", {"volid": vol.volid})
    return {}


def held(opener: PoolOpener, vol: Volume) -> HostFile:
    """The volume's file with its write lock taken; a process that holds the image makes this Busy."""
    try:
        return opener.open_file(vol.path, read_only=False)
    except ImageLockedError as exc:
        raise BusyError(f"volume '{vol.volid}' is in use: {exc}") from None


async def linked_clones(ctx: AdminContext, base: Volume) -> list[str]:
    """The volumes of the base's pool whose backing file is the base (asked of a job worker, which reads
    the images' headers without taking their locks)."""
    assert base.pool is not None
    real = os.path.realpath(base.path)
    candidates = [v for v in base.pool.volumes() if v.fmt in ("qcow2", "vmdk") and v.path != base.path]
    if not candidates or ctx.jobs is None:
        return []
    chains = await ctx.jobs.call("backing", {"root": base.pool.root,
                                             "images": [[v.path, v.fmt] for v in candidates]})
    return [v.volid for v, backing in zip(candidates, chains, strict=True)
            if backing is not None and os.path.realpath(backing) == real]


@command("template-create", args=TemplateArgs, returns="`{volumes: [volid]}`")
async def template_create(ctx: AdminContext, args: TemplateArgs) -> Any:
    """Make a VM's disks a template (`qm template`): every `vm-VMID-*` disk of the VMID is renamed
    `base-VMID-*` and becomes read-only. Refused while any of them is in use (exported by this server,
    or held by QEMU or qemu-img); all of them are renamed or none."""
    pool = ctx.pool(args.pool)
    if pool.read_only:
        raise PermissionDeniedError(f"pool '{pool.name}' is read-only")
    check_vmid(args.vmid)
    if isinstance(pool, RbdPool):
        for vol in pool.volumes():
            if vol.volid.startswith(f"{pool.name}:vm-{args.vmid}-"):
                busy_check(ctx, vol, writes=True)
        return {"volumes": await pool.template(args.vmid)}
    prefix = f"{pool.name}:{args.vmid}/"
    disks = [v for v in pool.volumes() if v.kind == "images" and v.volid.startswith(prefix)]
    if not disks:
        raise NotFoundError(f"VM {args.vmid} has no disks in pool '{pool.name}'")
    opener = PoolOpener(pool.root, lock=True)
    locks: list[HostFile] = []
    done: list[tuple[str, str]] = []
    try:
        for vol in disks:
            busy_check(ctx, vol, writes=True)
            locks.append(held(opener, vol))
        for vol in disks:
            folder, fname = os.path.split(vol.path)
            new = os.path.join(folder, "base-" + fname[len("vm-"):])
            if os.path.lexists(new):
                raise InvalidArgumentError(f"'{os.path.basename(new)}' already exists")
            os.rename(vol.path, new)
            done.append((vol.path, new))
        for _, new in done:
            os.chmod(new, 0o444)
    except BaseException:
        for old, new in reversed(done):
            os.rename(new, old)
        raise
    finally:
        for hf in locks:
            hf.close()
    return {"volumes": [volid_of(pool, args.vmid, new) for _, new in done]}
