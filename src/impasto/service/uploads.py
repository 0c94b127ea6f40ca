"""Client images kept for reuse: imageUpload and mediaStorage upload store a client image
(longest side at most the configured limit) and answer with its UUID and URL, which then work
anywhere an image is accepted; mediaStorage delete removes one again.

Each is a task with one result, like every other task, so getResponse answers for it and a
taskUUID is used once. The task is created after the input is checked and before anything is
stored, so that a duplicate taskUUID is refused atomically; if storing then fails, the task ends
with that error instead of staying processing.

mediaStorage delete removes only uploaded images (imageUpload, mediaStorage upload, and the
inputs a ControlNet preprocess stored for its inputImageUUID). Generated images, guide images
and the inputs an imageInference stored are not media the client put there: getResponse items
and stored requests name them, and they expire on their own. With API keys configured, only the
key that uploaded an image may delete it; to any other key, and once the upload's task record
has been swept, it does not exist. Work already accepted that names a deleted image (a queued
generation using it as a reference) fails when it reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from impasto.protocol.errors import (
    ConflictTaskUUID,
    ImpastoError,
    InferenceError,
    InvalidParameter,
    code_name,
)
from impasto.protocol.fields import is_uuid4
from impasto.protocol.tasks import ImageUploadIn
from impasto.protocol.utility import MediaStorageIn, media_delete_item, media_upload_item
from impasto.service.images import ImageInput, ImageResolver, StorableImage, storable, store_image
from impasto.state.base import StateStore
from impasto.state.records import ImageRecord, ResultRecord, TaskRecord
from impasto.storage.base import ImageStore

log = logging.getLogger("impasto.uploads")

TASK_TYPE = "imageUpload"
MEDIA_TASK_TYPE = "mediaStorage"

# Work that stores what a task produced and returns its one result item.
TaskWork = Callable[[float], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class StoredUpload:
    """An image kept as an upload: its UUID and the URL it is served at."""

    image_uuid: str
    url: str


class UploadService:
    """Stores and deletes uploaded images, each operation a task with one result."""

    def __init__(
        self,
        *,
        state: StateStore,
        images: ImageStore,
        resolver: ImageResolver,
        image_base_url: str,
        max_side: int,
        retention_s: int,
    ) -> None:
        self._state = state
        self._images = images
        self._resolver = resolver
        self._image_base_url = image_base_url
        self._max_side = max_side
        self._retention_s = retention_s

    async def upload(self, task: ImageUploadIn, owner: str | None = None) -> dict[str, Any]:
        def reply(stored: StoredUpload) -> dict[str, Any]:
            # compat: runware 0.5.24 reads imageURL unconditionally, so it is always present.
            return {
                "taskType": TASK_TYPE,
                "taskUUID": task.taskUUID,
                "imageUUID": stored.image_uuid,
                "imageURL": stored.url,
            }

        return await self._store_client_image(
            TASK_TYPE, task.taskUUID, task.image, "image", "invalidImage", owner, reply
        )

    async def media_storage(self, task: MediaStorageIn, owner: str | None = None) -> dict[str, Any]:
        if task.operation == "delete":
            return await self._delete(task, owner)
        if task.media is None:
            raise InvalidParameter(
                "Missing required parameter media (a URL, data URI or base64 image) for "
                "operation upload.",
                code="missingMedia",
                parameter="media",
            )
        if task.mediaUUID is not None:
            raise InvalidParameter(
                "Invalid value for mediaUUID parameter: only operation delete takes it.",
                code="invalidMediaUUID",
                parameter="mediaUUID",
            )

        def reply(stored: StoredUpload) -> dict[str, Any]:
            return media_upload_item(task.taskUUID, stored.image_uuid, stored.url)

        return await self._store_client_image(
            MEDIA_TASK_TYPE, task.taskUUID, task.media, "media", "invalidMedia", owner, reply
        )

    async def ensure_unused(self, task_uuid: str) -> None:
        """Refuse a taskUUID that names a task already (before any work is done for it)."""
        if await self._state.get_task(task_uuid) is not None:
            raise ConflictTaskUUID(f"taskUUID {task_uuid} was already used.", parameter="taskUUID")

    @property
    def max_side(self) -> int:
        """The longest side an uploaded image is stored with."""
        return self._max_side

    async def prepare(self, source: ImageInput) -> StorableImage:
        """The bytes to store for a resolved client image: its own when they can be kept,
        else fitted within the upload limit and re-encoded. CPU work, done in a thread."""
        return await asyncio.to_thread(
            storable, source.image, source.data, source.format, self._max_side
        )

    async def store(self, image: StorableImage, task_uuid: str, now: float) -> StoredUpload:
        """Keep an image as an upload: in the image store, with its record and retention."""
        image_uuid, key = await store_image(
            self._images,
            self._state,
            image,
            kind="upload",
            task_uuid=task_uuid,
            now=now,
            retention_s=self._retention_s,
        )
        url = self._images.direct_url(key, now + self._retention_s)
        return StoredUpload(image_uuid, url or f"{self._image_base_url}/image/{key}")

    async def run_once(
        self,
        task_type: str,
        task_uuid: str,
        owner: str | None,
        work: TaskWork,
        *,
        failure: str,
    ) -> dict[str, Any]:
        """Create the task, run `work` and record its item as the task's one result. If the
        work fails the task ends with its error (`failure` for an unexpected one), which is
        raised for the client."""
        now = time.time()
        await self._state.create_task(
            TaskRecord(
                task_uuid=task_uuid,
                task_type=task_type,
                request={"taskType": task_type, "taskUUID": task_uuid},
                expected=1,
                created_at=now,
                extra={"owner": owner} if owner is not None else {},
            )
        )
        try:
            item = await work(now)
            await self._state.add_result(ResultRecord(task_uuid, 0, "success", item, now))
            await self._state.finish_task(task_uuid, "success", None, now)
            return item
        except Exception as exc:
            if not isinstance(exc, ImpastoError):
                log.exception("%s task %s failed", task_type, task_uuid)
            error = exc if isinstance(exc, ImpastoError) else InferenceError(failure)
            error.for_task(task_type, task_uuid)
            # Best effort: with the state store down this fails too, and the restart recovery
            # (or the task sweep) ends it; the client gets the error either way.
            with contextlib.suppress(Exception):
                await self._state.add_result(
                    ResultRecord(task_uuid, 0, "error", error.to_item(), time.time())
                )
                await self._state.finish_task(task_uuid, "error", error.to_item(), time.time())
            raise error from None

    async def _store_client_image(
        self,
        task_type: str,
        task_uuid: str,
        value: str,
        parameter: str,
        code: str,
        owner: str | None,
        reply: Callable[[StoredUpload], dict[str, Any]],
    ) -> dict[str, Any]:
        await self.ensure_unused(task_uuid)
        source = await self._resolver.resolve(value, parameter=parameter, code=code, owner=owner)
        prepared = await self.prepare(source)

        async def work(now: float) -> dict[str, Any]:
            return reply(await self.store(prepared, task_uuid, now))

        return await self.run_once(
            task_type, task_uuid, owner, work, failure="The uploaded image could not be stored."
        )

    async def _delete(self, task: MediaStorageIn, owner: str | None) -> dict[str, Any]:
        if task.media is not None and task.mediaUUID is not None:
            raise InvalidParameter(
                "Invalid value for media parameter: give the UUID to delete as mediaUUID or "
                "media, not both.",
                code="invalidMedia",
                parameter="media",
            )
        parameter = "mediaUUID" if task.media is None else "media"
        target = task.mediaUUID if task.media is None else task.media
        if target is None:
            raise InvalidParameter(
                "Missing required parameter mediaUUID (the UUID of the uploaded image to "
                "delete) for operation delete.",
                code="missingMediaUUID",
                parameter="mediaUUID",
            )
        code = f"invalid{code_name(parameter)}"
        if not is_uuid4(target):
            raise InvalidParameter(
                f"Invalid value for {parameter} parameter: operation delete takes the UUID of "
                "an uploaded image.",
                code=code,
                parameter=parameter,
            )
        await self.ensure_unused(task.taskUUID)
        record = await self._deletable(target, owner, parameter, code)

        async def work(now: float) -> dict[str, Any]:
            # Bytes first: a record without bytes reads as expired and is swept; bytes
            # without a record would never be.
            await self._images.delete(record.key)
            await self._state.delete_image(record.image_uuid)
            return media_delete_item(task.taskUUID, target)

        return await self.run_once(
            MEDIA_TASK_TYPE, task.taskUUID, owner, work, failure="The media could not be deleted."
        )

    async def _deletable(
        self, image_uuid: str, owner: str | None, parameter: str, code: str
    ) -> ImageRecord:
        record = await self._state.get_image(image_uuid)
        missing = InvalidParameter(
            f"Invalid value for {parameter} parameter: no uploaded media with UUID {image_uuid} "
            "(unknown, expired or already deleted).",
            code=code,
            parameter=parameter,
        )
        if record is None or record.expires_at <= time.time():
            raise missing
        if owner is not None:
            task = await self._state.get_task(record.task_uuid) if record.task_uuid else None
            uploader = task.extra.get("owner") if task is not None else None
            if uploader is None or not hmac.compare_digest(str(uploader), owner):
                raise missing
        if record.kind != "upload":
            raise InvalidParameter(
                f"Invalid value for {parameter} parameter: {image_uuid} is not uploaded media; "
                "generated and guide images, and the inputs of generations, are kept until "
                "they expire.",
                code=code,
                parameter=parameter,
            )
        return record
