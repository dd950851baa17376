"""`resize` of a closed image: raw and luks grow (with preallocation) and shrink, qcow2 and qed grow;
returns the sizes.

The checks, their order and their messages are qemu-img 7.2's ``img_resize`` ("New image size must be
positive", "Preallocation can only be used for growing images", "Use the --shrink option to perform a
shrink operation." with its warning, "Image format driver does not support resize"). The image's write
lock is held throughout, so a VM or another tool holding it makes this fail with their lock error.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ..driver import BlockDriver, ImageOpener, image_open_error
from ..errors import (
    BlockError,
    HostIOError,
    ImageLockedError,
    InvalidArgumentError,
    UnsupportedError,
)
from ..filenames import host_file_of, is_special
from ..hostio import HostFile
from ..locking import ALL_PERMS, lock_image
from .common import ProgressFn, check_cancelled, check_image_path, open_backing_chain, open_image, report

PREALLOC_MODES = ("off", "metadata", "falloc", "full")
SHRINK_WARNING = ("warning: Shrinking an image will delete all data beyond the shrunken image's end. "
                  "Before performing such an operation, make sure there is no important data there.")


@dataclass(slots=True)
class ResizeResult:
    path: str
    format: str
    old_size: int
    size: int


class ShrinkRefusedError(InvalidArgumentError):
    """A shrink without --shrink; qemu-img follows the error with a warning line (``warning``)."""

    warning = SHRINK_WARNING


def _int64(value: int) -> int:
    """The value as C's int64_t holds it (qemu computes the new size in one)."""
    return (value + (1 << 63)) % (1 << 64) - (1 << 63)


async def resize(path: str, fmt: str | None, size: int, *, opener: ImageOpener | None = None,
                 shrink: bool = False, relative: int = 0, preallocation: str = "off",
                 progress: ProgressFn | None = None, cancel: asyncio.Event | None = None) -> ResizeResult:
    """Resize ``path`` to ``size`` bytes, or by ``relative`` (1 grow, -1 shrink) times ``size``. Never prints.

    Progress is (1, 1) once the image has its new size; ``cancel`` is honoured until anything is written.

    Without an ``opener`` (the CLI) the locks are qemu-img's own: a raw image shares every permission, as
    qemu-img resize does (so it resizes a raw disk a VM has open), a qcow2 one shares neither write nor
    resize. A caller's opener keeps its writer locks, which refuse an image another process writes.
    """
    exact = opener is None
    opener = opener or ImageOpener(lock=True)
    if preallocation not in PREALLOC_MODES:
        raise InvalidArgumentError(f"Invalid preallocation mode '{preallocation}'")
    check_cancelled(cancel)
    check_image_path(path, read_only=False)
    if is_special(path) and host_file_of(path) is None:
        # an NBD export holds the image (imagecore.formats.nbd.NbdFile); no lock is taken over NBD
        try:
            hf = await opener.open_nbd_file(path, read_only=False)
        except BlockError as exc:
            raise image_open_error(exc, path) from None
    else:
        hf = _open_writable(path, opener, exact)
    try:
        spec = opener.image_format(hf, fmt, path, read_only=False)
        if exact and hf.local:
            _lock_as_qemu_img(hf, path, spec.name)
        if spec.name == "qcow2":
            from ..formats.qcow2.headio import read_header

            try:
                header = await read_header(hf, writable=True)
            except BlockError as exc:
                raise image_open_error(exc, path) from None
            old = header.size
            # qemu-img opens the image with its backing chain: what does not open fails the resize
            await open_backing_chain(path, spec.name, opener, image_errors=True, hf=hf)
            if hf.local:
                backing_size, v3 = await _backing_size(path, opener)
            else:
                # over NBD a second connection may wait behind this one for good (qemu-nbd serves one
                # client unless told otherwise): the backing file's size is not looked up, taken as 0
                backing_size, v3 = 0, header.version >= 3
        elif spec.name == "raw":
            old, backing_size, v3 = hf.size(), 0, True
        elif spec.name == "qed":
            # opened as qemu-img opens it: the need-check repair and the backing chain's errors first
            drv = await _open_unlocked(path, opener, read_only=False, fmt="qed")
            old, backing_size, v3 = drv.size, drv.backing.size if drv.backing is not None else 0, True
            await drv.close()
        elif spec.name == "luks":
            from ..formats.luks.driver import LuksDriver

            # opened as qemu-img opens it, so the secret must unlock it; the payload is the file's bytes
            # past the header and key material, and it grows or shrinks with the file
            drv = await _open_unlocked(path, opener, read_only=False, fmt="luks")
            assert isinstance(drv, LuksDriver)
            payload, old, backing_size, v3 = drv.payload, drv.size, 0, True
            await drv.close()
        else:
            # qemu-img opens the image before it finds that the driver cannot resize: its errors first
            hf.close()
            await (await open_image(path, spec.name, read_only=False, opener=opener)).close()
            raise UnsupportedError("Image format driver does not support resize")
        total = _int64(old + relative * size if relative else size)
        if total <= 0:
            raise InvalidArgumentError("New image size must be positive")
        if total <= old and preallocation != "off":
            raise InvalidArgumentError("Preallocation can only be used for growing images")
        if total < old and not shrink:
            raise ShrinkRefusedError("Use the --shrink option to perform a shrink operation.")
        check_cancelled(cancel)
        if spec.name == "qcow2" and total > old and backing_size > old and not v3:
            # qemu zeroes the grown area first, and a version 2 image has no zero clusters over a backing file
            raise UnsupportedError("Failed to zero out new clusters: Operation not supported")
        if spec.name == "raw" and not hf.local and total != old:
            raise UnsupportedError("Cannot resize NBD nodes")  # qemu's nbd driver: exact sizes only
        if spec.name == "raw":
            await _resize_raw(hf, old, total, preallocation)
        elif spec.name == "luks":
            await _resize_raw(hf, payload + old, payload + total, preallocation)
        elif spec.name == "qed":
            from ..formats.qed.driver import resize_qed

            if total > old and backing_size > old:
                # qemu's block layer asks for the grown area zeroed (the backing file reaches into it),
                # which qed's truncate cannot do: refused before the header changes
                raise UnsupportedError("Block driver does not support requested flags")
            await resize_qed(hf, total, preallocation)
        else:
            from ..formats.qcow2.dirty import after_resize, before_resize
            from ..formats.qcow2.resize import resize as resize_qcow2
            from ..formats.qcow2.resize import set_size

            # persistent bitmaps take the new size too (qemu resizes and stores them)
            bitmaps = await before_resize(hf)
            data_hf = None
            if header.data_file is not None and total != old:
                data_hf = _open_data_file(header.data_file, path, hf, opener, exact)
            try:
                if total > old and backing_size > old:
                    # as qemu's qcow2_co_truncate: the new part is zeroed before the header shows it, so
                    # a crash never lets the backing file's data appear there
                    await resize_qcow2(hf, total, preallocation, tables_only=True, data_hf=data_hf)
                    await _zero_over_backing(path, opener, old, total)
                    await set_size(hf, total)
                else:
                    await resize_qcow2(hf, total, preallocation, data_hf=data_hf)
            finally:
                if data_hf is not None:
                    data_hf.close()
            if bitmaps is not None:
                await after_resize(bitmaps)
    finally:
        hf.close()
    report(progress, 1, 1)
    return ResizeResult(path, spec.name, old, total)


async def _open_unlocked(path: str, opener: ImageOpener, *, read_only: bool,
                         fmt: str = "qcow2") -> BlockDriver:
    """The image opened through an unlocked copy of ``opener``: the caller's fd on the image holds
    its lock bytes."""
    unlocked = opener.unlocked()
    try:
        return await unlocked.open(path, fmt, read_only=read_only)
    except BlockError as exc:
        raise image_open_error(exc, path) from None


async def _backing_size(path: str, opener: ImageOpener) -> tuple[int, bool]:
    """The size of the qcow2 image's backing file (0 without one), and whether the image is version 3."""
    drv = await _open_unlocked(path, opener, read_only=True)
    try:
        return (drv.backing.size if drv.backing is not None else 0), bool(getattr(drv, "v3", True))
    finally:
        await drv.close()


async def _zero_over_backing(path: str, opener: ImageOpener, old: int, size: int) -> None:
    """Zero the grown area of an image whose backing file reaches past its old end, as qemu's
    bdrv_co_truncate does (BDRV_REQ_ZERO_WRITE): unallocated, the area would show the backing file's data
    there, and the tail of a cluster cut by an earlier shrink would show what was in it before.

    The header still has the old size and its L1 table already covers the new one: the driver is told the
    new size in memory only, so a crash before the header switch leaves the old image (and at worst leaked
    clusters of the zeroed part)."""
    drv = await _open_unlocked(path, opener, read_only=False)
    try:
        drv.size = size
        await drv.write_zeroes(old, size - old, may_trim=False, fast=False)
        await drv.flush()
    finally:
        await drv.close()


def _open_writable(path: str, opener: ImageOpener, exact: bool) -> HostFile:
    """A local file opened for writing; ``exact`` (the CLI) takes no lock here, the caller takes
    qemu-img's own (:func:`_lock_as_qemu_img`)."""
    try:
        if exact:
            unlocked = opener.unlocked()
            return unlocked.open_file(path, read_only=False)
        return opener.open_file(path, read_only=False)
    except BlockError as exc:
        raise image_open_error(exc, path) from None


def _open_data_file(name: str, path: str, hf: HostFile, opener: ImageOpener, exact: bool) -> HostFile:
    """A qcow2 image's external data file, open for writing: the data file takes the new size with the
    image (qemu forwards its truncate to it). qemu-img's lock on it shares every permission, as its lock on
    a raw image does: a raw writer of the data file does not stop the resize (the image's own lock is what
    keeps other users of the image out)."""
    if not hf.local:
        raise UnsupportedError("resizing qcow2 images with an external data file over NBD is not supported")
    dpath = opener.resolve(name, path)
    dhf = _open_writable(dpath, opener, exact)
    try:
        if exact:
            _lock_as_qemu_img(dhf, dpath, "raw")
    except BaseException:
        dhf.close()
        raise
    return dhf


def _lock_as_qemu_img(hf: HostFile, path: str, fmt: str) -> None:
    """The lock bytes qemu-img resize takes: its raw node shares all (and so does luks, whose driver takes
    its file's permissions as raw's), a format node not write or resize."""
    try:
        lock_image(hf.fd, write=True, shared=ALL_PERMS if fmt in ("raw", "luks") else None)
    except ImageLockedError as exc:
        image_open_error(exc, path)
        exc.hint = f"Is another process using the image [{path}]?"
        raise


async def _resize_raw(hf: HostFile, old: int, size: int, preallocation: str) -> None:
    if preallocation == "metadata":
        raise UnsupportedError("Unsupported preallocation mode: metadata")
    try:
        await hf.truncate(size)
        if size > old and preallocation == "falloc":
            try:
                await hf.allocate(old, size - old)
            except UnsupportedError:
                await hf.write_zeroes_slow(old, size - old)
        elif size > old and preallocation == "full":
            await hf.write_zeroes_slow(old, size - old)
    except BlockError:
        raise
    except OSError as exc:
        raise HostIOError.from_oserror(exc, "Could not resize file") from None
    await hf.fdatasync()
