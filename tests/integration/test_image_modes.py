"""The image modes end to end on a real server and the tiny assets: over REST, over WebSocket,
and through the new official SDK (runware-sdk 1.8) for img2img, inpainting and LoRA."""

from __future__ import annotations

import asyncio
import base64
import io
import uuid
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
    assert not body.get("errors"), body["errors"]
    by_task = {item["taskUUID"]: item for item in body["data"]}
    return [by_task[t["taskUUID"]] for t in tasks]


def error_of(server: RunningServer, task: dict[str, Any]) -> dict[str, Any]:
    reply = server.post([task])
    assert reply.status_code == 400, reply.text
    [error] = reply.json()["errors"]
    assert error["taskUUID"] == task["taskUUID"]
    return dict(error)


def mode_tasks() -> dict[str, dict[str, Any]]:
    """One task per mode, with fixed seeds: the same pixels whichever transport runs it."""
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
            outpaint={"top": 16, "left": 32, "blur": 4},
            width=64 + 32,
            height=64 + 16,
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
        "controlnet-raw": tiny_task(
            seed=3, controlNet=[{"model": "impasto:tiny-controlnet@1", "guideImage": guide}]
        ),
        # compat: runware 0.5.24's IControlNetCanny: the photo is turned into edges first.
        "controlnet-canny": tiny_task(
            seed=3,
            controlNet=[
                {"model": "impasto:tiny-controlnet@1", "guideImage": guide, "preprocessor": "canny"}
            ],
        ),
        "controlnets-two": tiny_task(
            seed=3,
            controlNet=[
                {"model": "impasto:tiny-controlnet@1", "guideImage": guide, "weight": 0.5},
                {"model": "impasto:tiny-controlnet@1", "guideImage": png_uri(SEED), "weight": 0.5},
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
        task.update(outputType="dataURI", outputFormat="PNG")
    return tasks


@pytest.fixture(scope="module")
def over_rest(server: RunningServer) -> dict[str, np.ndarray]:
    tasks = mode_tasks()
    items = dict(zip(tasks, generate(server, *tasks.values()), strict=True))
    return {name: pixels_of(item) for name, item in items.items()}


def test_each_mode_runs_over_rest(over_rest: dict[str, np.ndarray]) -> None:
    out = over_rest
    plain = out["plain"]
    assert out["img2img"].shape == (64, 96, 3)
    assert out["outpaint"].shape == (64 + 16, 64 + 32, 3)
    # blur 4 feathers 4 pixels into the seed image's top and left edges; the rest is kept.
    assert np.array_equal(out["outpaint"][16 + 4 :, 32 + 4 :], np.asarray(SEED, np.int16)[4:, 4:])
    keep = np.asarray(MASK) == 0
    seed = np.asarray(SEED, np.int16)
    for name in ("inpaint", "inpaint-margin", "inpaint-model"):
        assert np.array_equal(out[name][keep], seed[keep]), name
        assert not np.array_equal(out[name], seed), name
    assert np.array_equal(out["lora0"], plain)
    assert not np.array_equal(out["lora1"], plain)
    assert not np.array_equal(out["loras"], out["lora1"])
    assert np.abs(out["controlnet0"] - plain).max() <= 1
    assert not np.array_equal(out["controlnet-canny"], out["controlnet-raw"])
    assert not np.array_equal(out["controlnets-two"], out["controlnet-raw"])
    for name in ("controlnet", "ipadapter", "vae", "embedding", "clipskip", "compel"):
        assert not np.array_equal(out[name], plain), name
    assert np.array_equal(out["compel"], out["sdembeds"])
    assert np.array_equal(out["compel"], out["legacy-weighting"])
    # The same key: these two may or may not have shared a call (rounding, see assert_same).
    assert_same(out["references"], out["inputs-image"], "references")


def test_outpaint_without_a_size_extends_the_seed_image(server: RunningServer) -> None:
    task = tiny_task(seedImage=png_uri(noise(72, 48, 2)), outpaint={"bottom": 24, "right": 8})
    del task["width"], task["height"]
    [item] = generate(server, task)
    # The seed image on the 8-pixel grid (72x48) plus the sides.
    assert pixels_of(item).shape == (48 + 24, 72 + 8, 3)


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


def test_every_mode_over_websocket_gives_the_pixels_rest_gave(
    server: RunningServer, over_rest: dict[str, np.ndarray]
) -> None:
    tasks = mode_tasks()
    for task in tasks.values():
        task["deliveryMethod"] = "sync"

    async def scenario() -> dict[str, dict[str, Any]]:
        async with connect(f"ws://127.0.0.1:{server.settings.port}/v1") as ws:
            await authenticate(ws)
            await send(ws, *tasks.values())
            got: dict[str, dict[str, Any]] = {}
            while len(got) < len(tasks):
                frame = await recv(ws)
                assert "errors" not in frame, frame
                for item in frame["data"]:
                    got[item["taskUUID"]] = item
            return got

    got = asyncio.run(scenario())
    for name, task in tasks.items():
        assert_same(pixels_of(got[task["taskUUID"]]), over_rest[name], name)


def assert_same(image: np.ndarray, expected: np.ndarray, name: str) -> None:
    """Equal, but for batching: a task run in another batch may differ by rounding (a level)."""
    assert image.shape == expected.shape, name
    assert np.abs(image - expected).max() <= 2, name


def test_every_mode_through_runware_sdk(
    server: RunningServer, over_rest: dict[str, np.ndarray]
) -> None:
    tasks = mode_tasks()
    uploaded: dict[str, str] = {}

    def by_uuid(value: Any) -> Any:
        # The client's arguments travel on its command line: images go as uploaded UUIDs.
        if isinstance(value, str) and value.startswith("data:"):
            if value not in uploaded:
                task_uuid = str(uuid.uuid4())
                reply = server.post(
                    [{"taskType": "imageUpload", "taskUUID": task_uuid, "image": value}]
                )
                uploaded[value] = reply.json()["data"][0]["imageUUID"]
            return uploaded[value]
        if isinstance(value, dict):
            return {k: by_uuid(v) for k, v in value.items()}
        if isinstance(value, list):
            return [by_uuid(v) for v in value]
        return value

    sdk_tasks = []
    for task in tasks.values():
        task = {k: by_uuid(v) for k, v in task.items() if k not in ("taskType", "taskUUID")}
        sdk_tasks.append({**task, "deliveryMethod": "sync"})
    results = run_client(new_sdk_command(), server.url, "generate", {"tasks": sdk_tasks}, 300)
    for name, items in zip(tasks, results, strict=True):
        assert len(items) == 1, (name, items)
        assert_same(pixels_of(items[0]), over_rest[name], name)


def test_an_output_type_list_gives_each_field(server: RunningServer) -> None:
    task = tiny_task(outputType=["URL", "base64Data", "dataURI"], outputFormat="PNG")
    reply = server.post([task])
    [item] = reply.json()["data"]
    assert item["imageURL"].startswith("http://")
    assert base64.b64decode(item["imageBase64Data"]) == base64.b64decode(
        item["imageDataURI"].split(",", 1)[1]
    )


def test_accelerator_options_reuse_steps_deterministically_over_rest(
    server: RunningServer,
) -> None:
    """acceleratorOptions on the real server: DeepCache on the tiny UNet, TeaCache and First
    Block Cache on the tiny FLUX transformer. A cache that skips work changes the pixels a
    little and the same request gives the same pixels again; one that cannot skip (interval 1,
    distance 0) gives exactly the uncached image."""
    flux = {"model": "impasto:tiny-flux@1", "steps": 8, "seed": 4}
    tasks = {
        "sd": tiny_task(seed=3, steps=9),
        "sd-deep": tiny_task(seed=3, steps=9, acceleratorOptions={"deepCache": True}),
        "sd-deep-again": tiny_task(seed=3, steps=9, acceleratorOptions={"deepCache": True}),
        "sd-deep-1": tiny_task(
            seed=3, steps=9, acceleratorOptions={"deepCache": True, "deepCacheInterval": 1}
        ),
        "flux": tiny_task(**flux),
        "flux-tea": tiny_task(
            **flux, acceleratorOptions={"teaCache": True, "teaCacheDistance": 0.3}
        ),
        "flux-tea-again": tiny_task(
            **flux, acceleratorOptions={"teaCache": True, "teaCacheDistance": 0.3}
        ),
        "flux-fb-0": tiny_task(**flux, acceleratorOptions={"fbcache": True, "cacheDistance": 0}),
    }
    items = generate(server, *tasks.values())
    out = {name: pixels_of(item) for name, item in zip(tasks, items, strict=True)}
    assert not np.array_equal(out["sd"], out["sd-deep"])
    assert np.array_equal(out["sd-deep"], out["sd-deep-again"])
    assert np.array_equal(out["sd"], out["sd-deep-1"])
    assert not np.array_equal(out["flux"], out["flux-tea"])
    assert np.array_equal(out["flux-tea"], out["flux-tea-again"])
    assert np.array_equal(out["flux"], out["flux-fb-0"])
    error = error_of(server, tiny_task(acceleratorOptions={"fbcache": True}))
    assert (error["code"], error["parameter"]) == (
        "unsupportedParameter",
        "acceleratorOptions.fbcache",
    )
