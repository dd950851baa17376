#!/usr/bin/python3
"""NBD workloads that the shared nbdbench lacks: a VM-like 64 KiB mix, and several clients on several exports.

- ``mixed-64k-qd32``: one client, random 64 KiB I/O, 70 % reads and 30 % writes, queue depth 32, on the
  1 GiB data image of nbdbench's scratch directory.
- ``multi4-mixed-64k-qd8``: four clients at once, each on an export of its own (four 256 MiB images of
  random data), each running the same 70/30 mix at queue depth 8. nbdsrv serves the four from one pool in
  one process, nbdkit from one process (``file dir=``); qemu-nbd serves one image per process, so it runs
  four of them and its CPU time is their sum.
- ``multi4-randread-4k-qd16``: the same four clients, random 4 KiB reads at queue depth 16 each.
- ``qemu-map-frag``: ``qemu-img map --output=json`` over NBD of a fragmented 1 GiB image (64 KiB of data
  every 128 KiB: 16,384 runs; qcow2 converted from the raw one). QEMU's client asks block status with
  NBD_CMD_FLAG_REQ_ONE, one request per run, so this is the latency of a block-status request; the
  record's figure is the wall time in seconds (lower is better).

Servers alternate within each round (A B C A B C), as nbdbench does, and each server's images are put in
the page cache in nbdbench's "small folios" state before its turn. Every record carries the server's CPU
seconds (utime + stime of the server processes and their threads, from /proc/PID/stat, before and after)
and the bytes fio moved (``io_bytes``, with no ramp time so that both cover the same interval), hence CPU
seconds per GiB. One JSON line per workload and round, in nbdbench's record shape (server, fmt, workload,
ok, mib_s, iops, server_cpu_s, ...).

    bench/nbdmulti.py --formats raw,qcow2 --servers nbdsrv,qemu-nbd,qemu-nbd10,nbdkit --rounds 3 \\
        --runtime 5 --out DIR/nbd-multi.jsonl
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
MULTI_SIZE = 256 * MiB
HOST = "127.0.0.1"

WORKLOADS: dict[str, dict[str, Any]] = {
    "mixed-64k-qd32": dict(clients=1, rw="randrw", mix=70, bs=64 << 10, qd=32),
    "multi4-mixed-64k-qd8": dict(clients=4, rw="randrw", mix=70, bs=64 << 10, qd=8),
    "multi4-randread-4k-qd16": dict(clients=4, rw="randread", mix=100, bs=4096, qd=16),
    "qemu-map-frag": dict(clients=1, kind="qemu-map"),
}
FRAG_SIZE = GiB
FRAG_STEP = 128 << 10


def load_nbdbench(path: str) -> Any:
    """nbdbench's helpers (page-cache warming, CPU accounting, images): it is a script without .py."""
    loader = importlib.machinery.SourceFileLoader("nbdbench", path)
    spec = importlib.util.spec_from_loader("nbdbench", loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: all bound at once, so that the kernel cannot hand one out twice."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def wait_port(port: int, procs: list[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"server exited with {p.returncode}")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"server did not accept on port {port} in {timeout}s")


class Servers:
    """One server (or, for qemu-nbd, one process per image) serving ``images``; ``uris`` in image order."""

    def __init__(self, kind: str, fmt: str, images: list[str], tmp: str, qemu10_bin: str) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.uris: list[str] = []
        self.log = open(os.path.join(tmp, "server.log"), "wb")
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT)  # this checkout's nbdsrv, also where .venv is another checkout's
        if kind == "nbdsrv":
            pool = os.path.join(tmp, "pool")
            os.makedirs(os.path.join(pool, "images", "100"))
            port = free_port()
            for i, img in enumerate(images):
                os.link(img, os.path.join(pool, "images", "100", f"vm-100-disk-{i}.{fmt}"))
                self.uris.append(f"nbd://{HOST}:{port}/bench:100/vm-100-disk-{i}.{fmt}")
            cmds = [[str(ROOT / ".venv/bin/nbdsrv"), "serve", "--listen", f"{HOST}:{port}",
                     "--pool", f"bench={pool}"]]
            ports = [port]
        elif kind in ("qemu-nbd", "qemu-nbd10"):
            exe = "qemu-nbd" if kind == "qemu-nbd" else os.path.join(qemu10_bin, "qemu-nbd")
            ports = free_ports(len(images))
            cmds = [[exe, "-t", "-e", "16", "-b", HOST, "-p", str(p), "-x", "bench", "-f", fmt, img]
                    for p, img in zip(ports, images, strict=True)]
            self.uris = [f"nbd://{HOST}:{p}/bench" for p in ports]
        elif kind == "nbdkit":
            port = free_port()
            if len(images) == 1:
                cmds = [["nbdkit", "-f", "-i", HOST, "-p", str(port), "file", images[0]]]
                self.uris = [f"nbd://{HOST}:{port}/"]
            else:
                d = os.path.join(tmp, "dir")
                os.makedirs(d)
                for i, img in enumerate(images):
                    os.link(img, os.path.join(d, f"disk-{i}.raw"))
                    self.uris.append(f"nbd://{HOST}:{port}/disk-{i}.raw")
                cmds = [["nbdkit", "-f", "-i", HOST, "-p", str(port), "file", f"dir={d}"]]
            ports = [port]
        else:
            raise ValueError(kind)
        self.cmd = " ; ".join(shlex.join(c) for c in cmds)
        for c in cmds:
            self.procs.append(subprocess.Popen(c, stdin=subprocess.DEVNULL, stdout=self.log,
                                               stderr=subprocess.STDOUT, cwd=tmp, env=env))
        try:
            for p in ports:
                wait_port(p, self.procs)
        except RuntimeError:
            self.stop()
            raise

    def cpu(self, nb: Any) -> float:
        return float(sum(nb.tree_cpu(p.pid) or 0.0 for p in self.procs))

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.log.close()


def run_fio(uris: list[str], wl: dict[str, Any], size: int, runtime: float, tmp: str) -> dict[str, Any]:
    """One fio with a job per URI, all at once; the totals over every job."""
    out = os.path.join(tmp, "fio.json")
    cmd = ["fio", "--output-format=json", f"--output={out}", "--ioengine=nbd", "--time_based",
           f"--runtime={runtime}", "--ramp_time=0", "--randrepeat=0", "--norandommap",
           f"--rw={wl['rw']}", f"--bs={wl['bs']}", f"--iodepth={wl['qd']}", f"--size={size}"]
    if wl["rw"] == "randrw":
        cmd.append(f"--rwmixread={wl['mix']}")
    for i, uri in enumerate(uris):
        cmd += [f"--name=c{i}", f"--uri={uri}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 120)
    if r.returncode != 0:
        return dict(ok=False, error=(r.stderr or r.stdout)[-500:], cmd=shlex.join(cmd))
    txt = Path(out).read_text()
    d = json.loads(txt[txt.index("{"):])
    jobs = d["jobs"]
    rb = sum(j["read"]["io_bytes"] for j in jobs)
    wb = sum(j["write"]["io_bytes"] for j in jobs)
    ios = sum(j["read"]["total_ios"] + j["write"]["total_ios"] for j in jobs)
    secs = max(j["job_runtime"] for j in jobs) / 1000 or runtime
    errors = sum(j.get("error", 0) for j in jobs)
    return dict(ok=errors == 0 and ios > 0, mib_s=round((rb + wb) / secs / MiB, 1),
                read_mib_s=round(rb / secs / MiB, 1), write_mib_s=round(wb / secs / MiB, 1),
                iops=round(ios / secs, 1), bytes=rb + wb, cmd=shlex.join(cmd))


def run_qemu_map(uri: str) -> dict[str, Any]:
    """qemu-img map of the export, timed; its extents counted."""
    cmd = ["qemu-img", "map", "--output=json", "-f", "raw", uri]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        return dict(ok=False, error=r.stderr[-500:], cmd=shlex.join(cmd))
    return dict(ok=True, seconds=round(dt, 3), extents=len(json.loads(r.stdout)), cmd=shlex.join(cmd))


def frag_image(scratch: str, fmt: str) -> str:
    """A 1 GiB image with 64 KiB of data every 128 KiB (qcow2: converted from the raw one), made once."""
    d = os.path.join(scratch, "multi")
    os.makedirs(d, exist_ok=True)
    raw = os.path.join(d, "frag.raw")
    if not os.path.exists(raw):
        fd = os.open(raw + ".tmp", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, FRAG_SIZE)
            block = os.urandom(64 << 10)
            for off in range(0, FRAG_SIZE, FRAG_STEP):
                os.pwrite(fd, block, off)
        finally:
            os.close(fd)
        os.rename(raw + ".tmp", raw)
    if fmt == "raw":
        return raw
    img = os.path.join(d, f"frag.{fmt}")
    if not os.path.exists(img):
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, raw, img + ".tmp"], check=True)
        os.rename(img + ".tmp", img)
    return img


def multi_images(nb: Any, scratch: str, fmt: str) -> list[str]:
    """Four 256 MiB images of random data (qcow2: converted from the raw ones), made once."""
    d = os.path.join(scratch, "multi")
    os.makedirs(d, exist_ok=True)
    out = []
    for i in range(4):
        raw = os.path.join(d, f"disk-{i}.raw")
        if not os.path.exists(raw):
            nb.make_data_raw(raw, MULTI_SIZE)
        if fmt == "raw":
            out.append(raw)
            continue
        img = os.path.join(d, f"disk-{i}.{fmt}")
        if not os.path.exists(img):
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, raw, img + ".tmp"], check=True)
            os.rename(img + ".tmp", img)
        out.append(img)
    return out


LABELS = {"nbdsrv": "nbdsrv-{fmt}", "qemu-nbd": "qemu-nbd-{fmt}", "qemu-nbd10": "qemu-nbd10-{fmt}",
          "nbdkit": "nbdkit-file"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="nbdsrv,qemu-nbd,qemu-nbd10,nbdkit")
    ap.add_argument("--formats", default="raw,qcow2")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=5)
    ap.add_argument("--out", required=True, help="JSON lines are appended here")
    ap.add_argument("--nbdbench",
                    default=os.environ.get("NBDBENCH", str(ROOT.parent / "shared/bench/nbdbench")))
    ap.add_argument("--qemu10-bin",
                    default=os.environ.get("NBDSRV_QEMU10_BIN", str(ROOT / "var/qemu10/usr/bin")))
    ap.add_argument("--scratch", default=os.environ.get("BENCH_SCRATCH", "/tmp/nbdbench-scratch"))
    a = ap.parse_args()
    nb = load_nbdbench(a.nbdbench)
    nb.set_subreaper()
    wls = [w for w in a.workloads.split(",") if w]
    bad = [w for w in wls if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown workloads {bad}; known: {', '.join(WORKLOADS)}")
    kinds = [k for k in a.servers.split(",") if k]
    if "qemu-nbd10" in kinds and not os.access(os.path.join(a.qemu10_bin, "qemu-nbd"), os.X_OK):
        print(f"nbdmulti: no qemu 10 at {a.qemu10_bin}; skipping it", file=sys.stderr)
        kinds.remove("qemu-nbd10")
    runs_dir = os.path.join(a.scratch, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    with open(a.out, "a") as outf:
        for fmt in a.formats.split(","):
            single = [nb.ensure_images(a.scratch, fmt)["data"]]
            multi = multi_images(nb, a.scratch, fmt)
            frag = [frag_image(a.scratch, fmt)] if any(
                WORKLOADS[w].get("kind") == "qemu-map" for w in wls) else []
            for rnd in range(1, a.rounds + 1):
                for kind in kinds:
                    if kind == "nbdkit" and fmt != "raw":
                        continue  # nbdkit's file plugin serves raw bytes only
                    label = LABELS[kind].format(fmt=fmt)
                    for name in wls:
                        wl = WORKLOADS[name]
                        mapping = wl.get("kind") == "qemu-map"
                        images = frag if mapping else single if wl["clients"] == 1 else multi
                        size = os.path.getsize(images[0]) if fmt == "raw" else (
                            GiB if wl["clients"] == 1 else MULTI_SIZE)
                        for img in images:
                            nb.warm(img, "small")
                        os.sync()
                        tmp = tempfile.mkdtemp(prefix=f"multi-{label}-", dir=runs_dir)
                        rec: dict[str, Any] = dict(round=rnd, server=label, fmt=fmt, workload=name)
                        try:
                            srv = Servers(kind, fmt, images, tmp, a.qemu10_bin)
                        except (RuntimeError, OSError) as e:
                            rec.update(ok=False, error=str(e))
                        else:
                            try:
                                c0, h0, t0 = srv.cpu(nb), nb.host_busy_ticks(), time.monotonic()
                                r = run_qemu_map(srv.uris[0]) if mapping else run_fio(
                                    srv.uris, wl, size, a.runtime, tmp)
                                wall = time.monotonic() - t0
                                c1, h1 = srv.cpu(nb), nb.host_busy_ticks()
                                rec.update(r)
                                rec["server_cmd"] = srv.cmd
                                rec["wall_s"] = round(wall, 3)
                                rec["server_cpu_s"] = round(c1 - c0, 2)
                                rec["server_cpu_pct"] = round(100 * (c1 - c0) / wall, 1)
                                if r.get("bytes"):
                                    rec["cpu_s_per_gib"] = round((c1 - c0) / (r["bytes"] / GiB), 3)
                                rec["host_busy_pct"] = round(
                                    100 * (os.cpu_count() or 1) * (h1[0] - h0[0]) / max(1, h1[1] - h0[1]), 1)
                                rec["loadavg1"] = os.getloadavg()[0]
                                if not srv.alive():
                                    rec.update(ok=False, error="server died")
                            finally:
                                srv.stop()
                        line = json.dumps(rec)
                        print(line, flush=True)
                        outf.write(line + "\n")
                        outf.flush()
                        subprocess.run(["rm", "-rf", tmp], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
