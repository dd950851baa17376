"""Format drivers; importing this package registers raw, qcow2 and vmdk."""

from __future__ import annotations

import contextlib

from ..driver import BlockDriver, ImageOpener

with contextlib.suppress(ImportError):
    from . import raw as raw  # noqa: F401
with contextlib.suppress(ImportError):
    from . import qcow2 as _qcow2  # noqa: F401
with contextlib.suppress(ImportError):
    from . import vmdk as _vmdk  # noqa: F401


async def open_image(path: str, fmt: str | None = None, *, read_only: bool = True,
                     opener: ImageOpener | None = None) -> BlockDriver:
    """Open an image file with its whole backing chain."""
    return await (opener or ImageOpener()).open(path, fmt, read_only=read_only)
