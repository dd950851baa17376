"""The single-node Ceph cluster of the shared-pool and RBD tests (scripts/ceph-cluster), as a fixture.

The cluster (one mon, mgr, memstore OSD and MDS on 127.0.0.1, the pool ``rbd``, the filesystem ``cephfs``
and two ceph-fuse mounts of it, each a Ceph client of its own) is started once per test session, or a
running one is used (scripts/test starts it under CI). With pytest-xdist each worker takes a shared lock
on it while it runs; the worker that started it stops it at the end, once no other worker holds it.

Ceph missing (or not root, which its daemons need) skips these tests, and fails them under CI=true.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.peers import REPO, VAR, missing, peer

BASE = Path(os.environ.get("NBDSRV_CEPH_DIR", VAR / "ceph"))
SCRIPT = REPO / "scripts" / "ceph-cluster"
TOOLS = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph-mds", "ceph-fuse", "ceph", "rados", "rbd")


@dataclass(frozen=True)
class Cluster:
    conf: Path
    mounts: tuple[Path, Path]  # one CephFS through two separate clients: "host A" and "host B"

    def rbd(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The `rbd` command on this cluster (always under a timeout: some Ceph commands wait forever)."""
        proc = subprocess.run([peer("rbd"), "-c", str(self.conf), *args], capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"rbd {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def shared_dir(self, name: str) -> tuple[Path, Path]:
        """A fresh directory on the CephFS, as each mount sees it (the same directory, two clients)."""
        sub = f"{name}-{uuid.uuid4().hex[:8]}"
        a = self.mounts[0] / sub
        a.mkdir()
        return a, self.mounts[1] / sub


def _have_ceph() -> None:
    for tool in TOOLS:
        peer(tool)
    if os.geteuid() != 0:
        missing("root (the Ceph test cluster's daemons and ceph-fuse need it)")
    probe = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", "import rados, rbd"],
                           capture_output=True)
    if probe.returncode != 0:
        missing("python3-rados and python3-rbd in the venv (Debian's; run scripts/setup)")


def _status() -> Cluster | None:
    proc = subprocess.run([str(SCRIPT), "status"], capture_output=True, text=True,
                          env={**os.environ, "NBDSRV_CEPH_DIR": str(BASE)})
    if proc.returncode != 0:
        return None
    vals = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    a, b = vals["MOUNTS"].split()
    return Cluster(Path(vals["CEPH_CONF"]), (Path(a), Path(b)))


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[Cluster]:
    _have_ceph()
    BASE.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NBDSRV_CEPH_DIR": str(BASE)}
    started = False
    with open(BASE / ".start.lock", "w") as start, open(BASE / ".users.lock", "w") as users:
        fcntl.flock(start, fcntl.LOCK_EX)
        try:
            cluster = _status()
            if cluster is None:
                proc = subprocess.run([str(SCRIPT), "up"], capture_output=True, text=True, env=env,
                                      timeout=180)
                assert proc.returncode == 0, f"scripts/ceph-cluster up failed:\n{proc.stderr}"
                started = True
                cluster = _status()
                assert cluster is not None, "the Ceph test cluster started but is not running"
            fcntl.flock(users, fcntl.LOCK_SH)
        finally:
            fcntl.flock(start, fcntl.LOCK_UN)
        try:
            yield cluster
        finally:
            fcntl.flock(users, fcntl.LOCK_UN)
            if started:
                # stop it once every other worker using it is done (they hold the users lock shared)
                fcntl.flock(start, fcntl.LOCK_EX)
                fcntl.flock(users, fcntl.LOCK_EX)
                subprocess.run([str(SCRIPT), "down"], capture_output=True, env=env, timeout=120)
                fcntl.flock(users, fcntl.LOCK_UN)
                fcntl.flock(start, fcntl.LOCK_UN)
