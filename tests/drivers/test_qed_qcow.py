"""The qed and qcow drivers directly: power cuts at every sync boundary leave qed images that qemu-img
checks clean (leaks aside) with every flushed write in place; writes over a backing file keep the backing
bytes around them; read-only opens refuse writes; cache eviction under a tiny budget keeps the data."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagecore.driver import ImageOpener
from imagecore.errors import ReadOnlyError
from imagecore.formats.twolevel import TwoLevelDriver
from tests.drivers.test_powerloss import Harness, open_drv, pattern
from tests.peers import peer, run

KiB = 1 << 10
MiB = 1 << 20


def qed(work: Path, size: int, *opts: str, backing: Path | None = None) -> Path:
    img = work / "img.qed"
    args: list[str | Path] = ["create", "-q", "-f", "qed", "-o", ",".join(opts or ("cluster_size=4096",))]
    if backing is not None:
        args += ["-b", backing.name, "-F", "raw"]
    run(peer("qemu-img"), *args, img, str(size))
    return img


async def test_qed_power_loss_allocation(work: Path) -> None:
    size = 4 * MiB
    img = qed(work, size, "cluster_size=4096,table_size=2")
    h = Harness(work, "qed", img)
    h.start(bytes(size))
    d = await open_drv(h)
    h.plan.label = "qed allocation"
    await h.write(d, 0, pattern(60, 64 * KiB))
    await h.flush(d)
    await h.write(d, 100 * KiB, pattern(61, 3000))        # part of a cluster: the rest reads as zeroes
    await h.write(d, 3 * MiB + 512, pattern(62, 70 * KiB))  # a second L2 table
    await h.flush(d)
    await h.zero(d, 8 * KiB, 16 * KiB, may_trim=True)      # whole clusters: allocated ones keep zeroes
    await h.zero(d, 2 * MiB, 64 * KiB, may_trim=True)      # unallocated: zero clusters
    await h.write(d, 100 * KiB + 1000, pattern(63, 100), fua=True)
    await h.close(d)
    h.report("qed allocation")


async def test_qed_power_loss_over_raw_backing(work: Path) -> None:
    size = 2 * MiB
    base = work / "base.raw"
    base_data = pattern(44, 1 * MiB)
    base.write_bytes(base_data)  # shorter than the image: the tail reads as zeroes
    img = qed(work, size, "cluster_size=4096", backing=base)
    h = Harness(work, "qed", img)
    h.start(base_data + bytes(size - len(base_data)))
    d = await open_drv(h)
    h.plan.label = "qed cow"
    await h.write(d, 10 * KiB + 5, pattern(71, 1000))  # the rest of the cluster comes from the backing file
    await h.flush(d)
    await h.write(d, 1 * MiB - 100, pattern(72, 200))  # across the backing file's end
    await h.zero(d, 64 * KiB, 8 * KiB, may_trim=False)  # zero clusters hide the backing file
    await h.flush(d)
    await h.close(d)
    h.report("qed over a raw backing file")


@pytest.mark.parametrize("fmt", ["qed", "qcow"])
async def test_read_only_open_refuses_writes(tmp_path: Path, fmt: str) -> None:
    img = tmp_path / f"r.{fmt}"
    run(peer("qemu-img"), "create", "-q", "-f", fmt, img, "1M")
    d = await ImageOpener().open(str(img), fmt, read_only=True)
    try:
        with pytest.raises(ReadOnlyError):
            await d.write(0, memoryview(b"x" * 512))
        assert not d.caps.writable
    finally:
        await d.close()


@pytest.mark.parametrize("fmt", ["qed", "qcow"])
async def test_tiny_cache_write_back_and_reread(tmp_path: Path, fmt: str) -> None:
    """With one table allowed in the cache every new entry forces a write-back; qemu reads it all back."""
    img = tmp_path / f"c.{fmt}"
    run(peer("qemu-img"), "create", "-q", "-f", fmt, img, "8M")
    d = await ImageOpener().open(str(img), fmt, read_only=False)
    assert isinstance(d, TwoLevelDriver)
    d._budget = 1
    model = bytearray(8 * MiB)
    try:
        for i, off in enumerate(range(0, 8 * MiB, 1 * MiB + 4096)):
            data = pattern(i + 1, 20_000)
            await d.write(off, memoryview(data))
            model[off:off + len(data)] = data
    finally:
        await d.close()
    raw = tmp_path / "c.raw"
    run(peer("qemu-img"), "convert", "-f", fmt, "-O", "raw", img, raw)
    assert raw.read_bytes() == bytes(model)


async def test_qed_req_one_block_status_maps_a_window(tmp_path: Path) -> None:
    """A block-status request with NBD_CMD_FLAG_REQ_ONE (QEMU's kind) maps a few clusters, not the rest of
    an L2 table: mapping the rest made `qemu-img map` over NBD of a qed image of 16,384 runs take 75 s
    (qemu-nbd: 1.8 s). The extents of the whole disk stay qemu-img map's."""
    import json

    from nbdproto.constants import META_BASE_ALLOCATION
    from nbdsrv import backend

    img = qed(tmp_path, 64 * MiB, "cluster_size=65536")
    run(peer("qemu-io"), "-f", "qed", *[a for i in range(64) for a in ("-c", f"write -P 9 {i * 128}k 64k")],
        img)
    expect = [(e["start"], e["length"], e["data"]) for e in json.loads(
        run(peer("qemu-img"), "map", "--output=json", "-f", "qed", img).stdout)]
    drv = await ImageOpener().open(str(img), "qed", read_only=True)
    assert isinstance(drv, TwoLevelDriver)
    try:
        mapped: list[int] = []
        real = drv._map

        async def counting(offset: int, length: int):  # type: ignore[no-untyped-def]
            mapped.append(length)
            return await real(offset, length)

        drv._map = counting  # type: ignore[method-assign]
        for offset in (0, 64 * 1024, 3 * 128 * 1024):
            mapped.clear()
            got = await backend.block_status(drv, META_BASE_ALLOCATION, offset, drv.size - offset,
                                             req_one=True)
            assert len(got) == 1 and sum(mapped) <= 32 * 65536, mapped
        whole = [(e.start, e.length, e.data) async for e in drv.extents(0, drv.size)]
        assert whole == expect
    finally:
        await drv.close()
