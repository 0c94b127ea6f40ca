"""What a utility task's model produced, stored as its result items: an image (upscale,
removeBackground) encoded, stored and answered like a generated image, with its upload and
webhook; texts (caption, promptEnhance) one item each, with a webhook each. Then the task is
finished (completion.py), the same state machine getResponse, sync replies and the outbox
read for imageInference."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from impasto.delivery.codecs import EncodedImage, encode_image
from impasto.protocol.results import image_item
from impasto.protocol.utility_tasks import text_item
from impasto.service.completion import TaskCompletion
from impasto.service.outcomes import result_deliveries
from impasto.service.usage import UsageMeter
from impasto.state.base import StateStore
from impasto.state.records import ImageRecord, ResultRecord
from impasto.storage.base import ImageStore


@dataclass(frozen=True)
class Delivery:
    """How a task's results leave: output encoding, retention, destinations, cost."""

    task_type: str
    task_uuid: str
    model: str
    output_type: str = "URL"
    output_format: str = "PNG"
    output_quality: int = 95
    ttl: int | None = None
    webhook_url: str | None = None
    upload_endpoint: str | None = None
    # Set when the client asked to see it (includeCost); metered either way.
    cost: float = 0.0
    include_cost: bool = False


def flatten(image: Image.Image, output_format: str) -> Image.Image:
    """An image for a format without transparency (JPG): alpha over white."""
    if output_format != "JPG" or image.mode not in ("RGBA", "LA"):
        return image
    canvas = Image.new("RGB", image.size, (255, 255, 255))
    canvas.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
    return canvas


class UtilityOutcomes:
    """Stores utility results and finishes their tasks."""

    def __init__(
        self,
        *,
        state: StateStore,
        images: ImageStore,
        completion: TaskCompletion,
        image_base_url: str,
        output_retention_s: int,
        wake_outbox: Callable[[], None],
        meter: UsageMeter | None = None,
    ) -> None:
        self._state = state
        self._images = images
        self._completion = completion
        self._image_base_url = image_base_url
        self._output_retention_s = output_retention_s
        self._wake_outbox = wake_outbox
        self._meter = meter

    async def image(self, delivery: Delivery, image: Image.Image) -> None:
        """Store the one image of an image task as its result 0."""
        now = time.time()
        image_uuid = str(uuid.uuid4())
        encoded: EncodedImage = await asyncio.to_thread(
            encode_image,
            flatten(image, delivery.output_format),
            delivery.output_format,
            delivery.output_quality,
        )
        key = f"{image_uuid}.{encoded.extension}"
        await self._images.put(key, encoded.data, encoded.content_type)
        keep = False
        try:
            expires_at = now + (delivery.ttl or self._output_retention_s)
            record = ImageRecord(
                image_uuid=image_uuid,
                key=key,
                content_type=encoded.content_type,
                kind="output",
                width=encoded.width,
                height=encoded.height,
                created_at=now,
                expires_at=expires_at,
                task_uuid=delivery.task_uuid,
            )
            item = image_item(
                task_type=delivery.task_type,
                task_uuid=delivery.task_uuid,
                image_uuid=image_uuid,
                output_type=delivery.output_type,
                data=encoded.data,
                content_type=encoded.content_type,
                url=self._images.direct_url(key, expires_at)
                or f"{self._image_base_url}/image/{key}",
                cost=delivery.cost if delivery.include_cost else None,
            )
            deliveries = result_deliveries(
                delivery.task_uuid,
                0,
                item,
                webhook_url=delivery.webhook_url,
                upload=(delivery.upload_endpoint, key, encoded.content_type)
                if delivery.upload_endpoint
                else None,
            )
            keep = await self._state.add_result(
                ResultRecord(delivery.task_uuid, 0, "success", item, now),
                deliveries,
                image=record,
            )
            if keep and self._meter is not None:
                await self._meter.image_stored(
                    delivery.task_uuid,
                    0,
                    delivery.model,
                    encoded.width,
                    encoded.height,
                    delivery.cost,
                )
        finally:
            if not keep:
                # Failed, or stored already by an earlier run: keep nothing of this one.
                with contextlib.suppress(Exception):
                    await self._images.delete(key)
        if deliveries:
            self._wake_outbox()
        await self._completion.maybe_finish(delivery.task_uuid)

    async def texts(self, delivery: Delivery, texts: list[str]) -> None:
        """Store one text item per result index (a caption, or each prompt version)."""
        now = time.time()
        woken = False
        for index, text in enumerate(texts):
            item = text_item(
                delivery.task_type,
                delivery.task_uuid,
                text,
                # The price is the task's: shown once, on its first item.
                (delivery.cost if index == 0 else 0.0) if delivery.include_cost else None,
            )
            deliveries = result_deliveries(
                delivery.task_uuid, index, item, webhook_url=delivery.webhook_url
            )
            stored = await self._state.add_result(
                ResultRecord(delivery.task_uuid, index, "success", item, now), deliveries
            )
            woken = woken or (stored and bool(deliveries))
        if woken:
            self._wake_outbox()
        await self._completion.maybe_finish(delivery.task_uuid)
