"""SqliteStateStore on a real file: tasks, result items, images, sweeping and durability."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from impasto.protocol.errors import ConflictTaskUUID
from impasto.state.records import ImageRecord, ResultRecord, ResultStatus, TaskRecord
from impasto.state.sqlite import SqliteStateStore

TASK_A = "f47ac10b-58cc-4372-a567-0e02b2c3d493"
TASK_B = "3a6e1a7f-64c9-450e-9dec-9ab449080304"
TASK_C = "caef146d-3ef7-49eb-9c06-b17c9181aa00"


@asynccontextmanager
async def opened(path: Path) -> AsyncIterator[SqliteStateStore]:
    store = SqliteStateStore(path)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def with_store(path: Path, body: Callable[[SqliteStateStore], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with opened(path) as store:
            return await body(store)

    return asyncio.run(main())


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


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "impasto.sqlite"


def test_created_task_reads_back_as_written(db: Path) -> None:
    async def body(store: SqliteStateStore) -> TaskRecord | None:
        await store.create_task(task())
        return await store.get_task(TASK_A)

    assert with_store(db, body) == task()


def test_unknown_task_reads_as_none(db: Path) -> None:
    async def body(store: SqliteStateStore) -> TaskRecord | None:
        return await store.get_task(TASK_B)

    assert with_store(db, body) is None


def test_creating_a_task_with_a_used_uuid_raises_conflict_and_keeps_the_first(db: Path) -> None:
    async def body(store: SqliteStateStore) -> TaskRecord | None:
        await store.create_task(task())
        with pytest.raises(ConflictTaskUUID) as caught:
            await store.create_task(task(model="runway:4@1", expected=5))
        assert caught.value.code == "conflictTaskUUID"
        assert caught.value.parameter == "taskUUID"
        return await store.get_task(TASK_A)

    stored = with_store(db, body)
    assert stored is not None
    assert (stored.model, stored.expected) == ("impasto:tiny@1", 2)


def test_add_result_is_idempotent_per_task_and_index(db: Path) -> None:
    async def body(store: SqliteStateStore) -> tuple[bool, bool, list[ResultRecord]]:
        await store.create_task(task())
        first = await store.add_result(result(0))
        again = await store.add_result(result(0, status="error"))
        return first, again, await store.results(TASK_A)

    first, again, results = with_store(db, body)
    assert (first, again) == (True, False)
    assert results == [result(0)]


def test_same_index_of_another_task_is_a_separate_result(db: Path) -> None:
    async def body(store: SqliteStateStore) -> tuple[bool, list[ResultRecord]]:
        await store.create_task(task(TASK_A))
        await store.create_task(task(TASK_B))
        await store.add_result(result(0, TASK_A))
        stored = await store.add_result(result(0, TASK_B))
        return stored, await store.results(TASK_B)

    stored, results = with_store(db, body)
    assert stored is True
    assert results == [result(0, TASK_B)]


def test_results_come_back_ordered_by_index_whatever_the_order_of_arrival(db: Path) -> None:
    async def body(store: SqliteStateStore) -> list[ResultRecord]:
        await store.create_task(task(expected=4))
        for index in (2, 0, 3, 1):
            await store.add_result(result(index))
        return await store.results(TASK_A)

    results = with_store(db, body)
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert [r.item["imageUUID"] for r in results] == ["img-0", "img-1", "img-2", "img-3"]


def test_results_of_an_unknown_task_are_empty(db: Path) -> None:
    async def body(store: SqliteStateStore) -> list[ResultRecord]:
        return await store.results(TASK_C)

    assert with_store(db, body) == []


def test_finish_task_records_status_error_and_time(db: Path) -> None:
    error = {"code": "inferenceError", "message": "boom", "taskUUID": TASK_B}

    async def body(store: SqliteStateStore) -> tuple[TaskRecord | None, TaskRecord | None]:
        await store.create_task(task(TASK_A))
        await store.create_task(task(TASK_B))
        await store.finish_task(TASK_A, "success", None, 2000.0)
        await store.finish_task(TASK_B, "error", error, 2001.0)
        return await store.get_task(TASK_A), await store.get_task(TASK_B)

    done, failed = with_store(db, body)
    assert done is not None
    assert failed is not None
    assert (done.status, done.error, done.finished_at) == ("success", None, 2000.0)
    assert (failed.status, failed.error, failed.finished_at) == ("error", error, 2001.0)


def test_unfinished_tasks_are_the_processing_ones_oldest_first(db: Path) -> None:
    async def body(store: SqliteStateStore) -> list[str]:
        await store.create_task(task(TASK_A, created_at=300.0))
        await store.create_task(task(TASK_B, created_at=100.0))
        await store.create_task(task(TASK_C, created_at=200.0))
        await store.finish_task(TASK_C, "success", None, 400.0)
        return [t.task_uuid for t in await store.unfinished_tasks()]

    assert with_store(db, body) == [TASK_B, TASK_A]


def test_update_task_extra_merges_into_the_existing_extra(db: Path) -> None:
    async def body(store: SqliteStateStore) -> TaskRecord | None:
        await store.create_task(task())
        await store.update_task_extra(TASK_A, {"runway": {"0": "rw-task-1"}})
        return await store.get_task(TASK_A)

    stored = with_store(db, body)
    assert stored is not None
    assert stored.extra == {"seeds": [1, 2], "runway": {"0": "rw-task-1"}}


def test_progress_is_kept_per_index_and_cleared_when_the_result_is_stored(db: Path) -> None:
    async def body(store: SqliteStateStore) -> tuple[dict[int, int], dict[int, int]]:
        await store.create_task(task())
        await store.set_progress(TASK_A, 0, 40)
        await store.set_progress(TASK_A, 1, 70)
        before = await store.progress(TASK_A)
        await store.add_result(result(0))
        return before, await store.progress(TASK_A)

    before, after = with_store(db, body)
    assert before == {0: 40, 1: 70}
    assert after == {1: 70}


def test_expired_images_are_listed_soonest_first_up_to_the_limit(db: Path) -> None:
    async def body(store: SqliteStateStore) -> tuple[list[str], list[str], ImageRecord | None]:
        for name, expires in (("late", 900.0), ("early", 100.0), ("mid", 500.0), ("kept", 5e9)):
            await store.put_image(image(name, expires))
        all_due = [i.image_uuid for i in await store.expired_images(1000.0, 10)]
        first_two = [i.image_uuid for i in await store.expired_images(1000.0, 2)]
        return all_due, first_two, await store.get_image("kept")

    all_due, first_two, kept = with_store(db, body)
    assert all_due == ["early", "mid", "late"]
    assert first_two == ["early", "mid"]
    assert kept == image("kept", 5e9)


def test_image_expiring_exactly_now_is_expired(db: Path) -> None:
    async def body(store: SqliteStateStore) -> list[ImageRecord]:
        await store.put_image(image("edge", 1000.0))
        return await store.expired_images(1000.0, 10)

    assert [i.image_uuid for i in with_store(db, body)] == ["edge"]


def test_deleted_image_is_gone(db: Path) -> None:
    async def body(store: SqliteStateStore) -> tuple[ImageRecord | None, list[ImageRecord]]:
        await store.put_image(image("gone", 100.0, task_uuid=None))
        await store.delete_image("gone")
        return await store.get_image("gone"), await store.expired_images(1e10, 10)

    assert with_store(db, body) == (None, [])


def test_sweep_removes_old_finished_tasks_with_their_results_only(db: Path) -> None:
    async def body(
        store: SqliteStateStore,
    ) -> tuple[int, dict[str, TaskRecord | None], dict[str, list[ResultRecord]]]:
        await store.create_task(task(TASK_A))  # finished long ago: swept
        await store.create_task(task(TASK_B))  # finished recently: kept
        await store.create_task(task(TASK_C))  # still processing: kept
        for uuid in (TASK_A, TASK_B, TASK_C):
            await store.add_result(result(0, uuid))
        await store.finish_task(TASK_A, "success", None, 1000.0)
        await store.finish_task(TASK_B, "success", None, 5000.0)
        swept = await store.sweep_tasks(finished_before=2000.0)
        uuids = (TASK_A, TASK_B, TASK_C)
        tasks = {u: await store.get_task(u) for u in uuids}
        results = {u: await store.results(u) for u in uuids}
        return swept, tasks, results

    swept, tasks, results = with_store(db, body)
    assert swept == 1
    assert tasks[TASK_A] is None
    assert results[TASK_A] == []
    assert tasks[TASK_B] is not None
    assert results[TASK_B] == [result(0, TASK_B)]
    assert tasks[TASK_C] is not None
    assert results[TASK_C] == [result(0, TASK_C)]


def test_swept_task_uuid_can_be_used_again(db: Path) -> None:
    async def body(store: SqliteStateStore) -> TaskRecord | None:
        await store.create_task(task())
        await store.finish_task(TASK_A, "success", None, 1000.0)
        await store.sweep_tasks(finished_before=2000.0)
        await store.create_task(task(created_at=3000.0))
        return await store.get_task(TASK_A)

    stored = with_store(db, body)
    assert stored is not None
    assert (stored.status, stored.created_at) == ("processing", 3000.0)


def test_data_survives_closing_and_reopening_the_file(db: Path) -> None:
    error = {"code": "inferenceError", "message": "boom"}

    async def write(store: SqliteStateStore) -> None:
        await store.create_task(task(TASK_A))
        await store.create_task(task(TASK_B))
        await store.add_result(result(1, TASK_A))
        await store.add_result(result(0, TASK_A, status="error"))
        await store.finish_task(TASK_A, "error", error, 2000.0)
        await store.update_task_extra(TASK_B, {"note": "kept"})
        await store.put_image(image("img-0", 9000.0))

    async def read(
        store: SqliteStateStore,
    ) -> tuple[TaskRecord | None, list[ResultRecord], list[str], ImageRecord | None]:
        with pytest.raises(ConflictTaskUUID):
            await store.create_task(task(TASK_A))
        unfinished = [t.task_uuid for t in await store.unfinished_tasks()]
        return (
            await store.get_task(TASK_A),
            await store.results(TASK_A),
            unfinished,
            (await store.get_image("img-0")),
        )

    with_store(db, write)
    stored, results, unfinished, stored_image = with_store(db, read)
    assert stored is not None
    assert (stored.status, stored.error, stored.finished_at) == ("error", error, 2000.0)
    assert stored.request == task().request
    assert results == [result(0, TASK_A, status="error"), result(1, TASK_A)]
    assert unfinished == [TASK_B]
    assert stored_image == image("img-0", 9000.0)


def test_store_used_before_open_says_so(db: Path) -> None:
    async def main() -> None:
        store = SqliteStateStore(db)
        try:
            with pytest.raises(RuntimeError, match="before open"):
                await store.get_task(TASK_A)
        finally:
            await store.close()

    asyncio.run(main())
