#!/usr/bin/python3
"""Turn nbdbench and imgbench JSON lines into markdown tables of medians and of speed ratios."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

# nbdbench: the metric each workload is judged by, and whether more of it is better
NBD_PRIMARY: dict[str, tuple[str, bool, str]] = {
    "seqread-1m-qd8": ("mib_s", True, "seq read 1M QD8, MiB/s"),
    "seqwrite-1m-qd8": ("mib_s", True, "seq write 1M QD8, MiB/s"),
    "randread-4k-qd16": ("iops", True, "rand read 4K QD16, IOPS"),
    "randwrite-4k-qd16": ("iops", True, "rand write 4K QD16, IOPS"),
    "randread-4k-qd1": ("lat_us", False, "rand read 4K QD1, latency µs"),
    "nbdcopy-1g-null": ("mib_s", True, "nbdcopy 1 GiB to null, MiB/s"),
    "blockstatus-64g": ("seconds", False, "block status, 64 GiB sparse, s"),
    # bench/nbdmulti.py
    "mixed-64k-qd32": ("mib_s", True, "64K 70/30 read/write QD32, MiB/s"),
    "multi4-mixed-64k-qd8": ("mib_s", True, "4 clients on 4 exports, 64K 70/30 QD8, MiB/s"),
    "multi4-randread-4k-qd16": ("iops", True, "4 clients on 4 exports, rand read 4K QD16, IOPS"),
    "qemu-map-frag": ("seconds", False, "qemu-img map, 16,384 runs (REQ_ONE), s"),
}
# short names for the plot
NBD_SHORT = {
    "seqread-1m-qd8": "seq read 1M", "seqwrite-1m-qd8": "seq write 1M", "randread-4k-qd16": "rand read 4K",
    "randwrite-4k-qd16": "rand write 4K", "randread-4k-qd1": "read 4K QD1 lat", "nbdcopy-1g-null": "nbdcopy",
    "blockstatus-64g": "block status", "mixed-64k-qd32": "64K 70/30 QD32",
    "multi4-mixed-64k-qd8": "4x4 64K 70/30", "multi4-randread-4k-qd16": "4x4 rand read 4K",
    "qemu-map-frag": "qemu-img map",
}
GiB = 1 << 30
# workloads that move no data: their CPU column is CPU seconds per scan
SCANS = ("blockstatus-64g", "qemu-map-frag")


def load(paths: list[Path]) -> list[dict[str, Any]]:
    """Per-run records only: nbdbench's and imgbench's own median lines are recomputed here."""
    out: list[dict[str, Any]] = []
    for path in paths:
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            if rec.get("stat") == "median" or str(rec.get("workload", "")).startswith("_"):
                continue
            out.append(rec)
    return out


def fmt_num(v: float) -> str:
    if v >= 10000:
        return f"{v / 1000:.1f}k"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def nbd_tables(recs: list[dict[str, Any]], subject: str) -> str:
    # server label -> workload -> values of its primary metric; labels keep first-seen order
    vals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    failed: dict[str, set[str]] = defaultdict(set)
    labels: list[str] = []
    for r in recs:
        wl = r.get("workload")
        if wl not in NBD_PRIMARY:
            continue
        label = str(r["server"])
        if label not in labels:
            labels.append(label)
        metric = NBD_PRIMARY[wl][0]
        if r.get("ok") and isinstance(r.get(metric), int | float):
            vals[label][wl].append(float(r[metric]))
        else:
            failed[label].add(wl)
    if not labels:
        return ""
    med = {lb: {wl: statistics.median(v) for wl, v in d.items() if v} for lb, d in vals.items()}
    lines = ["| workload | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for wl, (_, _, title) in NBD_PRIMARY.items():
        if not any(wl in med.get(lb, {}) or wl in failed[lb] for lb in labels):
            continue
        cells = []
        for lb in labels:
            m = med.get(lb, {}).get(wl)
            cells.append(fmt_num(m) if m is not None else ("failed" if wl in failed[lb] else "—"))
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    subjects = [lb for lb in labels if lb.startswith(subject)]
    anchors = [lb for lb in labels if not lb.startswith(subject)]
    if subjects and anchors:
        lines += ["", f"Speed of {subject} relative to each anchor (>1: {subject} is faster):", ""]
        cols = [f"{s} ÷ {a}" for s in subjects for a in anchors]
        lines += ["| workload | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for wl, (_, higher_better, title) in NBD_PRIMARY.items():
            cells = []
            for s in subjects:
                for a in anchors:
                    sv, av = med.get(s, {}).get(wl), med.get(a, {}).get(wl)
                    if sv is None or av is None or sv == 0 or av == 0:
                        cells.append("n/a")
                    else:
                        cells.append(f"{(sv / av if higher_better else av / sv):.2f}")
            if any(c != "n/a" for c in cells):
                lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _opt(cmd: str, name: str) -> float | None:
    for word in cmd.split():
        if word.startswith(f"--{name}="):
            try:
                return float(word.split("=", 1)[1])
            except ValueError:
                return None
    return None


def cpu_per_gib(r: dict[str, Any]) -> float | None:
    """Server CPU seconds per GiB moved, for one record (None where no data moves: block status).

    bench/nbdmulti.py records the bytes fio moved over the same interval as the CPU time. nbdbench's fio
    records count bytes after a ramp time while its CPU time covers the ramp too: their bytes are taken at
    the measured rate over ramp + runtime. nbdcopy moves the whole image (mib_s * seconds)."""
    if isinstance(r.get("cpu_s_per_gib"), int | float):
        return float(r["cpu_s_per_gib"])
    cpu, mib_s = r.get("server_cpu_s"), r.get("mib_s")
    if not isinstance(cpu, int | float) or not isinstance(mib_s, int | float) or not mib_s:
        return None
    wl = str(r.get("workload"))
    if wl == "nbdcopy-1g-null" and isinstance(r.get("seconds"), int | float):
        moved = mib_s * float(r["seconds"]) / 1024
    elif wl in NBD_PRIMARY and wl not in SCANS:
        cmd = str(r.get("cmd", ""))
        secs = (_opt(cmd, "runtime") or 0) + (_opt(cmd, "ramp_time") or 0)
        if not secs:
            return None
        moved = mib_s * secs / 1024
    else:
        return None
    return float(cpu) / moved if moved else None


def cpu_table(recs: list[dict[str, Any]]) -> str:
    """Median server CPU seconds per GiB moved, per workload and server (block status: CPU s per scan)."""
    vals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    labels: list[str] = []
    for r in recs:
        wl = r.get("workload")
        if wl not in NBD_PRIMARY or not r.get("ok"):
            continue
        label = str(r["server"])
        v = cpu_per_gib(r)
        if v is None and wl in SCANS and isinstance(r.get("server_cpu_s"), int | float):
            v = float(r["server_cpu_s"])
        if v is None:
            continue
        if label not in labels:
            labels.append(label)
        vals[label][str(wl)].append(v)
    if not labels:
        return ""
    lines = ["| workload, server CPU s per GiB | " + " | ".join(labels) + " |",
             "|---" * (len(labels) + 1) + "|"]
    for wl, (_, _, title) in NBD_PRIMARY.items():
        cells = [f"{statistics.median(vals[lb][wl]):.3f}" if vals[lb].get(wl) else "—" for lb in labels]
        if any(c != "—" for c in cells):
            name = title.rsplit(",", 1)[0] + (" (CPU s per scan)" if wl in SCANS else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def best_peer_ratios(recs: list[dict[str, Any]], subject: str = "nbdsrv"
                     ) -> list[tuple[str, str, float | None, str]]:
    """(workload, format, subject's speed ÷ the best peer's, which peer) for every workload and format.

    Raw is held against every raw peer; qcow2 against qemu-nbd's qcow2 figures and nbdkit's raw one
    (nbdkit has no qcow2 writer). Speed is throughput, or 1 / time for latency and block status."""
    vals: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in recs:
        wl = r.get("workload")
        if wl not in NBD_PRIMARY or not r.get("ok"):
            continue
        metric = NBD_PRIMARY[str(wl)][0]
        if isinstance(r.get(metric), int | float) and r[metric] > 0:
            vals[(str(r["server"]), str(wl))].append(float(r[metric]))
    med = {k: statistics.median(v) for k, v in vals.items()}
    out: list[tuple[str, str, float | None, str]] = []
    for wl, (_, higher, _) in NBD_PRIMARY.items():
        for fmt in ("raw", "qcow2"):
            subj = med.get((f"{subject}-{fmt}", wl))
            peers = {lb: v for (lb, w), v in med.items() if w == wl and not lb.startswith(subject)
                     and (lb.endswith(f"-{fmt}") or lb == "nbdkit-file")}
            if subj is None and not peers:
                continue
            if subj is None or not peers:
                out.append((wl, fmt, None, ""))
                continue
            speed = {lb: (v if higher else 1 / v) for lb, v in peers.items()}
            best = max(speed, key=lambda lb: speed[lb])
            mine = subj if higher else 1 / subj
            out.append((wl, fmt, mine / speed[best], best))
    return out


def ratio_table(ratios: list[tuple[str, str, float | None, str]]) -> str:
    if not ratios:
        return ""
    by: dict[str, dict[str, tuple[float | None, str]]] = defaultdict(dict)
    for wl, fmt, ratio, peer in ratios:
        by[wl][fmt] = (ratio, peer)
    lines = ["| workload | raw: nbdsrv ÷ best peer | qcow2: nbdsrv ÷ best peer |", "|---|---|---|"]
    for wl, (_, _, title) in NBD_PRIMARY.items():
        if wl not in by:
            continue
        cells = []
        for fmt in ("raw", "qcow2"):
            ratio, peer = by[wl].get(fmt, (None, ""))
            if ratio is None:
                cells.append("n/a")
            else:
                txt = f"{ratio:.2f} ({peer})"
                cells.append(f"**{txt}**" if ratio >= 1 else txt)
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ratio_plot(ratios: list[tuple[str, str, float | None, str]], path: Path, title: str) -> bool:
    """A bar chart of the ratios (log scale, 1.0 marked): False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("report: matplotlib not importable (Debian: python3-matplotlib); no plot", file=sys.stderr)
        return False
    wls = [wl for wl in NBD_PRIMARY if any(r[0] == wl for r in ratios)]
    get = {(wl, fmt): ratio for wl, fmt, ratio, _ in ratios}
    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.38
    for k, (fmt, color) in enumerate((("raw", "#3b75af"), ("qcow2", "#ef8636"))):
        xs = [i + (k - 0.5) * width for i in range(len(wls))]
        ys = [get.get((wl, fmt)) or 1.0 for wl in wls]
        # bars grow from 1.0: up where nbdsrv leads, down where it trails
        bars = ax.bar(xs, [y - 1 for y in ys], width, bottom=1.0, label=fmt, color=color)
        for b, wl, y in zip(bars, wls, ys, strict=True):
            if get.get((wl, fmt)):
                ax.annotate(f"{y:.2f}", (b.get_x() + b.get_width() / 2, y), ha="center",
                            va="bottom" if y >= 1 else "top", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_yscale("log", base=2)
    lo = min([r for _, _, r, _ in ratios if r] + [0.5])
    hi = max([r for _, _, r, _ in ratios if r] + [2.0])
    ax.set_ylim(lo / 1.3, hi * 1.3)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylabel("nbdsrv speed ÷ best peer (log)")
    ax.set_xticks(range(len(wls)))
    ax.set_xticklabels([NBD_SHORT.get(wl, wl) for wl in wls], rotation=30, ha="right", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def img_tables(recs: list[dict[str, Any]], subject: str) -> str:
    vals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    failed: dict[str, set[str]] = defaultdict(set)
    tools: list[str] = []
    ops: list[str] = []
    for r in recs:
        if "op" not in r or "tool" not in r:
            continue
        tool, op = str(r["tool"]), str(r["op"])
        if tool not in tools:
            tools.append(tool)
        if op not in ops:
            ops.append(op)
        if r.get("ok") and r.get("verified_identical", True) and isinstance(r.get("wall_s"), int | float):
            vals[tool][op].append(float(r["wall_s"]))
        else:
            failed[tool].add(op)
    if not tools:
        return ""
    med = {t: {op: statistics.median(v) for op, v in d.items() if v} for t, d in vals.items()}
    anchors = [t for t in tools if not t.startswith(subject)]
    subjects = [t for t in tools if t.startswith(subject)]
    ratio_cols = [f"{s} ÷ {a}" for s in subjects for a in anchors]
    lines = ["| operation, wall s | " + " | ".join(tools + ratio_cols) + " |",
             "|---" * (len(tools) + len(ratio_cols) + 1) + "|"]
    for op in ops:
        cells = []
        for t in tools:
            m = med.get(t, {}).get(op)
            cells.append(f"{m:.2f}" if m is not None else ("failed" if op in failed[t] else "—"))
        for s in subjects:
            for a in anchors:
                sv, av = med.get(s, {}).get(op), med.get(a, {}).get(op)
                cells.append(f"{av / sv:.2f}" if sv and av else "n/a")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    if ratio_cols:
        lines += ["", f"Ratios are speed (anchor time ÷ {subject} time): >1 means {subject} is faster."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("jsonl", nargs="+", type=Path, help="nbdbench/imgbench --out files")
    ap.add_argument("--subject", default="", help="label prefix of the tool under test (nbdsrv, imagecore)")
    ap.add_argument("--plot", type=Path, help="NBD runs: write the best-peer ratio plot (PNG) here")
    ap.add_argument("--title", default="nbdsrv ÷ best peer", help="the plot's title")
    a = ap.parse_args()
    recs = load(a.jsonl)
    nbd_recs = [r for r in recs if "server" in r]
    fmts = sorted({str(r.get("fmt", "")) for r in nbd_recs}, key=lambda f: (f != "raw", f))
    nbd = "\n".join(f"### NBD servers, {fmt or 'image'}\n\n" + t for fmt in fmts
                    if (t := nbd_tables([r for r in nbd_recs if str(r.get("fmt", "")) == fmt],
                                        a.subject or "nbdsrv")))
    if nbd:
        ratios = best_peer_ratios(nbd_recs, a.subject or "nbdsrv")
        head = ("### nbdsrv ÷ the best peer\n\nSpeed of nbdsrv relative to the fastest peer of the same run "
                "(>1: nbdsrv is faster; qcow2 is held against qemu-nbd's qcow2 figures and nbdkit's raw "
                "one):\n\n" + ratio_table(ratios))
        if a.plot is not None and ratio_plot(ratios, a.plot, a.title):
            head += f"\n![nbdsrv ÷ best peer]({a.plot.name})\n"
        cpu = cpu_table(nbd_recs)
        nbd = head + "\n" + nbd + ("\n### Server CPU seconds per GiB moved\n\n" + cpu if cpu else "")
    img = img_tables([r for r in recs if "tool" in r], a.subject or "imagecore")
    if img:
        img = "### Offline tools\n\n" + img
    if not nbd and not img:
        print("report: no benchmark records found", file=sys.stderr)
        return 1
    sys.stdout.write(nbd + ("\n" if nbd and img else "") + img)
    return 0


if __name__ == "__main__":
    sys.exit(main())
