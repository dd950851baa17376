"""`nbdsrv qemu-nbd` in qemu-nbd's place: QEMU attaching a disk as the iotests harness starts qemu-nbd,
qemu-img over nbd+unix://, libnbd's tools spawning it (socket activation, --stdio), and its options and
messages side by side with the real qemu-nbd 7.2 on the same inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import REPO, peer, run

MiB = 1024 * 1024
ENV = dict(os.environ, PYTHONPATH=str(REPO))
NBDSH_ENV = dict(ENV, PATH=f"/usr/bin:{os.environ.get('PATH', '')}")


def ours() -> list[str]:
    return [sys.executable, "-m", "nbdsrv", "qemu-nbd"]


def theirs() -> list[str]:
    return [peer("qemu-nbd")]


IMPLS = {"qemu": theirs, "nbdsrv": ours}


def qnbd(impl: str, *args: str | Path, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    cmd = IMPLS[impl]()
    # argv[0] "qemu-nbd" for both: qemu-nbd's messages name the program as it was invoked
    return subprocess.run(["qemu-nbd" if impl == "qemu" else cmd[0], *cmd[1:], *map(str, args)],
                          executable=cmd[0], capture_output=True, env=ENV, timeout=timeout)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float = 10) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


class Forked:
    """A server started with --fork --pid-file, as qemu's iotests start qemu-nbd; killed at the end."""

    def __init__(self, impl: str, tmp: Path, *args: str | Path, tag: str = "s") -> None:
        self.sock = tmp / f"{impl}-{tag}.sock"
        self.pid_file = tmp / f"{impl}-{tag}.pid"
        proc = qnbd(impl, "--fork", "--pid-file", self.pid_file, "-k", self.sock, *args)
        self.proc = proc
        assert proc.returncode == 0, proc.stderr.decode()
        # listening before --fork returns, the pid file there too
        assert self.sock.exists() and self.pid_file.exists()
        self.pid = int(self.pid_file.read_text())
        self.url = f"nbd+unix:///?socket={self.sock}"

    def url_for(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.sock}"

    def stop(self) -> None:
        if alive(self.pid):
            os.kill(self.pid, signal.SIGTERM)
            assert wait_gone(self.pid)


@pytest.fixture
def servers() -> Iterator[list[Forked]]:
    started: list[Forked] = []
    yield started
    for s in started:
        s.stop()


def qcow2_with_data(path: Path, size: str = "4M") -> Path:
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", path, size)
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x5a 0 64k", "-c", "write -P 0x33 256k 128k",
        "-c", "write -z 512k 64k", path)
    return path


class QMP:
    """A QEMU with no guest (-machine none) and QMP on a unix socket. HMP's qemu-io prints on QEMU's
    stdout, which is read once QEMU has quit."""

    def __init__(self, tmp: Path, *args: str) -> None:
        path = tmp / "qmp.sock"
        self.proc = subprocess.Popen(
            [peer("qemu-system-x86_64"), "-machine", "none", "-nodefaults", "-display", "none",
             "-qmp", f"unix:{path},server=on,wait=off", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not path.exists():
            assert self.proc.poll() is None, self.proc.stderr.read().decode() if self.proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        assert "QMP" in self._read()
        assert "return" in self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, object]:
        while True:
            line = self.file.readline()
            assert line, "qemu closed QMP"
            msg: dict[str, object] = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name: str, **arguments: object) -> dict[str, object]:
        self.file.write(json.dumps({"execute": name, "arguments": arguments}).encode() + b"\n")
        self.file.flush()
        return self._read()

    def hmp(self, line: str) -> None:
        out = self.cmd("human-monitor-command", **{"command-line": line})
        assert "return" in out, out

    def quit(self) -> str:
        """Quit QEMU; what it printed on stdout."""
        self.cmd("quit")
        out, _ = self.proc.communicate(timeout=30)
        self.file.close()
        self.sock.close()
        return out.decode()


# -- QEMU and qemu-img as clients ----------------------------------------------------------------------

def test_qemu_attaches_disk_through_forked_server(tmp_path: Path) -> None:
    img = qcow2_with_data(tmp_path / "disk.qcow2")
    srv = Forked("nbdsrv", tmp_path, "-f", "qcow2", img)  # no -t: it ends after QEMU leaves
    assert srv.proc.stderr == b"" and srv.proc.stdout == b""
    assert alive(srv.pid) and srv.pid != os.getpid()
    vm = QMP(tmp_path, "-blockdev", f"driver=nbd,node-name=disk0,server.type=unix,server.path={srv.sock}",
             "-S")
    try:
        vm.hmp("qemu-io disk0 \"read -P 0x5a 0 64k\"")
        vm.hmp("qemu-io disk0 \"write -P 0xc4 512k 256k\"")
        vm.hmp("qemu-io disk0 \"read -P 0xc4 512k 256k\"")
        info = vm.cmd("query-named-block-nodes")
        assert any(n.get("node-name") == "disk0" and n.get("image", {}).get("virtual-size") == 4 * MiB
                   for n in info["return"])  # type: ignore[union-attr,attr-defined]
    finally:
        printed = vm.quit()
    assert "read 65536/65536 bytes" in printed and "wrote 262144/262144 bytes" in printed
    assert "read 262144/262144 bytes" in printed and "Pattern verification failed" not in printed
    # not persistent: the last client gone, the server ends and removes its socket and pid file
    assert wait_gone(srv.pid)
    assert not srv.sock.exists() and not srv.pid_file.exists()
    run(peer("qemu-img"), "check", "-q", img)
    run(peer("qemu-io"), "-f", "qcow2", "-c", "read -P 0xc4 512k 256k", "-c", "read -P 0x5a 0 64k", img)


def test_qemu_img_reads_and_writes_over_nbd_unix(tmp_path: Path, servers: list[Forked]) -> None:
    img = qcow2_with_data(tmp_path / "disk.qcow2")
    srv = Forked("nbdsrv", tmp_path, "-t", "-f", "qcow2", img)
    servers.append(srv)
    info = json.loads(run(peer("qemu-img"), "info", "--output=json", srv.url).stdout)
    assert info["virtual-size"] == 4 * MiB
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x77 3M 64k", srv.url)
    run(peer("qemu-img"), "convert", "-O", "raw", srv.url, tmp_path / "via-nbd.raw")
    srv.stop()
    run(peer("qemu-img"), "convert", "-O", "raw", img, tmp_path / "direct.raw")
    assert (tmp_path / "via-nbd.raw").read_bytes() == (tmp_path / "direct.raw").read_bytes()
    run(peer("qemu-io"), "-f", "qcow2", "-c", "read -P 0x77 3M 64k", img)
    run(peer("qemu-img"), "check", "-q", img)


# -- libnbd's tools spawning the server ----------------------------------------------------------------

def test_nbdinfo_and_nbdcopy_spawn_it_by_socket_activation(tmp_path: Path) -> None:
    img = qcow2_with_data(tmp_path / "disk.qcow2")
    cmd = [*ours(), "-f", "qcow2", str(img)]
    out = subprocess.run([peer("nbdinfo"), "--json", "--", "[", *cmd, "]"], capture_output=True, env=ENV,
                         timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    assert json.loads(out.stdout)["exports"][0]["export-size"] == 4 * MiB
    dst = tmp_path / "out.raw"
    cp = subprocess.run([peer("nbdcopy"), "--", "[", *cmd, "]", str(dst)], capture_output=True, env=ENV,
                        timeout=60)
    assert cp.returncode == 0, cp.stderr.decode()
    run(peer("qemu-img"), "convert", "-O", "raw", img, tmp_path / "ref.raw")
    assert dst.read_bytes() == (tmp_path / "ref.raw").read_bytes()


def test_stdio_through_nbd_connect_command(tmp_path: Path) -> None:
    img = qcow2_with_data(tmp_path / "disk.qcow2")
    script = (
        "import sys\n"
        f"h.connect_command([{sys.executable!r}, '-m', 'nbdsrv', 'serve', '--stdio', '--image', "
        f"{str(img)!r}])\n"
        "assert h.get_size() == 4 * 1024 * 1024\n"
        "assert h.pread(4096, 0) == b'\\x5a' * 4096\n"
        "h.pwrite(b'\\xee' * 4096, 8192)\n"
        "h.flush()\n"
        "h.shutdown()\n"
        "print('ok')\n")
    out = subprocess.run([peer("nbdsh"), "-c", script], capture_output=True, env=NBDSH_ENV, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == b"ok\n"
    run(peer("qemu-io"), "-f", "qcow2", "-c", "read -P 0xee 8k 4k", img)
    run(peer("qemu-img"), "check", "-q", img)


def _notify_listener(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(20)
    return s


def test_serve_socket_activated_reports_ready(tmp_path: Path) -> None:
    img = qcow2_with_data(tmp_path / "disk.qcow2")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    notify = _notify_listener(tmp_path / "notify.sock")
    env = dict(ENV, NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
    proc = subprocess.Popen(
        [peer("systemd-socket-activate"), "-l", f"127.0.0.1:{port}", "--fdname=nbd", "-E", "PYTHONPATH",
         "-E", "NOTIFY_SOCKET", sys.executable, "-m", "nbdsrv", "serve", "--image", str(img), "--log-level",
         "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:  # systemd-socket-activate binds first, then starts us on the first connection
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert notify.recv(4096) == b"READY=1"
        out = run(peer("nbdinfo"), "--json", f"nbd://127.0.0.1:{port}")
        assert json.loads(out.stdout)["exports"][0]["export-size"] == 4 * MiB
        proc.send_signal(signal.SIGTERM)
        assert notify.recv(4096) == b"STOPPING=1"
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def test_serve_inherits_named_nbd_and_admin_sockets_and_reports_reload(tmp_path: Path) -> None:
    """Sockets named as nbdsrv.socket and nbdsrv-admin.socket name them: "nbd" a listener (here one TCP
    and one unix), "admin" the admin socket; SIGHUP is framed by RELOADING=1 and READY=1."""
    img = qcow2_with_data(tmp_path / "disk.qcow2")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nbd_sock, admin_sock = tmp_path / "nbd.sock", tmp_path / "admin.sock"
    notify = _notify_listener(tmp_path / "notify.sock")
    env = dict(ENV, NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
    proc = subprocess.Popen(
        [peer("systemd-socket-activate"), "-l", f"127.0.0.1:{port}", "-l", str(nbd_sock), "-l",
         str(admin_sock), "--fdname=nbd:nbd:admin", "-E", "PYTHONPATH", "-E", "NOTIFY_SOCKET",
         sys.executable, "-m", "nbdsrv", "serve", "--image", str(img), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not admin_sock.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # starts nbdsrv
        assert notify.recv(4096) == b"READY=1"
        for url in (f"nbd://127.0.0.1:{port}", f"nbd+unix:///?socket={nbd_sock}"):
            assert nbdinfo_json(url)["export-size"] == 4 * MiB
        out = subprocess.run([sys.executable, "-m", "nbdsrv", "admin", "--socket", str(admin_sock),
                              "query-exports"], capture_output=True, env=ENV, timeout=30)
        assert out.returncode == 0, out.stderr.decode()
        assert json.loads(out.stdout)
        proc.send_signal(signal.SIGHUP)
        reloading = notify.recv(4096).decode().splitlines()
        assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
        assert notify.recv(4096) == b"READY=1"
        proc.send_signal(signal.SIGTERM)
        assert notify.recv(4096) == b"STOPPING=1"
        assert proc.wait(timeout=20) == 0
        assert nbd_sock.exists()  # the socket's owner (systemd) removes it, not nbdsrv
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


# -- differential: the same options against the real qemu-nbd --------------------------------------------

BAD_ARGS = [
    ["--frob"], [], ["a", "b"], ["-k", "rel/sock", "IMG"], ["-e", "x", "IMG"], ["--cache=bogus", "IMG"],
    ["--aio=bogus", "IMG"], ["--discard=bogus", "IMG"], ["--detect-zeroes=bogus", "IMG"],
    ["--detect-zeroes=unmap", "IMG"], ["-L", "IMG"], ["--tls-authz=x", "IMG"], ["--tls-creds=x", "IMG"],
    ["--tls-hostname=h", "IMG"], ["--tls-creds=x", "--tls-hostname=h", "IMG"],
    ["--selinux-label=system_u:object_r:svirt_image_t:s0", "-k", "/tmp/nbdsrv-selinux-refused.sock", "IMG"],
    ["--object", "frob,id=x", "IMG"], ["NONEXISTENT"], ["-B", "nob", "IMG"], ["-l", "nosnap", "IMG"],
    ["-f", "frob", "IMG"], ["-x", "n" * 5000, "IMG"], ["-D", "d" * 5000, "IMG"], ["-p", "x", "IMG"],
    # start-up failures after --fork: the parent relays the child's message and exits 1
    ["--fork", "-l", "nosnap", "IMG"], ["--fork", "-k", "/nonexistent/dir/sock", "IMG"],
    ["--fork", "-b", "203.0.113.5", "IMG"],
    # -o/--offset: qemu_strtou64, then raw's own checks; options given twice; -L with per-device options
    ["-o", "abc", "IMG"], ["-o", "2M", "IMG"], ["-o", "-5", "-f", "raw", "IMG"],
    ["-o", "0x10000000000000000", "IMG"], ["-o", "99999999", "-f", "raw", "IMG"],
    ["-n", "--cache=none", "IMG"], ["--aio=threads", "--aio=threads", "IMG"],
    ["--discard=unmap", "--discard=ignore", "IMG"], ["--detect-zeroes=unmap", "--discard=unmap", "IMG"],
    ["-L", "-f", "raw"], ["-L", "-o", "512"], ["-L", "--discard=unmap"],
]


@pytest.mark.parametrize("args", BAD_ARGS, ids=lambda a: " ".join(a)[:40] or "no-args")
def test_refusals_as_qemu_nbd(tmp_path: Path, args: list[str]) -> None:
    img = qcow2_with_data(tmp_path / "disk.qcow2", "1M")
    argv = [str(img) if a == "IMG" else str(tmp_path / "missing.qcow2") if a == "NONEXISTENT" else a
            for a in args]
    a, b = qnbd("qemu", *argv, timeout=10), qnbd("nbdsrv", *argv, timeout=10)
    assert (b.returncode, b.stdout, b.stderr) == (a.returncode, a.stdout, a.stderr)
    assert a.returncode == 1


def test_kernel_device_options_say_so(tmp_path: Path) -> None:
    img = qcow2_with_data(tmp_path / "disk.qcow2", "1M")
    for args in (["-c", "/dev/nbd0", str(img)], ["-d", "/dev/nbd0"]):
        out = qnbd("nbdsrv", *args)
        assert out.returncode == 1 and out.stdout == b""
        assert b"kernel" in out.stderr and out.stderr.count(b"\n") == 1


def test_list_output_as_qemu_nbd(tmp_path: Path, servers: list[Forked]) -> None:
    raw = tmp_path / "disk.raw"
    run(peer("qemu-img"), "create", "-q", "-f", "raw", raw, "1M")
    qcow2 = qcow2_with_data(tmp_path / "disk.qcow2", "1M")
    for args in (["-f", "raw", "-x", "disk", "-D", "a disk", "-A", raw], ["-r", "-f", "qcow2", qcow2],
                 ["-e", "2", "-f", "qcow2", qcow2]):
        out = {}
        for impl in IMPLS:
            srv = Forked(impl, tmp_path, "-t", *args)
            servers.append(srv)
            # our lister prints what qemu-nbd -L prints, for either server
            a, b = qnbd("qemu", "-L", "-k", srv.sock), qnbd("nbdsrv", "-L", "-k", srv.sock)
            assert a.returncode == b.returncode == 0, (a.stderr, b.stderr)
            assert b.stdout == a.stdout
            out[impl] = a.stdout.decode()
            srv.stop()
        # and both servers describe the export alike: flags, block sizes, contexts
        assert out["nbdsrv"] == out["qemu"]
    assert " export: ''\n  size:  1048576\n  flags: 0xd" in out["qemu"]  # -e 2: multi-conn
    # nothing listens: the same one-line failure
    a = qnbd("qemu", "-L", "-k", tmp_path / "nothing.sock")
    b = qnbd("nbdsrv", "-L", "-k", tmp_path / "nothing.sock")
    assert (b.returncode, b.stdout, b.stderr) == (a.returncode, a.stdout, a.stderr) and a.returncode == 1


def nbdinfo_json(url: str) -> dict[str, object]:
    out = run(peer("nbdinfo"), "--json", url)
    info: dict[str, object] = json.loads(out.stdout)["exports"][0]
    return info


@pytest.mark.parametrize("impl", IMPLS)
def test_persistent_or_not(tmp_path: Path, impl: str, servers: list[Forked]) -> None:
    img = qcow2_with_data(tmp_path / "disk.qcow2", "1M")
    once = Forked(impl, tmp_path, "-f", "qcow2", img, tag="once")
    servers.append(once)
    run(peer("nbdinfo"), "--list", once.url)  # a client that only lists does not end it
    time.sleep(0.3)
    assert alive(once.pid)
    nbdinfo_json(once.url)
    assert wait_gone(once.pid)
    assert not once.sock.exists()
    keep = Forked(impl, tmp_path, "-t", "-f", "qcow2", img, tag="keep")
    servers.append(keep)
    nbdinfo_json(keep.url)
    nbdinfo_json(keep.url)
    time.sleep(0.3)
    assert alive(keep.pid)


@pytest.mark.parametrize("impl", IMPLS)
def test_shared_limit(tmp_path: Path, impl: str, servers: list[Forked]) -> None:
    """-e N: N clients at once; one more waits for its greeting until a client leaves, then is served."""
    img = qcow2_with_data(tmp_path / "disk.qcow2", "1M")
    for shared in ("1", "2"):
        srv = Forked(impl, tmp_path, "-t", "-e", shared, "-f", "qcow2", img, tag=f"e{shared}")
        servers.append(srv)
        holder = subprocess.Popen(
            [peer("nbdsh"), "-u", srv.url, "-c", "import sys; print('in', flush=True); sys.stdin.read()"],
            env=NBDSH_ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        second = None
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"in\n"
            second = subprocess.Popen([peer("nbdinfo"), "--size", srv.url], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
            if shared == "2":
                assert second.wait(timeout=10) == 0
            else:
                time.sleep(1.0)
                assert second.poll() is None  # waiting, not refused
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(timeout=10)
        assert second is not None
        out, _ = second.communicate(timeout=10)
        assert second.returncode == 0 and out == b"1048576\n"
        srv.stop()


@pytest.mark.parametrize("impl", IMPLS)
def test_read_only_name_description(tmp_path: Path, impl: str, servers: list[Forked]) -> None:
    img = qcow2_with_data(tmp_path / "disk.qcow2", "1M")
    before = img.read_bytes()
    srv = Forked(impl, tmp_path, "-t", "-r", "-x", "vol1", "-D", "the disk", "-f", "qcow2", img)
    servers.append(srv)
    info = nbdinfo_json(srv.url_for("vol1"))
    assert info["export-name"] == "vol1" and info["description"] == "the disk"
    assert info["is_read_only"] is True
    # -x NAME: no "" export beside it
    assert subprocess.run([peer("nbdinfo"), "--size", srv.url], capture_output=True).returncode != 0
    w = subprocess.run([peer("qemu-io"), "-f", "raw", "-c", "write 0 4k", srv.url_for("vol1")],
                       capture_output=True)
    assert w.returncode != 0 or b"failed" in w.stdout + w.stderr
    srv.stop()
    assert img.read_bytes() == before


def test_allocation_depth_as_qemu_nbd(tmp_path: Path, servers: list[Forked]) -> None:
    base = qcow2_with_data(tmp_path / "base.qcow2", "4M")
    top = tmp_path / "top.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 1 1M 64k", "-c", "write -z 3M 64k", top)
    maps = {}
    for impl in IMPLS:
        srv = Forked(impl, tmp_path, "-t", "-r", "-A", "-f", "qcow2", top, tag="A")
        servers.append(srv)
        maps[impl] = run(peer("nbdinfo"), "--map=qemu:allocation-depth", srv.url).stdout
        srv.stop()
        plain = Forked(impl, tmp_path, "-t", "-r", "-f", "qcow2", top, tag="noA")
        servers.append(plain)
        # without -A the context is not offered
        no = subprocess.run([peer("nbdinfo"), "--map=qemu:allocation-depth", plain.url], capture_output=True)
        assert no.returncode != 0
        plain.stop()
    assert maps["nbdsrv"] == maps["qemu"]
    assert b"backing depth 2" in maps["qemu"] and b"local" in maps["qemu"]


@pytest.mark.parametrize("impl", IMPLS)
def test_snapshot_overlay_writes_vanish(tmp_path: Path, impl: str, servers: list[Forked]) -> None:
    img = qcow2_with_data(tmp_path / "disk.qcow2", "1M")
    before = img.read_bytes()
    srv = Forked(impl, tmp_path, "-t", "-s", "-f", "qcow2", img)
    servers.append(srv)
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x99 0 64k", srv.url)
    run(peer("qemu-io"), "-f", "raw", "-c", "read -P 0x99 0 64k", srv.url)  # seen while it runs
    srv.stop()
    assert img.read_bytes() == before
    run(peer("qemu-io"), "-f", "qcow2", "-c", "read -P 0x5a 0 64k", img)


def test_systemd_units_verify(tmp_path: Path) -> None:
    """systemd-analyze verify finds nothing in the shipped units. It checks that ExecStart's program is
    executable, so the copies verified here name this checkout's `nbdsrv` (or /bin/true) instead."""
    analyze = peer("systemd-analyze")
    exe = shutil.which("nbdsrv", path=str(Path(sys.executable).parent)) or "/bin/true"
    names = ["nbdsrv.socket", "nbdsrv-admin.socket", "nbdsrv.service"]
    for name in names:
        text = (REPO / "packaging" / "systemd" / name).read_text()
        assert name != "nbdsrv.service" or "ExecStart=/usr/bin/nbdsrv serve" in text
        (tmp_path / name).write_text(text.replace("/usr/bin/nbdsrv", exe))
    out = subprocess.run([analyze, "verify", "--man=no", *(str(tmp_path / n) for n in names)],
                         capture_output=True, timeout=60)
    text = out.stderr.decode() + out.stdout.decode()
    cannot = ("System has not been booted with systemd", "Failed to connect to bus",
              "Failed to initialize manager", "Failed to setup working directory")
    if out.returncode != 0 and any(c in text for c in cannot):
        pytest.skip(f"systemd-analyze verify cannot run here: {text.strip().splitlines()[-1]}")
    assert out.returncode == 0 and text.strip() == "", text
    service = (REPO / "packaging" / "systemd" / "nbdsrv.service").read_text()
    for option in ("Type=notify", "NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=",
                   "PrivateTmp=yes", "User=nbdsrv"):
        assert option in service


@pytest.mark.parametrize("impl", IMPLS)
def test_tls_objects_as_qemu_nbd(tmp_path: Path, impl: str, servers: list[Forked]) -> None:
    """--object tls-creds-x509 / authz-list-file with --tls-creds / --tls-authz: TLS required, client
    certificates verified (QEMU's default verify-peer=on), the authz file's policy applied."""
    from tests.tlsutil import CA

    ca = CA.make()
    server_dir = ca.server_dir(tmp_path / "server")
    client_dir = ca.client_dir(tmp_path / "client")
    img = qcow2_with_data(tmp_path / "disk.qcow2", "1M")
    tls = f"tls-creds-x509,id=tls0,endpoint=server,dir={server_dir}"
    srv = Forked(impl, tmp_path, "-t", "--object", tls, "--tls-creds", "tls0", "-f", "qcow2", img, tag="tls")
    servers.append(srv)
    secure = f"nbds+unix:///?socket={srv.sock}&tls-certificates={client_dir}"
    assert run(peer("nbdinfo"), "--size", secure).stdout == b"1048576\n"
    plain = subprocess.run([peer("nbdinfo"), "--size", srv.url], capture_output=True, timeout=30)
    assert plain.returncode != 0
    srv.stop()
    # tlsutil's client certificate: Debian 12's qemu-nbd (GnuTLS 3.7's gnutls_x509_crt_get_dn) writes its DN
    # in the certificate's order, which nbdsrv takes as well as RFC 4514 order (nbdsrv/access.py dn_forms),
    # so the same identity works with both
    dn = "C=GB,O=Example,CN=client.example.com"
    cases = [(dn, True), ("CN=someone.else,O=Example,C=GB", False)]
    if impl == "nbdsrv":
        cases.append(("CN=client.example.com,O=Example,C=GB", True))
    for identity, ok in cases:
        authz = "authz-simple,id=auth0,identity=" + identity.replace(",", ",,")
        srv = Forked(impl, tmp_path, "-t", "--object", tls, "--object", authz, "--tls-creds", "tls0",
                     "--tls-authz", "auth0", "-f", "qcow2", img, tag=f"authz-{ok}")
        servers.append(srv)
        secure = f"nbds+unix:///?socket={srv.sock}&tls-certificates={client_dir}"
        out = subprocess.run([peer("nbdinfo"), "--size", secure], capture_output=True, timeout=30)
        assert (out.returncode == 0) == ok, out.stderr
        srv.stop()
    if impl == "nbdsrv":
        # authz-list-file, which Debian's qemu-nbd 7.2 refuses to create ("Parameter 'qom-type' does not
        # accept value 'authz-list-file'"), is nbdsrv's --tls-authz FILE
        for policy, ok in (("allow", True), ("deny", False)):
            rules = tmp_path / f"{policy}.json"
            rules.write_text(json.dumps({"policy": policy, "rules": []}))
            srv = Forked(impl, tmp_path, "-t", "--object", tls, "--object",
                         f"authz-list-file,id=auth0,filename={rules}", "--tls-creds", "tls0", "--tls-authz",
                         "auth0", "-f", "qcow2", img, tag=f"authz-{policy}")
            servers.append(srv)
            secure = f"nbds+unix:///?socket={srv.sock}&tls-certificates={client_dir}"
            out = subprocess.run([peer("nbdinfo"), "--size", secure], capture_output=True, timeout=30)
            assert (out.returncode == 0) == ok, out.stderr
            srv.stop()


def test_list_over_tls_as_qemu_nbd(tmp_path: Path, servers: list[Forked]) -> None:
    """-L --tls-creds: STARTTLS, then the listing over TLS, the same lines from both programs; a CA that
    did not sign the server's certificate is refused."""
    from tests.tlsutil import CA

    ca = CA.make()
    server_dir = ca.server_dir(tmp_path / "server")
    client_dir = ca.client_dir(tmp_path / "client")
    img = qcow2_with_data(tmp_path / "disk.qcow2", "1M")
    tls = f"tls-creds-x509,id=tls0,endpoint=server,dir={server_dir}"
    srv = Forked("qemu", tmp_path, "-t", "--object", tls, "--tls-creds", "tls0", "-x", "disk", "-f", "qcow2",
                 img, tag="ltls")
    servers.append(srv)
    creds = f"tls-creds-x509,id=c0,endpoint=client,dir={client_dir}"
    out = {impl: qnbd(impl, "-L", "--object", creds, "--tls-creds", "c0", "--tls-hostname", "localhost",
                      "-k", srv.sock) for impl in IMPLS}
    assert out["qemu"].returncode == 0, out["qemu"].stderr
    assert (out["nbdsrv"].returncode, out["nbdsrv"].stdout) == (0, out["qemu"].stdout), out["nbdsrv"].stderr
    assert b"export: 'disk'" in out["qemu"].stdout
    plain = qnbd("nbdsrv", "-L", "-k", srv.sock)
    assert plain.returncode == 1
    other = CA.make().client_dir(tmp_path / "other")
    bad = {impl: qnbd(impl, "-L", "--object", f"tls-creds-x509,id=c0,endpoint=client,dir={other}",
                      "--tls-creds", "c0", "--tls-hostname", "localhost", "-k", srv.sock) for impl in IMPLS}
    assert bad["qemu"].returncode == bad["nbdsrv"].returncode == 1
    assert bad["nbdsrv"].stderr == bad["qemu"].stderr == b"qemu-nbd: The certificate is not trusted\n"


@pytest.mark.parametrize("impl", IMPLS)
def test_image_opts_and_internal_snapshot(tmp_path: Path, impl: str, servers: list[Forked]) -> None:
    img = qcow2_with_data(tmp_path / "disk.qcow2", "1M")
    run(peer("qemu-img"), "snapshot", "-c", "snap1", img)
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x11 0 64k", img)
    srv = Forked(impl, tmp_path, "-t", "--image-opts", f"driver=qcow2,file.filename={img}", tag="opts")
    servers.append(srv)
    run(peer("qemu-io"), "-r", "-f", "raw", "-c", "read -P 0x11 0 64k", srv.url)
    srv.stop()
    for param in ("snap1", "snapshot.name=snap1"):
        srv = Forked(impl, tmp_path, "-t", "-l", param, "-f", "qcow2", img, tag="snap")
        servers.append(srv)
        run(peer("qemu-io"), "-r", "-f", "raw", "-c", "read -P 0x5a 0 64k", srv.url)
        assert nbdinfo_json(srv.url)["is_read_only"] is True
        srv.stop()


def test_bitmap_as_qemu_nbd(tmp_path: Path, servers: list[Forked]) -> None:
    img = tmp_path / "disk.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", img, "4M")
    run(peer("qemu-img"), "bitmap", "--add", img, "b0")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 7 1M 64k", "-c", "write -P 8 3M 4k", img)
    maps = {}
    for impl in IMPLS:
        srv = Forked(impl, tmp_path, "-t", "-r", "-B", "b0", "-f", "qcow2", img, tag="B")
        servers.append(srv)
        maps[impl] = run(peer("nbdinfo"), "--map=qemu:dirty-bitmap:b0", srv.url).stdout
        srv.stop()
    assert maps["nbdsrv"] == maps["qemu"]
    assert b"dirty" in maps["qemu"]


def test_bitmap_of_the_backing_file_as_qemu_nbd(tmp_path: Path, servers: list[Forked]) -> None:
    """-B finds a bitmap down the backing chain, as qemu-nbd does (a backup tool's bitmap in the base of a
    snapshot overlay): the base's bits, not the overlay's writes; a name no layer has is refused."""
    base = tmp_path / "base.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", base, "4M")
    run(peer("qemu-img"), "bitmap", "--add", base, "b0")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 7 1M 64k", base)
    top = tmp_path / "top.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "4M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 8 2M 64k", top)
    maps = {}
    for impl in IMPLS:
        srv = Forked(impl, tmp_path, "-t", "-r", "-B", "b0", "-f", "qcow2", top, tag="Bb")
        servers.append(srv)
        maps[impl] = run(peer("nbdinfo"), "--map=qemu:dirty-bitmap:b0", srv.url).stdout
        srv.stop()
    assert maps["nbdsrv"] == maps["qemu"]
    assert b"1048576       65536    1  dirty" in maps["qemu"]
    missing = {impl: qnbd(impl, "-r", "-B", "nope", "-f", "qcow2", "-k", tmp_path / f"{impl}-x.sock", top)
               for impl in IMPLS}
    assert missing["nbdsrv"].returncode == missing["qemu"].returncode == 1
    assert missing["nbdsrv"].stderr.replace(b"nbdsrv qemu-nbd", b"qemu-nbd") == missing["qemu"].stderr


@pytest.mark.parametrize("impl", ["qemu", "nbdsrv"])
def test_locks_against_another_holder(tmp_path: Path, impl: str, servers: list[Forked]) -> None:
    """An image a VM (qemu-io) holds read-write is refused, as qemu-nbd refuses it; one the server holds
    is refused to a writer, and read with -U."""
    from tests.interop.nbdsrv_fixture import qemu_io_holding

    img = qcow2_with_data(tmp_path / "disk.qcow2")
    with qemu_io_holding(img, "qcow2"):
        p = qnbd(impl, "-k", tmp_path / "held.sock", "-f", "qcow2", img)
        assert p.returncode == 1 and b'Failed to get "write" lock' in p.stderr, p.stderr
    srv = Forked(impl, tmp_path, "-t", "-f", "qcow2", img, tag="lock")
    servers.append(srv)
    w = subprocess.run([peer("qemu-io"), "-f", "qcow2", "-c", "write 0 4k", str(img)], capture_output=True,
                       timeout=30)
    assert w.returncode != 0 and b'Failed to get "write" lock' in w.stderr + w.stdout
    r = run(peer("qemu-img"), "compare", "-U", "-f", "qcow2", "-F", "raw", img, srv.url)
    assert r.returncode == 0
    srv.stop()
    assert run(peer("qemu-img"), "check", img).returncode == 0


def _two(tmp_path: Path, servers: list[Forked], *args: str | Path, tag: str = "s") -> dict[str, Forked]:
    """The same command line served by qemu-nbd and by nbdsrv qemu-nbd, both persistent, each on a copy
    of its image (a Path argument) of its own."""
    out = {}
    for impl in IMPLS:
        mine: list[str | Path] = []
        for a in args:
            if isinstance(a, Path):
                copy = a.with_name(f"{impl}-{a.name}")
                shutil.copy(a, copy)
                a = copy
            mine.append(a)
        srv = Forked(impl, tmp_path, "-t", *mine, tag=tag)
        servers.append(srv)
        out[impl] = srv
    return out


def test_offset_as_qemu_nbd(tmp_path: Path, servers: list[Forked]) -> None:
    """-o: the image from an offset on, as qemu's raw driver with an offset over the image (iotest 302
    serves a qcow2 inside a tar file so)."""
    raw = tmp_path / "disk.raw"
    run(peer("qemu-img"), "create", "-q", "-f", "raw", raw, "1M")
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x11 0 8k", "-c", "write -P 0x22 512k 64k", raw)
    qcow2 = qcow2_with_data(tmp_path / "disk.qcow2", "1M")
    cases: list[list[str | Path]] = [["-f", "raw", "-o", "4096", raw], ["-f", "qcow2", "-o", "65536", qcow2],
                                     ["-f", "raw", "--offset=0x80000", raw]]
    for n, args in enumerate(cases):
        pair = _two(tmp_path, servers, *args, tag=f"o{n}")
        a, b = (qnbd("qemu", "-L", "-k", pair[i].sock) for i in ("qemu", "nbdsrv"))
        assert b.stdout == a.stdout and a.returncode == 0
        run(peer("qemu-img"), "compare", "-f", "raw", "-F", "raw", pair["qemu"].url, pair["nbdsrv"].url)
        maps = [run(peer("qemu-img"), "map", "--output=json", "-f", "raw", pair[i].url).stdout
                for i in ("qemu", "nbdsrv")]
        assert maps[0] == maps[1]
        # writes land at the offset in the image
        run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x5a 4k 4k", pair["nbdsrv"].url)
        run(peer("qemu-io"), "-f", "raw", "-c", "read -P 0x5a 4k 4k", pair["nbdsrv"].url)
        for srv in pair.values():
            srv.stop()
    run(peer("qemu-io"), "-f", "raw", "-c", "read -P 0x5a 0x81000 4k", tmp_path / "nbdsrv-disk.raw")


MODES = [[], ["--discard=unmap"], ["--detect-zeroes=on"], ["--discard=unmap", "--detect-zeroes=unmap"],
         ["--discard=unmap", "--detect-zeroes=on"], ["--discard=ignore", "--detect-zeroes=on"]]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: " ".join(m) or "default")
def test_discard_and_detect_zeroes_as_qemu_nbd(tmp_path: Path, mode: list[str], servers: list[Forked]
                                               ) -> None:
    """A discard, writes of zeroes (with and without may-trim) and a plain write of zero bytes, through
    each server with the same options: the image files then map alike (allocated, zero, holes)."""
    maps: dict[str, list[bytes]] = {}
    for impl in IMPLS:
        maps[impl] = []
        for fmt in ("raw", "qcow2"):
            img = tmp_path / f"{impl}.{fmt}"
            run(peer("qemu-img"), "create", "-q", "-f", fmt, img, "4M")
            run(peer("qemu-io"), "-f", fmt, "-c", "write -P 1 0 1M", img)
            srv = Forked(impl, tmp_path, "-f", fmt, *mode, img, tag=fmt)
            servers.append(srv)
            run(peer("qemu-io"), "-f", "raw", "-c", "discard 0 64k", "-c", "write -z 64k 64k",
                "-c", "write -P 0 128k 64k", "-c", "write -z -u 192k 64k", srv.url)
            assert wait_gone(srv.pid)  # not persistent: it ends with its client, the image closed
            maps[impl].append(run(peer("qemu-img"), "map", "--output=json", "-f", fmt, img).stdout)
            run(peer("qemu-io"), "-f", fmt, "-c", "read -P 0 64k 192k", "-c", "read -P 1 256k 768k", img)
    assert maps["nbdsrv"] == maps["qemu"]


def test_null_co_as_qemu_nbd(tmp_path: Path, servers: list[Forked]) -> None:
    """null-co:// (iotest 162 serves it) and --image-opts driver=null-co: a size and nothing behind it."""
    for n, args in enumerate((["-f", "raw", "null-co://"], ["--image-opts", "driver=null-co,size=16M"],
                              ["--image-opts", "driver=raw,file.driver=null-co,file.size=8M"])):
        pair = _two(tmp_path, servers, *args, tag=f"n{n}")
        a, b = (qnbd("qemu", "-L", "-k", pair[i].sock) for i in ("qemu", "nbdsrv"))
        assert b.stdout == a.stdout and a.returncode == 0
        run(peer("qemu-io"), "-f", "raw", "-c", "write -P 7 0 64k", "-c", "read 0 64k", pair["nbdsrv"].url)
        for srv in pair.values():
            srv.stop()


def test_queued_clients_are_bounded(tmp_path: Path, servers: list[Forked]) -> None:
    """-e 1 without -t: qemu-nbd's listen backlog is 1, so one client waits for the slot; one more is
    not taken (closed before its greeting) rather than queued without end."""
    img = qcow2_with_data(tmp_path / "disk.qcow2", "1M")
    srv = Forked("nbdsrv", tmp_path, "-e", "1", "-f", "qcow2", img)
    servers.append(srv)
    holder = subprocess.Popen(
        [peer("nbdsh"), "-u", srv.url, "-c", "import sys; print('in', flush=True); sys.stdin.read()"],
        env=NBDSH_ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"in\n"
        waiting = socket.socket(socket.AF_UNIX)
        waiting.connect(str(srv.sock))
        time.sleep(0.3)
        third = socket.socket(socket.AF_UNIX)
        third.connect(str(srv.sock))
        third.settimeout(10)
        assert third.recv(16) == b""  # closed at once, no greeting
        waiting.settimeout(0.5)
        with pytest.raises(TimeoutError):
            waiting.recv(16)  # still waiting for its greeting
        third.close()
        waiting.close()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
