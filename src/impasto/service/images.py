"""Client-supplied images (imageUpload, reference images): an image UUID of ours, an http(s)
URL fetched through the outbound guard, a data URI or raw base64. Decoded with size, pixel and
format limits; every failure is an error item naming the parameter."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from PIL import Image

from impasto.delivery.codecs import ImageDecodeError, decode_base64_payload, decode_image
from impasto.delivery.outbound import OutboundClient, OutboundFailed, OutboundRefused
from impasto.protocol.errors import InvalidParameter
from impasto.protocol.tasks import is_uuid4
from impasto.state.base import StateStore
from impasto.storage.base import ImageStore


@dataclass(frozen=True)
class ImageInput:
    """A decoded client image and where it came from."""

    image: Image.Image
    data: bytes
    format: str
    url: str | None = None


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
    ) -> None:
        self._state = state
        self._images = images
        self._outbound = outbound
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels
        self._fetch_timeout_s = fetch_timeout_s

    async def resolve(self, value: str, *, parameter: str, code: str) -> ImageInput:
        def refuse(message: str) -> InvalidParameter:
            return InvalidParameter(f"{parameter}: {message}.", code=code, parameter=parameter)

        url: str | None = None
        if is_uuid4(value):
            data = await self._stored(value)
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
                data = decode_base64_payload(value, self._max_bytes)
            except ImageDecodeError as exc:
                raise refuse(f"not an image UUID, URL, data URI or base64 image ({exc})") from None
        try:
            image, source_format = await asyncio.to_thread(decode_image, data, self._max_pixels)
        except ImageDecodeError as exc:
            raise refuse(str(exc)) from None
        return ImageInput(image=image, data=data, format=source_format, url=url)

    async def _stored(self, image_uuid: str) -> bytes | None:
        record = await self._state.get_image(image_uuid)
        if record is None or record.expires_at <= time.time():
            return None
        return await self._images.get(record.key)
