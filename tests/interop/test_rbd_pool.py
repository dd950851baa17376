"""RBD pools: images of a Ceph RADOS pool served over NBD through librbd, named as Proxmox VE names them.

qemu-img converts a qcow2 into an RBD volume over nbd:// and back, equal both ways; qemu-io's patterns,
discards and zero writes read back as written, through NBD and through `rbd export`; `nbdinfo --map`
agrees with `rbd diff`; a template and a linked clone made on the admin socket read correctly; two nodes
on one image: the second is refused while the first writes (RBD's exclusive lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from nbdsrv.admin.client import AdminClient
from tests.ceph import Cluster, ceph_cluster  # noqa: F401
from tests.interop.nbdsrv_fixture import NbdServer, start_server
from tests.peers import peer, run

MiB = 1 << 20


class Node:
    def __init__(self, srv: NbdServer, admin: Path) -> None:
        self.srv = srv
        self.admin = admin

    def uri(self, volid: str) -> str:
        return self.srv.uri(volid)

    def call(self, command: str, **arguments: object) -> object:
        async def main() -> object:
            async with await AdminClient.connect(str(self.admin)) as c:
                return await c.execute(command, arguments)
        return asyncio.run(main())


@pytest.fixture
def namespace(ceph_cluster: Cluster) -> Iterator[str]:  # noqa: F811
    """An RBD namespace of pool "rbd" of this test's own; its images are removed at the end."""
    ns = f"t{uuid.uuid4().hex[:10]}"
    ceph_cluster.rbd("namespace", "create", "--pool", "rbd", "--namespace", ns)
    yield ns
    listing = ceph_cluster.rbd("ls", "--pool", "rbd", "--namespace", ns, "--format", "json", check=False)
    images = json.loads(listing.stdout or "[]")
    # clones first, then their parents
    for image in sorted(images, key=lambda n: n.startswith("base-")):
        spec = f"rbd/{ns}/{image}"
        for snap in json.loads(ceph_cluster.rbd("snap", "ls", "--format", "json", spec, check=False).stdout
                               or "[]"):
            ceph_cluster.rbd("snap", "unprotect", f"{spec}@{snap['name']}", check=False)
        ceph_cluster.rbd("snap", "purge", spec, check=False)
        ceph_cluster.rbd("rm", "--no-progress", spec, check=False)
    ceph_cluster.rbd("namespace", "remove", "--pool", "rbd", "--namespace", ns, check=False)


def start_node(cluster: Cluster, ns: str, tmp_path: Path, name: str) -> Node:
    admin = tmp_path / f"{name}.sock"
    srv = start_server(tmp_path / name, "--pool", f"ceph=rbd:rbd/{ns},conf={cluster.conf}", "--node", name,
                       "--admin-socket", str(admin), use_pool=False)
    return Node(srv, admin)


@pytest.fixture
def node(ceph_cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[Node]:  # noqa: F811
    n = start_node(ceph_cluster, namespace, tmp_path, "a")
    try:
        yield n
    finally:
        assert n.srv.stop() == 0, n.srv.log()
        assert "Traceback" not in n.srv.log(), n.srv.log()


def alloc(node: Node, vmid: int = 100, size: str = "16M") -> str:
    out = node.call("volume-alloc", pool="ceph", vmid=vmid, size=size)
    assert isinstance(out, dict)
    return str(out["volid"])


def qemu_io(uri: str, *cmds: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    args: list[str] = [peer("qemu-io"), "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    return run(*args, uri, check=check, timeout=60)


def data_runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent runs merged."""
    out: list[tuple[int, int]] = []
    for off, n in sorted(pairs):
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((off, n))
    return out


def test_convert_qcow2_into_rbd_and_back(node: Node, ceph_cluster: Cluster, namespace: str,  # noqa: F811
                                         tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", src, "16M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x61 0 1M", "-c", "write -P 0x62 5M 64k",
        "-c", "write -P 0x63 12M 3M", src)
    vol = alloc(node)
    assert vol == "ceph:vm-100-disk-0"
    run(peer("qemu-img"), "convert", "-n", "-f", "qcow2", "-O", "raw", src, node.uri(vol))
    run(peer("qemu-img"), "compare", "-f", "qcow2", "-F", "raw", src, node.uri(vol))
    back = tmp_path / "back.qcow2"
    run(peer("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", node.uri(vol), back)
    run(peer("qemu-img"), "compare", "-f", "qcow2", "-F", "qcow2", src, back)
    # the image holds what was converted, as librbd's own tool sees it
    exported = tmp_path / "exported.raw"
    ceph_cluster.rbd("export", "--no-progress", f"rbd/{namespace}/vm-100-disk-0", str(exported))
    run(peer("qemu-img"), "compare", "-f", "qcow2", "-F", "raw", src, exported)
    # block status: nbdinfo's data extents are rbd diff's
    mapped = json.loads(run(peer("nbdinfo"), "--map", "--json", node.uri(vol)).stdout)
    ours = data_runs([(e["offset"], e["length"]) for e in mapped if not e["type"] & 1])
    diff = json.loads(ceph_cluster.rbd("diff", "--format", "json", f"rbd/{namespace}/vm-100-disk-0").stdout)
    theirs = data_runs([(d["offset"], d["length"]) for d in diff if d["exists"] == "true"])
    assert ours == theirs and ours, (ours, theirs)
    assert any(off <= 12 * MiB < off + n for off, n in ours)


def test_patterns_trims_and_zeroes(node: Node, ceph_cluster: Cluster, namespace: str,  # noqa: F811
                                   tmp_path: Path) -> None:
    vol = alloc(node, size="8M")
    qemu_io(node.uri(vol), "write -P 0x11 0 4M", "write -P 0x22 4M 4M", "write -z 1M 1M",
            "discard 4M 4M", "write -P 0x33 6M 4k", "write -z -u 2M 64k", "flush")
    qemu_io(node.uri(vol), "read -P 0x11 0 1M", "read -P 0 1M 1M", "read -P 0 2M 64k",
            "read -P 0x11 2176k 1920k", "read -P 0 4M 2M", "read -P 0x33 6M 4k", "read -P 0 6148k 2044k")
    exported = tmp_path / "exported.raw"
    ceph_cluster.rbd("export", "--no-progress", f"rbd/{namespace}/vm-100-disk-0", str(exported))
    data = exported.read_bytes()
    assert data[:MiB] == b"\x11" * MiB and data[MiB:2 * MiB + 64 * 1024] == bytes(MiB + 64 * 1024)
    assert data[4 * MiB:6 * MiB] == bytes(2 * MiB) and data[6 * MiB:6 * MiB + 4096] == b"\x33" * 4096
    # the discard left the second object only what was written after it, which block status and
    # rbd diff both say
    mapped = json.loads(run(peer("nbdinfo"), "--map", "--json", node.uri(vol)).stdout)
    ours = data_runs([(e["offset"], e["length"]) for e in mapped if not e["type"] & 1])
    diff = json.loads(ceph_cluster.rbd("diff", "--format", "json", f"rbd/{namespace}/vm-100-disk-0").stdout)
    assert ours == data_runs([(d["offset"], d["length"]) for d in diff if d["exists"] == "true"])
    assert ours[-1][0] + ours[-1][1] <= 6 * MiB + 4096 < 8 * MiB, ours


def test_template_linked_and_full_clone(node: Node, tmp_path: Path) -> None:
    vol = alloc(node, size="8M")
    qemu_io(node.uri(vol), "write -P 0x44 0 2M", "write -P 0x45 7M 1M")
    made = node.call("template-create", pool="ceph", vmid=100)
    assert made == {"volumes": ["ceph:base-100-disk-0"]}
    base = "ceph:base-100-disk-0"
    listed = node.call("volume-list", pool="ceph")
    assert isinstance(listed, list) and [v["volid"] for v in listed] == [base], listed
    assert listed[0]["template"] is True and listed[0]["read-only"] is True
    # the template is read-only over NBD
    assert qemu_io(node.uri(base), "write 0 512", check=False).returncode != 0
    clone = node.call("clone-linked", volid=base, vmid=101)
    assert isinstance(clone, dict) and clone["volid"] == "ceph:base-100-disk-0/vm-101-disk-0", clone
    for name in (clone["volid"], "ceph:vm-101-disk-0"):
        qemu_io(node.uri(name), "read -P 0x44 0 2M", "read -P 0 2M 5M", "read -P 0x45 7M 1M")
    qemu_io(node.uri("ceph:vm-101-disk-0"), "write -P 0x46 0 1M")
    run(peer("qemu-io"), "-r", "-f", "raw", "-c", "read -P 0x44 0 2M", node.uri(base))
    # a base with linked clones is not freed
    with pytest.raises(Exception, match="linked clones"):
        node.call("volume-free", volid=base)
    job = node.call("clone-full", volid=base, vmid=102)
    assert isinstance(job, dict)
    node.call("job-wait", id=job["job-id"])
    qemu_io(node.uri("ceph:vm-102-disk-0"), "read -P 0x44 0 2M", "read -P 0x45 7M 1M")
    node.call("volume-free", volid="ceph:vm-101-disk-0")
    node.call("volume-free", volid=base)
    listed = node.call("volume-list", pool="ceph")
    assert isinstance(listed, list) and [v["volid"] for v in listed] == ["ceph:vm-102-disk-0"]


def test_snapshots_and_resize(node: Node) -> None:
    vol = alloc(node, size="4M")
    qemu_io(node.uri(vol), "write -P 0x55 0 1M")
    snaps = node.call("volume-snapshot-create", volid=vol, name="before")
    assert isinstance(snaps, list) and [s["name"] for s in snaps] == ["before"]
    qemu_io(node.uri(vol), "write -P 0x56 0 1M")
    node.call("volume-snapshot-rollback", volid=vol, name="before")
    qemu_io(node.uri(vol), "read -P 0x55 0 1M")
    assert node.call("volume-snapshot-delete", volid=vol, name="before") == []
    assert node.call("volume-resize", volid=vol, size="8M") == {"volid": vol, "old-size": 4 * MiB,
                                                                "size": 8 * MiB}
    assert run(peer("nbdinfo"), "--size", node.uri(vol)).stdout.strip() == b"8388608"
    status = node.call("query-pools")
    assert isinstance(status, list) and status[0]["type"] == "rbd" and status[0]["active"] is True


def test_second_node_refused_while_the_first_writes(node: Node, ceph_cluster: Cluster,  # noqa: F811
                                                    namespace: str, tmp_path: Path) -> None:
    vol = alloc(node, size="4M")
    other = start_node(ceph_cluster, namespace, tmp_path, "b")
    try:
        holder = subprocess.Popen([peer("qemu-io"), "-f", "raw", node.uri(vol)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert holder.stdin is not None and holder.stdout is not None
            holder.stdin.write(b"write -P 0x66 0 64k\n")
            holder.stdin.flush()
            assert b"wrote" in holder.stdout.readline()
            p = run(peer("qemu-img"), "info", other.uri(vol), check=False)
            err = p.stderr.decode()
            assert p.returncode == 1 and "locked by another client" in err, err
            assert qemu_io(other.uri(vol), "write 0 512", check=False).returncode != 0
            # QEMU's own rbd driver (a VM on a third host) cannot write it either: librbd asks the
            # lock's owner for it, and an owner that took it with lock_acquire says no
            spec = f"rbd:rbd/{namespace}/vm-100-disk-0:conf={ceph_cluster.conf}"
            p = run(peer("qemu-io"), "-f", "raw", "-c", "write 0 512", spec, check=False)
            assert b"write failed: Read-only file system" in p.stdout, p
            # the first node's client keeps writing undisturbed: the lock was not handed over
            holder.stdin.write(b"write -P 0x67 64k 64k\n")
            holder.stdin.flush()
            assert b"wrote" in holder.stdout.readline() + holder.stdout.readline()
        finally:
            holder.stdin.close() if holder.stdin else None
            holder.wait(30)
        # once its client has gone, node a has closed the image and released the lock
        qemu_io(other.uri(vol), "read -P 0x66 0 64k", "read -P 0x67 64k 64k", "write -P 0x68 0 512")
    finally:
        assert other.srv.stop() == 0
        assert "Traceback" not in other.srv.log(), other.srv.log()


@contextlib.asynccontextmanager
async def rbd_driver(cluster: Cluster, namespace: str) -> AsyncIterator[Any]:
    """The driver on this test's vm-100-disk-0, open read-write, in-process."""
    from imagecore import rbd as rbd_drv

    conn = await rbd_drv.Cluster.connect(conf=str(cluster.conf), client=None, pool="rbd", namespace=namespace)
    try:
        drv = await rbd_drv.RbdDriver.open(conn, "vm-100-disk-0", read_only=False)
        try:
            yield drv
        finally:
            await drv.close()
    finally:
        await conn.close()


def test_completions_reuse_librbd_threads_python_state(ceph_cluster: Cluster, namespace: str) -> None:  # noqa: F811
    """librbd's completion threads keep one Python thread state each instead of one per completion.

    The count of states kept is bounded by librbd's threads, not by the number of requests; a state made
    per call would show here as one kept state per completion. The data read back proves the requests
    themselves went through."""
    from imagecore import rbd as rbd_drv

    ceph_cluster.rbd("create", "--size", "4M", f"rbd/{namespace}/vm-100-disk-0")

    async def main() -> None:
        async with rbd_driver(ceph_cluster, namespace) as drv:
            before = rbd_drv.threads_kept
            payload = bytearray(b"\x5a" * 4096)
            await asyncio.gather(*(drv.write(i * 4096, memoryview(payload)) for i in range(64)))
            bufs = [memoryview(bytearray(4096)) for _ in range(64)]
            await asyncio.gather(*(drv.readinto(i * 4096, b) for i, b in enumerate(bufs)))
            assert all(bytes(b) == bytes(payload) for b in bufs)
            kept = rbd_drv.threads_kept - before
            assert 0 <= kept <= 4, kept
            assert rbd_drv.threads_kept >= 1

    asyncio.run(main())


def test_large_reads_are_one_data_chunk_and_block_status_still_finds_holes(node: Node) -> None:
    """On RBD a large read skips the hole lookup (a diff_iterate round trip per read): one data chunk,
    the zeroes of the unwritten part included, while block status still reports the hole."""
    import nbd

    vol = alloc(node, size="8M")
    qemu_io(node.uri(vol), "write -P 0x61 0 64k")
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(node.uri(vol))
    try:
        assert h.get_structured_replies_negotiated()
        got: list[tuple[int, int, int]] = []
        image = bytearray(4 * MiB)

        def chunk(buf: bytes, offset: int, status: int, err: list[int]) -> int:
            got.append((offset, len(buf), status))
            image[offset:offset + len(buf)] = buf
            return 0

        h.pread_structured(4 * MiB, 0, chunk)
        assert got == [(0, 4 * MiB, nbd.READ_DATA)]
        assert image[:65536] == b"\x61" * 65536 and image[65536:] == bytes(4 * MiB - 65536)
        seen: list[int] = []

        def status(ctx: str, offset: int, entries: list[int], err: list[int]) -> int:
            seen.extend(entries)
            return 0

        h.block_status(8 * MiB, 0, status)
        assert seen[:2] == [65536, 0] and seen[3] & nbd.STATE_HOLE, seen
    finally:
        h.shutdown()


def test_qemu_img_map_one_run_at_a_time(node: Node, ceph_cluster: Cluster, namespace: str) -> None:  # noqa: F811
    """QEMU's client asks block status one run at a time (NBD_CMD_FLAG_REQ_ONE): its map of a volume
    written in scattered places is `rbd diff`'s, and each of its requests asks librbd about a window of
    the image, not about all of the image after it (which cost the square of the runs)."""
    vol = alloc(node, size="64M")
    qemu_io(node.uri(vol), *[f"write -P {i + 1} {i * 4 + 1}M 64k" for i in range(16)])
    mapped = json.loads(run(peer("qemu-img"), "map", "--output=json", "-f", "raw", node.uri(vol)).stdout)
    ours = data_runs([(e["start"], e["length"]) for e in mapped if e["data"]])
    diff = json.loads(ceph_cluster.rbd("diff", "--format", "json", f"rbd/{namespace}/vm-100-disk-0").stdout)
    assert ours == data_runs([(d["offset"], d["length"]) for d in diff if d["exists"] == "true"])
    assert len(ours) == 16, ours


def test_req_one_block_status_diffs_a_window(ceph_cluster: Cluster, namespace: str) -> None:  # noqa: F811
    from imagecore import rbd as rbd_drv
    from nbdproto.constants import META_BASE_ALLOCATION
    from nbdsrv import backend

    ceph_cluster.rbd("create", "--size", "1G", f"rbd/{namespace}/vm-100-disk-0")
    spans: list[int] = []
    real = rbd_drv.blocking

    async def recording(fn: Any, *args: Any, **kw: Any) -> Any:
        if len(args) == 4 and args[2] is None and callable(args[3]):  # diff_iterate(offset, length, ...)
            spans.append(int(args[1]))
        return await real(fn, *args, **kw)

    async def main() -> None:
        async with rbd_driver(ceph_cluster, namespace) as drv:
            payload = memoryview(bytearray(b"\x5a" * 65536))
            for i in range(8):
                await drv.write(i * 8 * MiB, payload)
            rbd_drv.blocking = recording  # type: ignore[assignment]
            try:
                got = await backend.block_status(drv, META_BASE_ALLOCATION, 0, drv.size, req_one=True)
                assert got == [(65536, 0)]
                assert sum(spans) <= 16 * MiB, spans
                spans.clear()
                whole = await backend.block_status(drv, META_BASE_ALLOCATION, 0, drv.size, req_one=False)
                assert sum(n for n, flags in whole if flags == 0) == 8 * 65536 and sum(spans) == drv.size
            finally:
                rbd_drv.blocking = real  # type: ignore[assignment]

    asyncio.run(main())
