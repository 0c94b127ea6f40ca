"""What the state store, the job queue and the event bus do when their service fails, on real
things: a private redis-server that the tests stop and start again on the same port, and a
SQLite file locked by another connection or that cannot be opened.

While the service is away every method raises ServiceUnavailable naming the service (never a
redis-py or sqlite3 error, never a password); once it is back the same objects work again
without being reopened, and the event bus reports itself healthy and delivers again."""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from impasto.protocol.errors import ServiceUnavailable
from impasto.state.base import EventBus, JobQueue, QueuedJob, StateStore
from impasto.state.records import DeliveryRecord, ImageRecord, ResultRecord, TaskRecord
from impasto.state.redis_errors import RedisFailures, redis_location
from impasto.state.redis_events import RedisEventBus
from impasto.state.redis_queue import RedisJobQueue
from impasto.state.redis_store import RedisStateStore
from impasto.state.sqlite import SqliteStateStore
from tests.faults import RestartableRedis, free_port

PASSWORD = "s3cret-redis-pass"
AIR = "impasto:tiny@1"
TASK = "9d3c1b2a-4e5f-4a6b-8c7d-0e1f2a3b4c5d"
# Every wait below ends as soon as its condition holds; this only bounds a broken run.
DEADLINE_S = 10.0
POLL_S = 0.02
# Stale pooled connections after a restart are retried at once; while Redis is down each
# call then fails within a few refused connects instead of redis-py's ~4 s of backoff.
QUICK_RETRY = Retry(NoBackoff(), 2)


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    server = RestartableRedis(tmp_path, persistent=False, password=PASSWORD)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _eventually(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True


def _task(task_uuid: str = TASK) -> TaskRecord:
    return TaskRecord(
        task_uuid=task_uuid,
        task_type="imageInference",
        request={"taskType": "imageInference"},
        expected=1,
        created_at=1000.0,
    )


def _store_calls(store: StateStore) -> dict[str, Callable[[], Awaitable[Any]]]:
    """One call of every StateStore method but close."""
    other = str(uuid.uuid4())
    item = {"taskType": "imageInference", "taskUUID": other}
    hook = DeliveryRecord(
        delivery_id="d-2",
        task_uuid=other,
        kind="webhook",
        url="http://127.0.0.1:9/",
        payload="{}",
        content_type="application/json",
        created_at=1.0,
        next_attempt_at=1.0,
    )
    record = ImageRecord(
        image_uuid="img",
        key="img.png",
        content_type="image/png",
        kind="output",
        width=8,
        height=8,
        created_at=1.0,
        expires_at=2.0,
    )
    return {
        "ping": store.ping,
        "create_task": lambda: store.create_task(_task(other)),
        "get_task": lambda: store.get_task(TASK),
        "finish_task": lambda: store.finish_task(TASK, "success", None, 2000.0),
        "update_task_extra": lambda: store.update_task_extra(TASK, {"a": 1}),
        "add_result": lambda: store.add_result(
            ResultRecord(task_uuid=TASK, index=0, status="success", item=item, created_at=1.0)
        ),
        "results": lambda: store.results(TASK),
        "task_view": lambda: store.task_view(TASK),
        "set_progress": lambda: store.set_progress(TASK, 0, 50),
        "progress": lambda: store.progress(TASK),
        "unfinished_tasks": store.unfinished_tasks,
        "deliveries": lambda: store.deliveries(TASK),
        "claim_deliveries": lambda: store.claim_deliveries(1e10, 10, 60.0),
        "next_delivery_at": store.next_delivery_at,
        "reschedule_delivery": lambda: store.reschedule_delivery("d-1", 1, 5.0, {}),
        "settle_delivery": lambda: store.settle_delivery("d-1", "done", 1, None, [hook]),
        "put_image": lambda: store.put_image(record),
        "get_image": lambda: store.get_image("img"),
        "delete_image": lambda: store.delete_image("img"),
        "expired_images": lambda: store.expired_images(1e10, 10),
        "sweep_tasks": lambda: store.sweep_tasks(0.0),
    }


def _protocol_methods(protocol: type) -> set[str]:
    members = inspect.getmembers(protocol, inspect.isfunction)
    return {name for name, _ in members if not name.startswith("_")} - {"close"}


async def _failures(calls: dict[str, Callable[[], Awaitable[Any]]]) -> dict[str, str]:
    """What each call raised: the wire code of a ServiceUnavailable, else the type's name."""
    raised: dict[str, str] = {}
    for name, call in calls.items():
        try:
            await call()
        except ServiceUnavailable as exc:
            raised[name] = "password in message" if PASSWORD in exc.message else exc.code
        except Exception as exc:
            raised[name] = type(exc).__name__
        else:
            raised[name] = "no error"
    return raised


def test_the_store_calls_cover_the_protocol() -> None:
    """A method added to StateStore must be added to the outage tests too."""
    calls = _store_calls(SqliteStateStore(Path("unused.sqlite")))
    assert set(calls) == _protocol_methods(StateStore)


# -- Redis: stopped, then started again ---------------------------------------------------------


def test_redis_state_store_raises_service_unavailable_while_redis_is_down_then_recovers(
    restartable_redis: RestartableRedis,
) -> None:
    async def main() -> dict[str, Any]:
        store = RedisStateStore(restartable_redis.url, "outage", retry=QUICK_RETRY)
        await store.open()
        try:
            await store.create_task(_task())
            await asyncio.to_thread(restartable_redis.stop)
            calls = _store_calls(store)
            down = await _failures(calls)
            with pytest.raises(ServiceUnavailable) as caught:
                await store.get_task(TASK)
            await asyncio.to_thread(restartable_redis.start)
            # The same object, not reopened: the data was lost with the restart, the store works.
            await store.ping()
            await store.create_task(_task())
            back = await store.get_task(TASK)
            return {"down": down, "message": caught.value.message, "back": back}
        finally:
            await store.close()

    outcome = asyncio.run(main())
    assert outcome == {
        "down": dict.fromkeys(outcome["down"], "serviceUnavailable"),
        "message": f"The state store (Redis at 127.0.0.1:{restartable_redis.port}) cannot be "
        "reached.",
        "back": _task(),
    }
    assert set(outcome["down"]) == _protocol_methods(StateStore)


def test_redis_store_open_without_redis_raises_service_unavailable(tmp_path: Path) -> None:
    async def main() -> None:
        store = RedisStateStore(f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0", "x")
        with pytest.raises(ServiceUnavailable, match="cannot be reached") as caught:
            await store.open()
        assert PASSWORD not in caught.value.message

    asyncio.run(main())


def test_redis_job_queue_raises_service_unavailable_while_down_and_recovers_its_groups(
    restartable_redis: RestartableRedis,
) -> None:
    job = QueuedJob(AIR, TASK, 0)

    async def main() -> dict[str, Any]:
        queue = RedisJobQueue(restartable_redis.url, "outage", "w1", retry=QUICK_RETRY)
        try:
            # The consumer group exists and this queue object remembers having created it.
            await queue.put([job])
            (taken,) = await queue.take([AIR], 1, 0.05)
            await asyncio.to_thread(restartable_redis.stop)
            down = await _failures(
                {
                    "ping": queue.ping,
                    "put": lambda: queue.put([job]),
                    "take": lambda: queue.take([AIR], 1, 0.05),
                    "reclaim": lambda: queue.reclaim([AIR], 60.0, 1),
                    "touch": lambda: queue.touch([taken]),
                    "ack": lambda: queue.ack(taken),
                    "depth": lambda: queue.depth(AIR),
                }
            )
            await asyncio.to_thread(restartable_redis.start)
            # Redis lost the stream and its group: putting and taking work again regardless.
            await queue.ping()
            await queue.put([job])
            (again,) = await queue.take([AIR], 1, 0.05)
            await queue.touch([again])
            await queue.ack(again)
            return {
                "down": down,
                "again": (again.task_uuid, again.index),
                "reclaimed": await queue.reclaim([AIR], 0.0, 1),
                "depth": await queue.depth(AIR),
            }
        finally:
            await queue.close()

    outcome = asyncio.run(main())
    assert outcome == {
        "down": dict.fromkeys(outcome["down"], "serviceUnavailable"),
        "again": (TASK, 0),
        "reclaimed": [],
        "depth": 0,
    }
    assert set(outcome["down"]) == _protocol_methods(JobQueue)


@asynccontextmanager
async def _bus(url: str) -> AsyncIterator[RedisEventBus]:
    bus = RedisEventBus(url, "outage", min_backoff_s=0.05, max_backoff_s=0.2)
    await bus.open()
    try:
        yield bus
    finally:
        await bus.close()


def test_redis_event_bus_reports_the_outage_and_is_healthy_and_delivers_once_redis_is_back(
    restartable_redis: RestartableRedis,
) -> None:
    async def main() -> dict[str, Any]:
        async with AsyncExitStack() as stack:
            publisher = await stack.enter_async_context(_bus(restartable_redis.url))
            follower = await stack.enter_async_context(_bus(restartable_redis.url))
            subscription = await stack.enter_async_context(follower.subscribe(TASK))
            healthy_before = follower.healthy
            await follower.ping()
            generation = follower.generation

            await asyncio.to_thread(restartable_redis.stop)
            went_unhealthy = await _eventually(lambda: not follower.healthy)
            with pytest.raises(ServiceUnavailable, match="reconnecting") as pinged:
                await follower.ping()
            with pytest.raises(ServiceUnavailable, match="cannot be reached") as published:
                await publisher.publish(TASK)
            # The failed publish still woke this process's own subscribers; start clean.
            await subscription.wait(0)

            await asyncio.to_thread(restartable_redis.start)
            resubscribed = await follower.wait_subscribed(DEADLINE_S, beyond=generation)
            # What was published during the outage is lost: the reconnection wakes the
            # follower once so that it re-reads the state it follows.
            woken_by_reconnect = await subscription.wait(DEADLINE_S)
            await publisher.wait_subscribed(DEADLINE_S, beyond=generation)
            await publisher.publish(TASK)
            delivered = await subscription.wait(DEADLINE_S)
            await follower.ping()
            return {
                "healthy_before": healthy_before,
                "went_unhealthy": went_unhealthy,
                "ping_down": pinged.value.code,
                "publish_down": published.value.code,
                "secret_kept": PASSWORD not in pinged.value.message + published.value.message,
                "resubscribed": resubscribed,
                "woken_by_reconnect": woken_by_reconnect,
                "delivered": delivered,
                "healthy_after": follower.healthy,
            }

    assert asyncio.run(main()) == {
        "healthy_before": True,
        "went_unhealthy": True,
        "ping_down": "serviceUnavailable",
        "publish_down": "serviceUnavailable",
        "secret_kept": True,
        "resubscribed": True,
        "woken_by_reconnect": True,
        "delivered": True,
        "healthy_after": True,
    }


def test_a_bus_whose_reader_died_is_unhealthy_and_says_so(
    restartable_redis: RestartableRedis,
) -> None:
    async def main() -> tuple[bool, str]:
        async with _bus(restartable_redis.url) as bus:
            # Nothing in the reader lets an error end it; a cancellation is the one way left.
            assert bus._reader is not None
            bus._reader.cancel()
            await asyncio.gather(bus._reader, return_exceptions=True)
            with pytest.raises(ServiceUnavailable, match="stopped listening") as caught:
                await bus.ping()
            return bus.healthy, caught.value.code

    assert asyncio.run(main()) == (False, "serviceUnavailable")


def test_the_local_event_bus_is_always_healthy() -> None:
    from impasto.state.events import LocalEventBus

    bus: EventBus = LocalEventBus()
    asyncio.run(bus.ping())
    assert bus.healthy is True


# -- SQLite: a file locked by another process, a file that cannot be opened ---------------------


@asynccontextmanager
async def _sqlite(path: Path) -> AsyncIterator[SqliteStateStore]:
    # The lock is held for the whole check, so the short busy timeout changes only how soon
    # the store gives up, never the outcome.
    store = SqliteStateStore(path, busy_timeout_s=0.05)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def test_sqlite_store_raises_service_unavailable_while_another_process_holds_the_lock(
    tmp_path: Path,
) -> None:
    path = tmp_path / "impasto.sqlite"

    async def main() -> dict[str, Any]:
        async with _sqlite(path) as store:
            await store.create_task(_task())
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN EXCLUSIVE")
            try:
                with pytest.raises(ServiceUnavailable) as pinged:
                    await store.ping()
                with pytest.raises(ServiceUnavailable) as written:
                    await store.finish_task(TASK, "success", None, 2000.0)
            finally:
                other.execute("ROLLBACK")
                other.close()
            await store.ping()
            finished = await store.finish_task(TASK, "success", None, 2000.0)
            return {
                "ping": pinged.value.message,
                "write": (written.value.code, written.value.message),
                "finished_after": finished,
            }

    assert asyncio.run(main()) == {
        "ping": "The state store (SQLite file impasto.sqlite) is locked by another process.",
        "write": (
            "serviceUnavailable",
            "The state store (SQLite file impasto.sqlite) is locked by another process.",
        ),
        "finished_after": True,
    }


def test_sqlite_store_that_cannot_be_opened_raises_service_unavailable(tmp_path: Path) -> None:
    taken_by_a_directory = tmp_path / "state.sqlite"
    taken_by_a_directory.mkdir()
    (tmp_path / "file").write_text("not a directory")
    under_a_file = tmp_path / "file" / "state.sqlite"

    async def main(path: Path) -> str:
        store = SqliteStateStore(path)
        try:
            with pytest.raises(ServiceUnavailable) as caught:
                await store.open()
        finally:
            await store.close()
        return caught.value.message

    assert asyncio.run(main(taken_by_a_directory)) == (
        "The state store (SQLite file state.sqlite) cannot be opened."
    )
    message = asyncio.run(main(under_a_file))
    assert message.startswith("The state store (SQLite file state.sqlite) cannot be opened")
    assert str(tmp_path) not in message


# -- S3: an endpoint that does not answer --------------------------------------------------------


def test_s3_store_raises_service_unavailable_when_its_endpoint_cannot_be_reached() -> None:
    from impasto.storage.s3 import S3ImageStore

    endpoint = f"http://127.0.0.1:{free_port()}"
    store = S3ImageStore(
        "s3://images/outputs",
        endpoint_url=endpoint.replace("http://", f"http://user:{PASSWORD}@"),
        region="us-east-1",
        access_key_id="AKIDEXAMPLE",
        secret_access_key=PASSWORD,
        connect_timeout_s=2,
        max_attempts=1,
    )
    key = "3f2e1d0c-b9a8-4765-8432-10fedcba9876.png"

    async def main() -> tuple[dict[str, str], str]:
        try:
            down = await _failures(
                {
                    "check": store.check,
                    "put": lambda: store.put(key, b"x", "image/png"),
                    "get": lambda: store.get(key),
                    "delete": lambda: store.delete(key),
                }
            )
            with pytest.raises(ServiceUnavailable) as caught:
                await store.put(key, b"x", "image/png")
            return down, caught.value.message
        finally:
            await store.close()

    assert asyncio.run(main()) == (
        dict.fromkeys(("check", "put", "get", "delete"), "serviceUnavailable"),
        f"S3 put of 'outputs/{key}' on bucket 'images' at {endpoint} failed: "
        "could not connect to the endpoint",
    )


def test_sqlite_store_on_a_file_that_is_not_a_database_raises_service_unavailable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "impasto.sqlite"
    path.write_bytes(b"this is no SQLite file, it only has its name " * 100)

    async def main() -> str:
        store = SqliteStateStore(path)
        try:
            with pytest.raises(ServiceUnavailable) as caught:
                await store.open()
        finally:
            await store.close()
        return caught.value.message

    assert asyncio.run(main()) == (
        "The state store (SQLite file impasto.sqlite) is not a SQLite database."
    )


# -- the replies Redis gives in states the tests cannot easily put a server in -------------------


@pytest.mark.parametrize(
    ("reply", "code", "reason"),
    [
        (redis_errors.BusyLoadingError("Redis is loading the dataset in memory"),
         "serviceUnavailable", "is still loading its data after a restart"),
        (redis_errors.ReadOnlyError("You can't write against a read only replica."),
         "serviceUnavailable", "is a read-only replica"),
        (redis_errors.ResponseError("BUSY Redis is busy running a script."),
         "serviceUnavailable", "is busy running a script"),
        (redis_errors.AuthenticationError("invalid username-password pair"),
         "serviceUnavailable", "refused the configured credentials"),
        (redis_errors.TimeoutError("Timeout reading from socket"),
         "serviceUnavailable", "did not answer in time"),
        (redis_errors.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
         "storageFull", "is out of memory and refuses writes"),
        (redis_errors.ResponseError("MISCONF Redis is configured to save RDB snapshots, but "
                                    "it's currently unable to persist to disk."),
         "storageFull", "cannot save its data (is its disk full?)"),
    ],
)  # fmt: skip
def test_redis_replies_about_the_service_itself_become_typed_errors(
    reply: Exception, code: str, reason: str
) -> None:
    failures = RedisFailures("the job queue (Redis at 10.0.0.5:6379)")
    translated = failures.translate(reply)
    assert translated is not None
    assert (translated.code, translated.message) == (
        code,
        f"The job queue (Redis at 10.0.0.5:6379) {reason}.",
    )


def test_redis_errors_of_our_own_making_pass_unchanged() -> None:
    failures = RedisFailures("the state store (Redis at 127.0.0.1:6379)")
    wrong_type = redis_errors.ResponseError("WRONGTYPE Operation against a key holding ...")
    assert failures.translate(wrong_type) is None
    assert failures.translate(RuntimeError("RedisStateStore used before open()")) is None


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://:{PASSWORD}@127.0.0.1:6380/2", "Redis at 127.0.0.1:6380"),
        (f"rediss://admin:{PASSWORD}@cache.internal/0", "Redis at cache.internal:6379"),
        ("redis://[::1]:7000", "Redis at [::1]:7000"),
        ("unix:///run/redis.sock?db=1", "Redis at unix:/run/redis.sock"),
    ],
)
def test_the_redis_location_in_messages_never_shows_credentials(url: str, shown: str) -> None:
    assert redis_location(url) == shown
