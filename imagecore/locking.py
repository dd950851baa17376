"""Image locking with the fcntl OFD lock bytes QEMU's file-posix driver uses, so QEMU and we see each other.

QEMU marks each block permission it *holds* with a shared OFD read lock on byte ``100 + bit`` and each
permission it *refuses to share* with a read lock on byte ``200 + bit``. Before that it probes, with
F_OFD_GETLK for a write lock, that nobody refuses to share what it wants (bytes ``200 + bit``) and that
nobody holds what it refuses to share (bytes ``100 + bit``). Doing the same here makes a read-write export
invisible to neither side: qemu-img/qemu-io cannot open it while we write, and we refuse an image that a
running QEMU writes.

Locks belong to the open file description, so they vanish when the fd is closed; nothing to undo.
"""

from __future__ import annotations

import errno
import fcntl
import struct

from .errors import HostIOError, ImageLockedError

PERM_BASE = 100
SHARED_BASE = 200

CONSISTENT_READ = 0x01
WRITE = 0x02
WRITE_UNCHANGED = 0x04
RESIZE = 0x08
_PERM_BITS = 4
_NAMES = {CONSISTENT_READ: "consistent read", WRITE: "write", WRITE_UNCHANGED: "write unchanged",
          RESIZE: "resize"}

_F_OFD_GETLK: int = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)
# struct flock on 64-bit Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid.
_FLOCK = struct.Struct("hhxxxxqqixxxx")

# What we hold and share. A writer needs read, write and resize (qcow2 grows its file) and shares only
# reads and unchanged writes, as a QEMU guest disk does. A reader shares neither write nor resize, so no
# one can change an image under a read-only export or a backing file in use.
WRITER_PERM = CONSISTENT_READ | WRITE | RESIZE
WRITER_SHARED = CONSISTENT_READ | WRITE_UNCHANGED
READER_PERM = CONSISTENT_READ
READER_SHARED = CONSISTENT_READ | WRITE_UNCHANGED
# qemu-img info asks for no permission at all (it reads only metadata) but still shares neither write nor
# resize; -U/--force-share shares everything and keeps the held bits (measured against qemu-img 7.2).
INFO_PERM = 0
ALL_PERMS = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE


def locked_error(text: str) -> ImageLockedError:
    """qemu's lock failure: the message, plus its hint line (the CLI prints it on a line of its own)."""
    exc = ImageLockedError(text)
    exc.hint = "Is another process using the image?"
    return exc


def _fcntl_lock(fd: int, cmd: int, ltype: int, start: int) -> int:
    """Run one OFD lock command on a single byte; returns the l_type the kernel left in the struct."""
    arg = _FLOCK.pack(ltype, 0, start, 1, 0)
    out = fcntl.fcntl(fd, cmd, arg)
    return int(_FLOCK.unpack(out)[0])


def _lock_byte(fd: int, offset: int) -> None:
    try:
        _fcntl_lock(fd, _F_OFD_SETLK, fcntl.F_RDLCK, offset)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise ImageLockedError(f"Failed to lock byte {offset}") from None
        raise HostIOError.from_oserror(exc, f"Failed to lock byte {offset}") from None


def byte_is_locked(fd: int, offset: int) -> bool:
    """True when another open file description holds a lock that conflicts with writing ``offset``."""
    try:
        return _fcntl_lock(fd, _F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK
    except OSError as exc:
        raise HostIOError.from_oserror(exc, f"Failed to test lock byte {offset}") from None


def apply_locks(fd: int, perm: int, shared: int) -> None:
    """Mark ``perm`` as held and ``~shared`` as unshared on ``fd``, then check nobody else conflicts."""
    for i in range(_PERM_BITS):
        bit = 1 << i
        if perm & bit:
            _lock_byte(fd, PERM_BASE + i)
    for i in range(_PERM_BITS):
        bit = 1 << i
        if not shared & bit:
            _lock_byte(fd, SHARED_BASE + i)
    # Probing after locking closes the window in which two openers could both see the other as absent.
    for i in range(_PERM_BITS):
        bit = 1 << i
        if perm & bit and byte_is_locked(fd, SHARED_BASE + i):
            raise locked_error(f'Failed to get "{_NAMES[bit]}" lock')
    for i in range(_PERM_BITS):
        bit = 1 << i
        if not shared & bit and byte_is_locked(fd, PERM_BASE + i):
            raise locked_error(f'Failed to get shared "{_NAMES[bit]}" lock')


def release_locks(fd: int) -> None:
    """Drop every lock byte we may hold on ``fd`` (closing the fd does the same)."""
    arg = _FLOCK.pack(fcntl.F_UNLCK, 0, PERM_BASE, SHARED_BASE + _PERM_BITS - PERM_BASE, 0)
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, arg)
    except OSError:
        pass


def lock_image(fd: int, *, write: bool, perm: int | None = None, shared: int | None = None) -> None:
    """Take QEMU-compatible locks on ``fd``; raise ImageLockedError when another process conflicts.

    ``write`` picks the writer or reader bits; ``perm``/``shared`` override them for verbs that ask
    qemu's block layer for something else (info asks for no permission, -U shares everything).
    """
    dperm, dshared = (WRITER_PERM, WRITER_SHARED) if write else (READER_PERM, READER_SHARED)
    perm = dperm if perm is None else perm
    shared = dshared if shared is None else shared
    try:
        apply_locks(fd, perm, shared)
    except BaseException:
        release_locks(fd)
        raise
