"""`info`: QAPI ImageInfo records for an image (and its backing chain); human_info renders qemu-img's text."""

from __future__ import annotations

import asyncio
import copy
import datetime
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ..driver import MAX_CHAIN_DEPTH, BlockDriver, Capabilities, ImageOpener, OpenContext, image_open_error
from ..errors import BlockError, ImageFormatError, OperationCancelledError, ReadOnlyError, UnsupportedError
from ..extent import Extent
from .common import (
    BackingFn,
    ProgressFn,
    check_cancelled,
    open_image,
    qdict_order,
    report,
    size_to_str,
    with_backing,
)


class _UnopenedBacking(BlockDriver):
    """Stands in for a backing file that plain `info` does not open (qemu-img uses BDRV_O_NO_BACKING)."""

    format_name = "none"

    def __init__(self, path: str) -> None:
        self.filename = path
        self.size = 0
        self.backing = None
        self.caps = Capabilities(writable=False)

    async def readinto(self, offset: int, buf: memoryview) -> None:
        buf[:] = bytes(len(buf))

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        raise ReadOnlyError("backing file is not open")

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool,
                           fua: bool = False) -> None:
        raise ReadOnlyError("backing file is not open")

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        raise ReadOnlyError("backing file is not open")

    async def flush(self) -> None:
        return None

    async def extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        if length > 0:
            yield Extent(offset, length, data=False, zero=True, present=False)

    async def close(self) -> None:
        return None


def _no_backing(opener: ImageOpener, plain: BackingFn) -> BackingFn:
    async def open_backing(name: str, fmt: str | None, ctx: OpenContext) -> BlockDriver:
        try:
            return _UnopenedBacking(opener.resolve(name, ctx.path))
        except UnsupportedError:
            return _UnopenedBacking("")  # no folder to resolve it in (an NBD image): no actual path
    return open_backing


@dataclass(slots=True)
class InfoResult:
    """The ImageInfo records of ``info``, the image first, then (with ``backing_chain``) each backing file."""

    images: list[dict[str, Any]]
    backing_chain: bool = False

    def to_json(self) -> dict[str, Any] | list[dict[str, Any]]:
        """What ``info --output=json`` prints: one record, or the list of the chain's records."""
        return self.images if self.backing_chain else self.images[0]


def snapshot_list(drv: BlockDriver) -> list[dict[str, Any]]:
    """The driver's snapshots as QAPI SnapshotInfo objects (empty for formats without snapshots)."""
    return drv.snapshot_info()


def display_name(drv: BlockDriver) -> str:
    """The image's name as qemu's bdrv_refresh_filename gives it: its file, or a json: name when an
    options tree gave it a secret."""
    if not drv.secret_options:
        return drv.filename
    import json

    tree = {"driver": drv.format_name, "file": {"driver": "file", "filename": drv.filename},
            **drv.secret_options}
    return "json:" + json.dumps(qdict_order(tree))


def image_info(drv: BlockDriver) -> dict[str, Any]:
    """ImageInfo members in QAPI declaration order (the order qemu inserts them)."""
    info: dict[str, Any] = {"filename": display_name(drv), "format": drv.format_name}
    if drv.reports_dirty:
        info["dirty-flag"] = drv.is_dirty()
    files = {os.fstat(hf.fd)[1:3]: hf for hf in drv.host_files() if hf.local}
    if files:
        info["actual-size"] = sum(hf.allocated_size() for hf in files.values())
    if getattr(drv, "encrypted", False):
        info["encrypted"] = True
    info["virtual-size"] = drv.size
    cluster = drv.cluster_size()
    if cluster is not None:
        info["cluster-size"] = cluster
    if drv.is_encrypted():
        info["encrypted"] = True
    bname = drv.backing_filename()
    if bname:
        info["backing-filename"] = bname
        if drv.backing is not None and drv.backing.filename:
            info["full-backing-filename"] = drv.backing.filename
        bfmt = drv.backing_format()
        if bfmt:
            info["backing-filename-format"] = bfmt
    snaps = snapshot_list(drv)
    if snaps:
        info["snapshots"] = snaps
    spec = drv.format_specific()
    if spec is not None:
        info["format-specific"] = spec
    return info


def _snapshot_line(s: dict[str, Any]) -> str:
    date = datetime.datetime.fromtimestamp(int(s.get("date-sec", 0))).strftime("%Y-%m-%d %H:%M:%S")
    nsec = int(s.get("vm-clock-sec", 0)) * 1_000_000_000 + int(s.get("vm-clock-nsec", 0))
    secs = nsec // 1_000_000_000
    clock = "%02d:%02d:%02d.%03d" % (secs // 3600, (secs // 60) % 60, secs % 60,  # noqa: UP031
                                     (nsec // 1_000_000) % 1000)
    icount = str(s["icount"]) if "icount" in s else ""
    return "%-9s %-16s %8s%20s%13s%11s" % (s.get("id", ""), s.get("name", ""),  # noqa: UP031
                                            size_to_str(int(s.get("vm-state-size", 0))), date, clock,
                                            icount)


def snapshot_table(snaps: list[dict[str, Any]]) -> list[str]:
    """qemu's dump_snapshots: the lines of ``info`` and ``snapshot -l`` for a non-empty snapshot list."""
    lines = ["Snapshot list:",
             "%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")]  # noqa: UP031
    return lines + [_snapshot_line(s) for s in snaps]


def _dump_value(indent: int, value: Any) -> list[str]:
    lines: list[str] = []
    if isinstance(value, dict):
        for key, v in qdict_order(value).items():
            name = key.replace("-", " ")
            if isinstance(v, dict | list):
                lines.append(f"{' ' * (indent * 4)}{name}:")
                lines += _dump_value(indent + 1, v)
            else:
                lines.append(f"{' ' * (indent * 4)}{name}: {_scalar(v)}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if isinstance(v, dict | list):
                lines.append(f"{' ' * (indent * 4)}[{i}]:")
                lines += _dump_value(indent + 1, v)
            else:
                lines.append(f"{' ' * (indent * 4)}[{i}]: {_scalar(v)}")
    return lines


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def human_info(info: dict[str, Any]) -> str:
    """qemu-img's human form of one ImageInfo."""
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
        "disk size: " + (size_to_str(info["actual-size"]) if "actual-size" in info else "unavailable"),
    ]
    if info.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines += snapshot_table(info["snapshots"])
    spec = info.get("format-specific")
    if isinstance(spec, dict):
        data = spec.get("data")
        if data:
            lines.append("Format specific information:")
            lines += _dump_value(1, data)
    return "\n".join(lines) + "\n"


async def info(path: str, fmt: str | None, *, opener: ImageOpener | None = None, backing_chain: bool = False,
               force_share: bool = False, progress: ProgressFn | None = None,
               cancel: asyncio.Event | None = None) -> InfoResult:
    """Describe ``path``; without ``backing_chain`` its backing file is named but never opened.

    ``opener`` defaults to the CLI's; a given one is copied, so that its confinement and lock settings
    apply while its own object stays as it was. Progress counts the images described.
    """
    check_cancelled(cancel)
    # qemu-img info holds no permission on the image, but shares neither write nor resize (unless -U).
    if opener is None:
        base = ImageOpener(lock=True, force_share=force_share, consistent_read=False)
    else:
        base = copy.copy(opener)
        base.consistent_read = False
        base.force_share = base.force_share or force_share
    # qemu-img opens every image it describes alone (BDRV_O_NO_BACKING), the chain one image after
    # another: a backing file that does not open fails as that image, "Could not open 'BACKING': ...".
    # A backing file is opened all the same by the opener's own open_backing (a pool's opener pins its
    # format by its name, never probing it), with that image's backing file left unopened in turn.
    layer_open: list[BackingFn] = []

    def keep_plain(opener: ImageOpener, plain: BackingFn) -> BackingFn:
        layer_open.append(plain)
        return _no_backing(opener, plain)

    use = with_backing(base, keep_plain)
    # BDRV_O_NO_IO, as qemu-img info opens: no data is read (so an image needs no data file)
    drv = await open_image(path, fmt, read_only=True, opener=use, options={"no_io": True})
    infos: list[dict[str, Any]] = []
    seen = {drv.filename}
    while True:
        try:
            infos.append(image_info(drv))
            stored = drv.backing_filename() if backing_chain and drv.backing is not None else None
            parent = OpenContext(opener=use, read_only=True, path=drv.filename)
            name = drv.backing.filename if stored and drv.backing is not None else None
            bfmt = drv.backing_format()
        finally:
            await close_chain(drv)
        report(progress, len(infos), len(infos) + (name is not None))
        if stored is None or name is None:
            return InfoResult(infos, backing_chain)
        check_cancelled(cancel)
        if name in seen:
            raise ImageFormatError(f"Backing file '{name}' creates an infinite loop.")
        if len(seen) >= MAX_CHAIN_DEPTH:
            raise ImageFormatError(f"backing chain of '{path}' is deeper than {MAX_CHAIN_DEPTH}")
        seen.add(name)
        try:
            drv = await layer_open[0](stored, bfmt, parent)
        except OperationCancelledError:
            raise
        except BlockError as exc:
            # the backing file fails as the image qemu-img opens it as: its own name, not a backing file's
            exc.message = exc.message.removeprefix("Could not open backing file: ")
            raise image_open_error(exc, name) from None


async def close_chain(drv: BlockDriver) -> None:
    """Close an image; drivers close their own backing files, so only the top is closed here."""
    await drv.close()
