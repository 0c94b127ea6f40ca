"""RedisTenancyStore: managed keys and their usage on Redis, shared by every API node.

Key layout (`P` is the prefix given to the store, "impasto" by default; an id or name comes
last in every per-record key, so no value can make one key collide with another):

```
P:tenancy:key:{keyId}           hash   name, digest, hint, limits (JSON), created_at, and when
                                       set: expires_at, revoked_at
P:tenancy:keys                  zset   every keyId, scored by created_at
P:tenancy:digest:{digest}       string the keyId with that digest
P:tenancy:name:{name}           set    the keyIds ever given that name (revoked ones too)
P:tenancy:usage:task:{taskUUID} hash   generation index -> JSON {key_id, key_name, model, width,
                                       height, cost, at}: the task's usage records, all kept
P:tenancy:usage:by-key:{keyId}  zset   "{index}:{taskUUID}" of that key's records, by at
P:tenancy:usage:keys            set    the keyIds that have usage records
```

A by-key member puts the index first: an integer has no colon, so the member names one record
whatever the taskUUID holds. A field that is None in the key is absent from its hash. Floats
are written with `repr` (which round-trips exactly) and Lua only compares them (`tonumber`),
never formats them.

What must be atomic is one Lua script each: create_key checks the name (an active key of that
name: not revoked, not expired at the new key's created_at), the key id and the digest, then
writes the hash and its three indexes; revoke_key revokes the not-yet-revoked keys of that
name or id and returns them as they were; record_usage adds each record with HSETNX on its
task's hash and indexes it only if that inserted it, so a (task, index) is counted once even
when two nodes record it at once. The scripts reach keys derived from ids they read (the keys
of a name), which Redis Cluster forbids: like RedisStateStore this targets one Redis server.

usage_totals is exact: it reads every record in range (by key, from `since`) and sums them in
Python, as SqliteTenancyStore's SQL sums its rows: a scan of the period asked for, pipelined
BATCH records a round trip. task_usage reads one task's hash.

The same behaviour as SqliteTenancyStore, with two differences where SQLite leaves a choice:
a key id or digest already stored makes create_key raise ValueError (SQLite raises its
IntegrityError), and totals of the same key name and model are ordered by key id.

Every method raises ServiceUnavailable when Redis cannot be used (StorageFull when it is out of
memory or cannot persist), never a redis-py error (see RedisFailures).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from redis.asyncio.retry import Retry

from impasto.state.redis_client import ScriptedRedis
from impasto.state.redis_errors import guarded
from impasto.tenancy.keys import ApiKey, KeyNotFound, UsageRecord, UsageTotals
from impasto.tenancy.sqlite_store import limits_json, limits_of

# Records per record_usage script and per HMGET: Redis keeps serving others in between.
BATCH = 500

# KEYS: key hash, keys zset, digest string, name set. ARGV: prefix, key id, created_at, then
# the hash's field/value pairs. Returns 'ok', or what is taken: 'name', 'id' or 'digest'.
_CREATE_KEY = """
local created = tonumber(ARGV[3])
for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  local state = redis.call('HMGET', ARGV[1] .. ':tenancy:key:' .. id, 'revoked_at', 'expires_at')
  if not state[1] and (not state[2] or tonumber(state[2]) > created) then return 'name' end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return 'id' end
if redis.call('EXISTS', KEYS[3]) == 1 then return 'digest' end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('SET', KEYS[3], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[2])
return 'ok'
"""

# KEYS: digest string. ARGV: prefix. Returns {key id, flat hash} or nil.
_KEY_BY_DIGEST = """
local id = redis.call('GET', KEYS[1])
if not id then return false end
local fields = redis.call('HGETALL', ARGV[1] .. ':tenancy:key:' .. id)
if #fields == 0 then return false end
return {id, fields}
"""

# KEYS: name set, the key hash of that id. ARGV: prefix, name or id, at. Returns the keys it
# revoked, each {key id, flat hash as it was before}.
_REVOKE_KEY = """
local ids = redis.call('SMEMBERS', KEYS[1])
if redis.call('EXISTS', KEYS[2]) == 1 then ids[#ids + 1] = ARGV[2] end
local revoked, seen = {}, {}
for _, id in ipairs(ids) do
  if not seen[id] then
    seen[id] = true
    local key = ARGV[1] .. ':tenancy:key:' .. id
    local fields = redis.call('HGETALL', key)
    if #fields > 0 and redis.call('HEXISTS', key, 'revoked_at') == 0 then
      revoked[#revoked + 1] = {id, fields}
      redis.call('HSET', key, 'revoked_at', ARGV[3])
    end
  end
end
return revoked
"""

# KEYS: usage-keys set, then for each record its task hash and its by-key zset. ARGV: for
# each record, its index, by-key member, key id, at and JSON. A stored (task, index) is ignored.
_RECORD_USAGE = """
for r = 0, (#KEYS - 1) / 2 - 1 do
  local task, by_key, a = KEYS[2 + 2 * r], KEYS[3 + 2 * r], 5 * r
  if redis.call('HSETNX', task, ARGV[a + 1], ARGV[a + 5]) == 1 then
    redis.call('ZADD', by_key, ARGV[a + 4], ARGV[a + 2])
    redis.call('SADD', KEYS[1], ARGV[a + 3])
  end
end
return 0
"""


def _float(value: float) -> str:
    return repr(float(value))


def _key_fields(key: ApiKey) -> list[str]:
    fields = {
        "name": key.name,
        "digest": key.digest,
        "hint": key.hint,
        "limits": limits_json(key.limits),
        "created_at": _float(key.created_at),
    }
    if key.expires_at is not None:
        fields["expires_at"] = _float(key.expires_at)
    if key.revoked_at is not None:
        fields["revoked_at"] = _float(key.revoked_at)
    return [part for pair in fields.items() for part in pair]


def _key(key_id: str, h: dict[str, str]) -> ApiKey:
    return ApiKey(
        key_id=key_id,
        name=h["name"],
        digest=h["digest"],
        hint=h["hint"],
        limits=limits_of(h["limits"]),
        created_at=float(h["created_at"]),
        expires_at=float(h["expires_at"]) if "expires_at" in h else None,
        revoked_at=float(h["revoked_at"]) if "revoked_at" in h else None,
    )


def _pairs(flat: list[str]) -> dict[str, str]:
    """A hash as HGETALL returns it from inside a script: [field, value, field, value, ...]."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _member(record: UsageRecord) -> str:
    """A record's member of its key's zset: the index first (it has no colon)."""
    return f"{record.index}:{record.task_uuid}"


def _of_member(member: str) -> tuple[str, str]:
    """(taskUUID, index) of a by-key member."""
    index, task_uuid = member.split(":", 1)
    return task_uuid, index


def _record_json(record: UsageRecord) -> str:
    return json.dumps(
        {
            "key_id": record.key_id,
            "key_name": record.key_name,
            "model": record.model,
            "width": record.width,
            "height": record.height,
            "cost": record.cost,
            "at": record.at,
        }
    )


class _Sum:
    """One key and model's records, as they are read."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.costs: list[float] = []
        self.pixels = 0
        self.first_at = math.inf
        self.last_at = -math.inf

    def add(self, raw: dict[str, Any]) -> None:
        self.names.append(raw["key_name"])
        self.costs.append(float(raw["cost"]))  # REAL in SQLite: an int cost reads as float
        self.pixels += int(raw["width"]) * int(raw["height"])
        at = float(raw["at"])
        self.first_at = min(self.first_at, at)
        self.last_at = max(self.last_at, at)


class RedisTenancyStore(ScriptedRedis):
    """KeyStore and UsageLedger on a Redis server (layout above)."""

    SCRIPTS: ClassVar[Mapping[str, str]] = {
        "create_key": _CREATE_KEY,
        "key_by_digest": _KEY_BY_DIGEST,
        "revoke_key": _REVOKE_KEY,
        "record_usage": _RECORD_USAGE,
    }

    def __init__(
        self,
        url: str,
        prefix: str = "impasto",
        *,
        retry: Retry | None = None,
        ping_timeout_s: float = 2.0,
    ) -> None:
        super().__init__(url, "the key store", retry=retry, ping_timeout_s=ping_timeout_s)
        self._prefix = prefix
        self._keys = f"{prefix}:tenancy:keys"
        self._usage_keys = f"{prefix}:tenancy:usage:keys"

    def _key_key(self, key_id: str) -> str:
        return f"{self._prefix}:tenancy:key:{key_id}"

    def _digest_key(self, digest: str) -> str:
        return f"{self._prefix}:tenancy:digest:{digest}"

    def _name_key(self, name: str) -> str:
        return f"{self._prefix}:tenancy:name:{name}"

    def _task_usage_key(self, task_uuid: str) -> str:
        return f"{self._prefix}:tenancy:usage:task:{task_uuid}"

    def _by_key(self, key_id: str) -> str:
        return f"{self._prefix}:tenancy:usage:by-key:{key_id}"

    @guarded
    async def create_key(self, key: ApiKey) -> None:
        """Store a new key; ValueError if a key of that name is active at its created_at (or
        its id or digest is stored already). Nothing is written then."""
        outcome = await self._script(
            "create_key",
            [
                self._key_key(key.key_id),
                self._keys,
                self._digest_key(key.digest),
                self._name_key(key.name),
            ],
            [self._prefix, key.key_id, _float(key.created_at), *_key_fields(key)],
        )
        if outcome == "name":
            raise ValueError(f"an active key is already named {key.name!r}")
        if outcome == "id":
            raise ValueError(f"a key with id {key.key_id!r} already exists")
        if outcome == "digest":
            raise ValueError("a key with that digest already exists")

    @guarded
    async def key_by_digest(self, digest: str) -> ApiKey | None:
        """The key with that digest (active or not), or None: one round trip."""
        found = await self._script("key_by_digest", [self._digest_key(digest)], [self._prefix])
        if not found:
            return None
        key_id, flat = found
        return _key(str(key_id), _pairs(flat))

    @guarded
    async def list_keys(self) -> list[ApiKey]:
        """Every key, oldest first (created_at, then key id)."""
        ids: list[str] = await self._redis.zrange(self._keys, 0, -1)
        async with self._redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(self._key_key(key_id))
            hashes: list[dict[str, str]] = await pipe.execute()
        keys = [_key(i, h) for i, h in zip(ids, hashes, strict=True) if h]
        # The zset orders ties by member already; sorting again keeps that exact for floats.
        keys.sort(key=lambda k: (k.created_at, k.key_id))
        return keys

    @guarded
    async def revoke_key(self, name_or_id: str, at: float) -> list[ApiKey]:
        """Revoke every not-yet-revoked key of that name or id, in one script; KeyNotFound if
        there is none. Returns them with revoked_at set, oldest first."""
        revoked: list[list[Any]] = await self._script(
            "revoke_key",
            [self._name_key(name_or_id), self._key_key(name_or_id)],
            [self._prefix, name_or_id, _float(at)],
        )
        if not revoked:
            raise KeyNotFound(name_or_id)
        keys = [
            _key(str(key_id), {**_pairs(flat), "revoked_at": _float(at)})
            for key_id, flat in revoked
        ]
        keys.sort(key=lambda k: (k.created_at, k.key_id))
        return keys

    @guarded
    async def record_usage(self, records: Sequence[UsageRecord]) -> None:
        """Add records, each once: one already recorded (by task and index) is ignored."""
        for start in range(0, len(records), BATCH):
            batch = records[start : start + BATCH]
            keys = [self._usage_keys]
            args: list[str] = []
            for r in batch:
                keys += [self._task_usage_key(r.task_uuid), self._by_key(r.key_id)]
                args += [str(r.index), _member(r), r.key_id, _float(r.at), _record_json(r)]
            await self._script("record_usage", keys, args)

    @guarded
    async def usage_totals(
        self, *, key_ids: Sequence[str] = (), since: float | None = None
    ) -> list[UsageTotals]:
        """Totals per key and model (only these keys, if given) over records at or after
        `since`, by key name then model (then key id)."""
        if key_ids:
            wanted = list(dict.fromkeys(key_ids))
        else:
            wanted = sorted(await self._redis.smembers(self._usage_keys))
        low = _float(since) if since is not None else "-inf"
        async with self._redis.pipeline(transaction=False) as pipe:
            for key_id in wanted:
                pipe.zrangebyscore(self._by_key(key_id), low, "+inf")
            per_key: list[list[str]] = await pipe.execute()
        members = [member for found in per_key for member in found]
        sums: dict[tuple[str, str], _Sum] = {}
        for start in range(0, len(members), BATCH):
            async with self._redis.pipeline(transaction=False) as pipe:
                for member in members[start : start + BATCH]:
                    task_uuid, index = _of_member(member)
                    pipe.hget(self._task_usage_key(task_uuid), index)
                encoded: list[str | None] = await pipe.execute()
            for text in encoded:
                if text is None:  # never written without its record; be safe anyway
                    continue
                raw = json.loads(text)
                sums.setdefault((raw["key_id"], raw["model"]), _Sum()).add(raw)
        totals = [
            UsageTotals(
                key_id=key_id,
                key_name=max(s.names),
                model=model,
                images=len(s.costs),
                cost=round(math.fsum(s.costs), 10),
                pixels=s.pixels,
                first_at=s.first_at,
                last_at=s.last_at,
            )
            for (key_id, model), s in sums.items()
        ]
        totals.sort(key=lambda t: (t.key_name, t.model, t.key_id))
        return totals

    @guarded
    async def task_usage(self, task_uuid: str) -> list[UsageRecord]:
        """The records of one task, by index."""
        stored: dict[str, str] = await self._redis.hgetall(self._task_usage_key(task_uuid))
        records = []
        for index in sorted(stored, key=int):
            raw = json.loads(stored[index])
            records.append(
                UsageRecord(
                    task_uuid=task_uuid,
                    index=int(index),
                    key_id=raw["key_id"],
                    key_name=raw["key_name"],
                    model=raw["model"],
                    width=int(raw["width"]),
                    height=int(raw["height"]),
                    cost=float(raw["cost"]),
                    at=float(raw["at"]),
                )
            )
        return records
