"""Rate limits as token buckets, and concurrency as slots; the RateLimiter seam.

A bucket holds up to `per_minute` tokens and refills at `per_minute / 60` a second, so a key
may burst its whole minute at once and then goes at the steady rate. `take` takes from every
bucket it is given or from none (a task counts against its key's tasks and images together).
The clock is the caller's: tests pass theirs, and the Redis implementation uses the same
arithmetic with the node's time.

Slots count what runs at once: a member (a task UUID) holds one from acceptance until the
QuotaGate finds its task finished, so no component has to remember to give slots back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Bucket:
    """`cost` tokens wanted from the bucket `name`, which refills `per_minute` a minute."""

    name: str
    per_minute: int
    cost: int = 1


def refilled(tokens: float, updated_at: float, per_minute: int, now: float) -> float:
    """A bucket's tokens at `now` (never more than it holds)."""
    return min(float(per_minute), tokens + max(0.0, now - updated_at) * per_minute / 60.0)


def wait_for(tokens: float, cost: int, per_minute: int) -> float:
    """Seconds until a bucket with `tokens` has `cost` of them (0 if it has now)."""
    missing = cost - tokens
    return 0.0 if missing <= 0 else missing * 60.0 / per_minute


class RateLimiter(Protocol):
    """Buckets and slots shared by every API node of a deployment."""

    async def take(self, buckets: Sequence[Bucket], now: float) -> float:
        """Take from every bucket, or from none: 0.0 when taken, else the seconds until all of
        them could give what is asked."""

    async def peek(self, bucket: Bucket, now: float) -> float:
        """Seconds until `bucket` could give its cost (0.0 if it could now); takes nothing."""

    async def acquire_slot(self, group: str, member: str, limit: int, now: float) -> bool:
        """Give `member` a slot of `group` if fewer than `limit` are held (True also when it
        holds one already)."""

    async def slot_members(self, group: str) -> dict[str, float]:
        """The members holding slots of `group`, with when each took it."""

    async def release_slots(self, group: str, members: Sequence[str]) -> None:
        """Give those slots back."""


class MemoryRateLimiter:
    """RateLimiter of one process (the embedded server: one process owns its state file)."""

    def __init__(self, max_buckets: int = 100_000) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}
        self._slots: dict[str, dict[str, float]] = {}
        self._max_buckets = max_buckets
        self._lock = asyncio.Lock()

    async def take(self, buckets: Sequence[Bucket], now: float) -> float:
        async with self._lock:
            levels = []
            wait = 0.0
            for bucket in buckets:
                tokens, updated_at = self._buckets.get(bucket.name, (bucket.per_minute, now))
                level = refilled(tokens, updated_at, bucket.per_minute, now)
                levels.append(level)
                wait = max(wait, wait_for(level, bucket.cost, bucket.per_minute))
            if wait > 0:
                return wait
            if len(self._buckets) + len(buckets) > self._max_buckets:
                self._forget_full(now, buckets)
            for bucket, level in zip(buckets, levels, strict=True):
                self._buckets[bucket.name] = (level - bucket.cost, now)
            return 0.0

    async def peek(self, bucket: Bucket, now: float) -> float:
        tokens, updated_at = self._buckets.get(bucket.name, (bucket.per_minute, now))
        level = refilled(tokens, updated_at, bucket.per_minute, now)
        return wait_for(level, bucket.cost, bucket.per_minute)

    def _forget_full(self, now: float, keep: Sequence[Bucket]) -> None:
        """Drop buckets that a minute has refilled: they hold what a new one would. (Client
        addresses make buckets too; this keeps their number bounded.)"""
        wanted = {b.name for b in keep}
        for name, (_, updated_at) in list(self._buckets.items()):
            if name not in wanted and now - updated_at >= 60.0:
                del self._buckets[name]

    async def acquire_slot(self, group: str, member: str, limit: int, now: float) -> bool:
        async with self._lock:
            held = self._slots.setdefault(group, {})
            if member in held:
                return True
            if len(held) >= limit:
                return False
            held[member] = now
            return True

    async def slot_members(self, group: str) -> dict[str, float]:
        return dict(self._slots.get(group, {}))

    async def release_slots(self, group: str, members: Sequence[str]) -> None:
        async with self._lock:
            held = self._slots.get(group, {})
            for member in members:
                held.pop(member, None)
            if not held:
                self._slots.pop(group, None)
