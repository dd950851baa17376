"""The one error hierarchy: each class carries its POSIX errno, admin JSON error class and CLI exit code."""

from __future__ import annotations

import errno as _errno


class BlockError(Exception):
    """Base of every error the project raises on purpose.

    ``errno`` is projected onto the NBD reply, ``json_class`` onto the admin socket's error object and
    ``exit_code`` onto the CLI's exit status.
    """

    errno: int = _errno.EIO
    json_class: str = "GenericError"
    exit_code: int = 1
    # The image whose "Could not open 'PATH': " (qemu-img's img_open wording) the message already begins
    # with, so that it is neither added twice nor kept when the image turns out to be a backing file.
    image_prefix: str | None = None
    # qemu's error hint: text the CLI prints bare after the message, followed by a newline unless
    # hint_newline is False (a few of qemu's hints have none)
    hint: str | None = None
    hint_newline: bool = True
    # where qemu-img fails without a word (only its exit status tells), the CLI prints nothing either;
    # the message still names the cause everywhere else (the admin socket's error object, logs)
    cli_silent: bool = False

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message or self.__class__.__name__


class InvalidArgumentError(BlockError):
    """A request or argument that can never succeed as given (bad offset, bad option, bad size)."""

    errno = _errno.EINVAL
    json_class = "GenericError"


class NotFoundError(BlockError):
    """A named thing (file, pool, volume, export, snapshot) does not exist."""

    errno = _errno.ENOENT
    json_class = "NotFound"


class SnapshotNotFoundError(NotFoundError):
    """An internal snapshot that was asked for by id or name is not in the image."""


class BitmapNotFoundError(NotFoundError):
    """A persistent dirty bitmap that was asked for by name is not in the image."""


class InconsistentBitmapError(BlockError):
    """A dirty bitmap found in use on open (its writer did not close the image): it may have missed
    writes, so it cannot be used, only removed. ``hint`` is qemu's second line."""

    errno = _errno.EINVAL
    json_class = "GenericError"
    hint: str | None = "Try block-dirty-bitmap-remove to delete this bitmap from disk"


class ExistsError(BlockError):
    """A thing that must not exist yet already does."""

    errno = _errno.EEXIST
    json_class = "GenericError"


class ReadOnlyError(BlockError):
    """A write to something opened or exported read-only."""

    errno = _errno.EPERM
    json_class = "GenericError"


class PermissionDeniedError(BlockError):
    """The host refused access, or a name tried to leave its pool."""

    errno = _errno.EPERM
    json_class = "GenericError"


class OutOfRangeError(BlockError):
    """An access beyond the end of the device."""

    errno = _errno.EINVAL


class NoSpaceError(BlockError):
    """A write past the end of a device, or the host is out of space."""

    errno = _errno.ENOSPC


class ValueOverflowError(BlockError):
    """A value (length, offset, count) too large to represent or to answer in one reply."""

    errno = _errno.EOVERFLOW


class UnsupportedError(BlockError):
    """A feature, option or operation this image or driver does not support."""

    errno = _errno.ENOTSUP
    json_class = "GenericError"


class UnsupportedFormatError(UnsupportedError):
    """An image whose format probing recognises but no driver here opens; qemu's non-whitelisted driver."""

    hint: str | None = None


class CheckUnsupportedError(UnsupportedError):
    """A consistency check or repair the image's format cannot do (qemu-img's exit code 63)."""

    exit_code = 63


class ImageFormatError(BlockError):
    """An image whose metadata is malformed, hostile or unsupported; refused at open time."""

    errno = _errno.EIO


class CorruptImageError(ImageFormatError):
    """An inconsistency found in an open image's metadata at run time; the image drops to read-only."""

    errno = _errno.EIO


class ImageLockedError(BlockError):
    """Another process (QEMU, qemu-img, another server) holds a conflicting lock on the image."""

    errno = _errno.EAGAIN
    json_class = "GenericError"
    # qemu's error hint, printed by the CLI on its own line after the message
    hint: str | None = None


class BusyError(BlockError):
    """The volume is in use (exported read-write, or held by another process) and the operation would
    change it or read it inconsistently."""

    errno = _errno.EBUSY
    json_class = "Busy"


class HostIOError(BlockError):
    """The host's storage failed an operation."""

    errno = _errno.EIO

    @classmethod
    def from_oserror(cls, exc: OSError, what: str = "") -> BlockError:
        code = exc.errno or _errno.EIO
        text = f"{what}: {exc.strerror or exc}" if what else str(exc.strerror or exc)
        if code == _errno.ENOSPC:
            return NoSpaceError(text)
        if code in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
            return PermissionDeniedError(text)
        if code == _errno.ENOENT:
            return NotFoundError(text)
        if code in (_errno.EOPNOTSUPP, _errno.ENOTSUP):
            return UnsupportedError(text)
        err = cls(text)
        err.errno = code
        return err


class ShutdownError(BlockError):
    """The server is shutting down and takes no new requests."""

    errno = _errno.ESHUTDOWN


class CancelledJobError(BlockError):
    """A long-running operation was cancelled by its owner."""

    errno = _errno.ECANCELED
    json_class = "GenericError"


class OperationCancelledError(CancelledJobError):
    """An offline verb stopped at a safe point because its caller set the cancellation event."""

    exit_code = 1

    def __init__(self, message: str = "Operation cancelled") -> None:
        super().__init__(message)
