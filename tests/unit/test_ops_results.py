"""The offline verbs as an API: typed results, progress and cancellation, each against qemu-img's answer."""

from __future__ import annotations

import asyncio
import errno
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from imagecore.driver import BlockDriver, ImageOpener, OpenContext
from imagecore.errors import BlockError, NotFoundError, OperationCancelledError
from imagecore.ops import check as check_op
from imagecore.ops import convert as convert_op
from imagecore.ops import create as create_op
from imagecore.ops import info as info_op
from imagecore.ops import map as map_op
from tests.peers import peer, run

MiB = 1 << 20


def qemu_img(*args: str | Path, ok: tuple[int, ...] = (0,)) -> str:
    proc = run(peer("qemu-img"), *args, check=False)
    assert proc.returncode in ok, proc.stderr.decode()
    return proc.stdout.decode()


def qemu_io(img: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args: list[str] = []
    for c in cmds:
        args += ["-c", c]
    run(peer("qemu-io"), "-f", fmt, *args, img)


def chain(work: Path) -> tuple[Path, Path]:
    """A qcow2 base with data and a qcow2 overlay over it with data of its own."""
    base, top = work / "base.qcow2", work / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    qemu_io(base, "write -P 1 0 1M", "write -P 2 8M 64k", "write -z 12M 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    qemu_io(top, "write -P 3 512k 1M", "write -z 8M 64k")
    return base, top


class RecordingOpener(ImageOpener):
    """Stands for a pool's opener: its own resolve and open_backing, which the verbs must respect."""

    def __init__(self) -> None:
        super().__init__(lock=True)
        self.resolved: list[str] = []
        self.backings: list[str] = []

    def resolve(self, name: str, relative_to: str | None) -> str:
        self.resolved.append(name)
        return super().resolve(name, relative_to)

    async def open_backing(self, name: str, fmt: str | None, ctx: OpenContext) -> BlockDriver:
        self.backings.append(name)
        return await super().open_backing(name, fmt, ctx)


# -- info ---------------------------------------------------------------------------------------------

async def test_info_records_are_qemu_imgs(work: Path) -> None:
    _, top = chain(work)
    res = await info_op.info(str(top), None)
    assert res.to_json() == json.loads(qemu_img("info", "--output=json", top))
    assert len(res.images) == 1
    calls: list[tuple[int, int]] = []
    res = await info_op.info(str(top), None, backing_chain=True, progress=lambda d, t: calls.append((d, t)))
    expect = json.loads(qemu_img("info", "--output=json", "--backing-chain", top))
    assert isinstance(res.to_json(), list) and res.to_json() == expect
    assert [i["filename"] for i in res.images] == [str(top), str(work / "base.qcow2")]
    assert calls == [(1, 2), (2, 2)]


async def test_info_with_an_opener_leaves_the_backing_file_closed(work: Path) -> None:
    base, top = chain(work)
    opener = RecordingOpener()
    res = await info_op.info(str(top), "qcow2", opener=opener)
    assert opener.backings == []  # the opener's own open_backing was never asked
    assert "base.qcow2" in opener.resolved  # ... but its resolve named the backing file
    assert res.to_json() == json.loads(qemu_img("info", "--output=json", top))
    assert opener.consistent_read and not opener.force_share  # the caller's opener is left as it was
    base.unlink()  # plain info does not need the backing file, as qemu-img's does not
    missing = await info_op.info(str(top), "qcow2", opener=opener)
    assert missing.to_json() == json.loads(qemu_img("info", "--output=json", top))
    res = await info_op.info(str(top), "qcow2", opener=RecordingOpener(), backing_chain=False)
    assert res.images[0]["full-backing-filename"] == str(base)


async def test_info_with_an_opener_walks_the_chain_through_it(work: Path) -> None:
    _, top = chain(work)
    opener = RecordingOpener()
    res = await info_op.info(str(top), "qcow2", opener=opener, backing_chain=True)
    assert opener.backings == ["base.qcow2"]
    assert res.to_json() == json.loads(qemu_img("info", "--output=json", "--backing-chain", top))


async def test_info_cancelled_before_it_opens(work: Path) -> None:
    _, top = chain(work)
    cancel = asyncio.Event()
    cancel.set()
    with pytest.raises(OperationCancelledError) as exc:
        await info_op.info(str(top), None, cancel=cancel)
    assert exc.value.errno == errno.ECANCELED and exc.value.exit_code == 1
    assert exc.value.json_class == "GenericError" and str(exc.value) == "Operation cancelled"
    assert isinstance(exc.value, BlockError)


# -- check --------------------------------------------------------------------------------------------

def qcow2_with_data(path: Path) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "8M")
    qemu_io(path, "write -P 1 0 256k", "write -P 2 4M 64k")
    return path


def leak_two_clusters(img: Path) -> None:
    """Append two clusters the refcount table counts but nothing references: two leaks."""
    with img.open("r+b") as f:
        hdr = f.read(104)
        cluster_bits = struct.unpack(">I", hdr[20:24])[0]
        rt_offset = struct.unpack(">Q", hdr[48:56])[0]
        f.seek(rt_offset)
        rb_offset = struct.unpack(">Q", f.read(8))[0]
        size = f.seek(0, 2)
        f.truncate(size + (2 << cluster_bits))
        for index in (size >> cluster_bits, (size >> cluster_bits) + 1):
            f.seek(rb_offset + 2 * index)
            f.write(struct.pack(">H", 1))


def qemu_check(img: Path, *extra: str) -> tuple[int, dict[str, Any], list[str]]:
    proc = run(peer("qemu-img"), "check", "--output=json", *extra, img, check=False)
    lines = [ln for ln in proc.stderr.decode().splitlines() if ln.strip()]
    return proc.returncode, json.loads(proc.stdout), lines


async def test_check_clean(work: Path) -> None:
    img = qcow2_with_data(work / "clean.qcow2")
    rc, expect, _ = qemu_check(img)
    calls: list[tuple[int, int]] = []
    rep = await check_op.check(str(img), None, progress=lambda d, t: calls.append((d, t)))
    assert (rep.exit_code, rep.to_json()) == (rc, expect) == (0, expect)
    assert rep.error is None and rep.messages == [] and not rep.repaired and rep.format == "qcow2"
    assert rep.result is not None and rep.result.leaks == 0
    assert calls == [(0, 1), (1, 1)]


async def test_check_leaks_and_their_repair(work: Path) -> None:
    img = qcow2_with_data(work / "leaky.qcow2")
    leak_two_clusters(img)
    twin = work / "twin.qcow2"
    twin.write_bytes(img.read_bytes())
    rc, expect, lines = qemu_check(img)
    rep = await check_op.check(str(img), "qcow2")
    assert rc == rep.exit_code == check_op.EXIT_LEAKS
    assert rep.to_json() == expect and expect["leaks"] == 2
    assert rep.messages == [ln for ln in lines if not ln.startswith("qemu-img:")]
    assert len(rep.messages) == 2 and rep.error is None
    calls: list[tuple[int, int]] = []
    fixed = await check_op.check(str(img), "qcow2", repair="leaks",
                                 progress=lambda d, t: calls.append((d, t)))
    rc, expect, _ = qemu_check(twin, "-r", "leaks")
    assert rc == fixed.exit_code == 0
    assert fixed.fixed == (2, 0) and fixed.repaired
    got = fixed.to_json()
    got["filename"] = str(twin)
    assert got == expect and expect["leaks-fixed"] == 2
    assert calls == [(0, 1), (1, 2), (2, 2)]
    after = await check_op.check(str(img), "qcow2")
    assert after.exit_code == 0 and after.to_json() == qemu_check(img)[1]


async def test_check_a_format_without_checks(work: Path) -> None:
    img = work / "r.raw"
    qemu_img("create", "-q", "-f", "raw", img, "1M")
    rep = await check_op.check(str(img), None)
    assert rep.result is None and rep.exit_code == 63 == qemu_check_rc(img)
    assert rep.error == "This image format does not support checks" and rep.to_json() == {}


def qemu_check_rc(img: Path) -> int:
    return run(peer("qemu-img"), "check", img, check=False).returncode


async def test_check_through_an_opener(work: Path) -> None:
    _, top = chain(work)
    opener = RecordingOpener()
    rep = await check_op.check(str(top), "qcow2", opener=opener)
    assert rep.exit_code == 0 and rep.to_json() == qemu_check(top)[1]
    # the chain is opened first, by an unlocking copy that still goes through the opener's own methods
    assert opener.backings == ["base.qcow2"] and "base.qcow2" in opener.resolved
    assert opener.lock and "open_backing" not in vars(opener)  # the caller's opener is left as it was
    (work / "base.qcow2").unlink()
    with pytest.raises(NotFoundError) as exc:
        await check_op.check(str(top), "qcow2", opener=opener)
    qemu = run(peer("qemu-img"), "check", top, check=False)
    assert qemu.returncode == exc.value.exit_code == 1
    assert qemu.stderr.decode() == f"qemu-img: {exc.value}\n"


# -- map ----------------------------------------------------------------------------------------------

async def test_map_entries_are_qemu_imgs(work: Path) -> None:
    _, top = chain(work)
    async with map_op.open_map(str(top), None) as entries:
        got = [e.to_json() async for e in entries]
    assert got == json.loads(qemu_img("map", "--output=json", top))
    assert any("offset" in e for e in got) and any(e["depth"] == 1 for e in got)
    calls: list[tuple[int, int]] = []
    async with map_op.open_map(str(top), "qcow2", start=256 << 10, max_length=9 * MiB,
                               progress=lambda d, t: calls.append((d, t))) as entries:
        got = [e.to_json() async for e in entries]
    assert got == json.loads(qemu_img("map", "--output=json", "--start-offset=256k", "--max-length=9M", top))
    assert calls[-1] == (9 * MiB, 9 * MiB) and calls == sorted(calls)
    # the entries' text form is the one qemu-img prints
    async with map_op.open_map(str(top), None) as entries:
        text = "[" + ",\n".join([e.json() async for e in entries]) + "]\n"
    assert text == qemu_img("map", "--output=json", top)


async def test_map_stopped_early_and_cancelled(work: Path) -> None:
    _, top = chain(work)
    async with map_op.open_map(str(top), None) as entries:
        async for _ in entries:
            break
    # the image is closed again: a writer gets its lock
    qemu_io(top, "write -P 9 0 4k")
    cancel = asyncio.Event()
    seen = 0
    with pytest.raises(OperationCancelledError):
        async with map_op.open_map(str(top), None, cancel=cancel) as entries:
            async for _ in entries:
                seen += 1
                cancel.set()
    assert seen == 1
    qemu_io(top, "write -P 9 0 4k")


# -- convert ------------------------------------------------------------------------------------------

def sparse_data_source(path: Path, size: int, every: int) -> Path:
    """A raw image of ``size`` with 64 KiB of data at each ``every`` bytes and holes between."""
    qemu_img("create", "-q", "-f", "raw", path, str(size))
    cmds = [f"write -P {(i // every) % 250 + 1} {i} 64k" for i in range(0, size, every)]
    qemu_io(path, *cmds, fmt="raw")
    return path


async def test_convert_progress_rises_to_the_total(work: Path) -> None:
    src = sparse_data_source(work / "src.raw", 64 * MiB, 4 * MiB)
    dst = work / "dst.qcow2"
    calls: list[tuple[int, int]] = []
    o = convert_op.ConvertOptions(sources=[str(src)], target=str(dst), src_fmt="raw", out_fmt="qcow2")
    stats = await convert_op.convert(o, progress=lambda d, t: calls.append((d, t)))
    total = 64 * MiB
    assert stats.total == total and stats.seconds > 0
    counted = 16 * 64 * 1024  # the progress counts the data, as qemu-img's (the holes are not copied)
    assert calls[0] == (0, counted) and calls[-1] == (counted, counted)
    assert all(t == counted for _, t in calls)
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and len(set(dones)) > 10
    assert stats.bytes_read == 16 * 64 * 1024  # the holes are never read
    assert stats.bytes_written == 16 * 64 * 1024  # ... the data is written once
    assert stats.bytes_zeroed == total - stats.bytes_written
    run(peer("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", src, dst)
    assert json.loads(qemu_img("info", "--output=json", dst))["virtual-size"] == total


async def test_convert_cancelled_midway_leaves_no_target(work: Path) -> None:
    src = sparse_data_source(work / "big.raw", 256 * MiB, 1 * MiB)
    dst = work / "out.qcow2"
    cancel = asyncio.Event()
    calls: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        calls.append((done, total))
        if len(calls) > 1:
            cancel.set()  # after the first chunk: the copy is under way

    o = convert_op.ConvertOptions(sources=[str(src)], target=str(dst), src_fmt="raw", out_fmt="qcow2")
    with pytest.raises(OperationCancelledError):
        await convert_op.convert(o, progress=progress, cancel=cancel)
    assert not dst.exists()
    assert 0 < calls[-1][0] < 256 * MiB // 2, calls[-1]
    assert sorted(p.name for p in work.iterdir()) == ["big.raw"]
    # the source is closed and unlocked again
    qemu_io(src, "write -P 7 0 4k", fmt="raw")


async def test_convert_cancelled_into_an_existing_target_keeps_it(work: Path) -> None:
    src = sparse_data_source(work / "src.raw", 64 * MiB, 1 * MiB)
    dst = work / "keep.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", dst, "64M")
    cancel = asyncio.Event()
    calls: list[int] = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        # the progress counts chunks as copiers take them; by half of them, with at most 16 queued,
        # some have been copied
        if done >= total // 2:
            cancel.set()

    o = convert_op.ConvertOptions(sources=[str(src)], target=str(dst), src_fmt="raw", out_fmt="qcow2",
                                  skip_create=True)
    with pytest.raises(OperationCancelledError):
        await convert_op.convert(o, progress=progress, cancel=cancel)
    assert 0 < calls[-1] < 64 * MiB
    # -n: the target was the caller's and stays, a consistent image holding what was copied before the stop
    rc, found, lines = qemu_check(dst)
    assert rc == 0 and not found.get("leaks") and not found.get("corruptions"), lines
    copied = [e for e in json.loads(qemu_img("map", "--output=json", dst)) if e["data"]]
    assert copied and copied[0]["start"] == 0
    end = copied[-1]["start"] + copied[-1]["length"]
    assert end < 64 * MiB
    # the chunks are taken in order and stop at once, so what was copied is a prefix of the source
    back = work / "back.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", dst, back)
    assert back.read_bytes()[:end] == src.read_bytes()[:end]


# -- create -------------------------------------------------------------------------------------------

async def test_create_returns_the_formatting_line(work: Path) -> None:
    (work / "q").mkdir()
    (work / "o").mkdir()
    ours, theirs = work / "o" / "disk.qcow2", work / "q" / "disk.qcow2"
    expect = qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096,lazy_refcounts=on", theirs, "3G")
    shown: list[str] = []
    opts = {"cluster_size": "4096", "lazy_refcounts": "on"}
    res = await create_op.create(str(ours), "qcow2", 3 << 30, opts, on_formatting=shown.append)
    assert res.formatting == expect.rstrip("\n").replace(str(theirs), str(ours))
    assert shown == [res.formatting]
    assert (res.path, res.format, res.size) == (str(ours), "qcow2", 3 << 30)
    assert json.loads(qemu_img("info", "--output=json", ours))["virtual-size"] == 3 << 30
    # an overlay takes its size from the backing file
    over = await create_op.create(str(work / "o" / "over.qcow2"), "qcow2", None, {}, backing="disk.qcow2",
                                  backing_fmt="qcow2")
    assert over.size == 3 << 30
    expect = qemu_img("create", "-f", "qcow2", "-b", "disk.qcow2", "-F", "qcow2", work / "q" / "over.qcow2")
    assert over.formatting == expect.rstrip("\n").replace(str(work / "q"), str(work / "o"))


async def test_create_cancelled_before_it_writes(work: Path) -> None:
    cancel = asyncio.Event()
    cancel.set()
    with pytest.raises(OperationCancelledError) as exc:
        await create_op.create(str(work / "x.qcow2"), "qcow2", MiB, {}, cancel=cancel)
    assert str(exc.value) == "Operation cancelled"
    assert not (work / "x.qcow2").exists()
