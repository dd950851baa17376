"""Fault injection: a HostFile that fails a chosen write, read or fdatasync with EIO or ENOSPC.

``FaultPlan`` is shared by every ``FaultyHostFile`` an opener hands out (the image, its backing files, its
data file). It records each host operation in order, and fails the ones it is armed for: by kind and
ordinal ("the 3rd write after arming"), every operation of a kind, or the n-th operation of any kind, which
is how a test walks every step of an allocating write (record the sequence once, then fail each step in
turn on a fresh copy of the image).

An injected fault behaves as the kernel's does: the operation raises ``OSError(errno)`` where the real one
would (in the blocking primitive, on the worker thread), nothing of a failed write, truncate or fallocate
reaches the file, and a failed fdatasync is reported once; the next one succeeds, as Linux's does after a
writeback error (the pages stay in the real file's cache here, so a failed sync loses nothing by itself).
Reads always take the thread-pool path (``read_nowait`` serves nothing) so that the sequence of operations
does not depend on what the page cache holds.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from imagecore.driver import ImageOpener
from imagecore.hostio import HostFile

KINDS = ("write", "read", "sync", "truncate", "fallocate")


@dataclass(frozen=True, slots=True)
class Op:
    """One host operation as the plan saw it."""

    kind: str
    path: str
    offset: int
    length: int
    failed: bool = False


@dataclass(slots=True)
class _Rule:
    kind: str  # one of KINDS, or "any"
    nth: int  # 1-based, counted from arming; 0 means every operation of the kind
    code: int
    seen: int = 0


class FaultPlan:
    """The record of host operations and the faults armed against them (thread-safe)."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()

    def arm(self, kind: str, nth: int = 1, code: int = errno.EIO) -> None:
        """Fail the ``nth`` operation of ``kind`` from now on (``nth=0``: every one); ``kind`` may be "any".
        """
        if kind not in KINDS and kind != "any":
            raise ValueError(f"unknown operation kind {kind!r}")
        with self._lock:
            self._rules.append(_Rule(kind, nth, code))

    def disarm(self) -> None:
        with self._lock:
            self._rules.clear()

    def mark(self) -> int:
        """The number of operations recorded so far, to slice :attr:`ops` by."""
        with self._lock:
            return len(self.ops)

    @property
    def faults(self) -> list[Op]:
        with self._lock:
            return [op for op in self.ops if op.failed]

    def check(self, kind: str, path: str, offset: int, length: int) -> None:
        """Record an operation; raise ``OSError`` when a rule says it fails."""
        with self._lock:
            code = 0
            for r in self._rules:
                if r.kind not in (kind, "any"):
                    continue
                r.seen += 1
                if (r.nth == 0 or r.seen == r.nth) and not code:
                    code = r.code
            self.ops.append(Op(kind, path, offset, length, bool(code)))
        if code:
            raise OSError(code, os.strerror(code))


class FaultyHostFile(HostFile):
    """A HostFile whose blocking primitives go through a FaultPlan first (the seam HostFile documents)."""

    plan: FaultPlan

    def __init__(self, fd: int, path: str, *, read_only: bool) -> None:
        super().__init__(fd, path, read_only=read_only)
        self.plan = FaultPlan()

    def read_nowait(self, offset: int, buf: memoryview) -> int:
        return 0  # deterministic: every read is one _read_full, whatever the page cache holds

    def _read_full(self, offset: int, buf: memoryview) -> int:
        self.plan.check("read", self.path, offset, len(buf))
        return super()._read_full(offset, buf)

    def _write_full(self, offset: int, bufs: Sequence[bytes | bytearray | memoryview]) -> None:
        self.plan.check("write", self.path, offset, sum(memoryview(b).nbytes for b in bufs))
        super()._write_full(offset, bufs)

    def _datasync(self) -> None:
        self.plan.check("sync", self.path, 0, 0)
        super()._datasync()

    def _truncate_blocking(self, size: int) -> None:
        self.plan.check("truncate", self.path, size, 0)
        super()._truncate_blocking(size)

    def _fallocate_blocking(self, mode: int, offset: int, length: int) -> None:
        self.plan.check("fallocate", self.path, offset, length)
        super()._fallocate_blocking(mode, offset, length)


class FaultOpener(ImageOpener):
    """An ImageOpener whose files are FaultyHostFiles sharing one plan."""

    def __init__(self, plan: FaultPlan | None = None, **kwargs: bool) -> None:
        super().__init__(**kwargs)
        self.plan = plan if plan is not None else FaultPlan()

    def host_file(self, path: str, *, read_only: bool) -> HostFile:
        hf = FaultyHostFile.open(path, read_only=read_only)
        assert isinstance(hf, FaultyHostFile)
        hf.plan = self.plan
        return hf


__all__ = ["KINDS", "FaultOpener", "FaultPlan", "FaultyHostFile", "Op"]
