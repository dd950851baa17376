"""The protocol core against real NBD clients (libnbd's nbdinfo/nbdcopy/nbdsh API, qemu-img, qemu-io 7.2 and
10), through a minimal threaded socket loop over in-memory disks. The full asyncio server has its own
interop tests; these pin down the core's wire behaviour: negotiation, meta contexts, extended headers.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdsrv.proto.connection import ServerConnection
from nbdsrv.proto.events import TERMINAL_EVENTS, ExportInfo
from tests.peers import peer, qemu10, run
from tests.unit.test_proto_pair import BASE, DEPTH, MemoryApp

SIZE = 4 << 20

EXPORTS = {
    "disk": ExportInfo("disk", SIZE, description="in-memory disk", meta_contexts=(BASE, DEPTH)),
    "ro": ExportInfo("ro", SIZE, read_only=True, can_trim=False, can_zero=False, can_fast_zero=False),
    "aligned": ExportInfo("aligned", SIZE, min_block=512, pref_block=4096, max_block=1 << 20),
}


class ThreadServer:
    """Accepts connections on a unix socket; one thread per connection drives a ServerConnection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.disks = {n: bytearray(i.size) for n, i in EXPORTS.items()}
        self.lock = threading.Lock()
        self.cores: list[ServerConnection] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def uri(self, export: str = "disk") -> str:
        return f"nbd+unix:///{export}?socket={self.path}"

    def close(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        core = ServerConnection()
        with self.lock:
            self.cores.append(core)
        app = MemoryApp(core, EXPORTS, self.disks, holes=True)
        with conn:
            conn.sendall(core.initial_data())
            while True:
                try:
                    data = conn.recv(1 << 20)
                except OSError:
                    return
                core.receive_data(data)
                try:
                    while (ev := core.next_event()) is not None:
                        with self.lock:
                            out = app.handle(ev)
                        out += core.data_to_send()
                        if out:
                            conn.sendall(b"".join(bytes(b) for b in out))
                        if isinstance(ev, TERMINAL_EVENTS):
                            return
                    out = core.data_to_send()
                    if out:
                        conn.sendall(b"".join(bytes(b) for b in out))
                except OSError:
                    return  # the client hung up without waiting (NBD_OPT_ABORT allows that)
                if not data:
                    return


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ThreadServer]:
    s = ThreadServer(tmp_path / "nbd.sock")
    yield s
    s.close()


def test_nbdinfo_json(srv: ThreadServer) -> None:
    out = json.loads(run(peer("nbdinfo"), "--json", srv.uri("aligned")).stdout)
    (e,) = out["exports"]
    assert e["export-size"] == SIZE and e["is_read_only"] is False
    # nbdinfo asks for NBD_INFO_BLOCK_SIZE, so it is told the real minimum
    sizes = (e["block_size_minimum"], e["block_size_preferred"], e["block_size_maximum"])
    assert sizes == (512, 4096, 1 << 20)
    out = json.loads(run(peer("nbdinfo"), "--json", srv.uri("disk")).stdout)
    (e,) = out["exports"]
    assert e["description"] == "in-memory disk"
    assert set(e["contexts"]) == {BASE, DEPTH}
    assert out["protocol"] == "newstyle-fixed" and e["can_multi_conn"] is True
    ro = json.loads(run(peer("nbdinfo"), "--json", srv.uri("ro")).stdout)["exports"][0]
    assert ro["is_read_only"] is True and ro["can_trim"] is False


def test_nbdinfo_list(srv: ThreadServer) -> None:
    out = json.loads(run(peer("nbdinfo"), "--list", "--json", srv.uri("")).stdout)
    names = {e["export-name"]: e.get("description", "") for e in out["exports"]}
    assert set(names) == set(EXPORTS) and names["disk"] == "in-memory disk"


def test_nbdinfo_map_both_contexts(srv: ThreadServer) -> None:
    srv.disks["disk"][65536 : 65536 + 8192] = b"x" * 8192
    out = json.loads(run(peer("nbdinfo"), "--map", "--json", srv.uri("disk")).stdout)
    runs = [(m["offset"], m["length"], m["type"]) for m in out]
    assert (65536, 8192, 0) in runs and runs[0] == (0, 65536, 3)
    assert sum(r[1] for r in runs) == SIZE
    out = json.loads(run(peer("nbdinfo"), f"--map={DEPTH}", "--json", srv.uri("disk")).stdout)
    assert [(m["offset"], m["length"], m["type"]) for m in out] == [(0, SIZE, 1)]


@pytest.mark.parametrize("which", ["qemu7", "qemu10"])
def test_qemu_io_and_map(srv: ThreadServer, which: str) -> None:
    qemu_io = peer("qemu-io") if which == "qemu7" else qemu10("qemu-io")
    qemu_img = peer("qemu-img") if which == "qemu7" else qemu10("qemu-img")
    run(qemu_io, "-f", "raw", "-c", "write -P 0xab 1M 64k", "-c", "write -z 2M 64k", "-c", "discard 3M 4k",
        "-c", "read -P 0xab 1M 64k", "-c", "read -P 0 0 64k", srv.uri())
    assert srv.disks["disk"][1 << 20 : (1 << 20) + 65536] == b"\xab" * 65536
    m = json.loads(run(qemu_img, "map", "--output=json", "-f", "raw", srv.uri()).stdout)
    data = [(e["start"], e["length"]) for e in m if e["data"]]
    assert data == [(1 << 20, 65536)]
    if which == "qemu10":  # qemu 10's NBD client negotiates extended headers
        assert any(core.extended for core in srv.cores)
    else:
        assert any(core.structured and not core.extended for core in srv.cores)


def test_qemu_img_compare_and_nbdcopy(srv: ThreadServer, tmp_path: Path) -> None:
    srv.disks["disk"][:4096] = b"\x01" * 4096
    srv.disks["disk"][SIZE - 4096 :] = b"\x02" * 4096
    out = tmp_path / "copy.raw"
    run(peer("nbdcopy"), srv.uri(), str(out))
    assert out.read_bytes() == bytes(srv.disks["disk"])
    run(peer("qemu-img"), "compare", "-f", "raw", "-F", "raw", srv.uri(), str(out))
    run(peer("nbdcopy"), str(out), srv.uri("aligned"))
    assert srv.disks["aligned"] == srv.disks["disk"]


def test_libnbd_options_and_errors(srv: ThreadServer) -> None:
    nbd = pytest.importorskip("nbd")
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(srv.uri("disk"))
    seen: list[str] = []

    def context(name: str) -> int:
        seen.append(name)
        return 0

    h.add_meta_context("qemu:")
    assert h.opt_list_meta_context(context) == 1
    assert seen == [DEPTH]
    h.set_export_name("missing")
    with pytest.raises(nbd.Error):
        h.opt_info()
    h.set_export_name("ro")
    h.opt_go()
    assert h.is_read_only() and h.get_size() == SIZE
    h.set_strict_mode(0)
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 512, 0)
    assert e.value.errno == "EPERM"
    with pytest.raises(nbd.Error) as e:
        h.pread(512, SIZE)
    assert e.value.errno == "EINVAL"
    assert h.pread(512, 0) == bytes(512)  # the connection survived
    h.shutdown()
