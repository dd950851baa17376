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


def test_a_convert_job_syncs_its_target_before_it_concludes(tmp_path: Any, monkeypatch: Any) -> None:
    """qemu-img convert's default cache mode skips the final sync; a job's new volume must not: a power
    cut after JOB_STATUS_CHANGE concluded must find the data on disk. (Counting fdatasync is the one
    double here: a power cut cannot be made for real.)"""
    import os

    from imagecore import hostio
    from nbdsrv.admin import worker

    ops: list[tuple[str, str]] = []
    real_sync, real_write = hostio.HostFile._datasync, hostio.HostFile._write_full

    def sync(self: hostio.HostFile) -> None:
        ops.append(("sync", self.path))
        real_sync(self)

    def write(self: hostio.HostFile, offset: int, bufs: Any) -> None:
        ops.append(("write", self.path))
        real_write(self, offset, bufs)

    monkeypatch.setattr(hostio.HostFile, "_datasync", sync)
    monkeypatch.setattr(hostio.HostFile, "_write_full", write)
    d = tmp_path / "images" / "100"
    d.mkdir(parents=True)
    (d / "vm-100-disk-0.raw").write_bytes(os.urandom(1 << 20))
    target = d / "vm-100-disk-1.raw"  # raw: no metadata ordering of its own would sync it anyway
    target.touch()
    args = {"root": str(tmp_path), "source": str(d / "vm-100-disk-0.raw"), "source-format": "raw",
            "target": str(target), "format": "raw"}
    res = asyncio.run(worker.op_convert(args, lambda done, total: None, asyncio.Event()))
    assert res["bytes-written"] == 1 << 20
    mine = [op for op, path in ops if path == str(target)]
    assert "write" in mine and mine[-1] == "sync", mine
