"""Flat vmdk extents (FLAT, VMFS: a plain file at an offset) and ZERO extents (no storage, reads zeroes)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from ...errors import ReadOnlyError, UnsupportedError
from ...extent import Extent
from ...hostio import HostFile

FillFn = Callable[[int, memoryview], Awaitable[None]]


class FlatExtent:
    """Guest bytes ``[start, start+length)`` live in ``hf`` from byte ``offset`` on."""

    compressed = False

    def __init__(self, hf: HostFile, *, start: int, length: int, offset: int, name: str, kind: str,
                 writable: bool) -> None:
        self.hf = hf
        self.start = start
        self.length = length
        self.offset = offset
        self.name = name
        self.kind = kind
        self.writable = writable

    async def readinto(self, rel: int, view: memoryview, fill: FillFn) -> None:
        await self.hf.readinto(self.offset + rel, view)

    def read_nowait(self, rel: int, view: memoryview) -> bool:
        return self.hf.read_nowait(self.offset + rel, view) == len(view)

    def _check_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyError(f"vmdk extent '{self.name}' is read-only")

    async def write(self, rel: int, data: memoryview, fill: FillFn, *, has_backing: bool) -> None:
        self._check_writable()
        await self.hf.pwrite(self.offset + rel, data)

    async def write_zeroes(self, rel: int, length: int, fill: FillFn, *, has_backing: bool,
                           may_trim: bool = False) -> None:
        self._check_writable()
        host = self.offset + rel
        try:
            if may_trim:
                await self.hf.punch_hole(host, length)
            else:
                await self.hf.zero_range(host, length)
        except UnsupportedError:
            await self.hf.write_zeroes_slow(host, length)

    async def extents(self, rel: int, length: int) -> AsyncIterator[Extent]:
        """Data and holes of the host file, as qemu reports a flat extent (always data, with offset)."""
        pos = rel
        end = rel + length
        size = self.hf.size()
        while pos < end:
            host = self.offset + pos
            if host >= size:
                yield Extent(pos, end - pos, data=True, zero=True, offset=host)
                return
            data_at = self.hf.seek_data(host)
            if data_at > host:
                take = min(data_at - host, end - pos)
                yield Extent(pos, take, data=True, zero=True, offset=host)
            else:
                hole_at = self.hf.seek_hole(host)
                take = min(max(hole_at - host, 1), end - pos)
                yield Extent(pos, take, data=True, zero=False, offset=host)
            pos += take

    def info(self, filename: str, fmt: str) -> dict[str, object]:
        return {"virtual-size": self.length, "filename": filename, "format": fmt}

    async def flush(self) -> None:
        await self.hf.fdatasync()


class ZeroExtent:
    """A ZERO extent: no file, reads as zeroes, refuses writes."""

    compressed = False
    kind = "ZERO"
    hf: HostFile | None = None

    def __init__(self, *, start: int, length: int) -> None:
        self.start = start
        self.length = length
        self.name = "ZERO"
        self.writable = False

    async def readinto(self, rel: int, view: memoryview, fill: FillFn) -> None:
        view[:] = bytes(len(view))

    def read_nowait(self, rel: int, view: memoryview) -> bool:
        view[:] = bytes(len(view))
        return True

    async def write(self, rel: int, data: memoryview, fill: FillFn, *, has_backing: bool) -> None:
        raise UnsupportedError("a ZERO vmdk extent cannot be written")

    async def write_zeroes(self, rel: int, length: int, fill: FillFn, *, has_backing: bool,
                           may_trim: bool = False) -> None:
        raise UnsupportedError("a ZERO vmdk extent cannot be written")

    async def extents(self, rel: int, length: int) -> AsyncIterator[Extent]:
        yield Extent(rel, length, data=False, zero=True)

    def info(self, filename: str, fmt: str) -> dict[str, object]:
        return {"virtual-size": self.length, "filename": filename, "format": fmt}

    async def flush(self) -> None:
        return None
