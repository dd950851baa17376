"""`snapshot`: list, create, apply and delete the internal snapshots of an image, as qemu-img 7.2 does.

Only qcow2 has internal snapshots. Other formats behave as qemu's block layer makes them: an empty list,
and the errors qemu-img prints for the other actions (its ``-95 (Operation not supported)`` for create
included). The image is opened with the lock bytes qemu-img takes: shared for ``-l`` (``-U`` shares
everything), exclusive writer for the rest, which also opens with no action at all, as qemu-img does.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Literal

from ..driver import RAW_PROBE_WARNING, ImageOpener, image_open_error
from ..errors import BlockError
from .common import ProgressFn, check_cancelled, check_image_path, open_backing_chain, report

Action = Literal["list", "create", "apply", "delete"]


class SnapshotError(BlockError):
    """A snapshot action failed; the message is qemu-img's ``Could not <verb> snapshot 'NAME': ...``."""


@dataclass(slots=True)
class SnapshotResult:
    """What ``snapshot`` did; ``snapshots`` is the table after it, as QAPI SnapshotInfo records."""

    action: Action | None
    name: str | None
    snapshots: list[dict[str, Any]] = field(default_factory=list)


_VERBS = {"create": "create", "apply": "apply", "delete": "delete"}


async def snapshot(path: str, action: Action | None, name: str | None = None, *,
                   opener: ImageOpener | None = None, force_share: bool = False,
                   progress: ProgressFn | None = None, cancel: asyncio.Event | None = None) -> SnapshotResult:
    """Run one snapshot action on ``path`` (format probed: qemu-img's snapshot takes no -f)."""
    opener = opener or ImageOpener(lock=True)
    if force_share:
        opener = opener.sharing()
    read_only = action == "list"
    check_image_path(path, read_only=read_only)
    try:
        hf = opener.open_file(path, read_only=read_only)
    except BlockError as exc:
        raise image_open_error(exc, path) from None
    try:
        spec = opener.image_format(hf, None, path, read_only=read_only)
        # qemu-img opens the image with its backing chain: a backing file that does not open fails
        if spec.name == "qcow2":
            from ..formats.qcow2.headio import read_header

            # qemu-img opens the image (read-write unless it lists), and its chain, before anything
            try:
                await read_header(hf, writable=not read_only)
            except BlockError as exc:
                raise image_open_error(exc, path) from None
            await open_backing_chain(path, spec.name, opener, image_errors=True)
        elif spec.name != "raw":
            await open_backing_chain(path, spec.name, opener)
        check_cancelled(cancel)
        report(progress, 0, 1)
        if spec.name != "qcow2":
            if action == "apply" and spec.name == "raw":
                # qemu's snapshot goto on a driver without snapshots reopens its file, and the probed raw
                # driver warns again on that reopen
                opener.warn(RAW_PROBE_WARNING.format(path=path))
            _not_supported(action, name or "")
            result = SnapshotResult(action, name)
        else:
            from ..formats.qcow2 import snapshot as qs

            try:
                if action == "create":
                    await qs.snapshot_create(hf, name or "")
                elif action == "apply":
                    await qs.snapshot_apply(hf, name or "")
                elif action == "delete":
                    await qs.snapshot_delete(hf, name or "")
            except BlockError as exc:
                assert action is not None
                raise SnapshotError(f"Could not {_VERBS[action]} snapshot '{name}': {exc}") from None
            snaps = await qs.snapshot_list(hf)
            result = SnapshotResult(action, name, [qs.snapshot_info_json(s) for s in snaps])
        report(progress, 1, 1)
        return result
    finally:
        hf.close()


def _not_supported(action: Action | None, name: str) -> None:
    """What qemu-img says for a format without internal snapshots."""
    if action == "create":
        raise SnapshotError(f"Could not create snapshot '{name}': -95 (Operation not supported)")
    if action == "delete":
        raise SnapshotError(f"Could not delete snapshot '{name}': snapshot not found")
    if action == "apply":
        raise SnapshotError(f"Could not apply snapshot '{name}': Block driver does not support snapshots")
    # listing a format without snapshots lists nothing, and no action does nothing
