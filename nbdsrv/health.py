"""`nbdsrv health`: is a server answering? The container's HEALTHCHECK.

The probe reads the NBD greeting and ends the handshake with NBD_OPT_ABORT: no export is named, listed or
opened, so no image is touched and no lock byte is taken (a running VM's disk stays its own), and the cost
is the same with one volume or ten thousand. A server behind `--tls require` still greets in plaintext,
so the probe needs no credentials.

The address is the one the server is told to listen on: the argument, else the first of $NBDSRV_LISTEN
(which `nbdsrv serve` also reads when it is given no --listen), else the default 127.0.0.1:10809. A
wildcard host (0.0.0.0, ::) is probed on the loopback address of its family.
"""

from __future__ import annotations

import os
import socket
import struct

from imagecore.errors import BlockError

from .config import DEFAULT_LISTEN, ListenAddr, parse_listen

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPT_ABORT = 2
CLIENT_FLAGS = 0x3  # NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES


class Unhealthy(Exception):
    """The server did not greet as an NBD server does."""


def target(arg: str | None = None) -> ListenAddr:
    """The address to probe: ``arg``, the first of $NBDSRV_LISTEN, or the default."""
    text = arg or os.environ.get("NBDSRV_LISTEN", "").replace(",", " ").split(" ")[0] or DEFAULT_LISTEN
    addr = parse_listen(text)
    if addr.host in ("0.0.0.0", ""):
        return ListenAddr(host="127.0.0.1", port=addr.port)
    if addr.host == "::":
        return ListenAddr(host="::1", port=addr.port)
    return addr


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise Unhealthy(f"connection closed after {len(buf)} of {n} bytes of the greeting")
        buf += chunk
    return buf


def probe(addr: ListenAddr, timeout: float = 5.0) -> None:
    """Raise Unhealthy (or OSError) unless the server at ``addr`` greets as a fixed-newstyle NBD server."""
    if addr.unix is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(addr.unix)
        except BaseException:
            sock.close()
            raise
    else:
        assert addr.host is not None and addr.port is not None
        sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
    with sock:
        greeting = _recv_exactly(sock, 18)
        if greeting[:16] != NBDMAGIC + IHAVEOPT:
            raise Unhealthy(f"not an NBD newstyle greeting: {greeting[:16]!r}")
        sock.sendall(struct.pack(">I", CLIENT_FLAGS) + IHAVEOPT + struct.pack(">II", OPT_ABORT, 0))
        # The server acknowledges the abort (or drops the connection, which the protocol allows): either
        # is the end of a healthy handshake; nothing more is waited for.
        try:
            sock.recv(64)
        except OSError:
            pass


def main(arg: str | None, timeout: float) -> int:
    import sys

    try:
        addr = target(arg)
    except BlockError as e:
        print(f"nbdsrv health: {e}", file=sys.stderr)
        return 1
    try:
        probe(addr, timeout)
    except (OSError, Unhealthy) as e:
        print(f"nbdsrv health: {addr}: {e}", file=sys.stderr)
        return 1
    return 0
