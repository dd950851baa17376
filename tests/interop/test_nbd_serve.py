"""`nbdsrv serve` as a process: pools as a boundary, --image mode, pid file, sd_notify, signals, locking."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.interop.nbdsrv_fixture import (
    NbdServer,
    create_image,
    disk_path,
    free_port,
    make_pool,
    nbdsrv,
    pool,
    start_server,
    volid,
)
from tests.peers import REPO, in_ci, peer, run

__all__ = ["nbdsrv", "pool"]

try:
    import nbd
except ImportError:
    if in_ci():
        raise
    pytest.skip("python nbd (libnbd) is not installed", allow_module_level=True)
MiB = 1024 * 1024


def nbdsrv_cmd(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "nbdsrv", *args], capture_output=True, env=env, timeout=60,
                          cwd=str(REPO))


def go(srv: NbdServer, name: str) -> nbd.NBD:
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(srv.sock)
    return h


def test_backing_file_outside_pool_refused(nbdsrv: NbdServer, pool: Path, tmp_path: Path) -> None:
    outside = create_image(tmp_path / "outside.qcow2", "qcow2", "1M")
    img = disk_path(pool, "disk-0", "qcow2")
    create_image(img, "qcow2", "1M", "-b", str(outside), "-F", "qcow2")
    rel = disk_path(pool, "disk-1", "qcow2")
    create_image(rel, "qcow2", "1M", "-b", "../../../outside.qcow2", "-F", "qcow2", "-u")
    for bad in (img, rel):
        with pytest.raises(nbd.Error):
            go(nbdsrv, volid(bad))
    assert "outside the pool" in nbdsrv.log()
    # A backing file inside the pool (a linked clone of a template) is fine.
    base = create_image(disk_path(pool, "disk-2", "qcow2", base=True), "qcow2", "1M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x44 0 4k", base)
    clone = disk_path(pool, "disk-2", "qcow2", vmid=101)
    create_image(clone, "qcow2", "1M", "-b", f"../100/{base.name}", "-F", "qcow2")
    h = go(nbdsrv, volid(clone))
    assert h.pread(4096, 0) == b"\x44" * 4096
    h.shutdown()


def test_format_comes_from_extension_not_content(nbdsrv: NbdServer, pool: Path, tmp_path: Path) -> None:
    # A raw disk whose guest wrote a qcow2 header naming a host file must be served as the raw bytes.
    qc = create_image(tmp_path / "evil.qcow2", "qcow2", "1M", "-b", "/etc/passwd", "-F", "raw")
    raw = disk_path(pool, "disk-0", "raw")
    raw.write_bytes(qc.read_bytes().ljust(MiB, b"\0"))
    h = go(nbdsrv, volid(raw))
    assert h.get_size() == MiB
    assert h.pread(4, 0) == b"QFI\xfb"
    h.shutdown()


def test_templates_and_isos_read_only_everything_with_flag(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    disk = create_image(disk_path(pool, "disk-0", "raw"), "raw", "1M")
    srv = start_server(tmp_path / "run", "--read-only", pool=pool)
    try:
        h = go(srv, volid(disk))
        assert h.is_read_only()
        h.set_strict_mode(0)
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * 512, 0)
        h.shutdown()
    finally:
        assert srv.stop() == 0


def test_image_mode_default_and_named_export(tmp_path: Path) -> None:
    img = create_image(tmp_path / "single.qcow2", "qcow2", "2M")
    srv = start_server(tmp_path / "run", "--image", str(img), "--name", "disk", use_pool=False)
    try:
        names: list[str] = []
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_unix(srv.sock)
        h.opt_list(lambda n, d: names.append(n) or 0)
        h.opt_abort()
        assert sorted(names) == ["", "disk"]
        a, b = go(srv, ""), go(srv, "disk")
        a.pwrite(b"\x55" * 4096, 0)
        a.flush()
        assert b.pread(4096, 0) == b"\x55" * 4096
        assert a.get_size() == 2 * MiB
        a.shutdown()
        b.shutdown()
    finally:
        assert srv.stop() == 0
    run(peer("qemu-img"), "check", img)
    res = run(peer("qemu-io"), "-f", "qcow2", "-c", "read -P 0x55 0 4k", img)
    assert b"Pattern verification failed" not in res.stdout


def test_sigterm_flushes_written_data(nbdsrv: NbdServer, pool: Path) -> None:
    img = create_image(disk_path(pool, "disk-0", "qcow2"), "qcow2", "4M")
    h = go(nbdsrv, volid(img))
    h.pwrite(b"\x66" * 65536, 65536)
    # No flush from the client: the server must flush and close the image on SIGTERM.
    assert nbdsrv.stop() == 0
    assert not nbdsrv.pid_file.exists()
    assert not os.path.exists(nbdsrv.sock)
    res = run(peer("qemu-io"), "-f", "qcow2", "-c", "read -P 0x66 64k 64k", img)
    assert b"Pattern verification failed" not in res.stdout
    run(peer("qemu-img"), "check", img)
    del h


def test_sigint_also_stops(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    srv = start_server(tmp_path / "run", pool=pool)
    srv.proc.send_signal(signal.SIGINT)
    assert srv.proc.wait(20) == 0
    srv.stopped = True


def test_locking_against_qemu(nbdsrv: NbdServer, pool: Path) -> None:
    img = create_image(disk_path(pool, "disk-0", "raw"), "raw", "1M")
    h = go(nbdsrv, volid(img))
    # While we export it read-write, QEMU can neither write it nor open it read-write.
    res = run(peer("qemu-io"), "-f", "raw", "-c", "write 0 512", img, check=False)
    assert res.returncode != 0 and b"lock" in res.stderr
    res = run(peer("qemu-img"), "resize", "-f", "raw", img, "2M", check=False)
    assert res.returncode != 0 and b"lock" in res.stderr
    h.shutdown()
    # The last client left: libnbd's shutdown waits for the server to close the connection, and the
    # server closes the image (and drops its locks) before that.
    run(peer("qemu-io"), "-f", "raw", "-c", "write 0 512", img)


def test_refuse_image_held_by_qemu_nbd(nbdsrv: NbdServer, pool: Path) -> None:
    img = create_image(disk_path(pool, "disk-0", "raw"), "raw", "1M")
    port = free_port()
    q = subprocess.Popen([peer("qemu-nbd"), "-f", "raw", "-p", str(port), "-b", "127.0.0.1", str(img)],
                         stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline and q.poll() is None, "qemu-nbd did not start"
                time.sleep(0.1)
        with pytest.raises(nbd.Error):
            go(nbdsrv, volid(img))
        assert "lock" in nbdsrv.log()
    finally:
        q.terminate()
        q.wait(10)
    go(nbdsrv, volid(img)).shutdown()


def test_config_file_ipv6_and_sd_notify(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    img = create_image(disk_path(pool, "disk-0", "raw"), "raw", "1M")
    port = free_port()
    cfg = tmp_path / "nbdsrv.toml"
    cfg.write_text(f'[server]\nlisten = ["[::1]:{port}"]\nlog_format = "json"\n'
                   f'[pools.local]\npath = "{pool}"\n')
    notify_path = str(tmp_path / "notify.sock")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(notify_path)
    ns.settimeout(20)
    os.environ["NOTIFY_SOCKET"] = notify_path
    try:
        srv = start_server(tmp_path / "run", "--config", str(cfg), use_pool=False)
    finally:
        del os.environ["NOTIFY_SOCKET"]
    try:
        assert ns.recv(100) == b"READY=1"
        has_v6 = True
        try:
            socket.create_connection(("::1", port), 2).close()
        except OSError:
            has_v6 = False
        if has_v6:
            info = json.loads(run(peer("qemu-img"), "info", "--output=json",
                                  f"nbd://[::1]:{port}/{volid(img)}").stdout)
            assert info["virtual-size"] == MiB
        lines = [json.loads(line) for line in srv.log().splitlines() if line.startswith("{")]
        assert any(entry.get("msg") == "listening" for entry in lines)
    finally:
        assert srv.stop() == 0
        assert ns.recv(100) == b"STOPPING=1"
        ns.close()


@pytest.mark.parametrize("args,needle", [
    (["serve"], "nothing to export"),
    (["serve", "--pool", "local"], "NAME=PATH"),
    (["serve", "--pool", "local=/nonexistent/dir"], "not a directory"),
    (["serve", "--pool", "x=/tmp", "--listen", "1.2.3.4:99999"], "invalid port"),
    (["serve", "--image", "/nonexistent.raw"], "does not exist"),
    (["serve", "--image", "/etc/hostname"], "--format"),
    (["serve", "--pool", "x=/tmp", "--config", "/nonexistent.toml"], "cannot read config"),
    (["serve", "--pool", "x=/tmp", "--listen", "127.0.0.1:0", "--pid-file", "/nonexistent/dir/pid"],
     "cannot write pid file"),
    (["serve", "--pool", "x=/tmp", "--listen", "unix:/nonexistent/dir/sock"], "cannot listen"),
])
def test_bad_arguments_one_line_error(args: list[str], needle: str) -> None:
    res = nbdsrv_cmd(*args)
    err = res.stderr.decode()
    assert res.returncode == 1, err
    assert "Traceback" not in err
    # The error is one line, and the last; log records of what went well before it may precede it.
    last = err.strip().splitlines()[-1]
    assert last.startswith("nbdsrv: ") and needle in last, err
    assert sum(1 for line in err.splitlines() if line.startswith("nbdsrv: ")) == 1, err


def test_listen_address_in_use(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = nbdsrv_cmd("serve", "--pool", f"local={pool}", "--listen", f"127.0.0.1:{port}")
    assert res.returncode == 1
    assert b"cannot listen" in res.stderr and b"Traceback" not in res.stderr


def test_plain_asyncio_loop(tmp_path: Path) -> None:
    """The same server on the default asyncio loop instead of uvloop."""
    pool = make_pool(tmp_path / "pool")
    img = create_image(disk_path(pool, "disk-0", "qcow2"), "qcow2", "4M")
    srv = start_server(tmp_path / "run", pool=pool, env={"NBDSRV_LOOP": "asyncio"})
    try:
        uri = srv.uri(volid(img))
        run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x31 0 1M", "-c", "write -z 1M 64k",
            "-c", "discard 2M 64k", uri)
        res = run(peer("qemu-io"), "-f", "raw", "-c", "read -P 0x31 0 1M", "-c", "read -P 0 1M 64k", uri)
        assert b"Pattern verification failed" not in res.stdout
        back = tmp_path / "back.raw"
        run(peer("nbdcopy"), "--connections=4", srv.unix_uri(volid(img)), str(back))
        assert back.read_bytes()[:MiB] == b"\x31" * MiB
        bad = socket.socket(socket.AF_UNIX)
        bad.connect(srv.sock)
        bad.sendall(b"garbage" * 100)
        bad.close()
        h = go(srv, volid(img))
        assert h.pread(16, 0) == b"\x31" * 16
        h.shutdown()
    finally:
        assert srv.stop() == 0
    assert "asyncio" in srv.log().splitlines()[-1]
    assert "uvloop" not in srv.log().splitlines()[-1]
    run(peer("qemu-img"), "check", img)


def test_tiny_caps_still_make_progress(tmp_path: Path) -> None:
    """Caps far below what the clients push: backpressure everywhere, yet every copy completes."""
    pool = make_pool(tmp_path / "pool")
    img = create_image(disk_path(pool, "disk-0", "qcow2"), "qcow2", "8M")
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(6 * MiB) + bytes(2 * MiB))
    cfg = tmp_path / "caps.toml"
    cfg.write_text("[server]\nmax_requests = 2\nmax_bytes = 262144\nmax_total_bytes = 524288\n")
    srv = start_server(tmp_path / "run", "--config", str(cfg), pool=pool)
    try:
        uri = srv.unix_uri(volid(img))
        run(peer("nbdcopy"), "--connections=4", "--requests=16", str(src), uri, timeout=120)
        back = tmp_path / "back.raw"
        run(peer("nbdcopy"), "--connections=4", "--requests=16", uri, str(back), timeout=120)
        assert back.read_bytes() == src.read_bytes()
    finally:
        assert srv.stop() == 0
    run(peer("qemu-img"), "check", img)
