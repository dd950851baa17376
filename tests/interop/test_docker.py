"""The container image: docker/Dockerfile builds a small image that serves a mounted pool over NBD as a
non-root user, probes itself without touching an image, logs JSON lines, and stops on `docker stop` within
a second with clients attached and their flushed writes on disk; docker/compose.yaml publishes the NBD port,
the metrics port and the admin socket.

Building takes a minute or two: under CI=true (where scripts/test starts the engine with
scripts/docker-engine) it always runs and a missing engine fails; elsewhere it runs with
NBDSRV_DOCKER_TESTS=1.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.interop.test_nbd_safety import WRITER_BYTES, held_lock_bytes
from tests.peers import REPO, in_ci, peer, run

pytestmark = pytest.mark.skipif(os.environ.get("NBDSRV_DOCKER_TESTS") != "1" and not in_ci(),
                                reason="set NBDSRV_DOCKER_TESTS=1 to build and run the docker image")

TAG = "nbdsrv:test"
BASE = "debian:bookworm-slim"
UID = 10809  # the image's nbdsrv user
VOLID = "local:100/vm-100-disk-0.qcow2"
INNER = 10810  # not the default port: the healthcheck must follow NBDSRV_LISTEN


def docker() -> str:
    path = shutil.which("docker")
    if path is None or subprocess.run([path, "info"], capture_output=True).returncode != 0:
        pytest.fail("no docker engine answers (scripts/docker-engine starts one)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def json_lines(text: str) -> list[dict[str, object]]:
    """Every line of ``text`` is one JSON object (what a log collector reading the container needs)."""
    records = []
    for line in text.splitlines():
        record = json.loads(line)  # fails the test on any line that is not JSON
        assert isinstance(record, dict) and {"time", "level", "msg"} <= record.keys(), line
        records.append(record)
    return records


def logs(name: str) -> str:
    p = subprocess.run([docker(), "logs", name], capture_output=True, text=True)
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def image() -> str:
    run(docker(), "build", "-q", "-f", REPO / "docker" / "Dockerfile", "-t", TAG, REPO, timeout=1200)
    return TAG


def make_pool(root: Path) -> Path:
    disk = root / "images" / "100" / "vm-100-disk-0.qcow2"
    disk.parent.mkdir(parents=True)
    (root / "template" / "iso").mkdir(parents=True)
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", disk, "16M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0xab 1M 64k", disk)
    # The pool is owned by the container's user, as the README says to set it up.
    for p in [root, *root.rglob("*")]:
        os.chown(p, UID, UID)
    return disk


def wait_serving(port: int, name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            # docker's proxy accepts before the server does: wait for a real NBD greeting
            if run(peer("nbdinfo"), "--list", f"nbd://127.0.0.1:{port}", check=False).returncode == 0:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"container did not serve within {timeout} s:\n{logs(name)}")
        time.sleep(0.3)


@dataclass
class Container:
    name: str
    port: int
    disk: Path


@pytest.fixture
def container(image: str, tmp_path: Path) -> Iterator[Container]:
    disk = make_pool(tmp_path / "pool")
    port = free_port()
    name = f"nbdsrv-test-{uuid.uuid4().hex[:8]}"
    # The image's own command, told another port only through NBDSRV_LISTEN; docker runs the image's
    # HEALTHCHECK every second here so that the test sees its verdict.
    run(docker(), "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:{INNER}",
        "-v", f"{tmp_path / 'pool'}:/pool", "-e", f"NBDSRV_LISTEN=0.0.0.0:{INNER}",
        "--health-interval", "1s", "--health-start-period", "0s", image)
    try:
        wait_serving(port, name)
        yield Container(name, port, disk)
    finally:
        subprocess.run([docker(), "rm", "-f", name], capture_output=True)


def test_image_is_small_with_no_build_tools(image: str) -> None:
    size = int(run(docker(), "image", "inspect", "-f", "{{.Size}}", image).stdout)
    base = int(run(docker(), "image", "inspect", "-f", "{{.Size}}", BASE).stdout)
    # Debian's python3 (about 47 MB) and the venv (under 10 MB); the single-stage image added 267 MB.
    assert size - base < 80 << 20, (size, base)
    script = ("for p in gcc cc make strip ld pip pip3; do command -v $p && exit 1; done; "
              "ls /opt/nbdsrv/venv/bin | grep -q pip && exit 2; "
              "ls /opt/nbdsrv/venv/lib/python3*/site-packages | grep -i -E '^(pip|setuptools)' && exit 3; "
              "[ -e /root/.cache ] && exit 4; "
              "dpkg-query -W -f '${Package}\\n' | grep -E '^(binutils|gcc|.*-dev|python3-pip|python3-venv)$' "
              "&& exit 5; "
              "ls /var/lib/apt/lists | grep -v -E '^(lock|partial|auxfiles)$' && exit 6; exit 0")
    p = run(docker(), "run", "--rm", "--user", "0", "--entrypoint", "sh", image, "-c", script, check=False)
    assert p.returncode == 0, p
    cfg = json.loads(run(docker(), "image", "inspect", image).stdout)[0]["Config"]
    # exec form: the server is PID 1 and gets docker stop's SIGTERM itself
    assert cfg["Entrypoint"] == ["/opt/nbdsrv/venv/bin/nbdsrv"]
    assert cfg["User"] == f"{UID}:{UID}"
    assert {"9109/tcp", "10809/tcp"} <= set(cfg["ExposedPorts"])
    assert cfg["Env"] and "NBDSRV_LOG_FORMAT=json" in cfg["Env"]


def test_host_reads_and_writes_a_pool_volume_with_qemu_img(container: Container, tmp_path: Path) -> None:
    listing = run(peer("nbdinfo"), "--list", "--json", f"nbd://127.0.0.1:{container.port}").stdout
    names = [e["export-name"] for e in json.loads(listing)["exports"]]
    assert VOLID in names
    uri = f"nbd://127.0.0.1:{container.port}/{VOLID}"
    info = json.loads(run(peer("qemu-img"), "info", "--output=json", uri).stdout)
    assert info["virtual-size"] == 16 << 20
    # write: qemu-img convert into the existing export; read: qemu-img compare against what was written
    src = tmp_path / "src.raw"
    run(peer("qemu-img"), "create", "-q", "-f", "raw", src, "16M")
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0xcd 4M 1M", "-c", "write -P 0xab 1M 64k", src)
    run(peer("qemu-img"), "convert", "-n", "-f", "raw", "-O", "raw", src, uri)
    run(peer("qemu-img"), "compare", "-f", "raw", "-F", "raw", src, uri)
    # stopped with a client attached: it has written and flushed, and is still connected
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x5c 2M 64k", "-c", "write -P 0x5d 8M 4k", src)
    attached = subprocess.Popen(["/usr/bin/python3", "-c", STOP_CLIENT, uri], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert attached.stdout is not None
        assert attached.stdout.readline() == "flushed\n", attached.communicate()
        run(docker(), "stop", container.name)
        out, err = attached.communicate("\n", timeout=30)
        assert out.strip() == "disconnected", (out, err)
    finally:
        if attached.poll() is None:
            attached.kill()
            attached.wait()
    state = json.loads(run(docker(), "inspect", container.name).stdout)[0]["State"]
    assert state["ExitCode"] == 0, state
    run(peer("qemu-img"), "check", container.disk)
    run(peer("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", src, container.disk)


def test_runs_as_its_user_and_its_healthcheck_follows_the_port(container: Container) -> None:
    name = container.name
    assert run(docker(), "exec", name, "id", "-u").stdout.decode().strip() == str(UID)
    status = run(docker(), "exec", name, "cat", "/proc/1/status").stdout.decode()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == [str(UID)] * 4  # PID 1 is the server, and it is not root
    cmdline = run(docker(), "exec", name, "cat", "/proc/1/cmdline").stdout.split(b"\0")
    assert cmdline[1:3] == [b"/opt/nbdsrv/venv/bin/nbdsrv", b"serve"], cmdline
    cfg = json.loads(run(docker(), "inspect", name).stdout)[0]["Config"]
    test = cfg["Healthcheck"]["Test"]
    assert test == ["CMD", "nbdsrv", "health"]
    # docker's own verdict, from the image's HEALTHCHECK run on the port NBDSRV_LISTEN names
    deadline = time.monotonic() + 20
    while (state := json.loads(run(docker(), "inspect", name).stdout)[0]["State"]["Health"])["Status"] \
            != "healthy":
        assert state["Status"] != "unhealthy" and time.monotonic() < deadline, state
        time.sleep(0.5)
    # And it really probes that port: pointed at the default port, where nothing listens, it fails.
    assert run(docker(), "exec", "-e", "NBDSRV_LISTEN=0.0.0.0:10809", name, *test[1:],
               check=False).returncode == 1
    # It takes no lock: a VM (qemu-io on the host) holds the disk read-write while it runs.
    qemu_io = subprocess.Popen([peer("qemu-io"), "-f", "qcow2", str(container.disk)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert qemu_io.stdin is not None and qemu_io.stdout is not None
        qemu_io.stdin.write(b"write 0 512\n")
        qemu_io.stdin.flush()
        qemu_io.stdout.readline()
        assert held_lock_bytes(container.disk) == WRITER_BYTES
        for _ in range(3):
            assert run(docker(), "exec", name, *test[1:], check=False).returncode == 0
        assert held_lock_bytes(container.disk) == WRITER_BYTES
        qemu_io.stdin.write(b"write 512 512\n")
        qemu_io.stdin.flush()
        assert b"wrote" in qemu_io.stdout.readline() + qemu_io.stdout.readline()
    finally:
        qemu_io.kill()
        qemu_io.wait()


STOP_CLIENT = r"""
import nbd, sys
uri = sys.argv[1]
writer = nbd.NBD()
writer.connect_uri(uri)
writer.pwrite(b"\x5c" * 65536, 2 << 20)
writer.pwrite(b"\x5d" * 4096, 8 << 20)
writer.flush()
idle = nbd.NBD()
idle.connect_uri(uri)
idle.pread(512, 0)
print("flushed", flush=True)
sys.stdin.read()   # both stay connected until the test has stopped the container
try:
    writer.pread(512, 0)
    print("still served")
except nbd.Error as e:
    print("disconnected")
"""


def test_docker_stop_is_quick_and_loses_no_flushed_write(container: Container) -> None:
    uri = f"nbd://127.0.0.1:{container.port}/{VOLID}"
    nbd_python = "/usr/bin/python3"  # Debian's python3-libnbd
    client = subprocess.Popen([nbd_python, "-c", STOP_CLIENT, uri], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline() == "flushed\n", client.communicate()
        began = datetime.datetime.now(datetime.UTC)
        started = time.monotonic()
        run(docker(), "stop", "-t", "10", container.name)
        took = time.monotonic() - started
        out, err = client.communicate("\n", timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    state = json.loads(run(docker(), "inspect", container.name).stdout)[0]["State"]
    finished = datetime.datetime.fromisoformat(state["FinishedAt"][:26].rstrip("Z") + "+00:00")
    print(f"docker stop with two clients attached took {took:.3f} s; the engine saw the container end "
          f"{(finished - began).total_seconds():.3f} s after the stop began")
    # The container ends within a second of the stop (SIGTERM's delivery by the engine, the server's
    # drain, flush and close, and its exit). The command itself returns once the engine has also torn
    # down the container's network and port proxies: 0.3 to 0.5 s more at load 12 on 2 cores, the
    # engine's own work, which gets a looser bound here.
    assert (finished - began).total_seconds() < 1.0, f"{finished} - {began}\n{logs(container.name)}"
    assert took < 2.0, f"docker stop took {took:.3f} s\n{logs(container.name)}"
    assert out.strip() == "disconnected", (out, err)
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state
    records = json_lines(logs(container.name))
    msgs = [r["msg"] for r in records]
    assert "shutting down" in msgs and msgs[-1] == "stopped", msgs
    assert not [r for r in records if r["level"] in ("error", "critical")], records
    run(peer("qemu-img"), "check", container.disk)
    out = run(peer("qemu-io"), "-f", "qcow2", "-c", "read -P 0x5c 2M 64k", "-c", "read -P 0x5d 8M 4k",
              "-c", "read -P 0xab 1M 64k", container.disk).stdout.decode()
    assert "Pattern verification failed" not in out and out.count("read ") == 3, out


def test_runs_as_the_pools_owner_with_user(image: str, tmp_path: Path) -> None:
    """`--user UID:GID` of a pool owned by someone else, as the README says: it serves, with its admin
    socket (in the image's /run/nbdsrv, which is not that user's)."""
    disk = make_pool(tmp_path / "pool")
    for p in [tmp_path / "pool", *(tmp_path / "pool").rglob("*")]:
        os.chown(p, 4321, 4321)
    port = free_port()
    name = f"nbdsrv-test-{uuid.uuid4().hex[:8]}"
    run(docker(), "run", "-d", "--name", name, "--user", "4321:4321", "-p", f"127.0.0.1:{port}:10809",
        "-v", f"{tmp_path / 'pool'}:/pool", image)
    try:
        wait_serving(port, name)
        run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x21 0 64k", f"nbd://127.0.0.1:{port}/{VOLID}")
        admin = run(docker(), "exec", name, "nbdsrv", "admin", "query-pools").stdout
        assert [p["name"] for p in json.loads(admin)] == ["local"]
        assert run(docker(), "exec", name, "id", "-u").stdout.decode().strip() == "4321"
        run(docker(), "stop", name)
    finally:
        subprocess.run([docker(), "rm", "-f", name], capture_output=True)
    out = run(peer("qemu-io"), "-f", "qcow2", "-c", "read -P 0x21 0 64k", disk).stdout
    assert b"Pattern verification failed" not in out and b"read 65536/65536" in out, out


def test_start_up_errors_are_json_lines(image: str) -> None:
    for args in (["serve"], ["serve", "--pool", "local=/nonexistent/dir"], ["serve", "--bogus"],
                 ["serve", "--pool", "local=/pool", "--config", "/nonexistent.toml"]):
        p = run(docker(), "run", "--rm", image, *args, check=False)
        assert p.returncode in (1, 2), p
        assert p.stdout == b"", p
        records = json_lines(p.stderr.decode())
        assert records and records[-1]["level"] == "error", records


def test_compose_publishes_nbd_metrics_and_admin_socket(image: str, tmp_path: Path) -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        if in_ci():
            pytest.fail("docker-compose is missing (scripts/docker-engine installs it)")
        pytest.skip("docker-compose is not installed")
    disk = make_pool(tmp_path / "pool")
    rundir = tmp_path / "run"
    rundir.mkdir()
    os.chown(rundir, UID, UID)
    port, metrics = free_port(), free_port()
    project = f"nbdsrvtest{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, NBDSRV_IMAGE=image, NBDSRV_POOL=str(tmp_path / "pool"), NBDSRV_RUN=str(rundir),
               NBDSRV_PORT=str(port), NBDSRV_METRICS_PORT=str(metrics))
    base = [compose, "-p", project, "-f", str(REPO / "docker" / "compose.yaml")]

    def compose_run(*args: str) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([*base, *args], capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p
        return p

    compose_run("up", "-d", "--no-build")
    try:
        name = compose_run("ps", "-q").stdout.strip()
        wait_serving(port, name)
        uri = f"nbd://127.0.0.1:{port}/{VOLID}"
        run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x3e 3M 64k", uri)
        # the admin socket, in the host directory given as NBDSRV_RUN, from the host's own nbdsrv admin
        sock = rundir / "admin.sock"
        assert sock.is_socket()
        admin = subprocess.run([sys.executable, "-m", "nbdsrv", "admin", "--socket", str(sock),
                                "query-pools"], capture_output=True, text=True, timeout=60,
                               env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert admin.returncode == 0, admin
        assert [p["name"] for p in json.loads(admin.stdout)] == ["local"]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert "nbdsrv_" in text
        json_lines(logs(name))
        compose_run("stop")
    finally:
        subprocess.run([*base, "down", "-v"], capture_output=True, env=env, timeout=300)
    run(peer("qemu-img"), "check", disk)
    out = run(peer("qemu-io"), "-f", "qcow2", "-c", "read -P 0x3e 3M 64k", disk).stdout
    assert b"Pattern verification failed" not in out and b"read 65536/65536" in out, out
