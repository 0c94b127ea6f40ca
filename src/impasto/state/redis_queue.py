"""RedisJobQueue: generation jobs on Redis Streams, one stream per model, one consumer group.

    {prefix}:jobs:{air}    stream; entries {task, index}; consumer group "workers"

A worker reads with XREADGROUP (the entry becomes pending under its consumer name), renews its
lease while it works by re-claiming its own entries (XCLAIM resets the idle time), and
acknowledges with XACK + XDEL once the outcome is stored. Entries idle longer than the lease
belong to a worker that died: XAUTOCLAIM hands them to a live one.

Every method raises ServiceUnavailable while Redis cannot be used (see RedisFailures) and works
again once it is back. A Redis that restarted without persistence has lost the consumer
groups: the group commands create them again and retry once, rather than failing with NOGROUP
until this process restarts.
"""

from __future__ import annotations

import functools
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.exceptions import ResponseError

from impasto.state.base import QueuedJob
from impasto.state.redis_errors import (
    RedisFailures,
    guarded,
    reconnecting_retry,
    redis_location,
)

T = TypeVar("T")

GROUP = "workers"


class RedisJobQueue:
    """JobQueue on Redis Streams."""

    def __init__(
        self,
        url: str,
        prefix: str = "impasto",
        consumer: str | None = None,
        *,
        retry: Retry | None = None,
        ping_timeout_s: float = 2.0,
    ) -> None:
        options: dict[str, Any] = {"retry": retry if retry is not None else reconnecting_retry()}
        self._redis = redis.Redis.from_url(url, decode_responses=True, **options)
        self._failures = RedisFailures(f"the job queue ({redis_location(url)})")
        self._ping_timeout_s = ping_timeout_s
        self._prefix = prefix
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._groups: set[str] = set()

    def _stream(self, air: str) -> str:
        return f"{self._prefix}:jobs:{air}"

    async def _ensure_group(self, stream: str) -> None:
        if stream in self._groups:
            return
        try:
            await self._redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(stream)

    async def _grouped(self, streams: Sequence[str], command: Callable[[], Awaitable[T]]) -> T:
        """Run a consumer-group command on streams whose group exists, creating it again
        (once) if Redis lost it since we created it."""
        for stream in streams:
            await self._ensure_group(stream)
        try:
            return await command()
        except ResponseError as exc:
            if not str(exc).startswith("NOGROUP"):
                raise
        self._groups.difference_update(streams)
        for stream in streams:
            await self._ensure_group(stream)
        return await command()

    async def ping(self) -> None:
        """Raise ServiceUnavailable unless Redis answers a PING in time."""
        await self._failures.ping(self._redis, self._ping_timeout_s)

    @guarded
    async def put(self, jobs: Sequence[QueuedJob]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for job in jobs:
                await self._ensure_group(self._stream(job.air))
                pipe.xadd(self._stream(job.air), {"task": job.task_uuid, "index": job.index})
            await pipe.execute()

    @guarded
    async def take(self, airs: Sequence[str], count: int, block_s: float) -> list[QueuedJob]:
        streams = {self._stream(air): ">" for air in airs}
        reply = await self._grouped(
            list(streams),
            functools.partial(
                self._redis.xreadgroup,
                GROUP,
                self.consumer,
                cast(Any, streams),
                count=count,
                block=max(1, int(block_s * 1000)),
            ),
        )
        jobs: list[QueuedJob] = []
        for stream, entries in reply or []:
            air = stream[len(self._prefix) + len(":jobs:") :]
            for entry_id, fields in entries:
                jobs.append(_job(air, entry_id, fields))
        return jobs[:count]

    @guarded
    async def reclaim(self, airs: Sequence[str], lease_s: float, count: int) -> list[QueuedJob]:
        jobs: list[QueuedJob] = []
        for air in airs:
            stream = self._stream(air)
            reply = await self._grouped(
                [stream],
                functools.partial(
                    self._redis.xautoclaim,
                    stream,
                    GROUP,
                    self.consumer,
                    min_idle_time=int(lease_s * 1000),
                    start_id="0-0",
                    count=count - len(jobs),
                ),
            )
            claimed = [(entry_id, fields) for entry_id, fields in reply[1] if fields]
            counts = await self._delivery_counts(stream, [entry_id for entry_id, _ in claimed])
            for entry_id, fields in claimed:  # entries deleted meanwhile come back empty
                jobs.append(_job(air, entry_id, fields, counts.get(entry_id, 1)))
            if len(jobs) >= count:
                break
        return jobs

    async def _delivery_counts(self, stream: str, ids: list[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry_id in ids:
            pending = await self._redis.xpending_range(
                stream, GROUP, min=entry_id, max=entry_id, count=1
            )
            for entry in pending:
                counts[str(entry["message_id"])] = int(entry["times_delivered"])
        return counts

    @guarded
    async def touch(self, jobs: Sequence[QueuedJob]) -> None:
        by_air: dict[str, list[str]] = {}
        for job in jobs:
            by_air.setdefault(job.air, []).append(job.entry_id)
        for air, ids in by_air.items():
            stream = self._stream(air)
            await self._grouped(
                [stream],
                functools.partial(
                    self._redis.xclaim,
                    stream,
                    GROUP,
                    self.consumer,
                    min_idle_time=0,
                    message_ids=cast(Any, ids),
                    justid=True,
                ),
            )

    @guarded
    async def ack(self, job: QueuedJob) -> None:
        stream = self._stream(job.air)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, GROUP, job.entry_id)
            pipe.xdel(stream, job.entry_id)
            await pipe.execute()

    @guarded
    async def depth(self, air: str) -> int:
        """Entries not yet acknowledged for a model (waiting or in progress)."""
        return int(await self._redis.xlen(self._stream(air)))

    async def close(self) -> None:
        await self._redis.aclose()


def _job(air: str, entry_id: str, fields: dict[str, str], deliveries: int = 1) -> QueuedJob:
    return QueuedJob(
        air=air,
        task_uuid=fields["task"],
        index=int(fields["index"]),
        entry_id=entry_id,
        deliveries=deliveries,
    )
