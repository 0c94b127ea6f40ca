"""The UsageMeter: every finished image, recorded once in the usage ledger with its key,
model, size and cost, and counted in the per-key metrics.

It is told by the outcome recorder after a result is stored for the first time (a re-run of
the same generation stores nothing and is not metered again). Which key made the task is read
from the task record (`extra.keyId` / `extra.keyName`, written at acceptance), so a worker on
another machine meters what an API node accepted. A ledger that is away does not fail the
image: the record is retried a few times and then logged as lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from impasto.protocol.errors import ServiceUnavailable
from impasto.service.metrics import Metrics
from impasto.state.base import StateStore
from impasto.tenancy.keys import ANONYMOUS, UsageLedger, UsageRecord

log = logging.getLogger("impasto.usage")

Sleep = Callable[[float], Awaitable[None]]


class UsageMeter:
    """Records finished images in the ledger."""

    def __init__(
        self,
        state: StateStore,
        ledger: UsageLedger,
        metrics: Metrics | None = None,
        *,
        attempts: int = 5,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._state = state
        self._ledger = ledger
        self._metrics = metrics
        self._attempts = attempts
        self._sleep = sleep

    async def image_stored(
        self, task_uuid: str, index: int, model: str, width: int, height: int, cost: float
    ) -> None:
        delay = 0.5
        for attempt in range(1, self._attempts + 1):
            try:
                await self._record(task_uuid, index, model, width, height, cost)
                return
            except ServiceUnavailable as exc:
                if attempt == self._attempts:
                    log.error(
                        "usage of image %d of task %s not recorded: %s", index, task_uuid, exc
                    )
                    return
            await self._sleep(delay)
            delay *= 2

    async def _record(
        self, task_uuid: str, index: int, model: str, width: int, height: int, cost: float
    ) -> None:
        task = await self._state.get_task(task_uuid)
        extra = task.extra if task is not None else {}
        key_id = str(extra.get("keyId", ANONYMOUS.key_id))
        key_name = str(extra.get("keyName", ANONYMOUS.name))
        record = UsageRecord(
            task_uuid=task_uuid,
            index=index,
            key_id=key_id,
            key_name=key_name,
            model=model,
            width=width,
            height=height,
            cost=cost,
            at=time.time(),
        )
        await self._ledger.record_usage([record])
        if self._metrics is not None:
            self._metrics.observe_image(key_name, cost)
