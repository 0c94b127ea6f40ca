"""In-process EventBus: one asyncio.Event per subscriber."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class LocalSubscription:
    """Set by every publish for its task; cleared when read."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def wait(self, timeout: float | None) -> bool:
        # asyncio.timeout, not wait_for: no task of its own per wait (Python 3.11).
        if not self._event.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self._event.wait()
            except TimeoutError:
                return False
        self._event.clear()
        return True


class LocalEventBus:
    """EventBus for one process."""

    def __init__(self) -> None:
        self._subscribers: defaultdict[str, set[LocalSubscription]] = defaultdict(set)

    @property
    def healthy(self) -> bool:
        """Always: nothing outside the process can fail it."""
        return True

    async def ping(self) -> None:
        """Nothing to check in one process."""

    async def publish(self, task_uuid: str) -> None:
        for subscription in self._subscribers.get(task_uuid, ()):
            subscription.notify()

    @asynccontextmanager
    async def subscribe(self, task_uuid: str) -> AsyncIterator[LocalSubscription]:
        subscription = LocalSubscription()
        self._subscribers[task_uuid].add(subscription)
        try:
            yield subscription
        finally:
            subscribers = self._subscribers[task_uuid]
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscribers[task_uuid]
