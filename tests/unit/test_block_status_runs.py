"""Block status over a raw file with many runs: the server looks up only the runs a reply needs, both on
the spot (extents_nowait) and through the driver's coroutine, and both answer alike.

QEMU asks every block status with NBD_CMD_FLAG_REQ_ONE, one run per request. When each such request made
the raw driver look up 1024 runs, `qemu-img map` over NBD of a file with 16,384 runs took 20 s instead of
0.9 (nbdkit: 0.6)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from imagecore.formats import open_image
from imagecore.formats.raw import RawDriver
from nbdproto.constants import META_BASE_ALLOCATION, META_QEMU_ALLOCATION_DEPTH, STATE_HOLE, STATE_ZERO
from nbdsrv import backend
from nbdsrv.backend import OffsetFilter, ReadOnlyFilter

RUNS = 512  # data runs: 4 KiB of data every 16 KiB
STEP = 16384


def _fragmented(path: Path) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, RUNS * STEP)
        for i in range(RUNS):
            os.pwrite(fd, b"\xa5" * 4096, i * STEP)
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def fragmented_raw(tmp_path: Path, *, read_only: bool = True) -> AsyncIterator[RawDriver]:
    """The raw driver on a file of RUNS data runs, each followed by a hole."""
    img = tmp_path / "frag.raw"
    _fragmented(img)
    drv = await open_image(str(img), "raw", read_only=read_only)
    assert isinstance(drv, RawDriver)
    try:
        yield drv
    finally:
        await drv.close()


def _count_lookups(drv: RawDriver) -> list[int]:
    """Count the runs the driver's host file looks up (each costs its lseeks)."""
    hf = drv.hf
    pulled = [0]
    real = hf.iter_data_runs

    def counting(start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        for run in real(start, end):
            pulled[0] += 1
            yield run

    hf.iter_data_runs = counting  # type: ignore[method-assign]
    return pulled


async def test_req_one_looks_up_two_runs(tmp_path: Path) -> None:
    async with fragmented_raw(tmp_path) as drv:
        pulled = _count_lookups(drv)
        size = RUNS * STEP
        for offset in (0, 4096, 5 * STEP):
            pulled[0] = 0
            now = backend.block_status_nowait(drv, META_BASE_ALLOCATION, offset, size - offset, req_one=True)
            assert pulled[0] <= 2, pulled[0]  # the run, and where it ends
            pulled[0] = 0
            later = await backend.block_status(drv, META_BASE_ALLOCATION, offset, size - offset, req_one=True)
            assert pulled[0] <= 2, pulled[0]
            assert now == later and now is not None and len(now) == 1
        assert backend.block_status_nowait(drv, META_BASE_ALLOCATION, 0, size, req_one=True) == [(4096, 0)]
        assert backend.block_status_nowait(drv, META_BASE_ALLOCATION, 4096, size, req_one=True) == \
            [(STEP - 4096, STATE_HOLE | STATE_ZERO)]
        # every run of a raw file is allocated at depth 1: one extent, however many runs it spans
        depth = backend.block_status_nowait(drv, META_QEMU_ALLOCATION_DEPTH, 4096, size - 4096, req_one=True)
        assert depth == [(size - 4096, 1)]
        assert depth == await backend.block_status(drv, META_QEMU_ALLOCATION_DEPTH, 4096, size - 4096,
                                                   req_one=True)


async def test_whole_map_alike_on_the_spot_and_through_the_coroutine(tmp_path: Path) -> None:
    """Without REQ_ONE every run of the range comes back, the same both ways, and through a filter that
    keeps the layer's extents; one that maps them (an offset) leaves the request to the coroutine."""
    async with fragmented_raw(tmp_path) as drv:
        size = RUNS * STEP
        now = backend.block_status_nowait(drv, META_BASE_ALLOCATION, 0, size, req_one=False)
        later = await backend.block_status(drv, META_BASE_ALLOCATION, 0, size, req_one=False)
        assert now == later
        assert now == [(4096, 0), (STEP - 4096, STATE_HOLE | STATE_ZERO)] * RUNS
        # a range that ends inside a run: the final extent goes on to the run's end (the NBD spec allows
        # it), which saves a client that maps the disk a request; REQ_ONE stays within the request
        assert backend.block_status_nowait(drv, META_BASE_ALLOCATION, 0, 6000, req_one=False) == \
            [(4096, 0), (STEP - 4096, STATE_HOLE | STATE_ZERO)]
        assert backend.block_status_nowait(drv, META_BASE_ALLOCATION, 0, 6000, req_one=False) == \
            await backend.block_status(drv, META_BASE_ALLOCATION, 0, 6000, req_one=False)
        assert backend.block_status_nowait(drv, META_BASE_ALLOCATION, 4096, 10, req_one=True) == \
            [(10, STATE_HOLE | STATE_ZERO)]
        assert backend.block_status_nowait(ReadOnlyFilter(drv), META_BASE_ALLOCATION, 0, size,
                                           req_one=False) == now
        assert backend.block_status_nowait(OffsetFilter(drv, 4096), META_BASE_ALLOCATION, 0, STEP,
                                           req_one=False) is None
        hole = STATE_HOLE | STATE_ZERO
        assert await backend.block_status(OffsetFilter(drv, 4096), META_BASE_ALLOCATION, 0, STEP,
                                          req_one=False) == [(STEP - 4096, hole), (4096, 0)]


async def test_unsynced_writes_leave_the_lookup_to_the_pool(tmp_path: Path) -> None:
    """SEEK_DATA may be slow over dirty pages: with writes not yet synced the server does not look runs up
    on its loop's thread, and the coroutine (which walks them on the I/O pool) answers instead."""
    async with fragmented_raw(tmp_path, read_only=False) as drv:
        await drv.write(8192, memoryview(b"\x5a" * 4096))
        assert backend.block_status_nowait(drv, META_BASE_ALLOCATION, 0, STEP, req_one=False) is None
        assert await backend.block_status(drv, META_BASE_ALLOCATION, 0, STEP, req_one=False) == \
            [(4096, 0), (4096, STATE_HOLE | STATE_ZERO), (4096, 0), (4096, STATE_HOLE | STATE_ZERO)]
        await drv.flush()
        assert backend.block_status_nowait(drv, META_BASE_ALLOCATION, 0, STEP, req_one=False) == \
            [(4096, 0), (4096, STATE_HOLE | STATE_ZERO), (4096, 0), (4096, STATE_HOLE | STATE_ZERO)]


async def test_lookahead_takes_a_bounded_number_of_extents(tmp_path: Path) -> None:
    """qemu:allocation-depth on a raw file is one run over every data run and hole: a reply's final
    extent runs on past the request over at most LOOKAHEAD_EXTENTS of them, each costing its lseeks."""
    async with fragmented_raw(tmp_path) as drv:
        pulled = _count_lookups(drv)
        got = backend.block_status_nowait(drv, META_QEMU_ALLOCATION_DEPTH, 0, STEP, req_one=False)
        assert got is not None and len(got) == 1 and got[0][1] == 1
        assert STEP < got[0][0] < RUNS * STEP  # ran on past the request, and stopped
        assert pulled[0] <= 2 + 2 + backend.LOOKAHEAD_EXTENTS + 1, pulled[0]
        # base:allocation stops at the first run of other flags
        pulled[0] = 0
        assert backend.block_status_nowait(drv, META_BASE_ALLOCATION, 0, 6000, req_one=False) == \
            [(4096, 0), (STEP - 4096, STATE_HOLE | STATE_ZERO)]
        assert pulled[0] <= 3, pulled[0]
