"""Power loss: a HostFile that keeps every change since the last fdatasync apart from what is durable.

kill -9 keeps the page cache, so it never tests write ordering. This double applies every write, truncate
and fallocate to the real file (the *volatile* view, what the driver reads back) and also records it as
*pending* against a copy of the file's *durable* contents. At each ``_datasync``, before the sync takes
effect, the plan offers a :class:`CutPoint` to the test's checker: the durable contents plus the pending
operations, any subset of which a power cut may have kept (the kernel writes dirty pages back in any order).
After the sync the pending operations join the durable contents.

:func:`keep_sets` chooses the subsets to materialise: every one when there are few, else the all-dropped
and all-kept ones, each in-order prefix, and random ones drawn from a fixed seed. With ``tear`` set, writes
are recorded in ``tear``-byte aligned pieces, so a cut may also keep part of one write (torn sectors).
"""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from imagecore.driver import ImageOpener
from imagecore.hostio import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, HostFile


@dataclass(frozen=True, slots=True)
class PendingOp:
    """One change not yet covered by an fdatasync: ``write`` (data at offset), ``truncate`` (offset is the
    new size) or ``fallocate`` (mode, offset, length)."""

    kind: str
    offset: int
    data: bytes = b""
    length: int = 0
    mode: int = 0


def apply_op(img: bytearray, op: PendingOp) -> None:
    """What ``op`` does to a file's contents."""
    if op.kind == "write":
        end = op.offset + len(op.data)
        if end > len(img):
            img.extend(bytes(end - len(img)))
        img[op.offset:end] = op.data
    elif op.kind == "truncate":
        if op.offset < len(img):
            del img[op.offset:]
        else:
            img.extend(bytes(op.offset - len(img)))
    elif op.kind == "fallocate":
        end = op.offset + op.length
        if not op.mode & FALLOC_FL_KEEP_SIZE and end > len(img):
            img.extend(bytes(end - len(img)))
        if op.mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            stop = min(end, len(img))
            if stop > op.offset:
                img[op.offset:stop] = bytes(stop - op.offset)
    else:
        raise ValueError(f"unknown operation {op.kind!r}")


@dataclass(slots=True)
class CutPoint:
    """The state a power cut at one sync boundary may leave a file in."""

    label: str
    path: str
    durable: bytes
    pending: tuple[PendingOp, ...]
    # what the test says must survive: opaque to the plan, set through PowerLossPlan.expect
    expect: object

    def materialise(self, keep: Sequence[bool]) -> bytes:
        img = bytearray(self.durable)
        for op, k in zip(self.pending, keep, strict=True):
            if k:
                apply_op(img, op)
        return bytes(img)


def keep_sets(n: int, *, exhaustive: int = 64, samples: int = 24,
              seed: int = 0) -> Iterator[tuple[bool, ...]]:
    """Which of ``n`` pending operations a cut keeps: all 2**n choices when that is at most ``exhaustive``,
    else none, all, every in-order prefix and ``samples`` random choices (fixed seed: reproducible)."""
    if 2 ** n <= exhaustive:
        yield from itertools.product((False, True), repeat=n)
        return
    seen: set[tuple[bool, ...]] = set()
    rng = random.Random(seed * 1000003 + n)
    choices = [tuple(i < k for i in range(n)) for k in range(n + 1)]
    choices += [tuple(rng.random() < 0.5 for _ in range(n)) for _ in range(samples)]
    for c in choices:
        if c not in seen:
            seen.add(c)
            yield c


@dataclass(slots=True)
class _FileState:
    durable: bytearray
    pending: list[PendingOp] = field(default_factory=list)


Checker = Callable[[CutPoint], None]


class PowerLossPlan:
    """Shared by every writable file an opener hands out; calls ``checker`` at each sync boundary."""

    def __init__(self, checker: Checker, *, tear: int | None = None) -> None:
        self.checker = checker
        self.tear = tear
        self.files: dict[str, _FileState] = {}
        self.expect: object = None
        self.boundaries = 0
        self.label = ""
        self._lock = threading.Lock()
        # held across a change to the real file and its record, so both see changes in one order
        self.io_lock = threading.Lock()

    def attach(self, path: str, fd: int) -> None:
        """Take the file's present contents as durable (the image was created and synced before)."""
        import os

        size = os.fstat(fd).st_size
        with self._lock:
            if path not in self.files:
                self.files[path] = _FileState(bytearray(os.pread(fd, size, 0) if size else b""))

    def record(self, path: str, op: PendingOp) -> None:
        with self._lock:
            st = self.files[path]
            if op.kind == "write" and self.tear and len(op.data) > self.tear:
                t = self.tear
                pos = op.offset
                end = op.offset + len(op.data)
                while pos < end:
                    nxt = min((pos // t + 1) * t, end)
                    st.pending.append(PendingOp("write", pos, op.data[pos - op.offset:nxt - op.offset]))
                    pos = nxt
            else:
                st.pending.append(op)

    def cut(self, path: str, label: str | None = None) -> None:
        """Offer the state of ``path`` at this moment to the checker."""
        with self._lock:
            st = self.files[path]
            point = CutPoint(label or self.label, path, bytes(st.durable), tuple(st.pending), self.expect)
            self.boundaries += 1
        self.checker(point)

    def synced(self, path: str) -> None:
        with self._lock:
            st = self.files[path]
            for op in st.pending:
                apply_op(st.durable, op)
            st.pending.clear()


class PowerLossHostFile(HostFile):
    """A HostFile that reports its writes, size changes and syncs to a PowerLossPlan."""

    plan: PowerLossPlan

    def __init__(self, fd: int, path: str, *, read_only: bool) -> None:
        super().__init__(fd, path, read_only=read_only)

    def _write_full(self, offset: int, bufs: Sequence[bytes | bytearray | memoryview]) -> None:
        data = b"".join(bytes(memoryview(b).cast("B")) for b in bufs)
        with self.plan.io_lock:
            super()._write_full(offset, [data])
            self.plan.record(self.path, PendingOp("write", offset, data))

    def _truncate_blocking(self, size: int) -> None:
        with self.plan.io_lock:
            super()._truncate_blocking(size)
            self.plan.record(self.path, PendingOp("truncate", size))

    def _fallocate_blocking(self, mode: int, offset: int, length: int) -> None:
        with self.plan.io_lock:
            super()._fallocate_blocking(mode, offset, length)
            self.plan.record(self.path, PendingOp("fallocate", offset, length=length, mode=mode))

    def _datasync(self) -> None:
        with self.plan.io_lock:
            self.plan.cut(self.path)
            super()._datasync()
            self.plan.synced(self.path)


class PowerLossOpener(ImageOpener):
    """An ImageOpener whose writable files are PowerLossHostFiles of one plan (read-only ones are plain)."""

    def __init__(self, plan: PowerLossPlan, **kwargs: bool) -> None:
        super().__init__(**kwargs)
        self.plan = plan

    def open_file(self, path: str, *, read_only: bool) -> HostFile:
        if read_only:
            return super().open_file(path, read_only=True)
        from imagecore.filenames import host_file_of, is_special

        if is_special(path):
            # an --image-opts or json: name edited in place: the file it names, as ImageOpener does
            path = host_file_of(path) or path
        hf = PowerLossHostFile.open(path, read_only=False)
        assert isinstance(hf, PowerLossHostFile)
        hf.plan = self.plan
        hf.sync_enabled = True  # every sync is a boundary, whatever the opener's cache mode
        self.plan.attach(path, hf.fd)
        return hf


__all__ = ["CutPoint", "PendingOp", "PowerLossHostFile", "PowerLossOpener", "PowerLossPlan", "apply_op",
           "keep_sets"]
