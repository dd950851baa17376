"""A flood of refused connections leaves a bounded log, and the server goes on serving."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.interop.nbdsrv_fixture import create_image, disk_path, make_pool, start_server, volid
from tests.peers import peer, run


def test_refused_connections_log_at_most_the_burst(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    img = create_image(disk_path(pool, "disk-0", "raw"), "raw", "1M")
    srv = start_server(tmp_path / "srv", "--allow", "127.0.0.1/32", pool=pool)
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5, source_address=("127.0.0.2", 0))
            assert s.recv(100) == b""  # closed before the greeting
            s.close()
        out = run(peer("qemu-io"), "-r", "-f", "raw", "-c", "read 0 4k", srv.uri(volid(img)))
        assert b"read 4096/4096" in out.stdout
    finally:
        assert srv.stop() == 0
    refused = [ln for ln in srv.log().splitlines() if "connection refused" in ln]
    assert len(refused) == 20, len(refused)
