"""Many NBD clients at once, each on an export of its own (see bench/conns for what it measures).

The clients are libnbd handles driven by one selector loop through libnbd's aio interface, so that every
handshake and every read is in flight at the same time, as a thousand separate clients would have them.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nbd

ROOT = Path(__file__).resolve().parent.parent
READ = 4096


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def make_pool(root: Path, n: int) -> list[Path]:
    files = []
    for i in range(n):
        vmid = 100 + i
        d = root / "images" / str(vmid)
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"vm-{vmid}-disk-0.raw"
        with open(p, "wb") as f:
            f.write(i.to_bytes(4, "little") * (READ // 4))
            f.truncate(1 << 20)
        files.append(p)
    return files


def drive(handles: list[nbd.NBD], done: Callable[[nbd.NBD], bool]) -> None:
    """Run libnbd's state machines until ``done(h)`` holds for every handle."""
    sel = selectors.DefaultSelector()
    pending = set(range(len(handles)))
    while pending:
        for i in list(pending):
            h = handles[i]
            if done(h):
                pending.discard(i)
        if not pending:
            break
        for i in pending:
            h = handles[i]
            d = h.aio_get_direction()
            ev = (selectors.EVENT_READ if d & nbd.AIO_DIRECTION_READ else 0) | \
                 (selectors.EVENT_WRITE if d & nbd.AIO_DIRECTION_WRITE else 0)
            if ev:
                sel.register(h.aio_get_fd(), ev, i)
        for key, ev in sel.select(timeout=5):
            h = handles[key.data]
            if ev & selectors.EVENT_READ:
                h.aio_notify_read()
            elif ev & selectors.EVENT_WRITE:
                h.aio_notify_write()
        for key in list(sel.get_map().values()):
            sel.unregister(key.fileobj)


def run_clients(sock: str, names: list[str]) -> tuple[dict[str, float], list[nbd.NBD], list[nbd.Buffer]]:
    handles = []
    for name in names:
        h = nbd.NBD()
        h.set_export_name(name)
        handles.append(h)
    t0 = time.monotonic()
    for h in handles:
        h.aio_connect_unix(sock)
    drive(handles, lambda h: bool(h.aio_is_ready()))
    t_connect = time.monotonic() - t0
    bufs = [nbd.Buffer(READ) for _ in handles]
    cookies = []
    t0 = time.monotonic()
    for h, b in zip(handles, bufs, strict=True):
        cookies.append(h.aio_pread(b, 0))
    drive(handles, lambda h: h.aio_in_flight() == 0)
    t_read = time.monotonic() - t0
    for h, c in zip(handles, cookies, strict=True):
        h.aio_command_completed(c)
    return {"connect_s": t_connect, "read_s": t_read}, handles, bufs


def start(server: str, pool: Path, sock: str) -> subprocess.Popen[bytes]:
    if server == "nbdsrv":
        cmd = [str(ROOT / ".venv/bin/nbdsrv"), "serve", "--pool", f"bench={pool}", "--listen", f"unix:{sock}"]
    else:
        cmd = ["nbdkit", "-f", "-U", sock, "file", f"dir={pool}/flat"]
    log = open(Path(sock).with_suffix(".log"), "wb")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    for _ in range(200):
        if os.path.exists(sock):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{server} did not start: {Path(sock).with_suffix('.log').read_text()}")


def one(server: str, pool: Path, files: list[Path], mode: str, work: Path) -> dict[str, object]:
    sock = str(work / f"{server}-{mode}-{time.monotonic_ns()}.sock")
    proc = start(server, pool, sock)
    try:
        time.sleep(0.3)
        if proc.poll() is not None:
            raise RuntimeError(f"{server} exited: {Path(sock).with_suffix('.log').read_text()}")
        base = rss_kib(proc.pid)
        n = len(files)
        if server == "nbdsrv":
            names = [f"bench:{100 + i}/vm-{100 + i}-disk-0.raw" for i in range(n)]
        else:
            names = [f"{100 + i}.raw" for i in range(n)]
        if mode == "shared":
            names = [names[0]] * n
        try:
            res, handles, bufs = run_clients(sock, names)
        except nbd.Error:
            print(Path(sock).with_suffix(".log").read_text()[-3000:], file=sys.stderr)
            raise
        after = rss_kib(proc.pid)
        for i, b in enumerate(bufs):
            want = (0 if mode == "shared" else i).to_bytes(4, "little") * (READ // 4)
            assert b.to_bytearray() == want, f"client {i} read the wrong data"
        for h in handles:
            h.shutdown()
        return {"server": server, "mode": mode, "clients": n, "rss_base_kib": base, "rss_kib": after,
                "kib_per_client": round((after - base) / n, 1), **{k: round(v, 3) for k, v in res.items()}}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def median(rows: list[dict[str, object]], key: str) -> float:
    vals = sorted(float(str(x[key])) for x in rows)
    return vals[len(vals) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--servers", default="nbdsrv,nbdkit")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / time.strftime("conns-%Y%m%dT%H%M%SZ",
                                                                                  time.gmtime())))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nbdconns-", dir=os.environ.get("BENCH_SCRATCH")))
    rows: list[dict[str, object]] = []
    try:
        pool = work / "pool"
        files = make_pool(pool, args.clients)
        (pool / "flat").mkdir()
        for i, f in enumerate(files):
            os.link(f, pool / "flat" / f"{100 + i}.raw")
        with open(out / "conns.jsonl", "w") as log:
            for r in range(args.rounds):
                for server in args.servers.split(","):
                    for mode in ("distinct", "shared"):
                        row = one(server, pool, files, mode, work) | {"round": r}
                        print(json.dumps(row), flush=True)
                        log.write(json.dumps(row) + "\n")
                        rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"{args.clients} clients at once, medians of {args.rounds} rounds", "",
             "| server | exports | connect all (s) | read 4 KiB, all (s) | RSS growth per client (KiB) |",
             "|---|---|---|---|---|"]
    for server in args.servers.split(","):
        for mode in ("distinct", "shared"):
            sel = [x for x in rows if x["server"] == server and x["mode"] == mode]
            connect, read, per = (median(sel, k) for k in ("connect_s", "read_s", "kib_per_client"))
            lines.append(f"| {server} | {'one each' if mode == 'distinct' else 'one for all'} | "
                         f"{connect:.2f} | {read:.3f} | {per:.0f} |")
    (out / "conns.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
