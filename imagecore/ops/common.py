"""Helpers shared by the offline verbs: sizes, -o option lists, qemu-style JSON and human sizes, opening,
and the progress and cancellation conventions every verb follows.

A verb never prints: it returns a result, reports progress through a ``ProgressFn`` and stops at a safe
point when its cancellation event is set. ``imagecore.cli`` renders results as qemu-img does; the admin
socket's job worker turns them into JSON.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ..driver import BlockDriver, CreateOption, ImageOpener, OpenContext, image_open_error
from ..errors import (
    BlockError,
    InvalidArgumentError,
    NotFoundError,
    OperationCancelledError,
    SnapshotNotFoundError,
    UnsupportedError,
)
from ..filenames import is_special, split_qemu_opts
from ..hostio import HostFile
from ..units import INT64_MAX as INT64_MAX
from ..units import SIZE_HELP as SIZE_HELP
from ..units import parse_size as parse_size

split_options = split_qemu_opts  # the one QemuOpts splitter (imagecore.filenames), under the verbs' name

# qemu's cache modes, as bdrv_parse_cache_mode takes them (-t and -T)
CACHE_MODES = ("none", "off", "writeback", "unsafe", "directsync", "writethrough")

# (done, total) in the verb's own units: bytes for convert, images for info, entries' bytes for map.
ProgressFn = Callable[[int, int], None]

def snapshot_param(text: str) -> dict[str, str]:
    """A -l argument (convert, measure): ``snapshot.id=ID``/``snapshot.name=NAME`` (all given must match),
    else an id or a name."""
    if not text.startswith("snapshot."):
        return {"id-or-name": text}
    wanted: dict[str, str] = {}
    for key, value in split_options(text):
        if key not in ("snapshot.id", "snapshot.name") or value is None:
            raise InvalidArgumentError(
                f"Invalid parameter '{key}'\nFailed in parsing snapshot param '{text}'")
        wanted[key.removeprefix("snapshot.")] = value
    return wanted


def is_help_request(options: Iterable[tuple[str, str | None]]) -> bool:
    return any(key in ("help", "?") and value is None for key, value in options)


def escape_option(value: str) -> str:
    return value.replace(",", ",,")


# -- qemu's JSON output -----------------------------------------------------------------------------------

def _qdict_bucket(key: str) -> int:
    data = key.encode()
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, c in enumerate(data):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512


def qdict_order(obj: Any) -> Any:
    """Reorder dict keys the way qemu 7.2's QDict iterates them (hash buckets; newest first in a bucket).

    The input dicts must be in QAPI declaration order, which is the order qemu inserts members.
    """
    if isinstance(obj, dict):
        keyed = [(_qdict_bucket(k), -i, k, v) for i, (k, v) in enumerate(obj.items())]
        keyed.sort(key=lambda t: (t[0], t[1]))
        return {k: qdict_order(v) for _, _, k, v in keyed}
    if isinstance(obj, list):
        return [qdict_order(v) for v in obj]
    return obj


def qemu_json(obj: Any) -> str:
    """Pretty JSON as qemu-img prints it (4-space indent, QDict key order), without the final newline."""
    return _pretty(qdict_order(obj), 0)


def _pretty(value: Any, level: int) -> str:
    """qobject_to_json_pretty: json.dumps(indent=4) but for empty containers, which qemu still opens
    onto a line of their own (``[`` newline, indent, ``]``)."""
    pad = "    "
    if isinstance(value, dict):
        items = [f"\n{pad * (level + 1)}{qemu_string(k)}: {_pretty(v, level + 1)}" for k, v in value.items()]
        return "{" + ",".join(items) + "\n" + pad * level + "}"
    if isinstance(value, list):
        items = [f"\n{pad * (level + 1)}{_pretty(v, level + 1)}" for v in value]
        return "[" + ",".join(items) + "\n" + pad * level + "]"
    if isinstance(value, str):
        return qemu_string(value)
    return json.dumps(value)


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def qemu_string(text: str) -> str:
    """A JSON string as qemu's to_json writes it: control characters, DEL and everything past ASCII as
    ``\\uXXXX`` in upper-case hex (astral characters as a surrogate pair), and bytes that were not UTF-8
    (surrogate-escaped in a file name) as U+FFFD."""
    out = ['"']
    for ch in text:
        c = ord(ch)
        esc = _ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif 0x20 <= c < 0x7F:
            out.append(ch)
        elif c > 0xFFFF:
            c -= 0x10000
            out.append(f"\\u{0xD800 | c >> 10:04X}\\u{0xDC00 | c & 0x3FF:04X}")
        else:
            out.append(f"\\u{0xFFFD if 0xD800 <= c < 0xE000 else c:04X}")
    out.append('"')
    return "".join(out)


def size_to_str(value: int) -> str:
    """qemu's size_to_str: three significant digits and a binary unit (``1 GiB``, ``132 KiB``)."""
    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    _, exp = math.frexp(value / (1000.0 / 1024.0))
    i = int((exp - 1) / 10)
    i = max(0, min(i, len(suffixes) - 1))
    div = 1 << (i * 10)
    return "%0.3g %sB" % (value / div, suffixes[i])  # noqa: UP031 - C printf semantics are the point


def option_line(opt: CreateOption) -> str:
    kind = {"size": "<size>", "bool": "<bool (on/off)>", "number": "<num>"}.get(opt.type, "<str>")
    return f"  {opt.name + '=' + kind:<22} - {opt.help}"


# -- opening ------------------------------------------------------------------------------------------

async def open_image(path: str, fmt: str | None, *, read_only: bool = True,
                     opener: ImageOpener | None = None, options: dict[str, Any] | None = None) -> BlockDriver:
    """Open an image a verb names, as qemu-img's img_open does: every failure (the image's own, or one of
    its backing chain, ``Could not open backing file: ...``) reads ``Could not open 'PATH': ...``.
    ``options`` go to the format (``snapshot``: show an internal snapshot instead of the active image)."""
    check_image_path(path, read_only=read_only)
    try:
        return await (opener or ImageOpener()).open(path, fmt, read_only=read_only, options=options)
    except (OperationCancelledError, SnapshotNotFoundError):
        raise  # a snapshot is loaded once the image is open, in qemu: not an open error
    except BlockError as exc:
        image_open_error(exc, path)
        raise


def require_snapshot_loaded(drv: BlockDriver) -> None:
    """After an open that asked for an internal snapshot: refuse a format that cannot show one, as
    qemu's bdrv_snapshot_load_tmp does."""
    if getattr(drv, "snapshot_loaded", None) is None:
        raise UnsupportedError(f"Failed to load snapshot: Block format '{drv.format_name}' used by device '' "
                               "does not support temporarily loading internal snapshots")


def check_image_path(path: str, *, read_only: bool) -> None:
    """Refuse a path that cannot be an image, with qemu's messages: its file driver words a directory
    differently for a read-only open (``'file' driver requires ...``) than for a read-write one.
    A special name (``json:``, ``--image-opts``, an NBD URL) is checked when it is opened."""
    if is_special(path):
        return
    if not os.path.lexists(path):
        raise image_open_error(NotFoundError(f"Could not open '{path}': No such file or directory"), path)
    if os.path.isdir(path):
        if read_only:
            raise image_open_error(
                UnsupportedError(f"'file' driver requires '{path}' to be a regular file"), path)
        raise image_open_error(InvalidArgumentError(f"Could not open '{path}': Is a directory"), path)


def layer(drv: BlockDriver, depth: int) -> BlockDriver:
    """The driver ``depth`` levels down the backing chain (the deepest one when the chain is shorter)."""
    cur = drv
    for _ in range(depth):
        if cur.backing is None:
            break
        cur = cur.backing
    return cur


# -- progress and cancellation ------------------------------------------------------------------------

def report(progress: ProgressFn | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def check_cancelled(cancel: asyncio.Event | None) -> None:
    """Raise OperationCancelledError when the caller asked to stop; verbs call it between safe steps."""
    if cancel is not None and cancel.is_set():
        raise OperationCancelledError()


BackingFn = Callable[[str, "str | None", OpenContext], Awaitable[BlockDriver]]


def with_backing(opener: ImageOpener, make: Callable[[ImageOpener, BackingFn], BackingFn]) -> ImageOpener:
    """A copy of ``opener`` whose backing files are opened by ``make(copy, plain)`` instead.

    ``plain`` is the copy's own ``open_backing``, for delegating. The copy keeps everything else of the
    opener: a pool opener's confinement (``resolve``, ``open_file``), its lock and share settings. The
    override is set on the copy itself because subclasses (the pools' openers) define their own
    ``open_backing``, which a method of a common base class could not take the place of.
    """
    other = copy.copy(opener)
    plain: BackingFn = other.open_backing
    setattr(other, "open_backing", make(other, plain))  # noqa: B010 - the copy only; classes stay untouched
    return other


class Writeback:
    """Starts the writeback of a verb's target file every ``every`` bytes the verb has written into it
    (:meth:`HostFile.start_writeback`), so that the disk works during a long copy rather than all in the
    flush at its end. A hint: it orders and makes durable nothing."""

    def __init__(self, drv: BlockDriver, every: int = 64 << 20) -> None:
        self.files = [hf for hf in drv.host_files() if not hf.read_only]
        self.every = every
        self.pending = 0

    def wrote(self, n: int) -> None:
        self.pending += n
        if self.pending >= self.every:
            self.pending = 0
            for hf in self.files:
                hf.start_writeback()


async def open_backing_chain(path: str, fmt: str, opener: ImageOpener, *, image_errors: bool = False,
                             hf: HostFile | None = None) -> None:
    """Open an image that a verb works on through its file alone (check, resize, snapshot) with its
    backing chain, as qemu-img opens it: a backing file that cannot be opened (missing, unreadable, not of
    its format, ...) fails the verb with qemu's message, ``Could not open 'PATH': Could not open backing
    file: ...``, and so does, with ``image_errors``, anything the image's own open refuses.

    The image is opened read-only through an unlocking copy of ``opener`` (the caller's fd on it already
    holds its lock bytes, and this open only looks). Without ``image_errors`` a failure of the image itself
    is left to the verb, which can look at images that do not open (check, of corrupt ones).
    """
    failed: list[BlockError] = []

    def note_failures(probe: ImageOpener, plain: BackingFn) -> BackingFn:
        async def open_backing(name: str, bfmt: str | None, ctx: OpenContext) -> BlockDriver:
            try:
                return await plain(name, bfmt, ctx)
            except OperationCancelledError:
                raise
            except BlockError as exc:
                failed.append(exc)
                raise
        return open_backing

    probe = with_backing(opener, note_failures)
    probe.lock = False
    try:
        if hf is not None and not hf.local:
            # an image in an NBD export: opened again over the verb's own connection
            from ..driver import get_format
            from ..formats.nbd import NbdFile

            assert isinstance(hf, NbdFile)
            ctx = OpenContext(opener=probe, read_only=True, path=path, chain=((-1, hash(hf.path)),))
            drv = await get_format(fmt).open(hf.view(), ctx)
        else:
            drv = await probe.open(path, fmt, read_only=True)
    except OperationCancelledError:
        raise
    except BlockError as exc:
        if image_errors or any(exc is f for f in failed):
            raise image_open_error(exc, path) from None
        return
    await drv.close()
