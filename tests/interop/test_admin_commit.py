"""`image-commit` on the admin socket: a job whose result and images agree with `qemu-img commit` on copies
of the same chain, with progress events, a base further down, Busy refusals (exported, held, templates)
and a cancellation that leaves the chain reading as before."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbdsrv.admin.client import AdminClient, AdminError
from tests.interop.nbdsrv_fixture import (
    NbdServer,
    admin_server,
    create_image,
    disk_path,
    make_pool,
    qemu_io_holding,
    start_server,
    volid,
    with_client,
)
from tests.peers import peer, run


def _chain(pool: Path) -> tuple[Path, Path, Path]:
    """disk-0 (data) <- disk-1 (data) <- disk-2 (data, zeroes): three qcow2 volumes of VM 100."""
    qio = peer("qemu-io")
    d0 = create_image(disk_path(pool, "disk-0", "qcow2"), "qcow2", "8M")
    run(qio, "-f", "qcow2", "-c", "write -P 0x10 0 8M", d0)
    d1 = create_image(disk_path(pool, "disk-1", "qcow2"), "qcow2", "8M", "-b", d0.name, "-F", "qcow2")
    run(qio, "-f", "qcow2", "-c", "write -P 0x11 1M 2M", d1)
    d2 = create_image(disk_path(pool, "disk-2", "qcow2"), "qcow2", "12M", "-b", d1.name, "-F", "qcow2")
    run(qio, "-f", "qcow2", "-c", "write -P 0x12 2M 1M", "-c", "write -z 4M 64k", "-c", "write -P 0x13 9M 1M",
        d2)
    return d0, d1, d2


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[NbdServer, Path, Path]]:
    pool = make_pool(tmp_path / "pool")
    _chain(pool)
    pristine = tmp_path / "pristine"
    shutil.copytree(pool, pristine)
    with admin_server(tmp_path, pool) as (srv, admin):
        yield srv, admin, pristine



def _images(pool: Path) -> Path:
    return pool / "images" / "100"


def _qemu_commit(pristine: Path, work: Path, *args: str) -> Path:
    """qemu-img commit on a copy of the pristine pool; returns the copy's image folder."""
    shutil.copytree(pristine, work)
    subprocess.run([peer("qemu-img"), "commit", "-q", *args], cwd=_images(work), check=True,
                   capture_output=True)
    return _images(work)


def _same_images(ours: Path, theirs: Path) -> None:
    for img in sorted(theirs.iterdir()):
        run(peer("qemu-img"), "compare", "-U", img, ours / img.name)
        run(peer("qemu-img"), "check", "-U", ours / img.name)
        assert json.loads(run(peer("qemu-img"), "info", "-U", "--output=json", ours / img.name).stdout)[
            "virtual-size"] == json.loads(run(peer("qemu-img"), "info", "-U", "--output=json", img).stdout)[
            "virtual-size"]


async def _events(c: AdminClient, job: str) -> list[dict[str, Any]]:
    await asyncio.sleep(0.2)
    out = []
    while not c.events.empty():
        ev = c.events.get_nowait()
        if ev.get("event") == "JOB_STATUS_CHANGE" and ev["data"].get("id") == job:
            out.append(ev["data"])
    return out


def test_commit_job_agrees_with_qemu_img(served: tuple[NbdServer, Path, Path], tmp_path: Path) -> None:
    srv, admin, pristine = served
    d2 = disk_path(srv.pool, "disk-2", "qcow2")
    theirs = _qemu_commit(pristine, tmp_path / "q", d2.name)

    async def body(c: AdminClient) -> None:
        r = await c.execute("image-commit", {"volid": volid(d2), "job-id": "c1"})
        assert r == {"job-id": "c1"}
        rec = await c.execute("job-wait", {"id": "c1", "timeout": 60})
        assert rec["status"] == "concluded" and "error" not in rec, rec
        res = rec["result"]
        assert res["volid"] == volid(d2) and res["emptied"] is True and res["depth"] == 1
        # disk-1 (8 MiB) grew to disk-2's 12 MiB; 2 MiB of data and 64 KiB of zeroes went into it
        assert res["base-size"] == 8 << 20 and res["base-grown-to"] == 12 << 20
        assert res["bytes-copied"] == 2 << 20 and res["bytes-zeroed"] == 64 << 10
        assert rec["current-progress"] == rec["total-progress"] == 12 << 20
        evs = await _events(c, "c1")
        states = [e["status"] for e in evs]
        assert states[0] == "created" and "running" in states and states[-1] == "concluded"
        progress = [e["current-progress"] for e in evs]
        assert progress == sorted(progress)
        await c.execute("job-dismiss", {"id": "c1"})

    with_client(admin, body)
    _same_images(_images(srv.pool), theirs)
    entries = json.loads(run(peer("qemu-img"), "map", "--output=json", d2).stdout)
    assert all(e["depth"] >= 1 for e in entries)  # emptied: everything shows through


def test_commit_into_a_base_further_down(served: tuple[NbdServer, Path, Path], tmp_path: Path) -> None:
    srv, admin, pristine = served
    d0, d2 = disk_path(srv.pool, "disk-0", "qcow2"), disk_path(srv.pool, "disk-2", "qcow2")
    theirs = _qemu_commit(pristine, tmp_path / "q", "-b", d0.name, d2.name)

    async def body(c: AdminClient) -> None:
        await c.execute("image-commit", {"volid": volid(d2), "base": volid(d0), "job-id": "deep",
                                         "rate-limit": "1G"})
        rec = await c.execute("job-wait", {"id": "deep", "timeout": 60})
        assert rec["status"] == "concluded" and "error" not in rec, rec
        # never emptied: disk-1 would show through
        assert rec["result"]["emptied"] is False and rec["result"]["depth"] == 2

    with_client(admin, body)
    _same_images(_images(srv.pool), theirs)


def test_refusals(served: tuple[NbdServer, Path, Path]) -> None:
    srv, admin, _ = served
    d1, d2 = disk_path(srv.pool, "disk-1", "qcow2"), disk_path(srv.pool, "disk-2", "qcow2")
    tpl = create_image(disk_path(srv.pool, "disk-7", "qcow2", base=True), "qcow2", "1M")
    over = create_image(disk_path(srv.pool, "disk-8", "qcow2"), "qcow2", "1M", "-b", tpl.name, "-F", "qcow2")
    lone = create_image(disk_path(srv.pool, "disk-9", "qcow2"), "qcow2", "1M")
    before = {p.name: p.read_bytes() for p in _images(srv.pool).iterdir()}

    async def body(c: AdminClient) -> None:
        for args, cls, text in (
                ({"volid": volid(lone)}, "GenericError", "does not have a backing file"),
                ({"volid": volid(over)}, "GenericError", "read-only"),  # a template linked clones share
                ({"volid": volid(tpl)}, "GenericError", "read-only"),
                ({"volid": volid(d2), "base": volid(d2)}, "GenericError", "itself"),
                ({"volid": volid(d2), "rate-limit": -1}, "GenericError", "rate-limit"),
                ({"volid": volid(d2), "base": "local:100/vm-100-disk-5.qcow2"}, "NotFound",
                 "does not exist")):
            with pytest.raises(AdminError) as err:
                await c.execute("image-commit", args)
            assert err.value.error_class == cls and text in str(err.value), (args, err.value)
        # a base outside the chain fails in the job, with qemu-img's words
        await c.execute("image-commit", {"volid": volid(d1), "base": volid(lone), "job-id": "nope"})
        rec = await c.execute("job-wait", {"id": "nope", "timeout": 30})
        assert "Did not find" in rec.get("error", ""), rec

    with_client(admin, body)
    assert {p.name: p.read_bytes() for p in _images(srv.pool).iterdir()} == before


def test_busy_while_exported_or_held(served: tuple[NbdServer, Path, Path]) -> None:
    srv, admin, _ = served
    d1, d2 = disk_path(srv.pool, "disk-1", "qcow2"), disk_path(srv.pool, "disk-2", "qcow2")
    before = {p.name: p.read_bytes() for p in _images(srv.pool).iterdir()}
    import nbd

    for exported in (d2, d1):
        h = nbd.NBD()
        h.set_export_name(volid(exported))
        h.connect_tcp("127.0.0.1", str(srv.port))
        try:
            h.pread(512, 0)

            async def refused(c: AdminClient) -> None:
                with pytest.raises(AdminError) as err:
                    await c.execute("image-commit", {"volid": volid(d2)})
                assert err.value.error_class == "Busy", err.value

            with_client(admin, refused)
        finally:
            h.shutdown()
    # held by a VM: the worker meets its lock and answers Busy in the job's error
    for held in (d2, d1):
        with qemu_io_holding(held, "qcow2"):
            async def locked(c: AdminClient) -> None:
                await c.execute("image-commit", {"volid": volid(d2), "job-id": "h"})
                rec = await c.execute("job-wait", {"id": "h", "timeout": 30})
                assert '"write" lock' in rec.get("error", ""), rec
                await c.execute("job-dismiss", {"id": "h"})

            with_client(admin, locked)
    assert {p.name: p.read_bytes() for p in _images(srv.pool).iterdir()} == before


def test_cancel_leaves_the_chain_reading_as_before(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    qio = peer("qemu-io")
    base = create_image(disk_path(pool, "disk-0", "qcow2"), "qcow2", "64M")
    top = create_image(disk_path(pool, "disk-1", "qcow2"), "qcow2", "64M", "-b", base.name, "-F", "qcow2")
    run(qio, "-f", "qcow2", "-c", "write -P 0x44 0 64M", top)
    shutil.copytree(pool, tmp_path / "pristine")
    admin = tmp_path / "admin.sock"
    srv = start_server(tmp_path / "srv", "--admin-socket", str(admin), pool=pool)
    try:
        async def body(c: AdminClient) -> None:
            # 1 MiB/s: the job is still copying when the cancel arrives
            await c.execute("image-commit", {"volid": volid(top), "rate-limit": "1M", "job-id": "slow"})
            await asyncio.sleep(1.0)
            await c.execute("job-cancel", {"id": "slow"})
            rec = await c.execute("job-wait", {"id": "slow", "timeout": 30})
            assert rec["status"] == "concluded" and "cancel" in rec.get("error", "").lower(), rec

        with_client(admin, body)
    finally:
        srv.stop()
    # the top keeps all it had; the base took part of it, consistently
    run(peer("qemu-img"), "compare", tmp_path / "pristine" / "images" / "100" / top.name, top)
    for img in (base, top):
        run(peer("qemu-img"), "check", img)
    run(qio, "-c", "read -P 0x44 0 64k", base)
