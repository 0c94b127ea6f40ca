"""The official JavaScript SDK, @runware/sdk-js 1.3.2 on Node 20, as a client of impasto,
unchanged. It speaks WebSocket only (to URL?sdk=js&version=1.3.2) and sends no deliveryMethod
unless asked, so its imageInference is a sync task streamed one image per frame.

It runs as `node tests/sdk/js/client.mjs`, installed by ./scripts/install (npm ci).
"""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import RunningServer
from tests.gated_backend import Gate, gated_server
from tests.integration.test_media_storage import assert_square_outline, data_uri, square_png
from tests.live import recorded_errors, task_status, wait_finished
from tests.sdk.clients import ClientProcess, assert_images, js_sdk_command, png_data_uri, run_client
from tests.sdk.tcp_proxy import TcpProxy

OUTPUT_TYPES = ("URL", "base64Data", "dataURI")


@pytest.fixture(scope="module")
def sdk() -> list[str]:
    return js_sdk_command()


@pytest.fixture(scope="module")
def gate() -> Gate:
    return Gate()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path, gate: Gate
) -> Iterator[RunningServer]:
    with gated_server(tmp_path_factory.mktemp("sdk-js"), tiny_models_dir, gate) as running:
        yield running


def ws_url(server: RunningServer) -> str:
    return f"ws://127.0.0.1:{server.settings.port}/v1"


def test_text_to_image_gives_two_distinct_images_in_every_output_type(
    server: RunningServer, sdk: list[str]
) -> None:
    tasks: list[dict[str, Any]] = [
        {"numberResults": 2, "outputType": output, "width": 128, "height": 64}
        for output in OUTPUT_TYPES
    ]
    results = run_client(sdk, ws_url(server), "generate", {"tasks": tasks})
    for task, images in zip(tasks, results, strict=True):
        assert_images(images, 2, task["outputType"], (128, 64))


def test_an_uploaded_image_is_a_reference_image_both_ways(
    server: RunningServer, sdk: list[str]
) -> None:
    args = {"image": png_data_uri(), "task": {"outputType": "URL"}}
    result = run_client(sdk, ws_url(server), "upload_reference", args)
    upload = result["upload"]
    assert upload["taskType"] == "imageUpload"
    assert upload["imageUUID"]
    assert upload["imageURL"].startswith("http://")
    assert_images(result["topLevel"], 1, "URL", (64, 64))
    assert_images(result["nested"], 1, "URL", (64, 64))


def test_media_storage_and_controlnet_preprocess_work_through_the_sdk(
    server: RunningServer, sdk: list[str]
) -> None:
    """mediaStorage() upload, controlNetPreProcess() of the mediaUUID (sent as the legacy
    imageControlNetPreProcess with deliveryMethod "async", then polled with getResponse every
    2 s), and mediaStorage() delete."""
    result = run_client(sdk, ws_url(server), "utilities", {"media": data_uri(square_png())})
    media = result["media"]
    assert (media["taskType"], media["operation"]) == ("mediaStorage", "upload")
    assert media["mediaURL"].startswith("http://")
    guide = result["guide"]
    assert (guide["taskType"], guide["status"], guide["cost"]) == (
        "imageControlNetPreProcess",
        "success",
        0,
    )
    assert guide["inputImageUUID"] == media["mediaUUID"]
    edges = Image.open(io.BytesIO(base64.b64decode(guide["guideImageBase64Data"])))
    assert (edges.format, edges.size) == ("PNG", (128, 96))
    assert_square_outline(edges)
    deleted = result["deleted"]
    assert (deleted["operation"], deleted["mediaUUID"]) == ("delete", media["mediaUUID"])
    assert httpx.get(media["mediaURL"], timeout=30).status_code == 404


def test_an_async_task_is_acknowledged_and_polled_with_get_response(
    server: RunningServer, sdk: list[str], gate: Gate
) -> None:
    """The SDK returns the ACK of an async task; getResponse() answers with every generation
    in one frame, and its pollForAsyncResults() polls that every 2 s to the images."""
    with gate.hold():
        client = ClientProcess(sdk, ws_url(server), "async", {"task": {"numberResults": 2}})
        try:
            gate.wait_held()
        finally:
            gate.release()
        result = client.result()
    [ack] = result["ack"]
    assert set(ack) == {"taskType", "taskUUID"}
    first = result["first"]
    assert len(first) == 2
    assert {item["taskUUID"] for item in first} == {ack["taskUUID"]}
    assert_images(result["images"], 2, "URL", (64, 64))
    assert {item["status"] for item in result["images"]} == {"success"}


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [("width", 13, "invalidWidth"), ("outputQuality", 5, "invalidOutputQuality")],
)
def test_an_invalid_parameter_rejects_with_our_error_code(
    server: RunningServer, sdk: list[str], field: str, value: int, code: str
) -> None:
    rejection = run_client(sdk, ws_url(server), "invalid", {"task": {field: value}})
    error = rejection["error"]
    assert error["code"] == code
    assert error["parameter"] == field
    assert error["taskType"] == "imageInference"
    assert error["taskUUID"]
    assert error["message"]


def test_a_task_cut_mid_generation_is_completed_by_the_sdks_retry_of_what_is_missing(
    server: RunningServer, sdk: list[str], gate: Gate
) -> None:
    """What recovery means for sdk-js: it does not resume sessions (it forgets its
    connectionSessionUUID on close) and does not resend in-flight work. It reconnects with a
    new session after 1 s and, once `timeoutDuration` passes without all images, sends a NEW
    task (new taskUUID) for the images still missing; the images it already had are kept.

    So the call returns all images, the first from the original task and the rest from the
    retry, while impasto finishes the original task too and keeps its undelivered images in
    the abandoned session (until the session TTL) and for getResponse. Set timeoutDuration
    above your longest generation, or the SDK also resends tasks that are merely slow."""
    # Long enough for the retry's image on a busy CPU, short enough for a test.
    args = {"task": {"numberResults": 2}, "timeoutDuration": 10_000}
    with (
        TcpProxy(server.settings.port) as proxy,
        gate.hold(passes=1),
        recorded_errors(server) as errors,
    ):
        client = ClientProcess(sdk, proxy.ws_url(), "drop", args)
        try:
            first = client.wait_event("partial")
            gate.wait_held()
            assert proxy.cut() == 1
            gate.release()
            result = client.result()
        finally:
            client.kill()
    images = result["images"]
    assert_images(images, 2, "URL", (64, 64))
    assert images[0]["imageUUID"] == first["images"][0]
    original, retry = images[0]["taskUUID"], images[1]["taskUUID"]
    assert original != retry
    assert errors == [], "nothing was sent twice with the same taskUUID"
    assert proxy.accepted == 2
    wait_finished(server, original)
    assert task_status(server, original) == "success"
    assert task_status(server, retry) == "success"


def test_image_modes_through_the_sdk(server: RunningServer, sdk: list[str]) -> None:
    """The fields sdk-js extracts for the image modes (seedImage, maskImage, strength,
    maskMargin, outpaint, lora, controlNet, ipAdapters, embeddings, clipSkip, promptWeighting,
    refiner) reach the server as sent."""

    def upload(image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        task = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": uri}
        return str(server.post([task]).json()["data"][0]["imageUUID"])

    seed = upload(Image.new("RGB", (64, 64), "teal"))
    mask_image = Image.new("L", (64, 64), 0)
    mask_image.paste(255, (16, 16, 48, 48))
    mask = upload(mask_image)
    tasks: list[dict[str, Any]] = [
        {"seedImage": seed, "strength": 0.5},
        {"seedImage": seed, "maskImage": mask, "maskMargin": 32},
        {"seedImage": seed, "outpaint": {"right": 64}, "width": 128},
        {"lora": [{"model": "impasto:tiny-lora@1", "weight": 1}]},
        {
            "controlNet": [
                {
                    "model": "impasto:tiny-controlnet@1",
                    "guideImage": seed,
                    "controlMode": "balanced",
                }
            ]
        },
        {"ipAdapters": [{"model": "impasto:tiny-ip-adapter@1", "guideImage": seed}]},
        {"embeddings": [{"model": "impasto:tiny-embedding@1"}], "clipSkip": 2},
        {"positivePrompt": "a (lighthouse)1.4", "promptWeighting": "compel"},
        {"model": "impasto:tiny-xl@1", "refiner": {"model": "impasto:tiny-xl-refiner@1"}},
    ]
    results = run_client(sdk, ws_url(server), "generate", {"tasks": tasks}, 300)
    for task, images in zip(tasks, results, strict=True):
        assert_images(images, 1, "URL", (task.get("width", 64), 64))
