"""image-bitmap-* on the admin socket: a backup tool's cycle (add, clients write over NBD, read the changes
as the bitmap's NBD context, clear), the other edits, qemu-img's words for what it refuses, and Busy while
the volume is exported or held by QEMU."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdsrv.admin.client import AdminClient, AdminError
from tests.bitmaps_util import bitmaps_of, check_clean, expected, nbd_map, qemu_map, wait_released
from tests.interop.nbdsrv_fixture import (
    NbdServer,
    admin_server,
    create_image,
    disk_path,
    make_pool,
    qemu_io_holding,
    volid,
)
from tests.peers import peer, run

MiB = 1 << 20


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[NbdServer, Path, Path]]:
    pool = make_pool(tmp_path / "pool")
    img = create_image(disk_path(pool, "disk-0", "qcow2"), "qcow2", "16M")
    other = create_image(disk_path(pool, "disk-1", "qcow2"), "qcow2", "16M")
    run(peer("qemu-img"), "bitmap", "--add", "-g", "4k", other, "ob")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write 12M 4k", other)
    with admin_server(tmp_path, pool) as (srv, admin):
        yield srv, admin, img


def test_a_backup_cycle_and_every_edit(served: tuple[NbdServer, Path, Path]) -> None:
    srv, admin, img = served
    other = disk_path(srv.pool, "disk-1", "qcow2")
    v = volid(img)

    async def body(c: AdminClient) -> None:
        listed = await c.execute("image-bitmap-add", {"volid": v, "name": "backup"})
        assert listed == [{"name": "backup", "granularity": 65536, "flags": ["auto"]}]
        assert listed == bitmaps_of(img)
        await c.execute("image-bitmap-add", {"volid": v, "name": "fine", "granularity": "4k",
                                             "disabled": True})
        run(peer("qemu-io"), "-f", "raw", "-c", "write 1M 4k", "-c", "write 5M 100k", srv.uri(v))
        wait_released(img)
        assert nbd_map(srv.uri(v), "backup") == expected(16 * MiB, 65536, [(MiB, 4096), (5 * MiB, 100 << 10)])
        wait_released(img)
        # the backup copied those ranges: start again from a clean bitmap
        await c.execute("image-bitmap-clear", {"volid": v, "name": "backup"})
        assert nbd_map(srv.uri(v), "backup") == [(0, 16 * MiB, False)]
        wait_released(img)
        await c.execute("image-bitmap-enable", {"volid": v, "name": "fine"})
        await c.execute("image-bitmap-disable", {"volid": v, "name": "backup"})
        run(peer("qemu-io"), "-f", "raw", "-c", "write 9M 4k", srv.uri(v))
        wait_released(img)
        listed = await c.execute("image-bitmap-merge", {"volid": v, "name": "backup", "source": "fine"})
        listed = await c.execute("image-bitmap-merge", {"volid": v, "name": "fine", "source": "ob",
                                                        "source-volid": volid(other)})
        assert listed == [{"name": "backup", "granularity": 65536, "flags": []},
                          {"name": "fine", "granularity": 4096, "flags": ["auto"]}] == bitmaps_of(img)
        assert qemu_map(img, "backup") == expected(16 * MiB, 65536, [(9 * MiB, 4096)])
        assert qemu_map(img, "fine") == expected(16 * MiB, 4096, [(9 * MiB, 4096), (12 * MiB, 4096)])
        await c.execute("image-bitmap-remove", {"volid": v, "name": "backup"})
        assert [b["name"] for b in bitmaps_of(img)] == ["fine"]
        # refusals, in qemu-img's words
        for cmd, args, words, cls in (
                ("image-bitmap-add", {"name": "fine"}, "Operation add on bitmap fine failed: Bitmap already "
                 "exists: fine", "GenericError"),
                ("image-bitmap-clear", {"name": "nope"}, "Operation clear on bitmap nope failed: "
                 "Dirty bitmap 'nope' not found", "NotFound"),
                ("image-bitmap-add", {"name": "x", "granularity": 1000}, "Granularity must be power of 2 and "
                 "at least 512", "GenericError"),
                ("image-bitmap-merge", {"name": "fine", "source": "nope"}, "Dirty bitmap 'nope' not found",
                 "NotFound")):
            with pytest.raises(AdminError) as err:
                await c.execute(cmd, {"volid": v, **args})
            assert words in str(err.value) and err.value.error_class == cls, err.value
        raw = create_image(disk_path(srv.pool, "disk-2", "raw"), "raw", "1M")
        with pytest.raises(AdminError) as err:
            await c.execute("image-bitmap-add", {"volid": volid(raw), "name": "x"})
        assert "only qcow2 volumes have persistent dirty bitmaps" in str(err.value)

    asyncio.run(_with(admin, body))
    check_clean(img)


def test_busy_while_exported_or_held(served: tuple[NbdServer, Path, Path]) -> None:
    srv, admin, img = served
    v = volid(img)
    run(peer("qemu-img"), "bitmap", "--add", img, "b0")

    async def body(c: AdminClient) -> None:
        before = img.read_bytes()
        proc = await asyncio.create_subprocess_exec(peer("qemu-io"), "-f", "raw", srv.uri(v),
                                                    stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"read 0 512\n")
        await proc.stdin.drain()
        await proc.stdout.readline()
        try:
            for cmd in ("image-bitmap-clear", "image-bitmap-remove", "image-bitmap-add"):
                with pytest.raises(AdminError) as err:
                    await c.execute(cmd, {"volid": v, "name": "b0"})
                assert err.value.error_class == "Busy"
        finally:
            proc.stdin.close()
            await proc.wait()
        wait_released(img)
        with qemu_io_holding(img, "qcow2"):
            with pytest.raises(AdminError) as err:
                await c.execute("image-bitmap-add", {"volid": v, "name": "held"})
            assert err.value.error_class == "Busy"
        assert [b["name"] for b in bitmaps_of(img)] == ["b0"]
        assert len(img.read_bytes()) == len(before)

    asyncio.run(_with(admin, body))


async def _with(admin: Path, body: object) -> None:
    async with await AdminClient.connect(str(admin)) as c:
        await body(c)  # type: ignore[operator]
