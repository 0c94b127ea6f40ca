"""The utility tasks (upscale, background removal, caption, prompt enhance) through each official
SDK's own call for them, unchanged, end to end against a real server running the offline tiny
models (random weights: the pictures and texts are noise, their shapes are real):

- runware 0.5.24 (legacy, WebSocket, in this process): imageUpscale, imageBackgroundRemoval
  (its settings go flat at the task's top level), imageCaption, promptEnhance;
- runware-sdk 1.8.0 (its own virtualenv, tests/sdk/python_new_utility_client.py): run() of
  upscale / removeBackground / caption / promptEnhance, over WebSocket and REST;
- @runware/sdk-js 1.3.2 (Node, tests/sdk/js/utility_client.mjs): upscale/upscaleGan,
  removeBackground, caption/requestImageToText, enhancePrompt/promptEnhance.

Each image result is decoded and measured; the upscale of a generated image's imageUUID checks
that a task's output chains into the next through each SDK.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import LoopbackHTTP, RunningServer, make_settings, start_server
from tests.live import wait_finished, wait_until
from tests.sdk.clients import (
    JS_DIR,
    SDK_DIR,
    assert_images,
    image_of,
    js_sdk_command,
    new_sdk_command,
    run_client,
)

os.environ.setdefault("RUNWARE_VIDEO_INITIAL_TIMEOUT", "2000")

try:
    # After the environment: the SDK reads it at import (see test_sdk_runware_legacy.py).
    import runware.base
    from runware import (
        IAsyncTaskResponse,
        IBackgroundRemovalSettings,
        IImageBackgroundRemoval,
        IImageCaption,
        IImageInference,
        IImageUpscale,
        IInputs,
        IPromptEnhance,
        Runware,
        RunwareAPIError,
    )
except ImportError as missing:
    pytest.fail(
        f"runware 0.5.24 is not installed in .venv ({missing}): run ./scripts/install",
        pytrace=False,
    )

UPSCALER = "impasto:tiny-upscaler@1"  # Swin2SR x4: the server's default upscaler here
UPSCALER_X2 = "impasto:tiny-upscaler@2"
SOURCE_SIZE = (32, 24)
PROMPT = "a lighthouse on a cliff at dusk"
PROMPT_MAX_LENGTH = 64
PROMPT_VERSIONS = 3
# The background showing through where the cut-out is transparent: blue, half opaque.
BACKGROUND = [0, 0, 255, 128]
TRANSPORTS = ("websocket", "rest")


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[RunningServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("sdk-utility"),
        tiny_models_dir,
        upscale_model=UPSCALER,
        remove_background_model="impasto:tiny-segmenter@1",
        caption_model="impasto:tiny-captioner@1",
        prompt_enhance_model="impasto:tiny-enhancer@1",
    )
    running = start_server(settings)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def new_sdk() -> list[str]:
    python = new_sdk_command()[0]
    return [python, str(SDK_DIR / "python_new_utility_client.py")]


@pytest.fixture(scope="module")
def js_sdk() -> list[str]:
    node = js_sdk_command()[0]
    return [node, str(JS_DIR / "utility_client.mjs")]


def source_png(size: tuple[int, int] = SOURCE_SIZE) -> bytes:
    """A small picture with structure (a gradient and a square), not one flat colour."""
    width, height = size
    image = Image.new("RGB", size)
    image.putdata(
        [(x * 255 // width, y * 255 // height, 128) for y in range(height) for x in range(width)]
    )
    image.paste((250, 250, 250), (width // 4, height // 4, width // 2, height // 2))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def source_uri() -> str:
    return "data:image/png;base64," + base64.b64encode(source_png()).decode()


def scaled(factor: int) -> tuple[int, int]:
    return SOURCE_SIZE[0] * factor, SOURCE_SIZE[1] * factor


def decoded(item: dict[str, Any], output_type: str = "base64Data") -> Image.Image:
    return image_of(item, output_type)


def assert_cutout(image: Image.Image, background: list[int] | None = None) -> None:
    """A PNG cut-out of the source: its alpha channel carries the (noise-like) mask."""
    assert image.format == "PNG"
    assert image.mode == "RGBA"
    assert image.size == SOURCE_SIZE
    alpha = image.getchannel("A")
    low, high = alpha.getextrema()
    assert low < high, "the alpha channel is one value: no mask was applied"
    if background is None:
        assert low < 255
        # The subject itself is the source, untouched (PNG is lossless).
        source = Image.open(io.BytesIO(source_png())).convert("RGB")
        assert image.convert("RGB").tobytes() == source.tobytes()
    else:
        # The background's own alpha shows through wherever the subject is transparent.
        assert low >= background[3] - 1, (low, background)


def assert_mask(image: Image.Image) -> None:
    """returnOnlyMask: a greyscale mask the input's size, not a cut-out."""
    assert image.size == SOURCE_SIZE
    red, green, blue = image.convert("RGB").split()
    assert red.tobytes() == green.tobytes() == blue.tobytes(), "a mask is grey"


def assert_versions(texts: list[str], count: int | None = PROMPT_VERSIONS) -> None:
    if count is not None:
        assert len(texts) == count, texts
    assert texts
    for text in texts:
        assert isinstance(text, str)
        assert text.strip()
        assert len(text) <= PROMPT_MAX_LENGTH, (len(text), text)


def assert_cost(item: dict[str, Any]) -> None:
    assert isinstance(item.get("cost"), (int, float)), item.keys()
    assert item["cost"] >= 0


def without_none(value: Any) -> dict[str, Any]:
    return {k: v for k, v in asdict(value).items() if v is not None}


def url_for(server: RunningServer, transport: str) -> str:
    port = server.settings.port
    return f"ws://127.0.0.1:{port}/v1" if transport == "websocket" else server.url


def ws_url(server: RunningServer) -> str:
    return f"ws://127.0.0.1:{server.settings.port}/v1"


# ------------------------------------------------------------------ runware 0.5.24 (legacy)


def legacy(server: RunningServer, calls: Any) -> Any:
    """Run `calls(client)` with a connected legacy client, then disconnect."""

    async def scenario() -> Any:
        client = Runware(api_key="k", url=ws_url(server))
        await client.connect()
        try:
            return await calls(client)
        finally:
            await client.disconnect()

    return asyncio.run(scenario())


def test_legacy_image_upscale_by_2_and_4_in_every_output_type(
    server: RunningServer, tmp_path: Path
) -> None:
    """inputImage as a data URI (sent as is), as a local file (the SDK uploads it first, then
    sends its imageUUID) and as inputs.image; the server's default upscaler and a named one."""
    path = tmp_path / "source.png"
    path.write_bytes(source_png())
    requests = [
        IImageUpscale(inputImage=source_uri(), upscaleFactor=2, outputType="base64Data"),
        IImageUpscale(inputImage=str(path), upscaleFactor=4, outputType="URL", includeCost=True),
        IImageUpscale(
            inputs=IInputs(image=source_uri()),
            upscaleFactor=2,
            model=UPSCALER_X2,
            outputType="dataURI",
            outputFormat="PNG",
        ),
    ]

    async def calls(client: Runware) -> list[Any]:
        return [await client.imageUpscale(request) for request in requests]

    results = legacy(server, calls)
    for request, images in zip(requests, results, strict=True):
        items = [without_none(image) for image in images]
        assert_images(items, 1, request.outputType, scaled(int(request.upscaleFactor)))
        assert items[0]["taskType"] == "imageUpscale"
    assert_cost(without_none(results[1][0]))
    assert decoded(without_none(results[2][0]), "dataURI").format == "PNG"


def test_legacy_async_image_upscale_is_acknowledged_then_polled(server: RunningServer) -> None:
    async def calls(client: Runware) -> tuple[Any, Any]:
        ack = await client.imageUpscale(
            IImageUpscale(
                inputImage=source_uri(),
                upscaleFactor=4,
                outputType="base64Data",
                deliveryMethod="async",
            )
        )
        assert isinstance(ack, IAsyncTaskResponse), ack
        # Polled once done: a poll that finds the task running costs this SDK its poll
        # timeout plus a 3 s delay (see test_sdk_runware_legacy.py).
        await asyncio.to_thread(wait_finished, server, ack.taskUUID)
        return ack, await client.getResponse(ack.taskUUID)

    ack, images = legacy(server, calls)
    assert ack.taskType == "imageUpscale"
    items = [without_none(image) for image in images]
    assert_images(items, 1, "base64Data", scaled(4))
    assert items[0]["taskUUID"] == ack.taskUUID
    assert items[0]["status"] == "success"


def test_legacy_upscale_of_a_generated_image_by_its_uuid(server: RunningServer) -> None:
    async def calls(client: Runware) -> tuple[Any, Any]:
        generated = await client.imageInference(
            IImageInference(model="impasto:tiny@1", positivePrompt=PROMPT, width=64, height=64)
        )
        upscaled = await client.imageUpscale(
            IImageUpscale(
                inputImage=generated[0].imageUUID, upscaleFactor=2, outputType="base64Data"
            )
        )
        return generated, upscaled

    generated, upscaled = legacy(server, calls)
    [item] = [without_none(image) for image in upscaled]
    assert_images([item], 1, "base64Data", (128, 128))
    assert item["imageUUID"] != generated[0].imageUUID


def test_legacy_background_removal_with_its_flat_settings(server: RunningServer) -> None:
    """runware 0.5.24 spreads IBackgroundRemovalSettings over the task's top level."""
    common: dict[str, Any] = {"outputType": "base64Data", "outputFormat": "PNG"}
    requests = [
        IImageBackgroundRemoval(inputImage=source_uri(), includeCost=True, **common),
        IImageBackgroundRemoval(
            inputImage=source_uri(),
            settings=IBackgroundRemovalSettings(rgba=BACKGROUND, postProcessMask=True),
            **common,
        ),
        IImageBackgroundRemoval(
            inputImage=source_uri(),
            settings=IBackgroundRemovalSettings(returnOnlyMask=True),
            **common,
        ),
    ]

    async def calls(client: Runware) -> list[Any]:
        return [await client.imageBackgroundRemoval(request) for request in requests]

    plain, coloured, mask = [
        [without_none(image) for image in images] for images in legacy(server, calls)
    ]
    for items in (plain, coloured, mask):
        assert_images(items, 1, "base64Data", SOURCE_SIZE)
        assert items[0]["taskType"] == "imageBackgroundRemoval"
    assert_cost(plain[0])
    assert_cutout(decoded(plain[0]))
    assert_cutout(decoded(coloured[0]), BACKGROUND)
    assert_mask(decoded(mask[0]))


def test_legacy_image_caption_and_prompt_enhance(server: RunningServer) -> None:
    async def calls(client: Runware) -> tuple[Any, Any]:
        caption = await client.imageCaption(
            IImageCaption(inputImage=source_uri(), includeCost=True)
        )
        prompts = await client.promptEnhance(
            IPromptEnhance(
                prompt=PROMPT,
                promptMaxLength=PROMPT_MAX_LENGTH,
                promptVersions=PROMPT_VERSIONS,
                includeCost=True,
            )
        )
        return caption, prompts

    caption, prompts = legacy(server, calls)
    assert caption.taskType.value == "imageCaption"
    assert isinstance(caption.text, str)
    assert caption.text.strip()
    assert isinstance(caption.cost, float)
    # It waits for promptVersions items, then returns them as a set: repeats collapse.
    assert_versions([prompt.text for prompt in prompts], count=None)
    assert len(prompts) <= PROMPT_VERSIONS
    assert {prompt.taskType.value for prompt in prompts} == {"promptEnhance"}
    assert all(isinstance(prompt.cost, float) for prompt in prompts)


def test_legacy_webhook_upscale_and_caption_are_acknowledged_then_posted(
    server: RunningServer, loopback_http: LoopbackHTTP
) -> None:
    loopback_http.routes["/hook"] = (200, "text/plain", b"ok")
    hook = loopback_http.url("/hook")

    async def calls(client: Runware) -> tuple[Any, Any]:
        upscale = await client.imageUpscale(
            IImageUpscale(
                inputImage=source_uri(), upscaleFactor=2, outputType="base64Data", webhookURL=hook
            )
        )
        caption = await client.imageCaption(IImageCaption(inputImage=source_uri(), webhookURL=hook))
        return upscale, caption

    upscale, caption = legacy(server, calls)
    assert isinstance(upscale, IAsyncTaskResponse)
    assert isinstance(caption, IAsyncTaskResponse)

    def posted() -> dict[str, dict[str, Any]]:
        items = [
            json.loads(request.body)["data"][0]
            for request in list(loopback_http.requests)
            if request.method == "POST"
        ]
        return {item["taskUUID"]: item for item in items}

    wait_until(lambda: {upscale.taskUUID, caption.taskUUID} <= set(posted()), what="webhooks")
    items = posted()
    assert_images([items[upscale.taskUUID]], 1, "base64Data", scaled(2))
    assert items[upscale.taskUUID]["taskType"] == "imageUpscale"
    assert items[caption.taskUUID]["taskType"] == "imageCaption"
    assert items[caption.taskUUID]["text"].strip()


def test_legacy_upscale_factor_out_of_range_raises_with_the_parameter(
    server: RunningServer,
) -> None:
    async def calls(client: Runware) -> RunwareAPIError:
        with pytest.raises(RunwareAPIError) as raised:
            await client.imageUpscale(IImageUpscale(inputImage=source_uri(), upscaleFactor=8))
        return raised.value

    error = legacy(server, calls)
    assert error.code == "invalidUpscaleFactor"
    assert error.error_data["parameter"] == "upscaleFactor"
    assert error.error_data["taskType"] == "imageUpscale"


def test_legacy_polling_timeout_setting_took_effect() -> None:
    assert runware.base.VIDEO_INITIAL_TIMEOUT == 2000


# ------------------------------------------------------------------ runware-sdk 1.8.0


def new_run(
    sdk: list[str], server: RunningServer, transport: str, tasks: list[dict[str, Any]], **args: Any
) -> list[dict[str, Any]]:
    return run_client(sdk, url_for(server, transport), "run", {"tasks": tasks, **args})


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_new_sdk_upscale_by_2_and_4(
    server: RunningServer, new_sdk: list[str], transport: str
) -> None:
    """run() sync and (its default) async, the default upscaler and a named one."""
    tasks: list[dict[str, Any]] = [
        {
            "taskType": "upscale",
            "model": UPSCALER_X2,
            "inputs": {"image": source_uri()},
            "upscaleFactor": 2,
            "outputType": "base64Data",
            "deliveryMethod": "sync",
        },
        {
            "taskType": "upscale",
            "inputs": {"image": source_uri()},
            "upscaleFactor": 4,
            "outputType": "dataURI",
            "includeCost": True,
        },
    ]
    sync, polled = new_run(new_sdk, server, transport, tasks)
    assert_images(sync["items"], 1, "base64Data", scaled(2))
    assert_images(polled["items"], 1, "dataURI", scaled(4))
    for result in (sync, polled):
        assert result["items"][0]["taskType"] == "upscale"
        assert result["items"][0]["taskUUID"] == result["taskUUID"]
    assert_cost(polled["items"][0])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_new_sdk_remove_background_with_nested_settings(
    server: RunningServer, new_sdk: list[str], transport: str
) -> None:
    base: dict[str, Any] = {
        "taskType": "removeBackground",
        "inputs": {"image": source_uri()},
        "outputType": "base64Data",
    }
    tasks = [
        {**base, "deliveryMethod": "sync"},  # PNG by default
        {**base, "outputFormat": "PNG", "settings": {"rgba": BACKGROUND}},
        {**base, "outputFormat": "PNG", "settings": {"returnOnlyMask": True}},
    ]
    plain, coloured, mask = new_run(new_sdk, server, transport, tasks)
    for result in (plain, coloured, mask):
        assert_images(result["items"], 1, "base64Data", SOURCE_SIZE)
        assert result["items"][0]["taskType"] == "removeBackground"
    assert_cutout(decoded(plain["items"][0]))
    assert_cutout(decoded(coloured["items"][0]), BACKGROUND)
    assert_mask(decoded(mask["items"][0]))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_new_sdk_caption_and_prompt_enhance(
    server: RunningServer, new_sdk: list[str], transport: str
) -> None:
    """The texts. The SDK keys a result it cannot tell apart by its taskUUID, so run() returns
    one of promptEnhance's versions (all, over REST sync, where it returns the reply as is);
    every version is on the wire, and no model is named: the server's defaults run."""
    enhance: dict[str, Any] = {
        "taskType": "promptEnhance",
        "prompt": PROMPT,
        "promptMaxLength": PROMPT_MAX_LENGTH,
        "promptVersions": PROMPT_VERSIONS,
    }
    tasks = [
        {
            "taskType": "caption",
            "inputs": {"image": source_uri()},
            "includeCost": True,
            "deliveryMethod": "sync",
        },
        {"taskType": "caption", "inputs": {"image": source_uri()}},
        {**enhance, "deliveryMethod": "sync"},
        {**enhance, "includeCost": True},
    ]
    captions, polled_caption, enhanced, polled_enhanced = new_run(new_sdk, server, transport, tasks)
    for result in (captions, polled_caption):
        [item] = result["items"]
        assert item["taskType"] == "caption"
        assert item["taskUUID"] == result["taskUUID"]
        assert item["text"].strip()
    assert_cost(captions["items"][0])
    for result in (enhanced, polled_enhanced):
        assert {item["taskType"] for item in result["items"]} == {"promptEnhance"}
        assert_versions([item["text"] for item in result["items"]], count=None)
        assert_versions([item["text"] for item in result["wire"]])
    if transport == "rest":
        assert_versions([item["text"] for item in enhanced["items"]])
    assert all("cost" in item for item in polled_enhanced["wire"])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_new_sdk_upscale_of_a_generated_image_by_its_uuid(
    server: RunningServer, new_sdk: list[str], transport: str
) -> None:
    args = {
        "task": {"deliveryMethod": "sync"},
        "upscale": {"upscaleFactor": 2, "outputType": "base64Data"},
    }
    result = run_client(new_sdk, url_for(server, transport), "chain", args)
    assert_images(result["upscaled"], 1, "base64Data", (128, 128))
    assert result["upscaled"][0]["imageUUID"] != result["generated"][0]["imageUUID"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_new_sdk_upscale_factor_out_of_range_is_a_runware_error(
    server: RunningServer, new_sdk: list[str], transport: str
) -> None:
    task = {
        "taskType": "upscale",
        "inputs": {"image": source_uri()},
        "upscaleFactor": 8,
        "deliveryMethod": "sync",
    }
    error = run_client(new_sdk, url_for(server, transport), "expect_error", {"task": task})
    # runware-sdk maps the server's code to its category; the raw code is in its WebSocket log.
    assert (error["code"], error["parameter"]) == ("validation", "upscaleFactor")
    if transport == "websocket":
        assert error["wire_codes"] == ["invalidUpscaleFactor"]
    else:
        assert error["status_code"] == 400


# ------------------------------------------------------------------ @runware/sdk-js 1.3.2


def js_calls(
    sdk: list[str], server: RunningServer, scenario: str, calls: list[dict[str, Any]]
) -> list[Any]:
    return run_client(sdk, ws_url(server), scenario, {"calls": calls})


def test_js_upscale_and_upscale_gan(server: RunningServer, js_sdk: list[str]) -> None:
    calls = [
        {"params": {"inputImage": source_uri(), "upscaleFactor": 2, "outputType": "base64Data"}},
        {
            "method": "upscaleGan",
            "params": {
                "inputImage": source_uri(),
                "upscaleFactor": 4,
                "outputType": "URL",
                "includeCost": True,
            },
        },
        {
            "params": {
                "inputImage": source_uri(),
                "model": UPSCALER_X2,
                "upscaleFactor": 2,
                "outputType": "dataURI",
                "deliveryMethod": "async",
            }
        },
    ]
    by_2, by_4, polled = js_calls(js_sdk, server, "upscale", calls)
    assert_images([by_2], 1, "base64Data", scaled(2))
    assert_images([by_4], 1, "URL", scaled(4))
    assert_images([polled], 1, "dataURI", scaled(2))
    assert {item["taskType"] for item in (by_2, by_4, polled)} == {"upscale"}
    assert_cost(by_4)
    assert polled["status"] == "success"


def test_js_remove_background(server: RunningServer, js_sdk: list[str]) -> None:
    base = {"inputImage": source_uri(), "outputType": "base64Data"}
    calls = [
        {"params": {**base, "includeCost": True}},
        {
            "method": "removeImageBackground",
            "params": {**base, "outputFormat": "PNG", "settings": {"rgba": BACKGROUND}},
        },
        {"params": {**base, "settings": {"returnOnlyMask": True}, "deliveryMethod": "async"}},
    ]
    plain, coloured, mask = js_calls(js_sdk, server, "removeBackground", calls)
    for item in (plain, coloured, mask):
        assert_images([item], 1, "base64Data", SOURCE_SIZE)
        assert item["taskType"] == "removeBackground"
    assert_cost(plain)
    assert_cutout(decoded(plain))
    assert_cutout(decoded(coloured), BACKGROUND)
    assert_mask(decoded(mask))


def test_js_caption_and_request_image_to_text(server: RunningServer, js_sdk: list[str]) -> None:
    calls = [
        {"params": {"inputImage": source_uri(), "includeCost": True}},
        # It does not send deliveryMethod (the task runs sync), then polls getResponse anyway.
        {
            "method": "requestImageToText",
            "params": {"inputImage": source_uri(), "deliveryMethod": "async"},
        },
    ]
    captions = js_calls(js_sdk, server, "caption", calls)
    for item in captions:
        assert item["taskType"] == "caption"
        assert item["text"].strip()
    assert_cost(captions[0])
    assert captions[1]["status"] == "success"


def test_js_enhance_prompt_without_a_model(server: RunningServer, js_sdk: list[str]) -> None:
    params = {
        "prompt": PROMPT,
        "promptMaxLength": PROMPT_MAX_LENGTH,
        "promptVersions": PROMPT_VERSIONS,
    }
    calls = [
        {"params": params},
        {"method": "promptEnhance", "params": {**params, "includeCost": True}},
    ]
    plain, costed = js_calls(js_sdk, server, "enhancePrompt", calls)
    for items in (plain, costed):
        assert {item["taskType"] for item in items} == {"promptEnhance"}
        assert len({item["taskUUID"] for item in items}) == 1
        assert_versions([item["text"] for item in items])
    for item in costed:
        assert_cost(item)


def test_js_upscale_of_a_generated_image_by_its_uuid(
    server: RunningServer, js_sdk: list[str]
) -> None:
    args = {"upscale": {"upscaleFactor": 2, "outputType": "base64Data"}}
    result = run_client(js_sdk, ws_url(server), "chain", args)
    assert_images([result["upscaled"]], 1, "base64Data", (128, 128))
    assert result["upscaled"]["imageUUID"] != result["generated"][0]["imageUUID"]


def test_js_upscale_factor_out_of_range_is_rejected(
    server: RunningServer, js_sdk: list[str]
) -> None:
    args = {"method": "upscale", "params": {"inputImage": source_uri(), "upscaleFactor": 8}}
    rejection = run_client(js_sdk, ws_url(server), "invalid", args)
    assert rejection["error"]["code"] == "invalidUpscaleFactor"
    assert rejection["error"]["parameter"] == "upscaleFactor"
    assert rejection["error"]["taskType"] == "upscale"
    assert uuid.UUID(rejection["error"]["taskUUID"])
