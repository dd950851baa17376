"""The Prometheus endpoint of `nbdsrv serve --metrics`, scraped with curl while fio (its nbd engine, libnbd)
and nbdsh drive the server: request and byte counters that move, latency histograms, the connections
gauge, errors by errno, the job gauge and the [metrics] table of the configuration file."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nbdsrv.admin.client import AdminClient
from tests.interop.nbdsrv_fixture import (
    NbdServer,
    create_image,
    disk_path,
    free_port,
    make_pool,
    start_server,
    volid,
)
from tests.peers import missing, peer, run

MiB = 1 << 20
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int, path: str = "/metrics") -> Samples:
    """curl the endpoint and parse what it serves with prometheus_client's own parser."""
    out = run(peer("curl"), "-sS", "--fail", "--max-time", "10", f"http://127.0.0.1:{port}{path}").stdout
    samples: Samples = {}
    for fam in text_string_to_metric_families(out.decode()):
        for s in fam.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def matching(samples: Samples, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    want = set(labels.items())
    return {lab: v for (n, lab), v in samples.items() if n == name and want <= set(lab)}


def fio_has_nbd() -> bool:
    p = subprocess.run([peer("fio"), "--enghelp"], capture_output=True, text=True)
    return "nbd" in p.stdout.split()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[NbdServer, int, Path, Path]]:
    pool = make_pool(tmp_path / "pool")
    img = create_image(disk_path(pool, "disk-0", "raw"), "raw", "64M")
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x61 0 64M", img)
    mport = free_port()
    admin = tmp_path / "admin.sock"
    srv = start_server(tmp_path / "srv", "--metrics", f"127.0.0.1:{mport}", "--admin-socket", str(admin),
                       pool=pool)
    try:
        yield srv, mport, img, admin
    finally:
        assert srv.stop() == 0, srv.log()


def test_request_counters_move_while_fio_reads(served: tuple[NbdServer, int, Path, Path]) -> None:
    srv, mport, img, _ = served
    if not fio_has_nbd():
        missing("fio's nbd engine")
    name = volid(img)
    before = scrape(mport)
    assert value(before, "nbdsrv_connections_open") == 0
    fio = subprocess.Popen([peer("fio"), "--name=randread", "--ioengine=nbd", f"--uri={srv.uri(name)}",
                            "--rw=randread", "--bs=4k", "--iodepth=8", "--size=64M", "--time_based",
                            "--runtime=4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            first = scrape(mport)
            if value(first, "nbdsrv_export_requests_total", export=name, command="read") > 0:
                break
            assert time.monotonic() < deadline and fio.poll() is None, fio.communicate()
            time.sleep(0.1)
        time.sleep(1)
        second = scrape(mport)
        assert fio.poll() is None, "fio ended before the second scrape"
    finally:
        _out, err = fio.communicate(timeout=60)
    assert fio.returncode == 0, err
    reads1 = value(first, "nbdsrv_export_requests_total", export=name, command="read")
    reads2 = value(second, "nbdsrv_export_requests_total", export=name, command="read")
    assert reads2 > reads1 > 0
    assert value(second, "nbdsrv_export_read_bytes_total", export=name) >= reads2 * 4096 - 8 * 4096
    # fio's connection is open while it runs, and is a client with counters of its own.
    assert value(second, "nbdsrv_connections_open") >= 1
    assert value(second, "nbdsrv_export_connections", export=name) >= 1
    per_client = matching(second, "nbdsrv_client_requests_total", export=name, command="read")
    assert per_client and max(per_client.values()) > 0
    assert all(dict(lab)["peer"].startswith("127.0.0.1:") for lab in per_client)

    after = scrape(mport)
    reads = value(after, "nbdsrv_export_requests_total", export=name, command="read")
    assert reads >= reads2
    # The latency histogram: cumulative buckets ending in +Inf, which counts every read.
    buckets = matching(after, "nbdsrv_export_request_duration_seconds_bucket", export=name, command="read")
    by_le = sorted(((float(dict(lab)["le"]), v) for lab, v in buckets.items()))
    assert len(by_le) >= 10 and by_le[-1][0] == float("inf")
    counts = [v for _, v in by_le]
    assert counts == sorted(counts) and counts[-1] == reads
    assert value(after, "nbdsrv_export_request_duration_seconds_count", export=name, command="read") == reads
    assert value(after, "nbdsrv_export_request_duration_seconds_sum", export=name, command="read") > 0
    assert value(after, "nbdsrv_requests_total", command="read") == reads
    # Closed connections leave the gauges and stay in the counters.
    deadline = time.monotonic() + 10
    while value(after, "nbdsrv_connections_open") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
        after = scrape(mport)
    assert value(after, "nbdsrv_connections_open") == 0
    assert not matching(after, "nbdsrv_client_requests_total", export=name)
    assert value(after, "nbdsrv_connections_accepted_total") >= 1


def test_written_bytes_and_errors_by_errno(served: tuple[NbdServer, int, Path, Path]) -> None:
    srv, mport, img, admin = served
    if not fio_has_nbd():
        missing("fio's nbd engine")
    name = volid(img)
    run(peer("fio"), "--name=write", "--ioengine=nbd", f"--uri={srv.uri(name)}", "--rw=write", "--bs=64k",
        "--iodepth=4", "--size=8M")
    s = scrape(mport)
    assert value(s, "nbdsrv_export_written_bytes_total", export=name) == 8 * MiB
    assert value(s, "nbdsrv_export_requests_total", export=name, command="write") == 128
    assert value(s, "nbdsrv_written_bytes_total") == 8 * MiB
    assert matching(s, "nbdsrv_export_request_duration_seconds_count", export=name, command="write")

    import asyncio

    async def add_alias() -> Any:
        async with await AdminClient.connect(str(admin)) as c:
            return await c.execute("export-add", {"volume": name, "name": "ro", "read-only": True})

    asyncio.run(add_alias())
    script = ("h.set_strict_mode(0)\n"
              "try:\n    h.pwrite(b'x' * 512, 0)\nexcept nbd.Error as e:\n    print(e.errno)\n")
    p = subprocess.run([peer("nbdsh"), "-u", srv.uri("ro"), "-c", script], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert p.stdout.strip() == "EPERM", (p.stdout, p.stderr)
    s = scrape(mport)
    assert value(s, "nbdsrv_export_errors_total", export="ro", errno="EPERM") == 1
    assert value(s, "nbdsrv_errors_total", errno="EPERM") == 1
    # The admin socket's job manager reports its jobs by state; none has run.
    jobs = matching(s, "nbdsrv_admin_jobs")
    assert jobs and set(jobs.values()) == {0.0}


def test_metrics_from_the_config_file_and_other_paths(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    create_image(disk_path(pool, "disk-0", "raw"), "raw", "1M")
    mport = free_port()
    conf = tmp_path / "nbdsrv.toml"
    conf.write_text(f'[metrics]\nlisten = "127.0.0.1:{mport}"\n\n[pools.local]\npath = "{pool}"\n')
    srv = start_server(tmp_path / "srv", "--config", str(conf), use_pool=False)
    try:
        s = scrape(mport)
        assert value(s, "nbdsrv_connections_open") == 0 and value(s, "nbdsrv_uptime_seconds") > 0
        assert not matching(s, "nbdsrv_admin_jobs")  # no admin socket, no job manager
        assert any(n == "process_resident_memory_bytes" for n, _ in s)
        code = run(peer("curl"), "-s", "-o", "/dev/null", "-w", "%{http_code}",
                   f"http://127.0.0.1:{mport}/nope").stdout
        assert code == b"404"
        code = run(peer("curl"), "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                   f"http://127.0.0.1:{mport}/metrics").stdout
        assert code == b"405"
        head = run(peer("curl"), "-sS", "-I", f"http://127.0.0.1:{mport}/metrics").stdout
        assert head.startswith(b"HTTP/1.1 200") and b"text/plain; version=" in head
    finally:
        assert srv.stop() == 0, srv.log()
    assert "Traceback" not in srv.log()


def test_a_taken_metrics_port_is_a_clear_error(tmp_path: Path) -> None:
    import socket
    import sys

    from tests.peers import REPO

    pool = make_pool(tmp_path / "pool")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "nbdsrv", "serve", "--listen", f"127.0.0.1:{free_port()}",
                            "--pool", f"local={pool}", "--metrics", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=30, cwd=str(REPO))
    assert p.returncode == 1
    assert f"nbdsrv: cannot listen for metrics on 127.0.0.1:{port}: " in p.stderr, p.stderr
    assert "address already in use" in p.stderr and "Traceback" not in p.stderr
