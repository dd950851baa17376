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
}


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
    a = ap.parse_args()
    recs = load(a.jsonl)
    nbd_recs = [r for r in recs if "server" in r]
    fmts = sorted({str(r.get("fmt", "")) for r in nbd_recs}, key=lambda f: (f != "raw", f))
    nbd = "\n".join(f"### NBD servers, {fmt or 'image'}\n\n" + t for fmt in fmts
                    if (t := nbd_tables([r for r in nbd_recs if str(r.get("fmt", "")) == fmt],
                                        a.subject or "nbdsrv")))
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
