"""Warnings that peers provoke are rate-limited per message, and the count of dropped ones is reported."""

from __future__ import annotations

import logging

from nbdsrv.log import PeerFloodFilter


def _record(msg: str, *, peer: bool = True, level: int = logging.WARNING) -> logging.LogRecord:
    r = logging.LogRecord("nbdsrv.server", level, __file__, 1, msg, None, None)
    if peer:
        r.peer = "127.0.0.2:4000"
    return r


def test_a_flood_passes_the_burst_then_reports_what_it_dropped() -> None:
    now = [0.0]
    f = PeerFloodFilter(burst=3, window=10, clock=lambda: now[0])
    passed = [f.filter(_record("connection refused")) for _ in range(10)]
    assert passed == [True] * 3 + [False] * 7
    # another message, and lines no peer provoked, are not held back by it
    assert f.filter(_record("TLS handshake failed"))
    assert all(f.filter(_record("connection refused", peer=False)) for _ in range(5))
    assert all(f.filter(_record("connection refused", level=logging.INFO)) for _ in range(5))
    now[0] = 10.5
    r = _record("connection refused")
    assert f.filter(r) and r.suppressed == 7
    r = _record("connection refused")
    assert f.filter(r) and not hasattr(r, "suppressed")
