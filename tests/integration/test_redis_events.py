"""RedisEventBus between two "processes" (two buses, each with its own connections) on a real
redis-server: cross-process wakeups, no stray wakeups, subscription cleanup, and what happens
when the pub/sub connection is killed or the server restarts."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from impasto.state.redis_events import RedisEventBus
from tests.services import RedisServer, _free_port, _wait_for_port

TASK_X = "0b7e3c2a-1d4f-4e8a-9c6b-5a2f1e0d9c8b"
TASK_Y = "6f1d2c3b-4a5e-4f60-8b7c-9d0e1f2a3b4c"
BARRIER = "e2d1c0b9-a8f7-4e6d-8c5b-4a3f2e1d0c9b"

# Long enough never to expire on a loaded machine; every wait here ends early when it passes.
WAKE_S = 10.0
# For checks that something did NOT happen, once a later message proved the earlier ones in.
QUIET_S = 0.05


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@asynccontextmanager
async def opened(url: str, prefix: str, **options: Any) -> AsyncIterator[RedisEventBus]:
    bus = RedisEventBus(url, prefix, **options)
    await bus.open()
    try:
        yield bus
    finally:
        await bus.close()


def two_processes(
    server: RedisServer, prefix: str, body: Callable[[RedisEventBus, RedisEventBus], Awaitable[Any]]
) -> Any:
    async def main() -> Any:
        async with opened(server.url, prefix) as a, opened(server.url, prefix) as b:
            return await body(a, b)

    return asyncio.run(main())


def test_a_publish_in_one_process_wakes_a_subscriber_in_another(
    redis_server: RedisServer, prefix: str
) -> None:
    async def body(a: RedisEventBus, b: RedisEventBus) -> list[bool]:
        woken = []
        # Subscribe, then publish at once: the process-wide subscription is already live, so
        # nothing published after subscribe() can be missed.
        for _ in range(20):
            task_uuid = str(uuid.uuid4())
            async with b.subscribe(task_uuid) as subscription:
                await a.publish(task_uuid)
                woken.append(await subscription.wait(WAKE_S))
        return woken

    assert two_processes(redis_server, prefix, body) == [True] * 20


def test_every_subscriber_of_the_task_is_woken_in_every_process(
    redis_server: RedisServer, prefix: str
) -> None:
    async def body(a: RedisEventBus, b: RedisEventBus) -> list[bool]:
        async with (
            a.subscribe(TASK_X) as in_a,
            b.subscribe(TASK_X) as in_b,
            b.subscribe(TASK_X) as also_in_b,
        ):
            await a.publish(TASK_X)
            return [await s.wait(WAKE_S) for s in (in_a, in_b, also_in_b)]

    assert two_processes(redis_server, prefix, body) == [True, True, True]


def test_no_wakeup_for_another_task(redis_server: RedisServer, prefix: str) -> None:
    async def body(a: RedisEventBus, b: RedisEventBus) -> tuple[bool, bool, bool]:
        async with (
            b.subscribe(TASK_X) as x,
            b.subscribe(TASK_Y) as y,
            b.subscribe(BARRIER) as barrier,
        ):
            await a.publish(TASK_X)
            await a.publish(BARRIER)
            # One channel, one reader: once the barrier is in, TASK_X's message was handled.
            woken = await x.wait(WAKE_S), await barrier.wait(WAKE_S)
            return *woken, await y.wait(QUIET_S)

    assert two_processes(redis_server, prefix, body) == (True, True, False)


def test_buses_with_another_prefix_do_not_hear_each_other(
    redis_server: RedisServer, prefix: str
) -> None:
    async def main() -> tuple[bool, bool]:
        async with (
            opened(redis_server.url, prefix) as a,
            opened(redis_server.url, prefix + "-other") as other,
            other.subscribe(TASK_X) as x,
            other.subscribe(BARRIER) as barrier,
        ):
            await a.publish(TASK_X)
            await other.publish(BARRIER)
            return await barrier.wait(WAKE_S), await x.wait(QUIET_S)

    assert asyncio.run(main()) == (True, False)


def test_leaving_a_subscription_stops_its_wakeups(redis_server: RedisServer, prefix: str) -> None:
    async def body(a: RedisEventBus, b: RedisEventBus) -> tuple[bool, bool, bool]:
        async with b.subscribe(TASK_X) as kept, b.subscribe(BARRIER) as barrier:
            async with b.subscribe(TASK_X) as left:
                pass
            with pytest.raises(KeyError):
                async with b.subscribe(TASK_Y) as failed:
                    raise KeyError("the body failed")
            await a.publish(TASK_X)
            await a.publish(TASK_Y)
            await a.publish(BARRIER)
            in_order = await kept.wait(WAKE_S) and await barrier.wait(WAKE_S)
            return in_order, await left.wait(QUIET_S), await failed.wait(QUIET_S)

    assert two_processes(redis_server, prefix, body) == (True, False, False)


def test_a_subscriber_in_the_publishing_process_is_woken(
    redis_server: RedisServer, prefix: str
) -> None:
    async def body(a: RedisEventBus, b: RedisEventBus) -> bool:
        async with a.subscribe(TASK_X) as subscription:
            await a.publish(TASK_X)
            return await subscription.wait(WAKE_S)

    assert two_processes(redis_server, prefix, body) is True


def test_the_bus_resubscribes_after_its_connection_is_killed(
    redis_server: RedisServer, prefix: str
) -> None:
    async def body(a: RedisEventBus, b: RedisEventBus) -> dict[str, Any]:
        async with b.subscribe(TASK_X) as subscription:
            generations = a.generation, b.generation
            killer = aioredis.Redis(port=redis_server.port)
            try:
                killed = await killer.client_kill_filter(_type="pubsub")
            finally:
                await killer.aclose()
            resubscribed = [
                await a.wait_subscribed(WAKE_S, beyond=generations[0]),
                await b.wait_subscribed(WAKE_S, beyond=generations[1]),
            ]
            # Whatever was published meanwhile is lost: the resubscription wakes every
            # subscriber so that it re-reads the state it follows.
            woken_by_reconnect = await subscription.wait(WAKE_S)
            await a.publish(TASK_X)
            return {
                "generations": generations,
                "killed": killed >= 2,
                "resubscribed": resubscribed,
                "woken_by_reconnect": woken_by_reconnect,
                "woken_by_publish": await subscription.wait(WAKE_S),
            }

    assert two_processes(redis_server, prefix, body) == {
        "generations": (1, 1),
        "killed": True,
        "resubscribed": [True, True],
        "woken_by_reconnect": True,
        "woken_by_publish": True,
    }


def test_an_idle_bus_keeps_its_subscription_alive_with_pings(
    redis_server: RedisServer, prefix: str
) -> None:
    async def main() -> tuple[bool, int, bool]:
        async with (
            opened(redis_server.url, prefix, ping_interval_s=0.1) as a,
            opened(redis_server.url, prefix, ping_interval_s=0.1) as b,
            b.subscribe(TASK_X) as subscription,
        ):
            # Idle for many ping intervals: every ping is answered, so no reconnection.
            reconnected = await b.wait_subscribed(0.5, beyond=b.generation)
            await a.publish(TASK_X)
            return reconnected, b.generation, await subscription.wait(WAKE_S)

    assert asyncio.run(main()) == (False, 1, True)


def _start_redis(port: int, directory: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    assert binary is not None
    process = subprocess.Popen(
        [
            binary,
            *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)),
            *("--save", "", "--appendonly", "no", "--protected-mode", "no"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_port(port, process, "redis-server")
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=10)


def test_waits_stay_bounded_while_redis_is_down_and_the_bus_recovers(
    tmp_path: Path, prefix: str
) -> None:
    """A private redis-server, stopped and started again on the same port."""
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"

    async def main() -> dict[str, Any]:
        server = await asyncio.to_thread(_start_redis, port, tmp_path)
        try:
            async with AsyncExitStack() as stack:
                fast = {"min_backoff_s": 0.05, "max_backoff_s": 0.2}
                a = await stack.enter_async_context(opened(url, prefix, **fast))
                b = await stack.enter_async_context(opened(url, prefix, **fast))
                subscription = await stack.enter_async_context(b.subscribe(TASK_X))
                generation = b.generation
                await asyncio.to_thread(_stop, server)
                # No hang while Redis is away: the wait ends with its timeout.
                down_wait = await subscription.wait(QUIET_S)
                server = await asyncio.to_thread(_start_redis, port, tmp_path)
                resubscribed = await b.wait_subscribed(WAKE_S, beyond=generation)
                woken_by_reconnect = await subscription.wait(WAKE_S)
                await a.publish(TASK_X)
                return {
                    "down_wait": down_wait,
                    "resubscribed": resubscribed,
                    "woken_by_reconnect": woken_by_reconnect,
                    "woken_by_publish": await subscription.wait(WAKE_S),
                }
        finally:
            await asyncio.to_thread(_stop, server)

    assert asyncio.run(main()) == {
        "down_wait": False,
        "resubscribed": True,
        "woken_by_reconnect": True,
        "woken_by_publish": True,
    }


def test_opening_without_a_reachable_redis_fails_within_its_timeout(prefix: str) -> None:
    url = f"redis://127.0.0.1:{_free_port()}/0"

    async def main() -> None:
        bus = RedisEventBus(url, prefix, open_timeout_s=0.5, max_backoff_s=0.1)
        with pytest.raises(ConnectionError, match="could not subscribe"):
            await bus.open()

    asyncio.run(main())


def test_bus_used_before_open_says_so(prefix: str) -> None:
    async def main() -> None:
        bus = RedisEventBus("redis://127.0.0.1:1/0", prefix)
        with pytest.raises(RuntimeError, match="before open"):
            await bus.publish(TASK_X)
        with pytest.raises(RuntimeError, match="before open"):
            async with bus.subscribe(TASK_X):
                pass
        await bus.close()

    asyncio.run(main())
