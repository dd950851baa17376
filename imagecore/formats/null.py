"""The null-co (and null-aio) protocol: an image of a given size that keeps nothing, as qemu's null block
driver (a server or a benchmark with no storage behind it: ``qemu-nbd -f raw null-co://``).

Writes are dropped; reads give zeroes (qemu leaves the buffer untouched unless ``read-zeroes=on``, which
no caller can rely on); block status says zero only with ``read-zeroes=on``, as qemu's does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ..driver import BlockDriver, Capabilities
from ..errors import InvalidArgumentError
from ..extent import Extent
from ..qemuopts import parse_bool
from ..units import parse_option_size

OPTIONS = ("driver", "size", "latency-ns", "read-zeroes", "node-name", "read-only", "auto-read-only",
           "force-share", "discard", "cache", "detect-zeroes")
DEFAULT_SIZE = 1 << 30


def _bool(value: Any, key: str) -> bool:
    return value if isinstance(value, bool) else parse_bool(key, str(value))


class NullDriver(BlockDriver):
    """qemu's null-co: a size and nothing behind it."""

    format_name = "null-co"
    reports_dirty = False

    def __init__(self, opts: dict[str, Any], *, read_only: bool, raw: bool = False) -> None:
        for key in opts:
            if key not in OPTIONS:
                raise InvalidArgumentError(f"Block protocol 'null-co' doesn't support the option '{key}'")
        driver = str(opts.get("driver", "null-co"))
        # raw over it reads the same bytes; info names the format on top
        self.format_name = "raw" if raw else driver  # type: ignore[misc]
        size = opts.get("size", DEFAULT_SIZE)
        self.size = size if isinstance(size, int) else parse_option_size("size", str(size))
        self.read_zeroes = _bool(opts.get("read-zeroes", False), "read-zeroes")
        self.filename = f"{driver}://"
        self.backing = None
        writable = not read_only
        self.caps = Capabilities(writable=writable, zero=writable, fast_zero=writable, trim=writable,
                                 flush=True, fua=writable, extents=True, multi_conn=True)

    async def readinto(self, offset: int, buf: memoryview) -> None:
        buf[:] = bytes(len(buf))

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        return None

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool,
                           fua: bool = False) -> None:
        return None

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        return None

    async def flush(self) -> None:
        return None

    async def extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        if length > 0 and self.read_zeroes:
            yield Extent(offset, length, data=False, zero=True, offset=offset)
        elif length > 0:
            yield Extent(offset, length, data=False, zero=False, present=False)

    async def close(self) -> None:
        return None
