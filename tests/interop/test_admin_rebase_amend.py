"""image-rebase and image-amend on the admin socket: jobs whose results qemu-img agrees with (backing file,
format, options, the guest view kept, a clean check), their refusals, and Busy for volumes in use."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbdsrv.admin.client import AdminClient, AdminError
from tests.interop.nbdsrv_fixture import (
    NbdServer,
    admin_server,
    disk_path,
    make_pool,
    qemu_io_holding,
    volid,
    with_client,
)
from tests.peers import peer, run


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[NbdServer, Path]]:
    pool = make_pool(tmp_path / "pool")
    qi, qio = peer("qemu-img"), peer("qemu-io")
    base = disk_path(pool, "disk-0", "qcow2", base=True)
    other = disk_path(pool, "disk-1", "qcow2", base=True)
    clone = disk_path(pool, "disk-0", "qcow2", vmid=101)
    run(qi, "create", "-q", "-f", "qcow2", base, "8M")
    run(qio, "-c", "write -P 1 0 4M", base)
    run(qi, "create", "-q", "-f", "qcow2", other, "8M")
    run(qio, "-c", "write -P 1 0 1M", "-c", "write -P 2 6M 1M", other)
    run(qi, "create", "-q", "-f", "qcow2", "-b", "../100/base-100-disk-0.qcow2", "-F", "qcow2", clone)
    run(qio, "-c", "write -P 3 2M 64k", clone)
    with admin_server(tmp_path, pool) as (srv, admin):
        yield srv, admin



def info(path: Path) -> dict[str, Any]:
    return dict(json.loads(run(peer("qemu-img"), "info", "--output=json", "-U", path).stdout))


async def finish(c: AdminClient, r: dict[str, Any]) -> dict[str, Any]:
    rec: dict[str, Any] = await c.execute("job-wait", {"id": r["job-id"], "timeout": 60})
    await c.execute("job-dismiss", {"id": r["job-id"]})
    return rec


def test_rebase_jobs(served: tuple[NbdServer, Path], tmp_path: Path) -> None:
    srv, admin = served
    clone = disk_path(srv.pool, "disk-0", "qcow2", vmid=101)
    other = disk_path(srv.pool, "disk-1", "qcow2", base=True)
    before = tmp_path / "before.raw"
    run(peer("qemu-img"), "convert", "-O", "raw", clone, before)

    async def body(c: AdminClient) -> None:
        r = await c.execute("image-rebase", {"volid": volid(clone), "backing": volid(other), "job-id": "rb"})
        assert r == {"job-id": "rb"}
        rec = await finish(c, r)
        assert rec["status"] == "concluded" and "error" not in rec, rec
        assert rec["result"]["volid"] == volid(clone)
        assert rec["result"]["backing-file"] == "../100/base-100-disk-1.qcow2"
        assert rec["result"]["bytes-copied"] > 0
        got = info(clone)
        assert (got["backing-filename"], got["backing-filename-format"]) == ("../100/base-100-disk-1.qcow2",
                                                                             "qcow2")
        run(peer("qemu-img"), "check", clone)
        run(peer("qemu-img"), "compare", "-F", "raw", clone, before)
        # standalone, then a name alone (unsafe): the view stays, the data is all in the volume now
        rec = await finish(c, await c.execute("image-rebase", {"volid": volid(clone)}))
        assert rec["status"] == "concluded" and "error" not in rec, rec
        assert "backing-filename" not in info(clone)
        run(peer("qemu-img"), "compare", "-F", "raw", clone, before)
        rec = await finish(c, await c.execute("image-rebase", {"volid": volid(clone), "unsafe": True,
                                                              "backing": volid(other)}))
        assert rec["status"] == "concluded" and rec["result"]["bytes-copied"] == 0, rec
        assert info(clone)["backing-filename"] == "../100/base-100-disk-1.qcow2"
        run(peer("qemu-img"), "compare", "-F", "raw", clone, before)
        # refusals: unknown, itself, another pool's or a read-only volume, a bad job ID
        for args in ({"volid": volid(clone), "backing": "local:100/nope.qcow2"},
                     {"volid": volid(clone), "backing": volid(clone)},
                     {"volid": volid(other), "backing": volid(clone)},
                     {"volid": volid(clone), "job-id": "has space"}):
            with pytest.raises(AdminError):
                await c.execute("image-rebase", args)
        assert await c.execute("query-jobs") == []

    with_client(admin, body)


def test_amend_jobs(served: tuple[NbdServer, Path], tmp_path: Path) -> None:
    srv, admin = served
    clone = disk_path(srv.pool, "disk-0", "qcow2", vmid=101)
    before = tmp_path / "before.raw"
    run(peer("qemu-img"), "convert", "-O", "raw", clone, before)

    async def body(c: AdminClient) -> None:
        for options, key, want in (({"compat": "0.10"}, "compat", "0.10"),
                                   ({"compat": "1.1"}, "compat", "1.1"),
                                   ({"refcount_bits": 64}, "refcount-bits", 64),
                                   ({"lazy_refcounts": True}, "lazy-refcounts", True)):
            rec = await finish(c, await c.execute("image-amend", {"volid": volid(clone), "options": options}))
            assert rec["status"] == "concluded" and "error" not in rec, rec
            assert info(clone)["format-specific"]["data"][key] == want
            run(peer("qemu-img"), "check", clone)
            run(peer("qemu-img"), "compare", "-F", "raw", clone, before)
        rec = await finish(c, await c.execute("image-amend", {"volid": volid(clone),
                                                             "options": {"cluster_size": 4096}}))
        assert rec["error"] == "Invalid parameter 'cluster_size'", rec
        rec = await finish(c, await c.execute("image-amend", {"volid": volid(clone),
                                                             "options": {"compat": "0.9"}}))
        assert rec["error"] == "Unknown compatibility level 0.9", rec
        with pytest.raises(AdminError):
            await c.execute("image-amend", {"volid": volid(clone), "options": {}})
        with pytest.raises(AdminError) as err:
            await c.execute("image-amend", {"volid": volid(disk_path(srv.pool, "disk-1", "qcow2", base=True)),
                                            "options": {"compat": "0.10"}})
        assert "read-only" in str(err.value)

    with_client(admin, body)


def test_volumes_in_use_are_busy(served: tuple[NbdServer, Path]) -> None:
    srv, admin = served
    clone = disk_path(srv.pool, "disk-0", "qcow2", vmid=101)
    other = disk_path(srv.pool, "disk-1", "qcow2", base=True)

    async def exported(c: AdminClient) -> None:
        for cmd, args in (("image-rebase", {"volid": volid(clone), "backing": volid(other)}),
                          ("image-amend", {"volid": volid(clone), "options": {"lazy_refcounts": True}})):
            with pytest.raises(AdminError) as err:
                await c.execute(cmd, args)
            assert err.value.error_class == "Busy", (cmd, err.value)

    async def held(c: AdminClient) -> None:
        rec = await finish(c, await c.execute("image-amend", {"volid": volid(clone),
                                                             "options": {"lazy_refcounts": True}}))
        assert rec["status"] == "concluded" and "lock" in rec["error"], rec

    import nbd

    h = nbd.NBD()
    h.set_export_name(volid(clone))
    h.connect_tcp("127.0.0.1", str(srv.port))
    try:
        h.pread(512, 0)  # the export is open read-write
        with_client(admin, exported)
    finally:
        h.shutdown()
    with qemu_io_holding(clone, "qcow2"):
        with_client(admin, held)
    assert info(clone)["format-specific"]["data"]["lazy-refcounts"] is False
