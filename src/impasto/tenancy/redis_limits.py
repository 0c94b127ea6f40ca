"""RedisRateLimiter: the token buckets and concurrency slots of limits.py, shared by every API
node of a deployment, so that a key's limits hold across nodes rather than per node.

Key layout (`P` is the prefix given to the limiter, "impasto" by default; the name comes last):

```
P:limits:bucket:{name}   hash   tokens, ts (the caller's clock when last taken from); expires
                                BUCKET_TTL_MS after that, when it is full again anyway
P:limits:slots:{group}   zset   members holding a slot, scored by when they took it; expires
                                SLOT_TTL_S after the last acquire, so abandoned groups go
```

`take` is one Lua script over all its buckets: it computes every level with the arithmetic of
`refilled` and `wait_for` (the same IEEE doubles, in the same order of operations), and takes
from all of them only if every one has enough, so a refused take leaves every bucket as it
was. The clock is the caller's `now` (an argument, not Redis TIME), as for MemoryRateLimiter:
tests pass their own. Lua formats the floats it stores and returns with `%.17g`, which
round-trips a double exactly (its `tostring` keeps 14 digits only).

A bucket refills from empty to full in 60 s whatever its rate (it holds `per_minute` and gains
`per_minute / 60` a second), so a bucket untouched for a minute holds what a new one would:
its hash may expire, and Redis keeps no storage for idle keys or client addresses.

`peek` reads a bucket and computes its wait in Python with `refilled` and `wait_for` (the
stored levels round-trip exactly, so it agrees with `take`), taking nothing.

`acquire_slot` is one script too (already held: True; fewer than the limit held: add, True;
else False). Slots are given back by the QuotaGate when it finds their tasks finished; the
expiry only reclaims groups that nobody uses any more.

Every method raises ServiceUnavailable when Redis cannot be used (see RedisFailures).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from redis.asyncio.retry import Retry

from impasto.state.redis_client import ScriptedRedis
from impasto.state.redis_errors import guarded
from impasto.tenancy.limits import Bucket, refilled, wait_for

# A little over the minute that refills any bucket, so clocks a little apart lose nothing.
BUCKET_TTL_MS = 65_000
SLOT_TTL_S = 86_400

# KEYS: the bucket hashes. ARGV: now, TTL (ms), then per_minute and cost of each bucket.
# Returns '0' when taken, else the seconds to wait, as a string (keeps the double whole).
_TAKE = """
local now = tonumber(ARGV[1])
local levels = {}
local wait = 0.0
for i, key in ipairs(KEYS) do
  local per_minute = tonumber(ARGV[1 + 2 * i])
  local cost = tonumber(ARGV[2 + 2 * i])
  local tokens, updated_at = per_minute, now
  local stored = redis.call('HMGET', key, 'tokens', 'ts')
  if stored[1] and stored[2] then
    tokens, updated_at = tonumber(stored[1]), tonumber(stored[2])
  end
  -- refilled(): min(per_minute, tokens + max(0, now - updated_at) * per_minute / 60)
  local level = math.min(per_minute, tokens + math.max(0.0, now - updated_at) * per_minute / 60.0)
  levels[i] = level
  -- wait_for(): (cost - tokens) * 60 / per_minute, when something is missing
  local missing = cost - level
  if missing > 0 then wait = math.max(wait, missing * 60.0 / per_minute) end
end
if wait > 0 then return string.format('%.17g', wait) end
for i, key in ipairs(KEYS) do
  local cost = tonumber(ARGV[2 + 2 * i])
  redis.call('HSET', key, 'tokens', string.format('%.17g', levels[i] - cost), 'ts', ARGV[1])
  redis.call('PEXPIRE', key, ARGV[2])
end
return '0'
"""

# KEYS: the group's zset. ARGV: member, limit, now, TTL (s). Returns 1 (held) or 0.
_ACQUIRE_SLOT = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""


def _float(value: float) -> str:
    return repr(float(value))


class RedisRateLimiter(ScriptedRedis):
    """RateLimiter on a Redis server, shared by every API node (layout above)."""

    SCRIPTS: ClassVar[Mapping[str, str]] = {"take": _TAKE, "acquire_slot": _ACQUIRE_SLOT}

    def __init__(
        self,
        url: str,
        prefix: str = "impasto",
        *,
        retry: Retry | None = None,
        ping_timeout_s: float = 2.0,
    ) -> None:
        super().__init__(url, "the rate limiter", retry=retry, ping_timeout_s=ping_timeout_s)
        self._prefix = prefix

    def _bucket_key(self, name: str) -> str:
        return f"{self._prefix}:limits:bucket:{name}"

    def _slots_key(self, group: str) -> str:
        return f"{self._prefix}:limits:slots:{group}"

    @guarded
    async def take(self, buckets: Sequence[Bucket], now: float) -> float:
        """Take from every bucket, or from none: 0.0 when taken, else the seconds until all of
        them could give what is asked. One script, whatever the number of buckets."""
        if not buckets:
            return 0.0
        args = [_float(now), str(BUCKET_TTL_MS)]
        for bucket in buckets:
            args += [str(bucket.per_minute), str(bucket.cost)]
        waited = await self._script("take", [self._bucket_key(b.name) for b in buckets], args)
        return float(waited)

    @guarded
    async def peek(self, bucket: Bucket, now: float) -> float:
        """Seconds until `bucket` could give its cost (0.0 if it could now); takes nothing.
        One read: the levels Lua stored round-trip exactly, so limits.py's own arithmetic
        gives what `take` would."""
        tokens, updated_at = await self._redis.hmget(self._bucket_key(bucket.name), "tokens", "ts")
        if tokens is None or updated_at is None:
            level = float(bucket.per_minute)
        else:
            level = refilled(float(tokens), float(updated_at), bucket.per_minute, now)
        return wait_for(level, bucket.cost, bucket.per_minute)

    @guarded
    async def acquire_slot(self, group: str, member: str, limit: int, now: float) -> bool:
        """Give `member` a slot of `group` if fewer than `limit` are held (True also when it
        holds one already), and keep the group from expiring for another SLOT_TTL_S."""
        held = await self._script(
            "acquire_slot",
            [self._slots_key(group)],
            [member, str(limit), _float(now), str(SLOT_TTL_S)],
        )
        return bool(held)

    @guarded
    async def slot_members(self, group: str) -> dict[str, float]:
        """The members holding slots of `group`, with when each took it."""
        held: list[tuple[str, float]] = await self._redis.zrange(
            self._slots_key(group), 0, -1, withscores=True
        )
        return {member: float(score) for member, score in held}

    @guarded
    async def release_slots(self, group: str, members: Sequence[str]) -> None:
        """Give those slots back (an empty group's key disappears with its last member)."""
        if members:
            await self._redis.zrem(self._slots_key(group), *members)
