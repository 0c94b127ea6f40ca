"""The preloader with a fake scheduler: readiness names what is loading, then what failed."""

from __future__ import annotations

import asyncio

from impasto.protocol.errors import ImpastoError
from impasto.service.preload import Preloader


class GatedScheduler:
    """warm() waits until the test lets each model finish (or fail)."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Future[float]] = {}
        self.warmed: list[str] = []

    async def warm(self, air: str) -> float:
        self.warmed.append(air)
        self.gates[air] = asyncio.get_running_loop().create_future()
        return await self.gates[air]


def test_readiness_reports_loading_models_until_they_are_warm_and_keeps_failures() -> None:
    async def scenario() -> None:
        scheduler = GatedScheduler()
        preloader = Preloader(scheduler, ["a:1@1", "b:1@1", "a:1@1"])
        assert preloader.problems() == ["loading a:1@1, b:1@1"]
        running = asyncio.create_task(preloader.run())
        await asyncio.sleep(0)
        scheduler.gates["a:1@1"].set_result(0.5)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert preloader.problems() == ["loading b:1@1"]
        scheduler.gates["b:1@1"].set_exception(ImpastoError("no weights at /models/b"))
        await running
        assert preloader.problems() == ["preloading b:1@1 failed: no weights at /models/b"]
        assert scheduler.warmed == ["a:1@1", "b:1@1"]  # each once

    asyncio.run(scenario())


def test_nothing_to_preload_is_ready_at_once() -> None:
    assert Preloader(GatedScheduler(), []).problems() == []
