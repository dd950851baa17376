"""Ceph RBD pools: images of a RADOS pool (and optional RBD namespace) served as pool volumes, with
Proxmox VE's RBD naming, and the volume operations the admin socket runs on them.

Names follow Proxmox VE's RBD storage: a VM's disks are ``vm-<VMID>-disk-<N>``, a template's
``base-<VMID>-disk-<N>`` with a protected snapshot ``__base__``, and a linked clone is an RBD clone of
that snapshot. Volume IDs keep the pool prefix: ``<pool>:vm-100-disk-0``, and a linked clone is also
found by Proxmox's ``<pool>:base-100-disk-0/vm-101-disk-0``. Every image is raw.

Every node that serves the pool sees the same images (RADOS is the shared store), so a pool is shared by
nature: what keeps one image from being written by two nodes is its exclusive lock, which the driver
takes for every writable open (imagecore.rbd). Names are reserved by RBD's create, which fails with
EEXIST when another node took the name first.

Nothing blocks the event loop: the listing is refreshed off the loop and kept, so that the synchronous
lookups of the export registry answer from it; a name not listed yet is still looked up by its form and
the open tells whether the image exists.
"""

from __future__ import annotations

import asyncio
import errno
import re
from dataclasses import dataclass
from typing import Any

from imagecore.driver import BlockDriver
from imagecore.errors import (
    BlockError,
    BusyError,
    ExistsError,
    HostIOError,
    ImageLockedError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnsupportedError,
)
from imagecore.rbd import Cluster, RbdDriver, blocking, modules

from .config import PoolConfig
from .pools import _POOL_NAME, Pool, Volume

BASE_SNAPSHOT = "__base__"  # Proxmox VE's name for a template's protected snapshot
_IMAGE = re.compile(r"(vm|base)-([1-9][0-9]{0,9})-([A-Za-z0-9][A-Za-z0-9_.+-]*)")
MAX_DISK_INDEX = 4096


@dataclass(frozen=True, slots=True)
class RbdVolume(Volume):
    """A volume of an RBD pool: ``image`` is its RBD image name."""

    image: str = ""

    def realpath(self) -> str:
        return self.path

    async def open(self, *, read_only: bool, lock: bool = True, describe: bool = False) -> BlockDriver:
        pool = self.pool
        assert isinstance(pool, RbdPool)
        cluster = await pool.cluster()
        return await RbdDriver.open(cluster, self.image, read_only=read_only or self.read_only,
                                    snapshot=self.snapshot, lock=lock, describe=describe)


class RbdPool(Pool):
    """A pool of RBD images (a Pool to its callers; ``root`` names the RADOS pool, never a directory)."""

    type = "rbd"
    shared = True

    def __init__(self, pc: PoolConfig) -> None:  # Pool's own would look for a directory
        if not _POOL_NAME.fullmatch(pc.name):
            raise InvalidArgumentError(f"invalid pool name '{pc.name}'")
        modules()  # refuse the pool at start when librbd's binding is missing
        assert pc.rbd_pool is not None
        self.name = pc.name
        self.read_only = pc.read_only
        self.config = pc
        ns = f"{pc.namespace}/" if pc.namespace else ""
        self.root = f"rbd:{pc.rbd_pool}/{ns}"  # what query-pools shows as its path; never a directory
        self._cluster: Cluster | None = None
        self._connecting = asyncio.Lock()
        self._images: list[str] = []
        self._refreshing: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"RbdPool({self.name!r}, {self.root!r})"

    def same_place(self, pc: PoolConfig) -> bool:
        c = self.config
        return (pc.type, pc.rbd_pool, pc.namespace, pc.ceph_conf, pc.client) == (
            c.type, c.rbd_pool, c.namespace, c.ceph_conf, c.client)

    async def cluster(self) -> Cluster:
        async with self._connecting:
            if self._cluster is None:
                c = self.config
                assert c.rbd_pool is not None
                self._cluster = await Cluster.connect(conf=c.ceph_conf, client=c.client, pool=c.rbd_pool,
                                                      namespace=c.namespace)
            return self._cluster

    async def close(self) -> None:
        if self._cluster is not None:
            cluster, self._cluster = self._cluster, None
            await cluster.close()

    # -- names and listing --------------------------------------------------------------------------
    def volume(self, image: str) -> RbdVolume:
        m = _IMAGE.fullmatch(image)
        assert m is not None
        kind = "base" if m.group(1) == "base" else "images"
        return RbdVolume(f"{self.name}:{image}", f"{self.root}{image}", "raw",
                         self.read_only or kind == "base", kind, self, image=image)

    def lookup(self, volid: str) -> RbdVolume | None:
        """``<pool>:<image>`` or Proxmox's linked-clone form ``<pool>:<base>/<image>``; the image must
        exist, which the open (or a listing) tells."""
        _, _, rest = volid.partition(":")
        base, slash, image = rest.partition("/")
        if not slash:
            image, base = base, ""
        if not _IMAGE.fullmatch(image):
            return None
        if base and not (_IMAGE.fullmatch(base) and base.startswith("base-")):
            return None
        return self.volume(image)

    async def refresh(self) -> list[str]:
        """List the pool's images (off the loop) and keep the list for :meth:`volumes`."""
        _, rbd = modules()
        cluster = await self.cluster()
        names = await blocking(rbd.RBD().list, cluster.ioctx, what=f"cannot list RBD pool '{self.name}'")
        self._images = sorted(n for n in names if _IMAGE.fullmatch(n))
        return self._images

    async def relist(self) -> None:
        await self.refresh()

    def scan(self) -> dict[str, Volume]:
        return {v.volid: v for v in self.volumes()}

    def volumes(self) -> list[Volume]:
        """The images as last listed; a listing is started off the loop for the next caller."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None and (self._refreshing is None or self._refreshing.done()):
            async def refresh() -> None:
                try:
                    await self.refresh()
                except BlockError:
                    pass
            self._refreshing = loop.create_task(refresh())
        return [self.volume(n) for n in self._images]

    async def status(self) -> dict[str, Any]:
        """query-pools' record: the RADOS pool's usage against the cluster's space."""
        rec: dict[str, Any] = {"name": self.name, "path": self.root, "type": "rbd", "shared": True,
                               "content": ["images"], "formats": ["raw"], "read-only": self.read_only}
        try:
            cluster = await self.cluster()
            stats = await blocking(cluster.rados.get_cluster_stats)
            used = await blocking(cluster.ioctx.get_stats)
            total = int(stats["kb"]) * 1024
            rec.update(total=total, used=int(used["num_bytes"]), available=int(stats["kb_avail"]) * 1024,
                       active=True)
        except BlockError:
            rec.update(total=0, used=0, available=0, active=False)
        return rec

    # -- volume operations (the admin socket's, on RBD) ---------------------------------------------
    def _writable(self) -> None:
        if self.read_only:
            raise PermissionDeniedError(f"pool '{self.name}' is read-only")

    async def _create(self, vmid: int, name: str | None, make: Any) -> str:
        """Reserve a name as ``make(name)`` creates the image: RBD refuses one that exists (EEXIST), so two
        nodes allocating at once get different names."""
        taken = set(await self.refresh())
        if name is not None:
            if not name.startswith(f"vm-{vmid}-") or not _IMAGE.fullmatch(name):
                raise InvalidArgumentError(f"illegal name '{name}' - should be 'vm-{vmid}-*'")
            candidates = [name]
        else:
            candidates = [f"vm-{vmid}-disk-{n}" for n in range(MAX_DISK_INDEX)]
        for image in candidates:
            if image in taken or "base-" + image[3:] in taken:
                continue
            try:
                await make(image)
            except HostIOError as exc:
                if exc.errno == errno.EEXIST:
                    continue
                raise
            self._images = sorted({*self._images, image})
            return image
        if name is not None:
            raise ExistsError(f"volume '{name}' already exists")
        raise InvalidArgumentError(f"unable to allocate a disk name for VM {vmid}")

    async def alloc(self, vmid: int, size: int, name: str | None) -> dict[str, Any]:
        self._writable()
        _, rbd = modules()
        cluster = await self.cluster()

        async def make(image: str) -> None:
            # RBD's default features: layering, exclusive-lock, object-map, fast-diff, deep-flatten
            await blocking(rbd.RBD().create, cluster.ioctx, image, size, old_format=False,
                           what=f"cannot create RBD image '{image}'")
        image = await self._create(vmid, name, make)
        return {"volid": f"{self.name}:{image}", "path": f"{self.root}{image}", "format": "raw",
                "size": size}

    async def _held(self, image: str, rbd: Any) -> Any:
        """Open ``image`` writable with its exclusive lock: proof that no node and no VM uses it."""
        cluster = await self.cluster()
        try:
            drv = await RbdDriver.open(cluster, image, read_only=False)
        except ImageLockedError as exc:
            raise BusyError(f"volume '{self.name}:{image}' is in use: {exc}") from None
        return drv

    async def free(self, vol: Volume) -> None:
        self._writable()
        _, rbd = modules()
        cluster = await self.cluster()
        image = vol.path[len(self.root):]
        children = await self.children(image)
        if children:
            raise BusyError(f"base volume '{vol.volid}' is still in use by linked clones: "
                            + ", ".join(children))
        drv = await self._held(image, rbd)
        try:
            snaps = await blocking(lambda: list(drv.image.list_snaps()))
            for snap in snaps:
                if await blocking(drv.image.is_protected_snap, snap["name"]):
                    await blocking(drv.image.unprotect_snap, snap["name"])
                await blocking(drv.image.remove_snap, snap["name"])
        finally:
            await drv.close()
        await blocking(rbd.RBD().remove, cluster.ioctx, image, what=f"cannot remove RBD image '{image}'")
        self._images = [n for n in self._images if n != image]

    async def children(self, image: str) -> list[str]:
        """The linked clones of a template (the children of its ``__base__`` snapshot)."""
        if not image.startswith("base-"):
            return []
        cluster = await self.cluster()
        _, rbd = modules()

        def kids() -> list[str]:
            with rbd.Image(cluster.ioctx, image, snapshot=BASE_SNAPSHOT, read_only=True) as img:
                return [f"{self.name}:{c['image']}" for c in img.list_children2()]
        try:
            return await blocking(kids)
        except NotFoundError:
            return []

    async def template(self, vmid: int) -> list[str]:
        """Proxmox's `qm template` on RBD: each vm-VMID-* image renamed base-VMID-*, snapshotted as
        ``__base__`` and the snapshot protected (clones need a protected snapshot)."""
        self._writable()
        _, rbd = modules()
        cluster = await self.cluster()
        disks = [n for n in await self.refresh() if n.startswith(f"vm-{vmid}-")]
        if not disks:
            raise NotFoundError(f"VM {vmid} has no disks in pool '{self.name}'")
        done = []
        for image in disks:
            drv = await self._held(image, rbd)
            await drv.close()
            base = "base-" + image[3:]
            await blocking(rbd.RBD().rename, cluster.ioctx, image, base, what=f"cannot rename '{image}'")

            def snap(name: str = base) -> None:
                with rbd.Image(cluster.ioctx, name) as img:
                    img.create_snap(BASE_SNAPSHOT)
                    img.protect_snap(BASE_SNAPSHOT)
            await blocking(snap, what=f"cannot snapshot '{base}'")
            done.append(f"{self.name}:{base}")
        await self.refresh()
        return done

    async def clone_linked(self, base: Volume, vmid: int, name: str | None) -> dict[str, Any]:
        self._writable()
        if base.kind != "base":
            raise InvalidArgumentError(f"'{base.volid}' is not a template (base-) volume; linked clones are "
                                       "made only of templates")
        _, rbd = modules()
        cluster = await self.cluster()
        parent = base.path[len(self.root):]

        async def make(image: str) -> None:
            await blocking(rbd.RBD().clone, cluster.ioctx, parent, BASE_SNAPSHOT, cluster.ioctx, image,
                           what=f"cannot clone '{parent}'")
        image = await self._create(vmid, name, make)
        return {"volid": f"{self.name}:{parent}/{image}", "path": f"{self.root}{image}", "format": "raw",
                "backing-file": f"{self.root}{parent}@{BASE_SNAPSHOT}"}

    async def clone_full(self, src: Volume, vmid: int, name: str | None) -> dict[str, Any]:
        """A full copy (librbd's deep copy of the image's data) as the next vm-VMID-disk-N."""
        self._writable()
        _, rbd = modules()
        cluster = await self.cluster()
        source = src.path[len(self.root):]

        async def make(image: str) -> None:
            def copy() -> None:
                with rbd.Image(cluster.ioctx, source, read_only=True) as img:
                    img.copy(cluster.ioctx, image)
            await blocking(copy, what=f"cannot copy '{source}'")
        image = await self._create(vmid, name, make)
        return {"volid": f"{self.name}:{image}", "path": f"{self.root}{image}", "format": "raw"}

    async def resize(self, vol: Volume, size: int, shrink: bool) -> dict[str, Any]:
        self._writable()
        _, rbd = modules()
        drv = await self._held(vol.path[len(self.root):], rbd)
        try:
            old = drv.size
            if size < old and not shrink:
                raise InvalidArgumentError("Use the --shrink option to perform a shrink operation.")
            await blocking(drv.image.resize, size, allow_shrink=shrink, what="cannot resize")
        finally:
            await drv.close()
        return {"volid": vol.volid, "old-size": old, "size": size}

    async def snapshot(self, vol: Volume, action: str, name: str | None) -> list[dict[str, Any]]:
        """Snapshots of an RBD image: list, create, apply (rollback) or delete; the list afterwards."""
        _, rbd = modules()
        cluster = await self.cluster()
        image = vol.path[len(self.root):]
        if action != "list":
            self._writable()
            if vol.read_only:
                raise PermissionDeniedError(f"volume '{vol.volid}' is read-only")
            if name == BASE_SNAPSHOT:
                raise PermissionDeniedError(f"snapshot '{BASE_SNAPSHOT}' belongs to the template")
            drv = await self._held(image, rbd)
            try:
                if action == "create":
                    await blocking(drv.image.create_snap, name, what="cannot create snapshot")
                elif action == "apply":
                    await blocking(drv.image.rollback_to_snap, name, what="cannot roll back")
                elif action == "delete":
                    await blocking(drv.image.remove_snap, name, what="cannot delete snapshot")
                else:
                    raise UnsupportedError(f"unknown snapshot action '{action}'")
            finally:
                await drv.close()

        def listing() -> list[dict[str, Any]]:
            with rbd.Image(cluster.ioctx, image, read_only=True) as img:
                out = []
                for i, s in enumerate(img.list_snaps()):
                    ts = img.get_snap_timestamp(s["id"])
                    out.append({"id": str(i + 1), "name": s["name"], "vm-state-size": 0,
                                "date-sec": int(ts.timestamp()), "date-nsec": 0, "vm-clock-sec": 0,
                                "vm-clock-nsec": 0, "size": int(s["size"])})
                return out
        return await blocking(listing, what=f"cannot list the snapshots of '{image}'")
