"""IMPASTO_PRIVATE_IMAGES for images named by UUID: the ImageResolver hands a stored image
only to the key whose task made or uploaded it; without the setting a UUID is a capability."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from PIL import Image

from impasto.delivery.outbound import OutboundClient, OutboundGuard
from impasto.protocol.errors import InvalidParameter
from impasto.service.images import ImageResolver
from impasto.state.records import ImageRecord, TaskRecord
from impasto.state.sqlite import SqliteStateStore
from tests.fakes import FakeImageStore

UPLOAD = "0b6c3a4e-8a43-4c1b-9f3e-6d5b2f1a7c90"
IMAGE = "5f2d7c1e-3b4a-4e6f-8a9b-0c1d2e3f4a5b"
OPEN_TASK = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
OPEN_IMAGE = "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "PNG")
    return buffer.getvalue()


async def resolver(tmp_path: Path, private: bool) -> tuple[ImageResolver, SqliteStateStore]:
    state = SqliteStateStore(tmp_path / "s.db")
    await state.open()
    images = FakeImageStore()
    for task_uuid, image_uuid, extra in (
        (UPLOAD, IMAGE, {"owner": "a" * 64}),
        (OPEN_TASK, OPEN_IMAGE, {}),
    ):
        await state.create_task(TaskRecord(task_uuid, "imageUpload", {}, 1, 0.0, extra=extra))
        await images.put(f"{image_uuid}.png", png(), "image/png")
        await state.put_image(
            ImageRecord(image_uuid, f"{image_uuid}.png", "image/png", "upload", 8, 8, 0.0, 4e9,
                        task_uuid=task_uuid)
        )  # fmt: skip
    outbound = OutboundClient.create(OutboundGuard(True))
    made = ImageResolver(
        state, images, outbound, max_bytes=1 << 20, max_pixels=1 << 20, fetch_timeout_s=5,
        private=private,
    )  # fmt: skip
    return made, state


def test_with_private_images_only_the_uploader_names_its_image(tmp_path: Path) -> None:
    async def scenario() -> None:
        images, state = await resolver(tmp_path, private=True)
        try:
            got = await images.resolve(IMAGE, parameter="seedImage", code="x", owner="a" * 64)
            assert got.image.size == (8, 8)
            with pytest.raises(InvalidParameter, match="no image with UUID"):
                await images.resolve(IMAGE, parameter="seedImage", code="x", owner="b" * 64)
            # An image of a task made while the server was open is anybody's.
            await images.resolve(OPEN_IMAGE, parameter="seedImage", code="x", owner="b" * 64)
        finally:
            await state.close()

    asyncio.run(scenario())


def test_without_private_images_a_uuid_is_a_capability(tmp_path: Path) -> None:
    async def scenario() -> None:
        images, state = await resolver(tmp_path, private=False)
        try:
            got = await images.resolve(IMAGE, parameter="seedImage", code="x", owner="b" * 64)
            assert got.stored_uuid == IMAGE
        finally:
            await state.close()

    asyncio.run(scenario())
