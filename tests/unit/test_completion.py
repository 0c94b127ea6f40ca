"""TaskCompletion over a real SQLite state store: follow() re-reads state when notifications are
lost and gives up at its deadline (a fake clock), a task waits for its uploads, getResponse shows
an image whose upload is pending as processing, and a bus that is away fails nothing."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from impasto.delivery.outbox import new_delivery
from impasto.protocol.errors import InferenceError, ServiceUnavailable, SyncTimeout
from impasto.service.completion import TaskCompletion, status_items
from impasto.state.records import DeliveryRecord, ResultRecord
from tests.fakes import (
    FakeClock,
    FakeEventBus,
    FlakyStateStore,
    SilentSubscription,
    new_task,
    sqlite_state,
)

UPLOAD_URL = "http://127.0.0.1:9/bucket/a.png"


@dataclass
class Rig:
    state: FlakyStateStore
    bus: FakeEventBus
    clock: FakeClock
    completion: TaskCompletion

    async def task(self, expected: int = 1) -> str:
        return await new_task(self.state, expected)

    async def image(self, task_uuid: str, index: int = 0, upload: bool = False) -> DeliveryRecord:
        item = {
            "taskType": "imageInference",
            "taskUUID": task_uuid,
            "imageUUID": str(uuid.uuid4()),
            "imageURL": "http://127.0.0.1:1/image/x.png",
        }
        delivery = new_delivery("upload", task_uuid, UPLOAD_URL, "x.png", index=index)
        await self.state.inner.add_result(
            ResultRecord(task_uuid, index, "success", item, time.time()),
            [delivery] if upload else [],
        )
        return delivery

    async def view(self, task_uuid: str) -> list[dict[str, Any]]:
        inner = self.state.inner
        task = await inner.get_task(task_uuid)
        assert task is not None
        uploads = await self.completion.uploads(task_uuid)
        return status_items(
            task, await inner.results(task_uuid), await inner.progress(task_uuid), uploads
        )

    async def status(self, task_uuid: str) -> str:
        task = await self.state.inner.get_task(task_uuid)
        assert task is not None
        return task.status


@asynccontextmanager
async def rig(tmp_path: Path, recheck_s: float = 2.0) -> AsyncIterator[Rig]:
    async with sqlite_state(tmp_path / "state.db") as state:
        bus, clock = FakeEventBus(), FakeClock()
        completion = TaskCompletion(
            state.store, bus, lambda: None, recheck_s=recheck_s, clock=clock
        )
        yield Rig(state, bus, clock, completion)


def run(test: Callable[[], Any]) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))


def test_follow_rereads_state_within_recheck_s_without_any_notification(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path, recheck_s=2.0) as r:
            task_uuid = await r.task()

            async def meanwhile(waits: int) -> None:
                if waits == 3:
                    # Stored and finished, but the notification is lost.
                    await r.image(task_uuid)
                    await r.state.inner.finish_task(task_uuid, "success", None, time.time())

            subscription = SilentSubscription(r.clock, meanwhile)
            seen = [x async for x in r.completion.follow(task_uuid, subscription, timeout=60)]
            assert [x.index for x in seen] == [0]
            assert subscription.waits == [2.0, 2.0, 2.0]

    run(test)


def test_follow_raises_sync_timeout_at_its_deadline(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path, recheck_s=2.0) as r:
            task_uuid = await r.task()
            subscription = SilentSubscription(r.clock)
            started = r.clock.now
            with pytest.raises(SyncTimeout) as raised:
                async for _ in r.completion.follow(task_uuid, subscription, timeout=5):
                    pass
            assert raised.value.code == "syncTimeout"
            assert subscription.waits == [2.0, 2.0, 1.0]
            assert r.clock.now - started == pytest.approx(5.0)

    run(test)


def test_task_with_a_pending_upload_is_not_finished_until_it_settles(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task_uuid = await r.task()
            delivery = await r.image(task_uuid, upload=True)
            await r.completion.maybe_finish(task_uuid)
            assert await r.status(task_uuid) == "processing"
            await r.state.inner.settle_delivery(delivery.delivery_id, "done", 1, None)
            (settled,) = await r.completion.uploads(task_uuid)
            await r.completion.on_delivery_settled(settled, True)
            assert await r.status(task_uuid) == "success"

    run(test)


def test_image_whose_upload_is_pending_shows_processing_then_upload_failed(
    tmp_path: Path,
) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task_uuid = await r.task()
            delivery = await r.image(task_uuid, upload=True)
            (result,) = await r.state.inner.results(task_uuid)
            image_uuid = result.item["imageUUID"]
            (item,) = await r.view(task_uuid)
            assert item["status"] == "processing"
            assert item["progress"] == 100
            assert item["imageUUID"] == image_uuid

            error = {"code": "uploadFailed", "message": "receiver answered 500"}
            await r.state.inner.settle_delivery(delivery.delivery_id, "failed", 3, error)
            (settled,) = await r.completion.uploads(task_uuid)
            await r.completion.on_delivery_settled(settled, False)
            image, failure = await r.view(task_uuid)
            assert (image["status"], image["imageUUID"]) == ("success", image_uuid)
            assert failure["status"] == "error"
            assert failure["error"]["code"] == "uploadFailed"
            assert image_uuid in failure["error"]["message"]
            assert await r.status(task_uuid) == "error"

    run(test)


def test_maybe_finish_finishes_the_task_when_publishing_is_unavailable(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task_uuid = await r.task()
            await r.image(task_uuid)
            r.bus.faults.fail_always("publish", lambda: ServiceUnavailable("bus away"))
            await r.completion.maybe_finish(task_uuid)
            assert await r.status(task_uuid) == "success"
            # Already finished: announcing again fails quietly too.
            await r.completion.maybe_finish(task_uuid)
            assert r.bus.faults.calls["publish"] == 2

    run(test)


def test_fail_missing_stores_an_error_for_each_missing_generation(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task_uuid = await r.task(expected=2)
            await r.image(task_uuid, index=0)
            error = InferenceError("gave up").for_task("imageInference", task_uuid)
            await r.completion.fail_missing(task_uuid, [1], error)
            results = await r.state.inner.results(task_uuid)
            assert [(x.index, x.status) for x in results] == [(0, "success"), (1, "error")]
            assert results[1].item["code"] == "inferenceError"
            assert await r.status(task_uuid) == "error"
            assert task_uuid in r.bus.published

    run(test)
