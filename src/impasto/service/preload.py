"""Models named in IMPASTO_PRELOAD, loaded and warmed up in the background after start-up;
readiness waits for them."""

from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger("impasto.runtime")


class Warmer(Protocol):
    async def warm(self, air: str) -> float: ...


class Preloader:
    """Loads each AIR in turn; remembers which are still loading and which failed."""

    def __init__(self, scheduler: Warmer, airs: list[str]) -> None:
        self._scheduler = scheduler
        self._pending = list(dict.fromkeys(airs))
        self._failed: dict[str, str] = {}

    async def run(self) -> None:
        while self._pending:
            air = self._pending[0]
            try:
                seconds = await self._scheduler.warm(air)
            except Exception as exc:
                # The model stays unloaded; tasks for it try again (and fail with the reason).
                self._failed[air] = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                log.exception("preloading %s failed", air)
            else:
                log.info("preloaded %s in %.1f s", air, seconds)
            self._pending.pop(0)

    def problems(self) -> list[str]:
        found = [f"loading {', '.join(self._pending)}"] if self._pending else []
        found.extend(f"preloading {air} failed: {why}" for air, why in self._failed.items())
        return found
