"""Helpers for the dirty-bitmap tests: what QEMU says a bitmap holds, what it should hold, and images whose
bitmaps QEMU left in use."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from tests.peers import peer, run

Run = tuple[int, int, bool]  # offset, length, dirty


def map_of(args: list[str]) -> list[Run]:
    out = run(peer("nbdinfo"), "--json", *args).stdout
    return [(e["offset"], e["length"], bool(e["type"] & 1)) for e in json.loads(out)]


def nbd_map(uri: str, name: str) -> list[Run]:
    """A bitmap as an NBD server answers for ``qemu:dirty-bitmap:NAME`` (nbdinfo --map)."""
    return map_of([f"--map=qemu:dirty-bitmap:{name}", uri])


def qemu_map(path: Path, name: str, *, qemu_nbd: str | None = None) -> list[Run]:
    """A bitmap as QEMU reads it from the image: qemu-nbd -B NAME, asked by nbdinfo --map."""
    return map_of([f"--map=qemu:dirty-bitmap:{name}", "--", "[", qemu_nbd or peer("qemu-nbd"), "-r", "-f",
                   "qcow2", "-B", name, str(path), "]"])


def qemu_client_map(uri_host: str, port: int, export: str, name: str) -> list[Run]:
    """A bitmap as QEMU's own NBD client reads it from a server (qemu-img map with x-dirty-bitmap, as
    qemu's iotests do: the bitmap's dirty runs show as holes with "data": false)."""
    opts = (f"driver=nbd,server.type=inet,server.host={uri_host},server.port={port},export={export},"
            f"x-dirty-bitmap=qemu:dirty-bitmap:{name}")
    out = run(peer("qemu-img"), "map", "--output=json", "--image-opts", opts).stdout
    runs: list[Run] = []
    for e in json.loads(out):
        dirty = not e["data"]
        if runs and runs[-1][2] == dirty and runs[-1][0] + runs[-1][1] == e["start"]:
            runs[-1] = (runs[-1][0], runs[-1][1] + e["length"], dirty)
        else:
            runs.append((e["start"], e["length"], dirty))
    return runs


def expected(size: int, granularity: int, ranges: Iterable[tuple[int, int]]) -> list[Run]:
    """The runs of a bitmap of ``granularity`` over a ``size``-byte image after writes to ``ranges``."""
    bits: set[int] = set()
    for off, n in ranges:
        if n > 0:
            bits.update(range(off // granularity, (off + n - 1) // granularity + 1))
    runs: list[Run] = []
    nbits = -(-size // granularity)
    for b in range(nbits):
        start, end = b * granularity, min(size, (b + 1) * granularity)
        dirty = b in bits
        if runs and runs[-1][2] == dirty:
            runs[-1] = (runs[-1][0], runs[-1][1] + end - start, dirty)
        else:
            runs.append((start, end - start, dirty))
    return runs


def dirty_ranges(runs: list[Run]) -> list[tuple[int, int]]:
    return [(o, n) for o, n, d in runs if d]


def bitmaps_of(path: Path, *, tool: str | None = None) -> list[dict[str, object]]:
    """The bitmaps qemu-img info lists (name, granularity, flags), as JSON."""
    out = run(tool or peer("qemu-img"), "info", "-U", "--output=json", path).stdout
    data = json.loads(out).get("format-specific", {}).get("data", {})
    return list(data.get("bitmaps", []))


def flags_of(path: Path) -> dict[str, list[str]]:
    return {str(b["name"]): list(b["flags"]) for b in bitmaps_of(path)}  # type: ignore[call-overload]


def check_clean(path: Path, *, tool: str | None = None) -> dict[str, object]:
    proc = run(tool or peer("qemu-img"), "check", "--output=json", path, check=False)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    rep: dict[str, object] = json.loads(proc.stdout)
    assert not rep.get("corruptions") and not rep.get("leaks") and not rep.get("check-errors"), rep
    return rep


def crash_qemu_writer(path: Path, *writes: str) -> None:
    """Leave the image's enabled bitmaps in use as QEMU leaves them when it dies: qemu-io opens the image
    read-write (setting in-use), writes, and is killed before it can store the bitmaps."""
    args = [peer("qemu-io"), "-f", "qcow2"]
    for w in writes:
        args += ["-c", w]
    args += ["-c", "sleep 60000", str(path)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            flags = flags_of(path)
            if any("in-use" in f for f in flags.values()):
                time.sleep(0.3)  # let the writes land too
                break
            time.sleep(0.05)
        else:
            raise AssertionError("qemu-io never set the in-use flag")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_released(path: Path, timeout: float = 20) -> None:
    """Wait until no writer holds ``path``: an NBD client exits before the server has closed the image
    (and stored its bitmaps) for it, as with qemu-nbd."""
    deadline = time.monotonic() + timeout
    while run(peer("qemu-img"), "info", path, check=False).returncode != 0:
        assert time.monotonic() < deadline, f"{path} is still held"
        time.sleep(0.05)
