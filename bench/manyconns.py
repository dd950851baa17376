#!/usr/bin/python3
"""Many clients on many exports at once: the server's memory per connection and per open image, and the
time for every client to read 4 KiB.

A pool of N raw volumes (1 MiB each, sparse but for their first 4 KiB) is served by nbdsrv (one process,
one driver instance per open image) and by nbdkit (``file dir=``, one process). N libnbd connections are
opened one after the other, each on an export of its own, and then every one reads 4 KiB at once; the
server's resident memory (VmRSS from /proc/PID/status) is taken before the first connection, after the
last, and after the reads. With ``--same-export`` every connection is on the first export instead: the
difference between the two runs is the cost of an open image, apart from that of a connection.

    /usr/bin/python3 bench/manyconns.py --count 1000 [--servers nbdsrv,nbdkit] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nbd

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def make_pool(root: Path, count: int) -> list[Path]:
    d = root / "images" / "100"
    d.mkdir(parents=True)
    out = []
    for i in range(count):
        p = d / f"vm-100-disk-{i}.raw"
        with open(p, "wb") as f:
            f.write(bytes([i % 251 + 1]) * 4096)
            f.truncate(1 << 20)
        out.append(p)
    return out


def start(kind: str, pool: Path, count: int, log: Any) -> tuple[subprocess.Popen[bytes], list[str]]:
    port = free_port()
    if kind == "nbdsrv":
        n = str(count + 16)
        cmd = [str(ROOT / ".venv/bin/nbdsrv"), "serve", "--listen", f"{HOST}:{port}",
               "--pool", f"bench={pool}", "--max-connections", n, "--max-connections-per-address", n]
        uris = [f"nbd://{HOST}:{port}/bench:100/vm-100-disk-{i}.raw" for i in range(count)]
    else:
        cmd = ["nbdkit", "-f", "-i", HOST, "-p", str(port), "file", f"dir={pool / 'images' / '100'}"]
        uris = [f"nbd://{HOST}:{port}/vm-100-disk-{i}.raw" for i in range(count)]
    # this checkout's nbdsrv, also where .venv is another checkout's (a git worktree)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not start") from None
            time.sleep(0.05)
    return proc, uris


def one_run(kind: str, pool: Path, count: int, tmp: str, same: bool) -> dict[str, Any]:
    with open(os.path.join(tmp, f"{kind}.log"), "wb") as log:
        proc, uris = start(kind, pool, count, log)
        if same:
            uris = [uris[0]] * count
        try:
            time.sleep(0.5)
            rss0 = rss_kib(proc.pid)
            t0 = time.monotonic()
            handles = []
            for uri in uris:
                h = nbd.NBD()
                h.connect_uri(uri)
                handles.append(h)
            t_conn = time.monotonic() - t0
            rss1 = rss_kib(proc.pid)
            bufs = [nbd.Buffer(4096) for _ in handles]
            t1 = time.monotonic()
            cookies = [h.aio_pread(b, 0) for h, b in zip(handles, bufs, strict=True)]
            for h, c in zip(handles, cookies, strict=True):
                while not h.aio_command_completed(c):
                    h.poll(-1)
            t_read = time.monotonic() - t1
            rss2 = rss_kib(proc.pid)
            bad = sum(1 for i, b in enumerate(bufs)
                      if b.to_bytearray() != bytes([(0 if same else i) % 251 + 1]) * 4096)
            for h in handles:
                h.shutdown()
            return dict(server=kind, count=count, exports=1 if same else count, ok=bad == 0, bad_reads=bad,
                        connect_s=round(t_conn, 3),
                        read_all_s=round(t_read, 4), rss_idle_mib=round(rss0 / 1024, 1),
                        rss_connected_mib=round(rss1 / 1024, 1), rss_after_reads_mib=round(rss2 / 1024, 1),
                        kib_per_connection=round((rss2 - rss0) / count, 1))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--servers", default="nbdsrv,nbdkit")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--same-export", action="store_true", help="every connection on one export")
    ap.add_argument("--out", help="also append the JSON lines here")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = a.count + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    tmp = tempfile.mkdtemp(prefix="manyconns-", dir=os.environ.get("BENCH_SCRATCH", "/tmp"))
    try:
        pool = Path(tmp) / "pool"
        make_pool(pool, a.count)
        for rnd in range(1, a.rounds + 1):
            for kind in a.servers.split(","):
                rec = dict(round=rnd, **one_run(kind, pool, a.count, tmp, a.same_export))
                line = json.dumps(rec)
                print(line, flush=True)
                if a.out:
                    with open(a.out, "a") as f:
                        f.write(line + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
