"""The container image: docker/Dockerfile builds, and the container serves a mounted pool over NBD.

Building takes minutes: under CI=true (where scripts/test starts the engine with scripts/docker-engine) it
always runs and a missing engine fails; elsewhere it runs with NBDSRV_DOCKER_TESTS=1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import REPO, in_ci, peer, run

pytestmark = pytest.mark.skipif(os.environ.get("NBDSRV_DOCKER_TESTS") != "1" and not in_ci(),
                                reason="set NBDSRV_DOCKER_TESTS=1 to build and run the docker image")

TAG = "nbdsrv:test"
UID = 10809  # the image's nbdsrv user
VOLID = "local:100/vm-100-disk-0.qcow2"


def docker() -> str:
    path = shutil.which("docker")
    if path is None or subprocess.run([path, "info"], capture_output=True).returncode != 0:
        pytest.fail("no docker engine answers (scripts/docker-engine starts one)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def image() -> str:
    run(docker(), "build", "-q", "-f", REPO / "docker" / "Dockerfile", "-t", TAG, REPO, timeout=1200)
    return TAG


@pytest.fixture
def container(image: str, tmp_path: Path) -> Iterator[tuple[int, str]]:
    pool = tmp_path / "pool"
    disk = pool / "images" / "100" / "vm-100-disk-0.qcow2"
    disk.parent.mkdir(parents=True)
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", disk, "16M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0xab 1M 64k", disk)
    # The pool is owned by the container's user, as the README says to set it up.
    for p in [pool, *pool.rglob("*")]:
        os.chown(p, UID, UID)
    port = free_port()
    inner = 10810  # not the default port: the healthcheck must follow NBDSRV_PORT
    name = f"nbdsrv-test-{uuid.uuid4().hex[:8]}"
    run(docker(), "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:{inner}", "-v", f"{pool}:/pool",
        "-e", f"NBDSRV_PORT={inner}", image, "serve", "--listen", f"0.0.0.0:{inner}", "--pool", "local=/pool")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                # docker's proxy accepts before the server does: wait for a real NBD greeting
                if run(peer("nbdinfo"), "--list", f"nbd://127.0.0.1:{port}", check=False).returncode == 0:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                logs = subprocess.run([docker(), "logs", name], capture_output=True, text=True)
                pytest.fail(f"container did not serve within 30 s:\n{logs.stdout}{logs.stderr}")
            time.sleep(0.5)
        yield port, name
    finally:
        subprocess.run([docker(), "rm", "-f", name], capture_output=True)


def test_container_lists_and_serves_the_pool(container: tuple[int, str]) -> None:
    port, _ = container
    listing = run(peer("nbdinfo"), "--list", "--json", f"nbd://127.0.0.1:{port}").stdout
    names = [e["export-name"] for e in json.loads(listing)["exports"]]
    assert VOLID in names
    uri = f"nbd://127.0.0.1:{port}/{VOLID}"
    info = json.loads(run(peer("qemu-img"), "info", "--output=json", uri).stdout)
    assert info["virtual-size"] == 16 << 20
    run(peer("qemu-io"), "-r", "-f", "raw", "-c", "read -P 0xab 1M 64k", "-c", "read -P 0 0 1M", uri)


def test_container_runs_as_its_user_and_checks_its_port(container: tuple[int, str]) -> None:
    _, name = container
    assert run(docker(), "exec", name, "id", "-u").stdout.decode().strip() == str(UID)
    cfg = json.loads(run(docker(), "inspect", name).stdout)[0]["Config"]
    assert cfg["User"] == f"{UID}:{UID}" or cfg["User"] == "nbdsrv:nbdsrv"
    # Run the image's own HEALTHCHECK command in the container: it must reach the server on NBDSRV_PORT.
    test = cfg["Healthcheck"]["Test"]
    assert test[0] == "CMD-SHELL"
    assert run(docker(), "exec", name, "sh", "-c", test[1], check=False).returncode == 0
    # And it really probes that port: pointed at the default port, where nothing listens, it fails.
    assert run(docker(), "exec", "-e", "NBDSRV_PORT=10809", name, "sh", "-c", test[1],
               check=False).returncode != 0
    # The server process is not root.
    status = run(docker(), "exec", name, "cat", "/proc/1/status").stdout.decode()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == [str(UID)] * 4
