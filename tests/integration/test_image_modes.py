"""The image modes end to end on a real server and the tiny assets: over REST, over WebSocket,
and through the new official SDK (runware-sdk 1.8) for img2img, inpainting and LoRA."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from websockets.asyncio.client import connect

from tests.conftest import RunningServer, make_settings, start_server, tiny_task
from tests.integration.test_websocket import authenticate, recv, send
from tests.sdk.clients import new_sdk_command, run_client


def png_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


DROP: Any = object()
SEED = noise(64, 64, 1)
MASK = Image.new("L", (64, 64), 0)
MASK.paste(255, (16, 16, 48, 48))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[Any]:
    settings = make_settings(
        tmp_path_factory.mktemp("modes"), tiny_models_dir, safety_checker="none"
    )
    running = start_server(settings)
    yield running
    running.stop()


def pixels_of(item: dict[str, Any]) -> np.ndarray:
    data = item["imageDataURI"].split(",", 1)[1]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), np.int16)


def generate(server: RunningServer, *tasks: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the tasks in one request; the items in the tasks' order (one image each)."""
    reply = server.post([{"outputType": "dataURI", "outputFormat": "PNG", **t} for t in tasks])
    body = reply.json()
    assert reply.status_code == 200, body
    by_task = {item["taskUUID"]: item for item in body["data"]}
    return [by_task[t["taskUUID"]] for t in tasks]


def error_of(server: RunningServer, task: dict[str, Any]) -> dict[str, Any]:
    reply = server.post([task])
    assert reply.status_code == 400, reply.text
    [error] = reply.json()["errors"]
    assert error["taskUUID"] == task["taskUUID"]
    return dict(error)


def test_each_mode_runs_over_rest(server: RunningServer) -> None:
    guide = png_uri(noise(64, 64, 5))
    tasks = {
        "plain": tiny_task(seed=3),
        "img2img": tiny_task(seed=3, seedImage=png_uri(SEED), strength=0.5, width=96, height=64),
        "inputs-image": tiny_task(seed=3, inputs={"image": png_uri(SEED)}, strength=0.5),
        "inpaint": tiny_task(seed=3, seedImage=png_uri(SEED), maskImage=png_uri(MASK)),
        "inpaint-margin": tiny_task(
            seed=3, inputs={"seedImage": png_uri(SEED), "mask": png_uri(MASK)}, maskMargin=32
        ),
        "outpaint": tiny_task(
            seed=3,
            seedImage=png_uri(SEED),
            outpaint={"top": 16, "left": 32},
            width=DROP,
            height=DROP,
        ),
        "lora0": tiny_task(seed=3, lora=[{"model": "impasto:tiny-lora@1", "weight": 0}]),
        "lora1": tiny_task(seed=3, lora=[{"model": "impasto:tiny-lora@1", "weight": 1}]),
        "loras": tiny_task(
            seed=3,
            lora=[
                {"model": "impasto:tiny-lora@1"},
                {"model": "impasto:tiny-lora@2", "weight": 0.7},
            ],
        ),
        "controlnet0": tiny_task(
            seed=3,
            controlNet=[{"model": "impasto:tiny-controlnet@1", "guideImage": guide, "weight": 0}],
        ),
        "controlnet": tiny_task(
            seed=3,
            controlNet=[
                {
                    "model": "impasto:tiny-controlnet@1",
                    "guideImage": guide,
                    "startStepPercentage": 0,
                    "endStepPercentage": 50,
                    "controlMode": "controlnet",
                }
            ],
        ),
        "ipadapter": tiny_task(
            seed=3,
            ipAdapters=[{"model": "impasto:tiny-ip-adapter@1", "guideImage": guide, "weight": 0.8}],
        ),
        "vae": tiny_task(seed=3, vae="impasto:tiny-vae@1"),
        "embedding": tiny_task(seed=3, embeddings=[{"model": "impasto:tiny-embedding@1"}]),
        "clipskip": tiny_task(seed=3, clipSkip=1),
        "compel": tiny_task(seed=3, positivePrompt="a (lighthouse)1.5", promptWeighting="compel"),
        "sdembeds": tiny_task(
            seed=3, positivePrompt="a (lighthouse:1.5)", promptWeighting="sdEmbeds"
        ),
        "legacy-weighting": tiny_task(
            seed=3, positivePrompt="a (lighthouse)1.5", usePromptWeighting=True
        ),
        "references": tiny_task(seed=3, inputs={"references": [png_uri(SEED)]}, strength=0.5),
        "xl-refiner": tiny_task(
            seed=3,
            model="impasto:tiny-xl@1",
            refiner={"model": "impasto:tiny-xl-refiner@1", "startStepPercentage": 50},
        ),
        "inpaint-model": tiny_task(
            seed=3, model="impasto:tiny-inpaint@1", seedImage=png_uri(SEED), maskImage=png_uri(MASK)
        ),
    }
    for task in tasks.values():
        for key in [k for k, v in task.items() if v is DROP]:
            del task[key]
    items = dict(zip(tasks, generate(server, *tasks.values()), strict=True))
    out = {name: pixels_of(item) for name, item in items.items()}
    plain = out["plain"]
    assert out["img2img"].shape == (64, 96, 3)
    assert out["outpaint"].shape == (64 + 16, 64 + 32, 3)
    assert np.array_equal(out["outpaint"][16:, 32:], np.asarray(SEED, np.int16))
    keep = np.asarray(MASK) == 0
    seed = np.asarray(SEED, np.int16)
    for name in ("inpaint", "inpaint-margin", "inpaint-model"):
        assert np.array_equal(out[name][keep], seed[keep]), name
        assert not np.array_equal(out[name], seed), name
    assert np.array_equal(out["lora0"], plain)
    assert not np.array_equal(out["lora1"], plain)
    assert not np.array_equal(out["loras"], out["lora1"])
    assert np.abs(out["controlnet0"] - plain).max() <= 1
    for name in ("controlnet", "ipadapter", "vae", "embedding", "clipskip", "compel"):
        assert not np.array_equal(out[name], plain), name
    assert np.array_equal(out["compel"], out["sdembeds"])
    assert np.array_equal(out["compel"], out["legacy-weighting"])
    assert np.array_equal(out["references"], out["inputs-image"])


def test_inputs_are_checked_after_decoding_before_acceptance(server: RunningServer) -> None:
    small_mask = png_uri(Image.new("L", (32, 32), 255))
    mismatch = error_of(server, tiny_task(seedImage=png_uri(SEED), maskImage=small_mask))
    assert (mismatch["code"], mismatch["parameter"]) == ("invalidMaskImage", "maskImage")
    bad = error_of(server, tiny_task(seedImage="data:image/png;base64,AAAA"))
    assert (bad["code"], bad["parameter"]) == ("invalidSeedImage", "seedImage")
    guide = error_of(
        server,
        tiny_task(
            controlNet=[{"model": "impasto:tiny-controlnet@1", "guideImage": "not-an-image"}]
        ),
    )
    assert (guide["code"], guide["parameter"]) == ("invalidGuideImage", "controlNet[0].guideImage")
    syntax = error_of(server, tiny_task(positivePrompt="a (cat", promptWeighting="compel"))
    assert (syntax["code"], syntax["parameter"]) == ("invalidPositivePrompt", "positivePrompt")
    too_big = error_of(server, tiny_task(seedImage=png_uri(SEED), outpaint={"right": 2048}))
    assert (too_big["code"], too_big["parameter"]) == ("invalidOutpaint", "outpaint")


def test_model_search_lists_the_modes_of_each_model(server: RunningServer) -> None:
    reply = server.post(
        [{"taskType": "modelSearch", "taskUUID": tiny_task()["taskUUID"], "limit": 100}]
    )
    results = {r["air"]: r for r in reply.json()["data"][0]["results"]}
    assert {"img2img", "inpainting", "outpainting", "lora", "controlNet"} <= set(
        results["impasto:tiny@1"]["modes"]
    )
    assert "refiner" in results["impasto:tiny-xl@1"]["modes"]
    assert "clipSkip" not in results["runware:100@1"]["modes"]
    assert results["runway:4@1"]["modes"] == ["text2img", "referenceImages"]
    assert results["impasto:tiny-lora@1"]["category"] == "lora"
    assert results["impasto:tiny-inpaint@1"]["type"] == "inpainting"


def test_modes_over_websocket(server: RunningServer) -> None:
    tasks = [
        tiny_task(seed=4, seedImage=png_uri(SEED), strength=0.4, deliveryMethod="sync"),
        tiny_task(seed=4, seedImage=png_uri(SEED), maskImage=png_uri(MASK), deliveryMethod="sync"),
        tiny_task(seed=4, lora=[{"model": "impasto:tiny-lora@2"}], deliveryMethod="sync"),
    ]
    for task in tasks:
        task.update(outputType="dataURI", outputFormat="PNG")

    async def scenario() -> dict[str, dict[str, Any]]:
        async with connect(f"ws://127.0.0.1:{server.settings.port}/v1") as ws:
            await authenticate(ws)
            await send(ws, *tasks)
            got: dict[str, dict[str, Any]] = {}
            while len(got) < len(tasks):
                frame = await recv(ws)
                assert "errors" not in frame, frame
                for item in frame["data"]:
                    got[item["taskUUID"]] = item
            return got

    got = asyncio.run(scenario())
    inpainted = pixels_of(got[tasks[1]["taskUUID"]])
    keep = np.asarray(MASK) == 0
    assert np.array_equal(inpainted[keep], np.asarray(SEED, np.int16)[keep])
    assert pixels_of(got[tasks[0]["taskUUID"]]).shape == (64, 64, 3)
    assert pixels_of(got[tasks[2]["taskUUID"]]).shape == (64, 64, 3)


def test_img2img_inpainting_and_lora_through_runware_sdk(server: RunningServer) -> None:
    base = {
        "model": "impasto:tiny@1",
        "positivePrompt": "a lighthouse",
        "width": 64,
        "height": 64,
        "seed": 5,
        "outputType": "dataURI",
        "outputFormat": "PNG",
        "deliveryMethod": "sync",
    }
    tasks = [
        {**base, "inputs": {"seedImage": png_uri(SEED)}, "strength": 0.5},
        {**base, "inputs": {"seedImage": png_uri(SEED), "mask": png_uri(MASK)}},
        {**base, "lora": [{"model": "impasto:tiny-lora@1", "weight": 1.0}]},
        base,
    ]
    results = run_client(new_sdk_command(), server.url, "generate", {"tasks": tasks})
    images = [pixels_of(items[0]) for items in results]
    keep = np.asarray(MASK) == 0
    assert np.array_equal(images[1][keep], np.asarray(SEED, np.int16)[keep])
    assert not np.array_equal(images[2], images[3])
    assert images[0].shape == (64, 64, 3)
    assert json.dumps(results)  # what the SDK returned is plain data
