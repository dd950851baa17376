"""The job worker: a separate process that runs imagecore's offline verbs for the admin socket.

The server never runs a verb in its own process: convert and check are CPU-heavy, and under the GIL a
thread of the server doing them would stall every NBD client. Workers are started warm (imagecore and its
formats already imported) and run one operation at a time, at a lower CPU priority than the server.

The conversation with the server is JSON lines on the worker's stdin and stdout::

    server: {"run": "convert", "args": {...}}
    worker: {"progress": [done, total]}          (any number, at most every 50 ms)
    worker: {"return": ...}  or  {"error": {"class": ..., "desc": ...}}
    server: {"cancel": true}                     (at any time while an operation runs)

Every image is opened through a pool's opener, so a worker can no more leave the pool than the server.
A lock conflict (the image exported read-write, or held by QEMU) is answered with the class ``Busy``.
EOF on stdin ends the worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from imagecore.errors import BlockError, BusyError, ImageLockedError
from imagecore.hostio import inline_io
from imagecore.ops import amend as amend_op
from imagecore.ops import bitmap as bitmap_op
from imagecore.ops import check as check_op
from imagecore.ops import commit as commit_op
from imagecore.ops import compare as compare_op
from imagecore.ops import convert as convert_op
from imagecore.ops import create as create_op
from imagecore.ops import info as info_op
from imagecore.ops import map as map_op
from imagecore.ops import measure as measure_op
from imagecore.ops import rebase as rebase_op
from imagecore.ops import resize as resize_op
from imagecore.ops import snapshot as snapshot_op

from ..formats import image_formats
from ..pools import PoolOpener

Progress = Callable[[int, int], None]
Op = Callable[[dict[str, Any], Progress, asyncio.Event], Awaitable[Any]]

# How often a running operation reports progress: often enough for a smooth bar, rare enough to cost nothing.
PROGRESS_INTERVAL = 0.05


def _opener(args: dict[str, Any], *, force_share: bool = False) -> PoolOpener:
    # "root" is one pool's root, or several for an operation between pools
    opener = PoolOpener(args["root"], lock=True)
    opener.force_share = force_share
    return opener


async def op_info(args: dict[str, Any], progress: Progress, cancel: asyncio.Event) -> Any:
    # reading metadata is safe while a VM or a client writes the image, as qemu-img info -U is
    res = await info_op.info(args["path"], args.get("format"), opener=_opener(args, force_share=True),
                             backing_chain=bool(args.get("backing-chain")), force_share=True)
    return res.to_json()


async def op_backing(args: dict[str, Any], progress: Progress, cancel: asyncio.Event) -> Any:
    """The resolved backing file of each image (None for none, or for an image that does not open)."""
    out: list[str | None] = []
    for path, fmt in args["images"]:
        try:
            res = await info_op.info(path, fmt, opener=_opener(args, force_share=True), force_share=True)
        except BlockError:
            out.append(None)
            continue
        out.append(res.images[0].get("full-backing-filename"))
    return out


async def op_check(args: dict[str, Any], progress: Progress, cancel: asyncio.Event) -> Any:
    report = await check_op.check(args["path"], args.get("format"), opener=_opener(args),
                                  repair=args.get("repair"), progress=progress, cancel=cancel)
    if report.error is not None and report.result is None:
        raise BlockError(report.error)
    out: dict[str, Any] = report.to_json()
    out["exit-code"] = report.exit_code
    out["leaks-fixed"], out["corruptions-fixed"] = report.fixed[0], report.fixed[1]
    if report.messages:
        out["messages"] = list(report.messages)
    return out


async def op_map(args: dict[str, Any], progress: Progress, cancel: asyncio.Event) -> Any:
    limit = int(args["max-entries"])  # the server's bound on one answer (images.py)
    entries: list[dict[str, Any]] = []
    async with map_op.open_map(args["path"], args.get("format"), opener=_opener(args, force_share=True),
                               start=int(args.get("start", 0)), max_length=args.get("max-length"),
                               force_share=True) as it:
        async for e in it:
            entries.append(e.to_json())
            if cancel.is_set() or len(entries) >= limit:
                break
    return entries


async def op_create(args: dict[str, Any], progress: Progress, cancel: asyncio.Event) -> Any:
    res = await create_op.create(args["path"], args["format"], args.get("size"),
                                 dict(args.get("options", {})), backing=args.get("backing"),
                                 backing_fmt=args.get("backing-format"), opener=_opener(args))
    return {"path": res.path, "format": res.format, "size": res.size, "formatting": res.formatting}


async def op_convert(args: dict[str, Any], progress: Progress, cancel: asyncio.Event) -> Any:
    o = convert_op.ConvertOptions(sources=[args["source"]], target=args["target"],
                                  src_fmt=args.get("source-format"), out_fmt=args["format"],
                                  options=dict(args.get("options", {})), quiet=True,
                                  # a job's volume is durable once the job concludes: the final flush
                                  # syncs (qemu-img's default, unsafe, would skip it)
                                  cache="writeback")
    stats = await convert_op.convert(o, opener=_opener(args), progress=progress, cancel=cancel)
    return {"total": stats.total, "bytes-read": stats.bytes_read, "bytes-written": stats.bytes_written,
            "bytes-zeroed": stats.bytes_zeroed, "seconds": round(stats.seconds, 3)}


async def op_resize(args: dict[str, Any], progress: Progress, cancel: asyncio.Event) -> Any:
    res = await resize_op.resize(args["path"], args.get("format"), int(args["size"]), opener=_opener(args),
                                 shrink=bool(args.get("shrink")))
    return {"old-size": res.old_size, "size": res.size}


async def op_snapshot(args: dict[str, Any], progress: Progress, cancel: asyncio.Event) -> Any:
    action = args.get("action")
    res = await snapshot_op.snapshot(args["path"], action, args.get("name"),
                                     opener=_opener(args, force_share=action == "list"),
                                     force_share=action == "list")
    return res.snapshots


async def op_bitmap(args: dict[str, Any], progress: Progress, cancel: asyncio.Event) -> Any:
    actions = [bitmap_op.BitmapAction(a["action"], a.get("source")) for a in args["actions"]]
    res = await bitmap_op.bitmap(args["path"], args["name"], actions, fmt=args.get("format"),
                                 granularity=args.get("granularity"), source_file=args.get("source-path"),
                                 source_fmt=args.get("source-format"), opener=_opener(args),
                                 progress=progress, cancel=cancel)
    return res.bitmaps


async def op_compare(args: dict[str, Any], progress: Progress, cancel: asyncio.Event) -> Any:
    # a read safe to share, as compare -U: the verdict is about the moment it ran
    res = await compare_op.compare(args["path"], args["path2"], args.get("format"), args.get("format2"),
                                   strict=bool(args.get("strict")), opener=_opener(args, force_share=True),
                                   force_share=True, progress=progress, cancel=cancel)
    out: dict[str, Any] = {"identical": res.identical, "size1": res.size1, "size2": res.size2,
                           "size-mismatch": res.size_mismatch, "message": " ".join(res.lines())}
    if res.offset is not None:
        out["offset"] = res.offset
    return out


async def op_measure(args: dict[str, Any], progress: Progress, cancel: asyncio.Event) -> Any:
    res = await measure_op.measure(args["target-format"], dict(args.get("options", {})),
                                   size=args.get("size"), path=args.get("path"), fmt=args.get("format"),
                                   opener=_opener(args, force_share=True), force_share=True,
                                   progress=progress, cancel=cancel)
    return res.to_json()


async def op_rebase(args: dict[str, Any], progress: Progress, cancel: asyncio.Event) -> Any:
    res = await rebase_op.rebase(args["path"], args.get("format"), args.get("backing"),
                                 args.get("backing-format"), unsafe=bool(args.get("unsafe")),
                                 compress=bool(args.get("compress")), opener=_opener(args),
                                 progress=progress, cancel=cancel)
    return {"bytes-copied": res.bytes_copied, "bytes-zeroed": res.bytes_zeroed}


async def op_amend(args: dict[str, Any], progress: Progress, cancel: asyncio.Event) -> Any:
    def status(done: int, total: int) -> None:
        if total:  # (0, 0) marks where qemu-img prints its first 0 %: nothing to report here
            progress(done, total)

    res = await amend_op.amend(args["path"], args.get("format"), args["options"], opener=_opener(args),
                               progress=status, cancel=cancel)
    return {"format": res.format}


async def op_commit(args: dict[str, Any], progress: Progress, cancel: asyncio.Event) -> Any:
    # a job's commit is durable once it concludes: the base is flushed before the top is emptied
    res = await commit_op.commit(args["path"], args.get("format"), base=args.get("base"),
                                 drop=bool(args.get("drop")), rate_limit=int(args.get("rate-limit") or 0),
                                 opener=_opener(args), progress=progress, cancel=cancel)
    return {"base": res.base, "depth": res.depth, "bytes-copied": res.copied, "bytes-zeroed": res.zeroed,
            "base-size": res.base_size, "base-grown-to": res.base_grown_to, "emptied": res.emptied,
            "seconds": round(res.seconds, 3)}


OPS: dict[str, Op] = {
    "info": op_info, "backing": op_backing, "check": op_check, "map": op_map, "create": op_create,
    "convert": op_convert, "resize": op_resize, "snapshot": op_snapshot, "compare": op_compare,
    "measure": op_measure, "rebase": op_rebase, "amend": op_amend, "bitmap": op_bitmap, "commit": op_commit,
}


class Worker:
    """Reads requests from stdin, runs one operation at a time, writes its answers to stdout."""

    def __init__(self) -> None:
        self.cancel = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._last = 0.0
        self.gone = False

    def send(self, msg: dict[str, Any]) -> None:
        if self.gone:
            return
        try:
            sys.stdout.write(json.dumps(msg) + "\n")
            sys.stdout.flush()
        except OSError:
            # The server is gone (it stopped, or was killed): nobody is left to answer. Stop the
            # operation and make the interpreter's own flush at exit harmless.
            self.gone = True
            self.cancel.set()
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    def progress(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < PROGRESS_INTERVAL:
            return
        self._last = now
        self.send({"progress": [done, total]})

    async def run(self, name: str, args: dict[str, Any]) -> None:
        op = OPS.get(name)
        try:
            if op is None:
                raise BlockError(f"the worker has no operation '{name}'")
            result = await op(args, self.progress, self.cancel)
        except ImageLockedError as exc:
            self.send({"error": {"class": BusyError.json_class, "desc": str(exc)}})
        except BlockError as exc:
            self.send({"error": {"class": exc.json_class, "desc": str(exc)}})
        except Exception as exc:  # the edge: the server gets an error object, never a dead worker
            why = f"internal error: {type(exc).__name__}: {exc}"
            self.send({"error": {"class": "GenericError", "desc": why}})
        else:
            self.send({"return": result})

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=16 << 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        self.send({"ready": os.getpid()})
        while not self.gone:
            line = await reader.readline()
            if not line:
                break
            msg = json.loads(line)
            if "cancel" in msg:
                self.cancel.set()
            elif "run" in msg:
                if self.task is not None:
                    await self.task
                self.cancel = asyncio.Event()
                self.task = loop.create_task(self.run(str(msg["run"]), dict(msg.get("args", {}))))
        if self.task is not None:
            self.cancel.set()
            await self.task


def main() -> int:
    image_formats()  # the formats the jobs open, registered as in the server
    # Interrupts are the server's to handle: a Ctrl-C in its terminal must not kill a job half-way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Its stderr is the server's: in the server's log format (which the server put in the environment),
    # so that a warning or an exception that should never happen is still one record of the server's log.
    fmt = os.environ.get("NBDSRV_LOG_FORMAT")
    if fmt in ("logfmt", "json"):
        from ..log import setup_logging

        setup_logging(os.environ.get("NBDSRV_LOG_LEVEL") or "info", fmt)
    try:
        os.nice(int(os.environ.get("NBDSRV_WORKER_NICE", "10")))
    except OSError:
        pass
    with inline_io():  # one job at a time on this loop: its I/O is done inline
        try:
            import uvloop

            uvloop.run(Worker().serve())
        except ImportError:
            asyncio.run(Worker().serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
