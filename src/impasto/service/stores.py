"""The shared stores of a process, opened from Settings and closed in reverse order.

Embedded: SQLite (tasks, keys, usage), in-process events and rate limits, local files.
Distributed: Redis state, events, job queue, keys, usage and rate limits (so limits hold
across API nodes), with the configured image storage, shared by every node.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from impasto.settings import Settings
from impasto.state.base import EventBus, JobQueue, StateStore
from impasto.state.events import LocalEventBus
from impasto.state.sqlite import SqliteStateStore
from impasto.storage.base import ImageStore
from impasto.storage.factory import open_image_store
from impasto.tenancy.keys import TenancyStore
from impasto.tenancy.limits import MemoryRateLimiter, RateLimiter
from impasto.tenancy.sqlite_store import SqliteTenancyStore

log = logging.getLogger("impasto.runtime")


@dataclass(frozen=True)
class SharedStores:
    state: StateStore
    bus: EventBus
    queue: JobQueue | None
    images: ImageStore
    tenancy: TenancyStore
    limiter: RateLimiter


@asynccontextmanager
async def shared_stores(settings: Settings) -> AsyncIterator[SharedStores]:
    async with AsyncExitStack() as stack:
        images = await stack.enter_async_context(open_image_store(settings))
        if not settings.distributed:
            sqlite = SqliteStateStore(settings.state_path)
            await sqlite.open()
            stack.push_async_callback(sqlite.close)
            tenancy = SqliteTenancyStore(settings.state_path)
            await tenancy.open()
            stack.push_async_callback(tenancy.close)
            yield SharedStores(sqlite, LocalEventBus(), None, images, tenancy, MemoryRateLimiter())
            return
        from impasto.state.redis_events import RedisEventBus
        from impasto.state.redis_queue import RedisJobQueue
        from impasto.state.redis_store import RedisStateStore
        from impasto.tenancy.redis_limits import RedisRateLimiter
        from impasto.tenancy.redis_store import RedisTenancyStore

        if not settings.storage:
            log.warning(
                "shared state with local image files: every node must see the same %s",
                settings.images_dir,
            )
        url, prefix = str(settings.state), settings.redis_prefix
        state = RedisStateStore(url, prefix=prefix)
        await state.open()
        stack.push_async_callback(state.close)
        bus = RedisEventBus(url, prefix=prefix)
        await bus.open()
        stack.push_async_callback(bus.close)
        queue = RedisJobQueue(url, prefix=prefix)
        stack.push_async_callback(queue.close)
        redis_tenancy = RedisTenancyStore(url, prefix=prefix)
        await redis_tenancy.open()
        stack.push_async_callback(redis_tenancy.close)
        limiter = RedisRateLimiter(url, prefix=prefix)
        await limiter.open()
        stack.push_async_callback(limiter.close)
        yield SharedStores(state, bus, queue, images, redis_tenancy, limiter)
