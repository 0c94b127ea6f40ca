"""imageUpload: store a client image (longest side at most the configured limit) and answer
with its imageUUID and imageURL; the UUID then works anywhere an image is accepted.

The task is created before the image is stored, so that a duplicate taskUUID is refused
atomically; if storing then fails, the task ends with that error instead of staying
processing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from impasto.protocol.errors import ConflictTaskUUID, ImpastoError, InferenceError
from impasto.protocol.tasks import ImageUploadIn
from impasto.service.images import ImageResolver, StorableImage, storable, store_image
from impasto.state.base import StateStore
from impasto.state.records import ResultRecord, TaskRecord
from impasto.storage.base import ImageStore

log = logging.getLogger("impasto.uploads")

TASK_TYPE = "imageUpload"


class UploadService:
    """Stores uploaded images as tasks with one result, like every other task."""

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
        if await self._state.get_task(task.taskUUID) is not None:
            raise ConflictTaskUUID(
                f"taskUUID {task.taskUUID} was already used.", parameter="taskUUID"
            )
        source = await self._resolver.resolve(task.image, parameter="image", code="invalidImage")
        image = await asyncio.to_thread(
            storable, source.image, source.data, source.format, self._max_side
        )
        now = time.time()
        await self._state.create_task(
            TaskRecord(
                task_uuid=task.taskUUID,
                task_type=TASK_TYPE,
                request={"taskType": TASK_TYPE, "taskUUID": task.taskUUID},
                expected=1,
                created_at=now,
                extra={"owner": owner} if owner is not None else {},
            )
        )
        try:
            return await self._store(task, image, now)
        except Exception as exc:
            if not isinstance(exc, ImpastoError):
                log.exception("storing upload %s failed", task.taskUUID)
            error = (
                exc
                if isinstance(exc, ImpastoError)
                else InferenceError("The uploaded image could not be stored.")
            )
            error.for_task(TASK_TYPE, task.taskUUID)
            # Best effort: with the state store down this fails too, and the restart recovery
            # (or the task sweep) ends it; the client gets the error either way.
            with contextlib.suppress(Exception):
                await self._state.add_result(
                    ResultRecord(task.taskUUID, 0, "error", error.to_item(), time.time())
                )
                await self._state.finish_task(task.taskUUID, "error", error.to_item(), time.time())
            raise error from None

    async def _store(self, task: ImageUploadIn, image: StorableImage, now: float) -> dict[str, Any]:
        image_uuid, key = await store_image(
            self._images,
            self._state,
            image,
            kind="upload",
            task_uuid=task.taskUUID,
            now=now,
            retention_s=self._retention_s,
        )
        # compat: runware 0.5.24 reads imageURL unconditionally, so it is always present.
        item = {
            "taskType": TASK_TYPE,
            "taskUUID": task.taskUUID,
            "imageUUID": image_uuid,
            "imageURL": self._images.direct_url(key, now + self._retention_s)
            or f"{self._image_base_url}/image/{key}",
        }
        await self._state.add_result(ResultRecord(task.taskUUID, 0, "success", item, now))
        await self._state.finish_task(task.taskUUID, "success", None, now)
        return item
