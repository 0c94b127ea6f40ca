"""imageUpload and mediaStorage over a real SQLite state store and an in-memory image store
behind failure switches: a failed store ends the task with its error (never `processing`), the
error reaches the client, and a taskUUID is used once; mediaStorage delete removes only uploads,
and only for the key that made them."""

from __future__ import annotations

import asyncio
import base64
import io
import time
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
from impasto.protocol.errors import (
    ConflictTaskUUID,
    InvalidParameter,
    ServiceUnavailable,
    StorageFull,
)
from impasto.protocol.parsing import parse_task
from impasto.protocol.tasks import ImageUploadIn
from impasto.protocol.utility import MediaStorageIn
from impasto.service.images import ImageResolver
from impasto.service.uploads import UploadService
from impasto.state.records import ImageRecord
from tests.fakes import FakeImageStore, FlakyStateStore, new_task, sqlite_state


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


# -- mediaStorage ------------------------------------------------------------------------------


def media_task(operation: str = "upload", **fields: Any) -> MediaStorageIn:
    raw: dict[str, Any] = {
        "taskType": "mediaStorage",
        "taskUUID": str(uuid.uuid4()),
        "operation": operation,
    }
    if operation == "upload" and "media" not in fields:
        raw["media"] = data_uri("blue")
    return cast(MediaStorageIn, parse_task({**raw, **fields}))


async def uploaded(r: Rig, owner: str | None = None) -> str:
    item = await r.uploads.media_storage(media_task(), owner=owner)
    return str(item["mediaUUID"])


def test_media_upload_is_stored_as_an_upload_and_answers_with_media_fields(
    tmp_path: Path,
) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task = media_task()
            item = await r.uploads.media_storage(task, owner="a" * 64)
            assert set(item) == {"taskType", "taskUUID", "operation", "mediaUUID", "mediaURL"}
            assert (item["taskType"], item["operation"]) == ("mediaStorage", "upload")
            assert item["taskUUID"] == task.taskUUID
            record = await r.state.inner.get_image(item["mediaUUID"])
            assert record is not None
            assert (record.kind, record.width, record.height) == ("upload", 40, 30)
            assert 3590 < record.expires_at - record.created_at <= 3600
            assert item["mediaURL"] == f"http://127.0.0.1:1/image/{record.key}"
            assert record.key in r.images.blobs
            assert await r.task_status(task.taskUUID) == "success"
            (result,) = await r.state.inner.results(task.taskUUID)
            assert result.item == item

    run(test)


def test_media_delete_removes_the_bytes_and_the_record(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            media_uuid = await uploaded(r)
            record = await r.state.inner.get_image(media_uuid)
            assert record is not None
            task = media_task("delete", mediaUUID=media_uuid)

            item = await r.uploads.media_storage(task)

            assert item == {
                "taskType": "mediaStorage",
                "taskUUID": task.taskUUID,
                "operation": "delete",
                "mediaUUID": media_uuid,
            }
            assert record.key not in r.images.blobs
            assert await r.state.inner.get_image(media_uuid) is None
            assert await r.task_status(task.taskUUID) == "success"
            with pytest.raises(InvalidParameter) as raised:
                await r.uploads.media_storage(media_task("delete", mediaUUID=media_uuid))
            assert (raised.value.code, raised.value.parameter) == ("invalidMediaUUID", "mediaUUID")
            assert "already deleted" in raised.value.message

    run(test)


def test_media_delete_takes_the_uuid_in_media_as_runware_sdk_types_it(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            media_uuid = await uploaded(r)
            item = await r.uploads.media_storage(media_task("delete", media=media_uuid))
            assert item["mediaUUID"] == media_uuid
            assert await r.state.inner.get_image(media_uuid) is None

    run(test)


def test_media_delete_by_another_api_key_is_as_if_the_media_did_not_exist(
    tmp_path: Path,
) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            media_uuid = await uploaded(r, owner="a" * 64)
            for other in ("b" * 64, None):
                with pytest.raises(InvalidParameter) as raised:
                    await r.uploads.media_storage(
                        media_task("delete", mediaUUID=media_uuid), owner=other or "c" * 64
                    )
                assert raised.value.code == "invalidMediaUUID"
                assert "no uploaded media" in raised.value.message
            assert await r.state.inner.get_image(media_uuid) is not None
            await r.uploads.media_storage(
                media_task("delete", mediaUUID=media_uuid), owner="a" * 64
            )
            assert await r.state.inner.get_image(media_uuid) is None

    run(test)


def test_media_delete_refuses_an_image_whose_owner_can_no_longer_be_checked(
    tmp_path: Path,
) -> None:
    """With API keys, the upload's task record says whose it is; once the task sweep took it,
    nobody can show the image is theirs and it stays until it expires."""

    async def test() -> None:
        async with rig(tmp_path) as r:
            media_uuid = await uploaded(r, owner="a" * 64)
            assert await r.state.inner.sweep_tasks(time.time() + 1) == 1
            with pytest.raises(InvalidParameter):
                await r.uploads.media_storage(
                    media_task("delete", mediaUUID=media_uuid), owner="a" * 64
                )
            assert await r.state.inner.get_image(media_uuid) is not None

    run(test)


def test_media_delete_refuses_a_generated_image(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task_uuid = await new_task(r.state)
            output_uuid = str(uuid.uuid4())
            now = time.time()
            await r.state.inner.put_image(
                ImageRecord(
                    output_uuid, "out.png", "image/png", "output", 8, 8, now, now + 60, task_uuid
                )
            )
            with pytest.raises(InvalidParameter) as raised:
                await r.uploads.media_storage(media_task("delete", mediaUUID=output_uuid))
            assert raised.value.code == "invalidMediaUUID"
            assert "not uploaded media" in raised.value.message
            assert await r.state.inner.get_image(output_uuid) is not None

    run(test)


def test_a_failed_media_delete_ends_its_task_with_the_error_and_keeps_the_record(
    tmp_path: Path,
) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            media_uuid = await uploaded(r)
            task = media_task("delete", mediaUUID=media_uuid)
            r.images.faults.fail("delete", lambda: ServiceUnavailable("storage away"))
            with pytest.raises(ServiceUnavailable) as raised:
                await r.uploads.media_storage(task)
            assert raised.value.task_uuid == task.taskUUID
            assert await r.task_status(task.taskUUID) == "error"
            assert await r.state.inner.get_image(media_uuid) is not None

    run(test)


@pytest.mark.parametrize(
    ("operation", "fields", "code", "parameter"),
    [
        ("upload", {"media": None}, "missingMedia", "media"),
        ("upload", {"mediaUUID": str(uuid.uuid4())}, "invalidMediaUUID", "mediaUUID"),
        ("upload", {"media": "not base64 at all!"}, "invalidMedia", "media"),
        ("delete", {}, "missingMediaUUID", "mediaUUID"),
        ("delete", {"media": "iVBORw0KGgo="}, "invalidMedia", "media"),
        (
            "delete",
            {"media": str(uuid.uuid4()), "mediaUUID": str(uuid.uuid4())},
            "invalidMedia",
            "media",
        ),
        ("delete", {"mediaUUID": str(uuid.uuid4())}, "invalidMediaUUID", "mediaUUID"),
    ],
    ids=[
        "upload-without-media",
        "upload-with-uuid",
        "upload-of-garbage",
        "delete-without-uuid",
        "delete-of-an-image",
        "delete-with-both",
        "delete-of-unknown",
    ],
)
def test_a_bad_media_storage_task_is_refused_before_its_task_exists(
    tmp_path: Path, operation: str, fields: dict[str, Any], code: str, parameter: str
) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            task = media_task(operation, **fields)
            with pytest.raises(InvalidParameter) as raised:
                await r.uploads.media_storage(task)
            assert (raised.value.code, raised.value.parameter) == (code, parameter)
            # Nothing happened: the client may send the task again, fixed, with its taskUUID.
            assert await r.state.inner.get_task(task.taskUUID) is None
            assert r.images.blobs == {}

    run(test)
