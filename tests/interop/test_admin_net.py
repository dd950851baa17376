"""The admin socket's NBD-side commands against real NBD peers: query-clients with what libnbd and qemu 10
negotiated, client-disconnect, the client and export events, export-add aliases seen by nbdinfo and read
by qemu-img, export-remove safe and hard with clients attached, and many admin clients beside NBD load."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from nbdsrv.admin.client import AdminClient, AdminError
from nbdsrv.backend import Filter
from tests.interop.nbdsrv_fixture import (
    NbdServer,
    admin_server,
    create_image,
    disk_path,
    make_pool,
    start_server,
    volid,
)
from tests.peers import peer, qemu10, run

nbd = pytest.importorskip("nbd")

MiB = 1 << 20


@pytest.fixture
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[NbdServer, Path, Path]]:
    """A server with an admin socket and one 8 MiB raw disk full of a pattern (on uvloop, or on the
    asyncio loop for tests parametrized with ``loop``)."""
    pool = make_pool(tmp_path / "pool")
    img = create_image(disk_path(pool, "disk-0", "raw"), "raw", "8M")
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x5a 0 8M", img)
    loop = getattr(request, "param", "uvloop")
    env = {"NBDSRV_LOOP": loop} if loop == "asyncio" else None
    with admin_server(tmp_path, pool, env=env) as (srv, admin):
        yield srv, admin, img


def admin_run(sock: Path, command: str, args: dict[str, Any] | None = None) -> Any:
    """One command on a fresh admin connection."""
    async def go() -> Any:
        async with await AdminClient.connect(str(sock)) as c:
            return await c.execute(command, args)
    return asyncio.run(go())


def connect(uri: str, *, meta: tuple[str, ...] = (), structured: bool = True) -> Any:
    h = nbd.NBD()
    if not structured:
        h.set_request_structured_replies(False)
    for m in meta:
        h.add_meta_context(m)
    h.connect_uri(uri)
    return h


def listed(srv: NbdServer) -> set[str]:
    """Export names nbdinfo --list shows."""
    out = run(peer("nbdinfo"), "--list", "--json", f"nbd://127.0.0.1:{srv.port}").stdout
    return {e["export-name"] for e in json.loads(out)["exports"]}


def by_id(clients: list[dict[str, Any]], cid: int) -> dict[str, Any]:
    [rec] = [c for c in clients if c["id"] == cid]
    return rec


def one_new_client(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, Any]:
    old = {c["id"] for c in before}
    [rec] = [c for c in after if c["id"] not in old]
    return rec


@contextmanager
def qemu10_io(uri: str) -> Iterator[subprocess.Popen[bytes]]:
    """qemu 10's qemu-io attached to ``uri`` (it negotiates extended headers) until the block ends."""
    proc = subprocess.Popen([qemu10("qemu-io"), "-f", "raw", uri], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        qemu_io_command(proc, "read 0 512")
        yield proc
    finally:
        proc.kill()
        proc.wait()


def qemu_io_command(proc: subprocess.Popen[bytes], cmd: str) -> str:
    """Run one qemu-io command; returns its output once the summary line (``... ops; ...``) is in."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(cmd.encode() + b"\n")
    proc.stdin.flush()
    out = []
    while True:
        line = proc.stdout.readline().decode()
        assert line, f"qemu-io ended: {''.join(out)}"
        out.append(line)
        if " ops; " in line:
            return "".join(out)


async def next_event(c: AdminClient, name: str, timeout: float = 10) -> dict[str, Any]:
    while True:
        ev = await asyncio.wait_for(c.events.get(), timeout)
        if ev["event"] == name:
            return ev


# -- query-clients ------------------------------------------------------------------------------------------

def test_query_clients_shows_what_each_client_negotiated_and_counts_its_io(
        served: tuple[NbdServer, Path, Path]) -> None:
    srv, admin, img = served
    uri = srv.uri(volid(img))
    h1 = connect(uri, meta=("base:allocation", "qemu:allocation-depth"))
    c1 = one_new_client([], admin_run(admin, "query-clients"))
    h2 = connect(uri, structured=False)
    clients = admin_run(admin, "query-clients")
    c2 = one_new_client([c1], clients)
    c1 = by_id(clients, c1["id"])
    assert c1["structured-replies"] is True and c1["extended-headers"] is False
    assert sorted(c1["meta-contexts"]) == ["base:allocation", "qemu:allocation-depth"]
    assert c2["structured-replies"] is False and c2["meta-contexts"] == []
    for c in (c1, c2):
        assert c["export"] == volid(img) and c["state"] == "transmission" and c["tls"] is False
        assert c["peer"].startswith("127.0.0.1:") and c["inflight"] == 0 and c["read-only"] is False
        assert c["requests"] == 0 and c["bytes-read"] == 0 and c["bytes-written"] == 0
        assert isinstance(c["since"], float) and abs(c["since"] - time.time()) < 60
    assert c1["id"] != c2["id"]

    h1.pwrite(b"\xab" * 65536, MiB)
    for _ in range(3):
        assert h1.pread(4096, 0) == b"\x5a" * 4096
    h1.flush()
    h2.pread(8192, 0)
    clients = admin_run(admin, "query-clients")
    a, b = by_id(clients, c1["id"]), by_id(clients, c2["id"])
    assert (a["requests"], a["bytes-read"], a["bytes-written"]) == (5, 3 * 4096, 65536)
    assert (b["requests"], b["bytes-read"], b["bytes-written"]) == (1, 8192, 0)

    stats = admin_run(admin, "query-server-stats")
    assert stats["connections"]["open"] == 2 and stats["connections"]["total"] >= 2
    assert stats["requests"] == 6 and stats["bytes-read"] == 3 * 4096 + 8192
    assert stats["bytes-written"] == 65536 and stats["errors"] == {} and stats["uptime"] > 0
    h1.shutdown()
    h2.shutdown()
    # The counters of closed connections stay in the server's totals, and an error is counted by name.
    h3 = connect(uri)
    h3.set_strict_mode(0)  # let the request reach the server
    with pytest.raises(nbd.Error):
        h3.pread(4096, 8 * MiB)  # past the end: EINVAL
    h3.shutdown()
    stats = admin_run(admin, "query-server-stats")
    assert stats["requests"] == 7 and stats["bytes-written"] == 65536 and stats["errors"] == {"EINVAL": 1}


def test_query_clients_shows_extended_headers_of_qemu10(served: tuple[NbdServer, Path, Path]) -> None:
    srv, admin, img = served
    with qemu10_io(srv.uri(volid(img))) as qio:
        [c] = [c for c in admin_run(admin, "query-clients") if c.get("export") == volid(img)]
        assert c["extended-headers"] is True and c["structured-replies"] is True
        assert "base:allocation" in c["meta-contexts"]
        assert c["requests"] >= 1 and c["bytes-read"] >= 512
        before = c["bytes-written"]
        assert "wrote 65536/65536" in qemu_io_command(qio, "write -P 0x11 0 64k")
        [c] = [c for c in admin_run(admin, "query-clients") if c.get("export") == volid(img)]
        assert c["bytes-written"] == before + 65536


# -- client-disconnect and the client events ----------------------------------------------------------------

@pytest.mark.parametrize("served", ["uvloop", "asyncio"], indirect=True)
def test_client_disconnect_and_client_events(served: tuple[NbdServer, Path, Path]) -> None:
    srv, admin, img = served
    uri = srv.uri(volid(img))

    async def main() -> None:
        async with await AdminClient.connect(str(admin)) as c:
            h = await asyncio.to_thread(connect, uri)
            ev = await next_event(c, "CLIENT_CONNECTED")
            cid = ev["data"]["id"]
            assert ev["data"]["export"] == volid(img) and ev["data"]["peer"].startswith("127.0.0.1:")
            rec = by_id(await c.execute("query-clients"), cid)
            assert rec["peer"] == ev["data"]["peer"]
            await asyncio.to_thread(h.pwrite, b"\xcd" * 4096, 0)
            # Acknowledged writes are on disk when the client is gone.
            assert await c.execute("client-disconnect", {"id": cid}) == {}
            ev = await next_event(c, "CLIENT_DISCONNECTED")
            assert ev["data"] == {"id": cid, "peer": rec["peer"], "export": volid(img)}
            assert cid not in [x["id"] for x in await c.execute("query-clients")]
            with pytest.raises(nbd.Error):
                await asyncio.to_thread(h.pread, 512, 0)
            with pytest.raises(AdminError) as err:
                await c.execute("client-disconnect", {"id": cid})
            assert err.value.error_class == "NotFound"
            # A client that leaves by itself is announced too, and the next one has a new id.
            h2 = await asyncio.to_thread(connect, uri)
            ev = await next_event(c, "CLIENT_CONNECTED")
            assert ev["data"]["id"] != cid
            await asyncio.to_thread(h2.shutdown)
            ev2 = await next_event(c, "CLIENT_DISCONNECTED")
            assert ev2["data"]["id"] == ev["data"]["id"]
            # nbdinfo --list never reaches transmission: no event for it.
            await asyncio.to_thread(listed, srv)
            with pytest.raises(TimeoutError):
                await next_event(c, "CLIENT_CONNECTED", timeout=0.5)

    asyncio.run(main())
    with open(img, "rb") as f:
        assert f.read(4096) == b"\xcd" * 4096


# -- export-add ------------------------------------------------------------------------------------------

def test_export_add_alias_is_listed_and_reads_as_the_volume(served: tuple[NbdServer, Path, Path]) -> None:
    srv, admin, img = served

    async def main() -> None:
        async with await AdminClient.connect(str(admin)) as c:
            r = await c.execute("export-add", {"volume": volid(img), "name": "vm100-boot",
                                               "description": "boot disk of vm 100"})
            assert r == {"name": "vm100-boot", "volume": volid(img), "read-only": False,
                         "description": "boot disk of vm 100"}
            assert (await next_event(c, "EXPORT_ADDED"))["data"] == {"name": "vm100-boot"}
            r = await c.execute("export-add", {"volume": volid(img), "name": "vm100-ro", "read-only": True})
            assert r["read-only"] is True
            for bad, cls in (({"volume": volid(img), "name": "vm100-boot"}, "GenericError"),
                             ({"volume": volid(img), "name": volid(img)}, "GenericError"),
                             ({"volume": "local:100/vm-100-disk-9.raw", "name": "x"}, "NotFound"),
                             ({"volume": volid(img), "name": "local:100/vm-100-other.raw"}, "GenericError")):
                with pytest.raises(AdminError) as err:
                    await c.execute("export-add", bad)
                assert err.value.error_class == cls, bad
            exports = {e["name"]: e for e in await c.execute("query-exports")}
            assert exports["vm100-boot"]["alias"] is True and exports["vm100-boot"]["volume"] == volid(img)
            assert exports["vm100-ro"]["read-only"] is True and exports[volid(img)]["read-only"] is False

    asyncio.run(main())
    assert {"vm100-boot", "vm100-ro", volid(img)} <= listed(srv)
    info = run(peer("nbdinfo"), "--json", srv.uri("vm100-boot")).stdout
    [exp] = json.loads(info)["exports"]
    assert exp["description"] == "boot disk of vm 100" and exp["is_read_only"] is False
    assert exp["export-size"] == 8 * MiB
    run(peer("qemu-img"), "compare", "-f", "raw", "-F", "raw", img, srv.uri("vm100-boot"))
    # Writes through the alias land in the volume; the read-only alias refuses them.
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x42 1M 64k", srv.uri("vm100-boot"))
    run(peer("qemu-img"), "compare", "-f", "raw", "-F", "raw", img, srv.uri("vm100-ro"))
    with open(img, "rb") as f:
        f.seek(MiB)
        assert f.read(65536) == b"\x42" * 65536
    h = connect(srv.uri("vm100-ro"))
    assert h.is_read_only()
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 512, 0)
    h.shutdown()
    with open(img, "rb") as f:
        assert f.read(512) == b"\x5a" * 512


# -- export-remove ---------------------------------------------------------------------------------------

def test_export_remove_safe_waits_for_the_last_client(served: tuple[NbdServer, Path, Path]) -> None:
    srv, admin, img = served
    admin_run(admin, "export-add", {"volume": volid(img), "name": "alias-a"})
    admin_run(admin, "export-add", {"volume": volid(img), "name": "alias-b"})
    ha = connect(srv.uri("alias-a"))
    hb = connect(srv.uri("alias-b"))

    async def main() -> None:
        async with await AdminClient.connect(str(admin)) as c:
            started = time.monotonic()
            removal = asyncio.ensure_future(c.execute("export-remove", {"name": "alias-a"}))
            assert (await next_event(c, "EXPORT_REMOVED"))["data"] == {"name": "alias-a"}
            # Gone from the list at once and refused to new clients, while the old one keeps working.
            names = await asyncio.to_thread(listed, srv)
            assert "alias-a" not in names and "alias-b" in names
            with pytest.raises(nbd.Error):
                await asyncio.to_thread(connect, srv.uri("alias-a"))
            assert await asyncio.to_thread(ha.pread, 512, 0) == b"\x5a" * 512
            await asyncio.sleep(0.5)
            assert not removal.done()
            await asyncio.to_thread(ha.shutdown)
            assert await asyncio.wait_for(removal, 10) == {"name": "alias-a", "clients": 1}
            assert time.monotonic() - started < 10
            # A short timeout gives up with GenericError; the export stays removed all the same.
            with pytest.raises(AdminError) as err:
                await c.execute("export-remove", {"name": "alias-b", "timeout": 0.5})
            assert err.value.error_class == "GenericError" and "still connected" in str(err.value)
            assert "alias-b" not in await asyncio.to_thread(listed, srv)
            assert await asyncio.to_thread(hb.pread, 512, 0) == b"\x5a" * 512
            with pytest.raises(AdminError) as err:
                await c.execute("export-remove", {"name": "alias-b"})
            assert err.value.error_class == "NotFound"

    asyncio.run(main())
    hb.shutdown()


def test_export_remove_of_a_volume_id_hides_it_until_added_back(served: tuple[NbdServer, Path, Path]) -> None:
    srv, admin, img = served
    admin_run(admin, "export-add", {"volume": volid(img), "name": "kept"})
    assert admin_run(admin, "export-remove", {"name": volid(img)}) == {"name": volid(img), "clients": 0}
    names = listed(srv)
    assert volid(img) not in names and "kept" in names  # its aliases stay
    with pytest.raises(nbd.Error):
        connect(srv.uri(volid(img)))
    run(peer("qemu-img"), "compare", "-f", "raw", "-F", "raw", img, srv.uri("kept"))
    admin_run(admin, "export-add", {"volume": volid(img), "name": volid(img)})
    assert volid(img) in listed(srv)
    connect(srv.uri(volid(img))).shutdown()


@pytest.mark.parametrize("served", ["uvloop", "asyncio"], indirect=True)
def test_export_remove_hard_while_a_client_writes(served: tuple[NbdServer, Path, Path]) -> None:
    srv, admin, img = served
    admin_run(admin, "export-add", {"volume": volid(img), "name": "busy"})
    block = 64 * 1024
    nblocks = 8 * MiB // block
    acked: list[int] = []
    failures: list[BaseException] = []
    started = threading.Event()
    h = connect(srv.uri("busy"))

    def pattern(i: int) -> bytes:
        return bytes([i % 251 + 1]) * block

    def writer() -> None:
        # 16 writes in flight at a time, round and round over the disk, until the server stops us.
        inflight: dict[int, int] = {}
        bufs: dict[int, Any] = {}
        i = 0
        try:
            while True:
                while len(inflight) < 16:
                    buf = nbd.Buffer.from_bytearray(bytearray(pattern(i)))
                    cookie = h.aio_pwrite(buf, (i % nblocks) * block)
                    inflight[cookie], bufs[cookie] = i, buf
                    i += 1
                h.poll(-1)
                for cookie in list(inflight):
                    try:
                        done = h.aio_command_completed(cookie)
                    except nbd.Error as e:
                        failures.append(e)
                        done = True
                        inflight.pop(cookie)
                        bufs.pop(cookie)
                        continue
                    if done:
                        acked.append(inflight.pop(cookie))
                        bufs.pop(cookie)
                if len(acked) >= 64:
                    started.set()
                if failures:
                    return
        except nbd.Error as e:
            failures.append(e)
        finally:
            started.set()

    t = threading.Thread(target=writer)
    t.start()
    assert started.wait(30)
    assert not failures, failures
    t0 = time.monotonic()
    r = admin_run(admin, "export-remove", {"name": "busy", "mode": "hard"})
    assert r == {"name": "busy", "clients": 1}
    assert time.monotonic() - t0 < 10
    t.join(20)
    assert not t.is_alive()
    # The client saw ESHUTDOWN for what it sent after the removal, or its connection closing.
    assert failures
    first = failures[0]
    # When no request happened to arrive between the drain and the close, libnbd sees only the close:
    # its connection is DEAD and polling it is EINVAL. (GatedWrites below makes the ESHUTDOWN certain.)
    closed = first.args[1] == errno.EINVAL and "DEAD" in str(first.args[0])
    assert closed or first.args[1] in (errno.ESHUTDOWN, errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE), first
    assert "busy" not in listed(srv)
    assert not [c for c in admin_run(admin, "query-clients") if c.get("export") == "busy"]
    # Every write acknowledged before the connection closed is in the file: the last one for each block.
    last: dict[int, int] = {}
    for i in acked:
        last[i % nblocks] = max(last.get(i % nblocks, -1), i)
    assert len(acked) >= 64
    with open(img, "rb") as f:
        data = f.read()
    for blk, i in last.items():
        got = data[blk * block:(blk + 1) * block]
        # A later write to the same block may have been applied without its reply reaching us.
        later = {pattern(j) for j in range(i, i + 2 * nblocks, nblocks)}
        assert got in later, (blk, i)


class GatedWrites(Filter):
    """Holds every write until ``gate`` opens, and records the order of writes and flushes."""

    def __init__(self, next: Any, gate: asyncio.Event, entered: asyncio.Event, log: list[str]) -> None:
        super().__init__(next)
        self.gate, self.entered, self.log = gate, entered, log

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        self.entered.set()
        await self.gate.wait()
        await self.next.write(offset, data, fua=fua)
        self.log.append("write")

    async def flush(self) -> None:
        await self.next.flush()
        self.log.append("flush")


def wait_command(h: Any, cookie: int) -> BaseException | None:
    """Poll ``h`` until ``cookie`` completes; its error, or None when it succeeded."""
    try:
        while not h.aio_command_completed(cookie):
            h.poll(-1)
    except nbd.Error as e:
        return e
    return None


@pytest.mark.parametrize("how", ["export-remove", "client-disconnect"])
def test_a_closing_connection_finishes_in_flight_writes_flushes_and_refuses_the_rest(
        tmp_path: Path, how: str) -> None:
    """In process, with a write held in flight: the removal (or disconnect) waits for it, a request sent
    meanwhile gets ESHUTDOWN, the held write then succeeds, the image is flushed after it, and only then
    does the connection close."""
    from concurrent.futures import ThreadPoolExecutor

    from nbdsrv.admin.commands import AdminContext
    from nbdsrv.admin.server import AdminServer
    from nbdsrv.config import ListenAddr
    from nbdsrv.exports import ExportRegistry
    from nbdsrv.pools import Pool, PoolSet
    from nbdsrv.server import NBDServer

    pool = make_pool(tmp_path / "pool")
    img = create_image(disk_path(pool, "disk-0", "raw"), "raw", "1M")
    sock = tmp_path / "admin.sock"
    # One thread for every libnbd call, so the handle is never used from two threads.
    nbd_thread = ThreadPoolExecutor(1)

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def in_nbd(fn: Any, *args: Any) -> Any:
            return loop.run_in_executor(nbd_thread, fn, *args)

        registry = ExportRegistry(PoolSet([Pool("local", str(pool))]))
        gate, entered, log = asyncio.Event(), asyncio.Event(), []
        view = registry.view

        def gated_view(name: str, exp: Any) -> Any:
            driver, info = view(name, exp)
            return GatedWrites(driver, gate, entered, log), info

        registry.view = gated_view  # type: ignore[method-assign]
        server = NBDServer(registry)
        await server.listen(ListenAddr(host="127.0.0.1", port=0))
        ctx = AdminContext(pools=registry.pools, registry=registry, request_stop=lambda: None,
                           clients=server.clients, server=server)
        admin = AdminServer(ctx)
        server.on_event = admin.emit
        await admin.listen(str(sock))
        try:
            uri = f"nbd://127.0.0.1:{server.ports()[0]}/{volid(img)}"
            h = await in_nbd(connect, uri)
            held = await in_nbd(h.aio_pwrite, nbd.Buffer.from_bytearray(bytearray(b"\x77" * 4096)), 0)
            await asyncio.wait_for(entered.wait(), 10)
            async with await AdminClient.connect(str(sock)) as c:
                [rec] = await c.execute("query-clients")
                assert rec["inflight"] == 1
                if how == "export-remove":
                    closing = asyncio.ensure_future(
                        c.execute("export-remove", {"name": volid(img), "mode": "hard"}))
                else:
                    closing = asyncio.ensure_future(c.execute("client-disconnect", {"id": rec["id"]}))
                conn = server.find(rec["id"])
                assert conn is not None
                for _ in range(1000):
                    if conn._stopping is not None:
                        break
                    await asyncio.sleep(0.01)
                assert conn._stopping is not None
                late = await in_nbd(h.aio_pread, nbd.Buffer(512), 0)
                err = await in_nbd(wait_command, h, late)
                assert isinstance(err, nbd.Error) and err.args[1] == errno.ESHUTDOWN, err
                await asyncio.sleep(0.2)
                assert not closing.done() and log == []  # still waiting for the held write
                gate.set()
                assert await in_nbd(wait_command, h, held) is None  # acknowledged after all
                await asyncio.wait_for(closing, 10)
                assert log == ["write", "flush"]
                assert server.find(rec["id"]) is None
                with pytest.raises(nbd.Error):
                    await in_nbd(h.pread, 512, 0)
        finally:
            await server.shutdown()
            await admin.close()

    asyncio.run(main())
    nbd_thread.shutdown()
    with open(img, "rb") as f:
        assert f.read(4096) == b"\x77" * 4096


# -- many admin clients beside NBD load -------------------------------------------------------------------

def test_fifty_admin_clients_while_four_nbd_clients_transfer(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    src = create_image(tmp_path / "src.raw", "raw", "32M")
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x3c 0 32M", src)
    disks = [create_image(disk_path(pool, f"disk-{n}", "raw"), "raw", "32M") for n in range(2)]
    admin = tmp_path / "admin.sock"
    srv = start_server(tmp_path / "srv", "--admin-socket", str(admin), pool=pool)
    try:
        nbdcopy = peer("nbdcopy")
        # Two clients write the source into their disks, two read the disks back, all at once.
        procs = [subprocess.Popen([nbdcopy, str(src), srv.uri(volid(d))]) for d in disks]
        procs += [subprocess.Popen([nbdcopy, srv.uri(volid(d)), "null:"]) for d in disks]

        async def one_admin(n: int) -> int:
            answered = 0
            async with await AdminClient.connect(str(admin)) as c:
                for _ in range(8):
                    status = await c.execute("query-status")
                    assert status["running"] is True
                    exports = {e["name"] for e in await c.execute("query-exports")}
                    assert {volid(d) for d in disks} <= exports
                    clients = await c.execute("query-clients")
                    assert all(isinstance(x["id"], int) and x["requests"] >= 0 for x in clients)
                    stats = await c.execute("query-server-stats")
                    assert stats["connections"]["open"] >= 0 and stats["errors"] == {}
                    with pytest.raises(AdminError):
                        await c.execute("client-disconnect", {"id": 10_000_000 + n})
                    answered += 5
            return answered

        async def main() -> list[int]:
            return await asyncio.wait_for(asyncio.gather(*(one_admin(n) for n in range(50))), 120)

        t0 = time.monotonic()
        answers = asyncio.run(main())
        elapsed = time.monotonic() - t0
        assert answers == [40] * 50
        for p in procs:
            assert p.wait(120) == 0
        assert elapsed < 120
        for d in disks:
            run(peer("qemu-img"), "compare", "-f", "raw", "-F", "raw", src, srv.uri(volid(d)))
        stats = admin_run(admin, "query-server-stats")
        assert stats["bytes-written"] >= 2 * 32 * MiB and stats["bytes-read"] >= 2 * 32 * MiB
    finally:
        assert srv.stop() == 0, srv.log()
    assert "Traceback" not in srv.log()


def test_a_client_in_the_handshake_is_listed_and_can_be_disconnected(
        served: tuple[NbdServer, Path, Path]) -> None:
    """A client that has not chosen an export shows no export and no meta contexts, and client-disconnect
    closes it at once."""
    srv, admin, _ = served
    half = socket.create_connection(("127.0.0.1", srv.port))
    try:
        deadline = time.monotonic() + 10
        while True:
            clients = admin_run(admin, "query-clients")
            if clients or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        [c] = clients
        assert c["state"] == "handshake" and "export" not in c and c["meta-contexts"] == []
        # A client still in the handshake is closed at once.
        assert admin_run(admin, "client-disconnect", {"id": c["id"]}) == {}
        half.settimeout(10)
        data = half.recv(4096)
        while data:
            data = half.recv(4096)
    finally:
        half.close()
