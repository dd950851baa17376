"""Handshake hardening, measured: 1,000 idle unauthenticated TCP connections do not lock out a client that
authenticates (it connects and reads within one second), and the handshake timeout covers a TLS
handshake that stalls.

The idle sockets come from 63 loopback addresses (127.0.0.2 ... 127.0.0.64), 16 from each, which is the
default per-address cap of connections in the handshake; the server's cap of 128 handshaking connections
in all is what they run into. The authenticated client comes from 127.0.0.1.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest

from nbdsrv.server import HANDSHAKE_GRACE
from tests.interop.nbdsrv_fixture import create_image, disk_path, make_pool, start_server, volid
from tests.interop.test_admin_net import admin_run
from tests.interop.test_nbd_tls import CLIENT_DN, OPT_STARTTLS, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, Raw
from tests.peers import peer, run
from tests.tlsutil import CA

IDLE = 1000
PER_ADDRESS = 16


def _idle_sockets(port: int) -> list[socket.socket]:
    out = []
    for i in range(IDLE):
        src = f"127.0.0.{2 + i // PER_ADDRESS}"
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((src, 0))
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        out.append(s)
    return out


def _closed_by_server(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        while s.recv(65536):  # the greeting, then EOF if the server dropped it
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_thousand_idle_sockets_do_not_lock_out_an_authenticated_client(tmp_path: Path, loop: str) -> None:
    pool = make_pool(tmp_path / "pool")
    img = create_image(disk_path(pool, "disk-0", "raw"), "raw", "4M")
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x5a 0 4M", img)
    ca = CA.make()
    server = ca.server_dir(tmp_path / "server")
    client = ca.client_dir(tmp_path / "client", CLIENT_DN)
    admin = tmp_path / "admin.sock"
    srv = start_server(tmp_path / "srv", "--tls-creds", str(server), "--tls-verify-peer", "--admin-socket",
                       str(admin), "--log-level", "info", pool=pool,
                       env={"NBDSRV_LOOP": "asyncio"} if loop == "asyncio" else None)
    sockets: list[socket.socket] = []
    try:
        t0 = time.monotonic()
        sockets = _idle_sockets(srv.port)
        opened = time.monotonic() - t0
        time.sleep(0.3)  # let the server accept them all (within their grace: admitted past the cap)
        t0 = time.monotonic()
        r = Raw(srv.port)
        r.starttls(client)
        r.go_flags(volid(img))
        r.s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, 1, 0, 4096))
        assert struct.unpack(">IIQ", r.recv(16)) == (SIMPLE_REPLY_MAGIC, 0, 1)
        assert r.recv(4096) == b"\x5a" * 4096
        took = time.monotonic() - t0
        print(f"\n[{loop}] {IDLE} idle sockets opened in {opened:.2f} s; an authenticated TLS client "
              f"connected and read 4 KiB in {took * 1000:.1f} ms")
        assert took < 1.0
        r.close()
        # once their grace is over, the silent ones beyond the cap are dropped
        time.sleep(HANDSHAKE_GRACE)
        deadline = time.monotonic() + 10
        while (stats := admin_run(admin, "query-server-stats")["connections"])["handshaking"] > 128:
            assert time.monotonic() < deadline, stats
            time.sleep(0.2)
        assert stats["total"] >= IDLE  # every one of them was accepted, then the weakest were dropped
        alive = sum(not _closed_by_server(s) for s in sockets)
        print(f"[{loop}] of the idle sockets, {alive} still hold a slot")
        assert alive <= 128
    finally:
        for s in sockets:
            s.close()
        assert srv.stop() == 0, srv.log()
        log = srv.log()
        assert "Traceback" not in log
    assert "handshake slots full" in log


def test_handshake_timeout_covers_a_stalled_tls_handshake(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    server = CA.make().server_dir(tmp_path / "server")
    srv = start_server(tmp_path / "srv", "--tls-creds", str(server), "--handshake-timeout", "1", pool=pool)
    try:
        r = Raw(srv.port)
        r.s.sendall(Raw.opt(OPT_STARTTLS))
        r.replies(OPT_STARTTLS)
        r.s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc")  # the start of a ClientHello, then nothing
        t0 = time.monotonic()
        r.s.settimeout(10)
        try:
            assert r.s.recv(100) == b""
        except ConnectionResetError:
            pass
        took = time.monotonic() - t0
        assert took < 3.0
        r.close()
    finally:
        assert srv.stop() == 0, srv.log()
    log = srv.log()
    assert "handshake timed out" in log and "tls=\"in progress\"" in log
