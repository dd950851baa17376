"""The job manager with real worker processes: QEMU's verb rules by status, progress that never goes
backwards, and concluded jobs that cannot pile up without bound."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from imagecore.errors import InvalidArgumentError, NotFoundError
from nbdsrv.admin.jobs import MAX_CONCLUDED, JobManager, WorkerProcess


def test_verbs_progress_and_the_bound_on_concluded_jobs() -> None:
    events: list[tuple[str, dict[str, Any] | None]] = []

    async def main() -> None:
        jobs = JobManager(lambda name, data: events.append((name, data)), warm=1, limit=1)
        jobs.start()
        try:
            gate = asyncio.Event()

            async def held(worker: WorkerProcess, progress: Any) -> Any:
                progress(10, 100)
                progress(5, 100)  # a report that goes backwards is ignored
                await gate.wait()
                return {"ok": True}

            job = jobs.submit("test", held, job_id="held")
            with pytest.raises(InvalidArgumentError, match="already in use"):
                jobs.submit("test", held, job_id="held")
            with pytest.raises(InvalidArgumentError, match="cannot accept command verb 'dismiss'"):
                jobs.dismiss("held")
            while job.current != 10:
                await asyncio.sleep(0.01)
            gate.set()
            await job.done.wait()
            assert job.record()["result"] == {"ok": True} and job.current == job.total == 100
            with pytest.raises(InvalidArgumentError, match="cannot accept command verb 'cancel'"):
                jobs.cancel("held")

            async def quick(worker: WorkerProcess, progress: Any) -> Any:
                return None

            for i in range(MAX_CONCLUDED + 20):
                await jobs.submit("test", quick, job_id=f"q{i}").done.wait()
            assert len(jobs.jobs) == MAX_CONCLUDED
            assert "held" not in jobs.jobs and "q0" not in jobs.jobs and f"q{MAX_CONCLUDED + 19}" in jobs.jobs
            with pytest.raises(NotFoundError):
                jobs.get("q0")
        finally:
            await jobs.close()

    asyncio.run(main())
    held = [d["status"] for n, d in events if n == "JOB_STATUS_CHANGE" and d and d["id"] == "held"]
    assert held[:2] == ["created", "running"] and held[-2:] == ["concluded", "null"]
