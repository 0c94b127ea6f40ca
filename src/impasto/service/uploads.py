"""imageUpload: store a client image (longest side at most the configured limit) and answer
with its imageUUID and imageURL; the UUID then works anywhere an image is accepted."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from PIL import Image

from impasto.delivery.codecs import CONTENT_TYPES, EXTENSIONS, encode_image, fit_within
from impasto.protocol.errors import ConflictTaskUUID
from impasto.protocol.tasks import ImageUploadIn
from impasto.service.images import ImageResolver
from impasto.state.base import StateStore
from impasto.state.records import ImageRecord, ResultRecord, TaskRecord
from impasto.storage.base import ImageStore

TASK_TYPE = "imageUpload"
# Formats stored as they came (when not resized); the rest are converted.
_KEPT = {"JPEG": "JPG", "PNG": "PNG", "WEBP": "WEBP"}


def _prepare(
    image: Image.Image, data: bytes, source_format: str, max_side: int
) -> tuple[bytes, str, int, int]:
    fitted = fit_within(image, max_side)
    output_format = _KEPT.get(source_format)
    if fitted is image and output_format is not None:
        return data, output_format, image.width, image.height
    if output_format is None:
        output_format = "PNG" if fitted.mode == "RGBA" else "JPG"
    encoded = encode_image(fitted, output_format, 95)
    return encoded.data, output_format, fitted.width, fitted.height


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

    async def upload(self, task: ImageUploadIn) -> dict[str, Any]:
        if await self._state.get_task(task.taskUUID) is not None:
            raise ConflictTaskUUID(
                f"taskUUID {task.taskUUID} was already used.", parameter="taskUUID"
            )
        source = await self._resolver.resolve(task.image, parameter="image", code="invalidImage")
        data, output_format, width, height = await asyncio.to_thread(
            _prepare, source.image, source.data, source.format, self._max_side
        )
        now = time.time()
        image_uuid = str(uuid.uuid4())
        key = f"{image_uuid}.{EXTENSIONS[output_format]}"
        content_type = CONTENT_TYPES[output_format]
        await self._state.create_task(
            TaskRecord(
                task_uuid=task.taskUUID,
                task_type=TASK_TYPE,
                request={"taskType": TASK_TYPE, "taskUUID": task.taskUUID},
                expected=1,
                created_at=now,
            )
        )
        await self._images.put(key, data, content_type)
        await self._state.put_image(
            ImageRecord(
                image_uuid=image_uuid,
                key=key,
                content_type=content_type,
                kind="upload",
                width=width,
                height=height,
                created_at=now,
                expires_at=now + self._retention_s,
                task_uuid=task.taskUUID,
            )
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
