"""The scheduler: one lane per model that runs jobs, a lane per backend instance.

A lane holds the jobs waiting for its backend. Each of the backend's `concurrency` runners takes
the oldest job, gathers waiting jobs with the same batch key (up to the backend's batch limit),
runs them in one `generate` call and hands every outcome to the job's sink. A failing batch
fails its own jobs and nothing else.

Waiting for companions costs a lone request latency, so a runner waits (at most `batch_wait`)
only while the lane is under load, i.e. when its previous batch had company; otherwise it runs
what is there at once, and whatever arrives meanwhile forms the next batch.

The device never waits on bookkeeping: a batch's outcomes go to their sinks (safety check,
encode, store, deliver) in a task of their own, and the runner takes the next batch at once.
At most `post_backlog` batches per runner are being post-processed at a time; past that the
runner waits for one to finish, so a slow store slows generation down instead of piling up
images in memory.

Progress reports are throttled per batch to one every `progress_period_s` (0.5 s, as cog
throttles its non-terminal webhook events): a client polling getResponse sees fresh enough
numbers, while a fast model no longer writes to the state store on every step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from impasto.backends.base import Backend, GenerationJob, Outcome
from impasto.protocol.errors import ImpastoError, InferenceError

log = logging.getLogger("impasto.engine")

BackendLoader = Callable[[str], Awaitable[Backend]]
# Told about every batch run: (model AIR, number of jobs, seconds).
BatchObserver = Callable[[str, int, float], None]
Clock = Callable[[], float]

PROGRESS_PERIOD_S = 0.5


class JobSink(Protocol):
    """Receives what happens to the jobs of one task."""

    async def on_progress(self, job: GenerationJob, percent: int) -> None:
        """Generation of `job` is `percent` done."""

    async def on_checkpoint(self, job: GenerationJob, data: Mapping[str, Any]) -> None:
        """The backend asks to persist bookkeeping for `job` (e.g. a provider task id)."""

    async def on_outcome(self, job: GenerationJob, outcome: Outcome) -> None:
        """The job finished with an image or an error."""


@dataclass
class _Waiting:
    job: GenerationJob
    sink: JobSink
    key: Hashable


class _Lane:
    """The waiting jobs of one model and the runners that serve them."""

    def __init__(self, air: str) -> None:
        self.air = air
        self.waiting: deque[_Waiting] = deque()
        self.arrived = asyncio.Event()
        self.runners: list[asyncio.Task[None]] = []
        self.backend: Backend | None = None
        self.last_batch_size = 0
        # Loading one model's backend never waits on another model's.
        self.loading = asyncio.Lock()
        # Outcomes of finished batches still being post-processed, and how many may be.
        self.post: set[asyncio.Task[None]] = set()
        self.post_slots: asyncio.Semaphore | None = None


class ProgressThrottle:
    """Lets a report through when `period_s` has passed since the last one let through; the
    first report always passes."""

    def __init__(self, period_s: float, clock: Clock) -> None:
        self._period_s = period_s
        self._clock = clock
        self._last: float | None = None

    def allow(self) -> bool:
        now = self._clock()
        if self._last is not None and now - self._last < self._period_s:
            return False
        self._last = now
        return True


class Scheduler:
    """Runs generation jobs on backends, batching compatible jobs of one model."""

    def __init__(
        self,
        load_backend: BackendLoader,
        batch_wait_s: float = 0.005,
        observe: BatchObserver | None = None,
        *,
        progress_period_s: float = PROGRESS_PERIOD_S,
        post_backlog: int = 2,
        close_grace_s: float = 5.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._load_backend = load_backend
        self._observe: BatchObserver = observe or (lambda air, size, seconds: None)
        self._batch_wait_s = batch_wait_s
        self._progress_period_s = progress_period_s
        self._post_backlog = max(1, post_backlog)
        self._close_grace_s = close_grace_s
        # Times progress throttling; tests inject one.
        self._clock = clock
        self._lanes: dict[str, _Lane] = {}
        self._closed = False
        self._reports: set[asyncio.Task[None]] = set()
        self.busy_since: float | None = None

    async def submit(self, air: str, jobs: Sequence[GenerationJob], sink: JobSink) -> None:
        """Queue jobs for the model `air` (the AIR that runs them, after aliasing)."""
        if self._closed:
            raise RuntimeError("scheduler is closed")
        lane = self._lanes.get(air)
        if lane is None:
            lane = self._lanes[air] = _Lane(air)
            await self._start_lane(lane)
        for job in jobs:
            # The key needs the backend; until it is loaded every job is its own batch.
            key = lane.backend.batch_key(job) if lane.backend else job.job_id
            lane.waiting.append(_Waiting(job, sink, key))
        lane.arrived.set()

    async def warm(self, air: str) -> float:
        """Load the backend of `air` now and let it warm up (compile); returns seconds."""
        lane = self._lanes.get(air)
        if lane is None:
            lane = self._lanes[air] = _Lane(air)
            await self._start_lane(lane)
        backend = await self._backend(lane)
        started = time.monotonic()
        warmup = getattr(backend, "warmup", None)
        if warmup is not None:
            await warmup()
        return time.monotonic() - started

    def backend_of(self, air: str) -> Backend | None:
        """The loaded backend of a model, if any (for stats and tests)."""
        lane = self._lanes.get(air)
        return lane.backend if lane else None

    def queued(self, air: str | None = None) -> int:
        """Jobs waiting (not yet running), for one model or all."""
        if air is not None:
            lane = self._lanes.get(air)
            return len(lane.waiting) if lane else 0
        return sum(len(lane.waiting) for lane in self._lanes.values())

    async def _start_lane(self, lane: _Lane) -> None:
        # One runner until the backend tells us its concurrency.
        lane.runners.append(asyncio.create_task(self._run_lane(lane), name=f"lane {lane.air}"))

    async def _backend(self, lane: _Lane) -> Backend:
        if lane.backend is None:
            async with lane.loading:
                if lane.backend is None:
                    backend = await self._load_backend(lane.air)
                    lane.backend = backend
                    runners = max(1, backend.concurrency)
                    lane.post_slots = asyncio.Semaphore(runners * self._post_backlog)
                    for waiting in lane.waiting:
                        waiting.key = backend.batch_key(waiting.job)
                    for _ in range(runners - len(lane.runners)):
                        lane.runners.append(
                            asyncio.create_task(self._run_lane(lane), name=f"lane {lane.air}")
                        )
        return lane.backend

    async def _run_lane(self, lane: _Lane) -> None:
        while True:
            while not lane.waiting:
                lane.arrived.clear()
                await lane.arrived.wait()
            first = lane.waiting.popleft()
            try:
                backend = await self._backend(lane)
            except ImpastoError as exc:
                await self._fail([first], exc)
                continue
            except Exception:
                log.exception("loading the backend of %s failed", lane.air)
                await self._fail([first], InferenceError(f"Model {lane.air} failed to load."))
                continue
            batch = [first]
            try:
                first.key = backend.batch_key(first.job)
                await self._gather(lane, batch, backend.batch_limit(first.job))
            except Exception:
                # A misbehaving backend fails these jobs; the lane itself must live on.
                log.exception("batching for %s failed", lane.air)
                await self._fail(batch, InferenceError(f"Model {lane.air} failed to batch."))
                continue
            lane.last_batch_size = len(batch)
            assert lane.post_slots is not None
            # Wait here, before the device starts, if post-processing has fallen behind.
            await lane.post_slots.acquire()
            try:
                outcomes = await self._run_batch(lane.air, backend, batch)
            except BaseException:
                lane.post_slots.release()
                raise
            self._post_process(lane, batch, outcomes)

    async def _gather(self, lane: _Lane, batch: list[_Waiting], limit: int) -> None:
        if limit <= 1:
            return
        under_load = lane.last_batch_size > 1 or len(lane.runners) > 1
        deadline = time.monotonic() + (self._batch_wait_s if under_load else 0.0)
        while len(batch) < limit:
            for waiting in list(lane.waiting):
                if waiting.key == batch[0].key and len(batch) < limit:
                    lane.waiting.remove(waiting)
                    batch.append(waiting)
            remaining = deadline - time.monotonic()
            if len(batch) >= limit or remaining <= 0:
                return
            lane.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lane.arrived.wait(), remaining)

    async def _run_batch(self, air: str, backend: Backend, batch: list[_Waiting]) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        sinks = {w.job.job_id: w.sink for w in batch}
        throttle = ProgressThrottle(self._progress_period_s, self._clock)

        def progress(jobs: Sequence[GenerationJob], percent: int) -> None:
            # Called from backend threads: throttled there, then a hop onto the loop.
            if not throttle.allow():
                return

            def report() -> None:
                for job in jobs:
                    sink = sinks.get(job.job_id)
                    if sink is not None:
                        report_task = loop.create_task(sink.on_progress(job, percent))
                        self._reports.add(report_task)
                        report_task.add_done_callback(self._reports.discard)

            loop.call_soon_threadsafe(report)

        async def checkpoint(job: GenerationJob, data: Mapping[str, Any]) -> None:
            await sinks[job.job_id].on_checkpoint(job, data)

        jobs = [w.job for w in batch]
        started = self.busy_since = time.monotonic()
        try:
            outcomes = await backend.generate(jobs, progress, checkpoint)
            if len(outcomes) != len(jobs):
                raise InferenceError("backend returned the wrong number of images")
        except ImpastoError as exc:
            outcomes = [exc] * len(jobs)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch of %d job(s) failed", len(jobs))
            outcomes = [InferenceError("The model failed to generate the image.")] * len(jobs)
        finally:
            self.busy_since = None
        self._observe(air, len(jobs), time.monotonic() - started)
        return outcomes

    def _post_process(
        self, lane: _Lane, batch: list[_Waiting], outcomes: Sequence[Outcome]
    ) -> None:
        """Hand a batch's outcomes to their sinks beside the next batch's generation; the
        lane's post slot taken for it is given back when they are all delivered."""

        async def deliver_all() -> None:
            try:
                for waiting, outcome in zip(batch, outcomes, strict=True):
                    await self._deliver(waiting, outcome)
            finally:
                assert lane.post_slots is not None
                lane.post_slots.release()

        task = asyncio.create_task(deliver_all(), name=f"outcomes {lane.air}")
        lane.post.add(task)
        task.add_done_callback(lane.post.discard)

    async def drain(self) -> None:
        """Wait until every finished batch's outcomes are delivered (tests, shutdown)."""
        while True:
            pending = [task for lane in self._lanes.values() for task in lane.post]
            if not pending:
                return
            await asyncio.gather(*pending, return_exceptions=True)

    async def _fail(self, batch: list[_Waiting], error: ImpastoError) -> None:
        for waiting in batch:
            await self._deliver(waiting, error)

    @staticmethod
    async def _deliver(waiting: _Waiting, outcome: Outcome) -> None:
        try:
            await waiting.sink.on_outcome(waiting.job, outcome)
        except Exception:
            log.exception("delivering the outcome of job %s failed", waiting.job.job_id)

    async def close(self) -> None:
        self._closed = True
        for lane in self._lanes.values():
            for runner in lane.runners:
                runner.cancel()
        # Images already made are worth storing: give their post-processing a moment, then
        # stop it (a restart re-runs the generations whose outcome was not recorded).
        pending = [task for lane in self._lanes.values() for task in lane.post]
        if pending:
            await asyncio.wait(pending, timeout=self._close_grace_s)
        for lane in self._lanes.values():
            for task in lane.post:
                task.cancel()
        for lane in self._lanes.values():
            await asyncio.gather(*lane.runners, *lane.post, return_exceptions=True)
            if lane.backend is not None:
                await lane.backend.close()
