"""imageUpload over a real SQLite state store and an in-memory image store behind failure
switches: a failed store ends the task with its error (never `processing`), the error reaches
the client, and a taskUUID is used once."""

from __future__ import annotations

import asyncio
import base64
import io
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from PIL import Image

from impasto.delivery.outbound import OutboundClient, OutboundGuard
from impasto.protocol.errors import ConflictTaskUUID, ServiceUnavailable, StorageFull
from impasto.protocol.tasks import ImageUploadIn, parse_task
from impasto.service.images import ImageResolver
from impasto.service.uploads import UploadService
from tests.fakes import FakeImageStore, FlakyStateStore, sqlite_state


def data_uri(color: str = "red") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def upload_task(task_uuid: str | None = None) -> ImageUploadIn:
    raw = {"taskType": "imageUpload", "taskUUID": task_uuid or str(uuid.uuid4())}
    raw["image"] = data_uri()
    return cast(ImageUploadIn, parse_task(raw))


@dataclass
class Rig:
    state: FlakyStateStore
    images: FakeImageStore
    uploads: UploadService

    async def task_status(self, task_uuid: str) -> str | None:
        task = await self.state.inner.get_task(task_uuid)
        return None if task is None else task.status


@asynccontextmanager
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError("an upload of a data URI fetched a URL")

    guard = OutboundGuard(allow_private_networks=True)
    outbound = OutboundClient(guard, httpx.AsyncClient(transport=httpx.MockTransport(refuse)))
    async with sqlite_state(tmp_path / "state.db") as state:
        images = FakeImageStore()
        uploads = UploadService(
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
            image_base_url="http://127.0.0.1:1",
            max_side=1024,
            retention_s=3600,
        )
        try:
            yield Rig(state, images, uploads)
        finally:
            await outbound.aclose()


def run(test: Callable[[], Any]) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))


def test_full_image_store_ends_the_upload_task_with_storage_full(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task = upload_task()
            r.images.faults.fail("put", lambda: StorageFull("The image storage is full."))
            with pytest.raises(StorageFull) as raised:
                await r.uploads.upload(task)
            assert raised.value.code == "storageFull"
            assert raised.value.task_uuid == task.taskUUID
            assert r.state.faults.calls["finish_task"] == 1
            assert await r.task_status(task.taskUUID) == "error"
            (result,) = await r.state.inner.results(task.taskUUID)
            assert (result.status, result.item["code"]) == ("error", "storageFull")
            stored = await r.state.inner.get_task(task.taskUUID)
            assert stored is not None
            assert stored.error is not None
            assert stored.error["code"] == "storageFull"
            assert r.images.blobs == {}

            # The taskUUID is spent: the client retries with a new one.
            with pytest.raises(ConflictTaskUUID):
                await r.uploads.upload(upload_task(task.taskUUID))
            assert r.images.faults.calls["put"] == 1

    run(test)


def test_duplicate_task_uuid_is_refused_and_stores_nothing_twice(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task_uuid = str(uuid.uuid4())
            first = await r.uploads.upload(upload_task(task_uuid), owner="a" * 64)
            with pytest.raises(ConflictTaskUUID) as raised:
                await r.uploads.upload(upload_task(task_uuid), owner="a" * 64)
            assert raised.value.parameter == "taskUUID"
            assert len(r.images.blobs) == 1
            (result,) = await r.state.inner.results(task_uuid)
            assert result.item["imageUUID"] == first["imageUUID"]
            task = await r.state.inner.get_task(task_uuid)
            assert task is not None
            assert task.extra.get("owner") == "a" * 64

    run(test)


def test_unreachable_state_store_ends_the_upload_with_service_unavailable(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task = upload_task()
            r.state.faults.fail("add_result", lambda: ServiceUnavailable("store away"))
            with pytest.raises(ServiceUnavailable) as raised:
                await r.uploads.upload(task)
            assert (raised.value.code, raised.value.http_status) == ("serviceUnavailable", 503)
            # The store came back for the error: the task ends with it.
            assert await r.task_status(task.taskUUID) == "error"

    run(test)


def test_failed_image_record_leaves_no_image_bytes_behind(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task = upload_task()
            r.state.faults.fail("put_image", lambda: ServiceUnavailable("store away"))
            with pytest.raises(ServiceUnavailable):
                await r.uploads.upload(task)
            assert await r.task_status(task.taskUUID) == "error"
            assert r.images.blobs == {}

    run(test)
