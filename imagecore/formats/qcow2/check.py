"""qcow2 consistency check and repair, with qemu-img check's semantics and wording."""

from __future__ import annotations

from ...driver import CheckResult, OpenContext
from ...errors import UnsupportedError
from ...hostio import HostFile


async def check_qcow2(hf: HostFile, ctx: OpenContext, repair: str | None) -> CheckResult:
    """Check (and optionally repair) the qcow2 image open as ``hf``."""
    raise UnsupportedError("qcow2 check is not implemented yet")
