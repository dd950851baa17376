"""qcow2 image creation: option validation and the initial metadata layout qemu-img writes."""

from __future__ import annotations

from ...driver import CreateOption, ImageOpener
from ...errors import UnsupportedError

CREATE_OPTIONS: tuple[CreateOption, ...] = ()


async def create_qcow2(path: str, size: int, options: dict[str, str], *, opener: ImageOpener) -> None:
    """Create a new qcow2 image at ``path``."""
    raise UnsupportedError("qcow2 create is not implemented yet")
