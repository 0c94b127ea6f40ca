"""mediaStorage (upload and delete) and ControlNet preprocessing (imageControlNetPreProcess and
controlNetPreprocess) against one real server, over REST and over the WebSocket: the stored
images are served and work as image inputs of later tasks, deleted media is gone everywhere,
guides are the edges of what was sent, and bad tasks get error items naming the parameter."""

from __future__ import annotations

import asyncio
import base64
import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw
from websockets.asyncio.client import connect

from impasto.protocol.utility import PREPROCESSORS
from tests.conftest import (
    LoopbackHTTP,
    RunningServer,
    image_bytes,
    make_settings,
    start_server,
    tiny_task,
)
from tests.integration.test_websocket import authenticate, recv, send

# A white square, 32..95 x 24..71, on black: its Canny guide is its outline.
SQUARE = (32, 24, 95, 71)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[RunningServer]:
    running = start_server(make_settings(tmp_path_factory.mktemp("media"), tiny_models_dir))
    yield running
    running.stop()


def square_png() -> bytes:
    image = Image.new("RGB", (128, 96), "black")
    ImageDraw.Draw(image).rectangle(SQUARE, fill="white")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def media_task(operation: str = "upload", **fields: Any) -> dict[str, Any]:
    return {
        "taskType": "mediaStorage",
        "taskUUID": str(uuid.uuid4()),
        "operation": operation,
        **fields,
    }


def legacy_task(**fields: Any) -> dict[str, Any]:
    return {
        "taskType": "imageControlNetPreProcess",
        "taskUUID": str(uuid.uuid4()),
        "inputImage": data_uri(square_png()),
        "preProcessorType": "canny",
        **fields,
    }


def new_task(image: str, **fields: Any) -> dict[str, Any]:
    return {
        "taskType": "controlNetPreprocess",
        "taskUUID": str(uuid.uuid4()),
        "model": "runware:controlnet-preprocess@canny",
        "inputs": {"image": image},
        **fields,
    }


def only_item(server: RunningServer, task: dict[str, Any]) -> dict[str, Any]:
    response = server.post([task])
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    (item,) = body["data"]
    assert item["taskUUID"] == task["taskUUID"]
    return dict(item)


def only_error(server: RunningServer, task: dict[str, Any]) -> dict[str, Any]:
    response = server.post([task])
    assert response.status_code == 400, response.text
    assert "Traceback" not in response.text
    body = response.json()
    assert "data" not in body
    (error,) = body["errors"]
    assert error["taskType"] == task["taskType"]
    assert error["taskUUID"] == task["taskUUID"]
    return dict(error)


def fetched(url: str) -> tuple[httpx.Response, Image.Image]:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return response, image


def decoded(item: dict[str, Any]) -> Image.Image:
    if "guideImageBase64Data" in item:
        data = base64.b64decode(item["guideImageBase64Data"], validate=True)
    elif "guideImageDataURI" in item:
        header, _, encoded = item["guideImageDataURI"].partition(",")
        assert header.startswith("data:image/"), header
        assert header.endswith(";base64"), header
        data = base64.b64decode(encoded, validate=True)
    else:
        data = fetched(item["guideImageURL"])[0].content
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def assert_square_outline(guide: Image.Image) -> None:
    edges = np.asarray(guide.convert("L")) > 127
    left, top, right, bottom = SQUARE
    assert edges[top - 2 : top + 3, left + 2 : right - 1].any(axis=0).all()
    assert edges[top + 2 : bottom - 1, right - 2 : right + 3].any(axis=1).all()
    assert not edges[top + 3 : bottom - 2, left + 3 : right - 2].any()
    assert not edges[bottom + 4 :].any()


# -- mediaStorage ------------------------------------------------------------------------------


def test_uploaded_media_and_guide_images_are_served_and_work_as_reference_images(
    server: RunningServer,
) -> None:
    original = image_bytes((64, 48), "PNG", "green")
    upload = media_task(media=data_uri(original))

    item = only_item(server, upload)

    assert set(item) == {"taskType", "taskUUID", "operation", "mediaUUID", "mediaURL"}
    assert (item["taskType"], item["operation"]) == ("mediaStorage", "upload")
    assert item["mediaUUID"] in item["mediaURL"]
    served, _ = fetched(item["mediaURL"])
    assert served.content == original
    polled = server.post([{"taskType": "getResponse", "taskUUID": upload["taskUUID"]}])
    assert polled.json()["data"] == [{**item, "status": "success"}]

    guide = only_item(server, new_task(item["mediaUUID"]))
    assert guide["inputImageUUID"] == item["mediaUUID"]

    generation = tiny_task(referenceImages=[item["mediaUUID"], guide["guideImageUUID"]])
    response = server.post([generation])
    assert response.status_code == 200, response.text
    (image,) = response.json()["data"]
    assert image["imageUUID"]


def test_media_upload_takes_raw_base64_and_urls(
    server: RunningServer, loopback_http: LoopbackHTTP
) -> None:
    loopback_http.routes["/photo.webp"] = (200, "image/webp", image_bytes((50, 70), "WEBP"))
    from_base64 = only_item(
        server, media_task(media=base64.b64encode(image_bytes((40, 30), "JPEG")).decode())
    )
    from_url = only_item(server, media_task(media=loopback_http.url("/photo.webp")))

    assert [r.path for r in loopback_http.requests] == ["/photo.webp"]
    served, image = fetched(from_base64["mediaURL"])
    assert (served.headers["content-type"], image.size) == ("image/jpeg", (40, 30))
    served, image = fetched(from_url["mediaURL"])
    assert (served.headers["content-type"], image.size) == ("image/webp", (50, 70))


def test_deleted_media_is_gone_everywhere(server: RunningServer) -> None:
    media_uuid = only_item(server, media_task(media=data_uri(image_bytes())))["mediaUUID"]
    # An upload of one of our UUIDs stores a copy of that image.
    copy = only_item(server, media_task(media=media_uuid))
    copy_uuid, url = copy["mediaUUID"], copy["mediaURL"]
    assert copy_uuid != media_uuid
    delete = media_task("delete", mediaUUID=copy_uuid)

    assert only_item(server, delete) == {
        "taskType": "mediaStorage",
        "taskUUID": delete["taskUUID"],
        "operation": "delete",
        "mediaUUID": copy_uuid,
    }

    assert httpx.get(url, timeout=30).status_code == 404
    generation = tiny_task(referenceImages=[copy_uuid])
    response = server.post([generation])
    assert response.status_code == 400, response.text
    (error,) = response.json()["errors"]
    assert (error["code"], error["parameter"]) == ("invalidReferenceImages", "referenceImages[0]")
    again = only_error(server, media_task("delete", mediaUUID=copy_uuid))
    assert (again["code"], again["parameter"]) == ("invalidMediaUUID", "mediaUUID")
    # The upload it was copied from is untouched.
    assert only_item(server, new_task(media_uuid))["inputImageUUID"] == media_uuid


def test_a_guide_image_is_not_media_that_delete_removes(server: RunningServer) -> None:
    guide = only_item(server, legacy_task())
    error = only_error(server, media_task("delete", mediaUUID=guide["guideImageUUID"]))
    assert error["code"] == "invalidMediaUUID"
    assert "not uploaded media" in error["message"]
    assert fetched(guide["guideImageURL"])[1].size == (128, 96)
    # The stored input is an upload: that one may be deleted.
    only_item(server, media_task("delete", mediaUUID=guide["inputImageUUID"]))


@pytest.mark.parametrize(
    ("fields", "code", "parameter"),
    [
        ({"media": data_uri(b"not an image at all")}, "invalidMedia", "media"),
        ({"media": "!!! not base64 !!!"}, "invalidMedia", "media"),
        ({}, "missingMedia", "media"),
        ({"operation": "copy"}, "invalidOperation", "operation"),
        ({"operation": "delete"}, "missingMediaUUID", "mediaUUID"),
        ({"operation": "delete", "mediaUUID": "12345"}, "invalidMediaUUID", "mediaUUID"),
        (
            {"operation": "delete", "mediaUUID": str(uuid.uuid4())},
            "invalidMediaUUID",
            "mediaUUID",
        ),
    ],
    ids=[
        "not-an-image",
        "bad-base64",
        "no-media",
        "bad-operation",
        "delete-without-uuid",
        "delete-of-a-non-uuid",
        "delete-of-unknown",
    ],
)
def test_a_bad_media_storage_task_is_an_error_naming_its_parameter(
    server: RunningServer, fields: dict[str, Any], code: str, parameter: str
) -> None:
    error = only_error(server, {**media_task(), **fields})
    assert (error["code"], error["parameter"]) == (code, parameter)


# -- ControlNet preprocessing -------------------------------------------------------------------


def test_legacy_canny_guide_is_the_outline_of_the_input(server: RunningServer) -> None:
    task = legacy_task(outputType="base64Data", outputFormat="PNG", includeCost=True)

    item = only_item(server, task)

    assert set(item) == {
        "taskType",
        "taskUUID",
        "guideImageUUID",
        "inputImageUUID",
        "guideImageBase64Data",
        "cost",
    }
    assert (item["taskType"], item["cost"]) == ("imageControlNetPreProcess", 0)
    guide = decoded(item)
    assert (guide.format, guide.size) == ("PNG", (128, 96))
    assert_square_outline(guide)
    # The input is stored as an upload: a new UUID, served, and usable as an input.
    assert item["inputImageUUID"] != item["guideImageUUID"]
    again = only_item(server, legacy_task(inputImage=item["inputImageUUID"]))
    assert again["inputImageUUID"] == item["inputImageUUID"]


def test_width_and_height_size_the_guide(server: RunningServer) -> None:
    both = only_item(server, legacy_task(width=64, height=40, outputType="dataURI"))
    one = only_item(server, legacy_task(width=64, outputFormat="WEBP", outputType="dataURI"))

    assert both["guideImageDataURI"].startswith("data:image/jpeg;base64,")
    assert decoded(both).size == (64, 40)
    assert one["guideImageDataURI"].startswith("data:image/webp;base64,")
    assert decoded(one).size == (64, 48)


def test_thresholds_in_settings_decide_the_edges(server: RunningServer) -> None:
    faint = Image.new("RGB", (128, 96), (100, 100, 100))
    ImageDraw.Draw(faint).rectangle(SQUARE, fill=(120, 120, 120))
    buffer = io.BytesIO()
    faint.save(buffer, format="PNG")
    image = data_uri(buffer.getvalue())
    low = {"lowThresholdCanny": 10, "highThresholdCanny": 50}

    default = decoded(only_item(server, new_task(image, outputFormat="PNG")))
    sensitive = decoded(only_item(server, new_task(image, outputFormat="PNG", settings=low)))

    assert not (np.asarray(default) > 127).any()
    assert_square_outline(sensitive)


def test_each_preprocessor_runs_and_an_async_task_is_acked_then_polled(
    server: RunningServer,
) -> None:
    for name in PREPROCESSORS:
        item = only_item(server, legacy_task(preProcessorType=name, width=48, height=32))
        assert fetched(item["guideImageURL"])[1].size == (48, 32), name
    task = new_task(data_uri(square_png()), deliveryMethod="async", outputType="base64Data")

    assert only_item(server, task) == {
        "taskType": "controlNetPreprocess",
        "taskUUID": task["taskUUID"],
    }

    polled = server.post([{"taskType": "getResponse", "taskUUID": task["taskUUID"]}])
    (result,) = polled.json()["data"]
    assert result["status"] == "success"
    assert_square_outline(decoded(result))


@pytest.mark.parametrize(
    ("task", "code", "parameter"),
    [
        (legacy_task(preProcessorType="sobel"), "invalidPreProcessorType", "preProcessorType"),
        (legacy_task(preProcessorType="depth"), "unsupportedParameter", "preProcessorType"),
        (
            {k: v for k, v in legacy_task().items() if k != "inputImage"},
            "missingInputImage",
            "inputImage",
        ),
        (legacy_task(inputImage="!!! not base64 !!!"), "invalidInputImage", "inputImage"),
        (legacy_task(inputImage=str(uuid.uuid4())), "invalidInputImage", "inputImage"),
        (new_task(str(uuid.uuid4())), "invalidImage", "inputs.image"),
        (new_task("iVBORw0KGgo=", model="runware:100@1"), "invalidModel", "model"),
        (
            new_task("iVBORw0KGgo=", model="runware:controlnet-preprocess@openpose"),
            "unsupportedParameter",
            "model",
        ),
    ],
    ids=[
        "unknown-preprocessor",
        "preprocessor-needing-weights",
        "missing-input-image",
        "bad-base64",
        "unknown-uuid",
        "unknown-uuid-in-inputs",
        "not-a-preprocessor-air",
        "air-needing-weights",
    ],
)
def test_a_bad_preprocess_task_is_an_error_naming_its_parameter(
    server: RunningServer, task: dict[str, Any], code: str, parameter: str
) -> None:
    error = only_error(server, task)
    assert (error["code"], error["parameter"]) == (code, parameter)
    if code.endswith("PreProcessorType") or code == "unsupportedParameter":
        assert "canny" in error["message"]


# -- WebSocket --------------------------------------------------------------------------------


def test_both_tasks_and_their_errors_over_the_websocket(server: RunningServer) -> None:
    upload = media_task(media=data_uri(square_png()))
    unknown = legacy_task(preProcessorType="sobel")
    missing = media_task("delete", mediaUUID=str(uuid.uuid4()))

    async def scenario() -> None:
        async with connect(f"ws://127.0.0.1:{server.settings.port}/v1") as ws:
            await authenticate(ws)
            await send(ws, upload)
            [item] = (await recv(ws))["data"]
            assert (item["taskUUID"], item["operation"]) == (upload["taskUUID"], "upload")
            preprocess = new_task(item["mediaUUID"], outputType="dataURI", outputFormat="PNG")
            await send(ws, preprocess)
            [guide] = (await recv(ws))["data"]
            assert guide["taskUUID"] == preprocess["taskUUID"]
            assert guide["inputImageUUID"] == item["mediaUUID"]
            assert_square_outline(decoded(guide))
            for task, code in ((unknown, "invalidPreProcessorType"), (missing, "invalidMediaUUID")):
                await send(ws, task)
                frame = await recv(ws)
                assert list(frame) == ["errors"], frame
                [error] = frame["errors"]
                assert (error["code"], error["taskUUID"]) == (code, task["taskUUID"])
            delete = media_task("delete", mediaUUID=item["mediaUUID"])
            await send(ws, delete)
            [deleted] = (await recv(ws))["data"]
            assert deleted == {**delete, "mediaUUID": item["mediaUUID"]}

    asyncio.run(scenario())
