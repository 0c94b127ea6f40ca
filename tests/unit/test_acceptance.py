"""TaskAcceptance, and the dispatcher's statuses around it, over a real SQLite state store, an
in-memory image store, reference URLs answered by an httpx.MockTransport (loopback only) and a
runner that records or fails: inputs are stored at acceptance, what can be refused is refused
before anything is stored, an accepted task always ends, and its errors are not retryable
statuses."""

from __future__ import annotations

import asyncio
import base64
import io
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from PIL import Image

from impasto.backends.registry import ModelRegistry, ResolvedModel
from impasto.delivery.outbound import OutboundClient, OutboundGuard
from impasto.protocol.errors import (
    ImpastoError,
    InvalidParameter,
    ProviderNotConfigured,
    QueueFull,
    ServiceUnavailable,
    SyncTimeout,
)
from impasto.protocol.parsing import parse_task
from impasto.protocol.tasks import ImageInferenceIn
from impasto.service.acceptance import TaskAcceptance
from impasto.service.completion import TaskCompletion
from impasto.service.dispatcher import TaskDispatcher
from impasto.service.images import ImageResolver
from impasto.service.inference import InferenceService
from impasto.service.jobs import LocalRunner
from impasto.service.models import ModelSearchService
from impasto.service.responses import ResponseService
from impasto.service.safety import UnavailableSafety
from impasto.service.task_images import TaskImages
from impasto.service.uploads import UploadService
from impasto.state.records import ImageRecord, ResultRecord, ResultStatus
from impasto.tenancy.directory import KeyDirectory
from tests.fakes import FakeEventBus, FakeImageStore, FlakyStateStore, sqlite_state

MODEL = "impasto:tiny@1"
REFERENCE_URL = "http://127.0.0.1:9/refs/cat.png"


def png(color: str = "red", size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class FakeRunner:
    """Records what acceptance hands on, or fails as scheduling can."""

    runs: list[tuple[str, int, list[int]]] = field(default_factory=list)
    raises: BaseException | None = None

    async def run(
        self,
        task: ImageInferenceIn,
        resolved: ResolvedModel,
        images: TaskImages,
        seeds: Sequence[int],
        indices: Sequence[int],
        **_: Any,
    ) -> None:
        if self.raises is not None:
            raise self.raises
        self.runs.append((task.taskUUID, len(images.references), list(indices)))


@dataclass
class Rig:
    state: FlakyStateStore
    images: FakeImageStore
    runner: FakeRunner
    acceptance: TaskAcceptance
    fetched: list[str]

    async def submit(self, **fields: Any) -> ImageInferenceIn:
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
        await self.acceptance.submit(task)
        return task

    async def nothing_stored(self, task_uuid: str) -> None:
        assert await self.state.inner.get_task(task_uuid) is None
        assert self.images.blobs == {}
        assert self.state.faults.calls["create_task"] == 0
        assert self.runner.runs == []


@asynccontextmanager
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    fetched: list[str] = []

    def serve(request: httpx.Request) -> httpx.Response:
        fetched.append(str(request.url))
        return httpx.Response(200, content=png("blue"), headers={"content-type": "image/png"})

    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    guard = OutboundGuard(allow_private_networks=True, resolver=resolve)
    outbound = OutboundClient(guard, httpx.AsyncClient(transport=httpx.MockTransport(serve)))
    async with sqlite_state(tmp_path / "state.db") as state:
        images, runner = FakeImageStore(), FakeRunner()
        registry = ModelRegistry.load(None)
        acceptance = TaskAcceptance(
            registry=registry,
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
            safety=UnavailableSafety(),
            guard=guard,
            completion=TaskCompletion(state.store, FakeEventBus(), lambda: None),
            runner=cast(LocalRunner, runner),
            scheduler_depth=lambda air: 0,
            input_retention_s=3600,
            unavailable={
                "runway:4@1": ProviderNotConfigured(
                    "Model runway:4@1 is served by Runway, and the Runway provider is not "
                    "configured on this server (no API key).",
                    parameter="model",
                )
            },
        )
        try:
            yield Rig(state, images, runner, acceptance, fetched)
        finally:
            await outbound.aclose()


def run(test: Callable[[], Any]) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))


def test_reference_url_and_data_uri_are_stored_as_input_images_named_by_uuid(
    tmp_path: Path,
) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            data_uri = "data:image/png;base64," + base64.b64encode(png("green")).decode()
            task = await r.submit(referenceImages=[REFERENCE_URL, data_uri])
            assert r.fetched == [REFERENCE_URL]
            record = await r.state.inner.get_task(task.taskUUID)
            assert record is not None
            named = [ref["image"] for ref in record.request["referenceImages"]]
            assert len(named) == 2
            for image_uuid in named:
                stored = await r.state.inner.get_image(image_uuid)
                assert stored is not None
                assert (stored.kind, stored.task_uuid) == ("input", task.taskUUID)
                assert stored.key in r.images.blobs
            assert REFERENCE_URL not in str(record.request)
            assert "base64" not in str(record.request)
            assert r.runner.runs == [(task.taskUUID, 2, [0])]

    run(test)


def test_reference_given_as_our_image_uuid_is_named_as_it_is_not_copied(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            image_uuid = str(uuid.uuid4())
            r.images.blobs[f"{image_uuid}.png"] = png("yellow")
            now = time.time()
            await r.state.inner.put_image(
                ImageRecord(
                    image_uuid, f"{image_uuid}.png", "image/png", "upload", 32, 24, now, now + 600
                )
            )
            task = await r.submit(referenceImages=[image_uuid])
            record = await r.state.inner.get_task(task.taskUUID)
            assert record is not None
            assert record.request["referenceImages"] == [{"image": image_uuid}]
            assert list(r.images.blobs) == [f"{image_uuid}.png"]
            assert r.images.faults.calls["put"] == 0

    run(test)


def test_unconfigured_provider_is_refused_before_anything_is_stored(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task_uuid = str(uuid.uuid4())
            with pytest.raises(ImpastoError) as raised:
                await r.submit(
                    taskUUID=task_uuid,
                    model="runway:4@1",
                    width=1920,
                    height=1080,
                    referenceImages=[REFERENCE_URL],
                )
            assert raised.value.code == "providerNotConfigured"
            assert r.fetched == []
            await r.nothing_stored(task_uuid)

    run(test)


def test_scheduler_of_the_wrong_family_is_refused_before_anything_is_stored(
    tmp_path: Path,
) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task_uuid = str(uuid.uuid4())
            with pytest.raises(ImpastoError) as raised:
                await r.submit(taskUUID=task_uuid, scheduler="FlowMatch Euler")
            assert (raised.value.code, raised.value.parameter) == ("invalidScheduler", "scheduler")
            assert raised.value.http_status == 400
            await r.nothing_stored(task_uuid)

    run(test)


def test_task_that_cannot_be_scheduled_ends_with_an_error_result(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            r.runner.raises = ServiceUnavailable("the job queue cannot be reached")
            task = await r.submit(numberResults=2)
            results = await r.state.inner.results(task.taskUUID)
            assert [(x.index, x.status) for x in results] == [(0, "error"), (1, "error")]
            assert {x.item["code"] for x in results} == {"inferenceError"}
            record = await r.state.inner.get_task(task.taskUUID)
            assert record is not None
            assert record.status == "error"

    run(test)


def test_unreachable_store_at_acceptance_refuses_the_task_and_stores_nothing(
    tmp_path: Path,
) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task_uuid = str(uuid.uuid4())
            r.state.faults.fail("create_task", lambda: ServiceUnavailable("store away"))
            with pytest.raises(ServiceUnavailable):
                await r.submit(taskUUID=task_uuid)
            assert await r.state.inner.get_task(task_uuid) is None
            assert r.runner.runs == []

    run(test)


def test_failed_input_image_record_leaves_no_image_bytes_behind(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task_uuid = str(uuid.uuid4())
            r.state.faults.fail("put_image", lambda: ServiceUnavailable("store away"))
            with pytest.raises(ServiceUnavailable):
                await r.submit(taskUUID=task_uuid, referenceImages=[REFERENCE_URL])
            assert await r.state.inner.get_task(task_uuid) is None
            assert r.images.blobs == {}

    run(test)


# -- what the dispatcher makes of errors before and after acceptance --------------------------


class ScriptedInference:
    """The dispatcher's view of inference: `submit` may refuse; `follow` yields `outcomes`
    (result items) and then raises `then`, if set."""

    def __init__(
        self,
        *,
        refuse: ImpastoError | None = None,
        outcomes: Sequence[dict[str, Any]] = (),
        then: ImpastoError | None = None,
    ) -> None:
        self.refuse = refuse
        self.outcomes = list(outcomes)
        self.then = then
        self.submitted: list[str] = []

    async def submit(self, task: ImageInferenceIn, owner: str | None = None) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.submitted.append(task.taskUUID)

    async def follow(
        self, task_uuid: str, subscription: Any, timeout: float
    ) -> AsyncIterator[ResultRecord]:
        for index, item in enumerate(self.outcomes):
            status: ResultStatus = "error" if "code" in item else "success"
            yield ResultRecord(task_uuid, index, status, {**item, "taskUUID": task_uuid}, 0.0)
        if self.then is not None:
            raise self.then

    async def upload_failures(self, task_uuid: str) -> list[ImpastoError]:
        return []


def dispatcher(inference: ScriptedInference, max_tasks: int = 100) -> TaskDispatcher:
    return TaskDispatcher(
        auth=KeyDirectory([]),
        bus=FakeEventBus(),
        inference=cast(InferenceService, inference),
        uploads=cast(UploadService, None),
        responses=cast(ResponseService, None),
        models=ModelSearchService(ModelRegistry.load(None)),
        sync_timeout_s=30.0,
        max_tasks=max_tasks,
    )


def sync_task(**fields: Any) -> dict[str, Any]:
    return {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": MODEL,
        "positivePrompt": "a lighthouse at dusk",
        "width": 64,
        "height": 64,
        **fields,
    }


def test_errors_of_an_accepted_sync_task_come_back_with_status_200() -> None:
    async def test() -> None:
        failed = {"code": "inferenceError", "message": "the pipeline crashed"}
        unconfigured = {"code": "providerNotConfigured", "message": "no Runway key"}
        inference = ScriptedInference(outcomes=[failed, failed, unconfigured])
        envelope = await dispatcher(inference).handle_request([sync_task()], None)
        assert [e.code for e in envelope.errors] == ["inferenceError", "providerNotConfigured"]
        assert envelope.data == []
        # compat: a 5xx would make runware-sdk retry and earn conflictTaskUUID.
        assert envelope.http_status == 200

    run(test)


def test_sync_timeout_of_an_accepted_task_keeps_202() -> None:
    async def test() -> None:
        inference = ScriptedInference(then=SyncTimeout("still running"))
        envelope = await dispatcher(inference).handle_request([sync_task()], None)
        assert [e.code for e in envelope.errors] == ["syncTimeout"]
        assert envelope.http_status == 202

    run(test)


def test_store_unavailable_while_following_an_accepted_task_is_not_a_5xx() -> None:
    async def test() -> None:
        inference = ScriptedInference(then=ServiceUnavailable("store away"))
        envelope = await dispatcher(inference).handle_request([sync_task()], None)
        assert [e.code for e in envelope.errors] == ["serviceUnavailable"]
        assert envelope.http_status == 200

    run(test)


def test_a_refused_task_keeps_its_own_status() -> None:
    async def test() -> None:
        refusals = [
            (InvalidParameter("bad scheduler", code="invalidScheduler"), 400),
            (QueueFull("too many images waiting"), 429),
        ]
        for refusal, status in refusals:
            inference = ScriptedInference(refuse=refusal)
            envelope = await dispatcher(inference).handle_request([sync_task()], None)
            assert [e.code for e in envelope.errors] == [refusal.code]
            assert envelope.http_status == status

    run(test)


def test_more_tasks_than_max_tasks_is_refused_with_too_many_tasks() -> None:
    async def test() -> None:
        inference = ScriptedInference()
        tasks = [sync_task(deliveryMethod="async") for _ in range(4)]
        envelope = await dispatcher(inference, max_tasks=3).handle_request(tasks, None)
        assert [e.code for e in envelope.errors] == ["tooManyTasks"]
        assert envelope.http_status == 413
        assert inference.submitted == []
        envelope = await dispatcher(inference, max_tasks=4).handle_request(tasks, None)
        assert envelope.http_status == 200
        assert len(inference.submitted) == 4

    run(test)
