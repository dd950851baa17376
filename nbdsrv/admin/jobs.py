"""Jobs: image operations run in warm worker processes, in QEMU's job model, with the job commands.

A job's life follows QEMU's JobStatus, and every change is announced with ``JOB_STATUS_CHANGE``::

    created -> running <-> paused
                 |
                 +-> (aborting) -> concluded -> null      (job-dismiss, or at once with auto-dismiss)

``aborting`` is passed through when the job fails or is cancelled; a concluded job keeps its ``error``
until it is dismissed. Pausing stops the worker process (SIGSTOP): the operation stops between two
instructions, not between two chunks, and holds its image locks while paused, which is what a paused
QEMU block job does too. Cancelling resumes a paused worker and asks the operation to stop at its next
safe point; a cancelled convert removes the target it was creating.

Short operations (image-info, image-map, image-check) use the same warm workers without becoming jobs:
the command waits for the answer, which a warm worker gives in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from imagecore.errors import BlockError, InvalidArgumentError, NotFoundError

from .table import AdminContext, command

log = logging.getLogger("nbdsrv.admin.jobs")

WORKER_MODULE = "nbdsrv.admin.worker"
# Concluded jobs kept for query-jobs until dismissed; beyond this many the oldest are dismissed.
MAX_CONCLUDED = 256
# How often JOB_STATUS_CHANGE may repeat a running job's progress, at most.
PROGRESS_EVENT_INTERVAL = 0.25


class WorkerError(BlockError):
    """An operation failed in the worker; carries the error class the worker answered with."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.json_class = error_class


class WorkerLostError(BlockError):
    """The worker process died under an operation (killed, or out of memory)."""


class WorkerProcess:
    """One warm worker: a child process and the JSON lines to and from it."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.busy = False
        self.stopped = False

    @classmethod
    async def start(cls) -> WorkerProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", WORKER_MODULE, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, limit=64 << 20)
        worker = cls(proc)
        msg = await worker._read()
        if msg is None or "ready" not in msg:
            await worker.kill()
            raise WorkerLostError("the job worker did not start")
        return worker

    async def _read(self) -> dict[str, Any] | None:
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            return None
        msg: dict[str, Any] = json.loads(line)
        return msg

    def _send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")

    async def run(self, op: str, args: dict[str, Any],
                  progress: Callable[[int, int], None] | None = None) -> Any:
        """Run ``op`` to its end; raises WorkerError with the worker's error, WorkerLostError if it dies."""
        self._send({"run": op, "args": args})
        while True:
            try:
                msg = await self._read()
            except ValueError:
                msg = None
            if msg is None:
                code = await self.proc.wait()
                why = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
                raise WorkerLostError(f"the job worker exited unexpectedly ({why})")
            if "progress" in msg:
                if progress is not None:
                    done, total = msg["progress"]
                    progress(int(done), int(total))
            elif "error" in msg:
                err = msg["error"]
                raise WorkerError(str(err.get("class", "GenericError")), str(err.get("desc", "")))
            elif "return" in msg:
                return msg["return"]

    def cancel(self) -> None:
        self.resume()
        with contextlib.suppress(OSError, RuntimeError, AttributeError):
            self._send({"cancel": True})

    def pause(self) -> None:
        if not self.stopped:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGSTOP)
            self.stopped = True

    def resume(self) -> None:
        if self.stopped:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
            self.stopped = False

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def close(self, timeout: float = 5.0) -> None:
        """End the worker: EOF on its stdin lets it finish; a worker that does not is killed."""
        self.resume()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            await self.kill()

    async def kill(self) -> None:
        self.resume()
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()


class WorkerPool:
    """Warm workers: ``warm`` idle ones kept ready, up to ``limit`` running at once."""

    def __init__(self, *, warm: int = 2, limit: int | None = None) -> None:
        self.warm = warm
        self.limit = limit or max(2, os.cpu_count() or 2)
        self._idle: list[WorkerProcess] = []
        self._running = 0
        self._free = asyncio.Condition()
        self._closed = False
        self._filling: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._refill()

    async def _fill(self) -> None:
        while (not self._closed and len(self._idle) < self.warm
               and self._running + len(self._idle) < self.limit):
            try:
                worker = await WorkerProcess.start()
            except (OSError, BlockError) as exc:
                log.error("cannot start a job worker", extra={"error": str(exc)})
                return
            if self._closed:
                await worker.close()
                return
            self._idle.append(worker)

    def _refill(self) -> None:
        if self._filling is None or self._filling.done():
            self._filling = asyncio.get_running_loop().create_task(self._fill())

    @contextlib.asynccontextmanager
    async def worker(self) -> Any:
        """A worker for one operation; one that died or was abandoned under it is not reused."""
        async with self._free:
            await self._free.wait_for(lambda: self._closed or self._running < self.limit)
            if self._closed:
                raise BlockError("the server is shutting down")
            self._running += 1
        worker: WorkerProcess | None = None
        try:
            while self._idle and worker is None:
                cand = self._idle.pop()
                if cand.alive:
                    worker = cand
            if worker is None:
                worker = await WorkerProcess.start()
            self._refill()
            yield worker
        except WorkerError:
            raise  # the worker answered with an error: it is idle again and fit for the next operation
        except BaseException:
            # lost, or abandoned mid-operation (its caller was cancelled): it cannot be trusted to be idle
            if worker is not None:
                await worker.kill()
                worker = None
            raise
        finally:
            if worker is not None:
                if worker.alive and not self._closed and len(self._idle) < self.warm:
                    self._idle.append(worker)
                else:
                    await worker.close()
            async with self._free:
                self._running -= 1
                self._free.notify_all()

    async def close(self) -> None:
        self._closed = True
        async with self._free:
            self._free.notify_all()
        if self._filling is not None:
            self._filling.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._filling
        idle, self._idle = self._idle, []
        await asyncio.gather(*(w.close() for w in idle), return_exceptions=True)


class JobStatus(enum.Enum):
    """QEMU's JobStatus names, of which these jobs use the ones listed in the module docstring."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


# What each job verb may be applied to, by status (QEMU's JobVerb table, for the verbs offered here).
VERBS: dict[str, frozenset[JobStatus]] = {
    "cancel": frozenset({JobStatus.CREATED, JobStatus.RUNNING, JobStatus.PAUSED}),
    "pause": frozenset({JobStatus.CREATED, JobStatus.RUNNING, JobStatus.PAUSED}),
    "resume": frozenset({JobStatus.CREATED, JobStatus.RUNNING, JobStatus.PAUSED}),
    "dismiss": frozenset({JobStatus.CONCLUDED}),
}


class JobStateError(InvalidArgumentError):
    """A job verb the job's status does not allow."""


@dataclass(slots=True)
class Job:
    id: str
    type: str
    status: JobStatus = JobStatus.CREATED
    current: int = 0
    total: int = 1
    error: str | None = None
    result: Any = None
    auto_dismiss: bool = False
    worker: WorkerProcess | None = None
    cancelled: bool = False
    pause_requested: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    last_event: float = 0.0
    created: float = field(default_factory=time.time)

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"id": self.id, "type": self.type, "status": self.status.value,
                               "current-progress": self.current, "total-progress": self.total}
        if self.error is not None:
            rec["error"] = self.error
        if self.result is not None and self.status is JobStatus.CONCLUDED:
            rec["result"] = self.result
        return rec


# A job's body: runs the operation on the worker it is given, returns the job's result.
JobBody = Callable[[WorkerProcess, Callable[[int, int], None]], Awaitable[Any]]
# Undo on failure or cancellation (a partial target volume, for example).
Cleanup = Callable[[], Awaitable[None]]


class JobManager:
    """Every job of the server, and the warm workers they and the short operations run on."""

    def __init__(self, emit: Callable[[str, dict[str, Any] | None], None], *, warm: int = 2,
                 limit: int | None = None) -> None:
        self.emit = emit
        self.pool = WorkerPool(warm=warm, limit=limit)
        self.jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)

    def start(self) -> None:
        self.pool.start()

    async def call(self, op: str, args: dict[str, Any]) -> Any:
        """Run a short operation on a warm worker and return its answer (no job)."""
        async with self.pool.worker() as worker:
            return await worker.run(op, args)

    def new_id(self, wanted: str | None) -> str:
        if wanted is not None:
            if not wanted or len(wanted) > 128 or any(c.isspace() for c in wanted):
                raise InvalidArgumentError(f"Invalid job ID '{wanted}'")
            live = self.jobs.get(wanted)
            if live is not None:
                raise InvalidArgumentError(f"Job ID '{wanted}' already in use")
            return wanted
        while True:
            jid = f"job{next(self._ids)}"
            if jid not in self.jobs:
                return jid

    def submit(self, job_type: str, body: JobBody, *, job_id: str | None = None, auto_dismiss: bool = False,
               cleanup: Cleanup | None = None) -> Job:
        job = Job(self.new_id(job_id), job_type, auto_dismiss=auto_dismiss)
        self.jobs[job.id] = job
        self._status(job, JobStatus.CREATED)
        job.task = asyncio.get_running_loop().create_task(self._run(job, body, cleanup))
        return job

    def _status(self, job: Job, status: JobStatus) -> None:
        job.status = status
        job.last_event = time.monotonic()
        self.emit("JOB_STATUS_CHANGE", {"id": job.id, "status": status.value,
                                        "current-progress": job.current, "total-progress": job.total})

    def _progress(self, job: Job) -> Callable[[int, int], None]:
        def update(done: int, total: int) -> None:
            # progress never goes backwards, whatever the operation reports
            job.total = max(total, 1)
            job.current = min(max(job.current, done), job.total)
            now = time.monotonic()
            if job.status is JobStatus.RUNNING and (now - job.last_event >= PROGRESS_EVENT_INTERVAL):
                self._status(job, JobStatus.RUNNING)
        return update

    async def _run(self, job: Job, body: JobBody, cleanup: Cleanup | None) -> None:
        try:
            async with self.pool.worker() as worker:
                job.worker = worker
                if job.cancelled:
                    raise asyncio.CancelledError
                self._status(job, JobStatus.RUNNING)
                if job.pause_requested:
                    self.pause(job.id)
                try:
                    job.result = await body(worker, self._progress(job))
                finally:
                    job.worker = None
            job.current = job.total
        except (BlockError, asyncio.CancelledError) as exc:
            job.error = "Job was cancelled" if job.cancelled else str(exc) or type(exc).__name__
        except Exception as exc:  # the edge: a job fails with an error, the server keeps serving
            log.exception("job failed", extra={"job": job.id})
            job.error = f"internal error: {type(exc).__name__}: {exc}"
        if job.error is not None:
            self._status(job, JobStatus.ABORTING)
            if cleanup is not None:
                try:
                    await cleanup()
                except (OSError, BlockError) as cexc:
                    log.error("job cleanup failed", extra={"job": job.id, "error": str(cexc)})
        self._status(job, JobStatus.CONCLUDED)
        job.done.set()
        if job.auto_dismiss:
            self._dismiss(job)
        self._forget_old()

    def _forget_old(self) -> None:
        """Dismiss the oldest concluded jobs beyond MAX_CONCLUDED, so that jobs nobody dismisses cannot
        grow the server's memory without bound."""
        done = [j for j in self.jobs.values() if j.status is JobStatus.CONCLUDED]
        for job in done[:max(0, len(done) - MAX_CONCLUDED)]:
            self._dismiss(job)

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"Job ID '{job_id}' not found")
        return job

    def _verb(self, job_id: str, verb: str) -> Job:
        job = self.get(job_id)
        if job.status not in VERBS[verb]:
            raise JobStateError(f"Job '{job.id}' in state '{job.status.value}' cannot accept command verb "
                                f"'{verb}'")
        return job

    def cancel(self, job_id: str) -> None:
        job = self._verb(job_id, "cancel")
        job.cancelled = True
        if job.worker is not None:
            job.worker.cancel()
        elif job.task is not None:
            job.task.cancel()  # still waiting for a worker

    def pause(self, job_id: str) -> None:
        job = self._verb(job_id, "pause")
        job.pause_requested = True
        if job.worker is not None and job.status is JobStatus.RUNNING:
            job.worker.pause()
            self._status(job, JobStatus.PAUSED)

    def resume(self, job_id: str) -> None:
        job = self._verb(job_id, "resume")
        job.pause_requested = False
        if job.worker is not None and job.status is JobStatus.PAUSED:
            job.worker.resume()
            self._status(job, JobStatus.RUNNING)

    def dismiss(self, job_id: str) -> None:
        self._dismiss(self._verb(job_id, "dismiss"))

    def _dismiss(self, job: Job) -> None:
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]
            self._status(job, JobStatus.NULL)

    def counts(self) -> dict[str, int]:
        """Jobs by status, for the metrics."""
        out = {s.value: 0 for s in JobStatus if s is not JobStatus.NULL}
        for job in self.jobs.values():
            out[job.status.value] += 1
        return out

    async def close(self) -> None:
        """Cancel what runs (so partial targets are removed), then stop the workers."""
        for job in list(self.jobs.values()):
            if job.status in VERBS["cancel"]:
                self.cancel(job.id)
        tasks = [j.task for j in self.jobs.values() if j.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        await self.pool.close()


# -- the job commands -------------------------------------------------------------------------------------

def jobs_of(ctx: AdminContext) -> JobManager:
    if not isinstance(ctx.jobs, JobManager):
        raise BlockError("this server runs no job workers")
    return ctx.jobs


@dataclass(frozen=True, slots=True)
class JobIdArg:
    id: str


@dataclass(frozen=True, slots=True)
class JobWaitArgs:
    id: str
    timeout: float | None = None


@command("query-jobs", returns="`[{id, type, status, current-progress, total-progress, error?, result?}]`")
async def query_jobs(ctx: AdminContext, _: None) -> Any:
    """Every job that has not been dismissed, as QEMU's query-jobs lists them (a concluded job also
    carries its result)."""
    return [job.record() for job in jobs_of(ctx).jobs.values()]


@command("job-cancel", args=JobIdArg)
async def job_cancel(ctx: AdminContext, args: JobIdArg) -> Any:
    """Cancel a job: it stops at its next safe point and removes what it had created (a convert's
    target); it concludes with the error "Job was cancelled"."""
    jobs_of(ctx).cancel(args.id)
    return {}


@command("job-pause", args=JobIdArg)
async def job_pause(ctx: AdminContext, args: JobIdArg) -> Any:
    """Pause a running job (its worker process is stopped; its image locks stay held)."""
    jobs_of(ctx).pause(args.id)
    return {}


@command("job-resume", args=JobIdArg)
async def job_resume(ctx: AdminContext, args: JobIdArg) -> Any:
    """Resume a paused job."""
    jobs_of(ctx).resume(args.id)
    return {}


@command("job-dismiss", args=JobIdArg)
async def job_dismiss(ctx: AdminContext, args: JobIdArg) -> Any:
    """Forget a concluded job (its status becomes null and it leaves query-jobs)."""
    jobs_of(ctx).dismiss(args.id)
    return {}


@command("job-wait", args=JobWaitArgs, returns="the job's query-jobs record")
async def job_wait(ctx: AdminContext, args: JobWaitArgs) -> Any:
    """Wait until a job has concluded (or `timeout` seconds have passed, which is an error) and return its
    record; the job stays until it is dismissed. Other clients are not held up meanwhile."""
    job = jobs_of(ctx).get(args.id)
    if args.timeout is not None and args.timeout < 0:
        raise InvalidArgumentError("Parameter 'timeout' must not be negative")
    try:
        await asyncio.wait_for(job.done.wait(), args.timeout)
    except TimeoutError:
        raise BlockError(f"Job '{job.id}' has not concluded after {args.timeout} seconds") from None
    return job.record()


__all__ = ["Job", "JobManager", "JobStatus", "WorkerError", "WorkerLostError", "WorkerPool", "WorkerProcess"]
