"""A convert job must not stall NBD I/O: fio reads one export at QD1 while a 1 GiB volume converts in a
job worker; the p99.9 read latency is printed and must stay under 100 ms, and the job's progress events
rise monotonically to 100 %."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from nbdsrv.admin.client import AdminClient
from tests.interop.nbdsrv_fixture import create_image, disk_path, make_pool, start_server, volid
from tests.peers import peer

P999_LIMIT_MS = 100.0


def _fill(path: Path, mib: int) -> None:
    """Data that neither compresses into holes nor reads as zeroes, so the convert copies every byte."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(block[i % 251:] + block[:i % 251])


def test_fio_latency_while_a_convert_job_runs(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    big = disk_path(pool, "disk-0", "raw")
    _fill(big, 1024)
    served = create_image(disk_path(pool, "disk-1", "raw"), "raw", "256M")
    subprocess.run([peer("qemu-io"), "-f", "raw", "-c", "write -P 0x11 0 256M", str(served)],
                   check=True, capture_output=True)
    admin = tmp_path / "admin.sock"
    srv = start_server(tmp_path / "srv", "--admin-socket", str(admin), pool=pool)
    try:
        fio_cmd = [peer("fio"), "--name=lat", "--ioengine=nbd", f"--uri={srv.uri(volid(served))}",
                   "--rw=randread", "--bs=4k", "--iodepth=1", "--size=256M", "--time_based",
                   "--runtime=600", "--output-format=json", "--output", str(tmp_path / "fio.json")]

        async def main() -> tuple[list[dict[str, Any]], dict[str, Any]]:
            async with await AdminClient.connect(str(admin)) as c:
                fio = await asyncio.create_subprocess_exec(*fio_cmd, stdout=subprocess.DEVNULL)
                await asyncio.sleep(1.0)  # fio connected and reading before the job starts
                r = await c.execute("image-convert", {"volid": volid(big), "format": "qcow2", "job-id": "c"})
                rec = await c.execute("job-wait", {"id": r["job-id"], "timeout": 300})
                fio.send_signal(2)  # SIGINT: fio stops and writes its report
                await asyncio.wait_for(fio.wait(), 30)
                events = []
                while not c.events.empty():
                    events.append(c.events.get_nowait())
                return events, rec

        events, rec = asyncio.run(main())
        assert rec["status"] == "concluded" and "error" not in rec, rec
        text = (tmp_path / "fio.json").read_text()
        report = json.loads(text[text.index("{"):])  # fio puts "terminating on signal" before the JSON
        read = report["jobs"][0]["read"]
        p999_ms = read["clat_ns"]["percentile"]["99.900000"] / 1e6
        print(f"\nfio QD1 4k randread during a 1 GiB convert job: {read['iops']:.0f} IOPS, "
              f"p99 {read['clat_ns']['percentile']['99.000000'] / 1e6:.2f} ms, p99.9 {p999_ms:.2f} ms, "
              f"max {read['clat_ns']['max'] / 1e6:.2f} ms")
        assert read["io_bytes"] > 0 and report["jobs"][0]["error"] == 0
        assert p999_ms < P999_LIMIT_MS, f"p99.9 read latency {p999_ms:.1f} ms while a job ran"
        progress = [e["data"] for e in events if e["event"] == "JOB_STATUS_CHANGE"
                    and e["data"]["status"] in ("running", "concluded")]
        pct = [100 * p["current-progress"] / p["total-progress"] for p in progress]
        assert pct == sorted(pct) and pct[-1] == 100.0 and len(pct) > 3, pct
    finally:
        srv.stop()
