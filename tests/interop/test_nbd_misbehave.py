"""A raw-socket client that breaks the rules, while a well-behaved libnbd client keeps working throughout."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest

from tests.interop.nbdsrv_fixture import (
    NbdServer,
    create_image,
    disk_path,
    make_pool,
    nbdsrv,
    pool,
    start_server,
    volid,
)
from tests.peers import in_ci, peer, run

__all__ = ["nbdsrv", "pool"]

try:
    import nbd
except ImportError:
    if in_ci():
        raise
    pytest.skip("python nbd (libnbd) is not installed", allow_module_level=True)

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_EXPORT_NAME = 1
OPT_GO = 7
OPT_INFO = 6
REP_ACK = 1
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2
EINVAL, EPERM = 22, 1
MiB = 1024 * 1024


class RawClient:
    """Just enough of the protocol to reach transmission, then whatever the test wants to send."""

    def __init__(self, srv: NbdServer) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(10)
        self.s.connect(srv.sock)
        magic, opt, _flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        self.s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def option(self, opt: int, data: bytes) -> list[tuple[int, bytes]]:
        self.s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, ropt, rtype, length = struct.unpack(">QIII", self.recv(20))
            assert magic == OPT_REPLY_MAGIC and ropt == opt
            body = self.recv(length)
            replies.append((rtype, body))
            if rtype == REP_ACK or rtype & (1 << 31):
                return replies

    def go(self, name: str) -> None:
        raw = name.encode()
        replies = self.option(OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        assert replies[-1][0] == REP_ACK, replies

    def request(self, cmd: int, offset: int, length: int, cookie: int = 1, flags: int = 0,
                magic: int = REQUEST_MAGIC) -> None:
        self.s.sendall(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length))

    def simple_reply(self) -> tuple[int, int]:
        magic, err, cookie = struct.unpack(">IIQ", self.recv(16))
        assert magic == SIMPLE_REPLY_MAGIC
        return err, cookie

    def expect_closed(self, timeout: float = 10) -> None:
        self.s.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self.s.recv(65536):
                    return
            except ConnectionResetError:
                return
        raise AssertionError("server did not close the connection")

    def close(self) -> None:
        self.s.close()


@pytest.fixture
def export(nbdsrv: NbdServer, pool: Path) -> str:
    img = create_image(disk_path(pool, "disk-0", "raw"), "raw", "8M")
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x33 0 8M", img)
    return volid(img)


@pytest.fixture
def good(nbdsrv: NbdServer, export: str) -> nbd.NBD:
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_unix(nbdsrv.sock)
    yield h
    h.shutdown()


def check_good(h: nbd.NBD) -> None:
    assert h.pread(4096, 4096) == b"\x33" * 4096


def test_bad_magic_in_handshake(nbdsrv: NbdServer, good: nbd.NBD) -> None:
    c = RawClient(nbdsrv)
    c.s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    c.expect_closed()
    check_good(good)


def test_bad_request_magic(nbdsrv: NbdServer, export: str, good: nbd.NBD) -> None:
    c = RawClient(nbdsrv)
    c.go(export)
    c.request(CMD_READ, 0, 512, magic=0xDEADBEEF)
    c.expect_closed()
    check_good(good)


def test_truncated_header(nbdsrv: NbdServer, export: str, good: nbd.NBD) -> None:
    c = RawClient(nbdsrv)
    c.go(export)
    c.s.sendall(struct.pack(">IHH", REQUEST_MAGIC, 0, CMD_READ))
    c.s.shutdown(socket.SHUT_WR)
    c.expect_closed()
    check_good(good)


def test_truncated_option(nbdsrv: NbdServer, good: nbd.NBD) -> None:
    c = RawClient(nbdsrv)
    c.s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, 100) + b"\0\0")
    c.s.shutdown(socket.SHUT_WR)
    c.expect_closed()
    check_good(good)


def test_unknown_command_is_refused_and_connection_survives(nbdsrv: NbdServer, export: str,
                                                            good: nbd.NBD) -> None:
    c = RawClient(nbdsrv)
    c.go(export)
    c.request(42, 0, 512, cookie=7)
    err, cookie = c.simple_reply()
    assert cookie == 7 and err == EINVAL
    c.request(CMD_READ, 0, 512, cookie=8)
    err, cookie = c.simple_reply()
    assert (err, cookie) == (0, 8)
    assert c.recv(512) == b"\x33" * 512
    c.request(CMD_DISC, 0, 0)
    c.expect_closed()
    check_good(good)


def test_oversized_requests(nbdsrv: NbdServer, export: str, good: nbd.NBD) -> None:
    c = RawClient(nbdsrv)
    c.go(export)
    # A READ too large to answer is refused, and the connection goes on.
    c.request(CMD_READ, 0, 64 * MiB, cookie=3)
    err, cookie = c.simple_reply()
    assert cookie == 3 and err != 0
    # A WRITE announcing a payload over the limit cannot be skipped safely: the connection is closed.
    c.request(CMD_WRITE, 0, 512 * MiB, cookie=4)
    try:
        c.s.sendall(b"\0" * 65536)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may close before the payload is sent, which is the point
    else:
        c.expect_closed()
    check_good(good)


def test_bad_names_over_the_wire(nbdsrv: NbdServer, export: str, good: nbd.NBD) -> None:
    c = RawClient(nbdsrv)
    for name in (b"local:100/vm-100-disk-0.raw\0", b"local:" + b"a" * 5000, b"local:100/../../etc/passwd",
                 b"/etc/passwd", b"\xff\xfe"):
        replies = c.option(OPT_INFO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        assert replies[-1][0] & (1 << 31), name
    # The handshake is still alive after the refusals.
    c.go(export)
    c.request(CMD_READ, 0, 16, cookie=9)
    assert c.simple_reply() == (0, 9)
    assert c.recv(16) == b"\x33" * 16
    check_good(good)


def test_flood_without_reading_replies_keeps_memory_bounded(nbdsrv: NbdServer, export: str,
                                                            good: nbd.NBD) -> None:
    base_rss = nbdsrv.rss_kib()
    c = RawClient(nbdsrv)
    c.go(export)
    c.s.settimeout(2)
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sent = 0
    req = b"".join(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, i, (i % 7) * MiB, MiB)
                   for i in range(256))
    try:
        while sent < 100000:
            c.s.sendall(req)
            sent += 256
    except (TimeoutError, BlockingIOError):
        pass
    # The server has stopped reading from us; meanwhile another client is served normally.
    assert sent < 100000, "server kept reading an unbounded flood"
    check_good(good)
    time.sleep(0.5)
    grown = nbdsrv.rss_kib() - base_rss
    assert grown < 200 * 1024, f"server RSS grew by {grown} KiB during the flood"
    c.close()
    check_good(good)
    assert nbdsrv.alive()


def test_export_name_option(nbdsrv: NbdServer, export: str, good: nbd.NBD) -> None:
    c = RawClient(nbdsrv)
    raw = export.encode()
    c.s.sendall(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, len(raw)) + raw)
    size, flags = struct.unpack(">QH", c.recv(10))  # NO_ZEROES was negotiated: no 124 zero bytes
    assert size == 8 * MiB and flags & 1 and not flags & 2
    c.request(CMD_READ, 4096, 8, cookie=5)
    assert c.simple_reply() == (0, 5)
    assert c.recv(8) == b"\x33" * 8
    c.close()
    # EXPORT_NAME of an unknown export cannot be refused politely: the connection is closed.
    c = RawClient(nbdsrv)
    c.s.sendall(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, 4) + b"nope")
    c.expect_closed()
    check_good(good)


def test_silent_client_dropped_after_handshake_timeout(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    img = create_image(disk_path(pool, "disk-0", "raw"), "raw", "1M")
    srv = start_server(tmp_path / "run", "--handshake-timeout", "1", pool=pool)
    try:
        c = RawClient(srv)
        t0 = time.monotonic()
        c.expect_closed(timeout=10)
        assert 0.5 < time.monotonic() - t0 < 8
        # A client that reached transmission is not subject to the limit.
        h = nbd.NBD()
        h.set_export_name(volid(img))
        h.connect_unix(srv.sock)
        time.sleep(1.5)
        assert h.pread(512, 0) == bytes(512)
        h.shutdown()
        assert "handshake timed out" in srv.log()
    finally:
        assert srv.stop() == 0


def test_connection_limit(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    img = create_image(disk_path(pool, "disk-0", "raw"), "raw", "1M")
    srv = start_server(tmp_path / "run", "--max-connections", "2", pool=pool)
    try:
        handles = []
        for _ in range(2):
            h = nbd.NBD()
            h.set_export_name(volid(img))
            h.connect_unix(srv.sock)
            handles.append(h)
        extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.settimeout(10)
        extra.connect(srv.sock)
        try:
            assert extra.recv(18) == b""
        except ConnectionResetError:
            pass
        extra.close()
        assert handles[0].pread(512, 0) == bytes(512)
        handles.pop().shutdown()
        deadline = time.monotonic() + 5
        while True:
            h = nbd.NBD()
            h.set_export_name(volid(img))
            try:
                h.connect_unix(srv.sock)
                break
            except nbd.Error:
                assert time.monotonic() < deadline, "a slot did not free up"
                time.sleep(0.1)
        assert h.pread(512, 0) == bytes(512)
        h.shutdown()
        handles[0].shutdown()
        assert "too many connections" in srv.log()
    finally:
        assert srv.stop() == 0


def test_sigterm_with_requests_in_flight(tmp_path: Path) -> None:
    """Every request answered during shutdown succeeded (and is on disk) or got ESHUTDOWN."""
    pool = make_pool(tmp_path / "pool")
    img = create_image(disk_path(pool, "disk-0", "qcow2"), "qcow2", "16M")
    srv = start_server(tmp_path / "run", pool=pool)
    c = RawClient(srv)
    c.go(volid(img))
    n, size = 64, 256 * 1024
    for i in range(n):
        c.s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, i, i * size, size)
                    + bytes([i + 1]) * size)
    srv.proc.send_signal(15)
    for i in range(n, n + 16):
        try:
            c.request(CMD_READ, 0, 4096, cookie=i)
        except OSError:
            break
    answers: dict[int, int] = {}
    try:
        while True:
            err, cookie = c.simple_reply()
            answers[cookie] = err
            if cookie >= n and err == 0:
                c.recv(4096)
    except (EOFError, ConnectionResetError):
        pass
    assert srv.proc.wait(30) == 0
    srv.stopped = True
    assert answers, "no request was answered"
    assert set(answers.values()) <= {0, 108}, answers
    ok = [i for i, err in answers.items() if err == 0 and i < n]
    cmds = [f"read -P {i + 1} {i * size} {size}" for i in ok]
    args: list[str] = []
    for cmd in cmds:
        args += ["-c", cmd]
    if args:
        res = run(peer("qemu-io"), "-f", "qcow2", *args, img)
        assert b"Pattern verification failed" not in res.stdout
    run(peer("qemu-img"), "check", img)
