"""What an NBD client sees when the host fails the server's I/O, or an image is marked corrupt mid-session.

The server runs in-process (its own event loop on a thread) over an export registry whose volumes open
their files through the fault-injection double; the client is real qemu-io over a unix socket. A failing
request must reach the client as its errno (EIO, ENOSPC), the server must keep serving, and flushed data
must read back; after qcow2 marks an image corrupt, writes fail with EIO, reads go on, and the corrupt bit
is on the image as qemu leaves it.
"""

from __future__ import annotations

import asyncio
import errno
import json
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagecore.driver import ImageOpener
from nbdsrv.config import ImageConfig, ListenAddr
from nbdsrv.exports import ExportRegistry
from nbdsrv.pools import PoolSet, Volume
from nbdsrv.server import NBDServer
from tests.doubles.faults import FaultOpener, FaultPlan
from tests.peers import SYSTEM_PYTHON, peer, run

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class FaultyVolume(Volume):
    """A volume whose files are opened through one FaultPlan."""

    plan: FaultPlan | None = None

    def opener(self, *, lock: bool = True, describe: bool = False) -> ImageOpener:
        if describe or self.plan is None:
            return Volume.opener(self, lock=lock, describe=describe)  # slots: no zero-argument super()
        return FaultOpener(self.plan, lock=lock)


class FaultyRegistry(ExportRegistry):
    def __init__(self, image: Path, plan: FaultPlan) -> None:
        super().__init__(PoolSet([]), [ImageConfig(str(image), name="img", format="qcow2")])
        self.plan = plan

    def lookup(self, name: str) -> Volume | None:
        vol = super().lookup(name)
        if vol is None:
            return None
        return FaultyVolume(vol.volid, vol.path, vol.fmt, vol.read_only, vol.kind, vol.pool, plan=self.plan)


class InProcessServer:
    """NBDServer on its own event loop thread, listening on a unix socket."""

    def __init__(self, registry: ExportRegistry, sock: Path) -> None:
        self.registry = registry
        self.sock = sock
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="nbdsrv-test", daemon=True)
        self.server: NBDServer | None = None

    def start(self) -> None:
        self.thread.start()

        async def go() -> None:
            self.server = NBDServer(self.registry)
            await self.server.listen(ListenAddr(unix=str(self.sock)))

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(10)

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def wait_idle(self, timeout: float = 10) -> None:
        """Until the last client's export is flushed and closed: the server does that after the client left
        (the export leaves the registry before its flush), and a fault armed before then would hit the
        close instead of the next request. Idle: no export open and no host operation for 0.2 s."""
        plan = getattr(self.registry, "plan", None)
        deadline = time.monotonic() + timeout
        seen, quiet_since = -1, time.monotonic()
        while True:
            now = time.monotonic()
            assert now < deadline, "the export stayed busy after its last client left"
            count = plan.mark() if isinstance(plan, FaultPlan) else 0
            if count != seen or self.registry.open_count():
                seen, quiet_since = count, now
            elif now - quiet_since >= 0.2:
                return
            time.sleep(0.02)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///img?socket={self.sock}"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[InProcessServer, FaultPlan, Path]]:
    img = tmp_path / "disk.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", img, str(1024 * MiB))
    plan = FaultPlan()
    srv = InProcessServer(FaultyRegistry(img, plan), tmp_path / "nbd.sock")
    srv.start()
    try:
        yield srv, plan, img
    finally:
        srv.stop()


def qio(srv: InProcessServer, *cmds: str) -> tuple[int, str]:
    args: list[str] = []
    for c in cmds:
        args += ["-c", c]
    # qemu-io's default is writethrough (a flush after every write): writeback keeps a flush its own request
    proc = run(peer("qemu-io"), "-f", "raw", "-t", "writeback", *args, srv.uri, check=False, timeout=60)
    srv.wait_idle()
    return proc.returncode, proc.stdout.decode() + proc.stderr.decode()


def assert_ok(srv: InProcessServer, *cmds: str) -> str:
    rc, out = qio(srv, *cmds)
    assert rc == 0 and "failed" not in out and "Pattern verification" not in out, out
    return out


@pytest.mark.parametrize(("code", "text"), [
    (errno.EIO, "write failed: Input/output error"),
    (errno.ENOSPC, "write failed: No space left on device"),
], ids=["EIO", "ENOSPC"])
def test_failed_write_reaches_client_and_server_stays_up(
        served: tuple[InProcessServer, FaultPlan, Path], code: int, text: str) -> None:
    srv, plan, _img = served
    assert_ok(srv, "write -P 0x11 0 64k", "flush")
    plan.arm("write", 1, code)  # opening the export writes nothing: the first write is the request's
    _rc, out = qio(srv, "write -P 0x22 1M 64k", "read -P 0x11 0 64k")
    assert text in out and "read 65536/65536" in out, out
    assert plan.faults and plan.faults[0].kind == "write"
    plan.disarm()
    # the server is up, the flushed data is there, and the failed request succeeds once retried
    assert_ok(srv, "write -P 0x22 1M 64k", "flush", "read -P 0x22 1M 64k", "read -P 0x11 0 64k")


def test_failed_read_reaches_client(served: tuple[InProcessServer, FaultPlan, Path]) -> None:
    srv, plan, _img = served
    assert_ok(srv, "write -P 0x11 0 64k", "flush")
    # a session without faults tells which host read serves the request: the last one
    mark = plan.mark()
    assert_ok(srv, "read -P 0x11 0 64k")
    nth = [op.kind for op in plan.ops[mark:]].count("read")
    plan.arm("read", nth, errno.EIO)
    _rc, out = qio(srv, "read -P 0x11 0 64k")
    assert "read failed: Input/output error" in out, out
    plan.disarm()
    assert_ok(srv, "read -P 0x11 0 64k")


def test_failed_open_refuses_export_with_reason(served: tuple[InProcessServer, FaultPlan, Path]) -> None:
    srv, plan, _img = served
    plan.arm("read", 1, errno.EIO)  # the header read when the export is opened
    rc, out = qio(srv, "read 0 64k")
    assert rc != 0 and "server reported: read: Input/output error" in out, out
    plan.disarm()
    assert_ok(srv, "read 0 64k")


def test_failed_flush_reaches_client(served: tuple[InProcessServer, FaultPlan, Path]) -> None:
    """qemu-io does not print a failed flush: libnbd (nbdsh) shows the errno the reply carried."""
    srv, plan, _img = served
    assert_ok(srv, "write -P 0x11 2M 64k", "flush")
    # an overwrite in place syncs nothing: the first sync is the flush's
    plan.arm("sync", 1, errno.EIO)
    # libnbd's nbd.Error gives the reply's errno by name
    script = ("h.pwrite(b'\\x33' * 65536, 2 << 20)\n"
              "try:\n"
              "    h.flush()\n"
              "    print('flush ok')\n"
              "except nbd.Error as e:\n"
              "    print('flush failed', e.errno, e.string)\n")
    # nbdsh wraps `python3 -m nbd`: run that with the system python, which has the nbd module
    peer("nbdsh")
    proc = run(SYSTEM_PYTHON, "-m", "nbd", "-u", srv.uri, "-c", script, check=False, timeout=60)
    srv.wait_idle()
    out = proc.stdout.decode() + proc.stderr.decode()
    assert "flush failed EIO" in out, out
    assert plan.faults and plan.faults[0].kind == "sync"
    plan.disarm()
    assert_ok(srv, "flush", "read -P 0x33 2M 64k")


def test_image_marked_corrupt_mid_session(served: tuple[InProcessServer, FaultPlan, Path]) -> None:
    """An L1 entry that points at the refcount table: the first write through it marks the image corrupt."""
    srv, _plan, img = served
    assert_ok(srv, "write -P 0x44 0 64k", "flush")
    # 64 KiB clusters: L1 entry 1 covers guest [512M, 1G); point it at the refcount table, as a hostile or
    # damaged image might, while the server has the image open (its L1 is read at open: reopen by a client)
    info = json.loads(run(peer("qemu-img"), "info", "-U", "--output=json", img).stdout)
    assert info["cluster-size"] == 65536
    with img.open("r+b") as f:
        f.seek(0)
        head = f.read(72)
        l1_off = struct.unpack(">Q", head[40:48])[0]
        reft_off = struct.unpack(">Q", head[48:56])[0]
        f.seek(l1_off + 8)
        f.write(struct.pack(">Q", reft_off | 1 << 63))
    # the export was closed when the last client left, so the next client opens the damaged L1
    rc, out = qio(srv, "write -P 0x55 600M 64k", "read -P 0x44 0 64k", "write -P 0x66 1M 4k",
                  "read -P 0x44 0 64k")
    assert out.count("write failed: Input/output error") == 2, out
    assert out.count("read 65536/65536") == 2, out
    info = json.loads(run(peer("qemu-img"), "info", "-U", "--output=json", img).stdout)
    assert info["format-specific"]["data"]["corrupt"] is True
    # a new client: the corrupt image is not opened read-write again, as qemu refuses it, and says why
    rc, out = qio(srv, "read -P 0x44 0 64k")
    assert rc != 0 and "server reported: qcow2: Image is corrupt; cannot be opened read/write" in out, out
