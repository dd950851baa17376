"""Admin commands that run imagecore's verbs on volumes, in warm job workers: info, check, map, create,
convert, commit, and the clones and volume info built on them.

Every operation names volumes, never free paths: the server resolves the volume ID in its pools, and the
worker opens the files through the pool's confining opener. Short reads (`image-info`, `image-map`,
`image-check`, `volume-info`) answer directly; `image-convert`, `image-commit` and `clone-full` are jobs.
A target volume is reserved under its final Proxmox VE name first (O_EXCL) and removed again if the job
fails or is cancelled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from imagecore.errors import BusyError, InvalidArgumentError, PermissionDeniedError
from imagecore.units import INT64_MAX, parse_size

from ..formats import POOL_DISK_FORMATS, PoolDiskFormat
from ..pools import Pool, Volume
from ..rbdpool import RbdPool
from .jobs import JobManager, WorkerProcess, jobs_of
from .table import AdminContext, command
from .volumes import (
    VolumeArg,
    alloc_name,
    alloc_volume,
    busy_check,
    check_size,
    check_vmid,
    create_volume,
    format_options,
    remove_reserved,
    volid_of,
)

Format = PoolDiskFormat  # Proxmox VE's rule: the formats of a pool's disks (nbdsrv.formats)


def _worker_args(vol: Volume, **extra: Any) -> dict[str, Any]:
    assert vol.pool is not None
    return {"root": vol.pool.root, "path": vol.path, "format": vol.fmt, **extra}


def _pool_volume(ctx: AdminContext, volid: str) -> Volume:
    vol = ctx.volume(volid)
    if vol.pool is None:
        raise PermissionDeniedError(f"'{volid}' is not a pool volume")
    return vol


def _writable_pool(ctx: AdminContext, name: str) -> Pool:
    pool = ctx.pool(name)
    if pool.read_only:
        raise PermissionDeniedError(f"pool '{pool.name}' is read-only")
    return pool


# -- argument models ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ImageInfoArgs:
    volid: str
    backing_chain: bool = False


@dataclass(frozen=True, slots=True)
class VolumeResizeArgs:
    volid: str
    size: int | str
    shrink: bool = False


@dataclass(frozen=True, slots=True)
class ImageCompareArgs:
    volid: str
    volid2: str
    strict: bool = False


@dataclass(frozen=True, slots=True)
class ImageMeasureArgs:
    format: Format
    volid: str | None = None
    size: int | str | None = None
    options: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class SnapshotArgs:
    volid: str
    name: str


@dataclass(frozen=True, slots=True)
class ImageCheckArgs:
    volid: str
    repair: Literal["leaks", "all"] | None = None


@dataclass(frozen=True, slots=True)
class ImageMapArgs:
    volid: str
    start: int = 0
    max_length: int | None = None


@dataclass(frozen=True, slots=True)
class ImageCreateArgs:
    pool: str
    vmid: int
    size: int | str
    format: Format = "qcow2"
    name: str | None = None
    options: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ImageConvertArgs:
    volid: str
    format: Format | None = None
    pool: str | None = None
    vmid: int | None = None
    name: str | None = None
    options: dict[str, Any] | None = None
    job_id: str | None = None
    auto_dismiss: bool = False


@dataclass(frozen=True, slots=True)
class ImageCommitArgs:
    volid: str
    base: str | None = None
    drop: bool = False
    rate_limit: int | str | None = None
    job_id: str | None = None
    auto_dismiss: bool = False


@dataclass(frozen=True, slots=True)
class CloneFullArgs:
    volid: str
    vmid: int
    format: Format | None = None
    pool: str | None = None
    name: str | None = None
    job_id: str | None = None
    auto_dismiss: bool = False


@dataclass(frozen=True, slots=True)
class CloneLinkedArgs:
    volid: str
    vmid: int
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ImageRebaseArgs:
    volid: str
    backing: str | None = None
    unsafe: bool = False
    compress: bool = False
    job_id: str | None = None
    auto_dismiss: bool = False


@dataclass(frozen=True, slots=True)
class ImageAmendArgs:
    volid: str
    options: dict[str, Any]
    job_id: str | None = None
    auto_dismiss: bool = False


# -- reads ------------------------------------------------------------------------------------------------

@command("image-info", args=ImageInfoArgs,
         returns="`qemu-img info --output=json` (a list with `backing-chain`)")
async def image_info(ctx: AdminContext, args: ImageInfoArgs) -> Any:
    """What `qemu-img info --output=json` prints for a volume, optionally for its whole backing chain.
    Safe on a volume in use (as `qemu-img info -U` is)."""
    vol = _pool_volume(ctx, args.volid)
    return await jobs_of(ctx).call("info", _worker_args(vol, **{"backing-chain": args.backing_chain}))


@command("volume-info", args=VolumeArg, returns="`qemu-img info --output=json`")
async def volume_info(ctx: AdminContext, args: VolumeArg) -> Any:
    """A volume's image information (`pvesm` reads it with `qemu-img info --output=json`)."""
    vol = _pool_volume(ctx, args.volid)
    if isinstance(vol.pool, RbdPool):
        drv = await vol.open(read_only=True, lock=False)
        try:
            return {"virtual-size": drv.size, "filename": vol.path, "format": "raw", "dirty-flag": False}
        finally:
            await drv.close()
    return await jobs_of(ctx).call("info", _worker_args(vol))


@command("image-check", args=ImageCheckArgs,
         returns="`qemu-img check --output=json` plus `exit-code`, `leaks-fixed`, `corruptions-fixed`")
async def image_check(ctx: AdminContext, args: ImageCheckArgs) -> Any:
    """Check a volume's consistency as `qemu-img check` does, repairing leaks or everything with
    `repair`. Refused (Busy) while the volume is exported read-write, and with `repair` while it is
    exported at all or held by another process."""
    vol = _pool_volume(ctx, args.volid)
    if args.repair is not None and vol.read_only:
        raise PermissionDeniedError(f"volume '{vol.volid}' is read-only")
    busy_check(ctx, vol, writes=args.repair is not None)
    return await jobs_of(ctx).call("check", _worker_args(vol, repair=args.repair))


# Entries in one image-map answer. The worker, the server and the client each hold an answer whole, and a
# map can have millions of entries (one per cluster of a fragmented image), so a longer map ends early,
# after a whole entry, and the client asks again from where it ended; 16384 entries are about 1.7 MiB of
# JSON.
MAP_MAX_ENTRIES = 16384


@command("image-map", args=ImageMapArgs,
         returns=f"`qemu-img map --output=json`, at most {MAP_MAX_ENTRIES} entries")
async def image_map(ctx: AdminContext, args: ImageMapArgs) -> Any:
    """The allocation map of a volume and its backing chain, as `qemu-img map --output=json`, from
    `start` for `max-length` bytes (to the end by default). An answer holds at most 16384 entries: when
    the last one ends before the range does, ask again with `start` at its end for the rest (the
    entries are the ones a single `qemu-img map` prints)."""
    vol = _pool_volume(ctx, args.volid)
    if args.start < 0 or (args.max_length is not None and args.max_length < 0):
        raise InvalidArgumentError("start and max-length must not be negative")
    extra: dict[str, Any] = {"start": args.start, "max-entries": MAP_MAX_ENTRIES}
    if args.max_length is not None:
        extra["max-length"] = args.max_length
    return await jobs_of(ctx).call("map", _worker_args(vol, **extra))


@command("volume-resize", args=VolumeResizeArgs, returns="`{volid, old-size, size}`")
async def volume_resize(ctx: AdminContext, args: VolumeResizeArgs) -> Any:
    """Set a volume's virtual size (`pvesm`'s volume_resize, `qemu-img resize`): raw grows, and shrinks
    with `shrink`; qcow2 grows (a v2 image with internal snapshots is refused, as qemu 7.2 refuses it).
    Refused (Busy) while the volume is exported or held by another process."""
    vol = _pool_volume(ctx, args.volid)
    if vol.read_only:
        raise PermissionDeniedError(f"volume '{vol.volid}' is read-only")
    size = check_size(args.size)
    busy_check(ctx, vol, writes=True)
    if isinstance(vol.pool, RbdPool):
        return await vol.pool.resize(vol, size, args.shrink)
    res = await jobs_of(ctx).call("resize", _worker_args(vol, size=size, shrink=args.shrink))
    return {"volid": vol.volid, **res}


@command("image-compare", args=ImageCompareArgs,
         returns="`{identical, size1, size2, size-mismatch, offset?, message}`")
async def image_compare(ctx: AdminContext, args: ImageCompareArgs) -> Any:
    """Compare the guest contents of two volumes (`qemu-img compare`; `strict` as its -s): `offset` is the
    first mismatching sector, `message` what qemu-img prints. A read safe to share."""
    a, b = _pool_volume(ctx, args.volid), _pool_volume(ctx, args.volid2)
    assert a.pool is not None and b.pool is not None
    return await jobs_of(ctx).call("compare", {"root": sorted({a.pool.root, b.pool.root}), "path": a.path,
                                               "format": a.fmt, "path2": b.path, "format2": b.fmt,
                                               "strict": args.strict})


@command("image-measure", args=ImageMeasureArgs, returns="`{required, fully-allocated, bitmaps?}`")
async def image_measure(ctx: AdminContext, args: ImageMeasureArgs) -> Any:
    """The size a new image of `format` (with its `-o` options) needs, for a volume's contents or for
    `size` bytes (`qemu-img measure`): `required` as it would be written, `fully-allocated` preallocated."""
    if (args.volid is None) == (args.size is None):
        raise InvalidArgumentError("Either size or volid must be given, not both")
    wargs: dict[str, Any] = {"target-format": args.format, "options": format_options(args.options or {})}
    if args.volid is not None:
        vol = _pool_volume(ctx, args.volid)
        assert vol.pool is not None
        wargs.update(root=vol.pool.root, path=vol.path, format=vol.fmt)
    else:
        assert args.size is not None
        wargs.update(root="/", size=check_size(args.size))
    return await jobs_of(ctx).call("measure", wargs)


# qemu-img's name for volume-resize
command("image-resize", args=VolumeResizeArgs, returns="`{volid, old-size, size}`")(volume_resize)


# -- internal snapshots ---------------------------------------------------------------------------------

async def _snapshot(ctx: AdminContext, volid: str, action: str, name: str | None) -> Any:
    vol = _pool_volume(ctx, volid)
    if isinstance(vol.pool, RbdPool):
        if action != "list":
            busy_check(ctx, vol, writes=True)
        return await vol.pool.snapshot(vol, action, name)
    if action != "list":
        if vol.read_only:
            raise PermissionDeniedError(f"volume '{vol.volid}' is read-only")
        busy_check(ctx, vol, writes=True)
        if vol.fmt != "qcow2":
            raise InvalidArgumentError(f"volume '{vol.volid}' is {vol.fmt}: only qcow2 volumes have internal "
                                       "snapshots")
    return await jobs_of(ctx).call("snapshot", _worker_args(vol, action=action, name=name))


@command("volume-snapshot-list", args=VolumeArg, returns="`[SnapshotInfo]` (as `qemu-img info` lists them)")
async def volume_snapshot_list(ctx: AdminContext, args: VolumeArg) -> Any:
    """The internal snapshots of a volume (`qemu-img snapshot -l`); safe on a volume in use."""
    return await _snapshot(ctx, args.volid, "list", None)


@command("volume-snapshot-create", args=SnapshotArgs, returns="`[SnapshotInfo]` after it")
async def volume_snapshot_create(ctx: AdminContext, args: SnapshotArgs) -> Any:
    """Take an internal snapshot of a qcow2 volume (`qemu-img snapshot -c`, what Proxmox VE's
    `volume_snapshot` does for a stopped VM). Busy while the volume is exported or held."""
    return await _snapshot(ctx, args.volid, "create", args.name)


@command("volume-snapshot-rollback", args=SnapshotArgs, returns="`[SnapshotInfo]` after it")
async def volume_snapshot_rollback(ctx: AdminContext, args: SnapshotArgs) -> Any:
    """Revert a qcow2 volume to an internal snapshot, found by id then by name (`qemu-img snapshot -a`).
    Busy while the volume is exported or held."""
    return await _snapshot(ctx, args.volid, "apply", args.name)


@command("volume-snapshot-delete", args=SnapshotArgs, returns="`[SnapshotInfo]` after it")
async def volume_snapshot_delete(ctx: AdminContext, args: SnapshotArgs) -> Any:
    """Delete an internal snapshot of a qcow2 volume by name (`qemu-img snapshot -d`). Busy while the
    volume is exported or held."""
    return await _snapshot(ctx, args.volid, "delete", args.name)


# qemu-img's names for the same four operations, beside Proxmox VE's
for _verb, _fn in (("list", volume_snapshot_list), ("create", volume_snapshot_create),
                   ("apply", volume_snapshot_rollback), ("delete", volume_snapshot_delete)):
    command(f"image-snapshot-{_verb}", args=VolumeArg if _verb == "list" else SnapshotArgs,
            returns="`[SnapshotInfo]`")(_fn)


# -- persistent dirty bitmaps ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BitmapAddArgs:
    volid: str
    name: str
    granularity: int | str | None = None
    disabled: bool = False


@dataclass(frozen=True, slots=True)
class BitmapArgs:
    volid: str
    name: str


@dataclass(frozen=True, slots=True)
class BitmapMergeArgs:
    volid: str
    name: str
    source: str
    source_volid: str | None = None


async def _bitmap(ctx: AdminContext, volid: str, name: str, actions: list[dict[str, str]], *,
                  granularity: int | None = None, source_volid: str | None = None) -> Any:
    """Run `qemu-img bitmap` actions on a volume in a worker: Busy while the volume is exported or held
    by another process (as the snapshot commands), since its bitmaps are then the writer's to keep."""
    vol = _pool_volume(ctx, volid)
    if vol.read_only:
        raise PermissionDeniedError(f"volume '{vol.volid}' is read-only")
    busy_check(ctx, vol, writes=True)
    if vol.fmt != "qcow2":
        raise InvalidArgumentError(f"volume '{vol.volid}' is {vol.fmt}: only qcow2 volumes have persistent "
                                   "dirty bitmaps")
    wargs = _worker_args(vol, name=name, actions=actions, granularity=granularity)
    if source_volid is not None:
        src = _pool_volume(ctx, source_volid)
        busy_check(ctx, src, writes=False)
        assert vol.pool is not None and src.pool is not None
        wargs.update({"root": sorted({vol.pool.root, src.pool.root}), "source-path": src.path,
                      "source-format": src.fmt})
    return await jobs_of(ctx).call("bitmap", wargs)


_BITMAPS_RETURN = "`[Qcow2BitmapInfo]` after it (as `qemu-img info` lists them)"


@command("image-bitmap-add", args=BitmapAddArgs, returns=_BITMAPS_RETURN)
async def image_bitmap_add(ctx: AdminContext, args: BitmapAddArgs) -> Any:
    """Add a persistent dirty bitmap to a qcow2 volume (`qemu-img bitmap --add`, `-g` as `granularity`,
    in bytes or with a suffix; `disabled` adds it disabled). From then on every write through imagecore or
    nbdsrv sets its bits; a backup reads them as the `qemu:dirty-bitmap:NAME` NBD context."""
    gran = None
    if args.granularity is not None:
        gran = parse_size(args.granularity) if isinstance(args.granularity, str) else args.granularity
    actions = [{"action": "add"}] + ([{"action": "disable"}] if args.disabled else [])
    return await _bitmap(ctx, args.volid, args.name, actions, granularity=gran)


@command("image-bitmap-remove", args=BitmapArgs, returns=_BITMAPS_RETURN)
async def image_bitmap_remove(ctx: AdminContext, args: BitmapArgs) -> Any:
    """Remove a persistent dirty bitmap (`qemu-img bitmap --remove`); inconsistent ones too."""
    return await _bitmap(ctx, args.volid, args.name, [{"action": "remove"}])


@command("image-bitmap-clear", args=BitmapArgs, returns=_BITMAPS_RETURN)
async def image_bitmap_clear(ctx: AdminContext, args: BitmapArgs) -> Any:
    """Clear every bit of a bitmap (`qemu-img bitmap --clear`): what a backup does after copying the
    changes it showed."""
    return await _bitmap(ctx, args.volid, args.name, [{"action": "clear"}])


@command("image-bitmap-enable", args=BitmapArgs, returns=_BITMAPS_RETURN)
async def image_bitmap_enable(ctx: AdminContext, args: BitmapArgs) -> Any:
    """Make a bitmap record writes again (`qemu-img bitmap --enable`)."""
    return await _bitmap(ctx, args.volid, args.name, [{"action": "enable"}])


@command("image-bitmap-disable", args=BitmapArgs, returns=_BITMAPS_RETURN)
async def image_bitmap_disable(ctx: AdminContext, args: BitmapArgs) -> Any:
    """Stop a bitmap recording writes (`qemu-img bitmap --disable`); it keeps the bits it has."""
    return await _bitmap(ctx, args.volid, args.name, [{"action": "disable"}])


@command("image-bitmap-merge", args=BitmapMergeArgs, returns=_BITMAPS_RETURN)
async def image_bitmap_merge(ctx: AdminContext, args: BitmapMergeArgs) -> Any:
    """Set in bitmap `name` every bit set in bitmap `source` (`qemu-img bitmap --merge`), of the same
    volume or of `source-volid` (`-b`), which must have the same size."""
    return await _bitmap(ctx, args.volid, args.name, [{"action": "merge", "source": args.source}],
                         source_volid=args.source_volid)


# -- new volumes ------------------------------------------------------------------------------------------

@command("image-create", args=ImageCreateArgs, returns="`{volid, path, format, size, formatting}`")
async def image_create(ctx: AdminContext, args: ImageCreateArgs) -> Any:
    """Create a new disk of a VM with any of `qemu-img create`'s `-o` options for its format (for example
    `{"cluster_size": 65536, "preallocation": "metadata"}`), under the next free `vm-VMID-disk-N`."""
    return await alloc_volume(ctx, args.pool, args.vmid, args.size, args.format, args.name, args.options)


@command("clone-linked", args=CloneLinkedArgs, returns="`{volid, path, format, backing-file}`")
async def clone_linked(ctx: AdminContext, args: CloneLinkedArgs) -> Any:
    """A linked clone of a template disk (`qm clone` without `--full`): a qcow2 overlay under the next
    free `vm-VMID-disk-N.qcow2` of the target VMID whose backing file is the base, named relatively
    (`../BASEVMID/base-....fmt`) as Proxmox VE writes it. Reads come from the base, writes go to the
    overlay."""
    base = _pool_volume(ctx, args.volid)
    if isinstance(base.pool, RbdPool):
        check_vmid(args.vmid)
        out = await base.pool.clone_linked(base, args.vmid, args.name)
        ctx.emit("VOLUME_ALLOCATED", {"volid": out["volid"], "path": out["path"]})
        return out
    if base.kind != "base":
        raise InvalidArgumentError(f"'{base.volid}' is not a template (base-) volume; linked clones are "
                                   "made only of templates")
    assert base.pool is not None
    pool = _writable_pool(ctx, base.pool.name)
    check_vmid(args.vmid)
    base_vmid = base.volid.partition(":")[2].partition("/")[0]
    backing = f"../{base_vmid}/{os.path.basename(base.path)}"
    out = await create_volume(ctx, pool, args.vmid, "qcow2", args.name, None,
                        {"backing_file": backing, "backing_fmt": base.fmt})
    out["backing-file"] = backing
    return out


def _convert(ctx: AdminContext, job_type: str, src: Volume, pool: Pool, vmid: int, fmt: str,
             name: str | None, options: dict[str, str], job_id: str | None, auto_dismiss: bool) -> Any:
    """Start a convert job from ``src`` into a new volume of ``pool``; returns ``{job-id, volid}``."""
    assert src.pool is not None
    busy_check(ctx, src, writes=False)
    jobs: JobManager = jobs_of(ctx)
    jobs.new_id(job_id)  # refuse a bad or taken ID before anything is created
    path = alloc_name(pool, vmid, fmt, name)
    volid = volid_of(pool, vmid, path)
    roots = sorted({src.pool.root, pool.root})
    wargs = {"root": roots, "source": src.path, "source-format": src.fmt, "target": path, "format": fmt,
             "options": options}

    async def body(worker: WorkerProcess, progress: Any) -> Any:
        stats = await worker.run("convert", wargs, progress)
        ctx.emit("VOLUME_ALLOCATED", {"volid": volid, "path": path})
        return {"volid": volid, **stats}

    async def cleanup() -> None:
        remove_reserved(path)

    try:
        job = jobs.submit(job_type, body, job_id=job_id, auto_dismiss=auto_dismiss, cleanup=cleanup)
    except BaseException:
        remove_reserved(path)
        raise
    return {"job-id": job.id, "volid": volid}


@command("image-convert", args=ImageConvertArgs, returns="`{job-id, volid}`")
async def image_convert(ctx: AdminContext, args: ImageConvertArgs) -> Any:
    """Start a job converting a volume into a new volume (`qemu-img convert`), by default of the same VM
    and pool, in `format` with its `-o` options. The job's result carries the new volid and the bytes
    read, written and zeroed; cancelling it removes the new volume."""
    src = _pool_volume(ctx, args.volid)
    assert src.pool is not None
    pool = _writable_pool(ctx, args.pool or src.pool.name)
    if args.vmid is not None:
        vmid = args.vmid
    elif src.kind in ("images", "base"):
        vmid = int(src.volid.partition(":")[2].partition("/")[0])
    else:
        raise InvalidArgumentError(f"volume '{src.volid}' belongs to no VM: give 'vmid'")
    check_vmid(vmid)
    return _convert(ctx, "convert", src, pool, vmid, args.format or _disk_format(src), args.name,
                    format_options(args.options or {}), args.job_id, args.auto_dismiss)


def _disk_format(src: Volume) -> str:
    """The format of a pool disk made from ``src`` when none is asked for: its own where a pool disk may
    have it, else raw (an import/ file in another format: Proxmox VE's rule, nbdsrv.formats)."""
    return src.fmt if src.fmt in POOL_DISK_FORMATS else "raw"


def _in_use(ctx: AdminContext, vol: Volume) -> None:
    """Busy while this server has the image open for a client, in any mode (a commit writes it)."""
    if ctx.registry.is_open(vol):
        raise BusyError(f"volume '{vol.volid}' is in use by an NBD client")


async def _backing_volume(ctx: AdminContext, top: Volume) -> Volume:
    """The top's immediate backing file as a volume of its pool (a plain file of the pool when it is
    not named as one), for the Busy and read-only checks; refused when the top has none."""
    assert top.pool is not None
    chain = await jobs_of(ctx).call("backing", {"root": top.pool.root, "images": [[top.path, top.fmt]]})
    path = chain[0] if chain else None
    if path is None:
        raise InvalidArgumentError(f"volume '{top.volid}' does not have a backing file")
    real = os.path.realpath(path)
    for vol in top.pool.volumes():
        if os.path.realpath(vol.path) == real:
            return vol
    ext = os.path.splitext(real)[1].lstrip(".")
    return Volume(real, real, ext, False, "image", top.pool)


@command("image-commit", args=ImageCommitArgs, returns="`{job-id}`")
async def image_commit(ctx: AdminContext, args: ImageCommitArgs) -> Any:
    """Start a job committing a volume into its backing file, or into `base` (a volume further down its
    chain), as `qemu-img commit` does: the data of every layer above the base is copied into it (a
    smaller base grows), the base is flushed, and the volume is emptied afterwards unless `drop` is set
    or `base` lies below its immediate backing file. `rate-limit` caps the copy in bytes per second (a
    number, or a size with a suffix). Refused (Busy) while the volume or the base is exported or held
    by another process, and for a read-only base (a template that linked clones share). The job's result
    has the bytes copied and zeroed, the base's old size and the size it grew to, and whether the volume
    was emptied; progress goes over the volume's size."""
    top = _pool_volume(ctx, args.volid)
    assert top.pool is not None
    if top.read_only:
        raise PermissionDeniedError(f"volume '{top.volid}' is read-only")
    rate = 0
    if args.rate_limit is not None:
        rate = parse_size(args.rate_limit) if isinstance(args.rate_limit, str) else args.rate_limit
        if not 0 <= rate <= INT64_MAX:
            raise InvalidArgumentError(
                f"Parameter 'rate-limit' expects a number of bytes from 0 to {INT64_MAX}")
    _in_use(ctx, top)
    if args.base is not None:
        base = _pool_volume(ctx, args.base)
        if base.pool is not top.pool:
            raise InvalidArgumentError(f"volume '{base.volid}' is not in the pool of '{top.volid}'")
        if os.path.realpath(base.path) == os.path.realpath(top.path):
            raise InvalidArgumentError(f"volume '{base.volid}' is the volume to commit itself")
    else:
        base = await _backing_volume(ctx, top)
    if base.read_only:
        raise PermissionDeniedError(f"volume '{base.volid}' is read-only")
    _in_use(ctx, base)
    jobs = jobs_of(ctx)
    jobs.new_id(args.job_id)  # refuse a bad or taken ID before anything starts
    wargs = _worker_args(top, base=base.path if args.base is not None else None, drop=args.drop,
                         **{"rate-limit": rate})

    async def body(worker: WorkerProcess, progress: Any) -> Any:
        res = await worker.run("commit", wargs, progress)
        return {"volid": top.volid, **res}

    job = jobs.submit("commit", body, job_id=args.job_id, auto_dismiss=args.auto_dismiss)
    return {"job-id": job.id}


@command("clone-full", args=CloneFullArgs, returns="`{job-id, volid}`")
async def clone_full(ctx: AdminContext, args: CloneFullArgs) -> Any:
    """Start a job making a full, independent copy of a volume (a template's, usually) as a disk of
    another VM (`qm clone --full`), in the source's format unless `format` says otherwise."""
    src = _pool_volume(ctx, args.volid)
    assert src.pool is not None
    pool = _writable_pool(ctx, args.pool or src.pool.name)
    check_vmid(args.vmid)
    if isinstance(src.pool, RbdPool):
        return _rbd_clone_full(ctx, src, pool, args)
    return _convert(ctx, "clone-full", src, pool, args.vmid, args.format or _disk_format(src), args.name, {},
                    args.job_id, args.auto_dismiss)


def _rbd_clone_full(ctx: AdminContext, src: Volume, pool: Pool, args: CloneFullArgs) -> Any:
    """clone-full within an RBD pool: librbd copies the image, in a job as the directory pools' is."""
    assert isinstance(src.pool, RbdPool)
    rbd_pool = src.pool
    if pool is not rbd_pool or (args.format or "raw") != "raw":
        raise InvalidArgumentError("a full clone of an RBD volume is made in its own pool, as raw")
    busy_check(ctx, src, writes=False)
    jobs: JobManager = jobs_of(ctx)

    async def body(worker: WorkerProcess, progress: Any) -> Any:
        out = await rbd_pool.clone_full(src, args.vmid, args.name)
        ctx.emit("VOLUME_ALLOCATED", {"volid": out["volid"], "path": out["path"]})
        return out

    job = jobs.submit("clone-full", body, job_id=args.job_id, auto_dismiss=args.auto_dismiss)
    return {"job-id": job.id}


# -- changing an image in place: rebase and amend ----------------------------------------------------

def _changing(ctx: AdminContext, volid: str) -> Volume:
    """A volume this command may change: writable, and neither exported nor held by another process (the
    worker's write lock refuses a holder as Busy)."""
    vol = _pool_volume(ctx, volid)
    if vol.read_only:
        raise PermissionDeniedError(f"volume '{vol.volid}' is read-only")
    busy_check(ctx, vol, writes=True)
    return vol


def _in_place_job(ctx: AdminContext, job_type: str, op: str, vol: Volume, wargs: dict[str, Any],
                  extra: dict[str, Any], job_id: str | None, auto_dismiss: bool) -> Any:
    jobs: JobManager = jobs_of(ctx)

    async def body(worker: WorkerProcess, progress: Any) -> Any:
        res = await worker.run(op, wargs, progress)
        return {"volid": vol.volid, **extra, **res}

    job = jobs.submit(job_type, body, job_id=job_id, auto_dismiss=auto_dismiss)
    return {"job-id": job.id}


@command("image-rebase", args=ImageRebaseArgs, returns="`{job-id}`")
async def image_rebase(ctx: AdminContext, args: ImageRebaseArgs) -> Any:
    """Start a job that gives a volume another backing file (`qemu-img rebase`): `backing` is a volume of
    the same pool, named in the image as Proxmox VE names a linked clone's base (`../VMID/NAME`), or absent
    to make the volume standalone. The guest's view is kept (what the old and new backing files show
    differently is copied in first, compressed with `compress`) unless `unsafe`, which rewrites the name
    alone. The result has the new `backing-file` and the bytes copied and zeroed. Busy while the volume is
    exported or held by another process."""
    vol = _changing(ctx, args.volid)
    assert vol.pool is not None
    name: str | None = None
    fmt: str | None = None
    if args.backing is not None:
        base = _pool_volume(ctx, args.backing)
        if base.pool is not vol.pool:
            raise InvalidArgumentError(f"'{base.volid}' is not in the pool of '{vol.volid}'")
        if os.path.realpath(base.path) == os.path.realpath(vol.path):
            raise InvalidArgumentError(f"'{vol.volid}' cannot be its own backing file")
        busy_check(ctx, base, writes=False)
        base_vmid = base.volid.partition(":")[2].partition("/")[0]
        name, fmt = f"../{base_vmid}/{os.path.basename(base.path)}", base.fmt
    jobs_of(ctx).new_id(args.job_id)  # a bad or taken ID is refused before anything starts
    wargs = _worker_args(vol, backing=name if name is not None else "", **{"backing-format": fmt},
                         unsafe=args.unsafe, compress=args.compress)
    return _in_place_job(ctx, "rebase", "rebase", vol, wargs, {"backing-file": name, "backing-format": fmt},
                         args.job_id, args.auto_dismiss)


@command("image-amend", args=ImageAmendArgs, returns="`{job-id}`")
async def image_amend(ctx: AdminContext, args: ImageAmendArgs) -> Any:
    """Start a job that changes format options of a volume in place (`qemu-img amend -o`): for qcow2
    `compat` ("0.10" or "1.1"), `lazy_refcounts`, `refcount_bits`, `data_file_raw` (off) and `size`, with
    qemu-img's checks and messages (a new refcount width rebuilds the refcount structure, a downgrade turns
    zero clusters into data clusters, which is why this is a job). Busy while the volume is exported or held
    by another process."""
    vol = _changing(ctx, args.volid)
    if not args.options:
        raise InvalidArgumentError("Must specify options")
    jobs_of(ctx).new_id(args.job_id)
    # qemu's option list: a comma inside a name or value is written twice
    options = ",".join(f"{k.replace(',', ',,')}={v.replace(',', ',,')}"
                       for k, v in format_options(args.options).items())
    return _in_place_job(ctx, "amend", "amend", vol, _worker_args(vol, options=options), {}, args.job_id,
                         args.auto_dismiss)
