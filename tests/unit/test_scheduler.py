"""The scheduler with fake backends and sinks: the device never waits on bookkeeping, post-
processing is bounded, progress is throttled on an injected clock, and one model's loading
never holds up another's."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from PIL import Image

from impasto.backends.base import (
    Backend,
    CheckpointCallback,
    GeneratedImage,
    GenerationJob,
    Outcome,
    ProgressCallback,
)
from impasto.engine.scheduler import BackendLoader, ProgressThrottle, Scheduler
from impasto.protocol.errors import InferenceError


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def job(index: int, task: str = "t") -> GenerationJob:
    return GenerationJob(
        task_uuid=task, index=index, model="m", prompt="p", width=8, height=8, seed=index
    )


class FakeBackend:
    """Makes one solid image per job; records when each call starts."""

    def __init__(
        self, *, limit: int = 1, progress_steps: int = 0, clock: FakeClock | None = None
    ) -> None:
        self.limit = limit
        self.calls: list[list[int]] = []
        self.started = asyncio.Event()
        self.progress_steps = progress_steps
        self.clock = clock
        self.fail_next = False
        self.closed = False

    @property
    def concurrency(self) -> int:
        return 1

    def batch_key(self, job: GenerationJob) -> Hashable:
        return "same"

    def batch_limit(self, job: GenerationJob) -> int:
        return self.limit

    async def generate(
        self,
        jobs: Sequence[GenerationJob],
        progress: ProgressCallback,
        checkpoint: CheckpointCallback,
    ) -> list[Outcome]:
        self.calls.append([j.index for j in jobs])
        self.started.set()
        for step in range(self.progress_steps):
            if self.clock is not None:
                self.clock.now += 0.1
            progress(jobs, (step + 1) * 100 // self.progress_steps)
        await asyncio.sleep(0)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        return [GeneratedImage(Image.new("RGB", (8, 8)), j.seed) for j in jobs]

    async def close(self) -> None:
        self.closed = True


class Sink:
    """Records outcomes; `gate` (when set) holds every on_outcome until opened."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.gate = gate
        self.outcomes: dict[int, Outcome] = {}
        self.progress: list[tuple[int, int]] = []
        self.entered = 0

    async def on_progress(self, job: GenerationJob, percent: int) -> None:
        self.progress.append((job.index, percent))

    async def on_checkpoint(self, job: GenerationJob, data: Mapping[str, Any]) -> None:
        pass

    async def on_outcome(self, job: GenerationJob, outcome: Outcome) -> None:
        self.entered += 1
        if self.gate is not None:
            await self.gate.wait()
        self.outcomes[job.index] = outcome


def loader(
    backends: Mapping[str, Backend], gates: Mapping[str, asyncio.Event] | None = None
) -> BackendLoader:
    async def load(air: str) -> Backend:
        if gates and air in gates:
            await gates[air].wait()
        return backends[air]

    return load


async def settle(predicate: Any, rounds: int = 200) -> None:
    """Let the loop run until `predicate()` holds (bounded: no wall-clock waits)."""
    for _ in range(rounds):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def test_the_next_batch_starts_while_the_previous_outcomes_are_still_being_stored() -> None:
    async def test() -> None:
        backend = FakeBackend(limit=1)
        scheduler = Scheduler(loader({"m": backend}), batch_wait_s=0)
        gate = asyncio.Event()
        sink = Sink(gate)
        await scheduler.submit("m", [job(0), job(1)], sink)
        # Both generations ran although the first outcome's storing has not finished.
        await settle(lambda: len(backend.calls) == 2)
        assert backend.calls == [[0], [1]]
        assert sink.outcomes == {}
        gate.set()
        await scheduler.drain()
        assert sorted(sink.outcomes) == [0, 1]
        await scheduler.close()

    asyncio.run(test())


def test_post_processing_that_falls_behind_holds_generation_back() -> None:
    async def test() -> None:
        backend = FakeBackend(limit=1)
        scheduler = Scheduler(loader({"m": backend}), batch_wait_s=0, post_backlog=2)
        gate = asyncio.Event()
        sink = Sink(gate)
        await scheduler.submit("m", [job(i) for i in range(5)], sink)
        await settle(lambda: len(backend.calls) == 2)
        # Two batches wait to be stored: the third generation waits for one of them.
        for _ in range(50):
            await asyncio.sleep(0)
        assert len(backend.calls) == 2
        assert scheduler.queued("m") == 2  # one taken by the waiting runner
        gate.set()
        await settle(lambda: len(sink.outcomes) == 5)
        assert [c[0] for c in backend.calls] == [0, 1, 2, 3, 4]
        await scheduler.close()

    asyncio.run(test())


def test_outcomes_of_one_batch_keep_their_order() -> None:
    async def test() -> None:
        backend = FakeBackend(limit=4)
        scheduler = Scheduler(loader({"m": backend}), batch_wait_s=0)
        order: list[int] = []

        class Ordered(Sink):
            async def on_outcome(self, job: GenerationJob, outcome: Outcome) -> None:
                order.append(job.index)

        await scheduler.submit("m", [job(i) for i in range(4)], Ordered())
        await settle(lambda: len(order) == 4)
        assert order == [0, 1, 2, 3]
        await scheduler.close()

    asyncio.run(test())


def test_progress_is_throttled_per_batch_on_the_injected_clock() -> None:
    async def test() -> None:
        clock = FakeClock()
        # Ten steps 0.1 s apart (0.1 ... 1.0): with a 0.5 s period only the first report (0.1)
        # and the one at 0.6 pass; of ten writes, two remain.
        backend = FakeBackend(limit=1, progress_steps=10, clock=clock)
        scheduler = Scheduler(
            loader({"m": backend}), batch_wait_s=0, progress_period_s=0.5, clock=clock
        )
        sink = Sink()
        await scheduler.submit("m", [job(0)], sink)
        await settle(lambda: 0 in sink.outcomes)
        for _ in range(20):
            await asyncio.sleep(0)
        assert sink.progress == [(0, 10), (0, 60)]
        await scheduler.close()

    asyncio.run(test())


def test_progress_throttle() -> None:
    clock = FakeClock()
    throttle = ProgressThrottle(0.5, clock)
    passed = []
    for _ in range(12):
        passed.append(throttle.allow())
        clock.now += 0.2
    # t = 0, 0.6, 1.2, 1.8: every third report.
    assert passed == [True, False, False] * 4


def test_loading_one_model_does_not_hold_up_another() -> None:
    async def test() -> None:
        slow, fast = FakeBackend(), FakeBackend()
        gate = asyncio.Event()
        scheduler = Scheduler(loader({"slow": slow, "fast": fast}, {"slow": gate}), 0)
        slow_sink, fast_sink = Sink(), Sink()
        await scheduler.submit("slow", [job(0, "a")], slow_sink)
        await settle(lambda: True, rounds=5)
        await scheduler.submit("fast", [job(0, "b")], fast_sink)
        await settle(lambda: 0 in fast_sink.outcomes)
        assert slow_sink.outcomes == {}
        gate.set()
        await settle(lambda: 0 in slow_sink.outcomes)
        await scheduler.close()

    asyncio.run(test())


def test_a_failing_batch_fails_its_jobs_and_the_lane_lives_on() -> None:
    async def test() -> None:
        backend = FakeBackend(limit=1)
        backend.fail_next = True
        scheduler = Scheduler(loader({"m": backend}), batch_wait_s=0)
        sink = Sink()
        await scheduler.submit("m", [job(0), job(1)], sink)
        await settle(lambda: len(sink.outcomes) == 2)
        assert isinstance(sink.outcomes[0], InferenceError)
        assert isinstance(sink.outcomes[1], GeneratedImage)
        await scheduler.close()
        assert backend.closed

    asyncio.run(test())


def test_close_lets_outcomes_being_stored_land_within_the_grace() -> None:
    async def test() -> None:
        backend = FakeBackend(limit=1)
        scheduler = Scheduler(loader({"m": backend}), batch_wait_s=0, close_grace_s=30)
        gate = asyncio.Event()
        sink = Sink(gate)
        await scheduler.submit("m", [job(0)], sink)
        await settle(lambda: sink.entered == 1)
        closing = asyncio.create_task(scheduler.close())
        await settle(lambda: True, rounds=10)
        assert not closing.done()
        gate.set()
        await closing
        assert 0 in sink.outcomes

    asyncio.run(test())


def test_close_stops_post_processing_that_outlasts_the_grace() -> None:
    async def test() -> None:
        backend = FakeBackend(limit=1)
        scheduler = Scheduler(loader({"m": backend}), batch_wait_s=0, close_grace_s=0)
        sink = Sink(asyncio.Event())  # never opened: a store that never comes back
        await scheduler.submit("m", [job(0)], sink)
        await settle(lambda: sink.entered == 1)
        await scheduler.close()
        assert sink.outcomes == {}
        assert backend.closed

    asyncio.run(test())
