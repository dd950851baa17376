"""Format drivers; importing this package registers raw, qcow2, vmdk, vdi, vpc and parallels, and
the foreign formats' probes."""

from __future__ import annotations

from ..driver import BlockDriver, ImageOpener
from . import foreign as foreign
from . import parallels as parallels
from . import qcow2 as qcow2
from . import raw as raw
from . import vdi as vdi
from . import vmdk as vmdk
from . import vpc as vpc


async def open_image(path: str, fmt: str | None = None, *, read_only: bool = True,
                     opener: ImageOpener | None = None) -> BlockDriver:
    """Open an image file with its whole backing chain."""
    return await (opener or ImageOpener()).open(path, fmt, read_only=read_only)
