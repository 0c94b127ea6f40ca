"""The Supervisor with an injected sleep: a crashed loop is started again with capped
exponential backoff, reported while it is down, and stopped for good by close()."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from impasto.service.supervisor import Supervisor
from tests.fakes import FakeClock, RecordingSleep, eventually


class Crashy:
    """A loop that raises on its first `crashes` runs, then runs until cancelled."""

    def __init__(self, crashes: int) -> None:
        self.crashes = crashes
        self.starts = 0
        self.cancelled = 0

    async def __call__(self) -> None:
        self.starts += 1
        if self.starts <= self.crashes:
            raise ConnectionError("the outbox lost its store")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


class GatedSleep(RecordingSleep):
    """Sleeps until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await self.gate.wait()


def run(test: Callable[[], Any]) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))


def test_crashing_loop_is_restarted_with_capped_exponential_backoff() -> None:
    async def test() -> None:
        sleep = RecordingSleep()
        supervisor = Supervisor(sleep=sleep, base_backoff_s=0.5, max_backoff_s=4.0)
        loop = Crashy(crashes=6)
        supervisor.start("outbox", loop)
        await eventually(lambda: loop.starts == 7)
        assert sleep.delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
        assert supervisor.states()["outbox"].restarts == 6
        assert supervisor.problems() == []
        await supervisor.close()

    run(test)


def test_loop_that_returns_is_restarted_too() -> None:
    async def test() -> None:
        sleep = RecordingSleep()
        supervisor = Supervisor(sleep=sleep)
        starts = 0

        async def returns() -> None:
            nonlocal starts
            starts += 1
            if starts < 3:
                return
            await asyncio.Event().wait()

        supervisor.start("sweeper", returns)
        await eventually(lambda: starts == 3)
        assert sleep.delays == [0.5, 1.0]
        await supervisor.close()

    run(test)


def test_down_loop_is_reported_until_it_runs_again() -> None:
    async def test() -> None:
        sleep = GatedSleep()
        supervisor = Supervisor(sleep=sleep)
        loop = Crashy(crashes=1)
        supervisor.start("outbox", loop)
        supervisor.start("sweeper", Crashy(crashes=0))
        await eventually(lambda: sleep.delays == [0.5])
        (problem,) = supervisor.problems()
        assert "outbox" in problem
        assert "ConnectionError" in problem
        assert "restarted 1 times" in problem
        sleep.gate.set()
        await eventually(lambda: loop.starts == 2)
        assert supervisor.problems() == []
        await supervisor.close()

    run(test)


def test_backoff_starts_over_after_a_loop_ran_for_a_good_while() -> None:
    async def test() -> None:
        sleep, clock = RecordingSleep(), FakeClock()
        supervisor = Supervisor(sleep=sleep, clock=clock, base_backoff_s=0.5, max_backoff_s=4.0)
        starts = 0

        async def flaky() -> None:
            nonlocal starts
            starts += 1
            if starts == 4:
                clock.advance(60.0)  # ran fine for a minute before this crash
            if starts <= 4:
                raise ConnectionError("lost the store")
            await asyncio.Event().wait()

        supervisor.start("outbox", flaky)
        await eventually(lambda: starts == 5)
        assert sleep.delays == [0.5, 1.0, 2.0, 0.5]
        await supervisor.close()

    run(test)


def test_close_cancels_every_loop_and_none_is_restarted() -> None:
    async def test() -> None:
        sleep = RecordingSleep()
        supervisor = Supervisor(sleep=sleep)
        loops = [Crashy(crashes=0), Crashy(crashes=0)]
        supervisor.start("outbox", loops[0])
        supervisor.start("sweeper", loops[1])
        await eventually(lambda: all(loop.starts == 1 for loop in loops))
        await supervisor.close()
        assert [loop.cancelled for loop in loops] == [1, 1]
        for _ in range(10):
            await asyncio.sleep(0)
        assert [loop.starts for loop in loops] == [1, 1]
        assert sleep.delays == []

    run(test)


def test_close_cancels_again_a_loop_that_swallowed_its_cancellation() -> None:
    """As asyncio.wait_for does on Python 3.11 when the awaited call completes just as the
    cancellation arrives (redis-py sends every command through it)."""

    async def test() -> None:
        swallowed = 0

        async def stubborn() -> None:
            nonlocal swallowed
            while True:
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    if swallowed:
                        raise
                    swallowed += 1

        supervisor = Supervisor(sleep=RecordingSleep())
        supervisor.start("keys", stubborn)
        await asyncio.sleep(0)
        await asyncio.wait_for(supervisor.close(recancel_s=0.01), 10)
        assert swallowed == 1

    run(test)


def test_cancelling_a_loop_stops_its_supervision() -> None:
    async def test() -> None:
        sleep = RecordingSleep()
        supervisor = Supervisor(sleep=sleep)
        loop = Crashy(crashes=0)
        supervisor.start("sessions", loop)
        await eventually(lambda: loop.starts == 1)
        (task,) = [t for t in asyncio.all_tasks() if t.get_name() == "sessions"]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
        assert loop.cancelled == 1
        for _ in range(10):
            await asyncio.sleep(0)
        assert loop.starts == 1
        assert sleep.delays == []
        # A loop stopped on purpose reads as down.
        assert supervisor.problems() != []
        await supervisor.close()

    run(test)
