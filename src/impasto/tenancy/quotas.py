"""The QuotaGate: a principal's limits applied to one task, before the task is accepted.

- models: a key limited to some AIRs gets 403 insufficientPermissions for any other;
- tasks a minute: every task that does work (not getResponse, ping, modelSearch, account
  queries) takes one token;
- images a minute: an imageInference takes `numberResults`; a task asking for more than a
  whole minute's worth can never run and is refused with a 400, not a 429 to retry;
- tasks at once: an imageInference holds a slot from acceptance until it finishes.

Over a rate or the concurrency limit, the task gets a 429 rateLimitExceeded with when to retry;
nothing of it was accepted. Slots are given back lazily: when a key's slots are all held, the
gate asks the state store which of their tasks still run and frees the others, so neither a
worker on another machine nor a crash has to remember to give a slot back.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from impasto.protocol.errors import InvalidParameter, PermissionDenied, RateLimited
from impasto.state.base import StateStore
from impasto.tenancy.keys import Principal
from impasto.tenancy.limits import Bucket, RateLimiter

Clock = Callable[[], float]


class QuotaGate:
    """Admits a principal's tasks within its limits."""

    def __init__(
        self,
        limiter: RateLimiter,
        state: StateStore,
        *,
        clock: Clock = time.time,
        slot_grace_s: float = 30.0,
    ) -> None:
        self._limiter = limiter
        self._state = state
        self._clock = clock
        # A slot whose task does not exist yet is being accepted; only older ones are freed.
        self._slot_grace_s = slot_grace_s

    async def admit_work(self, principal: Principal) -> None:
        """A task that does work but makes no images: the tasks-a-minute bucket."""
        limits = principal.limits
        if limits.tasks_per_minute is None:
            return
        await self._take(principal, [Bucket(f"tasks:{principal.key_id}", limits.tasks_per_minute)])

    @asynccontextmanager
    async def admitted_inference(
        self, principal: Principal, task_uuid: str, model: str, images: int
    ) -> AsyncIterator[None]:
        """Around the acceptance of an imageInference: raises if it is over a limit; if its
        acceptance fails, its slot is given back at once."""
        limits = principal.limits
        if not limits.allows_model(model):
            raise PermissionDenied(
                f"This API key may not use model {model}; it may use {', '.join(limits.models)}.",
                parameter="model",
            )
        if limits.images_per_minute is not None and images > limits.images_per_minute:
            raise InvalidParameter(
                f"numberResults {images} is more than this API key may make in a minute "
                f"({limits.images_per_minute}).",
                code="inferenceRateLimitRequestTooLarge",
                parameter="numberResults",
            )
        group = f"running:{principal.key_id}"
        slotted = limits.max_concurrent is not None
        if limits.max_concurrent is not None:
            await self._acquire(principal, group, task_uuid, limits.max_concurrent)
        try:
            buckets = []
            if limits.tasks_per_minute is not None:
                buckets.append(Bucket(f"tasks:{principal.key_id}", limits.tasks_per_minute))
            if limits.images_per_minute is not None:
                buckets.append(
                    Bucket(f"images:{principal.key_id}", limits.images_per_minute, images)
                )
            if buckets:
                await self._take(principal, buckets)
            yield
        except BaseException:
            if slotted and await self._state.get_task(task_uuid) is None:
                await self._limiter.release_slots(group, [task_uuid])
            raise

    async def _take(self, principal: Principal, buckets: list[Bucket]) -> None:
        wait = await self._limiter.take(buckets, self._clock())
        if wait > 0:
            raise RateLimited(
                f"API key {principal.name} is over its rate limit "
                f"({_describe(principal)}); retry in {max(1, round(wait))} s.",
                retry_after_s=wait,
            )

    async def _acquire(self, principal: Principal, group: str, member: str, limit: int) -> None:
        if await self._limiter.acquire_slot(group, member, limit, self._clock()):
            return
        await self._free_finished(group)
        if await self._limiter.acquire_slot(group, member, limit, self._clock()):
            return
        raise RateLimited(
            f"API key {principal.name} already runs {limit} task(s) at once, its limit; "
            "retry when one finishes.",
            retry_after_s=1,
        )

    async def _free_finished(self, group: str) -> None:
        now = self._clock()
        done = []
        for member, taken_at in (await self._limiter.slot_members(group)).items():
            task = await self._state.get_task(member)
            if task is None:
                if now - taken_at > self._slot_grace_s:
                    done.append(member)
            elif task.status != "processing":
                done.append(member)
        if done:
            await self._limiter.release_slots(group, done)


def _describe(principal: Principal) -> str:
    limits = principal.limits
    parts = []
    if limits.tasks_per_minute is not None:
        parts.append(f"{limits.tasks_per_minute} tasks/min")
    if limits.images_per_minute is not None:
        parts.append(f"{limits.images_per_minute} images/min")
    return ", ".join(parts)
