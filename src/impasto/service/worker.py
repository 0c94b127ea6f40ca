"""The worker loop of `impasto worker`: take generation jobs from the shared JobQueue, run them
on this machine's backends, store their outcomes, acknowledge.

Jobs taken are leased: the loop renews the lease of every job it still works on, so a long
generation is not taken over, and it reclaims jobs whose owner stopped renewing (a worker that
died). A job that is run twice stores once (results are unique per task and index).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from impasto.logcontext import current_task
from impasto.protocol.errors import ImpastoError, InferenceError
from impasto.service.inference import InferenceService
from impasto.state.base import JobQueue, QueuedJob, StateStore
from impasto.state.records import ResultRecord

log = logging.getLogger("impasto.worker")


class Worker:
    """Consumes the queues of `airs` with at most `prefetch` jobs in hand."""

    def __init__(
        self,
        queue: JobQueue,
        inference: InferenceService,
        state: StateStore,
        airs: Sequence[str],
        *,
        prefetch: int = 8,
        lease_s: float = 60.0,
        block_s: float = 1.0,
        max_deliveries: int = 3,
    ) -> None:
        self._queue = queue
        self._inference = inference
        self._state = state
        self._airs = list(airs)
        self._prefetch = max(1, prefetch)
        self._lease_s = lease_s
        self._block_s = block_s
        self._max_deliveries = max_deliveries
        self._slots = asyncio.Semaphore(self._prefetch)
        self._held: dict[str, QueuedJob] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.completed = 0

    def stats(self) -> dict[str, Any]:
        return {"models": self._airs, "held_jobs": len(self._held), "completed": self.completed}

    async def run(self) -> None:
        """Until cancelled."""
        housekeeping = asyncio.create_task(self._housekeeping(), name="worker leases")
        try:
            while True:
                await self._slots.acquire()
                free = 1
                while free < self._prefetch and not self._slots.locked():
                    await self._slots.acquire()
                    free += 1
                try:
                    jobs = await self._queue.take(self._airs, free, self._block_s)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("taking jobs failed; retrying")
                    jobs = []
                    await asyncio.sleep(1.0)
                for _ in range(free - len(jobs)):
                    self._slots.release()
                self._dispatch(jobs)
        finally:
            housekeeping.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(housekeeping, *self._tasks, return_exceptions=True)

    async def _housekeeping(self) -> None:
        """Renew our leases; take over jobs whose owner stopped renewing theirs."""
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                if self._held:
                    await self._queue.touch(list(self._held.values()))
                free = self._prefetch - len(self._held)
                if free > 0:
                    orphans = await self._queue.reclaim(self._airs, self._lease_s, free)
                    orphans = [job for job in orphans if job.entry_id not in self._held]
                    for _ in orphans:
                        await self._slots.acquire()
                    if orphans:
                        log.warning("took over %d job(s) from a worker that stopped", len(orphans))
                    # A job whose workers keep dying (a crash, the kernel's OOM killer) fails
                    # instead of taking down every worker in turn.
                    poison = [j for j in orphans if j.deliveries > self._max_deliveries]
                    self._dispatch([j for j in orphans if j not in poison])
                    for job in poison:
                        self._held[job.entry_id] = job
                        await self._abandon(job)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("lease housekeeping failed; retrying next round")

    async def _abandon(self, job: QueuedJob) -> None:
        log.error(
            "giving up generation %s:%d after %d workers stopped while running it",
            job.task_uuid,
            job.index,
            job.deliveries - 1,
        )
        error = InferenceError(
            f"The generation was started {job.deliveries - 1} times and every worker running it "
            "stopped; giving up."
        ).for_task("imageInference", job.task_uuid)
        await self._state.add_result(
            ResultRecord(job.task_uuid, job.index, "error", error.to_item(), time.time())
        )
        await self._queue.ack(job)
        self._held.pop(job.entry_id, None)
        self._slots.release()
        await self._inference.maybe_finish(job.task_uuid)

    def _dispatch(self, jobs: Sequence[QueuedJob]) -> None:
        by_task: dict[str, list[QueuedJob]] = {}
        for job in jobs:
            self._held[job.entry_id] = job
            by_task.setdefault(job.task_uuid, []).append(job)
        for group in by_task.values():
            task = asyncio.create_task(self._execute(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _execute(self, group: list[QueuedJob]) -> None:
        current_task.set(group[0].task_uuid)
        pending = {job.entry_id: job for job in group}

        async def done(job: QueuedJob) -> None:
            if pending.pop(job.entry_id, None) is None:
                return
            try:
                await self._queue.ack(job)
            except Exception:
                # The lease lapses and the job runs again; its result is stored only once.
                log.exception("acknowledging %s:%d failed", job.task_uuid, job.index)
            self._held.pop(job.entry_id, None)
            self._slots.release()
            self.completed += 1

        try:
            await self._inference.execute(group, done)
            # The jobs now run on the local scheduler; `done` fires as each outcome is stored.
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("running task %s failed", group[0].task_uuid)
            error = (
                exc
                if isinstance(exc, ImpastoError)
                else InferenceError("The worker failed to run this generation.")
            )
            for job in list(pending.values()):
                item = error.for_task("imageInference", job.task_uuid).to_item()
                await self._state.add_result(
                    ResultRecord(job.task_uuid, job.index, "error", item, time.time())
                )
                await done(job)
            await self._inference.maybe_finish(group[0].task_uuid)
