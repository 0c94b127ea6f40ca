"""The TTL sweeper: deletes expired images (bytes and records) and tasks past retention."""

from __future__ import annotations

import asyncio
import logging
import time

from impasto.state.base import StateStore
from impasto.storage.base import ImageStore

log = logging.getLogger("impasto.sweeper")


class Sweeper:
    """Runs `sweep()` every `interval_s` seconds until cancelled."""

    def __init__(
        self, state: StateStore, images: ImageStore, *, interval_s: float, task_retention_s: int
    ) -> None:
        self._state = state
        self._images = images
        self._interval_s = interval_s
        self._task_retention_s = task_retention_s

    async def sweep(self, now: float | None = None) -> tuple[int, int]:
        """One pass; returns (images deleted, tasks deleted)."""
        now = time.time() if now is None else now
        images = 0
        while True:
            expired = await self._state.expired_images(now, limit=500)
            for record in expired:
                await self._images.delete(record.key)
                await self._state.delete_image(record.image_uuid)
            images += len(expired)
            if len(expired) < 500:
                break
        tasks = await self._state.sweep_tasks(now - self._task_retention_s)
        if images or tasks:
            log.info("swept %d expired image(s) and %d old task(s)", images, tasks)
        return images, tasks

    async def run(self) -> None:
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweep failed; trying again next interval")
            await asyncio.sleep(self._interval_s)
