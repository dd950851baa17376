"""Many clients connecting at once, as a host's VMs starting together do: every one of them gets through
the handshake, although they are more than --max-handshakes and none has sent anything when the next
arrives, and each reads its own export's data."""

from __future__ import annotations

import selectors
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.interop.nbdsrv_fixture import make_pool, start_server

nbd = pytest.importorskip("nbd")

CLIENTS = 400  # above the default of 128 handshakes at once


def _drive(handles: list[nbd.NBD], done: Callable[[nbd.NBD], bool], timeout: float = 60) -> None:
    """Run libnbd's state machines of every handle until ``done`` holds for each."""
    sel = selectors.DefaultSelector()
    deadline = time.monotonic() + timeout
    pending = [h for h in handles if not done(h)]
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} clients still waiting"
        for i, h in enumerate(pending):
            d = h.aio_get_direction()
            ev = (selectors.EVENT_READ if d & nbd.AIO_DIRECTION_READ else 0) | \
                (selectors.EVENT_WRITE if d & nbd.AIO_DIRECTION_WRITE else 0)
            if ev:
                sel.register(h.aio_get_fd(), ev, i)
        for key, ev in sel.select(timeout=1):
            h = pending[key.data]
            if ev & selectors.EVENT_READ:
                h.aio_notify_read()
            elif ev & selectors.EVENT_WRITE:
                h.aio_notify_write()
        for key in list(sel.get_map().values()):
            sel.unregister(key.fileobj)
        pending = [h for h in pending if not done(h)]


def test_a_burst_of_clients_past_max_handshakes_all_get_through(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    names = []
    for i in range(CLIENTS):
        vmid = 1000 + i
        d = pool / "images" / str(vmid)
        d.mkdir(parents=True)
        with open(d / f"vm-{vmid}-disk-0.raw", "wb") as f:
            f.write(i.to_bytes(4, "little") * 1024)
            f.truncate(1 << 20)
        names.append(f"local:{vmid}/vm-{vmid}-disk-0.raw")
    srv = start_server(tmp_path / "srv", "--log-level", "info", pool=pool)
    handles = []
    try:
        for name in names:
            h = nbd.NBD()
            h.set_export_name(name)
            h.aio_connect_unix(srv.sock)
            handles.append(h)
        _drive(handles, lambda h: bool(h.aio_is_ready()))
        bufs = [nbd.Buffer(4096) for _ in handles]
        cookies = [h.aio_pread(b, 0) for h, b in zip(handles, bufs, strict=True)]
        _drive(handles, lambda h: h.aio_in_flight() == 0)
        for i, (h, b, c) in enumerate(zip(handles, bufs, cookies, strict=True)):
            assert h.aio_command_completed(c)
            assert b.to_bytearray() == i.to_bytes(4, "little") * 1024
        for h in handles:
            h.shutdown()
    finally:
        assert srv.stop() == 0
    assert "handshake slots full" not in srv.log()
