"""RedisStateStore: the distributed StateStore, shared by every API node and worker.

Key layout (`P` is the prefix given to the store, "impasto" by default; the id comes last in
every per-record key, so no id can make one key collide with another):

```
P:task:{taskUUID}             hash   task_type, request (JSON), expected, status, extra (JSON),
                                     created_at, and when set: model, error (JSON), finished_at
P:results:{taskUUID}          hash   generation index -> JSON {status, item, created_at}
P:progress:{taskUUID}         hash   generation index -> percent; expires (progress_ttl_s)
P:task-deliveries:{taskUUID}  list   delivery ids of the task, in insertion order
P:tasks:processing            zset   taskUUIDs still processing, scored by created_at
P:tasks:finished              zset   taskUUIDs with a finished_at, scored by finished_at
P:delivery:{deliveryId}       hash   task_uuid, kind, url, payload, content_type, attempts,
                                     status, created_at, next_attempt_at, and when set:
                                     index, last_error (JSON), then (JSON)
P:deliveries:pending          zset   pending delivery ids, scored by next_attempt_at
P:image:{imageUUID}           hash   key, content_type, kind, width, height, created_at,
                                     expires_at, and when set: task_uuid
P:images:expiry               zset   imageUUIDs scored by expires_at
```

A field that is None in the record is absent from its hash. Floats are written with `repr`
(which round-trips exactly) and never formatted by Lua, whose `tostring` keeps 14 digits only.

Every write that touches more than one key is one Lua script (`register_script`) or one
MULTI/EXEC, so a node that dies mid-call leaves nothing half-written and concurrent nodes see
each step whole: create_task is an EXISTS-then-HSET script (the taskUUID conflict check),
add_result an HEXISTS-then-HSET on the results hash with its deliveries queued in the same
script, finish_task and settle_delivery compare-and-set on `status`, and claim_deliveries takes
the due ids and pushes their score and `next_attempt_at` by the lease in one script.

The scripts reach keys derived from ids they read (a task's deliveries, a claimed delivery's
hash), which Redis Cluster forbids: the store targets one Redis server (with replicas and
append-only persistence, as operated everywhere), not a Cluster.

Two behaviours differ from SqliteStateStore on purpose, both because many nodes share Redis:
progress is stored in Redis (any node can report it, and it survives a reconnect until its TTL)
rather than in process memory, and open() does not void the delivery leases of a previous run,
since those may belong to nodes that are alive.

Every method raises ServiceUnavailable when Redis cannot be used (StorageFull when it is out of
memory or cannot persist), never a redis-py error: `RedisFailures` below does the mapping for
this store, RedisJobQueue and RedisEventBus alike. Nothing needs reopening after an outage:
redis-py reconnects on the next call.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from redis.asyncio.retry import Retry

from impasto.protocol.errors import ConflictTaskUUID
from impasto.state.records import (
    DeliveryRecord,
    DeliveryStatus,
    ImageRecord,
    ResultRecord,
    TaskRecord,
    TaskStatus,
    TaskView,
)
from impasto.state.redis_client import ScriptedRedis
from impasto.state.redis_errors import guarded
from impasto.state.redis_records import (
    deliveries_arg,
    delivery_of,
    float_text,
    image_fields,
    image_of,
    pairs,
    results_of,
    task_fields,
    task_of,
)
from impasto.state.redis_scripts import (
    ADD_RESULT,
    CLAIM_DELIVERIES,
    CREATE_TASK,
    FINISH_TASK,
    REPLACE_EXTRA,
    RESCHEDULE_DELIVERY,
    SETTLE_DELIVERY,
    SWEEP_TASKS,
)

# One sweep script call handles at most this many tasks, so it never blocks Redis for long.
SWEEP_BATCH = 200


class RedisStateStore(ScriptedRedis):
    """StateStore on a Redis server, shared by many API nodes and workers (layout above)."""

    SCRIPTS: ClassVar[Mapping[str, str]] = {
        "create_task": CREATE_TASK,
        "finish_task": FINISH_TASK,
        "replace_extra": REPLACE_EXTRA,
        "add_result": ADD_RESULT,
        "claim_deliveries": CLAIM_DELIVERIES,
        "reschedule_delivery": RESCHEDULE_DELIVERY,
        "settle_delivery": SETTLE_DELIVERY,
        "sweep_tasks": SWEEP_TASKS,
    }

    def __init__(
        self,
        url: str,
        prefix: str = "impasto",
        *,
        progress_ttl_s: int = 3600,
        retry: Retry | None = None,
        ping_timeout_s: float = 2.0,
    ) -> None:
        super().__init__(url, "the state store", retry=retry, ping_timeout_s=ping_timeout_s)
        self._prefix = prefix
        # Progress is refreshed at every step; the TTL only reclaims what a dead node left.
        self._progress_ttl_s = progress_ttl_s
        self._processing = f"{prefix}:tasks:processing"
        self._finished = f"{prefix}:tasks:finished"
        self._pending = f"{prefix}:deliveries:pending"
        self._expiry = f"{prefix}:images:expiry"

    def _task_key(self, task_uuid: str) -> str:
        return f"{self._prefix}:task:{task_uuid}"

    def _results_key(self, task_uuid: str) -> str:
        return f"{self._prefix}:results:{task_uuid}"

    def _progress_key(self, task_uuid: str) -> str:
        return f"{self._prefix}:progress:{task_uuid}"

    def _task_deliveries_key(self, task_uuid: str) -> str:
        return f"{self._prefix}:task-deliveries:{task_uuid}"

    def _delivery_key(self, delivery_id: str) -> str:
        return f"{self._prefix}:delivery:{delivery_id}"

    def _image_key(self, image_uuid: str) -> str:
        return f"{self._prefix}:image:{image_uuid}"

    @staticmethod
    def _check_inserted(outcome: Any) -> bool:
        """Turn a script's 1 / 0 / duplicate-delivery-id answer into True / False / raise."""
        if isinstance(outcome, str):
            # SqliteStateStore raises sqlite3.IntegrityError here; nothing was written.
            raise ValueError(f"delivery_id {outcome} already exists")
        return bool(outcome)

    @guarded
    async def create_task(self, task: TaskRecord) -> None:
        """Insert a task; raises ConflictTaskUUID if its UUID is in use (until swept)."""
        created = await self._script(
            "create_task",
            [self._task_key(task.task_uuid), self._processing, self._finished],
            [
                task.task_uuid,
                float_text(task.created_at) if task.status == "processing" else "",
                float_text(task.finished_at) if task.finished_at is not None else "",
                *task_fields(task),
            ],
        )
        if not created:
            raise ConflictTaskUUID(
                f"taskUUID {task.task_uuid} was already used; fetch its results with "
                "getResponse or send a new taskUUID.",
                parameter="taskUUID",
            )

    @guarded
    async def get_task(self, task_uuid: str) -> TaskRecord | None:
        """The task, or None if unknown or swept."""
        h = await self._redis.hgetall(self._task_key(task_uuid))
        return task_of(task_uuid, h) if h else None

    @guarded
    async def finish_task(
        self,
        task_uuid: str,
        status: TaskStatus,
        error: dict[str, Any] | None,
        at: float,
        deliveries: Sequence[DeliveryRecord] = (),
    ) -> bool:
        """Finish a still-processing task and queue its deliveries in one script."""
        outcome = await self._script(
            "finish_task",
            [
                self._task_key(task_uuid),
                self._processing,
                self._finished,
                self._progress_key(task_uuid),
            ],
            [
                self._prefix,
                task_uuid,
                status,
                json.dumps(error) if error else "",
                float_text(at),
                deliveries_arg(deliveries),
            ],
        )
        return self._check_inserted(outcome)

    @guarded
    async def update_task_extra(self, task_uuid: str, extra: dict[str, Any]) -> None:
        """Merge into the task's `extra` (optimistically: re-merge if another node wrote)."""
        key = self._task_key(task_uuid)
        while True:
            current = await self._redis.hget(key, "extra")
            if current is None:
                return
            merged = json.dumps({**json.loads(current), **extra})
            replaced = await self._script("replace_extra", [key], [current, merged])
            if replaced != 0:
                return

    @guarded
    async def add_result(
        self,
        result: ResultRecord,
        deliveries: Sequence[DeliveryRecord] = (),
        image: ImageRecord | None = None,
    ) -> bool:
        """Store a result unless its index is stored, and queue its deliveries, in one script.
        Its image is recorded just before (a result that loses a race leaves an image record
        that its expiry sweeps, as a separate put_image would)."""
        if image is not None:
            await self.put_image(image)
        encoded = json.dumps(
            {"status": result.status, "item": result.item, "created_at": result.created_at}
        )
        outcome = await self._script(
            "add_result",
            [self._results_key(result.task_uuid), self._progress_key(result.task_uuid)],
            [self._prefix, str(result.index), encoded, deliveries_arg(deliveries)],
        )
        return self._check_inserted(outcome)

    @guarded
    async def results(self, task_uuid: str) -> list[ResultRecord]:
        """All stored results of a task, by index."""
        stored: dict[str, str] = await self._redis.hgetall(self._results_key(task_uuid))
        return results_of(task_uuid, stored)

    @guarded
    async def task_view(self, task_uuid: str) -> TaskView | None:
        """The task, its results and its deliveries: two round trips."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._task_key(task_uuid))
            pipe.hgetall(self._results_key(task_uuid))
            pipe.lrange(self._task_deliveries_key(task_uuid), 0, -1)
            fields, stored, ids = await pipe.execute()
        if not fields:
            return None
        deliveries = await self._deliveries_of(ids) if ids else []
        return TaskView(task_of(task_uuid, fields), results_of(task_uuid, stored), deliveries)

    @guarded
    async def set_progress(self, task_uuid: str, index: int, percent: int) -> None:
        """Record progress, refreshing the key's TTL."""
        key = self._progress_key(task_uuid)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, str(index), str(percent))
            pipe.expire(key, self._progress_ttl_s)
            await pipe.execute()

    @guarded
    async def progress(self, task_uuid: str) -> dict[int, int]:
        """Progress per generation index, from whichever node reported it."""
        stored: dict[str, str] = await self._redis.hgetall(self._progress_key(task_uuid))
        return {int(index): int(stored[index]) for index in sorted(stored, key=int)}

    @guarded
    async def unfinished_tasks(self) -> list[TaskRecord]:
        """Tasks still processing, oldest first."""
        uuids: list[str] = await self._redis.zrange(self._processing, 0, -1)
        async with self._redis.pipeline(transaction=False) as pipe:
            for task_uuid in uuids:
                pipe.hgetall(self._task_key(task_uuid))
            hashes: list[dict[str, str]] = await pipe.execute()
        # A task swept between the two reads is simply left out.
        return [task_of(u, h) for u, h in zip(uuids, hashes, strict=True) if h]

    @guarded
    async def deliveries(self, task_uuid: str) -> list[DeliveryRecord]:
        """Every delivery of a task, by created_at then index (None first), like SQLite."""
        ids: list[str] = await self._redis.lrange(self._task_deliveries_key(task_uuid), 0, -1)
        return await self._deliveries_of(ids)

    async def _deliveries_of(self, ids: list[str]) -> list[DeliveryRecord]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for delivery_id in ids:
                pipe.hgetall(self._delivery_key(delivery_id))
            hashes: list[dict[str, str]] = await pipe.execute()
        records = [delivery_of(i, h) for i, h in zip(ids, hashes, strict=True) if h]
        # A stable sort over insertion order: ties keep the order they were queued in.
        records.sort(key=lambda d: (d.created_at, d.index is not None, d.index or 0))
        return records

    @guarded
    async def claim_deliveries(
        self, now: float, limit: int, lease_s: float
    ) -> list[DeliveryRecord]:
        """Take due pending deliveries and push them `lease_s` ahead, in one script."""
        claimed: list[list[Any]] = await self._script(
            "claim_deliveries",
            [self._pending],
            [self._prefix, float_text(now), limit, float_text(now + lease_s)],
        )
        return [delivery_of(str(i), pairs(flat)) for i, flat in claimed]

    @guarded
    async def next_delivery_at(self) -> float | None:
        """When the earliest pending delivery is due, or None."""
        first: list[tuple[str, float]] = await self._redis.zrange(
            self._pending, 0, 0, withscores=True
        )
        return float(first[0][1]) if first else None

    @guarded
    async def reschedule_delivery(
        self, delivery_id: str, attempts: int, next_attempt_at: float, error: dict[str, Any]
    ) -> None:
        """Record a failed attempt of a pending delivery and when to try again."""
        await self._script(
            "reschedule_delivery",
            [self._delivery_key(delivery_id), self._pending],
            # SqliteStateStore stores this error even when empty, so `{}` reads back as {}.
            [delivery_id, str(attempts), float_text(next_attempt_at), json.dumps(error)],
        )

    @guarded
    async def settle_delivery(
        self,
        delivery_id: str,
        status: DeliveryStatus,
        attempts: int,
        error: dict[str, Any] | None,
        follow_ups: Sequence[DeliveryRecord] = (),
    ) -> bool:
        """Settle a pending delivery and queue its follow-ups in one script."""
        outcome = await self._script(
            "settle_delivery",
            [self._delivery_key(delivery_id), self._pending],
            [
                self._prefix,
                delivery_id,
                status,
                str(attempts),
                json.dumps(error) if error else "",
                deliveries_arg(follow_ups),
            ],
        )
        return self._check_inserted(outcome)

    @guarded
    async def put_image(self, image: ImageRecord) -> None:
        """Record (or replace) an image and its place in the expiry index."""
        key = self._image_key(image.image_uuid)
        async with self._redis.pipeline(transaction=True) as pipe:
            # Replace, not merge: a field that became None must disappear.
            pipe.delete(key)
            pipe.hset(key, mapping=image_fields(image))
            pipe.zadd(self._expiry, {image.image_uuid: float(image.expires_at)})
            await pipe.execute()

    @guarded
    async def get_image(self, image_uuid: str) -> ImageRecord | None:
        """The image record, or None."""
        h = await self._redis.hgetall(self._image_key(image_uuid))
        return image_of(image_uuid, h) if h else None

    @guarded
    async def delete_image(self, image_uuid: str) -> None:
        """Forget an image record and its expiry entry."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._image_key(image_uuid))
            pipe.zrem(self._expiry, image_uuid)
            await pipe.execute()

    @guarded
    async def expired_images(self, now: float, limit: int) -> list[ImageRecord]:
        """Images whose expiry has passed, soonest first."""
        uuids: list[str] = await self._redis.zrangebyscore(
            self._expiry, "-inf", float_text(now), start=0, num=limit
        )
        async with self._redis.pipeline(transaction=False) as pipe:
            for image_uuid in uuids:
                pipe.hgetall(self._image_key(image_uuid))
            hashes: list[dict[str, str]] = await pipe.execute()
        return [image_of(u, h) for u, h in zip(uuids, hashes, strict=True) if h]

    @guarded
    async def sweep_tasks(self, finished_before: float) -> int:
        """Delete tasks finished before the time, with their results and settled deliveries.

        Each task goes in one script; a large sweep runs as several scripts of SWEEP_BATCH
        tasks so that Redis keeps serving other nodes in between.
        """
        swept = 0
        while True:
            count = int(
                await self._script(
                    "sweep_tasks",
                    [self._finished, self._processing],
                    [self._prefix, float_text(finished_before), SWEEP_BATCH],
                )
            )
            swept += count
            if count < SWEEP_BATCH:
                return swept
