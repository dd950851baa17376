"""`amend`: change the format options of an existing image, as qemu-img 7.2 does: qcow2's (compat,
lazy_refcounts, refcount_bits, data_file, data_file_raw, size) and a LUKS volume's key slots
(``formats/luks/amend.py``).

The image is opened as qemu-img opens it, with its write lock (held throughout), its backing chain and
data file (their absence fails with qemu's message), a dirty image with lazy refcounts repaired, and its
persistent bitmaps kept (``rebase.open_for_edit``); then the options are read against the format's amend
options (``Invalid parameter``, with qemu-img's hint for an option only ``create`` takes), then the qcow2
image is amended in place (``formats/qcow2/amend.py`` says how each step stays crash-safe).

Progress follows qemu-img: ``(0, 0)`` when the amendment proper begins (qemu-img prints 0 % there), then
qemu's amend status numbers ``(offset, total)``; a renderer prints 100 % when the amendment returns, also
when it fails, as qemu-img does.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ..driver import ImageOpener, get_format
from ..errors import ImageLockedError, InvalidArgumentError, UnsupportedError
from ..locking import ALL_PERMS, CONSISTENT_READ, WRITE, lock_image
from .common import ProgressFn, check_cancelled, is_help_request, option_line, split_options
from .create import QEMU_NO_CREATE

CACHE_MODES = ("none", "off", "writeback", "unsafe", "directsync", "writethrough")


@dataclass(slots=True)
class AmendResult:
    """What ``amend`` did: the image and its format, or the help text when the options asked for it."""

    path: str
    format: str
    help: str | None = None


class AmendUnsupportedError(UnsupportedError):
    """A format without amendable options."""


def help_text(fmt: str) -> str:
    """``amend -o help`` for ``fmt``; qemu-img's refusals for an unknown format or one with no options."""
    if fmt not in QEMU_NO_CREATE:
        try:
            get_format(fmt)
        except UnsupportedError:
            raise InvalidArgumentError(f"Unknown file format '{fmt}'") from None
    if fmt == "luks":
        from ..formats.luks.amend import AMEND_OPTIONS as table
    elif fmt == "qcow2":
        from ..formats.qcow2.amend import AMEND_OPTIONS as table
    else:
        raise AmendUnsupportedError(f"Format driver '{fmt}' does not support option amendment")
    return f"Amend options for '{fmt}':\n" + "".join(option_line(o) + "\n" for o in table)


def wants_help(options: str) -> bool:
    return is_help_request(split_options(options))


async def amend(path: str, fmt: str | None, options: str, *, force: bool = False, cache: str = "writeback",
                opener: ImageOpener | None = None, progress: ProgressFn | None = None,
                cancel: asyncio.Event | None = None) -> AmendResult:
    """Amend ``path`` with the ``-o`` list ``options`` (``key=value,...``). Never prints.

    ``force`` is qemu-img's ``--force``, which only encryption changes need (a LUKS volume's active key
    slot overwritten, its last one erased). ``cache`` ``unsafe`` skips the syncs. ``cancel`` is honoured
    until the image changes.
    """
    if cache not in CACHE_MODES:
        raise InvalidArgumentError(f"Invalid cache option: {cache}")
    opener = opener or ImageOpener(lock=True)
    if cache == "unsafe":
        opener = opener.unsynced()
    check_cancelled(cancel)
    from .rebase import open_for_edit

    target = await open_for_edit(path, fmt, opener)
    try:
        if wants_help(options):
            return AmendResult(path, target.format, help_text(target.format))
        if target.format == "luks":
            await _amend_luks(path, options, opener, force=force)
            return AmendResult(path, target.format)
        if target.hf is None or target.format != "qcow2":
            raise AmendUnsupportedError(f"Format driver '{target.format}' does not support option amendment")
        from ..formats.qcow2.amend import amend_qcow2, parse_amend_options

        opts = parse_amend_options(split_options(options))
        check_cancelled(cancel)
        if progress is not None:
            progress(0, 0)
        await amend_qcow2(target.hf, opts, has_backing=target.has_backing, status=progress,
                          key_secret=_key_secret(path, "encrypt."), force=force)
    finally:
        if target.hf is not None:
            target.hf.close()
    return AmendResult(path, target.format)


async def _amend_luks(path: str, options: str, opener: ImageOpener, *, force: bool) -> None:
    """A LUKS volume's key slots (formats/luks/amend.py), unlocked with the ``key-secret`` of its name."""
    from ..formats.luks.amend import amend_luks, parse_amend_options

    opts = parse_amend_options(split_options(options))
    unlocked = opener.unlocked()
    hf = unlocked.open_file(path, read_only=False)
    try:
        if opener.lock and hf.local:
            # qemu's luks driver, updating keys, asks for write and shares neither consistent read nor
            # write (block/crypto.c, updating_keys): any other user of the volume refuses it, and qemu
            # names the first permission it checks, consistent read
            try:
                lock_image(hf.fd, write=True, perm=CONSISTENT_READ | WRITE,
                           shared=ALL_PERMS & ~(CONSISTENT_READ | WRITE))
            except ImageLockedError as exc:
                exc.hint = f"Is another process using the image [{hf.path}]?"  # qemu names the file
                raise
        await amend_luks(hf, _key_secret(path, ""), opts, force=force)
    finally:
        hf.close()


def _key_secret(path: str, prefix: str) -> str | None:
    """The secret id an ``--image-opts``/``json:`` name gives for unlocking its encryption."""
    from ..crypto.secrets import key_secret_of
    from ..filenames import options_of

    return key_secret_of(options_of(path) or {}, prefix)
