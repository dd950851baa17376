"""Shared directory pools: two nbdsrv nodes, each on its own ceph-fuse mount of one CephFS (two Ceph
clients, so two hosts as far as the filesystem and its locks are concerned), serving one pool at once.

What a node writes and flushes, the other reads once the writer's client is gone; while one node's client
holds a volume read-write the other node refuses it with the reason (qemu's lock bytes, which CephFS keeps
between its clients), and so does qemu-io on the file as a third client; `kill -9` of the node that holds
a volume releases it (the test says how long that took); volume-alloc on both nodes at once never gives
one name twice nor overwrites a file; templates are served read-only by both nodes at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nbdsrv.admin.client import AdminClient
from tests.ceph import Cluster, ceph_cluster  # noqa: F401
from tests.interop.nbdsrv_fixture import NbdServer, make_pool, start_server
from tests.peers import peer, run

VMID = 100


@contextmanager
def two_nodes(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[NbdServer, NbdServer, Path, Path]]:
    """Node "a" on mount A and node "b" on mount B, both serving one shared pool "shared" with an admin
    socket each: (node a, node b, the pool as A sees it, the pool as B sees it)."""
    root_a, root_b = cluster.shared_dir("pool")
    make_pool(root_a)
    nodes: list[NbdServer] = []
    try:
        for name, root in (("a", root_a), ("b", root_b)):
            nodes.append(start_server(tmp_path / name, "--pool", f"shared={root},shared", "--node",
                                      f"node-{name}", "--admin-socket", str(tmp_path / f"{name}.sock"),
                                      use_pool=False))
        yield nodes[0], nodes[1], root_a, root_b
    finally:
        for srv in nodes:
            srv.stop()
            assert "Traceback" not in srv.log(), srv.log()
        run("rm", "-rf", root_a)


def disk(root: Path, n: int, fmt: str = "qcow2", size: str = "4M") -> tuple[Path, str]:
    """A new disk made by qemu-img through ``root``'s mount: (path, volid)."""
    path = root / "images" / str(VMID) / f"vm-{VMID}-disk-{n}.{fmt}"
    path.parent.mkdir(parents=True, exist_ok=True)
    run(peer("qemu-img"), "create", "-q", "-f", fmt, path, size)
    return path, f"shared:{VMID}/{path.name}"


def qemu_io(uri: str, *cmds: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    args: list[str] = [peer("qemu-io"), "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    return run(*args, uri, check=check, timeout=60)


@contextmanager
def holding(uri: str) -> Iterator[subprocess.Popen[bytes]]:
    """A qemu-io client with ``uri`` open read-write (its first write answered) until the block ends."""
    proc = subprocess.Popen([peer("qemu-io"), "-f", "raw", uri], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"write -P 0x11 0 64k\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert b"wrote" in line, line
        yield proc
    finally:
        proc.kill()
        proc.wait()


def admin(sock: Path, command: str, **arguments: object) -> object:
    async def main() -> object:
        async with await AdminClient.connect(str(sock)) as c:
            return await c.execute(command, arguments)
    return asyncio.run(main())


def test_flushed_writes_on_a_are_read_on_b(ceph_cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    with two_nodes(ceph_cluster, tmp_path) as (a, b, root_a, _):
        path, vol = disk(root_a, 0)
        # node b serves it first (its mount caches the image's pages, its server what INFO said): what it
        # learnt must not outlive the writes node a takes next
        qemu_io(b.uri(vol), "write -P 0x01 0 2M", "read -P 0x01 0 2M")
        assert run(peer("nbdinfo"), "--size", b.uri(vol)).stdout.strip() == b"4194304"
        qemu_io(a.uri(vol), "read -P 0x01 0 2M", "write -P 0x5a 0 1M", "write -P 0xa5 3M 512k", "flush")
        run(peer("qemu-img"), "resize", "-f", "qcow2", path, "8M")  # grown by a third host
        assert run(peer("nbdinfo"), "--size", b.uri(vol)).stdout.strip() == b"8388608"
        qemu_io(b.uri(vol), "read -P 0x5a 0 1M", "read -P 0x01 1M 1M", "read -P 0 2M 1M",
                "read -P 0xa5 3M 512k", "read -P 0 7M 1M")
        # the other way round too, with node b's listing showing what node a's admin socket made
        made = admin(tmp_path / "a.sock", "volume-alloc", pool="shared", vmid=VMID, size="2M", format="raw")
        assert isinstance(made, dict)
        listed = admin(tmp_path / "b.sock", "volume-list", pool="shared")
        assert isinstance(listed, list) and made["volid"] in [v["volid"] for v in listed]
        qemu_io(b.uri(made["volid"]), "write -P 0x77 0 2M", "flush")
        qemu_io(a.uri(made["volid"]), "read -P 0x77 0 2M")
        status = admin(tmp_path / "b.sock", "query-status")
        assert isinstance(status, dict) and status["node"] == "node-b"
        assert "node=node-a" in a.log()


def test_a_volume_one_node_writes_is_refused_by_the_other(ceph_cluster: Cluster,  # noqa: F811
                                                          tmp_path: Path) -> None:
    with two_nodes(ceph_cluster, tmp_path) as (a, b, root_a, root_b):
        path, vol = disk(root_a, 0)
        with holding(a.uri(vol)):
            p = run(peer("qemu-img"), "info", b.uri(vol), check=False)
            err = p.stderr.decode()
            assert p.returncode == 1 and "lock" in err and "not present" not in err, err
            p = qemu_io(b.uri(vol), "read 0 512", check=False)
            assert p.returncode != 0
            # qemu-io on the file through mount B, a third client on a second host, is refused too
            p = run(peer("qemu-io"), "-f", "qcow2", "-c", "read 0 512", root_b / path.relative_to(root_a),
                    check=False)
            assert p.returncode != 0 and b'Failed to get "write" lock' in p.stderr, p.stderr
        # and the other way round: qemu-io holds the file through mount B, node a refuses it
        held = root_b / path.relative_to(root_a)
        proc = subprocess.Popen([peer("qemu-io"), "-f", "qcow2", str(held)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(b"write -P 0x22 0 512\n")
            proc.stdin.flush()
            assert b"wrote" in proc.stdout.readline()
            p = run(peer("qemu-img"), "info", a.uri(vol), check=False)
            assert p.returncode == 1 and "lock" in p.stderr.decode(), p.stderr
        finally:
            proc.kill()
            proc.wait()
        qemu_io(a.uri(vol), "read -P 0x22 0 512", "read -P 0x11 512 63k")


def test_kill_9_of_the_holding_node_releases_the_volume(ceph_cluster: Cluster,  # noqa: F811
                                                        tmp_path: Path) -> None:
    with two_nodes(ceph_cluster, tmp_path) as (a, b, root_a, _):
        _, vol = disk(root_a, 0)
        qemu_io(a.uri(vol), "write -P 0x33 0 1M", "flush")
        with holding(a.uri(vol)):
            assert qemu_io(b.uri(vol), "read 0 512", check=False).returncode != 0
            os.kill(a.proc.pid, signal.SIGKILL)
            a.proc.wait()
            a.stopped = True
            killed = time.monotonic()
            while True:
                p = qemu_io(b.uri(vol), "read -P 0x33 64k 960k", check=False)
                if p.returncode == 0:
                    break
                assert time.monotonic() - killed < 30, p.stderr
                time.sleep(0.1)
            took = time.monotonic() - killed
        print(f"kill -9 of the holding node: node b served the volume {took:.2f} s later")
        # the holder's Ceph client (the mount) lives on: its process's locks go with its descriptors
        assert took < 10


def test_concurrent_volume_alloc_on_both_nodes(ceph_cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    rounds = 12
    with two_nodes(ceph_cluster, tmp_path) as (_, _b, root_a, root_b):
        async def node(sock: Path, fmts: tuple[str, ...]) -> list[dict[str, object]]:
            out = []
            async with await AdminClient.connect(str(sock)) as c:
                for i in range(rounds):
                    r = await c.execute("volume-alloc", {"pool": "shared", "vmid": VMID, "size": "1M",
                                                         "format": fmts[i % len(fmts)]})
                    out.append(r)
            return out

        async def both() -> list[list[dict[str, object]]]:
            return list(await asyncio.gather(node(tmp_path / "a.sock", ("qcow2", "raw")),
                                             node(tmp_path / "b.sock", ("raw", "qcow2"))))

        made_a, made_b = asyncio.run(both())
        names = [str(r["volid"]) for r in made_a + made_b]
        assert len(set(names)) == 2 * rounds, names
        stems = [n.rsplit(".", 1)[0] for n in names]
        assert len(set(stems)) == 2 * rounds, f"one disk-N in two formats: {sorted(stems)}"
        files = sorted(p.name for p in (root_a / "images" / str(VMID)).iterdir())
        assert files == sorted(n.split("/", 1)[1] for n in names)
        # every file is still the image its node made (nothing was created over another's)
        for r, root in [(r, root_b) for r in made_a] + [(r, root_a) for r in made_b]:
            path = root / "images" / str(VMID) / str(r["volid"]).split("/", 1)[1]
            info = json.loads(run(peer("qemu-img"), "info", "-U", "--output=json", path).stdout)
            assert info["format"] == r["format"] and info["virtual-size"] == 1 << 20, (r, info)


def test_templates_are_served_read_only_by_both_nodes(ceph_cluster: Cluster,  # noqa: F811
                                                      tmp_path: Path) -> None:
    with two_nodes(ceph_cluster, tmp_path) as (a, b, root_a, _):
        path, _ = disk(root_a, 0, "qcow2")
        run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x44 0 1M", path)
        base = path.with_name(f"base-{VMID}-disk-0.qcow2")
        path.rename(base)
        vol = f"shared:{VMID}/{base.name}"
        with holding_read(a.uri(vol)), holding_read(b.uri(vol)):
            for srv in (a, b):
                run(peer("qemu-io"), "-r", "-f", "raw", "-c", "read -P 0x44 0 1M", srv.uri(vol))
            p = qemu_io(b.uri(vol), "write 0 512", check=False)
            assert p.returncode != 0 and b"Permission denied" in p.stderr, p


@contextmanager
def holding_read(uri: str) -> Iterator[None]:
    proc = subprocess.Popen([peer("qemu-io"), "-r", "-f", "raw", uri], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"read 0 512\n")
        proc.stdin.flush()
        assert b"read" in proc.stdout.readline()
        yield
    finally:
        proc.kill()
        proc.wait()

