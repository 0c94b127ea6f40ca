"""The job queue and the worker loop on a real redis-server: leases, take-over, poison jobs."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

from impasto.service.worker import Worker
from impasto.state.base import QueuedJob
from impasto.state.records import ResultRecord, TaskRecord
from impasto.state.redis_queue import RedisJobQueue
from impasto.state.redis_store import RedisStateStore
from tests.services import RedisServer

AIR = "impasto:tiny@1"


def queue(redis_server: RedisServer, prefix: str, consumer: str) -> RedisJobQueue:
    return RedisJobQueue(redis_server.url, prefix=prefix, consumer=consumer)


def test_a_job_left_by_a_dead_consumer_is_taken_over_with_its_delivery_count(
    redis_server: RedisServer,
) -> None:
    prefix = f"q{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        dead, alive = queue(redis_server, prefix, "dead"), queue(redis_server, prefix, "alive")
        await dead.put([QueuedJob(AIR, "t1", 0)])
        (taken,) = await dead.take([AIR], 5, 0.1)
        assert taken.deliveries == 1
        # Within the lease nobody else gets it.
        assert await alive.reclaim([AIR], lease_s=30, count=5) == []
        assert await alive.take([AIR], 5, 0.05) == []
        await asyncio.sleep(0.15)
        (reclaimed,) = await alive.reclaim([AIR], lease_s=0.1, count=5)
        assert (reclaimed.task_uuid, reclaimed.index) == ("t1", 0)
        assert reclaimed.deliveries == 2
        await alive.ack(reclaimed)
        assert await alive.depth(AIR) == 0
        await dead.close()
        await alive.close()

    asyncio.run(scenario())


def test_touch_renews_the_lease_of_a_job_still_in_hand(redis_server: RedisServer) -> None:
    prefix = f"q{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        busy, other = queue(redis_server, prefix, "busy"), queue(redis_server, prefix, "other")
        await busy.put([QueuedJob(AIR, "t2", 0)])
        jobs = await busy.take([AIR], 1, 0.1)
        for _ in range(3):
            await asyncio.sleep(0.1)
            await busy.touch(jobs)
            assert await other.reclaim([AIR], lease_s=0.2, count=1) == []
        await busy.close()
        await other.close()

    asyncio.run(scenario())


class RecordingInference:
    """Stands in for InferenceService: records what the worker asks of it."""

    def __init__(self, expect_jobs: int = 0, state: RedisStateStore | None = None) -> None:
        self._state = state
        self.executed: list[list[QueuedJob]] = []
        self.finished: list[str] = []
        self._expect_jobs = expect_jobs
        self.all_run = asyncio.Event()
        self.any_finished = asyncio.Event()

    async def execute(self, queued: Sequence[QueuedJob], done: Any) -> None:
        for job in queued:
            await done(job)
        self.executed.append(list(queued))
        if sum(len(group) for group in self.executed) >= self._expect_jobs:
            self.all_run.set()

    async def maybe_finish(self, task_uuid: str) -> None:
        self.finished.append(task_uuid)
        self.any_finished.set()

    async def fail_missing(self, task_uuid: str, indices: list[int], error: Any) -> None:
        assert self._state is not None
        for index in indices:
            await self._state.add_result(
                ResultRecord(task_uuid, index, "error", error.to_item(), time.time())
            )
        await self.maybe_finish(task_uuid)


def test_a_job_whose_workers_keep_dying_fails_instead_of_killing_the_next(
    redis_server: RedisServer,
) -> None:
    prefix = f"q{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        state = RedisStateStore(redis_server.url, prefix=prefix)
        await state.open()
        task_uuid = str(uuid.uuid4())
        await state.create_task(
            TaskRecord(task_uuid, "imageInference", {}, expected=1, created_at=time.time())
        )
        producer = queue(redis_server, prefix, "api")
        await producer.put([QueuedJob(AIR, task_uuid, 0)])
        # Three workers take the job in turn and die holding it.
        for name in ("w1", "w2", "w3"):
            doomed = queue(redis_server, prefix, name)
            taken = await doomed.take([AIR], 1, 0.1) or await doomed.reclaim([AIR], 0.05, 1)
            assert len(taken) == 1
            await doomed.close()
            await asyncio.sleep(0.1)
        inference = RecordingInference(state=state)
        survivor = Worker(
            queue(redis_server, prefix, "w4"),
            inference,
            state,
            [AIR],  # type: ignore[arg-type]
            lease_s=0.15,
            max_deliveries=3,
        )
        running = asyncio.create_task(survivor.run())
        await asyncio.wait_for(inference.any_finished.wait(), 10)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)

        assert inference.executed == []  # never run a fourth time
        assert inference.finished == [task_uuid]
        (result,) = await state.results(task_uuid)
        assert result.status == "error"
        assert result.item["code"] == "inferenceError"
        assert "every worker running it stopped" in result.item["message"]
        assert await producer.depth(AIR) == 0
        await producer.close()
        await state.close()

    asyncio.run(scenario())


def test_the_worker_runs_queued_jobs_and_acknowledges_them(redis_server: RedisServer) -> None:
    prefix = f"q{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        state = RedisStateStore(redis_server.url, prefix=prefix)
        await state.open()
        producer = queue(redis_server, prefix, "api")
        await producer.put([QueuedJob(AIR, "a", i) for i in range(3)] + [QueuedJob(AIR, "b", 0)])
        inference = RecordingInference(expect_jobs=4)
        worker = Worker(
            queue(redis_server, prefix, "w"),
            inference,
            state,
            [AIR],  # type: ignore[arg-type]
            prefetch=8,
            lease_s=5,
        )
        running = asyncio.create_task(worker.run())
        await asyncio.wait_for(inference.all_run.wait(), 10)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)

        by_task = {
            group[0].task_uuid: sorted(j.index for j in group) for group in inference.executed
        }
        assert by_task == {"a": [0, 1, 2], "b": [0]}
        assert await producer.depth(AIR) == 0
        assert worker.stats()["held_jobs"] == 0
        await producer.close()
        await state.close()

    asyncio.run(scenario())
