"""The server keeps freed request buffers in the heap (nbdsrv.app.keep_request_buffers): bursts of 1 MiB
buffers, as eight 1 MiB WRITEs in flight make, must not fault their pages in again every time."""

from __future__ import annotations

import subprocess
import sys

_BURSTS = """
import resource, sys
import nbdsrv.app
if sys.argv[1] == "keep":
    nbdsrv.app.keep_request_buffers()

def burst():
    bufs = [bytearray(1 << 20) for _ in range(8)]
    del bufs

burst()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    burst()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _BURSTS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_freed_request_buffers_are_reused_without_page_faults() -> None:
    default, kept = _faults("default"), _faults("keep")
    # 50 bursts of 8 MiB are 102,400 pages: glibc's default maps and unmaps most of them every time
    assert default > 20_000, default
    assert kept < default // 20, (kept, default)
