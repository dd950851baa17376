"""The server's filters and the read fast paths: a filter that changes what reads return never lets the
layer below answer a fast-path read (inline or sendfile) in its place."""

from __future__ import annotations

import os
from pathlib import Path

from imagecore.formats import open_image
from nbdsrv.backend import Filter, OffsetFilter, ReadOnlyFilter


class _Reversed(Filter):
    """A filter that changes reads and says nothing about the fast paths."""

    async def readinto(self, offset: int, buf: memoryview) -> None:
        await self.next.readinto(offset, buf)
        buf[:] = bytes(buf)[::-1]


async def test_fast_paths_pass_only_through_filters_that_keep_reads(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(os.urandom(1 << 20))
    drv = await open_image(str(img), "raw")
    try:
        # warm the page cache so that the raw driver offers its fast paths at all
        buf = bytearray(1 << 20)
        await drv.readinto(0, memoryview(buf))
        plain = ReadOnlyFilter(drv)
        changed = _Reversed(drv)
        small = memoryview(bytearray(4096))
        assert plain.readinto_nowait(0, small) == drv.readinto_nowait(0, memoryview(bytearray(4096)))
        assert plain.host_runs_nowait(0, 65536) == drv.host_runs_nowait(0, 65536)
        assert changed.readinto_nowait(0, small) is False
        assert changed.host_runs_nowait(0, 65536) is None
        # an offset filter maps its fast paths itself: the runs start at the offset in the file
        shifted = OffsetFilter(drv, 8192)
        runs = shifted.host_runs_nowait(0, 65536)
        if runs is not None:  # cachestat(2) is there (Linux 6.5): the runs are the file's from 8192
            assert runs == drv.host_runs_nowait(8192, 65536)
            assert runs[0][2] == 8192
        view = memoryview(bytearray(4096))
        if shifted.readinto_nowait(0, view):
            assert bytes(view) == buf[8192:8192 + 4096]
    finally:
        await drv.close()
