"""UtilityService over a real SQLite state store, an in-memory image store and a fake utility
engine: acceptance stores the input and names it by UUID, a run stores results through the
task state machine, a failed model ends the task with an error item, a re-run stores nothing
twice, a distributed API node queues the job, and a worker's recovery hands utility records
to the utility service."""

from __future__ import annotations

import asyncio
import base64
import io
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
from PIL import Image

from impasto.backends.registry import ModelRegistry
from impasto.backends.utility.base import (
    BackgroundRequest,
    EnhanceRequest,
    UpscaleRequest,
    UtilityOutput,
    UtilityRequest,
)
from impasto.delivery.outbound import OutboundClient, OutboundGuard
from impasto.engine.utility import UtilityEngine
from impasto.protocol.errors import InferenceError
from impasto.protocol.parsing import parse_task
from impasto.protocol.utility_tasks import UtilityTaskIn
from impasto.service.completion import TaskCompletion
from impasto.service.images import ImageResolver
from impasto.service.recovery import TaskRecovery
from impasto.service.utility_outcomes import UtilityOutcomes
from impasto.service.utility_tasks import UtilityDefaults, UtilityService
from impasto.state.base import QueuedJob
from tests.fakes import FakeEventBus, FakeImageStore, FakeJobQueue, FlakyStateStore, sqlite_state

DEFAULTS = {
    "upscale": "impasto:tiny-upscaler@1",
    "removeBackground": "impasto:tiny-segmenter@1",
    "caption": "impasto:tiny-captioner@1",
    "promptEnhance": "impasto:tiny-enhancer@1",
}


def png(size: tuple[int, int] = (8, 6)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass
class FakeModels:
    """Answers like each kind of model would: upscaled, cut-out, texts; or fails."""

    seen: list[tuple[str, UtilityRequest]] = field(default_factory=list)
    fail: Exception | None = None

    async def run(self, air: str, request: UtilityRequest) -> UtilityOutput:
        self.seen.append((air, request))
        if self.fail is not None:
            raise self.fail
        if isinstance(request, UpscaleRequest):
            width, height = request.image.size
            return request.image.resize((width * request.factor, height * request.factor))
        if isinstance(request, BackgroundRequest):
            return request.image.convert("RGBA")
        if isinstance(request, EnhanceRequest):
            return [f"{request.prompt}, version {i}" for i in range(request.versions)]
        return ["a red rectangle"]


@dataclass
class Rig:
    state: FlakyStateStore
    images: FakeImageStore
    models: FakeModels
    service: UtilityService
    queue: FakeJobQueue | None

    async def submit(self, **raw: Any) -> UtilityTaskIn:
        task = cast(UtilityTaskIn, parse_task({"taskUUID": str(uuid.uuid4()), **raw}))
        await self.service.submit(task)
        return task

    async def finished(self, task_uuid: str) -> list[dict[str, Any]]:
        for _ in range(500):
            record = await self.state.inner.get_task(task_uuid)
            assert record is not None
            if record.status != "processing":
                return [r.item for r in await self.state.inner.results(task_uuid)]
            await asyncio.sleep(0.01)
        raise AssertionError("the task did not finish")


@asynccontextmanager
async def rig(tmp_path: Path, distributed: bool = False) -> AsyncIterator[Rig]:
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404)

    guard = OutboundGuard(allow_private_networks=True)
    outbound = OutboundClient(guard, httpx.AsyncClient(transport=httpx.MockTransport(refuse)))
    async with sqlite_state(tmp_path / "state.db") as state:
        images, models = FakeImageStore(), FakeModels()
        completion = TaskCompletion(state.store, FakeEventBus(), lambda: None)
        engine = cast(UtilityEngine, models)
        queue = FakeJobQueue() if distributed else None
        service = UtilityService(
            registry=ModelRegistry.load(None),
            state=state.store,
            images=images,
            resolver=ImageResolver(
                state.store,
                images,
                outbound,
                max_bytes=1 << 20,
                max_pixels=1 << 22,
                fetch_timeout_s=5.0,
            ),
            engine=engine,
            completion=completion,
            outcomes=UtilityOutcomes(
                state=state.store,
                images=images,
                completion=completion,
                image_base_url="http://x",
                output_retention_s=600,
                wake_outbox=lambda: None,
            ),
            guard=guard,
            defaults=UtilityDefaults(DEFAULTS),
            input_retention_s=600,
            queue=queue,
        )
        try:
            yield Rig(state, images, models, service, queue)
        finally:
            await service.close()
            await outbound.aclose()


def run(test: Callable[[], Any]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


def test_an_upscale_stores_its_input_by_uuid_and_its_result(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task = await r.submit(taskType="imageUpscale", inputImage=png(), upscaleFactor=4)
            (item,) = await r.finished(task.taskUUID)
            assert item["taskType"] == "imageUpscale"
            assert item["imageURL"].startswith("http://x")
            record = await r.state.inner.get_task(task.taskUUID)
            assert record is not None
            assert record.status == "success"
            stored_input = record.request["inputImage"]
            assert (await r.state.inner.get_image(stored_input)) is not None
            assert "base64" not in str(record.request)
            ((air, request),) = r.models.seen
            assert air == "impasto:tiny-upscaler@1"
            assert isinstance(request, UpscaleRequest)
            assert request.factor == 4
            output = await r.state.inner.get_image(item["imageUUID"])
            assert output is not None
            assert (output.width, output.height) == (32, 24)

    run(test)


def test_prompt_enhance_stores_one_result_per_version(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task = await r.submit(taskType="promptEnhance", prompt="a fox", promptVersions=3)
            items = await r.finished(task.taskUUID)
            assert [i["text"] for i in items] == [f"a fox, version {i}" for i in range(3)]

    run(test)


def test_a_failing_model_ends_the_task_with_an_error_item(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            r.models.fail = InferenceError("Model x failed: RuntimeError.")
            task = await r.submit(taskType="promptEnhance", prompt="a fox", promptVersions=2)
            items = await r.finished(task.taskUUID)
            assert [i["code"] for i in items] == ["inferenceError"] * 2
            record = await r.state.inner.get_task(task.taskUUID)
            assert record is not None
            assert record.status == "error"

    run(test)


def test_a_rerun_of_a_finished_task_runs_nothing(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task = await r.submit(taskType="caption", inputImage=png())
            await r.finished(task.taskUUID)
            record = await r.state.inner.get_task(task.taskUUID)
            assert record is not None
            await r.service.run(record)
            assert len(r.models.seen) == 1
            assert len(await r.state.inner.results(task.taskUUID)) == 1

    run(test)


def test_an_api_node_queues_the_job_and_a_worker_recovery_runs_it(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path, distributed=True) as r:
            task = await r.submit(taskType="removeBackground", inputImage=png())
            assert r.queue is not None
            assert [(j.air, j.task_uuid, j.index) for j in r.queue.ready] == [
                ("impasto:tiny-segmenter@1", task.taskUUID, 0)
            ]
            assert r.models.seen == []
            # The worker side: recovery finds a utility record and hands it over.
            done: list[QueuedJob] = []

            async def acked(job: QueuedJob) -> None:
                done.append(job)

            async def never(*_: Any) -> Any:
                raise AssertionError("imageInference code ran a utility task")

            recovery = TaskRecovery(
                state=r.state.store,
                resolver=cast(Any, None),
                completion=cast(Any, None),
                runner=cast(Any, None),
                validate=never,
                others=r.service.run,
            )
            await recovery.execute(r.queue.ready, acked)
            assert done == r.queue.ready
            (item,) = await r.finished(task.taskUUID)
            assert item["imageURL"]

    run(test)
