"""The admin socket against the published ``qemu.qmp`` client and raw sockets: the QMP wire shape, errors
that keep the connection usable, the socket's mode and removal, and the shutdown event."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.nbdsrv_fixture import (
    NbdServer,
    admin_server,
    create_image,
    disk_path,
    make_pool,
    qemu_io_holding,
    start_server,
    volid,
)
from tests.peers import REPO, in_ci, peer, run

try:
    from qemu.qmp import EventListener, ExecuteError, QMPClient
except ImportError:  # pragma: no cover - the test extra installs it
    if in_ci():
        raise
    pytest.skip("qemu.qmp is not installed", allow_module_level=True)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[NbdServer, Path]]:
    pool = make_pool(tmp_path / "pool")
    create_image(disk_path(pool, "disk-0", "qcow2"), "qcow2", "1M")
    with admin_server(tmp_path, pool) as (srv, admin):
        yield srv, admin


def raw_session(path: Path) -> tuple[socket.socket, object]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(path))
    f = s.makefile("rwb")
    greeting = json.loads(f.readline())
    assert set(greeting["QMP"]) == {"version", "capabilities"}
    return s, f


def ask(f: object, msg: bytes) -> dict[str, object]:
    f.write(msg)  # type: ignore[attr-defined]
    f.flush()  # type: ignore[attr-defined]
    return json.loads(f.readline())  # type: ignore[attr-defined,no-any-return]


def test_qemu_qmp_client_runs_commands(served: tuple[NbdServer, Path]) -> None:
    srv, admin = served

    async def main() -> None:
        qmp = QMPClient("test")
        await qmp.connect(str(admin))
        try:
            version = await qmp.execute("query-version")
            assert isinstance(version, dict) and "qemu" in version
            pools = await qmp.execute("query-pools")
            assert [p["name"] for p in pools] == ["local"]  # type: ignore[index,union-attr]
            vols = await qmp.execute("volume-list", {"pool": "local"})
            img = disk_path(srv.pool, "disk-0", "qcow2")
            assert volid(img) in [v["volid"] for v in vols]  # type: ignore[index,union-attr]
            names = [c["name"] for c in await qmp.execute("query-commands")]  # type: ignore[index,union-attr]
            assert {"query-pools", "volume-list", "query-exports", "qmp_capabilities"} <= set(names)
            with pytest.raises(ExecuteError) as err:
                await qmp.execute("no-such-command")
            assert err.value.error_class == "CommandNotFound"
            with pytest.raises(ExecuteError) as err:
                await qmp.execute("volume-list", {"pool": 5})
            assert err.value.error_class == "GenericError"
            with pytest.raises(ExecuteError) as err:
                await qmp.execute("volume-list", {"pool": "local", "bogus": 1})
            assert err.value.error_class == "GenericError"
            # Still usable after each error.
            assert await qmp.execute("query-status")
        finally:
            await qmp.disconnect()

    asyncio.run(main())


def test_bad_input_gets_error_objects_and_the_connection_stays(served: tuple[NbdServer, Path]) -> None:
    _, admin = served
    s, f = raw_session(admin)
    try:
        # QMP refuses every command before capabilities are negotiated.
        r = ask(f, b'{"execute": "query-pools", "id": 1}\n')
        assert r["error"]["class"] == "CommandNotFound" and r["id"] == 1  # type: ignore[index]
        assert "return" in ask(f, b'{"execute": "qmp_capabilities"}\n')
        for bad in (b"{not json\n", b"[1, 2]\n", b'"text"\n', b'{"execute": 7}\n', b'{"arguments": {}}\n'):
            r = ask(f, bad)
            assert r["error"]["class"] == "GenericError", (bad, r)  # type: ignore[index]
        for huge in (b"x" * (2 << 20) + b"\n", b'{"execute": "' + b"a" * (2 << 20) + b'"}\n'):
            r = ask(f, huge)  # over the 1 MiB message limit
            assert r["error"]["class"] == "GenericError"  # type: ignore[index]
        # Objects framed as QEMU frames them: two on one line, one across lines, no newline needed.
        f.write(b'{"execute": "query-status", "id": 1}{"execute": "query-status", "id": 2}\n')  # type: ignore[attr-defined]
        f.write(b'{"execute":\n "query-status",\n "id": 3}')  # type: ignore[attr-defined]
        f.flush()  # type: ignore[attr-defined]
        assert [json.loads(f.readline())["id"] for _ in range(3)] == [1, 2, 3]  # type: ignore[attr-defined]
        r = ask(f, b'{"execute": "query-version", "id": {"any": ["json"]}}\n')
        assert r["id"] == {"any": ["json"]} and "return" in r
        # Pipelined commands are answered in order, without the server holding them all at once.
        f.write(b"".join(b'{"execute": "query-status", "id": %d}\n' % i for i in range(2000)))  # type: ignore[attr-defined]
        f.flush()  # type: ignore[attr-defined]
        ids = [json.loads(f.readline())["id"] for _ in range(2000)]  # type: ignore[attr-defined]
        assert ids == list(range(2000))
    finally:
        s.close()


def test_socket_mode_and_removal(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    admin = tmp_path / "admin.sock"
    srv = start_server(tmp_path / "srv", "--admin-socket", str(admin), pool=pool)
    try:
        assert stat.S_IMODE(os.stat(admin).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(admin).st_mode)
    finally:
        assert srv.stop() == 0
    assert not admin.exists()


def test_qemu_qmp_client_follows_a_job_by_its_events(served: tuple[NbdServer, Path]) -> None:
    srv, admin = served
    img = disk_path(srv.pool, "disk-0", "qcow2")

    async def main() -> None:
        qmp = QMPClient("jobs")
        listener = EventListener()
        with qmp.listen(listener):
            await qmp.connect(str(admin))
            try:
                r = await qmp.execute("image-convert", {"volid": volid(img), "format": "raw", "job-id": "j1"})
                assert r == {"job-id": "j1", "volid": "local:100/vm-100-disk-1.raw"}
                seen: list[str] = []
                async for event in listener:
                    if event["event"] != "JOB_STATUS_CHANGE" or event["data"]["id"] != "j1":
                        continue
                    assert set(event["timestamp"]) == {"seconds", "microseconds"}
                    seen.append(event["data"]["status"])
                    if seen[-1] == "concluded":
                        break
                assert seen[0] == "created" and "running" in seen
                jobs = await qmp.execute("query-jobs")
                assert jobs[0]["status"] == "concluded" and "error" not in jobs[0]  # type: ignore[index]
                with pytest.raises(ExecuteError) as err:
                    await qmp.execute("job-pause", {"id": "j1"})
                assert "cannot accept command verb 'pause'" in err.value.error.error.desc
                await qmp.execute("job-dismiss", {"id": "j1"})
            finally:
                await qmp.disconnect()
        out = disk_path(srv.pool, "disk-1", "raw")
        assert run(peer("qemu-img"), "compare", "-f", "qcow2", "-F", "raw", img, out).returncode == 0

    asyncio.run(main())


def test_shutdown_command_emits_event_and_stops(served: tuple[NbdServer, Path]) -> None:
    srv, admin = served
    s, f = raw_session(admin)
    try:
        assert "return" in ask(f, b'{"execute": "qmp_capabilities"}\n')
        assert "return" in ask(f, b'{"execute": "shutdown"}\n')
        event = json.loads(f.readline())  # type: ignore[attr-defined]
        assert event["event"] == "SHUTDOWN"
        assert set(event["timestamp"]) == {"seconds", "microseconds"}
    finally:
        s.close()
    srv.proc.wait(20)
    assert srv.proc.returncode == 0


def test_cli_admin_command(served: tuple[NbdServer, Path]) -> None:
    srv, admin = served
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "nbdsrv", "admin", "--socket", str(admin), "volume-list",
                        "pool=local"], capture_output=True, text=True, env=env, timeout=30)
    assert p.returncode == 0, p.stderr
    assert volid(disk_path(srv.pool, "disk-0", "qcow2")) in [v["volid"] for v in json.loads(p.stdout)]
    p = subprocess.run([sys.executable, "-m", "nbdsrv", "admin", "--socket", str(admin), "volume-list",
                        "pool=nowhere"], capture_output=True, text=True, env=env, timeout=30)
    assert p.returncode == 1 and p.stderr.startswith("nbdsrv admin: ") and "Traceback" not in p.stderr


@pytest.mark.skipif(os.getuid() != 0, reason="switching to another uid needs root")
def test_other_uid_is_refused_even_when_the_mode_lets_it_in(tmp_path: Path) -> None:
    import tempfile

    public = Path(tempfile.mkdtemp(prefix="nbdsrv-admin-"))  # a directory any uid can reach
    try:
        os.chmod(public, 0o755)
        admin = public / "admin.sock"
        srv = start_server(tmp_path / "srv", "--admin-socket", str(admin), pool=make_pool(tmp_path / "pool"))
        try:
            os.chmod(admin, 0o666)  # an operator's mistake: the peer-credential check still stands
            probe = ("import socket; s = socket.socket(socket.AF_UNIX); s.settimeout(10); "
                     f"s.connect({str(admin)!r}); print(s.makefile('rb').readline().decode(), end='')")
            p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                "/usr/bin/python3", "-c", probe], capture_output=True, text=True, timeout=30)
            assert p.returncode == 0, p.stderr
            reply = json.loads(p.stdout)
            assert reply["error"]["class"] == "GenericError" and "uid 65534" in reply["error"]["desc"]
            assert "QMP" not in reply  # no greeting, nothing else
        finally:
            srv.stop()
    finally:
        import shutil

        shutil.rmtree(public, ignore_errors=True)


def test_volume_alloc_concurrent_names_and_qemu_reads_them(served: tuple[NbdServer, Path]) -> None:
    srv, admin = served

    async def allocate(n: int) -> list[str]:
        qmp = QMPClient("alloc")
        await qmp.connect(str(admin))
        try:
            out = []
            for _ in range(n):
                r = await qmp.execute("volume-alloc", {"pool": "local", "vmid": 101, "size": 4 << 20,
                                                       "format": "qcow2"})
                out.append(r["volid"])  # type: ignore[index]
            return out
        finally:
            await qmp.disconnect()

    async def main() -> list[str]:
        a, b = await asyncio.gather(allocate(6), allocate(6))
        return a + b

    volids = asyncio.run(main())
    assert len(set(volids)) == 12
    assert sorted(volids) == sorted(f"local:101/vm-101-disk-{n}.qcow2" for n in range(12))
    for volid_ in volids:
        path = srv.pool / "images" / "101" / volid_.split("/")[1]
        run(peer("qemu-img"), "check", "-q", path)
        info = json.loads(run(peer("qemu-img"), "info", "--output=json", path).stdout)
        assert info["format"] == "qcow2" and info["virtual-size"] == 4 << 20
    # The new volumes are exports at once.
    out = run(peer("qemu-img"), "info", "-f", "raw", srv.uri("local:101/vm-101-disk-11.qcow2")).stdout
    assert b"4 MiB" in out


def test_volume_alloc_and_free_refusals(served: tuple[NbdServer, Path]) -> None:
    srv, admin = served

    async def main() -> None:
        qmp = QMPClient("t")
        await qmp.connect(str(admin))
        try:
            r = await qmp.execute("volume-alloc", {"pool": "local", "vmid": 100, "size": 1 << 20,
                                                   "name": "vm-100-data"})
            assert r["volid"] == "local:100/vm-100-data.raw"  # type: ignore[index]
            for bad in ({"pool": "local", "vmid": 100, "size": 1 << 20, "name": "vm-100-data"},
                        {"pool": "local", "vmid": 100, "size": 1 << 20, "name": "base-100-x"},
                        {"pool": "local", "vmid": 100, "size": -1},
                        {"pool": "local", "vmid": 0, "size": 1 << 20},
                        {"pool": "nowhere", "vmid": 100, "size": 1 << 20},
                        {"pool": "local", "vmid": 100, "size": 1 << 20, "format": "vdi"}):
                with pytest.raises(ExecuteError):
                    await qmp.execute("volume-alloc", bad)
            img = disk_path(srv.pool, "disk-0", "qcow2")
            with qemu_io_holding(img, "qcow2"):
                with pytest.raises(ExecuteError) as err:
                    await qmp.execute("volume-free", {"volid": volid(img)})
                assert "lock" in err.value.error.error.desc
                assert img.exists()
            await qmp.execute("volume-free", {"volid": volid(img)})
            assert not img.exists()
            vols = await qmp.execute("volume-list", {"pool": "local"})
            assert volid(img) not in [v["volid"] for v in vols]  # type: ignore[index,union-attr]
            with pytest.raises(ExecuteError):
                await qmp.execute("volume-free", {"volid": volid(img)})
        finally:
            await qmp.disconnect()

    asyncio.run(main())


def test_query_clients_shows_attached_and_handshaking_clients(served: tuple[NbdServer, Path]) -> None:
    srv, admin = served
    img = disk_path(srv.pool, "disk-0", "qcow2")
    half = socket.create_connection(("127.0.0.1", srv.port))  # a client that never negotiates
    try:
        with qemu_io_holding(srv.uri(volid(img)), "raw"):
            s, f = raw_session(admin)
            try:
                assert "return" in ask(f, b'{"execute": "qmp_capabilities"}\n')
                clients = ask(f, b'{"execute": "query-clients"}\n')["return"]
            finally:
                s.close()
        assert isinstance(clients, list)
        chosen = [c for c in clients if c.get("export") == volid(img)]
        assert len(chosen) == 1 and chosen[0]["state"] == "transmission"
        assert chosen[0]["read-only"] is False and chosen[0]["peer"].startswith("127.0.0.1:")
        assert any(c["state"] == "handshake" and "export" not in c for c in clients), clients
    finally:
        half.close()


def test_qmp_shell_drives_the_socket(served: tuple[NbdServer, Path]) -> None:
    """qemu.qmp's own qmp-shell, as an operator would use it: KEY=VALUE arguments, errors shown, no hang."""
    _, admin = served
    shell = Path(sys.executable).with_name("qmp-shell")
    if not shell.exists():
        if in_ci():
            raise AssertionError(f"{shell} is missing: the test extra installs qemu.qmp")
        pytest.skip("qmp-shell is not installed")
    p = subprocess.run([str(shell), str(admin)], input="volume-list pool=local vmid=100\nno-such-command\n",
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    lines = [line.removeprefix("(QEMU) ") for line in p.stdout.splitlines() if line.startswith("(QEMU) {")]
    assert len(lines) == 2, p.stdout
    vols = json.loads(lines[0])["return"]
    assert [v["volid"] for v in vols] == ["local:100/vm-100-disk-0.qcow2"]
    assert json.loads(lines[1])["error"]["class"] == "CommandNotFound"
