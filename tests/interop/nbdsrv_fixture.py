"""A real `nbdsrv serve` subprocess for tests: temp pool, free port and unix socket, SIGTERM stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

from nbdsrv.admin.client import AdminClient
from tests.peers import REPO, peer, run

VMID = 100


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_pool(root: Path) -> Path:
    """An empty Proxmox "dir" pool layout."""
    (root / "images" / str(VMID)).mkdir(parents=True, exist_ok=True)
    (root / "template" / "iso").mkdir(parents=True, exist_ok=True)
    return root


def disk_path(root: Path, name: str, fmt: str, *, vmid: int = VMID, base: bool = False) -> Path:
    d = root / "images" / str(vmid)
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{'base' if base else 'vm'}-{vmid}-{name}.{fmt}"


def volid(path: Path, pool: str = "local") -> str:
    if path.parent.name == "iso":
        return f"{pool}:iso/{path.name}"
    return f"{pool}:{path.parent.name}/{path.name}"


def create_image(path: Path, fmt: str, size: str = "4M", *extra: str) -> Path:
    run(peer("qemu-img"), "create", "-q", "-f", fmt, *extra, path, size)
    return path


@contextmanager
def qemu_io_holding(target: str | Path, fmt: str, first: str = "read 0 512", *, cwd: Path | None = None
                    ) -> Iterator[subprocess.Popen[bytes]]:
    """qemu-io with ``target`` open, as a running VM holds its disk, until the block ends.

    The first command's answer shows that the image is open and its locks taken; the process is yielded
    so that a test can send it more commands. ``cwd``: where qemu-io runs (qemu resolves a relative
    data-file name from there).
    """
    proc = subprocess.Popen([peer("qemu-io"), "-f", fmt, str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(first.encode() + b"\n")
        proc.stdin.flush()
        proc.stdout.readline()
        yield proc
    finally:
        proc.kill()
        proc.wait()


@dataclass
class NbdServer:
    """A running server; ``uri(name)`` and ``unix_uri(name)`` address its exports."""

    proc: subprocess.Popen[bytes]
    port: int
    sock: str
    pool: Path
    pid_file: Path
    log_path: Path
    stopped: bool = field(default=False)

    def uri(self, name: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{quote(name, safe=':/')}"

    def unix_uri(self, name: str) -> str:
        return f"nbd+unix:///{quote(name, safe=':/')}?socket={self.sock}"

    def qemu_json(self, name: str) -> str:
        """qemu's json: filename syntax, which carries any export name without URL quoting."""
        import json

        return "json:" + json.dumps({"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1",
                                                                  "port": str(self.port)}, "export": name})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; returns the exit status."""
        if not self.stopped:
            self.stopped = True
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"nbdsrv did not stop on SIGTERM\n{self.log()}") from None
        return int(self.proc.returncode)


def start_server(workdir: Path, *args: str, pool: Path | None = None, use_pool: bool = True,
                 timeout: float = 20, env: dict[str, str] | None = None) -> NbdServer:
    """Start `nbdsrv serve` with ``pool`` as pool "local" (unless ``use_pool`` is False) plus ``args``."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    sock = str(workdir / f"nbd-{port}.sock")
    pid_file = workdir / f"nbdsrv-{port}.pid"
    log_path = workdir / f"nbdsrv-{port}.log"
    cmd = [sys.executable, "-m", "nbdsrv", "serve", "--listen", f"127.0.0.1:{port}",
           "--listen", f"unix:{sock}", "--pid-file", str(pid_file), "--log-level", "debug"]
    if use_pool:
        assert pool is not None
        cmd += ["--pool", f"local={pool}"]
    cmd += list(args)
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, env=env, cwd=str(REPO))
    srv = NbdServer(proc, port, sock, pool or workdir, pid_file, log_path)
    deadline = time.monotonic() + timeout
    while not pid_file.exists():
        if proc.poll() is not None:
            raise AssertionError(f"nbdsrv exited with {proc.returncode} before listening\n{srv.log()}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"nbdsrv did not write its pid file in {timeout}s\n{srv.log()}")
        time.sleep(0.05)
    assert int(pid_file.read_text()) == proc.pid
    return srv


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    return make_pool(tmp_path / "pool")


@pytest.fixture
def nbdsrv(tmp_path: Path, pool: Path) -> Iterator[NbdServer]:
    srv = start_server(tmp_path / "run", pool=pool)
    try:
        yield srv
    finally:
        rc = srv.stop()
        assert rc == 0, f"nbdsrv exited {rc}\n{srv.log()}"
        assert "Traceback" not in srv.log(), srv.log()


@contextmanager
def admin_server(tmp_path: Path, pool: Path, *args: str, env: dict[str, str] | None = None
                 ) -> Iterator[tuple[NbdServer, Path]]:
    """`nbdsrv serve` over ``pool`` with its admin socket at ``tmp_path/admin.sock``: (server, socket).
    Leaving the block stops it, and a server that does not exit 0 without a traceback fails the test
    (unless the block is already failing: its own error is the one to see)."""
    admin = tmp_path / "admin.sock"
    srv = start_server(tmp_path / "srv", "--admin-socket", str(admin), *args, pool=pool, env=env)
    try:
        yield srv, admin
    except BaseException:
        srv.stop()
        raise
    rc = srv.stop()
    assert rc == 0, f"nbdsrv exited {rc}\n{srv.log()}"
    assert "Traceback" not in srv.log(), srv.log()


def with_client(admin: Path, body: Callable[[AdminClient], Awaitable[None]]) -> None:
    """Run ``body`` with a client of the admin socket at ``admin``, in an event loop of its own."""
    async def main() -> None:
        async with await AdminClient.connect(str(admin)) as c:
            await body(c)
    asyncio.run(main())
