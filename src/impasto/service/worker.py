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
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from impasto.logcontext import current_task
from impasto.protocol.errors import ImpastoError, InferenceError, ServiceUnavailable
from impasto.service.inference import InferenceService
from impasto.state.base import JobQueue, QueuedJob, StateStore

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
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._queue = queue
        self._inference = inference
        self._state = state
        self._airs = list(airs)
        self._prefetch = max(1, prefetch)
        self._lease_s = lease_s
        self._block_s = block_s
        self._max_deliveries = max_deliveries
        # Injected by tests, which drive lease rounds and retries without waiting.
        self._sleep = sleep
        self._clock = clock
        self._slots = asyncio.Semaphore(self._prefetch)
        self._held: dict[str, QueuedJob] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.completed = 0
        self._running: asyncio.Task[Any] | None = None
        self._renewing: asyncio.Task[None] | None = None

    def problems(self) -> list[str]:
        """Why this worker is not doing its job: its loop or lease renewals stopped."""
        found = []
        if self._running is not None and self._running.done():
            found.append("the worker loop has stopped")
        if self._renewing is not None and self._renewing.done():
            found.append("lease renewals have stopped")
        return found

    def stats(self) -> dict[str, Any]:
        return {"models": self._airs, "held_jobs": len(self._held), "completed": self.completed}

    async def run(self) -> None:
        """Until cancelled."""
        self._running = running = asyncio.current_task()
        assert running is not None
        housekeeping = asyncio.create_task(self._renew_leases(), name="worker leases")
        self._renewing = housekeeping
        next_reclaim = 0.0
        try:
            while True:
                if running.cancelling():
                    # redis-py can swallow a cancellation that lands mid-command; the loop
                    # still stops when asked to.
                    raise asyncio.CancelledError
                await self._slots.acquire()
                free = 1
                while free < self._prefetch and not self._slots.locked():
                    await self._slots.acquire()
                    free += 1
                jobs: list[QueuedJob] = []
                try:
                    # Orphans are taken here, with slots in hand, never by waiting for a slot
                    # where leases are renewed: that wait would stop the renewals while we
                    # hold jobs, and healthy jobs would be taken over by other workers.
                    if self._clock() >= next_reclaim:
                        next_reclaim = self._clock() + self._lease_s / 3
                        jobs = await self._take_orphans(free)
                    if len(jobs) < free:
                        jobs += await self._queue.take(self._airs, free - len(jobs), self._block_s)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("taking jobs failed; retrying")
                    await self._sleep(1.0)
                for _ in range(free - len(jobs)):
                    self._slots.release()
                poison = [j for j in jobs if j.deliveries > self._max_deliveries]
                self._dispatch([j for j in jobs if j not in poison])
                for job in poison:
                    self._held[job.entry_id] = job
                    await self._abandon(job)
        finally:
            housekeeping.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(housekeeping, *self._tasks, return_exceptions=True)

    async def _take_orphans(self, count: int) -> list[QueuedJob]:
        """Jobs whose owner stopped renewing their lease (a worker that died): now ours.

        A job whose workers keep dying (a crash, the kernel's OOM killer) comes back with a
        high delivery count and fails instead of taking down every worker in turn."""
        orphans = await self._queue.reclaim(self._airs, self._lease_s, count)
        orphans = [job for job in orphans if job.entry_id not in self._held][:count]
        if orphans:
            log.warning("took over %d job(s) from a worker that stopped", len(orphans))
        return orphans

    async def _renew_leases(self) -> None:
        """Renew the lease of every job we hold, whatever else is going on."""
        while True:
            await self._sleep(self._lease_s / 3)
            try:
                if self._held:
                    await self._queue.touch(list(self._held.values()))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("renewing leases failed; retrying next round")

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
        try:
            await self._inference.fail_missing(job.task_uuid, [job.index], error)
            await self._queue.ack(job)
        except Exception:
            log.exception("recording the failure of %s:%d failed", job.task_uuid, job.index)
        finally:
            self._release(job)

    def _release(self, job: QueuedJob) -> None:
        """Stop holding a job (acknowledged, or left for its lease to lapse and run again)."""
        if self._held.pop(job.entry_id, None) is not None:
            self._slots.release()

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
            self._release(job)
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
                if isinstance(exc, ImpastoError) and not isinstance(exc, ServiceUnavailable)
                else None
            )
            if error is None:
                # The state store may be away: let the leases lapse so that a worker runs
                # these jobs again once it is back, rather than hold them forever.
                for job in pending.values():
                    self._release(job)
                return
            try:
                await self._inference.fail_missing(
                    group[0].task_uuid,
                    [job.index for job in pending.values()],
                    error.for_task("imageInference", group[0].task_uuid),
                )
            except Exception:
                log.exception("recording the failure of task %s failed", group[0].task_uuid)
                for job in pending.values():
                    self._release(job)
                return
            for job in list(pending.values()):
                await done(job)
