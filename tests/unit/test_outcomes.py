"""OutcomeRecorder over a real SQLite state store behind a failure switch and an in-memory image
store: an outcome is always stored (retried while storage is away) and its task always ends."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from PIL import Image

from impasto.backends.base import GeneratedImage, GenerationJob, Outcome
from impasto.backends.registry import ModelRegistry
from impasto.protocol.errors import ServiceUnavailable, StorageFull
from impasto.protocol.parsing import parse_task
from impasto.protocol.tasks import ImageInferenceIn
from impasto.service.completion import TaskCompletion
from impasto.service.outcomes import OutcomeRecorder
from impasto.service.safety import ContentSafety, OutputVerdict, UnavailableSafety
from impasto.state.records import TaskRecord
from tests.fakes import (
    FakeEventBus,
    FakeImageStore,
    FlakyStateStore,
    RecordingSleep,
    SilentSubscription,
    sqlite_state,
)

MODEL = "impasto:tiny@1"


def unavailable() -> ServiceUnavailable:
    return ServiceUnavailable("The state store cannot be reached (injected).")


def full() -> StorageFull:
    return StorageFull("The image storage is full (injected).")


class WithholdingSafety(UnavailableSafety):
    """A content checker that flags every output."""

    def validate(self, task: ImageInferenceIn) -> None:
        pass

    async def check_outputs(
        self, task: ImageInferenceIn, images: Sequence[Image.Image]
    ) -> list[OutputVerdict]:
        return [OutputVerdict(nsfw=True, withhold=True) for _ in images]


@dataclass
class Rig:
    state: FlakyStateStore
    images: FakeImageStore
    bus: FakeEventBus
    sleep: RecordingSleep
    recorder: OutcomeRecorder
    registry: ModelRegistry

    async def accept(self, **fields: Any) -> ImageInferenceIn:
        raw = {
            "taskType": "imageInference",
            "taskUUID": str(uuid.uuid4()),
            "model": MODEL,
            "positivePrompt": "a lighthouse at dusk",
            "width": 64,
            "height": 64,
            **fields,
        }
        task = cast(ImageInferenceIn, parse_task(raw))
        await self.state.inner.create_task(
            TaskRecord(
                task_uuid=task.taskUUID,
                task_type="imageInference",
                request=raw,
                expected=task.numberResults,
                created_at=0.0,
                model=MODEL,
            )
        )
        return task

    async def record(self, task: ImageInferenceIn, outcome: Outcome, index: int = 0) -> None:
        job = GenerationJob(task.taskUUID, index, MODEL, task.positivePrompt, 64, 64, seed=7)
        await asyncio.wait_for(
            self.recorder.record(task, self.registry.resolve(MODEL), job, outcome), 10
        )


def generated() -> GeneratedImage:
    return GeneratedImage(Image.new("RGB", (64, 64), "teal"), seed=7)


@asynccontextmanager
async def rig(
    tmp_path: Path, safety: ContentSafety | None = None, retry_max_s: float = 1.0
) -> AsyncIterator[Rig]:
    async with sqlite_state(tmp_path / "state.db") as state:
        images, bus, sleep = FakeImageStore(), FakeEventBus(), RecordingSleep()
        completion = TaskCompletion(state.store, bus, lambda: None)
        with ThreadPoolExecutor(1) as pool:
            recorder = OutcomeRecorder(
                state=state.store,
                images=images,
                completion=completion,
                safety=safety or UnavailableSafety(),
                encode_pool=pool,
                image_base_url="http://127.0.0.1:1",
                output_retention_s=3600,
                wake_outbox=lambda: None,
                sleep=sleep,
                retry_max_s=retry_max_s,
            )
            yield Rig(state, images, bus, sleep, recorder, ModelRegistry.load(None))


def run(test: Callable[[], Any]) -> None:
    asyncio.run(test())


def test_unavailable_store_is_retried_with_capped_backoff_then_stores_one_result(
    tmp_path: Path,
) -> None:
    async def test() -> None:
        async with rig(tmp_path, retry_max_s=1.0) as r:
            task = await r.accept()
            r.state.faults.fail("add_result", unavailable, times=5)
            await r.record(task, generated())
            assert r.sleep.delays == [0.25, 0.5, 1.0, 1.0, 1.0]
            results = await r.state.inner.results(task.taskUUID)
            assert [(x.index, x.status) for x in results] == [(0, "success")]
            finished = await r.state.inner.get_task(task.taskUUID)
            assert finished is not None
            assert finished.status == "success"
            assert task.taskUUID in r.bus.published

    run(test)


def test_failed_result_write_leaves_no_image_behind(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task = await r.accept()
            r.state.faults.fail("add_result", unavailable, times=2)
            await r.record(task, generated())
            (result,) = await r.state.inner.results(task.taskUUID)
            stored = await r.state.inner.get_image(result.item["imageUUID"])
            assert stored is not None
            # The two copies whose record could not be written are gone; only the stored one.
            assert list(r.images.blobs) == [stored.key]
            assert len(r.images.deleted) == 2

    run(test)


def test_image_is_kept_when_add_result_raised_after_writing(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task = await r.accept()
            # Written, then the connection broke: the caller cannot tell it was stored.
            r.state.faults.fail("add_result", unavailable, after=True)
            await r.record(task, generated())
            (result,) = await r.state.inner.results(task.taskUUID)
            record = await r.state.inner.get_image(result.item["imageUUID"])
            assert record is not None
            assert record.key in r.images.blobs, "the stored result points at a deleted image"
            # The retry found the index stored and dropped its own copy.
            assert list(r.images.blobs) == [record.key]
            finished = await r.state.inner.get_task(task.taskUUID)
            assert finished is not None
            assert finished.status == "success"

    run(test)


def test_full_image_store_ends_the_generation_with_storage_full(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task = await r.accept()
            r.images.faults.fail_always("put", full)
            await r.record(task, generated())
            (result,) = await r.state.inner.results(task.taskUUID)
            assert result.status == "error"
            assert result.item["code"] == "storageFull"
            assert result.item["taskUUID"] == task.taskUUID
            finished = await r.state.inner.get_task(task.taskUUID)
            assert finished is not None
            assert finished.status == "error"
            assert finished.error is not None
            assert finished.error["code"] == "storageFull"
            assert r.images.blobs == {}

    run(test)


def test_storage_full_error_is_retried_until_the_state_store_is_back(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path, retry_max_s=2.0) as r:
            task = await r.accept()
            r.images.faults.fail_always("put", full)
            r.state.faults.fail("add_result", unavailable, times=6)
            await r.record(task, generated())
            assert r.sleep.delays == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
            (result,) = await r.state.inner.results(task.taskUUID)
            assert (result.status, result.item["code"]) == ("error", "storageFull")
            finished = await r.state.inner.get_task(task.taskUUID)
            assert finished is not None
            assert finished.status == "error"

    run(test)


def test_error_outcome_is_stored_even_when_finishing_fails_for_a_while(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task = await r.accept()
            r.state.faults.fail("finish_task", unavailable, times=2)
            await r.record(task, StorageFull("no room").for_task("imageInference", task.taskUUID))
            assert len(r.sleep.delays) == 2
            assert len(await r.state.inner.results(task.taskUUID)) == 1
            finished = await r.state.inner.get_task(task.taskUUID)
            assert finished is not None
            assert finished.status == "error"

    run(test)


def test_image_withheld_by_the_content_checker_becomes_an_error_result(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path, safety=WithholdingSafety()) as r:
            task = await r.accept(safety={"checkContent": True})
            await r.record(task, generated())
            (result,) = await r.state.inner.results(task.taskUUID)
            assert result.status == "error"
            assert result.item["code"] == "sensitiveContentDetected"
            assert r.images.blobs == {}
            assert r.sleep.delays == []
            finished = await r.state.inner.get_task(task.taskUUID)
            assert finished is not None
            assert finished.status == "error"

    run(test)


def test_health_names_generations_waiting_for_storage_until_they_are_stored(
    tmp_path: Path,
) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            seen: list[list[str]] = []

            async def sleep(delay: float) -> None:
                seen.append(r.recorder.problems())

            r.recorder._sleep = sleep
            task = await r.accept()
            r.state.faults.fail("add_result", full, times=4)
            await r.record(task, generated())
            assert len(seen) == 3  # the image fails once, then its storageFull error 3 times
            assert all(
                p
                == [
                    "1 finished generation(s) waiting to be stored: "
                    "The image storage is full (injected)."
                ]
                for p in seen
            )
            assert r.recorder.problems() == []

    run(test)


def test_an_image_is_recorded_and_its_task_finished_in_three_state_calls(tmp_path: Path) -> None:
    """The bookkeeping of one finished image: its result with its image record in one write,
    one read of the task with its results and deliveries, the finishing write. The follower
    of a sync reply then needs one read to see it all."""

    async def test() -> None:
        async with rig(tmp_path) as r:
            task = await r.accept()
            await r.record(task, generated())
            assert dict(r.state.faults.calls) == {"add_result": 1, "task_view": 1, "finish_task": 1}
            (result,) = await r.state.inner.results(task.taskUUID)
            stored = await r.state.inner.get_image(result.item["imageUUID"])
            assert stored is not None
            assert stored.key in r.images.blobs
            completion = TaskCompletion(r.state, r.bus, lambda: None)
            followed = [
                x.index
                async for x in completion.follow(task.taskUUID, SilentSubscription(), timeout=5)
            ]
            assert followed == [0]
            assert r.state.faults.calls["task_view"] == 2

    run(test)
