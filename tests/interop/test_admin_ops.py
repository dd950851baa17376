"""Image operations and jobs on the admin socket, checked against qemu-img: info, check, map, create,
templates and linked clones, convert and full-clone jobs (events, pause, cancel), Busy refusals, pools
and configuration reloads, and hostile arguments that must leave the disk as it was."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
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
from tests.peers import REPO, peer, run


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[NbdServer, Path]]:
    pool = make_pool(tmp_path / "pool")
    img = create_image(disk_path(pool, "disk-0", "qcow2"), "qcow2", "8M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x33 4M 64k", img)
    with admin_server(tmp_path, pool) as (srv, admin):
        yield srv, admin



def qemu_json(*args: str | Path) -> Any:
    return json.loads(run(peer("qemu-img"), *args).stdout)


def admin_cli(admin: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`nbdsrv admin` run as a user runs it."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "nbdsrv", "admin", "--socket", str(admin), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its size: what "nothing on disk changed" compares."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def test_info_check_map_answer_as_qemu_img(served: tuple[NbdServer, Path]) -> None:
    srv, admin = served
    img = disk_path(srv.pool, "disk-0", "qcow2")

    async def body(c: AdminClient) -> None:
        info = await c.execute("image-info", {"volid": volid(img)})
        assert info == qemu_json("info", "--output=json", img)
        assert await c.execute("volume-info", {"volid": volid(img)}) == info
        chain = await c.execute("image-info", {"volid": volid(img), "backing-chain": True})
        assert chain == qemu_json("info", "--output=json", "--backing-chain", img)
        check = await c.execute("image-check", {"volid": volid(img)})
        ref = json.loads(subprocess.run([peer("qemu-img"), "check", "--output=json", str(img)],
                                        capture_output=True, text=True, check=True).stdout)
        assert {k: v for k, v in check.items() if k in ref} == ref
        assert check["exit-code"] == 0
        entries = await c.execute("image-map", {"volid": volid(img)})
        assert entries == qemu_json("map", "--output=json", img)
        part = await c.execute("image-map", {"volid": volid(img), "start": 4 << 20, "max-length": 1 << 20})
        assert part == qemu_json("map", "--output=json", "--start-offset=4M", "--max-length=1M", img)

    with_client(admin, body)


def test_image_map_answers_in_bounded_pages(served: tuple[NbdServer, Path]) -> None:
    """A map longer than one answer may hold ends after a whole entry; asking again from its end gives the
    rest, and the pages together are what qemu-img map prints."""
    from nbdsrv.admin.images import MAP_MAX_ENTRIES

    srv, admin = served
    img = create_image(disk_path(srv.pool, "disk-1", "qcow2"), "qcow2", "9M", "-o", "cluster_size=512")
    # every other 512-byte cluster written: two entries per KiB
    script = "".join(f"write -P 1 {i * 1024} 512\n" for i in range(8400))
    subprocess.run([peer("qemu-io"), "-t", "unsafe", "-f", "qcow2", str(img)], input=script.encode(),
                   check=True, capture_output=True, timeout=120)
    want = qemu_json("map", "--output=json", img)
    assert len(want) > MAP_MAX_ENTRIES

    async def body(c: AdminClient) -> None:
        pages: list[list[dict[str, Any]]] = []
        start = 0
        while start < 9 * 1024 * 1024:
            pages.append(await c.execute("image-map", {"volid": volid(img), "start": start}))
            start = pages[-1][-1]["start"] + pages[-1][-1]["length"]
        assert [len(p) for p in pages] == [MAP_MAX_ENTRIES, len(want) - MAP_MAX_ENTRIES]
        assert [e for p in pages for e in p] == want

    with_client(admin, body)


def test_image_create_with_options_names_as_proxmox(served: tuple[NbdServer, Path]) -> None:
    srv, admin = served

    async def body(c: AdminClient) -> None:
        opts = {"cluster_size": 131072, "lazy_refcounts": True}
        r = await c.execute("image-create", {"pool": "local", "vmid": 101, "size": "64M",
                                             "format": "qcow2", "options": opts})
        assert r["volid"] == "local:101/vm-101-disk-0.qcow2"
        assert r["formatting"].startswith("Formatting '")
        ev = await asyncio.wait_for(c.events.get(), 5)
        assert ev["event"] == "VOLUME_ALLOCATED" and ev["data"]["volid"] == r["volid"]
        info = qemu_json("info", "--output=json", r["path"])
        assert (info["format"], info["virtual-size"], info["cluster-size"]) == ("qcow2", 64 << 20, 131072)
        assert info["format-specific"]["data"]["lazy-refcounts"] is True
        with pytest.raises(AdminError) as err:
            await c.execute("image-create", {"pool": "local", "vmid": 101, "size": 1 << 20, "format": "qcow2",
                                             "options": {"no_such_option": "1"}})
        assert "no_such_option" in str(err.value)
        assert not disk_path(srv.pool, "disk-1", "qcow2", vmid=101).exists()
        v = await c.execute("volume-alloc", {"pool": "local", "vmid": 101, "size": "1G", "format": "qcow2",
                                             "options": {"cluster_size": "4k"}})
        assert v["volid"] == "local:101/vm-101-disk-1.qcow2" and v["size"] == 1 << 30
        info = qemu_json("info", "--output=json", v["path"])
        assert (info["virtual-size"], info["cluster-size"]) == (1 << 30, 4096)

    with_client(admin, body)


def test_template_linked_clone_reads_base_and_writes_overlay(served: tuple[NbdServer, Path]) -> None:
    srv, admin = served
    img = disk_path(srv.pool, "disk-0", "qcow2")
    base = disk_path(srv.pool, "disk-0", "qcow2", base=True)

    async def body(c: AdminClient) -> None:
        r = await c.execute("template-create", {"pool": "local", "vmid": 100})
        assert r == {"volumes": [volid(base)]}
        assert base.exists() and not img.exists()
        assert not os.stat(base).st_mode & 0o222
        clone = await c.execute("clone-linked", {"volid": volid(base), "vmid": 102})
        assert clone["volid"] == "local:102/vm-102-disk-0.qcow2"
        assert clone["backing-file"] == "../100/base-100-disk-0.qcow2"
        info = qemu_json("info", "--output=json", clone["path"])
        assert info["backing-filename"] == "../100/base-100-disk-0.qcow2"
        assert info["backing-filename-format"] == "qcow2"
        assert info["virtual-size"] == 8 << 20
        with pytest.raises(AdminError) as err:
            await c.execute("volume-free", {"volid": volid(base)})
        assert err.value.error_class == "Busy" and clone["volid"] in str(err.value)
        with pytest.raises(AdminError):
            await c.execute("clone-linked", {"volid": clone["volid"], "vmid": 103})  # not a template
        return_clone[0] = clone

    return_clone: list[dict[str, Any]] = [{}]
    with_client(admin, body)
    clone = return_clone[0]
    base_sum = run("sha256sum", base).stdout.split()[0]
    # The clone over NBD reads the base's data, and writes land in the overlay alone.
    uri = srv.uri(clone["volid"])
    assert run(peer("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", uri, base).returncode == 0
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x77 0 64k", uri)
    assert run("sha256sum", base).stdout.split()[0] == base_sum
    out = run(peer("qemu-io"), "-f", "qcow2", "-c", "read -P 0x77 0 64k", "-c", "read -P 0x5a 64k 64k",
              clone["path"]).stdout
    assert b"Pattern verification failed" not in out
    run(peer("qemu-img"), "check", clone["path"])

    async def free(c: AdminClient) -> None:
        await c.execute("volume-free", {"volid": clone["volid"]})
        await c.execute("volume-free", {"volid": volid(base)})
        assert not base.exists()

    with_client(admin, free)


def job_events(events: list[dict[str, Any]], job_id: str) -> list[dict[str, Any]]:
    return [e["data"] for e in events if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job_id]


async def drain(c: AdminClient) -> list[dict[str, Any]]:
    out = []
    while not c.events.empty():
        out.append(c.events.get_nowait())
    return out


def test_convert_job_events_result_and_qemu_reads_the_copy(served: tuple[NbdServer, Path]) -> None:
    srv, admin = served
    img = disk_path(srv.pool, "disk-0", "qcow2")

    async def body(c: AdminClient) -> None:
        r = await c.execute("image-convert", {"volid": volid(img), "format": "raw", "job-id": "conv"})
        assert r == {"job-id": "conv", "volid": "local:100/vm-100-disk-1.raw"}
        rec = await c.execute("job-wait", {"id": "conv", "timeout": 60})
        assert rec["status"] == "concluded" and "error" not in rec, rec
        # the share of what the copy counts, as qemu-img -p: the data written in the fixture
        assert rec["current-progress"] == rec["total-progress"] == (1 << 20) + (64 << 10)
        assert rec["result"]["volid"] == r["volid"] and rec["result"]["bytes-read"] >= 1 << 20
        jobs = await c.execute("query-jobs")
        assert [j["id"] for j in jobs] == ["conv"]
        await c.execute("job-dismiss", {"id": "conv"})
        assert await c.execute("query-jobs") == []
        await asyncio.sleep(0.2)
        evs = job_events(await drain(c), "conv")
        states = [e["status"] for e in evs]
        assert states[0] == "created" and states[-1] == "null" and "running" in states
        assert states[-2] == "concluded"
        progress = [e["current-progress"] for e in evs]
        assert progress == sorted(progress)
        with pytest.raises(AdminError) as err:
            await c.execute("job-dismiss", {"id": "conv"})
        assert err.value.error_class == "NotFound"
        target = disk_path(srv.pool, "disk-1", "raw")
        assert run(peer("qemu-img"), "compare", "-f", "qcow2", "-F", "raw", img, target).returncode == 0

    with_client(admin, body)


def test_clone_full_with_the_cli_wait(served: tuple[NbdServer, Path]) -> None:
    srv, admin = served
    img = disk_path(srv.pool, "disk-0", "qcow2")
    p = admin_cli(admin, "--wait", "clone-full", f"volid={volid(img)}", "vmid=104")
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["status"] == "concluded" and rec["type"] == "clone-full"
    target = disk_path(srv.pool, "disk-0", "qcow2", vmid=104)
    assert rec["result"]["volid"] == volid(target)
    run(peer("qemu-img"), "check", target)
    assert run(peer("qemu-img"), "compare", img, target).returncode == 0

    async def body(c: AdminClient) -> None:
        assert await c.execute("query-jobs") == []  # --wait dismissed it

    with_client(admin, body)
    p = admin_cli(admin, "--wait", "clone-full", f"volid={volid(img)}", "vmid=105", "format=vmdk")
    assert p.returncode == 0, p.stderr
    vmdk = disk_path(srv.pool, "disk-0", "vmdk", vmid=105)
    assert json.loads(p.stdout)["result"]["volid"] == volid(vmdk)
    assert qemu_json("info", "--output=json", vmdk)["format"] == "vmdk"
    assert run(peer("qemu-img"), "compare", img, vmdk).returncode == 0
    # a job that fails (its source held by a VM): the CLI prints the record and exits 1
    with qemu_io_holding(img, "qcow2"):
        p = admin_cli(admin, "--wait", "clone-full", f"volid={volid(img)}", "vmid=106")
    assert p.returncode == 1
    assert "lock" in json.loads(p.stdout)["error"] and "failed" in p.stderr
    assert not (srv.pool / "images" / "106" / "vm-106-disk-0.qcow2").exists()


def test_pause_resume_cancel_leaves_no_target(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    src = disk_path(pool, "disk-0", "raw")
    with open(src, "wb") as f:  # 512 MiB of data that does not compress into holes
        block = os.urandom(1 << 20)
        for _ in range(512):
            f.write(block)
    admin = tmp_path / "admin.sock"
    srv = start_server(tmp_path / "srv", "--admin-socket", str(admin), pool=pool)
    try:
        async def body(c: AdminClient) -> None:
            await c.execute("image-convert", {"volid": volid(src), "format": "qcow2", "job-id": "big"})
            target = Path(srv.pool) / "images" / "100" / "vm-100-disk-1.qcow2"
            assert target.exists()  # reserved under its final name at once
            deadline = time.monotonic() + 30
            while (await c.execute("query-jobs"))[0]["status"] != "running":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            await c.execute("job-pause", {"id": "big"})
            paused = (await c.execute("query-jobs"))[0]
            assert paused["status"] == "paused"
            await asyncio.sleep(0.5)
            again = (await c.execute("query-jobs"))[0]
            assert again["current-progress"] == paused["current-progress"] < again["total-progress"]
            with pytest.raises(AdminError) as err:
                await c.execute("job-dismiss", {"id": "big"})
            assert "cannot accept command verb 'dismiss'" in str(err.value)
            await c.execute("job-resume", {"id": "big"})
            assert (await c.execute("query-jobs"))[0]["status"] == "running"
            await c.execute("job-cancel", {"id": "big"})
            rec = await c.execute("job-wait", {"id": "big", "timeout": 60})
            assert rec["status"] == "concluded" and rec["error"] == "Job was cancelled"
            assert not target.exists(), "a cancelled convert left its target"
            vols = [v["volid"] for v in await c.execute("volume-list", {"pool": "local"})]
            assert vols == [volid(src)]
            # the server still serves, and the source is intact
            assert (await c.execute("query-status"))["running"] is True

        with_client(admin, body)
    finally:
        srv.stop()


def test_jobs_on_volumes_in_use_are_busy(served: tuple[NbdServer, Path]) -> None:
    srv, admin = served
    img = disk_path(srv.pool, "disk-0", "qcow2")
    other = create_image(disk_path(srv.pool, "disk-9", "qcow2"), "qcow2", "1M")
    import nbd

    h = nbd.NBD()
    h.set_export_name(volid(img))
    h.connect_tcp("127.0.0.1", str(srv.port))
    try:
        h.pread(512, 0)  # the export is open read-write

        async def exported(c: AdminClient) -> None:
            for cmd, args in (("image-convert", {"volid": volid(img)}),
                              ("clone-full", {"volid": volid(img), "vmid": 110}),
                              ("image-check", {"volid": volid(img)}),
                              ("image-check", {"volid": volid(img), "repair": "leaks"}),
                              ("template-create", {"pool": "local", "vmid": 100}),
                              ("volume-free", {"volid": volid(img)})):
                with pytest.raises(AdminError) as err:
                    await c.execute(cmd, args)
                assert err.value.error_class == "Busy", (cmd, err.value)
            # reads that are safe to share still work
            assert (await c.execute("image-info", {"volid": volid(img)}))["format"] == "qcow2"
            assert await c.execute("image-map", {"volid": volid(img)})

        with_client(admin, exported)
    finally:
        h.shutdown()
    with qemu_io_holding(other, "qcow2"):
        async def held(c: AdminClient) -> None:
            with pytest.raises(AdminError) as err:
                await c.execute("image-check", {"volid": volid(other), "repair": "all"})
            assert err.value.error_class == "Busy"
            r = await c.execute("image-convert", {"volid": volid(other), "job-id": "h"})
            rec = await c.execute("job-wait", {"id": "h", "timeout": 30})
            assert "lock" in rec.get("error", ""), rec
            assert not Path(r["volid"].replace("local:", f"{srv.pool}/images/")).exists()
            assert (await c.execute("image-info", {"volid": volid(other)}))["virtual-size"] == 1 << 20

        with_client(admin, held)
    assert sorted(p.name for p in (srv.pool / "images" / "100").iterdir()) == sorted([img.name, other.name])


def test_hostile_arguments_change_nothing(served: tuple[NbdServer, Path]) -> None:
    srv, admin = served
    img = disk_path(srv.pool, "disk-0", "qcow2")
    before = tree(srv.pool)

    async def body(c: AdminClient) -> None:
        bad: list[tuple[str, dict[str, Any]]] = [
            ("image-info", {"volid": "local:100/../../../etc/passwd"}),
            ("image-info", {"volid": "local:100/vm-100-disk-0.qcow2/../x"}),
            ("image-info", {"volid": "/etc/passwd"}),
            ("image-convert", {"volid": volid(img), "vmid": "abc"}),
            ("image-convert", {"volid": volid(img), "vmid": -5}),
            ("image-convert", {"volid": volid(img), "format": "vdi"}),
            ("image-convert", {"volid": volid(img), "job-id": "has space"}),
            ("image-create", {"pool": "local", "vmid": 100, "size": 0}),
            ("image-create", {"pool": "local", "vmid": 100, "size": 1 << 70}),
            ("image-create", {"pool": "local", "vmid": 100, "size": 1 << 20, "name": "../../evil"}),
            ("image-create", {"pool": "local", "vmid": 100, "size": 1 << 20,
                              "options": {"backing_file": "/etc/passwd"}}),
            ("volume-alloc", {"pool": "local", "vmid": 100, "size": 1 << 70}),
            ("volume-alloc", {"pool": "local", "vmid": 100, "size": 0}),
            ("volume-alloc", {"pool": "local", "vmid": 100, "size": "12Q"}),
            ("volume-alloc", {"pool": "local", "vmid": 100, "size": "9E"}),
            ("volume-alloc", {"pool": "local", "vmid": 100, "size": 1.5}),
            ("volume-alloc", {"pool": "local", "vmid": 99999999999, "size": 1 << 20}),
            ("clone-linked", {"volid": volid(img), "vmid": 101}),
            ("template-create", {"pool": "local", "vmid": 555}),
            ("pool-add", {"name": "etc", "path": "relative/path"}),
            ("pool-remove", {"name": "nope"}),
            ("job-cancel", {"id": "nope"}),
            ("image-map", {"volid": volid(img), "start": -1}),
        ]
        for cmd, args in bad:
            with pytest.raises(AdminError) as err:
                await c.execute(cmd, args)
            assert err.value.error_class in ("GenericError", "NotFound"), (cmd, args, err.value)
        assert (await c.execute("query-status"))["running"] is True

    with_client(admin, body)
    assert tree(srv.pool) == before


def test_half_a_command_then_disconnect_and_pipelined_flood(served: tuple[NbdServer, Path]) -> None:
    srv, admin = served
    import socket as socketlib

    for _ in range(5):
        s = socketlib.socket(socketlib.AF_UNIX)
        s.connect(str(admin))
        s.recv(4096)
        s.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "volume-list", "argum')
        s.close()
    rss0 = srv.rss_kib()
    # 10,000 commands written without reading a single answer: the server slows the writer, not its heap
    s = socketlib.socket(socketlib.AF_UNIX)
    s.connect(str(admin))
    s.recv(4096)
    s.sendall(b'{"execute": "qmp_capabilities"}\n')
    payload = b"".join(b'{"execute": "query-pools", "id": %d}\n' % i for i in range(10_000))
    s.settimeout(0.5)
    sent = 0
    try:
        while sent < len(payload):
            sent += s.send(payload[sent:sent + 65536])
    except TimeoutError:
        pass  # the server stopped reading: that is the point
    time.sleep(0.5)
    assert srv.rss_kib() - rss0 < 64 * 1024, "memory grew with unread answers"
    s.close()

    async def body(c: AdminClient) -> None:
        assert (await c.execute("query-status"))["running"] is True

    with_client(admin, body)
    assert srv.alive()


def test_pools_add_remove_and_reload(tmp_path: Path) -> None:
    a = make_pool(tmp_path / "a")
    b = make_pool(tmp_path / "b")
    extra = make_pool(tmp_path / "extra")
    img = create_image(disk_path(b, "disk-0", "raw"), "raw", "1M")
    conf = tmp_path / "nbdsrv.toml"
    conf.write_text(f'[pools.a]\npath = "{a}"\n')
    admin = tmp_path / "admin.sock"
    srv = start_server(tmp_path / "srv", "--config", str(conf), "--admin-socket", str(admin), use_pool=False)
    try:
        async def body(c: AdminClient) -> None:
            names = lambda ps: sorted(p["name"] for p in ps)  # noqa: E731
            assert names(await c.execute("query-pools")) == ["a"]
            await c.execute("pool-add", {"name": "extra", "path": str(extra)})
            conf.write_text(f'[pools.a]\npath = "{a}"\n[pools.b]\npath = "{b}"\nread_only = true\n')
            r = await c.execute("reload-config")
            assert r["pools-added"] == ["b"] and r["pools-removed"] == []
            assert names(await c.execute("query-pools")) == ["a", "b", "extra"]
            vols = await c.execute("volume-list", {"pool": "b"})
            assert [v["volid"] for v in vols] == ["b:100/vm-100-disk-0.raw"] and vols[0]["read-only"]
            conf.write_text("[pools.a\n")  # a file that does not parse changes nothing
            with pytest.raises(AdminError):
                await c.execute("reload-config")
            assert names(await c.execute("query-pools")) == ["a", "b", "extra"]
            # SIGHUP does what reload-config does
            conf.write_text(f'[pools.a]\npath = "{a}"\n')
            os.kill(srv.proc.pid, signal.SIGHUP)
            deadline = time.monotonic() + 10
            while names(await c.execute("query-pools")) != ["a", "extra"]:
                assert time.monotonic() < deadline, "SIGHUP did not reload"
                await asyncio.sleep(0.05)
            # pool-remove refuses a pool with a volume open, unless forced
            create_image(disk_path(extra, "disk-0", "raw"), "raw", "1M")
            import nbd

            h = nbd.NBD()
            h.set_export_name("extra:100/vm-100-disk-0.raw")
            h.connect_tcp("127.0.0.1", str(srv.port))
            try:
                with pytest.raises(AdminError) as err:
                    await c.execute("pool-remove", {"name": "extra"})
                assert err.value.error_class == "Busy"
                await c.execute("pool-remove", {"name": "extra", "force": True})
                assert h.pread(512, 0) == bytes(512)  # the open connection keeps working
            finally:
                h.shutdown()
            assert names(await c.execute("query-pools")) == ["a"]

        with_client(admin, body)
        assert img.exists()
    finally:
        srv.stop()


def test_volume_resize_as_qemu_img_resize(served: tuple[NbdServer, Path]) -> None:
    srv, admin = served
    img = disk_path(srv.pool, "disk-0", "qcow2")
    raw = create_image(disk_path(srv.pool, "disk-1", "raw"), "raw", "1M")
    snap = create_image(disk_path(srv.pool, "disk-2", "qcow2"), "qcow2", "1M")
    run(peer("qemu-img"), "snapshot", "-c", "s1", snap)
    big = create_image(disk_path(srv.pool, "disk-3", "qcow2"), "qcow2", "1M", "-o", "cluster_size=512")

    async def body(c: AdminClient) -> None:
        r = await c.execute("volume-resize", {"volid": volid(img), "size": 3 << 30})
        assert r == {"volid": volid(img), "old-size": 8 << 20, "size": 3 << 30}
        info = qemu_json("info", "--output=json", img)
        assert info["virtual-size"] == 3 << 30
        run(peer("qemu-img"), "check", img)
        out = run(peer("qemu-io"), "-f", "qcow2", "-c", "read -P 0x5a 0 1M", "-c", "write -P 0x44 3071M 1M",
                  "-c", "read -P 0x44 3071M 1M", img).stdout
        assert b"Pattern verification failed" not in out
        run(peer("qemu-img"), "check", img)
        with pytest.raises(AdminError) as err:
            await c.execute("volume-resize", {"volid": volid(raw), "size": 512})
        assert "--shrink" in str(err.value)
        await c.execute("volume-resize", {"volid": volid(raw), "size": 512, "shrink": True})
        assert raw.stat().st_size == 512
        await c.execute("volume-resize", {"volid": volid(raw), "size": 64 << 20})
        assert qemu_json("info", "--output=json", raw)["virtual-size"] == 64 << 20
        # a v3 image with internal snapshots grows, as in qemu 7.2; its snapshot keeps its own size
        await c.execute("volume-resize", {"volid": volid(snap), "size": 2 << 20})
        run(peer("qemu-img"), "check", snap)
        info = qemu_json("info", "--output=json", snap)
        assert info["virtual-size"] == 2 << 20 and info["snapshots"][0]["name"] == "s1"
        # 512-byte clusters: one L1 cluster maps 64 x 64 x 512 = 2 MiB, so 1 GiB needs a bigger L1 table
        await c.execute("volume-resize", {"volid": volid(big), "size": 2 << 20})
        await c.execute("volume-resize", {"volid": volid(big), "size": 1 << 30})
        run(peer("qemu-img"), "check", big)
        assert qemu_json("info", "--output=json", big)["virtual-size"] == 1 << 30
        with qemu_io_holding(raw, "raw"):
            with pytest.raises(AdminError) as err:
                await c.execute("volume-resize", {"volid": volid(raw), "size": 128 << 20})
            assert err.value.error_class == "Busy"

    with_client(admin, body)


def test_every_command_through_the_cli_errors_cleanly(served: tuple[NbdServer, Path]) -> None:
    """`nbdsrv admin` reaches every row of the table: an argument no command has is refused by each, with
    the error printed on one line and exit status 1; read-only rows also succeed as JSON and as a table."""
    srv, admin = served
    p = admin_cli(admin, "query-commands")
    assert p.returncode == 0, p.stderr
    names = [c["name"] for c in json.loads(p.stdout)]
    assert len(names) >= 36
    for name in names:
        if name == "qmp_capabilities":
            continue
        p = admin_cli(admin, name, "no-such-argument=1")
        assert p.returncode == 1, (name, p.stdout)
        assert p.stderr == "nbdsrv admin: GenericError: Parameter 'no-such-argument' is unexpected\n", name
    for name, args in (("query-pools", []), ("volume-list", ["pool=local"]), ("query-jobs", []),
                       ("image-info", [f"volid={volid(disk_path(srv.pool, 'disk-0', 'qcow2'))}"])):
        p = admin_cli(admin, name, *args)
        assert p.returncode == 0, (name, p.stderr)
        json.loads(p.stdout)
        p = admin_cli(admin, "--human", name, *args)
        assert p.returncode == 0 and "{" not in p.stdout.splitlines()[0], (name, p.stdout)


def _workers_of(pid: int) -> list[int]:
    out = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"nbdsrv.admin.worker" in cmdline:
            out.append(int(child))
    return out


def test_a_worker_killed_under_a_job_fails_the_job_not_the_server(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    src = disk_path(pool, "disk-0", "raw")
    with open(src, "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(768):
            f.write(block)
    admin = tmp_path / "admin.sock"
    srv = start_server(tmp_path / "srv", "--admin-socket", str(admin), pool=pool)
    try:
        async def body(c: AdminClient) -> None:
            before = set()
            deadline = time.monotonic() + 20
            while len(before) < 2:  # the warm workers
                assert time.monotonic() < deadline, "no warm workers"
                before = set(_workers_of(srv.proc.pid))
                await asyncio.sleep(0.05)
            r = await c.execute("image-convert", {"volid": volid(src), "format": "qcow2", "job-id": "k"})
            while (await c.execute("query-jobs"))[0]["current-progress"] == 0:
                await asyncio.sleep(0.02)
            for pid in _workers_of(srv.proc.pid):
                os.kill(pid, signal.SIGKILL)
            rec = await c.execute("job-wait", {"id": "k", "timeout": 30})
            assert rec["status"] == "concluded" and "exited unexpectedly" in rec["error"], rec
            assert not Path(r["volid"].replace("local:", f"{pool}/images/")).exists()
            # new workers take over
            info = await c.execute("image-info", {"volid": volid(src)})
            assert info["virtual-size"] == 768 << 20
            assert set(_workers_of(srv.proc.pid)).isdisjoint(before)

        with_client(admin, body)
        assert srv.alive()
    finally:
        srv.stop()


def test_volume_snapshots_as_qemu_img_snapshot(served: tuple[NbdServer, Path]) -> None:
    srv, admin = served
    img = disk_path(srv.pool, "disk-0", "qcow2")
    raw = create_image(disk_path(srv.pool, "disk-1", "raw"), "raw", "1M")

    async def body(c: AdminClient) -> None:
        assert await c.execute("volume-snapshot-list", {"volid": volid(img)}) == []
        snaps = await c.execute("volume-snapshot-create", {"volid": volid(img), "name": "before"})
        assert [s["name"] for s in snaps] == ["before"]
        run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x66 0 1M", img)
        listed = await c.execute("image-snapshot-list", {"volid": volid(img)})
        assert listed == json.loads(run(peer("qemu-img"), "info", "--output=json", img).stdout)["snapshots"]
        await c.execute("volume-snapshot-rollback", {"volid": volid(img), "name": "before"})
        out = run(peer("qemu-io"), "-f", "qcow2", "-c", "read -P 0x5a 0 1M", img).stdout
        assert b"Pattern verification failed" not in out
        run(peer("qemu-img"), "check", img)
        with pytest.raises(AdminError) as err:
            await c.execute("volume-snapshot-delete", {"volid": volid(img), "name": "nope"})
        assert "Could not delete snapshot 'nope': snapshot not found" in str(err.value)
        with pytest.raises(AdminError) as err:
            await c.execute("volume-snapshot-create", {"volid": volid(raw), "name": "x"})
        assert "only qcow2" in str(err.value)
        with qemu_io_holding(img, "qcow2"):
            with pytest.raises(AdminError) as err:
                await c.execute("volume-snapshot-create", {"volid": volid(img), "name": "held"})
            assert err.value.error_class == "Busy"
            # listing is a read that is safe to share
            assert [s["name"] for s in await c.execute("volume-snapshot-list", {"volid": volid(img)})] == [
                "before"]
        assert await c.execute("image-snapshot-delete", {"volid": volid(img), "name": "before"}) == []
        assert "snapshots" not in json.loads(run(peer("qemu-img"), "info", "--output=json", img).stdout)

    with_client(admin, body)


def test_compare_and_measure_as_qemu_img(served: tuple[NbdServer, Path]) -> None:
    srv, admin = served
    img = disk_path(srv.pool, "disk-0", "qcow2")
    same = disk_path(srv.pool, "disk-1", "raw")
    run(peer("qemu-img"), "convert", "-O", "raw", img, same)
    other = disk_path(srv.pool, "disk-2", "raw")
    run(peer("qemu-img"), "convert", "-O", "raw", img, other)
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x01 3000000 1", other)

    async def body(c: AdminClient) -> None:
        r = await c.execute("image-compare", {"volid": volid(img), "volid2": volid(same)})
        assert r["identical"] is True and r["message"] == "Images are identical."
        r = await c.execute("image-compare", {"volid": volid(img), "volid2": volid(other)})
        q = run(peer("qemu-img"), "compare", img, other, check=False)
        assert (r["identical"], r["message"]) == (False, q.stdout.decode().strip())
        assert r["offset"] == 3000000 - 3000000 % 512
        m = await c.execute("image-measure", {"volid": volid(img), "format": "qcow2",
                                              "options": {"cluster_size": 65536}})
        ref = json.loads(run(peer("qemu-img"), "measure", "--output=json", "-O", "qcow2", "-o",
                             "cluster_size=65536", img).stdout)
        assert m == ref
        m = await c.execute("image-measure", {"size": "10G", "format": "qcow2"})
        assert m == json.loads(run(peer("qemu-img"), "measure", "--output=json", "-O", "qcow2", "--size",
                                   "10G").stdout)
        with pytest.raises(AdminError):
            await c.execute("image-measure", {"format": "qcow2"})
        r = await c.execute("image-resize", {"volid": volid(same), "size": "16M"})
        assert r["size"] == 16 << 20

    with_client(admin, body)
