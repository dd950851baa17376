"""The admin socket beside qemu-img, and NBD latency beside a running job, in one run.

    .venv/bin/python bench/admin.py [--rounds N] [--fio-seconds S] [--out DIR]

Part 1 times `image-info`, `image-check` and `image-map` of a small qcow2 as warm round trips over the
admin socket (a connected client, warm workers) against `qemu-img info|check|map --output=json` processes on
the same image, alternating A B A B, and reports medians and the ratio (qemu-img's wall time over ours:
above 1, the socket answers faster).

Part 2 runs fio (nbd engine, 4 KiB random reads at QD1) against one export twice: once idle, once while an
`image-convert` job copies a 1 GiB volume (restarted as often as needed to cover fio's run), and reports
IOPS, p50, p99 and p99.9 latency for both and the p99 ratio.

Results: a markdown table on stdout, and DIR/admin.json when --out is given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nbdsrv.admin.client import AdminClient  # noqa: E402

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
FIO = shutil.which("fio") or "fio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_images(pool: Path) -> tuple[Path, Path, Path]:
    d = pool / "images" / "100"
    d.mkdir(parents=True)
    small = d / "vm-100-disk-0.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(small), "1G"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 16M", "-c", "write -P 0x22 512M 16M",
                    str(small)], check=True, capture_output=True)
    big = d / "vm-100-disk-1.raw"
    block = os.urandom(1 << 20)
    with open(big, "wb") as f:
        for i in range(1024):
            f.write(block[i % 97:] + block[:i % 97])
    served = d / "vm-100-disk-2.raw"
    with open(served, "wb") as f:
        for _ in range(256):
            f.write(block)
    return small, big, served


def start(pool: Path, run: Path, port: int) -> subprocess.Popen[bytes]:
    admin = run / "admin.sock"
    pid = run / "pid"
    proc = subprocess.Popen([sys.executable, "-m", "nbdsrv", "serve", "--listen", f"127.0.0.1:{port}",
                             "--pool", f"local={pool}", "--admin-socket", str(admin), "--pid-file", str(pid),
                             "--log-level", "warning"], cwd=str(ROOT))
    deadline = time.monotonic() + 20
    while not pid.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("nbdsrv did not start")
        time.sleep(0.05)
    return proc


async def socket_vs_qemu_img(admin: Path, image: Path, rounds: int) -> list[dict[str, Any]]:
    volid = f"local:100/{image.name}"
    cases = [("info", "image-info", ["info", "--output=json", "-U"]),
             ("check", "image-check", ["check", "--output=json", "-U"]),
             ("map", "image-map", ["map", "--output=json", "-U"])]
    rows = []
    async with await AdminClient.connect(str(admin)) as c:
        for name, cmd, qargs in cases:
            await c.execute(cmd, {"volid": volid})  # warm: the worker has the formats imported
            ours: list[float] = []
            theirs: list[float] = []
            for _ in range(rounds):
                t = time.perf_counter()
                await c.execute(cmd, {"volid": volid})
                ours.append(time.perf_counter() - t)
                t = time.perf_counter()
                subprocess.run([QEMU_IMG, *qargs, str(image)], check=False, capture_output=True)
                theirs.append(time.perf_counter() - t)
            a, b = statistics.median(ours), statistics.median(theirs)
            rows.append({"op": name, "socket_ms": a * 1e3, "qemu_img_ms": b * 1e3, "ratio": b / a})
    return rows


def fio(uri: str, seconds: int, out: Path) -> dict[str, Any]:
    subprocess.run([FIO, "--name=lat", "--ioengine=nbd", f"--uri={uri}", "--rw=randread", "--bs=4k",
                    "--iodepth=1", "--size=256M", "--time_based", f"--runtime={seconds}",
                    "--output-format=json", "--output", str(out)], check=True, capture_output=True)
    read = json.loads(out.read_text())["jobs"][0]["read"]
    pct = read["clat_ns"]["percentile"]
    return {"iops": read["iops"], "p50_us": pct["50.000000"] / 1e3, "p99_us": pct["99.000000"] / 1e3,
            "p999_us": pct["99.900000"] / 1e3}


async def latency_with_job(admin: Path, big: Path, uri: str, seconds: int, tmp: Path) -> dict[str, Any]:
    async with await AdminClient.connect(str(admin)) as c:
        stop = asyncio.Event()

        async def keep_converting() -> int:
            n = 0
            while not stop.is_set():
                r = await c.execute("image-convert", {"volid": f"local:100/{big.name}", "format": "qcow2",
                                                      "auto-dismiss": False})
                await c.execute("job-wait", {"id": r["job-id"]})
                await c.execute("job-dismiss", {"id": r["job-id"]})
                await c.execute("volume-free", {"volid": r["volid"]})
                n += 1
            return n

        jobs = asyncio.ensure_future(keep_converting())
        await asyncio.sleep(0.5)
        result = await asyncio.to_thread(fio, uri, seconds, tmp / "fio-job.json")
        stop.set()
        result["jobs_run"] = await jobs
        return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--fio-seconds", type=int, default=10)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="adminbench-") as tmpdir:
        tmp = Path(tmpdir)
        pool = tmp / "pool"
        small, big, served = make_images(pool)
        (tmp / "run").mkdir()
        port = free_port()
        proc = start(pool, tmp / "run", port)
        try:
            admin = tmp / "run" / "admin.sock"
            rows = asyncio.run(socket_vs_qemu_img(admin, small, a.rounds))
            uri = f"nbd://127.0.0.1:{port}/local:100/{served.name}"
            idle = fio(uri, a.fio_seconds, tmp / "fio-idle.json")
            busy = asyncio.run(latency_with_job(admin, big, uri, a.fio_seconds, tmp))
        finally:
            proc.terminate()
            proc.wait(30)
    print("| operation | admin socket, warm (ms) | qemu-img process (ms) | qemu-img ÷ socket |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['socket_ms']:.2f} | {r['qemu_img_ms']:.2f} | **{r['ratio']:.1f}** |")
    print()
    print("| fio 4k randread QD1 | IOPS | p50 (µs) | p99 (µs) | p99.9 (µs) |")
    print("|---|---|---|---|---|")
    for label, r in (("idle", idle), (f"convert job running ({busy['jobs_run']} jobs)", busy)):
        print(f"| {label} | {r['iops']:.0f} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['p999_us']:.0f} |")
    print(f"\np99 with a job ÷ p99 idle: {busy['p99_us'] / idle['p99_us']:.2f}")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "admin.json").write_text(json.dumps({"socket": rows, "idle": idle, "job": busy}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
