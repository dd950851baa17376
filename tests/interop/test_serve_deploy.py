"""What a service manager or a container needs of `nbdsrv serve`, tested on the host (tests/interop/
test_docker.py tests the same in the image): JSON-lines logs where every line of stderr is one object, from
the first argument error to the last record; defaults from the environment (NBDSRV_LISTEN,
NBDSRV_LOG_FORMAT, NBDSRV_LOG_LEVEL); SIGTERM with clients attached ends within a second, exit 0, with
every flushed write on disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nbdsrv.admin.client import AdminClient
from tests.interop.nbdsrv_fixture import (
    create_image,
    disk_path,
    free_port,
    make_pool,
    start_server,
    volid,
    with_client,
)
from tests.peers import REPO, peer, run

nbd = pytest.importorskip("nbd")


def json_lines(text: str) -> list[dict[str, object]]:
    records = []
    for line in text.splitlines():
        record = json.loads(line)  # any line that is not JSON fails the test here
        assert isinstance(record, dict) and {"time", "level", "logger", "msg"} <= record.keys(), line
        records.append(record)
    return records


def nbdsrv_cmd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    full = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "nbdsrv", *args], capture_output=True, env=full, timeout=60,
                          cwd=str(REPO))


BAD = [
    (["serve"], 1, "nothing to export"),
    (["serve", "--pool", "local=/nonexistent/dir"], 1, "not a directory"),
    (["serve", "--pool", "x=/tmp", "--config", "/nonexistent.toml"], 1, "cannot read config"),
    (["serve", "--pool", "x=/tmp", "--listen", "unix:/nonexistent/dir/sock"], 1, "cannot listen"),
    (["serve", "--pool", "x=/tmp", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["serve", "--pool", "x=/tmp", "--max-requests", "many"], 2, "invalid int value"),
    (["bogus-command"], 2, "invalid choice: 'bogus-command'"),
]


@pytest.mark.parametrize("how", ["flag", "environment"])
@pytest.mark.parametrize("args,rc,needle", BAD)
def test_start_up_errors_are_one_json_record(how: str, args: list[str], rc: int, needle: str) -> None:
    if how == "flag":
        res = nbdsrv_cmd(*args, "--log-format", "json")
    else:
        res = nbdsrv_cmd(*args, env={"NBDSRV_LOG_FORMAT": "json"})
    assert res.returncode == rc, res
    assert res.stdout == b""
    records = json_lines(res.stderr.decode())
    errors = [r for r in records if r["level"] == "error"]
    assert len(errors) == 1 and errors[0] is records[-1], records
    assert needle in str(errors[0]["msg"]), errors


def test_logfmt_start_up_errors_stay_one_plain_line() -> None:
    res = nbdsrv_cmd("serve")
    assert res.returncode == 1 and res.stderr == b"nbdsrv: nothing to export: give --pool NAME=PATH, " \
                                                  b"--image PATH or --config\n"
    # a person's commands keep argparse's plain usage errors even in the container's environment
    res = nbdsrv_cmd("admin", "--human", env={"NBDSRV_LOG_FORMAT": "json"})
    assert res.returncode == 2 and res.stderr.startswith(b"usage: nbdsrv admin"), res


UNCAUGHT = """
import threading, warnings
from nbdsrv.log import setup_logging
setup_logging("info", "json")
warnings.warn("a deprecation nobody fixed")
t = threading.Thread(target=lambda: 1 / 0, name="worker-thread")
t.start()
t.join()
raise RuntimeError("a bug that must not happen")
"""


def test_warnings_and_uncaught_exceptions_are_json_records() -> None:
    p = subprocess.run([sys.executable, "-c", UNCAUGHT], capture_output=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == 1
    records = json_lines(p.stderr.decode())
    assert [r["level"] for r in records] == ["warning", "critical", "critical"], records
    assert "a deprecation nobody fixed" in str(records[0]["msg"])
    assert records[1]["thread_name"] == "worker-thread" and "ZeroDivisionError" in str(records[1]["exc"])
    assert "RuntimeError: a bug that must not happen" in str(records[2]["exc"])


def test_a_json_session_is_json_from_start_to_stop(tmp_path: Path) -> None:
    """A server told json through the environment: clients, a refused export, an admin job in a worker
    process, SIGTERM; every line it wrote, the worker's included, is one JSON object."""
    pool = make_pool(tmp_path / "pool")
    img = create_image(disk_path(pool, "disk-0", "qcow2"), "qcow2", "4M")
    admin = tmp_path / "admin.sock"
    srv = start_server(tmp_path / "run", "--admin-socket", str(admin), pool=pool,
                       env={"NBDSRV_LOG_FORMAT": "json", "NBDSRV_LOG_LEVEL": "info"})
    try:
        run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x11 0 64k", srv.uri(volid(img)))
        assert run(peer("qemu-img"), "info", srv.uri("local:100/vm-100-nope.qcow2"), check=False).returncode
        checked: list[object] = []

        async def body(c: AdminClient) -> None:
            checked.append(await c.execute("image-check", {"volid": volid(img)}))

        with_client(admin, body)
        assert checked
    finally:
        assert srv.stop() == 0
    records = json_lines(srv.log())
    msgs = [r["msg"] for r in records]
    assert msgs[0] == "listening" and msgs[-1] == "stopped" and "export opened" in msgs, msgs
    # --log-level debug from the fixture's flags wins over NBDSRV_LOG_LEVEL=info
    assert any(r["level"] == "debug" for r in records), msgs


def test_environment_gives_listen_address_and_flags_win(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    create_image(disk_path(pool, "disk-0", "raw"), "raw", "1M")
    port, other = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), NBDSRV_LISTEN=f"127.0.0.1:{port}, unix:{tmp_path}/s.sock",
               NBDSRV_LOG_FORMAT="json")
    cases: list[tuple[list[str], str]] = [([], f"127.0.0.1:{port}"),
                                          (["--listen", f"127.0.0.1:{other}"], f"127.0.0.1:{other}")]
    for flags, where in cases:
        pid_file = tmp_path / "pid"
        proc = subprocess.Popen([sys.executable, "-m", "nbdsrv", "serve", "--pool", f"local={pool}",
                                 "--pid-file", str(pid_file), *flags],
                                stderr=subprocess.PIPE, env=env, cwd=str(REPO))
        try:
            deadline = time.monotonic() + 20
            while not pid_file.exists():
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.05)
            assert nbdsrv_cmd("health", where).returncode == 0
            if not flags:
                assert nbdsrv_cmd("health", f"unix:{tmp_path}/s.sock").returncode == 0
                # with no argument, health probes the first address of NBDSRV_LISTEN, as serve listens
                assert nbdsrv_cmd("health", env={"NBDSRV_LISTEN": env["NBDSRV_LISTEN"]}).returncode == 0
            else:
                assert nbdsrv_cmd("health", f"127.0.0.1:{port}").returncode == 1
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0
        listening = [r for r in json_lines(err.decode()) if r["msg"] == "listening"]
        assert listening and listening[0]["address"] == where, listening


def test_sigterm_with_clients_attached_ends_within_a_second(tmp_path: Path) -> None:
    """As `docker stop` and systemd stop it: two clients attached, one has written and flushed, one is
    idle; SIGTERM ends the server, exit 0, in well under a second; the flushed data is on disk and the image
    checks clean."""
    pool = make_pool(tmp_path / "pool")
    img = create_image(disk_path(pool, "disk-0", "qcow2"), "qcow2", "16M")
    srv = start_server(tmp_path / "run", pool=pool)
    writer, idle = nbd.NBD(), nbd.NBD()
    writer.connect_uri(srv.uri(volid(img)))
    writer.pwrite(b"\x7a" * 65536, 3 << 20)
    writer.pwrite(b"\x7b" * 512, 15 << 20)
    writer.flush()
    idle.connect_uri(srv.uri(volid(img)))
    idle.pread(512, 0)
    started = time.monotonic()
    assert srv.stop() == 0
    took = time.monotonic() - started
    print(f"SIGTERM to exit with two clients attached: {took:.3f} s")
    assert took < 1.0, srv.log()
    with pytest.raises(nbd.Error):
        writer.pread(512, 0)
    run(peer("qemu-img"), "check", img)
    out = run(peer("qemu-io"), "-f", "qcow2", "-c", "read -P 0x7a 3M 64k", "-c", "read -P 0x7b 15M 512",
              img).stdout.decode()
    assert "Pattern verification failed" not in out and out.count("read ") == 2, out
