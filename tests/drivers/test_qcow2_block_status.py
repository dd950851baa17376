"""qcow2 block status as the server asks it: mapped a window at a time (so that a request with
NBD_CMD_FLAG_REQ_ONE, QEMU's kind, maps a few clusters, not a whole table), and answered on the spot from
cached tables (extents_nowait) alike with the coroutine, on images qemu-io wrote.

Mapping a whole table of alternating clusters for each REQ_ONE request made `qemu-img map` over NBD of
16,384 such clusters take 45-55 s (qemu-nbd 10: 0.6-1.25 s)."""

from __future__ import annotations

from pathlib import Path

from imagecore.driver import BlockDriver
from imagecore.extent import merge_extents
from imagecore.formats import open_image
from imagecore.formats.qcow2.driver import Qcow2Driver
from nbdproto.constants import META_BASE_ALLOCATION, META_QEMU_ALLOCATION_DEPTH
from nbdsrv import backend
from tests.peers import peer, run

MiB = 1 << 20
CS = 65536


def _image(path: Path, *cmds: str, opts: str = "cluster_size=65536") -> Path:
    run(peer("qemu-img"), "create", "-f", "qcow2", "-o", opts, path, "64M")
    args: list[str] = []
    for c in cmds:
        args += ["-c", c]
    if args:
        run(peer("qemu-io"), "-f", "qcow2", *args, path)
    return path


def _alternating(path: Path) -> Path:
    """A cluster of data every other cluster over the first 16 MiB, a zeroed cluster and a discarded one."""
    cmds = [f"write -P 0x5a {i * 2 * CS} {CS}" for i in range(128)]
    return _image(path, *cmds, "write -z 20M 64k", "write -c -P 0x33 24M 64k", "write -P 1 32M 64k",
                  "discard 32M 64k")


async def _extents_async(drv: BlockDriver, offset: int, length: int) -> list[tuple[int, int, bool, bool]]:
    return [(e.start, e.length, e.data, e.zero) async for e in drv.extents(offset, length)]


async def test_req_one_maps_a_window(tmp_path: Path) -> None:
    img = _alternating(tmp_path / "alt.qcow2")
    drv = await open_image(str(img), "qcow2")
    assert isinstance(drv, Qcow2Driver)
    try:
        mapped: list[int] = []
        real_map, real_nowait = drv._map, drv._map_nowait

        async def counting_map(offset: int, length: int):  # type: ignore[no-untyped-def]
            mapped.append(length)
            return await real_map(offset, length)

        def counting_nowait(offset: int, length: int):  # type: ignore[no-untyped-def]
            mapped.append(length)
            return real_nowait(offset, length)

        drv._map = counting_map  # type: ignore[method-assign]
        drv._map_nowait = counting_nowait  # type: ignore[method-assign]
        size = drv.size
        for offset in (0, CS, 3 * CS, 200 * CS + 4096):
            mapped.clear()
            later = await backend.block_status(drv, META_BASE_ALLOCATION, offset, size - offset, req_one=True)
            assert sum(mapped) <= 32 * CS, mapped
            mapped.clear()
            now = backend.block_status_nowait(drv, META_BASE_ALLOCATION, offset, size - offset, req_one=True)
            assert sum(mapped) <= 32 * CS, mapped
            assert now == later and len(later) == 1
    finally:
        await drv.close()


async def test_on_the_spot_answers_agree_with_the_coroutine(tmp_path: Path) -> None:
    """Data, zero, compressed and discarded clusters: the same extents both ways once the tables are
    cached, for both contexts, from offsets on and off cluster boundaries; the spot answer is refused
    (None) before the first table is read, and for an image with a backing file."""
    img = _alternating(tmp_path / "alt.qcow2")
    drv = await open_image(str(img), "qcow2")
    assert isinstance(drv, Qcow2Driver)
    try:
        size = drv.size
        assert drv.extents_nowait(0, size) is None  # nothing is cached yet
        whole = await _extents_async(drv, 0, size)
        assert len(whole) > 256
        nowait = drv.extents_nowait(0, size)
        assert nowait is not None
        assert list(merge_extents(nowait)) == list(merge_extents([e async for e in drv.extents(0, size)]))
        for ctx in (META_BASE_ALLOCATION, META_QEMU_ALLOCATION_DEPTH):
            for offset, length in ((0, size), (CS + 512, 10 * CS), (20 * MiB - 4096, 8 * MiB),
                                   (24 * MiB, CS), (32 * MiB + 100, 1000)):
                for req_one in (False, True):
                    now = backend.block_status_nowait(drv, ctx, offset, length, req_one=req_one)
                    later = await backend.block_status(drv, ctx, offset, length, req_one=req_one)
                    assert now == later, (ctx, offset, length, req_one)
    finally:
        await drv.close()
    base = _image(tmp_path / "base.qcow2", "write -P 7 0 1M")
    top = tmp_path / "top.qcow2"
    run(peer("qemu-img"), "create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    drv = await open_image(str(top), "qcow2")
    try:
        await _extents_async(drv, 0, drv.size)
        assert drv.extents_nowait(0, drv.size) is None
    finally:
        await drv.close()


async def test_full_map_through_windows_matches_qemu_img(tmp_path: Path) -> None:
    """The windows only change how much is mapped at a time: the merged extents of the whole disk are
    qemu-img map's."""
    import json

    img = _alternating(tmp_path / "alt.qcow2")
    expect = [(e["start"], e["length"], e["data"], e["zero"], e["present"])
              for e in json.loads(run(peer("qemu-img"), "map", "--output=json", img).stdout)]
    drv = await open_image(str(img), "qcow2")
    try:
        got: list[tuple[int, int, bool, bool, bool]] = []
        async for e in drv.extents(0, drv.size):
            if got and got[-1][2:] == (e.data, e.zero, e.present) and got[-1][0] + got[-1][1] == e.start:
                got[-1] = (got[-1][0], got[-1][1] + e.length, e.data, e.zero, e.present)
            else:
                got.append((e.start, e.length, e.data, e.zero, e.present))
        assert got == expect
    finally:
        await drv.close()


async def test_on_the_spot_extents_stop_at_a_table_not_read(tmp_path: Path) -> None:
    """4 KiB clusters: a table maps 2 MiB. With only the first table read, the extents on the spot cover
    that table and stop; a block-status request they would not cover goes to the coroutine, which reads
    the tables (a shorter reply would cost the client a request)."""
    img = _image(tmp_path / "small.qcow2", "write -P 1 0 4k", "write -P 2 1M 4k", "write -P 3 3M 4k",
                 opts="cluster_size=4096")
    drv = await open_image(str(img), "qcow2")
    try:
        table = 2 * MiB
        first = await _extents_async(drv, 0, table)
        nowait = drv.extents_nowait(0, drv.size)
        assert nowait is not None
        got = [(e.start, e.length, e.data, e.zero) for e in nowait]
        assert got == first and got[-1][0] + got[-1][1] == table
        # a reply on the spot would cover less than asked: the coroutine answers instead
        assert backend.block_status_nowait(drv, META_BASE_ALLOCATION, 0, drv.size, req_one=False) is None
        assert backend.block_status_nowait(drv, META_BASE_ALLOCATION, 0, table, req_one=True) == [(4096, 0)]
        assert drv.extents_nowait(table, MiB) is None  # the second table is not read yet
        whole = await backend.block_status(drv, META_BASE_ALLOCATION, 0, drv.size, req_one=False)
        assert whole[:4] == [(4096, 0), (MiB - 4096, 3), (4096, 0), (2 * MiB - 4096, 3)]
    finally:
        await drv.close()


async def test_final_extent_runs_on_without_a_backing_file(tmp_path: Path) -> None:
    """Without REQ_ONE the final extent runs on past the request to where the run ends (the spec allows
    it, and a client mapping the disk saves a request); over a backing file it stays within the request."""
    img = _image(tmp_path / "a.qcow2", "write -P 1 0 64k", "write -P 2 8M 64k")
    drv = await open_image(str(img), "qcow2")
    try:
        got = await backend.block_status(drv, META_BASE_ALLOCATION, 0, MiB, req_one=False)
        assert got == [(CS, 0), (8 * MiB - CS, 3)]
        assert await backend.block_status(drv, META_BASE_ALLOCATION, 0, MiB, req_one=True) == [(CS, 0)]
    finally:
        await drv.close()
    top = tmp_path / "top.qcow2"
    run(peer("qemu-img"), "create", "-f", "qcow2", "-b", img, "-F", "qcow2", top)
    drv = await open_image(str(top), "qcow2")
    try:
        assert not drv.extents_lookahead()
        got = await backend.block_status(drv, META_BASE_ALLOCATION, 0, MiB, req_one=False)
        assert got == [(CS, 0), (MiB - CS, 3)]
    finally:
        await drv.close()
