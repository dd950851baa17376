"""Image locking with the fcntl OFD lock bytes QEMU's file-posix driver uses, so QEMU and we see each other."""

from __future__ import annotations


def lock_image(fd: int, *, write: bool) -> None:
    """Take QEMU-compatible locks on ``fd``; raise ImageLockedError when another process conflicts."""
    # Placeholder until the implementation lands: no locks are taken.
    return None
