"""Background loops under supervision: a loop that crashes (or returns) is logged and started
again with exponential backoff, and while it is down the process reports itself unhealthy.

Each loop is expected to handle its own recoverable errors and run forever; reaching this
supervisor's handler means a bug or an unexpected failure, which must not silently stop
webhooks, the sweeper or a worker's lease renewals for the rest of the process's life.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("impasto.supervisor")

LoopFactory = Callable[[], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]


@dataclass
class LoopState:
    """What is known of one supervised loop."""

    name: str
    running: bool = False
    restarts: int = 0
    last_error: str | None = None
    down_since: float | None = None


class Supervisor:
    """Runs named loops, restarting each with backoff when it stops."""

    def __init__(
        self,
        *,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        base_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self._sleep = sleep
        self._clock = clock
        self._base_backoff_s = base_backoff_s
        self._max_backoff_s = max_backoff_s
        self._loops: dict[str, LoopState] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, name: str, factory: LoopFactory) -> None:
        """Run `factory()` now and again whenever it stops, until close()."""
        state = LoopState(name)
        self._loops[name] = state
        self._tasks.append(asyncio.create_task(self._supervise(state, factory), name=name))

    async def _supervise(self, state: LoopState, factory: LoopFactory) -> None:
        backoff = self._base_backoff_s
        while True:
            state.running = True
            state.down_since = None
            started = self._clock()
            try:
                await factory()
                state.last_error = "the loop returned"
                log.error("background loop %s stopped; starting it again", state.name)
            except asyncio.CancelledError:
                state.running = False
                raise
            except Exception as exc:
                state.last_error = type(exc).__name__
                log.exception("background loop %s crashed; starting it again", state.name)
            state.running = False
            state.restarts += 1
            state.down_since = self._clock()
            # A loop that ran for a good while before failing starts over from a short wait.
            if self._clock() - started > self._max_backoff_s * 2:
                backoff = self._base_backoff_s
            await self._sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff_s)

    def problems(self) -> list[str]:
        """One line per loop that is down right now."""
        return [
            f"background loop {s.name} is down ({s.last_error}; restarted {s.restarts} times)"
            for s in self._loops.values()
            if not s.running
        ]

    def states(self) -> dict[str, LoopState]:
        return dict(self._loops)

    async def close(self, recancel_s: float = 1.0) -> None:
        """Cancel every loop and wait for them to end. A loop still running `recancel_s`
        after its cancellation is cancelled again: on Python 3.11 `asyncio.wait_for` (which
        redis-py sends every command through) drops a cancellation that arrives as its
        command completes, and the loop would go on forever."""
        pending = set(self._tasks)
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=recancel_s)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
