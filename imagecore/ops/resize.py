"""`resize` of a closed image: raw grows and shrinks, qcow2 grows in place; returns the old and new size.

qemu-img's messages where it has them ("Use the --shrink option to perform a shrink operation.",
"Image format driver does not support resize"). The image's write lock is held throughout, so a VM or
another tool holding it makes this fail with their lock error.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from ..driver import ImageOpener
from ..errors import HostIOError, InvalidArgumentError, NotFoundError, UnsupportedError
from .common import INT64_MAX, ProgressFn


@dataclass(slots=True)
class ResizeResult:
    path: str
    format: str
    old_size: int
    size: int


async def resize(path: str, fmt: str | None, size: int, *, opener: ImageOpener | None = None,
                 shrink: bool = False, progress: ProgressFn | None = None,
                 cancel: asyncio.Event | None = None) -> ResizeResult:
    opener = opener or ImageOpener(lock=True)
    if not os.path.lexists(path):
        raise NotFoundError(f"Could not open '{path}': No such file or directory")
    if not 0 <= size <= INT64_MAX:
        raise InvalidArgumentError("Invalid image size specified.")
    hf = opener.open_file(path, read_only=False)
    try:
        spec = opener.image_format(hf, fmt, path, read_only=False)
        if spec.name == "raw":
            old = hf.size()
            if size < old and not shrink:
                raise InvalidArgumentError("Use the --shrink option to perform a shrink operation.")
            try:
                await hf.truncate(size)
            except OSError as exc:
                raise HostIOError.from_oserror(exc, "Could not resize file") from None
            await hf.fdatasync()
        elif spec.name == "qcow2":
            from ..formats.qcow2.resize import grow

            old = await grow(hf, size)
        else:
            raise UnsupportedError("Image format driver does not support resize")
    finally:
        hf.close()
    if progress is not None:
        progress(1, 1)
    return ResizeResult(path, spec.name, old, size)
