"""Internal snapshots served over NBD, read-only: `--snapshot` for an `--image` (qemu-nbd's -l) and
`export-add` with `snapshot` on the admin socket. What clients read is what `qemu-img convert -l` makes of
the same snapshot; writes are refused; a missing snapshot is refused when the export is added."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nbdsrv.admin.client import AdminClient, AdminError
from tests.interop.nbdsrv_fixture import disk_path, make_pool, start_server, volid
from tests.peers import peer, run


def snapped(path: Path) -> Path:
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", path, "16M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x11 0 2M", path)
    run(peer("qemu-img"), "snapshot", "-c", "one", path)
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x22 0 4M", path)
    run(peer("qemu-img"), "resize", "-q", path, "32M")
    return path


def test_image_snapshot_served_read_only(tmp_path: Path) -> None:
    img = snapped(tmp_path / "s.qcow2")
    ref = tmp_path / "one.raw"
    run(peer("qemu-img"), "convert", "-O", "raw", "-l", "one", img, ref)
    srv = start_server(tmp_path / "srv", "--image", str(img), "--name", "snap", "--snapshot", "one",
                       use_pool=False)
    try:
        uri = srv.uri("snap")
        assert run(peer("qemu-img"), "compare", "-f", "raw", "-F", "raw", uri, ref).returncode == 0
        info = run("nbdinfo", "--json", uri).stdout
        assert b'"is_read_only": true' in info and b'"export-size": 16777216' in info
        w = run(peer("qemu-io"), "-f", "raw", "-c", "write 0 4k", uri, check=False)
        assert b"Operation not permitted" in w.stdout + w.stderr or w.returncode != 0
    finally:
        srv.stop()
    # the image itself is untouched: still its active content and one snapshot
    out = run(peer("qemu-io"), "-f", "qcow2", "-c", "read -P 0x22 0 4M", img).stdout
    assert b"Pattern verification failed" not in out
    run(peer("qemu-img"), "check", img)


def test_export_add_with_a_snapshot(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    img = snapped(disk_path(pool, "disk-0", "qcow2"))
    raw = disk_path(pool, "disk-1", "raw")
    raw.write_bytes(bytes(1 << 20))
    ref = tmp_path / "one.raw"
    run(peer("qemu-img"), "convert", "-O", "raw", "-l", "one", img, ref)
    admin = tmp_path / "admin.sock"
    srv = start_server(tmp_path / "srv", "--admin-socket", str(admin), pool=pool)
    try:
        async def body() -> None:
            async with await AdminClient.connect(str(admin)) as c:
                r = await c.execute("export-add", {"volume": volid(img), "name": "vm100-before",
                                                   "snapshot": "one"})
                assert r["read-only"] is True
                exports = {e["name"]: e for e in await c.execute("query-exports")}
                assert exports["vm100-before"]["snapshot"] == "one"
                for bad in ({"volume": volid(img), "name": "x", "snapshot": "nope"},
                            {"volume": volid(raw), "name": "y", "snapshot": "one"}):
                    with pytest.raises(AdminError):
                        await c.execute("export-add", bad)
                names = {e["name"] for e in await c.execute("query-exports")}
                assert "x" not in names and "y" not in names

        asyncio.run(body())
        assert run(peer("qemu-img"), "compare", "-f", "raw", "-F", "raw", srv.uri("vm100-before"),
                   ref).returncode == 0
        # the active image is still served as itself under its volume ID
        active = tmp_path / "active.raw"
        run(peer("qemu-img"), "convert", "-O", "raw", img, active)
        assert run(peer("qemu-img"), "compare", "-f", "raw", "-F", "raw", srv.uri(volid(img)),
                   active).returncode == 0
    finally:
        srv.stop()
