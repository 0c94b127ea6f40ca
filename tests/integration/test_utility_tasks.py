"""The model-backed utility tasks (upscale, removeBackground, caption, promptEnhance) against one
real server running the tiny utility models (random weights, the real transformers and
diffusers code paths): REST and WebSocket, sync and async, output types and formats, webhooks
and uploads, chaining from a generated image, and the error items of bad tasks."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from websockets.asyncio.client import connect

from tests.conftest import (
    LoopbackHTTP,
    RunningServer,
    image_bytes,
    make_settings,
    start_server,
    tiny_task,
)
from tests.integration.test_websocket import authenticate, recv, send
from tests.live import wait_until

TINY_DEFAULTS = {
    "upscale_model": "impasto:tiny-upscaler@1",
    "remove_background_model": "impasto:tiny-segmenter@1",
    "caption_model": "impasto:tiny-captioner@1",
    "prompt_enhance_model": "impasto:tiny-enhancer@1",
}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[RunningServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("utility"), tiny_models_dir, upscale_max_side=512, **TINY_DEFAULTS
    )
    running = start_server(settings)
    yield running
    running.stop()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


PHOTO = data_uri(image_bytes((40, 30), color=(200, 60, 30)))


def task(task_type: str, **fields: Any) -> dict[str, Any]:
    return {"taskType": task_type, "taskUUID": str(uuid.uuid4()), **fields}


def items_of(server: RunningServer, body: dict[str, Any], count: int = 1) -> list[dict[str, Any]]:
    response = server.post([body])
    assert response.status_code == 200, response.text
    reply = response.json()
    assert "errors" not in reply, reply
    assert len(reply["data"]) == count, reply
    for item in reply["data"]:
        assert item["taskUUID"] == body["taskUUID"]
        assert item["taskType"] == body["taskType"]
    return list(reply["data"])


def error_of(server: RunningServer, body: dict[str, Any]) -> dict[str, Any]:
    response = server.post([body])
    assert response.status_code == 400, response.text
    assert "Traceback" not in response.text
    (error,) = response.json()["errors"]
    assert error["taskUUID"] == body["taskUUID"]
    assert error["taskType"] == body["taskType"]
    return dict(error)


def image_of(item: dict[str, Any]) -> Image.Image:
    if "imageBase64Data" in item:
        data = base64.b64decode(item["imageBase64Data"], validate=True)
    elif "imageDataURI" in item:
        header, _, encoded = item["imageDataURI"].partition(",")
        assert header.startswith("data:image/"), header
        assert header.endswith(";base64"), header
        data = base64.b64decode(encoded, validate=True)
    else:
        response = httpx.get(item["imageURL"], timeout=30)
        assert response.status_code == 200, response.text
        data = response.content
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize(
    ("model", "factor"),
    [
        ("impasto:tiny-upscaler@1", 4),
        ("impasto:tiny-upscaler@1", 2),
        ("impasto:tiny-upscaler@2", 2),
        ("impasto:tiny-upscaler@2", 4),
        ("impasto:tiny-sd-upscaler@1", 4),
        ("impasto:tiny-sd-upscaler@1", 2),
    ],
)
def test_upscale_makes_the_image_exactly_factor_times_larger(
    server: RunningServer, model: str, factor: int
) -> None:
    (item,) = items_of(
        server,
        task("upscale", model=model, inputs={"image": PHOTO}, upscaleFactor=factor),
    )
    assert image_of(item).size == (40 * factor, 30 * factor)


@pytest.mark.parametrize("output_type", ["URL", "base64Data", "dataURI"])
def test_legacy_image_upscale_answers_in_each_output_type_and_format(
    server: RunningServer, output_type: str
) -> None:
    body = task(
        "imageUpscale",
        inputImage=PHOTO,
        upscaleFactor=2,
        outputType=[output_type],
        outputFormat="WEBP",
        includeCost=True,
    )
    (item,) = items_of(server, body)
    image = image_of(item)
    assert image.format == "WEBP"
    assert image.size == (80, 60)
    assert item["cost"] == 0
    # The output is a stored image: getResponse has it, and its UUID is an image input.
    polled = server.post([{"taskType": "getResponse", "taskUUID": body["taskUUID"]}]).json()
    assert polled["data"][0]["status"] == "success"
    assert polled["data"][0]["imageUUID"] == item["imageUUID"]


def test_target_megapixels_picks_the_size(server: RunningServer) -> None:
    (item,) = items_of(server, task("upscale", inputImage=PHOTO, targetMegapixels=0.0048))
    # 40x30 is 1200 px; 4800 px is twice each side.
    assert image_of(item).size == (80, 60)


def alpha_of(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGBA", image.mode
    return np.asarray(image.getchannel("A"))


def test_remove_background_gives_a_png_with_an_alpha_channel(server: RunningServer) -> None:
    (item,) = items_of(server, task("removeBackground", inputs={"image": PHOTO}))
    image = image_of(item)
    assert image.format == "PNG"
    assert image.size == (40, 30)
    # Random weights give a noise-like matte, but a matte: more than one level of alpha.
    assert len(np.unique(alpha_of(image))) > 1


def test_remove_background_options(server: RunningServer) -> None:
    (mask,) = items_of(
        server,
        task("removeBackground", inputImage=PHOTO, settings={"returnOnlyMask": True}),
    )
    assert image_of(mask).size == (40, 30)
    # compat: runware 0.5.24 sends the settings at the top level.
    (coloured,) = items_of(
        server,
        task(
            "imageBackgroundRemoval",
            inputImage=PHOTO,
            rgba=[0, 255, 0, 255],
            postProcessMask=True,
            outputFormat="WEBP",
        ),
    )
    image = image_of(coloured)
    assert image.format == "WEBP"
    # An opaque colour behind the subject: nothing is transparent (WEBP may drop alpha).
    assert np.asarray(image.convert("RGBA").getchannel("A")).min() == 255
    (matted,) = items_of(
        server,
        task(
            "removeBackground",
            inputImage=PHOTO,
            settings={"alphaMatting": True, "alphaMattingErodeSize": 3},
            outputFormat="JPG",
        ),
    )
    # JPG has no alpha: the cut-out is flattened on white.
    assert image_of(matted).mode == "RGB"


def test_caption_and_legacy_image_caption_answer_text(server: RunningServer) -> None:
    (item,) = items_of(server, task("caption", inputs={"image": PHOTO}, includeCost=True))
    assert isinstance(item["text"], str)
    assert item["text"].strip()
    assert item["cost"] == 0
    (legacy,) = items_of(server, task("imageCaption", inputImages=[PHOTO], prompt=["describe"]))
    assert legacy["text"].strip()


def test_prompt_enhance_answers_one_item_per_version_within_the_length(
    server: RunningServer,
) -> None:
    body = task("promptEnhance", prompt="a cat on a roof", promptMaxLength=64, promptVersions=3)
    items = items_of(server, body, count=3)
    for item in items:
        assert item["text"].strip()
        assert len(item["text"]) <= 64


def test_generate_upscale_remove_background_caption_chain_by_image_uuid(
    server: RunningServer,
) -> None:
    generated = server.post([tiny_task(width=64, height=64)]).json()["data"][0]
    (upscaled,) = items_of(
        server, task("upscale", inputImage=generated["imageUUID"], upscaleFactor=2)
    )
    assert image_of(upscaled).size == (128, 128)
    (cut,) = items_of(server, task("removeBackground", inputImage=upscaled["imageUUID"]))
    assert image_of(cut).size == (128, 128)
    (caption,) = items_of(server, task("caption", inputImage=cut["imageUUID"]))
    assert caption["text"].strip()


def test_async_tasks_are_acknowledged_then_polled(server: RunningServer) -> None:
    bodies = [
        task("upscale", inputImage=PHOTO, deliveryMethod="async"),
        task("removeBackground", inputImage=PHOTO, deliveryMethod="async"),
        task("caption", inputImage=PHOTO, deliveryMethod="async"),
        task("promptEnhance", prompt="a red fox", promptVersions=2, deliveryMethod="async"),
    ]
    response = server.post(bodies)
    assert response.status_code == 200
    acks = response.json()["data"]
    assert [a["taskUUID"] for a in acks] == [b["taskUUID"] for b in bodies]
    assert all(set(a) == {"taskType", "taskUUID"} for a in acks)

    def polled(body: dict[str, Any]) -> list[dict[str, Any]]:
        reply = server.post([{"taskType": "getResponse", "taskUUID": body["taskUUID"]}])
        return list(reply.json().get("data", []))

    for body in bodies:
        wait_until(lambda b=body: all(i["status"] == "success" for i in polled(b)), timeout=120)
    assert image_of(polled(bodies[0])[0]).size == (80, 60)
    assert polled(bodies[2])[0]["text"].strip()
    assert len(polled(bodies[3])) == 2


def test_webhooks_and_upload_endpoints_get_the_results(
    server: RunningServer, loopback_http: LoopbackHTTP
) -> None:
    loopback_http.routes["/hook"] = (200, "application/json", b"{}")
    loopback_http.routes["/put"] = (200, "text/plain", b"")
    upscale = task(
        "upscale",
        inputImage=PHOTO,
        webhookURL=loopback_http.url("/hook?t=1"),
        uploadEndpoint=loopback_http.url("/put"),
        outputFormat="PNG",
    )
    enhance = task(
        "promptEnhance",
        prompt="a castle",
        promptVersions=2,
        webhookURL=loopback_http.url("/hook?t=2"),
    )
    assert server.post([upscale, enhance]).status_code == 200

    def hooks() -> list[dict[str, Any]]:
        return [
            json.loads(r.body)
            for r in loopback_http.requests
            if r.method == "POST" and r.path.startswith("/hook")
        ]

    wait_until(lambda: len(hooks()) == 3, timeout=60)
    by_task: dict[str, list[dict[str, Any]]] = {}
    for hook in hooks():
        (item,) = hook["data"]
        by_task.setdefault(item["taskUUID"], []).append(item)
    assert len(by_task[enhance["taskUUID"]]) == 2
    assert all(i["text"] for i in by_task[enhance["taskUUID"]])
    (image_item,) = by_task[upscale["taskUUID"]]
    (put,) = [r for r in loopback_http.requests if r.method == "PUT"]
    uploaded = Image.open(io.BytesIO(put.body))
    assert uploaded.format == "PNG"
    assert uploaded.size == (80, 60)
    assert image_item["imageUUID"]


def test_every_task_type_runs_over_the_websocket(server: RunningServer) -> None:
    bodies = [
        task("upscale", inputImage=PHOTO, upscaleFactor=4, outputType="base64Data"),
        task("removeBackground", inputImage=PHOTO, outputType="dataURI"),
        task("caption", inputImage=PHOTO),
        task("promptEnhance", prompt="a quiet harbour", promptVersions=2),
    ]

    async def scenario() -> dict[str, list[dict[str, Any]]]:
        port = server.settings.port
        async with connect(f"ws://127.0.0.1:{port}/v1") as ws:
            await authenticate(ws)
            await send(ws, *bodies)
            got: dict[str, list[dict[str, Any]]] = {}
            while sum(len(v) for v in got.values()) < 5:
                message = await recv(ws, timeout=120)
                assert "errors" not in message, message
                for item in message["data"]:
                    got.setdefault(item["taskType"], []).append(item)
            return got

    got = asyncio.run(scenario())
    assert image_of(got["upscale"][0]).size == (160, 120)
    assert len(np.unique(alpha_of(image_of(got["removeBackground"][0])))) > 1
    assert got["caption"][0]["text"].strip()
    assert len(got["promptEnhance"]) == 2


@pytest.mark.parametrize(
    ("body", "code", "parameter"),
    [
        (task("upscale", upscaleFactor=2), "missingInputImage", "inputImage"),
        (task("upscale", inputImage=PHOTO, upscaleFactor=5), "invalidUpscaleFactor", None),
        (task("upscale", inputImage=PHOTO, upscaleFactor=2.5), "invalidUpscaleFactor", None),
        (
            task("upscale", inputImage=PHOTO, inputs={"image": PHOTO}),
            "invalidInputs",
            "inputs",
        ),
        (
            task("upscale", inputImage=PHOTO, model="impasto:tiny@1"),
            "invalidModel",
            "model",
        ),
        (
            task("caption", inputImage=PHOTO, model="impasto:tiny-upscaler@1"),
            "invalidModel",
            "model",
        ),
        (task("upscale", inputImage=PHOTO, model="nope:1@1"), "invalidModel", "model"),
        (task("upscale", inputImage="not an image"), "invalidInputImage", "inputImage"),
        (
            task("removeBackground", inputImage=PHOTO, rgba=[1, 2, 3]),
            "invalidRgba",
            "rgba",
        ),
        (
            task("removeBackground", inputImage=PHOTO, rgba=[0, 0, 0, 0], settings={}),
            "invalidRgba",
            "rgba",
        ),
        (task("caption", inputImage=PHOTO, unknownThing=1), "unknownParameter", None),
        (task("promptEnhance", prompt="x", promptMaxLength=5), "invalidPromptMaxLength", None),
        (task("promptEnhance", prompt="x", promptVersions=9), "invalidPromptVersions", None),
        (task("promptEnhance"), "missingPrompt", "prompt"),
        (
            task("upscale", inputImage=PHOTO, webhookURL="ftp://example.com/x"),
            "invalidWebhookURL",
            "webhookURL",
        ),
    ],
)
def test_bad_tasks_get_error_items(
    server: RunningServer, body: dict[str, Any], code: str, parameter: str | None
) -> None:
    error = error_of(server, body)
    assert error["code"] == code, error
    if parameter is not None:
        assert error["parameter"] == parameter, error
    # Nothing was accepted: the taskUUID is still free.
    polled = server.post([{"taskType": "getResponse", "taskUUID": body["taskUUID"]}])
    assert polled.status_code == 404


def test_an_upscale_past_the_size_limit_is_refused(server: RunningServer) -> None:
    big = data_uri(image_bytes((200, 150)))
    error = error_of(server, task("upscale", inputImage=big, upscaleFactor=4))
    assert error["code"] == "invalidUpscaleFactor"
    assert "512" in error["message"]


def test_a_used_task_uuid_is_a_conflict(server: RunningServer) -> None:
    body = task("caption", inputImage=PHOTO)
    items_of(server, body)
    assert error_of(server, body)["code"] == "conflictTaskUUID"


def test_model_search_lists_the_utility_models_by_category(server: RunningServer) -> None:
    reply = server.post(
        [{"taskType": "modelSearch", "taskUUID": str(uuid.uuid4()), "category": "upscaler"}]
    ).json()["data"][0]
    airs = {r["air"] for r in reply["results"]}
    assert {"impasto:tiny-upscaler@1", "runware:503@1", "impasto:sd-x4-upscaler@1"} <= airs
    assert {r["taskType"] for r in reply["results"]} == {"upscale"}


def test_a_task_left_running_by_a_stopped_server_runs_after_the_restart(
    server_factory: Any, tmp_path: Path
) -> None:
    from impasto.state.records import TaskRecord

    data = tmp_path / "restart"
    first = server_factory(data, **TINY_DEFAULTS)
    upload = first.post([task("imageUpload", image=PHOTO)]).json()["data"][0]
    task_uuid = str(uuid.uuid4())
    record = TaskRecord(
        task_uuid=task_uuid,
        task_type="imageUpscale",
        model="impasto:tiny-upscaler@2",
        request={
            "taskType": "imageUpscale",
            "taskUUID": task_uuid,
            "model": "impasto:tiny-upscaler@2",
            "inputImage": upload["imageUUID"],
            "upscaleFactor": 4,
        },
        expected=1,
        created_at=0.0,
    )
    # Accepted, and the process stopped before its model ran.
    first.call(first.runtime().state.create_task(record))
    first.stop()
    second = server_factory(data, **TINY_DEFAULTS)

    def done() -> list[dict[str, Any]]:
        reply = second.post([{"taskType": "getResponse", "taskUUID": task_uuid}]).json()
        return [i for i in reply["data"] if i["status"] == "success"]

    wait_until(lambda: bool(done()), timeout=60)
    assert image_of(done()[0]).size == (160, 120)


def test_prompt_enhance_through_an_operators_chat_endpoint(
    server_factory: Any, tmp_path: Path, loopback_http: LoopbackHTTP, monkeypatch: Any
) -> None:
    seen: list[dict[str, Any]] = []

    def chat(request: Any) -> tuple[int, str, bytes]:
        body = json.loads(request.body)
        seen.append({"body": body, "auth": request.headers.get("Authorization")})
        text = f"a castle number {body['seed'] % 1000} at dawn, mist, golden light"
        answer = {"choices": [{"message": {"role": "assistant", "content": text}}]}
        return 200, "application/json", json.dumps(answer).encode()

    loopback_http.handler = chat
    monkeypatch.setenv("TEST_ENHANCER_KEY", "sk-test")
    models = tmp_path / "models.toml"
    models.write_text(
        '[models."my:chat@1"]\ntype = "prompt-enhancer"\nbackend = "openai-chat"\n'
        '[models."my:chat@1".settings]\n'
        f'url = "{loopback_http.url("/v1")}"\nmodel = "qwen-7b"\n'
        'api_key_env = "TEST_ENHANCER_KEY"\n'
        '[models."my:keyless@1"]\ntype = "prompt-enhancer"\nbackend = "openai-chat"\n'
        '[models."my:keyless@1".settings]\n'
        f'url = "{loopback_http.url("/v1")}"\napi_key_env = "TEST_UNSET_KEY_VARIABLE"\n'
    )
    running = server_factory(tmp_path / "chat", models=models, prompt_enhance_model="my:chat@1")
    body = task("promptEnhance", prompt="a castle", promptVersions=2, promptMaxLength=40)
    items = items_of(running, body, count=2)
    assert all(len(i["text"]) <= 40 and i["text"].startswith("a castle") for i in items)
    assert [s["body"]["model"] for s in seen] == ["qwen-7b", "qwen-7b"]
    assert {s["auth"] for s in seen} == {"Bearer sk-test"}
    assert "a castle" in json.dumps(seen[0]["body"]["messages"])
    # A model whose key is not set is refused before anything is accepted.
    refused = running.post([task("promptEnhance", prompt="a castle", model="my:keyless@1")])
    assert refused.status_code == 503
    assert refused.json()["errors"][0]["code"] == "providerNotConfigured"
