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
from collections.abc import Sequence
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.retry import Retry

from impasto.protocol.errors import ConflictTaskUUID
from impasto.state.records import (
    DeliveryKind,
    DeliveryRecord,
    DeliveryStatus,
    ImageKind,
    ImageRecord,
    ResultRecord,
    ResultStatus,
    TaskRecord,
    TaskStatus,
    TaskView,
)
from impasto.state.redis_errors import (
    RedisFailures,
    guarded,
    reconnecting_retry,
    redis_location,
)

# Shared by the scripts that queue deliveries. `batch` is the JSON that _deliveries_arg builds:
# [{"id", "task", "pending", "due", "fields": [name, value, ...]}], every value a string.
_LUA_DELIVERIES = """
local function decode_new_deliveries(prefix, encoded)
  local batch = cjson.decode(encoded)
  local seen = {}
  for _, d in ipairs(batch) do
    if seen[d.id] or redis.call('EXISTS', prefix .. ':delivery:' .. d.id) == 1 then
      return nil, d.id
    end
    seen[d.id] = true
  end
  return batch, nil
end

local function insert_deliveries(prefix, batch)
  for _, d in ipairs(batch) do
    redis.call('HSET', prefix .. ':delivery:' .. d.id, unpack(d.fields))
    redis.call('RPUSH', prefix .. ':task-deliveries:' .. d.task, d.id)
    if d.pending then
      redis.call('ZADD', prefix .. ':deliveries:pending', d.due, d.id)
    end
  end
end
"""

# KEYS: task, processing, finished. ARGV: uuid, processing score or '', finished score or '',
# then the hash's field/value pairs.
_CREATE_TASK = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if ARGV[2] ~= '' then redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1]) end
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1]) end
return 1
"""

# KEYS: task, processing, finished, progress. ARGV: prefix, uuid, status, error or '', at,
# deliveries. Returns 1, 0 (already finished) or the id of a delivery that already exists.
_FINISH_TASK = (
    _LUA_DELIVERIES
    + """
-- Like SqliteStateStore, progress is dropped whether or not this call finishes the task.
redis.call('DEL', KEYS[4])
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' then return 0 end
local batch, duplicate = decode_new_deliveries(ARGV[1], ARGV[6])
if duplicate then return duplicate end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'finished_at', ARGV[5])
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[1], 'error')
else
  redis.call('HSET', KEYS[1], 'error', ARGV[4])
end
if ARGV[3] ~= 'processing' then redis.call('ZREM', KEYS[2], ARGV[2]) end
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[2])
insert_deliveries(ARGV[1], batch)
return 1
"""
)

# KEYS: task. ARGV: the extra JSON read before merging, the merged JSON.
# Returns -1 (no such task), 0 (extra changed meanwhile: merge again) or 1.
_REPLACE_EXTRA = """
local current = redis.call('HGET', KEYS[1], 'extra')
if not current then return -1 end
if current ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'extra', ARGV[2])
return 1
"""

# KEYS: results, progress. ARGV: prefix, index, encoded result, deliveries.
# Returns 1, 0 (index already stored) or the id of a delivery that already exists.
_ADD_RESULT = (
    _LUA_DELIVERIES
    + """
if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then return 0 end
local batch, duplicate = decode_new_deliveries(ARGV[1], ARGV[4])
if duplicate then return duplicate end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('HDEL', KEYS[2], ARGV[2])
insert_deliveries(ARGV[1], batch)
return 1
"""
)

# KEYS: pending. ARGV: prefix, now, limit, lease deadline. Returns each claimed delivery's
# hash as it was before the claim (what SqliteStateStore returns too).
_CLAIM_DELIVERIES = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
local claimed = {}
for _, id in ipairs(ids) do
  local key = ARGV[1] .. ':delivery:' .. id
  local fields = redis.call('HGETALL', key)
  if #fields == 0 then
    -- An index entry without its hash would otherwise be re-claimed forever.
    redis.call('ZREM', KEYS[1], id)
  else
    claimed[#claimed + 1] = {id, fields}
    redis.call('HSET', key, 'next_attempt_at', ARGV[4])
    redis.call('ZADD', KEYS[1], ARGV[4], id)
  end
end
return claimed
"""

# KEYS: delivery, pending. ARGV: id, attempts, next attempt, error.
_RESCHEDULE_DELIVERY = """
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then return 0 end
redis.call('HSET', KEYS[1], 'attempts', ARGV[2], 'next_attempt_at', ARGV[3],
           'last_error', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""

# KEYS: delivery, pending. ARGV: prefix, id, status, attempts, error or '', follow-ups.
# Returns 1, 0 (already settled) or the id of a follow-up that already exists.
_SETTLE_DELIVERY = (
    _LUA_DELIVERIES
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then return 0 end
local batch, duplicate = decode_new_deliveries(ARGV[1], ARGV[6])
if duplicate then return duplicate end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'attempts', ARGV[4])
if ARGV[5] == '' then
  redis.call('HDEL', KEYS[1], 'last_error')
else
  redis.call('HSET', KEYS[1], 'last_error', ARGV[5])
end
if ARGV[3] ~= 'pending' then redis.call('ZREM', KEYS[2], ARGV[2]) end
insert_deliveries(ARGV[1], batch)
return 1
"""
)

# KEYS: finished, processing. ARGV: prefix, finished before (exclusive), batch size.
# Deletes each task, its results and its settled deliveries; pending deliveries stay queued.
_SWEEP_TASKS = """
local uuids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2], 'LIMIT', 0, ARGV[3])
for _, uuid in ipairs(uuids) do
  redis.call('DEL', ARGV[1] .. ':task:' .. uuid, ARGV[1] .. ':results:' .. uuid)
  local list = ARGV[1] .. ':task-deliveries:' .. uuid
  for _, id in ipairs(redis.call('LRANGE', list, 0, -1)) do
    local key = ARGV[1] .. ':delivery:' .. id
    if redis.call('HGET', key, 'status') ~= 'pending' then
      redis.call('DEL', key)
      redis.call('LREM', list, 0, id)
    end
  end
  redis.call('ZREM', KEYS[1], uuid)
  redis.call('ZREM', KEYS[2], uuid)
end
return #uuids
"""

# One sweep script call handles at most this many tasks, so it never blocks Redis for long.
SWEEP_BATCH = 200


def _float(value: float) -> str:
    return repr(float(value))


def _task_fields(task: TaskRecord) -> list[str]:
    fields = {
        "task_type": task.task_type,
        "request": json.dumps(task.request),
        "expected": str(task.expected),
        "status": task.status,
        "extra": json.dumps(task.extra),
        "created_at": _float(task.created_at),
    }
    if task.model is not None:
        fields["model"] = task.model
    # compat: SqliteStateStore stores a falsy error as NULL, so `{}` reads back as None.
    if task.error:
        fields["error"] = json.dumps(task.error)
    if task.finished_at is not None:
        fields["finished_at"] = _float(task.finished_at)
    return [part for pair in fields.items() for part in pair]


def _results(task_uuid: str, stored: dict[str, str]) -> list[ResultRecord]:
    records = []
    for index in sorted(stored, key=int):
        value = json.loads(stored[index])
        records.append(
            ResultRecord(
                task_uuid=task_uuid,
                index=int(index),
                status=cast(ResultStatus, value["status"]),
                item=value["item"],
                created_at=float(value["created_at"]),
            )
        )
    return records


def _task(task_uuid: str, h: dict[str, str]) -> TaskRecord:
    return TaskRecord(
        task_uuid=task_uuid,
        task_type=h["task_type"],
        model=h.get("model"),
        request=json.loads(h["request"]),
        expected=int(h["expected"]),
        status=cast(TaskStatus, h["status"]),
        error=json.loads(h["error"]) if "error" in h else None,
        extra=json.loads(h["extra"]),
        created_at=float(h["created_at"]),
        finished_at=float(h["finished_at"]) if "finished_at" in h else None,
    )


def _delivery_fields(d: DeliveryRecord) -> list[str]:
    fields = {
        "task_uuid": d.task_uuid,
        "kind": d.kind,
        "url": d.url,
        "payload": d.payload,
        "content_type": d.content_type,
        "attempts": str(d.attempts),
        "status": d.status,
        "created_at": _float(d.created_at),
        "next_attempt_at": _float(d.next_attempt_at),
    }
    if d.index is not None:
        fields["index"] = str(d.index)
    # Falsy JSON is stored as absent, like SqliteStateStore's NULL.
    if d.last_error:
        fields["last_error"] = json.dumps(d.last_error)
    if d.then:
        fields["then"] = json.dumps(d.then)
    return [part for pair in fields.items() for part in pair]


def _deliveries_arg(deliveries: Sequence[DeliveryRecord]) -> str:
    # ensure_ascii=False: the strings reach Lua as UTF-8 and cjson has no escapes to undo.
    return json.dumps(
        [
            {
                "id": d.delivery_id,
                "task": d.task_uuid,
                "pending": d.status == "pending",
                "due": _float(d.next_attempt_at),
                "fields": _delivery_fields(d),
            }
            for d in deliveries
        ],
        ensure_ascii=False,
    )


def _delivery(delivery_id: str, h: dict[str, str]) -> DeliveryRecord:
    return DeliveryRecord(
        delivery_id=delivery_id,
        task_uuid=h["task_uuid"],
        index=int(h["index"]) if "index" in h else None,
        kind=cast(DeliveryKind, h["kind"]),
        url=h["url"],
        payload=h["payload"],
        content_type=h["content_type"],
        attempts=int(h["attempts"]),
        status=cast(DeliveryStatus, h["status"]),
        last_error=json.loads(h["last_error"]) if "last_error" in h else None,
        then=json.loads(h["then"]) if "then" in h else None,
        created_at=float(h["created_at"]),
        next_attempt_at=float(h["next_attempt_at"]),
    )


def _image_fields(image: ImageRecord) -> dict[str, str]:
    fields = {
        "key": image.key,
        "content_type": image.content_type,
        "kind": image.kind,
        "width": str(image.width),
        "height": str(image.height),
        "created_at": _float(image.created_at),
        "expires_at": _float(image.expires_at),
    }
    if image.task_uuid is not None:
        fields["task_uuid"] = image.task_uuid
    return fields


def _image(image_uuid: str, h: dict[str, str]) -> ImageRecord:
    return ImageRecord(
        image_uuid=image_uuid,
        key=h["key"],
        content_type=h["content_type"],
        kind=cast(ImageKind, h["kind"]),
        width=int(h["width"]),
        height=int(h["height"]),
        task_uuid=h.get("task_uuid"),
        created_at=float(h["created_at"]),
        expires_at=float(h["expires_at"]),
    )


def _pairs(flat: list[str]) -> dict[str, str]:
    """A hash as HGETALL returns it from inside a script: [field, value, field, value, ...]."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


class RedisStateStore:
    """StateStore on a Redis server, shared by many API nodes and workers (layout above)."""

    def __init__(
        self,
        url: str,
        prefix: str = "impasto",
        *,
        progress_ttl_s: int = 3600,
        retry: Retry | None = None,
        ping_timeout_s: float = 2.0,
    ) -> None:
        self._url = url
        self._prefix = prefix
        self._retry = retry if retry is not None else reconnecting_retry()
        self._ping_timeout_s = ping_timeout_s
        self._failures = RedisFailures(f"the state store ({redis_location(url)})")
        # Progress is refreshed at every step; the TTL only reclaims what a dead node left.
        self._progress_ttl_s = progress_ttl_s
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._processing = f"{prefix}:tasks:processing"
        self._finished = f"{prefix}:tasks:finished"
        self._pending = f"{prefix}:deliveries:pending"
        self._expiry = f"{prefix}:images:expiry"

    @guarded
    async def open(self) -> None:
        """Connect, and fail now rather than at the first request if Redis is unreachable."""
        options: dict[str, Any] = {"retry": self._retry}
        client = Redis.from_url(self._url, decode_responses=True, **options)
        try:
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        self._client = client
        self._scripts = {
            name: client.register_script(source)
            for name, source in (
                ("create_task", _CREATE_TASK),
                ("finish_task", _FINISH_TASK),
                ("replace_extra", _REPLACE_EXTRA),
                ("add_result", _ADD_RESULT),
                ("claim_deliveries", _CLAIM_DELIVERIES),
                ("reschedule_delivery", _RESCHEDULE_DELIVERY),
                ("settle_delivery", _SETTLE_DELIVERY),
                ("sweep_tasks", _SWEEP_TASKS),
            )
        }

    @property
    def _redis(self) -> Any:
        if self._client is None:
            raise RuntimeError("RedisStateStore used before open()")
        return self._client

    async def ping(self) -> None:
        """Raise ServiceUnavailable unless Redis answers a PING in time."""
        await self._failures.ping(self._redis, self._ping_timeout_s)

    async def _script(self, name: str, keys: list[str], args: list[str | int]) -> Any:
        redis = self._redis  # raises before open(), like every other method
        return await self._scripts[name](keys=keys, args=args, client=redis)

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
                _float(task.created_at) if task.status == "processing" else "",
                _float(task.finished_at) if task.finished_at is not None else "",
                *_task_fields(task),
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
        return _task(task_uuid, h) if h else None

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
                _float(at),
                _deliveries_arg(deliveries),
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
            [self._prefix, str(result.index), encoded, _deliveries_arg(deliveries)],
        )
        return self._check_inserted(outcome)

    @guarded
    async def results(self, task_uuid: str) -> list[ResultRecord]:
        """All stored results of a task, by index."""
        stored: dict[str, str] = await self._redis.hgetall(self._results_key(task_uuid))
        return _results(task_uuid, stored)

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
        return TaskView(_task(task_uuid, fields), _results(task_uuid, stored), deliveries)

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
        return [_task(u, h) for u, h in zip(uuids, hashes, strict=True) if h]

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
        records = [_delivery(i, h) for i, h in zip(ids, hashes, strict=True) if h]
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
            [self._prefix, _float(now), limit, _float(now + lease_s)],
        )
        return [_delivery(str(i), _pairs(flat)) for i, flat in claimed]

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
            [delivery_id, str(attempts), _float(next_attempt_at), json.dumps(error)],
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
                _deliveries_arg(follow_ups),
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
            pipe.hset(key, mapping=_image_fields(image))
            pipe.zadd(self._expiry, {image.image_uuid: float(image.expires_at)})
            await pipe.execute()

    @guarded
    async def get_image(self, image_uuid: str) -> ImageRecord | None:
        """The image record, or None."""
        h = await self._redis.hgetall(self._image_key(image_uuid))
        return _image(image_uuid, h) if h else None

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
            self._expiry, "-inf", _float(now), start=0, num=limit
        )
        async with self._redis.pipeline(transaction=False) as pipe:
            for image_uuid in uuids:
                pipe.hgetall(self._image_key(image_uuid))
            hashes: list[dict[str, str]] = await pipe.execute()
        return [_image(u, h) for u, h in zip(uuids, hashes, strict=True) if h]

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
                    [self._prefix, _float(finished_before), SWEEP_BATCH],
                )
            )
            swept += count
            if count < SWEEP_BATCH:
                return swept

    async def close(self) -> None:
        """Close the connection pool."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
