"""The worker loop over an in-memory job queue, a real SQLite state store behind a failure
switch, and a fake inference service whose generations block, fail or finish on demand. Sleeps
and the clock are injected: lease rounds run back to back, no wall-clock windows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from impasto.protocol.errors import ImpastoError, InferenceError, ServiceUnavailable
from impasto.service.completion import TaskCompletion
from impasto.service.inference import InferenceService
from impasto.service.recovery import JobDone
from impasto.service.worker import Worker
from impasto.state.base import JobQueue, QueuedJob
from tests.fakes import (
    FakeClock,
    FakeEventBus,
    FakeJobQueue,
    FlakyStateStore,
    RecordingSleep,
    eventually,
    new_task,
    sqlite_state,
)

AIR = "impasto:tiny@1"
LEASE_S = 30.0


def unavailable() -> ServiceUnavailable:
    return ServiceUnavailable("The state store cannot be reached (injected).")


class FakeInference:
    """What the worker uses of InferenceService. `execute` blocks until `finish` (then stores
    nothing itself and calls `done`), or raises `raises`; failures go to a real completion."""

    def __init__(self, completion: TaskCompletion) -> None:
        self.completion = completion
        self.executed: list[list[str]] = []
        self.raises: BaseException | None = None
        self.finish = asyncio.Event()
        self.failures: list[tuple[str, list[int], str]] = []

    async def execute(self, queued: Sequence[QueuedJob], done: JobDone) -> None:
        self.executed.append([job.entry_id for job in queued])
        if self.raises is not None:
            raise self.raises
        await self.finish.wait()
        for job in queued:
            await done(job)

    async def fail_missing(self, task_uuid: str, indices: list[int], error: ImpastoError) -> None:
        self.failures.append((task_uuid, indices, error.code))
        await self.completion.fail_missing(task_uuid, indices, error)

    async def maybe_finish(self, task_uuid: str) -> None:
        await self.completion.maybe_finish(task_uuid)


@dataclass
class Rig:
    state: FlakyStateStore
    queue: FakeJobQueue
    inference: FakeInference
    sleep: RecordingSleep
    worker: Worker

    async def job(self, deliveries: int = 1) -> QueuedJob:
        """A job of a new one-image task that exists in the state store."""
        task_uuid = await new_task(self.state, model=AIR)
        return QueuedJob(AIR, task_uuid, 0, entry_id=f"entry-{task_uuid}", deliveries=deliveries)

    def held(self) -> int:
        return cast(int, self.worker.stats()["held_jobs"])

    async def status(self, job: QueuedJob) -> str:
        task = await self.state.inner.get_task(job.task_uuid)
        assert task is not None
        return task.status


@asynccontextmanager
async def rig(
    tmp_path: Path, *, prefetch: int = 1, swallow_cancel: bool = False
) -> AsyncIterator[Rig]:
    async with sqlite_state(tmp_path / "state.db") as state:
        queue = FakeJobQueue(swallow_cancel=swallow_cancel)
        inference = FakeInference(TaskCompletion(state.store, FakeEventBus(), lambda: None))
        sleep = RecordingSleep()
        worker = Worker(
            cast(JobQueue, queue),
            cast(InferenceService, inference),
            state.store,
            [AIR],
            prefetch=prefetch,
            lease_s=LEASE_S,
            max_deliveries=3,
            sleep=sleep,
            clock=FakeClock(),
        )
        yield Rig(state, queue, inference, sleep, worker)


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def run(test: Callable[[], Any]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


def test_leases_are_renewed_while_every_slot_is_taken_and_an_orphan_waits(
    tmp_path: Path,
) -> None:
    async def test() -> None:
        async with rig(tmp_path, prefetch=2) as r:
            held = await r.job()
            r.queue.ready.append(held)
            async with running(r.worker):
                # One job running, the loop blocked in take() with the other slot in hand.
                await eventually(lambda: r.held() == 1 and r.queue.blocked_takes == 1)
                # Another worker died: its job is up for reclaiming, but no slot is free.
                r.queue.orphans.append(await r.job())
                renewed = len(r.queue.touched)
                await eventually(lambda: len(r.queue.touched) >= renewed + 5)
                assert all(ids == [held.entry_id] for ids in r.queue.touched)
                assert set(r.sleep.delays) == {LEASE_S / 3}
                assert r.worker.problems() == []

    run(test)


def test_orphan_past_max_deliveries_is_abandoned_with_inference_error_and_acked(
    tmp_path: Path,
) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            poison = await r.job(deliveries=4)
            r.queue.orphans.append(poison)
            async with running(r.worker):
                await eventually(lambda: r.queue.acked == [poison])
                assert r.inference.executed == []
                (result,) = await r.state.inner.results(poison.task_uuid)
                assert (result.status, result.item["code"]) == ("error", "inferenceError")
                assert await r.status(poison) == "error"
                await eventually(lambda: r.held() == 0)

    run(test)


def test_orphan_whose_failure_cannot_be_recorded_is_released_not_held(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path, prefetch=1) as r:
            poison = await r.job(deliveries=4)
            r.queue.orphans.append(poison)
            r.state.faults.fail_always("add_result", unavailable)
            async with running(r.worker):
                await eventually(lambda: len(r.inference.failures) == 1 and r.held() == 0)
                assert r.queue.acked == []
                # Its slot came back: the next job is taken and run.
                r.state.faults.heal()
                healthy = await r.job()
                await r.queue.put([healthy])
                await eventually(lambda: r.inference.executed == [[healthy.entry_id]])

    run(test)


def test_job_is_released_when_its_failure_cannot_be_recorded(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path, prefetch=1) as r:
            failing = await r.job()
            r.inference.raises = InferenceError("the pipeline crashed")
            r.state.faults.fail_always("add_result", unavailable)
            await r.queue.put([failing])
            async with running(r.worker):
                await eventually(lambda: len(r.inference.failures) == 1 and r.held() == 0)
                assert r.queue.acked == []
                assert await r.status(failing) == "processing"
                r.state.faults.heal()
                r.inference.raises = None
                r.inference.finish.set()
                healthy = await r.job()
                await r.queue.put([healthy])
                await eventually(lambda: r.queue.acked == [healthy])
                assert r.held() == 0

    run(test)


def test_unavailable_store_during_a_run_releases_the_job_without_failing_it(
    tmp_path: Path,
) -> None:
    async def test() -> None:
        async with rig(tmp_path, prefetch=1) as r:
            job = await r.job()
            r.inference.raises = unavailable()
            await r.queue.put([job])
            async with running(r.worker):
                await eventually(lambda: r.inference.executed != [] and r.held() == 0)
                # Its lease lapses and a worker runs it again once the store is back.
                assert r.inference.failures == []
                assert r.queue.acked == []
                assert await r.state.inner.results(job.task_uuid) == []
                assert await r.status(job) == "processing"

    run(test)


def test_cancellation_swallowed_by_the_queue_client_still_stops_run(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path, swallow_cancel=True) as r:
            task = asyncio.create_task(r.worker.run())
            await eventually(lambda: r.queue.blocked_takes == 1)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=5)
            if not done:
                r.queue.swallow_cancel = False
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise AssertionError("run() kept going after it was cancelled")
            assert task.cancelled()
            assert "the worker loop has stopped" in r.worker.problems()

    run(test)
