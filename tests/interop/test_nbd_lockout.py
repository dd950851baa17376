"""Listening: with the default settings one hostile address cannot lock out another; unix socket modes.

100 idle connections that finished the handshake and 100 that connected and said nothing, all from
127.0.0.1, leave a client from 127.0.0.2 able to connect and read at once.
"""

from __future__ import annotations

import resource
import socket
import struct
import time
from pathlib import Path

import pytest

from tests.interop.nbdsrv_fixture import create_image, disk_path, make_pool, start_server, volid

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
OPT_GO = 7
REP_ACK = 1
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed by the server")
        buf += chunk
    return buf


def handshake(s: socket.socket, name: str) -> None:
    """Fixed newstyle handshake up to NBD_OPT_GO's ACK: the connection is then in transmission."""
    magic, opt, _flags = struct.unpack(">QQH", recv_exact(s, 18))
    assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
    s.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    data = struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
    while True:
        rmagic, ropt, rtype, rlen = struct.unpack(">QIII", recv_exact(s, 20))
        assert (rmagic, ropt) == (REPLY_MAGIC, OPT_GO)
        recv_exact(s, rlen)
        if rtype == REP_ACK:
            return
        assert rtype < 0x80000000, f"NBD_OPT_GO refused: {rtype:#x}"


def connect(port: int, source: str | None = None, timeout: float = 5) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    if source is not None:
        s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def test_one_address_cannot_lock_out_another(tmp_path: Path) -> None:
    # 200 client sockets here and as many descriptors in the server (which inherits this limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 1024:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 600:
            pytest.fail(f"open-file limit {hard} is too low for this test")
    pool = make_pool(tmp_path / "pool")
    img = create_image(disk_path(pool, "disk-0", "raw"), "raw", "1M")
    name = volid(img)
    srv = start_server(tmp_path / "run", pool=pool)
    socks: list[socket.socket] = []
    try:
        for _ in range(100):
            s = connect(srv.port)
            socks.append(s)
            handshake(s, name)
        for _ in range(100):
            socks.append(connect(srv.port))
        time.sleep(0.2)
        t0 = time.monotonic()
        c = connect(srv.port, source="127.0.0.2", timeout=1)
        handshake(c, name)
        c.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, 7, 0, 4096))
        magic, err, cookie = struct.unpack(">IIQ", recv_exact(c, 16))
        assert (magic, err, cookie) == (SIMPLE_REPLY_MAGIC, 0, 7)
        assert recv_exact(c, 4096) == bytes(4096)
        assert time.monotonic() - t0 < 1
        assert c.getsockname()[0] == "127.0.0.2"
        c.close()
        # The idle established connections are still served: they are not timed out.
        s = socks[0]
        s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, 8, 0, 512))
        assert struct.unpack(">IIQ", recv_exact(s, 16)) == (SIMPLE_REPLY_MAGIC, 0, 8)
        assert recv_exact(s, 512) == bytes(512)
    finally:
        for s in socks:
            s.close()
        assert srv.stop() == 0
    assert "Traceback" not in srv.log(), srv.log()


def test_unix_socket_mode_and_group(tmp_path: Path) -> None:
    """--socket-mode/--socket-group (and the TOML keys) are applied to the unix listening socket."""
    import grp
    import os
    import stat

    gid = grp.getgrnam("nogroup").gr_gid
    pool = make_pool(tmp_path / "pool")
    create_image(disk_path(pool, "disk-0", "raw"), "raw", "1M")
    srv = start_server(tmp_path / "run", "--socket-mode", "0660", "--socket-group", "nogroup", pool=pool)
    try:
        st = os.stat(srv.sock)
        assert stat.S_ISSOCK(st.st_mode)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(srv.sock)
            assert struct.unpack(">Q", recv_exact(s, 8))[0] == NBDMAGIC
        assert not [n for n in os.listdir(os.path.dirname(srv.sock)) if n.endswith(".tmp")]
    finally:
        assert srv.stop() == 0
    conf = tmp_path / "nbdsrv.toml"
    conf.write_text(f'[server]\nsocket_mode = 0o640\nsocket_group = {gid}\n')
    srv = start_server(tmp_path / "run2", "--config", str(conf), pool=pool)
    try:
        st = os.stat(srv.sock)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, gid)
    finally:
        assert srv.stop() == 0
