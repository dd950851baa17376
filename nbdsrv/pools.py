"""Directory pools in the Proxmox VE "dir" layout: volume names, containment and formats pinned by extension.

A pool root holds ``images/<VMID>/vm-<VMID>-<NAME>.<raw|qcow2|vmdk>`` (guest disks, read-write),
``images/<VMID>/base-<VMID>-<NAME>.<fmt>`` (templates, always read-only), ``template/iso/*.iso``
(read-only raw) and ``import/<file>`` (Proxmox VE 8's import content: an image of any registered format,
read-only, to copy out). A volume is named by its volume ID, ``<pool>:<VMID>/<file>``,
``<pool>:iso/<file>`` or ``<pool>:import/<file>``.

Pools are a security boundary. Export names are parsed, never joined onto a path as given, and only names
found by scanning the pool are served. Every file that is opened -- the image, its backing files, its
external data file -- must resolve under the pool root; the check is repeated on the opened fd through
/proc/self/fd, so a symlink swapped in between the check and the open cannot lead outside.

Formats come from the extension and are pinned when the pool is scanned; a pool's own volumes are never
probed (nbdsrv.formats states which formats a pool takes where). A backing file named without a backing
format gets the format of its extension when that is a registered one; otherwise it is probed (as qemu
does), and the probe is harmless because whatever it names is still confined to the pool.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imagecore.driver import BlockDriver, ImageOpener, OpenContext
from imagecore.errors import InvalidArgumentError, NotFoundError, PermissionDeniedError
from imagecore.hostio import HostFile

from .config import PoolConfig
from .formats import format_of_file, pool_disk_extensions

MAX_NAME_BYTES = 4096
# extension -> format of a guest disk or template (Proxmox VE's rule, from nbdsrv.formats)
FORMATS_BY_EXT = pool_disk_extensions()

_POOL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_DISK_FILE = re.compile(r"(vm|base)-([0-9]+)-([A-Za-z0-9][A-Za-z0-9_.+-]*)\.("
                        + "|".join(re.escape(ext) for ext in FORMATS_BY_EXT) + ")")
_ISO_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*\.iso", re.IGNORECASE)
_IMPORT_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
_VMID = re.compile(r"[1-9][0-9]{0,9}")


@dataclass(frozen=True, slots=True)
class Volume:
    """One exportable image of a pool (or a single ``--image``)."""

    volid: str
    path: str
    fmt: str
    read_only: bool
    kind: str  # "images", "base", "iso", "import" or "image"
    pool: Pool | None = None
    # an internal snapshot to show instead of the active image (read-only), by id or name
    snapshot: str | None = None
    # the dirty bitmaps offered as meta contexts (--bitmap); None offers every consistent one
    bitmaps: tuple[str, ...] | None = None
    # ``path`` resolved, when the scan that found it knows it (None: resolve it when needed)
    real: str | None = None
    # what LIST and INFO say about it (qemu-nbd -D); None: its format and kind
    description: str | None = None
    # whether qemu:allocation-depth is offered (qemu-nbd offers it only with -A)
    allocation_depth: bool = True
    # whether NBD_FLAG_CAN_MULTI_CONN may be advertised (qemu-nbd: only when -e allows several clients)
    multi_conn: bool = True
    # advertise FUA and block sizes as qemu-nbd does (see ImageConfig.qemu_blocks)
    qemu_blocks: bool = False
    # the --object secret that unlocks an encrypted image, passed to its open as key-secret
    key_secret: str | None = None
    # qemu-nbd -o, --detect-zeroes and --discard (see ImageConfig)
    offset: int = 0
    detect_zeroes: str = "off"
    discard: str = "unmap"

    def realpath(self) -> str:
        return self.real if self.real is not None else os.path.realpath(self.path)

    def opener(self, *, lock: bool = True, describe: bool = False) -> ImageOpener:
        """The opener for this volume: confined to its pool, or qemu-nbd's plain rules for ``--image``.

        ``describe`` gives an opener that never writes and takes no lock (see DescribingOpener).
        """
        if describe:
            if self.pool is not None:
                return DescribingPoolOpener(self.pool.root, lock=False)
            return DescribingOpener(lock=False, allow_probe=True)
        if self.pool is not None:
            return PoolOpener(self.pool.root, lock=lock)
        return ImageOpener(lock=lock, allow_probe=True)

    def open_options(self) -> dict[str, Any] | None:
        """What the open of the image is given: the snapshot to show, the secret of an encrypted image
        (as luks's ``key-secret`` and qcow2's ``encrypt.key-secret``)."""
        options: dict[str, Any] = {}
        if self.snapshot is not None:
            options["snapshot"] = {"id-or-name": self.snapshot}
        if self.key_secret is not None:
            options["key-secret"] = self.key_secret
            options["encrypt"] = {"key-secret": self.key_secret}
        return options or None

    async def open(self, *, read_only: bool, lock: bool = True, describe: bool = False) -> BlockDriver:
        options = self.open_options()
        return await self.opener(lock=lock, describe=describe).open(
            self.path, self.fmt, read_only=read_only or self.read_only, options=options)


def check_export_name(name: str) -> None:
    """Refuse names that could never be a volume ID: NUL, too long, absolute, ``..``."""
    if "\0" in name:
        raise InvalidArgumentError("export name contains a NUL byte")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise InvalidArgumentError(f"export name is longer than {MAX_NAME_BYTES} bytes")
    if name.startswith("/") or "\\" in name:
        raise PermissionDeniedError("export name must not be a path")
    if any(part == ".." for part in re.split(r"[/:]", name)):
        raise PermissionDeniedError("export name must not contain '..'")


def is_within(path: str, root: str) -> bool:
    """True when the already-resolved ``path`` is ``root`` or lies below it."""
    return path == root or path.startswith(root.rstrip("/") + "/")


class Pool:
    """A directory pool. Scanning is cheap (a few readdirs), so it runs on LIST and on unknown names."""

    type = "dir"

    def __init__(self, name: str, root: str, *, read_only: bool = False, shared: bool = False) -> None:
        if not _POOL_NAME.fullmatch(name):
            raise InvalidArgumentError(f"invalid pool name '{name}'")
        real = os.path.realpath(root)
        if not os.path.isdir(real):
            raise NotFoundError(f"pool '{name}': '{root}' is not a directory")
        self.name = name
        self.root = real
        self.read_only = read_only
        # Several nodes serve the directory at once (CephFS, NFS): what is known of an image file from an
        # earlier look (an INFO answer, a probe) may be stale the moment another node writes, so nothing
        # is kept; the lock bytes, which the cluster filesystem honours between its clients, keep the
        # images safe as on one host.
        self.shared = shared
        self._volumes: dict[str, Volume] = {}

    def __repr__(self) -> str:
        return f"Pool({self.name!r}, {self.root!r})"

    def same_place(self, pc: PoolConfig) -> bool:
        """True when ``pc`` (a re-read configuration) names this pool's storage; its flags may differ."""
        return pc.type == self.type and os.path.realpath(pc.path) == self.root and pc.shared == self.shared

    # -- scanning ------------------------------------------------------------------------------------
    def _contained(self, path: str) -> bool:
        return is_within(os.path.realpath(path), self.root)

    def _is_guest_disk(self, path: str) -> bool:
        """True when ``path`` resolves to a ``images/<VMID>/vm-<VMID>-...`` file of this pool."""
        rel = os.path.relpath(os.path.realpath(path), self.root).split(os.sep)
        if len(rel) != 3 or rel[0] != "images" or not _VMID.fullmatch(rel[1]):
            return False
        m = _DISK_FILE.fullmatch(rel[2])
        return m is not None and m.group(1) == "vm" and m.group(2) == rel[1]

    def scan(self) -> dict[str, Volume]:
        """Re-read the pool directories; returns volume ID -> Volume in a stable order.

        A path with no symbolic link on the way from the (resolved) root is its own real path: only
        the entries that readdir reports as links are resolved, which keeps a scan of 10,000 volumes to
        the readdirs (resolving each path cost an lstat per component)."""
        found: dict[str, Volume] = {}
        images = os.path.join(self.root, "images")
        images_plain = os.path.realpath(images) == images
        for ventry in _scandir(images):
            vmid = ventry.name
            if not _VMID.fullmatch(vmid):
                continue
            vdir = ventry.path
            dir_plain = images_plain and not ventry.is_symlink()
            if not ventry.is_dir() or not (dir_plain or self._contained(vdir)):
                continue
            for fentry in _scandir(vdir):
                fname = fentry.name
                m = _DISK_FILE.fullmatch(fname)
                if m is None or m.group(2) != vmid:
                    continue
                path = fentry.path
                plain = dir_plain and not fentry.is_symlink()
                if not fentry.is_file() or not (plain or self._contained(path)):
                    continue
                kind = "base" if m.group(1) == "base" else "images"
                volid = f"{self.name}:{vmid}/{fname}"
                # Read-only follows the file the name resolves to, not the name: a vm- symlink to a
                # template or an ISO is as read-only as its target.
                read_only = self.read_only or kind == "base" or not (plain or self._is_guest_disk(path))
                found[volid] = Volume(volid, path, FORMATS_BY_EXT[m.group(4)], read_only, kind, self,
                                      real=path if plain else None)
        isodir = os.path.join(self.root, "template", "iso")
        for fname in _listdir(isodir):
            if not _ISO_FILE.fullmatch(fname):
                continue
            path = os.path.join(isodir, fname)
            if not os.path.isfile(path) or not self._contained(path):
                continue
            volid = f"{self.name}:iso/{fname}"
            found[volid] = Volume(volid, path, "raw", True, "iso", self)
        importdir = os.path.join(self.root, "import")
        for fname in _listdir(importdir):
            # the format is the extension's, never probed; a file of no registered format is not listed
            fmt = format_of_file(fname)
            if fmt is None or not _IMPORT_FILE.fullmatch(fname):
                continue
            path = os.path.join(importdir, fname)
            if not os.path.isfile(path) or not self._contained(path):
                continue
            volid = f"{self.name}:import/{fname}"
            found[volid] = Volume(volid, path, fmt, True, "import", self)
        self._volumes = found
        return found

    def volumes(self) -> list[Volume]:
        return list(self.scan().values())

    async def relist(self) -> None:
        """Bring the listing up to date before a LIST or volume-list; a directory is read when listed."""
        return None

    def lookup(self, volid: str) -> Volume | None:
        """The volume named ``volid`` (rescanning once when it is not known yet), or None."""
        vol = self._volumes.get(volid)
        if vol is None or not os.path.isfile(vol.path):
            vol = self.scan().get(volid)
        return vol


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _scandir(path: str) -> list[os.DirEntry[str]]:
    """The entries of ``path`` by name (none if it cannot be read)."""
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError:
        return []


class PoolOpener(ImageOpener):
    """An ImageOpener that confines the image, its backing chain and data files to one pool root."""

    def __init__(self, root: str | Sequence[str], *, lock: bool = True) -> None:
        super().__init__(lock=lock, allow_probe=True)
        # Several roots serve an operation between pools (a convert from one into another).
        roots = [root] if isinstance(root, str) else list(root)
        self.roots = tuple(os.path.realpath(r) for r in roots)
        self.root = self.roots[0]

    def _within(self, real: str) -> bool:
        return any(is_within(real, r) for r in self.roots)

    def _confine(self, path: str) -> str:
        if "\0" in path:
            raise InvalidArgumentError("file name contains a NUL byte")
        real = os.path.realpath(path)
        if not self._within(real):
            raise PermissionDeniedError(f"'{path}' lies outside the pool root '{self.root}'")
        return real

    def resolve(self, name: str, relative_to: str | None) -> str:
        return self._confine(super().resolve(name, relative_to))

    def host_file(self, path: str, *, read_only: bool) -> HostFile:
        """The confined open; ImageOpener.open_file adds the sync setting and the lock bytes to it."""
        real = self._confine(path)
        hf = HostFile.open(real, read_only=read_only, follow_symlinks=False)
        try:
            # The fd is what we actually use: check where it really points, closing any race with
            # a path component replaced by a symlink after _confine looked at it.
            opened = os.readlink(f"/proc/self/fd/{hf.fd}")
            if not self._within(opened):
                raise PermissionDeniedError(f"'{path}' lies outside the pool root '{self.root}'")
        except BaseException:
            hf.close()
            raise
        return hf

    async def open_backing_file(self, path: str, fmt: str | None, ctx: OpenContext) -> BlockDriver:
        """A backing file without a stored format is opened as its extension says, never probed."""
        if fmt is None:
            fmt = format_of_file(path)
        return await self.open(path, fmt, read_only=True, chain=ctx.chain)

    def open_data_file(self, name: str, ctx: OpenContext) -> HostFile:
        return self.open_file(self.resolve(name, ctx.path), read_only=ctx.read_only)


class DescribingOpener(ImageOpener):
    """Opens an image as an export would (read-write when asked) while touching nothing on disk.

    Every file is opened O_RDONLY and without lock bytes; only the HostFile's ``read_only`` says what was
    asked for, so a driver computes exactly the capabilities (and refuses exactly what) a real open of
    the same mode would, and NBD_OPT_INFO and LIST can describe an export as GO would advertise it
    without blocking a VM. Should a driver try to write while opening or closing, the kernel refuses
    the write (EBADF) and the description fails instead of the disk changing.
    """

    def open_file(self, path: str, *, read_only: bool) -> HostFile:
        hf = super().open_file(path, read_only=True)
        hf.read_only = read_only
        hf.sync_enabled = False  # nothing was written: an fdatasync would only cost time
        return hf


class DescribingPoolOpener(DescribingOpener, PoolOpener):
    """The describing opener confined to a pool root."""


class PoolSet:
    """Every configured pool, addressed by volume ID."""

    def __init__(self, pools: list[Pool] | None = None) -> None:
        self.pools: dict[str, Pool] = {}
        for p in pools or []:
            self.add(p)

    def add(self, pool: Pool) -> None:
        if pool.name in self.pools:
            raise InvalidArgumentError(f"pool '{pool.name}' is defined twice")
        self.pools[pool.name] = pool

    def remove(self, name: str) -> Pool:
        pool = self.pools.pop(name, None)
        if pool is None:
            raise NotFoundError(f"pool '{name}' does not exist")
        return pool

    def volumes(self) -> list[Volume]:
        out: list[Volume] = []
        for p in self.pools.values():
            out.extend(p.volumes())
        return out

    def lookup(self, volid: str) -> Volume | None:
        """The volume for an export name, or None; raises on names that try to leave a pool."""
        check_export_name(volid)
        pool_name, sep, rest = volid.partition(":")
        if not sep:
            return None
        pool = self.pools.get(pool_name)
        if pool is None:
            return None
        if pool.type != "dir":
            return pool.lookup(volid)  # names of its own form (an RBD pool's)
        _vmid, slash, fname = rest.partition("/")
        if not slash or "/" in fname or not fname:
            return None
        return pool.lookup(volid)

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": p.name, "path": p.root, "read-only": p.read_only} for p in self.pools.values()]


def pool_from_config(pc: PoolConfig) -> Pool:
    """The pool a ``[pools.NAME]`` table or a ``--pool`` flag describes."""
    if pc.type == "rbd":
        from .rbdpool import RbdPool

        return RbdPool(pc)
    return Pool(pc.name, pc.path, read_only=pc.read_only, shared=pc.shared)
