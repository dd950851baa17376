"""The formats of this package: importing it registers raw, qcow2, vmdk, qed, qcow, luks, vhdx, vdi, vpc and
parallels, and the foreign formats' probes.

The registry in imagecore.driver never imports formats itself: each program registers the formats it uses
by calling :func:`register_all` once at start (the CLI, the server and its job worker, the tests), and a
format package registers its spec when it is imported. A new format is one more import below.
"""

from __future__ import annotations

from ..driver import BlockDriver, ImageOpener, format_names
from . import foreign as foreign
from . import luks as luks
from . import parallels as parallels
from . import qcow as qcow
from . import qcow2 as qcow2
from . import qed as qed
from . import raw as raw
from . import vdi as vdi
from . import vhdx as vhdx
from . import vmdk as vmdk
from . import vpc as vpc


def register_all() -> list[str]:
    """Make sure every format of this package is registered (they are, once this package is imported);
    the registered names, sorted. The programs' roots call it so that their dependency on the formats is
    written where it is, not discovered by the registry at run time."""
    return format_names()


async def open_image(path: str, fmt: str | None = None, *, read_only: bool = True,
                     opener: ImageOpener | None = None) -> BlockDriver:
    """Open an image file with its whole backing chain."""
    return await (opener or ImageOpener()).open(path, fmt, read_only=read_only)
