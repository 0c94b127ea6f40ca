"""RedisEventBus: the EventBus for many processes, on Redis pub/sub.

Every process holds ONE pub/sub connection, subscribed for its whole life to the channel
`{prefix}:events`, whose messages are task UUIDs. A background reader hands each message to
an in-process LocalEventBus, which wakes the local subscribers of that task. Because the
process-wide subscription is always on, subscribing to a task is only a local registration:
once `subscribe()` is entered, every later PUBLISH for the task reaches it, which is the
"subscribe, then read state" guarantee the EventBus protocol asks for.

Redis pub/sub is fire-and-forget: a message published while the connection is down is lost.
The reader reconnects with exponential backoff and, once subscribed again, wakes every local
subscriber, so that each re-reads the state it follows and catches up on what it missed. While
disconnected, a subscriber's `wait(timeout)` is bounded by its timeout like any other wait; the
caller re-reads state after a wakeup or a timeout (as `InferenceService.follow` does), so a
lost message delays a follower but never leaves it with stale state.

`healthy` (and `ping()`, which raises ServiceUnavailable instead of answering False) tells a
readiness check whether notifications flow: not while the reader is reconnecting, and never
again if the reader itself has died. `publish` raises ServiceUnavailable while Redis is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NoReturn

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from impasto.protocol.errors import ServiceUnavailable
from impasto.state.events import LocalEventBus, LocalSubscription
from impasto.state.redis_errors import (
    RedisFailures,
    guarded,
    reconnecting_retry,
    redis_location,
)

log = logging.getLogger("impasto.events")

# An unreachable host (no RST) must not hold the reader past its backoff for minutes.
CONNECT_TIMEOUT_S = 5.0


class RedisEventBus:
    """EventBus across processes: one Redis pub/sub subscription per process, fanned out."""

    def __init__(
        self,
        url: str,
        prefix: str = "impasto",
        *,
        open_timeout_s: float = 10.0,
        ping_interval_s: float = 30.0,
        min_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
    ) -> None:
        self._url = url
        self._channel = f"{prefix}:events"
        self._failures = RedisFailures(f"the event bus ({redis_location(url)})")
        self._open_timeout_s = open_timeout_s
        self._ping_interval_s = ping_interval_s
        self._min_backoff_s = min_backoff_s
        self._max_backoff_s = max_backoff_s
        self._local = LocalEventBus()
        # Tasks with local subscribers, counted, so a reconnect can wake each of them.
        self._watched: Counter[str] = Counter()
        self._client: Any = None
        self._listener: Any = None
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._generation = 0
        self._live = False
        self._last_error: BaseException | None = None
        self._changed = asyncio.Condition()

    @property
    def generation(self) -> int:
        """How many times the process-wide subscription was established (1 after open)."""
        return self._generation

    @property
    def subscribed(self) -> bool:
        """Whether the process-wide subscription is believed live (for readiness checks)."""
        return self._live

    @property
    def healthy(self) -> bool:
        """Subscribed, with the reader running: notifications from other processes arrive."""
        return self._live and self._reader is not None and not self._reader.done()

    async def ping(self) -> None:
        """Raise ServiceUnavailable unless `healthy`, saying whether the reader is
        reconnecting or has died."""
        if self._reader is None:
            raise RuntimeError("RedisEventBus used before open()")
        if self._reader.done():
            raise self._failures.unavailable("stopped listening: its reader has ended")
        if not self._live:
            raise self._failures.unavailable(
                "is reconnecting to Redis; notifications from other nodes are delayed"
            )

    async def open(self) -> None:
        """Connect and subscribe; returns once Redis has confirmed the subscription."""
        self._client = Redis.from_url(self._url, decode_responses=True, retry=reconnecting_retry())
        # The pub/sub connection gets a client of its own with redis-py's retries off, so that
        # reconnecting follows one policy (the reader's backoff), is logged, and is counted.
        self._listener = Redis.from_url(
            self._url,
            decode_responses=True,
            socket_keepalive=True,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
        self._reader = asyncio.create_task(self._read(), name="impasto-redis-events")
        if not await self.wait_subscribed(self._open_timeout_s):
            error = self._last_error
            await self.close()
            raise _SubscribeFailed(
                self._failures.unavailable(
                    f"could not subscribe to {self._channel} within {self._open_timeout_s:g} s"
                ).message
            ) from error

    async def wait_subscribed(self, timeout: float | None, *, beyond: int = 0) -> bool:
        """True once the subscription is live with a generation above `beyond`, False on
        timeout. `beyond=bus.generation` waits for the next reconnection."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._live and self._generation > beyond),
                    timeout,
                )
            except TimeoutError:
                return False
        return True

    @guarded
    async def publish(self, task_uuid: str) -> None:
        """Wake the task's subscribers in this process now, and in every process via Redis."""
        if self._client is None:
            raise RuntimeError("RedisEventBus used before open()")
        # Local subscribers need not wait for the round trip, nor for a live subscription;
        # the echo from Redis wakes them once more, which only costs them one extra read.
        await self._local.publish(task_uuid)
        await self._client.publish(self._channel, task_uuid)

    @asynccontextmanager
    async def subscribe(self, task_uuid: str) -> AsyncIterator[LocalSubscription]:
        """Subscribe before reading state: the registration is local, the channel always on."""
        if self._reader is None:
            raise RuntimeError("RedisEventBus used before open()")
        self._watched[task_uuid] += 1
        try:
            async with self._local.subscribe(task_uuid) as subscription:
                yield subscription
        finally:
            self._watched[task_uuid] -= 1
            if self._watched[task_uuid] <= 0:
                del self._watched[task_uuid]

    async def close(self) -> None:
        """Stop the reader and close the connections."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        await self._set_live(False)
        for client in (self._listener, self._client):
            if client is not None:
                await client.aclose()
        self._listener = self._client = None

    async def _read(self) -> None:
        backoff = self._min_backoff_s
        try:
            while True:
                generation = self._generation
                try:
                    await self._listen()
                except Exception as exc:
                    self._last_error = exc
                    if self._generation > generation:
                        # It was subscribed: a fresh outage, so try again soon.
                        backoff = self._min_backoff_s
                    # A dead reader would silence every follower, so any error is retried;
                    # only the expected ones are logged without a traceback.
                    expected = isinstance(exc, RedisError | OSError)
                    log.warning(
                        "event bus lost its Redis subscription (%s); resubscribing in %.2f s",
                        exc,
                        backoff,
                        exc_info=None if expected else exc,
                    )
                await self._set_live(False)
                await self._drop_pubsub()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
        finally:
            await self._drop_pubsub()

    async def _listen(self) -> NoReturn:
        """Subscribe and dispatch messages until the connection fails."""
        self._pubsub = self._listener.pubsub()
        await self._pubsub.subscribe(self._channel)
        awaiting_pong = False
        while True:
            message = await self._pubsub.get_message(timeout=self._ping_interval_s)
            if message is None:
                # Idle: a connection that silently died (a NAT or a load balancer dropping
                # it) only shows itself when we talk, so ping and expect an answer in time.
                if awaiting_pong:
                    raise ConnectionError(f"no answer to a ping in {self._ping_interval_s:g} s")
                await self._pubsub.ping()
                awaiting_pong = True
                continue
            awaiting_pong = False
            kind = message["type"]
            if kind == "message":
                await self._local.publish(str(message["data"]))
            elif kind == "subscribe":
                # Redis confirms each (re)subscription once: that is what we count.
                await self._on_subscribed()

    async def _on_subscribed(self) -> None:
        self._generation += 1
        if self._generation > 1:
            # Messages published while we were away are lost: make every follower re-read.
            for task_uuid in list(self._watched):
                await self._local.publish(task_uuid)
            log.info("event bus resubscribed to %s", self._channel)
        await self._set_live(True)

    async def _set_live(self, live: bool) -> None:
        async with self._changed:
            self._live = live
            self._changed.notify_all()

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            # Anything raised here would end the reader, and with it every wakeup.
            with contextlib.suppress(Exception):
                await pubsub.aclose()


class _SubscribeFailed(ServiceUnavailable, ConnectionError):
    """open() could not subscribe: a ServiceUnavailable, and still the ConnectionError that
    callers of open() have always caught."""
