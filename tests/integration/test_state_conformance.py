"""One StateStore contract, run against every implementation: SqliteStateStore on a file and
RedisStateStore on a real redis-server (each test on its own key prefix).

What a StateStore user can observe must not depend on the implementation: records read back
as written, the taskUUID conflict, the once-only writes (add_result per index, finish_task,
settle_delivery) with the deliveries they queue, delivery leases, expiry and sweeping, and
the health of the store: ping, and StorageFull (not a driver error) when it is full."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

from impasto.protocol.errors import ConflictTaskUUID, StorageFull
from impasto.state import redis_store
from impasto.state.records import (
    DeliveryRecord,
    DeliveryStatus,
    ImageRecord,
    ResultRecord,
    ResultStatus,
    TaskRecord,
)
from impasto.state.redis_store import RedisStateStore
from impasto.state.sqlite import SqliteStateStore
from tests.services import RedisServer

T = TypeVar("T")
Store = SqliteStateStore | RedisStateStore

TASK_A = "f47ac10b-58cc-4372-a567-0e02b2c3d493"
TASK_B = "3a6e1a7f-64c9-450e-9dec-9ab449080304"
TASK_C = "caef146d-3ef7-49eb-9c06-b17c9181aa00"


@dataclass
class Backend:
    """Makes stores that share one backing (a file, or a server and a prefix)."""

    name: str
    make: Callable[[], Store]
    server: RedisServer | None = None
    prefix: str = ""
    # Makes the backing refuse writes for lack of space until the context exits.
    full: Callable[[Store], AbstractAsyncContextManager[None]] | None = None

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[Store]:
        store = self.make()
        await store.open()
        try:
            yield store
        finally:
            await store.close()

    def run(self, body: Callable[[Store], Awaitable[T]]) -> T:
        async def main() -> T:
            async with self.opened() as store:
                return await body(store)

        return asyncio.run(main())


def _redis_full(server: RedisServer) -> Callable[[Store], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def full(store: Store) -> AsyncIterator[None]:
        # maxmemory below what Redis already uses: every write is refused with OOM, as when
        # a real Redis without eviction fills up.
        admin = redis.Redis(port=server.port)
        before = admin.config_get("maxmemory")["maxmemory"]
        admin.config_set("maxmemory", 1)
        try:
            yield
        finally:
            admin.config_set("maxmemory", before)
            admin.close()

    return full


@asynccontextmanager
async def _sqlite_full(store: Store) -> AsyncIterator[None]:
    # SQLite's own size cap fails writes with SQLITE_FULL, exactly like a full disk.
    assert isinstance(store, SqliteStateStore)
    db = store._db
    pages = await store._run(lambda: db.execute("PRAGMA page_count").fetchone()[0])
    await store._run(lambda: db.execute(f"PRAGMA max_page_count = {pages}"))
    try:
        yield
    finally:
        await store._run(lambda: db.execute("PRAGMA max_page_count = 1073741823"))


def _redis_backend(server: RedisServer) -> Backend:
    # A fresh prefix per test: no flush, so nothing else on the server is disturbed.
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    return Backend(
        "redis", lambda: RedisStateStore(server.url, prefix), server, prefix, _redis_full(server)
    )


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "state" / "impasto.sqlite"
        return Backend("sqlite", lambda: SqliteStateStore(path), full=_sqlite_full)
    return _redis_backend(request.getfixturevalue("redis_server"))


def task(task_uuid: str = TASK_A, created_at: float = 1000.0, **changes: Any) -> TaskRecord:
    values: dict[str, Any] = {
        "task_uuid": task_uuid,
        "task_type": "imageInference",
        "request": {"taskType": "imageInference", "taskUUID": task_uuid, "numberResults": 2},
        "expected": 2,
        "created_at": created_at,
        "model": "impasto:tiny@1",
        "extra": {"seeds": [1, 2]},
    }
    values.update(changes)
    return TaskRecord(**values)


def result(index: int, task_uuid: str = TASK_A, status: ResultStatus = "success") -> ResultRecord:
    item = {"taskType": "imageInference", "taskUUID": task_uuid, "imageUUID": f"img-{index}"}
    return ResultRecord(task_uuid, index, status, item, 1000.0 + index)


def delivery(
    delivery_id: str,
    task_uuid: str = TASK_A,
    *,
    index: int | None = 0,
    created_at: float = 50.0,
    next_attempt_at: float = 100.0,
    **changes: Any,
) -> DeliveryRecord:
    values: dict[str, Any] = {
        "delivery_id": delivery_id,
        "task_uuid": task_uuid,
        "kind": "webhook",
        "url": "http://127.0.0.1:9/hook",
        "payload": json.dumps({"data": [{"taskUUID": task_uuid}]}),
        "content_type": "application/json",
        "created_at": created_at,
        "next_attempt_at": next_attempt_at,
        "index": index,
    }
    values.update(changes)
    return DeliveryRecord(**values)


def image(image_uuid: str, expires_at: float, task_uuid: str | None = TASK_A) -> ImageRecord:
    return ImageRecord(
        image_uuid=image_uuid,
        key=f"{image_uuid}.jpg",
        content_type="image/jpeg",
        kind="output",
        width=512,
        height=512,
        created_at=expires_at - 3600,
        expires_at=expires_at,
        task_uuid=task_uuid,
    )


# -- tasks -------------------------------------------------------------------------------------


def test_created_task_reads_back_as_written(backend: Backend) -> None:
    bare = task(TASK_B, model=None, extra={}, request={"taskType": "ping", "ünïcode": "✓"})

    async def body(store: Store) -> tuple[TaskRecord | None, TaskRecord | None]:
        await store.create_task(task())
        await store.create_task(bare)
        return await store.get_task(TASK_A), await store.get_task(TASK_B)

    assert backend.run(body) == (task(), bare)


def test_unknown_task_reads_as_none(backend: Backend) -> None:
    async def body(store: Store) -> TaskRecord | None:
        return await store.get_task(TASK_B)

    assert backend.run(body) is None


def test_creating_a_task_with_a_used_uuid_raises_conflict_and_keeps_the_first(
    backend: Backend,
) -> None:
    async def body(store: Store) -> TaskRecord | None:
        await store.create_task(task())
        with pytest.raises(ConflictTaskUUID) as caught:
            await store.create_task(task(model="runway:4@1", expected=5))
        assert caught.value.code == "conflictTaskUUID"
        assert caught.value.parameter == "taskUUID"
        return await store.get_task(TASK_A)

    assert backend.run(body) == task()


def test_concurrent_creates_of_one_uuid_let_exactly_one_in(backend: Backend) -> None:
    async def body(store: Store) -> tuple[list[BaseException | None], TaskRecord | None]:
        outcomes = await asyncio.gather(
            *(store.create_task(task(expected=n)) for n in range(1, 21)), return_exceptions=True
        )
        return outcomes, await store.get_task(TASK_A)

    outcomes, stored = backend.run(body)
    winners = [n for n, outcome in enumerate(outcomes, start=1) if outcome is None]
    assert len(winners) == 1
    assert all(isinstance(o, ConflictTaskUUID) for o in outcomes if o is not None)
    assert stored is not None
    assert stored.expected == winners[0]


def test_finish_task_records_status_error_and_time(backend: Backend) -> None:
    error = {"code": "inferenceError", "message": "boom", "taskUUID": TASK_B}

    async def body(store: Store) -> tuple[bool, bool, TaskRecord | None, TaskRecord | None]:
        await store.create_task(task(TASK_A))
        await store.create_task(task(TASK_B))
        done = await store.finish_task(TASK_A, "success", None, 2000.0)
        failed = await store.finish_task(TASK_B, "error", error, 2001.5)
        return done, failed, await store.get_task(TASK_A), await store.get_task(TASK_B)

    done, failed, a, b = backend.run(body)
    assert (done, failed) == (True, True)
    assert a == replace(task(TASK_A), status="success", finished_at=2000.0)
    assert b == replace(task(TASK_B), status="error", error=error, finished_at=2001.5)


def test_finish_task_finishes_once_and_queues_its_deliveries_once(backend: Backend) -> None:
    async def body(
        store: Store,
    ) -> tuple[bool, bool, TaskRecord | None, list[DeliveryRecord]]:
        await store.create_task(task())
        first = await store.finish_task(TASK_A, "success", None, 2000.0, [delivery("d-first")])
        again = await store.finish_task(
            TASK_A, "error", {"message": "late"}, 3000.0, [delivery("d-again")]
        )
        return first, again, await store.get_task(TASK_A), await store.deliveries(TASK_A)

    first, again, stored, deliveries = backend.run(body)
    assert (first, again) == (True, False)
    assert stored == replace(task(), status="success", finished_at=2000.0)
    assert deliveries == [delivery("d-first")]


def test_finishing_an_unknown_task_changes_nothing(backend: Backend) -> None:
    async def body(store: Store) -> tuple[bool, TaskRecord | None, list[DeliveryRecord]]:
        finished = await store.finish_task(TASK_C, "success", None, 2000.0, [delivery("d-1")])
        return finished, await store.get_task(TASK_C), await store.deliveries(TASK_A)

    assert backend.run(body) == (False, None, [])


def test_twenty_concurrent_finishes_let_exactly_one_win(backend: Backend) -> None:
    async def body(store: Store) -> tuple[list[bool], TaskRecord | None, list[DeliveryRecord]]:
        await store.create_task(task())
        outcomes = await asyncio.gather(
            *(
                store.finish_task(TASK_A, "success", None, 2000.0 + n, [delivery(f"d-{n}")])
                for n in range(20)
            )
        )
        return list(outcomes), await store.get_task(TASK_A), await store.deliveries(TASK_A)

    outcomes, stored, deliveries = backend.run(body)
    assert outcomes.count(True) == 1
    winner = outcomes.index(True)
    assert stored is not None
    assert stored.finished_at == 2000.0 + winner
    assert [d.delivery_id for d in deliveries] == [f"d-{winner}"]


def test_unfinished_tasks_are_the_processing_ones_oldest_first(backend: Backend) -> None:
    async def body(store: Store) -> list[TaskRecord]:
        await store.create_task(task(TASK_A, created_at=300.0))
        await store.create_task(task(TASK_B, created_at=100.0))
        await store.create_task(task(TASK_C, created_at=200.0))
        await store.finish_task(TASK_C, "success", None, 400.0)
        return await store.unfinished_tasks()

    assert backend.run(body) == [task(TASK_B, created_at=100.0), task(TASK_A, created_at=300.0)]


def test_a_task_created_finished_is_not_unfinished_and_is_swept(backend: Backend) -> None:
    done = task(status="success", finished_at=500.0)

    async def body(store: Store) -> tuple[TaskRecord | None, list[TaskRecord], int]:
        await store.create_task(done)
        stored, unfinished = await store.get_task(TASK_A), await store.unfinished_tasks()
        return stored, unfinished, await store.sweep_tasks(1000.0)

    assert backend.run(body) == (done, [], 1)


def test_update_task_extra_merges_into_the_existing_extra(backend: Backend) -> None:
    async def body(store: Store) -> tuple[TaskRecord | None, TaskRecord | None]:
        await store.create_task(task())
        await store.update_task_extra(TASK_A, {"runway": {"0": "rw-task-1"}})
        await store.update_task_extra(TASK_A, {"seeds": [7]})
        # An unknown task is left unknown.
        await store.update_task_extra(TASK_B, {"x": 1})
        return await store.get_task(TASK_A), await store.get_task(TASK_B)

    stored, unknown = backend.run(body)
    assert stored is not None
    assert stored.extra == {"seeds": [7], "runway": {"0": "rw-task-1"}}
    assert unknown is None


def test_concurrent_extra_updates_all_land(backend: Backend) -> None:
    async def body(store: Store) -> TaskRecord | None:
        await store.create_task(task())
        await asyncio.gather(*(store.update_task_extra(TASK_A, {f"job{n}": n}) for n in range(20)))
        return await store.get_task(TASK_A)

    stored = backend.run(body)
    assert stored is not None
    assert stored.extra == {"seeds": [1, 2], **{f"job{n}": n for n in range(20)}}


# -- results and progress ----------------------------------------------------------------------


def test_add_result_is_idempotent_per_task_and_index(backend: Backend) -> None:
    async def body(store: Store) -> tuple[bool, bool, list[ResultRecord], list[DeliveryRecord]]:
        await store.create_task(task())
        first = await store.add_result(result(0), [delivery("d-first")])
        again = await store.add_result(result(0, status="error"), [delivery("d-again")])
        return first, again, await store.results(TASK_A), await store.deliveries(TASK_A)

    first, again, results, deliveries = backend.run(body)
    assert (first, again) == (True, False)
    assert results == [result(0)]
    assert deliveries == [delivery("d-first")]


def test_a_result_stored_with_its_image_records_both(backend: Backend) -> None:
    async def body(store: Store) -> tuple[bool, ImageRecord | None]:
        await store.create_task(task())
        stored = await store.add_result(result(0), image=image("img-0", 9000.0))
        return stored, await store.get_image("img-0")

    assert backend.run(body) == (True, image("img-0", 9000.0))


def test_task_view_reads_the_task_its_results_and_its_deliveries_together(
    backend: Backend,
) -> None:
    async def body(store: Store) -> tuple[Any, Any]:
        await store.create_task(task())
        await store.add_result(result(1), [delivery("d-1", index=1, created_at=60.0)])
        await store.add_result(result(0), [delivery("d-0", index=0, created_at=50.0)])
        return await store.task_view(TASK_A), await store.task_view(TASK_B)

    view, unknown = backend.run(body)
    assert unknown is None
    assert view.task == task()
    assert view.results == [result(0), result(1)]
    assert [d.delivery_id for d in view.deliveries] == ["d-0", "d-1"]


def test_twenty_concurrent_adds_of_one_index_store_exactly_one(backend: Backend) -> None:
    def variant(n: int) -> ResultRecord:
        return replace(result(0), item={"imageUUID": f"img-{n}"})

    async def body(store: Store) -> tuple[list[bool], list[ResultRecord], list[DeliveryRecord]]:
        await store.create_task(task())
        outcomes = await asyncio.gather(
            *(store.add_result(variant(n), [delivery(f"d-{n}")]) for n in range(20))
        )
        return list(outcomes), await store.results(TASK_A), await store.deliveries(TASK_A)

    outcomes, results, deliveries = backend.run(body)
    assert outcomes.count(True) == 1
    winner = outcomes.index(True)
    assert results == [variant(winner)]
    assert [d.delivery_id for d in deliveries] == [f"d-{winner}"]


def test_same_index_of_another_task_is_a_separate_result(backend: Backend) -> None:
    async def body(store: Store) -> tuple[bool, list[ResultRecord]]:
        await store.create_task(task(TASK_A))
        await store.create_task(task(TASK_B))
        await store.add_result(result(0, TASK_A))
        stored = await store.add_result(result(0, TASK_B))
        return stored, await store.results(TASK_B)

    assert backend.run(body) == (True, [result(0, TASK_B)])


def test_results_come_back_ordered_by_index_whatever_the_order_of_arrival(
    backend: Backend,
) -> None:
    async def body(store: Store) -> list[ResultRecord]:
        await store.create_task(task(expected=12))
        for index in (2, 10, 0, 11, 1):
            await store.add_result(result(index))
        return await store.results(TASK_A)

    assert backend.run(body) == [result(i) for i in (0, 1, 2, 10, 11)]


def test_results_of_an_unknown_task_are_empty(backend: Backend) -> None:
    async def body(store: Store) -> list[ResultRecord]:
        return await store.results(TASK_C)

    assert backend.run(body) == []


def test_a_clashing_delivery_id_fails_the_whole_write(backend: Backend) -> None:
    async def body(store: Store) -> tuple[list[ResultRecord], list[DeliveryRecord], Any]:
        await store.create_task(task())
        await store.add_result(result(0), [delivery("d-1")])
        with pytest.raises(Exception, match="delivery_id"):
            await store.add_result(result(1), [delivery("d-2", index=1), delivery("d-1")])
        with pytest.raises(Exception, match="delivery_id"):
            await store.settle_delivery("d-1", "done", 1, None, [delivery("d-1")])
        with pytest.raises(Exception, match="delivery_id"):
            await store.finish_task(TASK_A, "success", None, 2000.0, [delivery("d-1")])
        stored = await store.get_task(TASK_A)
        return await store.results(TASK_A), await store.deliveries(TASK_A), stored

    results, deliveries, stored = backend.run(body)
    assert results == [result(0)]
    assert deliveries == [delivery("d-1")]
    assert stored == task()


def test_progress_is_kept_per_index_and_cleared_when_the_result_is_stored(
    backend: Backend,
) -> None:
    async def body(store: Store) -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
        await store.create_task(task())
        await store.set_progress(TASK_A, 0, 40)
        await store.set_progress(TASK_A, 1, 70)
        await store.set_progress(TASK_A, 1, 80)
        before = await store.progress(TASK_A)
        await store.add_result(result(0))
        return before, await store.progress(TASK_A), await store.progress(TASK_B)

    assert backend.run(body) == ({0: 40, 1: 80}, {1: 80}, {})


def test_finishing_a_task_clears_its_progress(backend: Backend) -> None:
    async def body(store: Store) -> dict[int, int]:
        await store.create_task(task())
        await store.set_progress(TASK_A, 1, 70)
        await store.finish_task(TASK_A, "success", None, 2000.0)
        return await store.progress(TASK_A)

    assert backend.run(body) == {}


# -- deliveries --------------------------------------------------------------------------------


def test_deliveries_read_back_as_written_oldest_first(backend: Backend) -> None:
    full = delivery(
        "d-full",
        index=None,
        created_at=60.0,
        kind="upload",
        payload="outputs/img-0.png",
        content_type="image/png",
        attempts=3,
        last_error={"message": "503"},
        then={"url": "http://127.0.0.1:9/after", "payload": {"data": []}},
    )
    late = delivery("d-late", created_at=70.0)
    indexed = delivery("d-indexed", index=1, created_at=60.0)
    other = delivery("d-other", TASK_B)

    async def body(store: Store) -> tuple[list[DeliveryRecord], list[DeliveryRecord]]:
        await store.create_task(task())
        await store.add_result(result(0), [late, indexed, full])
        await store.add_result(result(0, TASK_B), [other])
        return await store.deliveries(TASK_A), await store.deliveries(TASK_C)

    assert backend.run(body) == ([full, indexed, late], [])


def test_claim_takes_due_deliveries_soonest_first_and_leases_them(backend: Backend) -> None:
    queued = [
        delivery("d-late", next_attempt_at=300.0),
        delivery("d-early", next_attempt_at=100.0, index=1),
        delivery("d-mid", next_attempt_at=200.0, index=2),
        delivery("d-future", next_attempt_at=5000.0, index=3),
    ]

    async def body(
        store: Store,
    ) -> tuple[list[DeliveryRecord], list[DeliveryRecord], list[DeliveryRecord], float | None]:
        await store.create_task(task())
        await store.add_result(result(0), queued)
        first = await store.claim_deliveries(1000.0, limit=2, lease_s=60.0)
        second = await store.claim_deliveries(1000.0, limit=10, lease_s=60.0)
        return first, second, await store.deliveries(TASK_A), await store.next_delivery_at()

    first, second, stored, next_at = backend.run(body)
    # Claimed records come back as they were before the claim.
    assert first == [queued[1], queued[2]]
    assert second == [queued[0]]
    by_id = {d.delivery_id: d.next_attempt_at for d in stored}
    assert by_id == {"d-early": 1060.0, "d-mid": 1060.0, "d-late": 1060.0, "d-future": 5000.0}
    assert next_at == 1060.0


def test_a_lease_hides_a_delivery_until_it_runs_out(backend: Backend) -> None:
    async def body(store: Store) -> list[list[str]]:
        await store.create_task(task())
        await store.add_result(result(0), [delivery("d-1", next_attempt_at=100.0)])
        rounds = []
        for now in (1000.0, 1299.5, 1300.0, 1300.0):
            claimed = await store.claim_deliveries(now, limit=10, lease_s=300.0)
            rounds.append([d.delivery_id for d in claimed])
        return rounds

    # Due again exactly when the lease ends: `next_attempt_at <= now` is due.
    assert backend.run(body) == [["d-1"], [], ["d-1"], []]


def test_two_concurrent_claimers_never_take_the_same_delivery(backend: Backend) -> None:
    ids = [f"d-{n:02d}" for n in range(60)]

    async def body(store: Store) -> list[list[DeliveryRecord]]:
        await store.create_task(task())
        await store.add_result(result(0), [delivery(i, next_attempt_at=100.0) for i in ids])
        async with backend.opened() as other:
            claims = [
                s.claim_deliveries(1000.0, limit=7, lease_s=60.0)
                for _ in range(6)
                for s in (store, other)
            ]
            return list(await asyncio.gather(*claims))

    claimed = [d.delivery_id for batch in backend.run(body) for d in batch]
    assert len(claimed) == len(set(claimed))
    assert sorted(claimed) == ids


def test_next_delivery_at_is_the_earliest_pending_one(backend: Backend) -> None:
    async def body(store: Store) -> list[float | None]:
        seen = [await store.next_delivery_at()]
        await store.create_task(task())
        await store.add_result(
            result(0),
            [delivery("d-1", next_attempt_at=300.0), delivery("d-2", next_attempt_at=150.5)],
        )
        seen.append(await store.next_delivery_at())
        await store.settle_delivery("d-2", "done", 1, None)
        seen.append(await store.next_delivery_at())
        await store.settle_delivery("d-1", "failed", 1, {"message": "410"})
        seen.append(await store.next_delivery_at())
        return seen

    assert backend.run(body) == [None, 150.5, 300.0, None]


def test_reschedule_records_the_failed_attempt_of_a_pending_delivery(backend: Backend) -> None:
    error = {"message": "503", "status": 503}

    async def body(
        store: Store,
    ) -> tuple[list[DeliveryRecord], list[DeliveryRecord], list[DeliveryRecord]]:
        await store.create_task(task())
        await store.add_result(result(0), [delivery("d-1"), delivery("d-2", index=1)])
        await store.reschedule_delivery("d-1", 1, 700.25, error)
        await store.reschedule_delivery("d-2", 2, 800.0, {})
        due = await store.claim_deliveries(750.0, limit=10, lease_s=60.0)
        rescheduled = await store.deliveries(TASK_A)
        # A settled delivery is not brought back by a late reschedule.
        await store.settle_delivery("d-2", "done", 3, None)
        await store.reschedule_delivery("d-2", 4, 900.0, {"message": "late"})
        return due, rescheduled, await store.deliveries(TASK_A)

    due, rescheduled, settled = backend.run(body)
    assert due == [delivery("d-1", attempts=1, next_attempt_at=700.25, last_error=error)]
    assert rescheduled == [
        delivery("d-1", attempts=1, next_attempt_at=810.0, last_error=error),
        # An empty error is kept as given: SQLite writes a rescheduled error even when empty.
        delivery("d-2", index=1, attempts=2, next_attempt_at=800.0, last_error={}),
    ]
    assert settled[1] == delivery("d-2", index=1, attempts=3, next_attempt_at=800.0, status="done")


def test_settle_is_once_only_and_queues_its_follow_ups_with_it(backend: Backend) -> None:
    follow_up = delivery("d-then", created_at=80.0, next_attempt_at=80.0)

    async def body(store: Store) -> tuple[bool, bool, bool, list[DeliveryRecord], list[str]]:
        await store.create_task(task())
        await store.add_result(result(0), [delivery("d-1")])
        await store.reschedule_delivery("d-1", 1, 100.0, {"message": "503"})
        first = await store.settle_delivery("d-1", "done", 2, None, [follow_up])
        again = await store.settle_delivery("d-1", "failed", 3, {"message": "x"}, [delivery("d-x")])
        unknown = await store.settle_delivery("d-nope", "done", 1, None)
        due = await store.claim_deliveries(1000.0, limit=10, lease_s=60.0)
        return first, again, unknown, await store.deliveries(TASK_A), [d.delivery_id for d in due]

    first, again, unknown, stored, due = backend.run(body)
    assert (first, again, unknown) == (True, False, False)
    # Settling with no error clears the last attempt's error.
    assert stored == [
        delivery("d-1", attempts=2, status="done"),
        replace(follow_up, next_attempt_at=1060.0),  # leased by the claim
    ]
    assert due == ["d-then"]


def test_twenty_concurrent_settles_let_exactly_one_win(backend: Backend) -> None:
    statuses: list[DeliveryStatus] = ["done", "failed"]

    async def body(store: Store) -> tuple[list[bool], list[DeliveryRecord]]:
        await store.create_task(task())
        await store.add_result(result(0), [delivery("d-1")])
        outcomes = await asyncio.gather(
            *(
                store.settle_delivery(
                    "d-1", statuses[n % 2], n, None, [delivery(f"d-then-{n}", created_at=90.0)]
                )
                for n in range(20)
            )
        )
        return list(outcomes), await store.deliveries(TASK_A)

    outcomes, stored = backend.run(body)
    assert outcomes.count(True) == 1
    winner = outcomes.index(True)
    assert [(d.delivery_id, d.attempts) for d in stored] == [
        ("d-1", winner),
        (f"d-then-{winner}", 0),
    ]


# -- images ------------------------------------------------------------------------------------


def test_image_reads_back_as_written_and_a_put_replaces_it(backend: Backend) -> None:
    async def body(store: Store) -> tuple[ImageRecord | None, ImageRecord | None, list[str]]:
        await store.put_image(image("upload", 9000.0, task_uuid=None))
        await store.put_image(image("output", 100.0))
        first = await store.get_image("upload")
        # Replacing moves the expiry too: the old one no longer lists it.
        await store.put_image(image("output", 9500.0, task_uuid=None))
        expired = [i.image_uuid for i in await store.expired_images(1000.0, 10)]
        return first, await store.get_image("output"), expired

    assert backend.run(body) == (
        image("upload", 9000.0, task_uuid=None),
        image("output", 9500.0, task_uuid=None),
        [],
    )


def test_expired_images_are_listed_soonest_first_up_to_the_limit(backend: Backend) -> None:
    async def body(store: Store) -> tuple[list[str], list[str], list[str], ImageRecord | None]:
        for name, expires in (("late", 900.0), ("early", 100.0), ("mid", 500.0), ("kept", 5e9)):
            await store.put_image(image(name, expires))
        all_due = [i.image_uuid for i in await store.expired_images(1000.0, 10)]
        first_two = [i.image_uuid for i in await store.expired_images(1000.0, 2)]
        none = [i.image_uuid for i in await store.expired_images(1000.0, 0)]
        return all_due, first_two, none, await store.get_image("kept")

    assert backend.run(body) == (["early", "mid", "late"], ["early", "mid"], [], image("kept", 5e9))


def test_image_expiring_exactly_now_is_expired(backend: Backend) -> None:
    async def body(store: Store) -> list[ImageRecord]:
        await store.put_image(image("edge", 1000.0))
        return await store.expired_images(1000.0, 10)

    assert backend.run(body) == [image("edge", 1000.0)]


def test_deleted_image_is_gone(backend: Backend) -> None:
    async def body(store: Store) -> tuple[ImageRecord | None, list[ImageRecord]]:
        await store.put_image(image("gone", 100.0, task_uuid=None))
        await store.delete_image("gone")
        await store.delete_image("never-there")
        return await store.get_image("gone"), await store.expired_images(1e10, 10)

    assert backend.run(body) == (None, [])


# -- sweeping ----------------------------------------------------------------------------------


def test_sweep_removes_old_finished_tasks_with_their_results_and_settled_deliveries(
    backend: Backend,
) -> None:
    async def body(store: Store) -> tuple[int, dict[str, Any]]:
        await store.create_task(task(TASK_A))  # finished long ago: swept
        await store.create_task(task(TASK_B))  # finished exactly at the cut: kept
        await store.create_task(task(TASK_C))  # still processing: kept
        for uuid_ in (TASK_A, TASK_B, TASK_C):
            await store.add_result(
                result(0, uuid_),
                [delivery(f"{uuid_}-done", uuid_), delivery(f"{uuid_}-pending", uuid_, index=1)],
            )
            await store.settle_delivery(f"{uuid_}-done", "done", 1, None)
        await store.finish_task(TASK_A, "success", None, 1000.0)
        await store.finish_task(TASK_B, "success", None, 2000.0)
        swept = await store.sweep_tasks(finished_before=2000.0)
        state: dict[str, Any] = {}
        for uuid_ in (TASK_A, TASK_B, TASK_C):
            state[uuid_] = (
                await store.get_task(uuid_) is not None,
                await store.results(uuid_),
                [d.delivery_id for d in await store.deliveries(uuid_)],
            )
        state["again"] = await store.sweep_tasks(finished_before=2000.0)
        return swept, state

    swept, state = backend.run(body)
    assert swept == 1
    # A pending delivery outlives its task: the outbox still owes it.
    assert state[TASK_A] == (False, [], [f"{TASK_A}-pending"])
    assert state[TASK_B] == (True, [result(0, TASK_B)], [f"{TASK_B}-done", f"{TASK_B}-pending"])
    assert state[TASK_C] == (True, [result(0, TASK_C)], [f"{TASK_C}-done", f"{TASK_C}-pending"])
    assert state["again"] == 0


def test_swept_task_uuid_can_be_used_again(backend: Backend) -> None:
    async def body(store: Store) -> tuple[TaskRecord | None, list[TaskRecord]]:
        await store.create_task(task())
        await store.finish_task(TASK_A, "success", None, 1000.0)
        await store.sweep_tasks(finished_before=2000.0)
        await store.create_task(task(created_at=3000.0))
        return await store.get_task(TASK_A), await store.unfinished_tasks()

    assert backend.run(body) == (task(created_at=3000.0), [task(created_at=3000.0)])


# -- lifecycle ---------------------------------------------------------------------------------


def test_data_survives_closing_and_reopening_the_store(backend: Backend) -> None:
    error = {"code": "inferenceError", "message": "boom"}
    pending = delivery("d-pending", TASK_B, next_attempt_at=150.0)

    async def write(store: Store) -> None:
        await store.create_task(task(TASK_A))
        await store.create_task(task(TASK_B))
        await store.add_result(result(1, TASK_A))
        await store.add_result(result(0, TASK_A, status="error"))
        await store.finish_task(TASK_A, "error", error, 2000.0)
        await store.update_task_extra(TASK_B, {"note": "kept"})
        await store.add_result(result(0, TASK_B), [pending])
        await store.put_image(image("img-0", 9000.0))

    async def read(store: Store) -> dict[str, Any]:
        with pytest.raises(ConflictTaskUUID):
            await store.create_task(task(TASK_A))
        return {
            "task": await store.get_task(TASK_A),
            "results": await store.results(TASK_A),
            "unfinished": [t.task_uuid for t in await store.unfinished_tasks()],
            "extra": (await store.get_task(TASK_B) or task()).extra,
            "deliveries": await store.deliveries(TASK_B),
            "due": await store.claim_deliveries(1000.0, limit=10, lease_s=60.0),
            "image": await store.get_image("img-0"),
        }

    backend.run(write)
    assert backend.run(read) == {
        "task": replace(task(TASK_A), status="error", error=error, finished_at=2000.0),
        "results": [result(0, TASK_A, status="error"), result(1, TASK_A)],
        "unfinished": [TASK_B],
        "extra": {"seeds": [1, 2], "note": "kept"},
        "deliveries": [pending],
        "due": [pending],
        "image": image("img-0", 9000.0),
    }


def test_store_used_before_open_says_so(backend: Backend) -> None:
    async def main() -> None:
        store = backend.make()
        try:
            with pytest.raises(RuntimeError, match="before open"):
                await store.get_task(TASK_A)
            with pytest.raises(RuntimeError, match="before open"):
                await store.ping()
        finally:
            await store.close()

    asyncio.run(main())


# -- health ------------------------------------------------------------------------------------


def test_ping_answers_on_an_open_store(backend: Backend) -> None:
    async def body(store: Store) -> TaskRecord | None:
        # Twice, then a write: a ping leaves nothing (no lock, no transaction) in the way.
        await store.ping()
        await store.ping()
        await store.create_task(task(TASK_A))
        return await store.get_task(TASK_A)

    assert backend.run(body) == task(TASK_A)


def test_a_full_store_raises_storage_full_on_writes_and_works_again_once_there_is_room(
    backend: Backend,
) -> None:
    # Big enough that no write fits in the free space of pages SQLite already has.
    big = {"taskType": "imageInference", "positivePrompt": "x" * 200_000}
    big_result = replace(result(0), item={**result(0).item, "note": "x" * 200_000})
    big_image = replace(image("img-0", 9000.0), key="x" * 200_000)

    async def body(store: Store) -> dict[str, Any]:
        assert backend.full is not None
        await store.create_task(task(TASK_A))
        refused: dict[str, StorageFull] = {}
        async with backend.full(store):
            for name, write in (
                ("create_task", lambda: store.create_task(task(TASK_B, request=big))),
                ("add_result", lambda: store.add_result(big_result, [delivery("d-1")])),
                ("put_image", lambda: store.put_image(big_image)),
            ):
                with pytest.raises(StorageFull) as caught:
                    await write()
                refused[name] = caught.value
            # Reads go on while writes are refused.
            during = await store.get_task(TASK_A)
        await store.create_task(task(TASK_B, request=big))
        return {
            "codes": {name: error.code for name, error in refused.items()},
            "messages_name_the_store": all(
                e.message.startswith("The state store (") for e in refused.values()
            ),
            "read_during": during,
            "after": (await store.get_task(TASK_B) or task()).request,
            "nothing_half_written": (await store.results(TASK_A), await store.get_image("img-0")),
        }

    assert backend.run(body) == {
        "codes": dict.fromkeys(("create_task", "add_result", "put_image"), "storageFull"),
        "messages_name_the_store": True,
        "read_during": task(TASK_A),
        "after": big,
        "nothing_half_written": ([], None),
    }


# -- Redis only: the key layout and its hygiene --------------------------------------------------


@pytest.fixture
def redis_backend(redis_server: RedisServer) -> Backend:
    return _redis_backend(redis_server)


def _keys(backend: Backend) -> dict[str, str]:
    assert backend.server is not None
    client = redis.Redis(port=backend.server.port, decode_responses=True)
    names = client.keys(f"{backend.prefix}:*")
    return {name.removeprefix(f"{backend.prefix}:"): client.type(name) for name in names}


def test_redis_keys_follow_the_documented_layout(redis_backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.create_task(task(TASK_A))
        await store.create_task(task(TASK_B))
        await store.set_progress(TASK_A, 1, 50)
        await store.add_result(result(0), [delivery("d-1")])
        await store.finish_task(TASK_B, "success", None, 2000.0)
        await store.put_image(image("img-0", 9000.0))

    redis_backend.run(body)
    assert _keys(redis_backend) == {
        f"task:{TASK_A}": "hash",
        f"task:{TASK_B}": "hash",
        f"results:{TASK_A}": "hash",
        f"progress:{TASK_A}": "hash",
        f"task-deliveries:{TASK_A}": "list",
        "tasks:processing": "zset",
        "tasks:finished": "zset",
        "delivery:d-1": "hash",
        "deliveries:pending": "zset",
        "image:img-0": "hash",
        "images:expiry": "zset",
    }


def test_redis_progress_expires_on_its_own(redis_backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.set_progress(TASK_A, 0, 10)

    redis_backend.run(body)
    assert redis_backend.server is not None
    client = redis.Redis(port=redis_backend.server.port)
    ttl = client.ttl(f"{redis_backend.prefix}:progress:{TASK_A}")
    assert 0 < ttl <= 3600


def test_redis_sweep_leaves_no_keys_behind_and_runs_in_batches(
    redis_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_store, "SWEEP_BATCH", 2)
    uuids = [str(uuid.UUID(int=n)) for n in range(5)]

    async def body(store: Store) -> int:
        for n, task_uuid in enumerate(uuids):
            await store.create_task(task(task_uuid))
            await store.add_result(result(0, task_uuid), [delivery(f"d-{n}", task_uuid)])
            await store.settle_delivery(f"d-{n}", "done", 1, None)
            await store.finish_task(task_uuid, "success", None, 1000.0 + n)
        return await store.sweep_tasks(finished_before=2000.0)

    assert redis_backend.run(body) == 5
    assert _keys(redis_backend) == {}


def test_sqlite_reopen_voids_the_delivery_leases_of_the_previous_process(tmp_path: Path) -> None:
    """One process owns a SQLite file: after a restart nothing it had claimed stays hidden."""
    path = tmp_path / "impasto.sqlite"
    backend = Backend("sqlite", lambda: SqliteStateStore(path))

    async def claim(store: Store) -> list[str]:
        await store.create_task(task(TASK_A))
        await store.add_result(result(0, TASK_A), [delivery("d1", TASK_A, next_attempt_at=0.0)])
        claimed = await store.claim_deliveries(time.time(), limit=10, lease_s=3600.0)
        # Within the same process the lease holds.
        assert await store.claim_deliveries(time.time(), limit=10, lease_s=60.0) == []
        return [d.delivery_id for d in claimed]

    async def after_restart(store: Store) -> list[str]:
        claimed = await store.claim_deliveries(time.time(), limit=10, lease_s=60.0)
        return [d.delivery_id for d in claimed]

    assert backend.run(claim) == ["d1"]
    assert backend.run(after_restart) == ["d1"]
