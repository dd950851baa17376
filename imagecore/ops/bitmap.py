"""`bitmap`: add, remove, clear, enable, disable and merge persistent dirty bitmaps, as qemu-img 7.2 does;
and the bitmap half of `convert --bitmaps`.

Only qcow2 (v3) stores persistent bitmaps. The actions run in the order given on one image opened
read-write without its backing file; the first that fails stops the rest, and what the earlier ones did
is stored all the same (qemu-img's close stores its bitmaps whatever happened). Failures read as
qemu-img's ``Operation OP on bitmap NAME failed: REASON``, with its hint line where it has one. The
changes reach the disk when the image is closed (qcow2/dirty.py stores them crash-safe).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..driver import BlockDriver, ImageOpener, image_open_error
from ..errors import (
    BitmapNotFoundError,
    BlockError,
    ExistsError,
    InvalidArgumentError,
    OperationCancelledError,
    UnsupportedError,
)
from .common import ProgressFn, check_cancelled, check_image_path, report, with_backing
from .info import _no_backing

if TYPE_CHECKING:
    from ..formats.qcow2.dirty import DirtyBitmaps

Action = Literal["add", "remove", "clear", "enable", "disable", "merge"]
ACTIONS: tuple[Action, ...] = ("add", "remove", "clear", "enable", "disable", "merge")

# qemu names the image's node in some messages; its names are counters ("#block123") that differ from run
# to run, so any one is as faithful as another.
NODE_NAME = "#block101"


@dataclass(frozen=True, slots=True)
class BitmapAction:
    """One action; ``source`` is the bitmap a merge reads (in the image, or in ``source_file``)."""

    action: Action
    source: str | None = None


@dataclass(slots=True)
class BitmapResult:
    """The image's bitmaps after the actions, as ``info`` lists them (QAPI Qcow2BitmapInfo)."""

    path: str
    bitmaps: list[dict[str, Any]] = field(default_factory=list)


class BitmapOperationError(BlockError):
    """An action failed: ``Operation OP on bitmap NAME failed: REASON``; errno, class and hint the cause's."""

    hint: str | None = None

    def __init__(self, action: str, name: str, cause: BlockError) -> None:
        super().__init__(f"Operation {action} on bitmap {name} failed: {cause}")
        self.errno = cause.errno
        self.json_class = cause.json_class
        self.hint = getattr(cause, "hint", None)
        self.cause = cause


def check_arguments(actions: list[BitmapAction], *, granularity: int | None, source_file: str | None,
                    source_fmt: str | None) -> None:
    """qemu-img's checks of the command line, in its order and words."""
    if not actions:
        raise InvalidArgumentError("Need at least one of --add, --remove, --clear, --enable, --disable, or "
                                   "--merge")
    kinds = {a.action for a in actions}
    if granularity and "add" not in kinds:
        raise InvalidArgumentError("granularity only supported with --add")
    if source_fmt and not source_file:
        raise InvalidArgumentError("-F only supported with -b")
    if source_file and "merge" not in kinds:
        raise InvalidArgumentError("Merge bitmap source file only supported with --merge")
    for a in actions:
        if a.action not in ACTIONS or (a.action == "merge") != (a.source is not None):
            raise InvalidArgumentError(f"invalid bitmap action {a.action!r}")


async def bitmap(path: str, name: str, actions: list[BitmapAction], *, fmt: str | None = None,
                 granularity: int | None = None, source_file: str | None = None,
                 source_fmt: str | None = None, opener: ImageOpener | None = None,
                 progress: ProgressFn | None = None, cancel: asyncio.Event | None = None) -> BitmapResult:
    """Apply ``actions`` to bitmap ``name`` of ``path``; never prints. ``granularity`` (bytes; None or 0
    for the default, the cluster size within 4 KiB and 64 KiB) is for ``add``."""
    check_arguments(actions, granularity=granularity, source_file=source_file, source_fmt=source_fmt)
    opener = with_backing(opener or ImageOpener(lock=True), _no_backing)
    check_cancelled(cancel)
    drv = await _open(opener, path, fmt, read_only=False)
    failure: BlockError | None = None
    try:
        src = drv
        if source_file is not None:
            src = await _open(opener, source_file, source_fmt, read_only=True)
        try:
            for i, act in enumerate(actions):
                report(progress, i, len(actions))
                try:
                    await _apply(drv, src, name, act, granularity)
                except BlockError as exc:
                    failure = BitmapOperationError(act.action, name, exc)
                    break
        finally:
            if src is not drv:
                await src.close()
    finally:
        await drv.close()  # what the actions before a failure did is stored all the same
    if failure is not None:
        raise failure
    report(progress, len(actions), len(actions))
    return BitmapResult(path, [b.info() for b in getattr(drv, "bitmaps", [])])


async def _open(opener: ImageOpener, path: str, fmt: str | None, *, read_only: bool) -> BlockDriver:
    """Open as qemu-img does: every refusal reads ``Could not open 'PATH': ...``."""
    check_image_path(path, read_only=read_only)
    try:
        return await opener.open(path, fmt, read_only=read_only)
    except OperationCancelledError:
        raise
    except BlockError as exc:
        image_open_error(exc, path)
        raise


def tracker_of(drv: BlockDriver) -> DirtyBitmaps | None:
    """The persistent bitmaps of an open image: qcow2's, None for formats without any."""
    make = getattr(drv, "bitmap_tracker", None)
    if make is None:
        return None
    tracker: DirtyBitmaps = make()
    return tracker


async def _apply(drv: BlockDriver, src: BlockDriver, name: str, act: BitmapAction,
                 granularity: int | None) -> None:
    t = tracker_of(drv)
    if act.action == "add":
        add_bitmap(drv, name, granularity)
        return
    if t is None:
        raise BitmapNotFoundError(f"Dirty bitmap '{name}' not found")
    if act.action == "remove":
        t.remove(name)
    elif act.action == "clear":
        t.clear(name)
    elif act.action in ("enable", "disable"):
        t.enable(name, act.action == "enable")
    else:
        assert act.source is not None
        t.usable(name)
        s = tracker_of(src)
        if s is None or s.find(act.source) is None:
            raise BitmapNotFoundError(f"Dirty bitmap '{act.source}' not found")
        await t.merge(name, s, act.source)


def add_bitmap(drv: BlockDriver, name: str, granularity: int | None, *, disabled: bool = False) -> None:
    """block-dirty-bitmap-add of a persistent bitmap, with qemu's checks in its order and words."""
    if not name:
        raise InvalidArgumentError("Bitmap name cannot be empty")
    if granularity:
        # QMP's granularity is 32 bits wide: qemu-img's value is cut to them before it is checked
        granularity &= 0xFFFFFFFF
        if granularity < 512 or granularity & (granularity - 1):
            raise InvalidArgumentError("Granularity must be power of 2 and at least 512")
    t = tracker_of(drv)
    if t is None:
        raise UnsupportedError(f"Can't store persistent bitmaps to {NODE_NAME}: Operation not supported")
    if t.find(name) is not None:
        raise ExistsError(f"Bitmap already exists: {name}")
    if not granularity:
        from ..formats.qcow2.bitmaps import default_granularity

        granularity = default_granularity(t.cs)
    why = t.can_store(name, granularity)
    if why is not None:
        raise UnsupportedError(f"Can't make bitmap '{name}' persistent in '{NODE_NAME}': {why}")
    t.add(name, granularity, disabled=disabled)


# -- convert --bitmaps ----------------------------------------------------------------------------------

class ConvertBitmapsError(BlockError):
    """convert --bitmaps refused or failed; ``hint`` is qemu-img's second line where it has one."""

    hint: str | None = None


def check_convert_source(sources: list[BlockDriver], *, skip_broken: bool) -> None:
    """qemu-img's convert_check_bitmaps, after the sources are open and before the target is made."""
    if len(sources) > 1:
        raise ConvertBitmapsError("Copying bitmaps only possible with single source")
    t = tracker_of(sources[0])
    if t is None or not getattr(sources[0], "v3", False):
        raise ConvertBitmapsError("Source lacks bitmap support")
    for bm in reversed(t.bitmaps):  # qemu walks them newest first: of two, it names the later one
        if bm.inconsistent and not skip_broken:
            exc = ConvertBitmapsError(f"Cannot copy inconsistent bitmap '{bm.name}'")
            exc.hint = "Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it"
            raise exc


def check_convert_target(target: BlockDriver, fmt: str) -> None:
    """After the target is open: it must store persistent bitmaps (a v3 qcow2)."""
    if tracker_of(target) is None or not getattr(target, "v3", False):
        raise ConvertBitmapsError(f"Format driver '{fmt}' does not support bitmaps")


async def copy_bitmaps(source: BlockDriver, target: BlockDriver, *, skip_broken: bool,
                       warn: Callable[[str], None] | None = None) -> list[str]:
    """convert_copy_bitmaps: each persistent bitmap of ``source`` added to ``target`` (same granularity,
    enabled or not) and filled from it; inconsistent ones skipped with a warning when ``skip_broken``.
    Returns the names copied; the target stores them when it is closed.

    qemu walks the bitmaps newest first: of several that the target has already, the last one of the
    source's directory is the one its error names, and the ones walked before a failure stay copied.
    They are stored in the source's order either way.
    """
    src = tracker_of(source)
    dst = tracker_of(target)
    assert src is not None and dst is not None
    copied: list[str] = []
    try:
        for bm in reversed(src.bitmaps):
            if bm.inconsistent and skip_broken:
                if warn is not None:
                    warn(f"Skipping inconsistent bitmap '{bm.name}'")
                continue
            try:
                if dst.find(bm.name) is not None:
                    raise ExistsError(f"Bitmap already exists: {bm.name}")
                why = dst.can_store(bm.name, bm.granularity)
                if why is not None:
                    raise UnsupportedError(f"Can't make bitmap '{bm.name}' persistent in '{NODE_NAME}': "
                                           f"{why}")
                dst.add(bm.name, bm.granularity, disabled=not bm.enabled)
            except BlockError as exc:
                raise ConvertBitmapsError(f"Failed to create bitmap {bm.name}: {exc}") from None
            try:
                await dst.merge(bm.name, src, bm.name)
            except BlockError as exc:
                dst.remove(bm.name)
                raise ConvertBitmapsError(f"Failed to populate bitmap {bm.name}: {exc}") from None
            copied.append(bm.name)
    finally:
        order = {b.name: i for i, b in enumerate(src.bitmaps)}
        dst.bitmaps.sort(key=lambda b: (b.name in copied, order.get(b.name, 0) if b.name in copied else 0))
    return sorted(copied, key=order.__getitem__)
