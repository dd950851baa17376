"""nbdsrv/activation.py: LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES read as sd_listen_fds() reads them, and
sd_notify datagrams, each in a fresh interpreter (descriptor 3 and the environment are process-wide)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.peers import REPO

CHILD = """
import os, socket, json
from nbdsrv.activation import listen_fds, notify
a = socket.socket(); a.bind(("127.0.0.1", 0)); a.listen()
b = socket.socket(socket.AF_UNIX); b.bind({unix!r}); b.listen()
os.dup2(a.fileno(), 3); os.dup2(b.fileno(), 4)
os.environ.update(LISTEN_PID={pid}, LISTEN_FDS="2", LISTEN_FDNAMES={names!r})
got = listen_fds()
print(json.dumps({{"fds": [[s.fd, s.name] for s in got],
                  "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
                  "inheritable": [os.get_inheritable(s.fd) for s in got],
                  "notified": notify("READY=1")}}))
"""


def _run(tmp_path: Path, pid: str, names: str, notify_socket: str | None = None) -> dict[str, object]:
    import json

    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NOTIFY_SOCKET", None)
    if notify_socket is not None:
        env["NOTIFY_SOCKET"] = notify_socket
    code = CHILD.format(unix=str(tmp_path / "u.sock"), pid=pid, names=names)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr.decode()
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_named_sockets_for_this_process(tmp_path: Path) -> None:
    got = _run(tmp_path, "str(os.getpid())", "nbd:admin")
    assert got["fds"] == [[3, "nbd"], [4, "admin"]]
    assert got["env"] == []  # removed, so that nothing we start takes them for its own
    assert got["inheritable"] == [False, False]
    assert got["notified"] is False  # no NOTIFY_SOCKET: nothing sent, nothing raised


def test_sockets_for_another_process_are_ignored(tmp_path: Path) -> None:
    got = _run(tmp_path, "str(os.getpid() + 1)", "nbd:admin")
    assert got["fds"] == [] and got["env"] == []


def test_missing_names_are_unknown(tmp_path: Path) -> None:
    got = _run(tmp_path, "str(os.getpid())", "")
    assert got["fds"] == [[3, "unknown"], [4, "unknown"]]


def test_notify_reaches_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(10)
        got = _run(tmp_path, "str(os.getpid())", "nbd:admin", str(path))
        assert got["notified"] is True
        assert s.recv(100) == b"READY=1"
