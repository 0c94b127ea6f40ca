"""Client-supplied images (imageUpload, reference images): an image UUID of ours, an http(s)
URL fetched through the outbound guard, a data URI or raw base64. Decoded with size, pixel and
format limits; every failure is an error item naming the parameter."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass

from PIL import Image

from impasto.delivery.codecs import (
    CONTENT_TYPES,
    EXTENSIONS,
    ImageDecodeError,
    decode_base64_payload,
    decode_image,
    encode_image,
    fit_within,
)
from impasto.delivery.outbound import OutboundClient, OutboundFailed, OutboundRefused
from impasto.protocol.errors import InvalidParameter
from impasto.protocol.fields import is_uuid4
from impasto.state.base import StateStore
from impasto.state.records import ImageKind, ImageRecord
from impasto.storage.base import ImageStore

_INLINE_DECODE_CHARS = 64 * 1024
# Formats stored as they came (when not resized); the rest are converted.
_KEPT = {"JPEG": "JPG", "PNG": "PNG", "WEBP": "WEBP"}


@dataclass(frozen=True)
class StorableImage:
    """Encoded bytes ready for the image store."""

    data: bytes
    extension: str
    content_type: str
    width: int
    height: int


def storable(
    image: Image.Image, data: bytes, source_format: str, max_side: int | None = None
) -> StorableImage:
    """The client's bytes as they came when we keep that format and size, else re-encoded
    (PNG when there is alpha, else JPG). CPU work: call it in a thread."""
    fitted = fit_within(image, max_side) if max_side is not None else image
    output_format = _KEPT.get(source_format)
    if fitted is not image or output_format is None:
        if output_format is None:
            output_format = "PNG" if fitted.mode in ("RGBA", "LA", "P") else "JPG"
        data = encode_image(fitted, output_format, 95).data
    return StorableImage(
        data, EXTENSIONS[output_format], CONTENT_TYPES[output_format], fitted.width, fitted.height
    )


async def store_image(
    images: ImageStore,
    state: StateStore,
    image: StorableImage,
    *,
    kind: ImageKind,
    task_uuid: str,
    now: float,
    retention_s: float,
) -> tuple[str, str]:
    """Put an image in the image store and record it; returns (image UUID, storage key)."""
    image_uuid = str(uuid.uuid4())
    key = f"{image_uuid}.{image.extension}"
    await images.put(key, image.data, image.content_type)
    try:
        await state.put_image(
            ImageRecord(
                image_uuid=image_uuid,
                key=key,
                content_type=image.content_type,
                kind=kind,
                width=image.width,
                height=image.height,
                created_at=now,
                expires_at=now + retention_s,
                task_uuid=task_uuid,
            )
        )
    except BaseException:
        # Bytes that no record names are never swept: take them back.
        with contextlib.suppress(Exception):
            await images.delete(key)
        raise
    return image_uuid, key


async def image_owned(state: StateStore, record: ImageRecord, owner: str) -> bool:
    """Whether the key whose digest is `owner` made (or uploaded) the image: the task it
    belongs to records its owner. One of a task made while the server was open is anybody's;
    one of a task that is gone, nobody's."""
    if record.task_uuid is None:
        return False
    task = await state.get_task(record.task_uuid)
    return task is not None and task.visible_to(owner)


@dataclass(frozen=True)
class ImageInput:
    """A decoded client image and where it came from."""

    image: Image.Image
    data: bytes
    format: str
    url: str | None = None
    # Set when the client named an image we already store.
    stored_uuid: str | None = None


class ImageResolver:
    """Turns the image strings of the protocol into decoded images."""

    def __init__(
        self,
        state: StateStore,
        images: ImageStore,
        outbound: OutboundClient,
        *,
        max_bytes: int,
        max_pixels: int,
        fetch_timeout_s: float,
        private: bool = False,
    ) -> None:
        self._state = state
        # IMPASTO_PRIVATE_IMAGES: a stored image is named (by UUID) only by the key that made
        # or uploaded it; otherwise its UUID is a capability, like its URL.
        self._private = private
        self._images = images
        self._outbound = outbound
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels
        self._fetch_timeout_s = fetch_timeout_s

    async def resolve(
        self, value: str, *, parameter: str, code: str, owner: str | None = None
    ) -> ImageInput:
        def refuse(message: str) -> InvalidParameter:
            return InvalidParameter(f"{parameter}: {message}.", code=code, parameter=parameter)

        url: str | None = None
        if is_uuid4(value):
            data = await self._stored(value, owner)
            if data is None:
                raise refuse(f"no image with UUID {value} (unknown or expired)")
        elif value[:8].lower() == "https://" or value[:7].lower() == "http://":
            url = value
            try:
                data, _ = await self._outbound.fetch(
                    value, max_bytes=self._max_bytes, timeout=self._fetch_timeout_s
                )
            except (OutboundRefused, OutboundFailed) as exc:
                raise refuse(f"cannot fetch {value}: {exc}") from None
        else:
            try:
                if len(value) > _INLINE_DECODE_CHARS:
                    # ~20 ms per MiB: a large data URI is decoded off the event loop.
                    data = await asyncio.to_thread(decode_base64_payload, value, self._max_bytes)
                else:
                    data = decode_base64_payload(value, self._max_bytes)
            except ImageDecodeError as exc:
                raise refuse(f"not an image UUID, URL, data URI or base64 image ({exc})") from None
        try:
            image, source_format = await asyncio.to_thread(decode_image, data, self._max_pixels)
        except ImageDecodeError as exc:
            raise refuse(str(exc)) from None
        return ImageInput(
            image=image,
            data=data,
            format=source_format,
            url=url,
            stored_uuid=value if is_uuid4(value) else None,
        )

    async def _stored(self, image_uuid: str, owner: str | None) -> bytes | None:
        record = await self._state.get_image(image_uuid)
        if record is None or record.expires_at <= time.time():
            return None
        if (
            self._private
            and owner is not None
            and not await image_owned(self._state, record, owner)
        ):
            return None
        return await self._images.get(record.key)
