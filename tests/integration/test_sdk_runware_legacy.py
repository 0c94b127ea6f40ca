"""The legacy official Python SDK, `runware` 0.5.24 (WebSocket only), as a client of impasto,
unchanged, in the test process.

Its getResponse polling waits RUNWARE_VIDEO_INITIAL_TIMEOUT (30 s by default) for each poll
that finds the task still processing, because it drops items without an imageUUID before
counting them. That is one of its documented environment settings; the tests set it to 2 s
before importing the SDK so that polling a running task takes seconds, not minutes.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningServer, image_bytes
from tests.gated_backend import Gate, gated_server
from tests.live import recorded_errors, task_status, wait_finished
from tests.sdk.clients import assert_images
from tests.sdk.tcp_proxy import TcpProxy

os.environ.setdefault("RUNWARE_VIDEO_INITIAL_TIMEOUT", "2000")

try:
    # After the environment: the SDK reads it at import.
    import runware.base
    import runware.version
    from runware import (
        IAsyncTaskResponse,
        IImage,
        IImageInference,
        IInputs,
        Runware,
        RunwareAPIError,
    )
except ImportError as missing:
    pytest.fail(
        f"runware 0.5.24 is not installed in .venv ({missing}): run ./scripts/install",
        pytrace=False,
    )

MODEL = "impasto:tiny@1"
OUTPUT_TYPES = ("URL", "base64Data", "dataURI")


@pytest.fixture(scope="module")
def gate() -> Gate:
    return Gate()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path, gate: Gate
) -> Iterator[RunningServer]:
    with gated_server(tmp_path_factory.mktemp("sdk-legacy"), tiny_models_dir, gate) as running:
        yield running


def ws_url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/v1"


def request(**fields: Any) -> IImageInference:
    base: dict[str, Any] = {
        "model": MODEL,
        "positivePrompt": "a lighthouse at dusk",
        "width": 64,
        "height": 64,
    }
    return IImageInference(**{**base, **fields})


def items(images: list[IImage]) -> list[dict[str, Any]]:
    return [{k: v for k, v in asdict(image).items() if v is not None} for image in images]


async def connected(port: int) -> Runware:
    client = Runware(api_key="k", url=ws_url(port))
    await client.connect()
    return client


def test_the_pinned_sdk_version_is_installed() -> None:
    assert runware.version.__version__ == "0.5.24", "run ./scripts/install"


def test_the_polling_timeout_setting_took_effect() -> None:
    assert runware.base.VIDEO_INITIAL_TIMEOUT == 2000, (
        "runware was imported before this module could set RUNWARE_VIDEO_INITIAL_TIMEOUT"
    )


def test_text_to_image_gives_two_distinct_images_in_every_output_type(
    server: RunningServer,
) -> None:
    async def scenario() -> list[list[IImage]]:
        client = await connected(server.settings.port)
        try:
            return [
                await client.imageInference(
                    request(numberResults=2, outputType=output, width=128, height=64)
                )
                for output in OUTPUT_TYPES
            ]
        finally:
            await client.disconnect()

    for output, images in zip(OUTPUT_TYPES, asyncio.run(scenario()), strict=True):
        assert_images(items(images), 2, output, (128, 64))


def test_an_uploaded_image_is_a_reference_image_both_ways(
    server: RunningServer, tmp_path: Path
) -> None:
    """uploadImage() uploads only a local file (sent as a data URI); a URL, UUID or data URI
    string it returns as is without asking the server."""
    path = tmp_path / "reference.png"
    path.write_bytes(image_bytes())

    async def scenario() -> tuple[Any, list[IImage], list[IImage]]:
        client = await connected(server.settings.port)
        try:
            upload = await client.uploadImage(str(path))
            nested = await client.imageInference(
                request(inputs=IInputs(referenceImages=[upload.imageUUID]))
            )
            top = await client.imageInference(request(referenceImages=[upload.imageUUID]))
            return upload, nested, top
        finally:
            await client.disconnect()

    upload, nested, top = asyncio.run(scenario())
    assert uuid.UUID(upload.imageUUID)
    assert upload.imageURL.startswith("http://")
    assert_images(items(nested), 1, "URL", (64, 64))
    assert_images(items(top), 1, "URL", (64, 64))


def test_an_async_task_is_acknowledged_and_get_response_returns_its_images(
    server: RunningServer,
) -> None:
    async def scenario() -> tuple[Any, list[IImage]]:
        client = await connected(server.settings.port)
        try:
            ack = await client.imageInference(request(numberResults=2, deliveryMethod="async"))
            assert isinstance(ack, IAsyncTaskResponse)
            # Polled once the task is done: the SDK's polling of a task part-done is below.
            await asyncio.to_thread(wait_finished, server, ack.taskUUID)
            return ack, await client.getResponse(ack.taskUUID, numberResults=2)
        finally:
            await client.disconnect()

    ack, images = asyncio.run(scenario())
    assert ack.taskType == "imageInference"
    assert_images(items(images), 2, "URL", (64, 64))
    assert {image.taskUUID for image in images} == {ack.taskUUID}
    assert {image.status for image in images} == {"success"}


def test_get_response_polls_a_running_task_until_its_image_is_there(
    server: RunningServer, gate: Gate
) -> None:
    async def scenario() -> list[IImage]:
        client = await connected(server.settings.port)
        try:
            with gate.hold():
                ack = await client.imageInference(request(deliveryMethod="async"))
                polling = asyncio.create_task(client.getResponse(ack.taskUUID))
                await asyncio.to_thread(gate.wait_held)
            return await polling
        finally:
            await client.disconnect()

    images = asyncio.run(scenario())
    assert_images(items(images), 1, "URL", (64, 64))


def test_get_response_of_a_part_done_task_repeats_the_finished_image(
    server: RunningServer, gate: Gate
) -> None:
    """Pinned SDK behaviour (runware 0.5.24's _pollResults), not ours to fix: getResponse
    answers with every generation, finished or not, on each poll (as Runware documents); the
    SDK adds each poll's finished items to what earlier polls returned, without removing
    repeats. With one of two images done it returns that image twice. Poll a multi-image task
    once it is finished (or use sync delivery) with this SDK."""

    async def scenario() -> list[IImage]:
        client = await connected(server.settings.port)
        try:
            with gate.hold(passes=1):
                ack = await client.imageInference(request(numberResults=2, deliveryMethod="async"))
                await asyncio.to_thread(gate.wait_held)
                return await client.getResponse(ack.taskUUID, numberResults=2)
        finally:
            await client.disconnect()

    images = asyncio.run(scenario())
    assert len(images) == 2
    assert images[0].imageUUID == images[1].imageUUID


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [("width", 13, "invalidWidth"), ("outputQuality", 5, "invalidOutputQuality")],
)
def test_an_invalid_parameter_raises_runware_api_error_with_our_code(
    server: RunningServer, field: str, value: int, code: str
) -> None:
    async def scenario() -> RunwareAPIError:
        client = await connected(server.settings.port)
        try:
            with pytest.raises(RunwareAPIError) as raised:
                await client.imageInference(request(**{field: value}))
            return raised.value
        finally:
            await client.disconnect()

    error = asyncio.run(scenario())
    assert error.code == code
    assert error.error_data["parameter"] == field
    assert error.error_data["taskType"] == "imageInference"
    assert error.error_data["taskUUID"]


def test_a_task_cut_mid_generation_is_resent_then_polled_to_its_image(
    server: RunningServer, gate: Gate
) -> None:
    """What recovery means for runware 0.5.24: on the drop it reconnects with a NEW session
    (it forgets its connectionSessionUUID), sends the same task again with the same taskUUID,
    gets conflictTaskUUID because impasto is already running it, and switches to getResponse
    polling for that taskUUID. The call returns the task's own image: nothing runs twice.

    One image: for a task of several, this SDK's polling repeats images when a poll finds it
    part-done (see the pinned test above)."""
    task_uuid = str(uuid.uuid4())

    async def scenario(proxy: TcpProxy) -> list[IImage]:
        client = await connected(proxy.port)
        try:
            with gate.hold():
                call = asyncio.create_task(client.imageInference(request(taskUUID=task_uuid)))
                await asyncio.to_thread(gate.wait_held)
                assert proxy.cut() == 1
            return await call
        finally:
            await client.disconnect()

    with TcpProxy(server.settings.port) as proxy, recorded_errors(server) as errors:
        images = asyncio.run(scenario(proxy))
    assert [error["code"] for error in errors] == ["conflictTaskUUID"]
    assert errors[0]["taskUUID"] == task_uuid
    assert_images(items(images), 1, "URL", (64, 64))
    assert images[0].taskUUID == task_uuid
    assert proxy.accepted >= 2
    assert task_status(server, task_uuid) == "success"


def test_image_modes_as_the_legacy_sdk_sends_them(server: RunningServer, tmp_path: Path) -> None:
    """Its own request types: seed and mask images and ControlNet guides uploaded from local
    files, ILora, IControlNetGeneral (sent with every unset member as null), IOutpaint,
    IRefiner, IEmbedding, IIpAdapter, clipSkip, promptWeighting and IAcceleratorOptions."""
    from runware.types import (
        IAcceleratorOptions,
        IControlNetGeneral,
        IEmbedding,
        IIpAdapter,
        ILora,
        IOutpaint,
        IRefiner,
    )

    seed = tmp_path / "seed.png"
    seed.write_bytes(image_bytes())
    mask = tmp_path / "mask.png"
    from PIL import Image

    canvas = Image.new("L", Image.open(seed).size, 0)  # the mask has the seed image's size
    canvas.paste(255, (16, 16, 40, 40))
    canvas.save(mask)
    requests = [
        request(seedImage=str(seed), strength=0.5),
        request(seedImage=str(seed), maskImage=str(mask), maskMargin=32),
        request(seedImage=str(seed), outpaint=IOutpaint(top=64, left=0), height=128),
        request(lora=[ILora(model="impasto:tiny-lora@1", weight=0.8)]),
        request(
            controlNet=[
                IControlNetGeneral(
                    model="impasto:tiny-controlnet@1",
                    guideImage=str(seed),
                    weight=0.7,
                    endStepPercentage=80,
                    # compat: its JSON encoder cannot send its own EControlMode enum.
                    controlMode="balanced",  # type: ignore[arg-type]
                )
            ]
        ),
        request(ipAdapters=[IIpAdapter(model="impasto:tiny-ip-adapter@1", guideImage=str(seed))]),
        request(embeddings=[IEmbedding(model="impasto:tiny-embedding@1")], clipSkip=1),
        request(positivePrompt="a (lighthouse:1.3)", promptWeighting="sdEmbeds"),
        request(
            model="impasto:tiny-xl@1",
            refiner=IRefiner(model="impasto:tiny-xl-refiner@1", startStepPercentage=60),
        ),
        request(
            steps=6,
            acceleratorOptions=IAcceleratorOptions(deepCache=True, deepCacheInterval=3),
        ),
        request(
            model="impasto:tiny-flux@1",
            steps=6,
            acceleratorOptions=IAcceleratorOptions(
                teaCache=True, teaCacheDistance=0.3, cacheMaxConsecutiveSteps=2
            ),
        ),
    ]

    async def scenario() -> list[list[IImage]]:
        client = await connected(server.settings.port)
        try:
            return [await client.imageInference(r) for r in requests]
        finally:
            await client.disconnect()

    results = asyncio.run(scenario())
    sizes = [(64, 64)] * len(requests)
    sizes[2] = (64, 128)
    for images, size in zip(results, sizes, strict=True):
        assert_images(items(images), 1, "URL", size)
