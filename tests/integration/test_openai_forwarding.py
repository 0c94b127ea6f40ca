"""A model served by an OpenAI-compatible engine (`backend = "openai-images"`): a real impasto
server forwards Runware imageInference tasks over HTTP to the SGLang-Diffusion double
(tests/openai_engine_double.py), and to another impasto's own /v1/images/generations."""

from __future__ import annotations

import base64
import io
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import RunningServer
from tests.openai_engine_double import (
    TEST_KEY,
    EngineDouble,
    color_for,
    openai_error,
    running_engine,
)

AIR = "engine:sglang@1"
KEY_ENV = "IMPASTO_TEST_SGLANG_KEY"


@pytest.fixture
def engine() -> Iterator[EngineDouble]:
    with running_engine() as double:
        yield double


def models_file(tmp_path: Path, url: str, model: str = "Qwen/Qwen-Image", **settings: Any) -> Path:
    lines = [
        f'[models."{AIR}"]',
        'backend = "openai-images"',
        'name = "An SGLang-Diffusion engine"',
        "price_usd = 0.002",
        f'[models."{AIR}".settings]',
        f'url = "{url}"',
        f'model = "{model}"',
    ]
    for key, value in settings.items():
        lines.append(f"{key} = {value!r}".replace("'", '"'))
    path = tmp_path / "engine-models.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start(
    server_factory: Callable[..., RunningServer], tmp_path: Path, url: str, **settings: Any
) -> RunningServer:
    models = models_file(tmp_path, url, **{"api_key_env": KEY_ENV, "timeout_s": 10, **settings})
    return server_factory(models=models, safety_checker="none")


def task(**fields: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": AIR,
        "positivePrompt": "a lighthouse at dusk",
        "width": 128,
        "height": 96,
        "outputType": "base64Data",
        "outputFormat": "PNG",
    }
    values.update(fields)
    return values


def decoded(item: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["imageBase64Data"]))).convert("RGB")


def test_a_runware_task_runs_on_the_engine(
    server_factory: Callable[..., RunningServer],
    tmp_path: Path,
    engine: EngineDouble,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, TEST_KEY)
    server = start(server_factory, tmp_path, engine.url)
    sent = task(seed=7, numberResults=2, negativePrompt="fog", steps=9, CFGScale=3.5)
    reply = server.post([sent])
    assert reply.status_code == 200, reply.text
    items = reply.json()["data"]
    assert len(items) == 2
    seeds = sorted(item["seed"] for item in items)
    for item in items:
        image = decoded(item)
        assert image.size == (128, 96)
        assert image.getpixel((64, 48)) == color_for(item["seed"])
    # The engine saw one request per image, as SGLang-Diffusion documents them.
    assert sorted(body["seed"] for body in engine.generations) == seeds
    for body in engine.generations:
        assert body == {
            "model": "Qwen/Qwen-Image",
            "prompt": "a lighthouse at dusk",
            "n": 1,
            "size": "128x96",
            "response_format": "b64_json",
            "seed": body["seed"],
            "negative_prompt": "fog",
            "num_inference_steps": 9,
            "guidance_scale": 3.5,
        }
    assert all(r.headers["authorization"] == f"Bearer {TEST_KEY}" for r in engine.requests)
    assert TEST_KEY not in caplog.text


def test_url_results_are_fetched_from_the_engine(
    server_factory: Callable[..., RunningServer],
    tmp_path: Path,
    engine: EngineDouble,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, TEST_KEY)
    server = start(server_factory, tmp_path, engine.url, response_format="url")
    reply = server.post([task(seed=11)])
    assert reply.status_code == 200, reply.text
    (item,) = reply.json()["data"]
    assert decoded(item).getpixel((0, 0)) == color_for(11)
    assert [r.method for r in engine.requests] == ["POST", "GET"]
    assert re.fullmatch(r"/v1/images/[0-9a-f]+/content", engine.requests[1].path)


def test_engine_errors_surface_as_runware_error_items(
    server_factory: Callable[..., RunningServer],
    tmp_path: Path,
    engine: EngineDouble,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, TEST_KEY)
    server = start(server_factory, tmp_path, engine.url)

    engine.failures.append((400, openai_error("Size 128x96 is not supported", param="size")))
    sent = task()
    reply = server.post([sent])
    (error,) = reply.json()["errors"]
    assert error["code"] == "invalidWidth"
    assert error["parameter"] == "width"
    assert error["taskUUID"] == sent["taskUUID"]
    assert "Size 128x96 is not supported" in error["message"]

    engine.failures.append((503, {"detail": "scheduler is busy"}))
    (error,) = server.post([task()]).json()["errors"]
    assert error["code"] == "providerError"

    engine.api_key = "sk-another-key"  # the engine now refuses impasto's key
    reply = server.post([task()])
    (error,) = reply.json()["errors"]
    assert error["code"] == "invalidProviderApiKey"
    assert TEST_KEY not in reply.text
    # One request per task: none was re-sent after the engine answered.
    assert len(engine.requests) == 3


def test_a_slow_engine_is_timeout_provider(
    server_factory: Callable[..., RunningServer],
    tmp_path: Path,
    engine: EngineDouble,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, TEST_KEY)
    engine.delay_s = 1.5
    server = start(server_factory, tmp_path, engine.url, timeout_s=0.3)
    (error,) = server.post([task()]).json()["errors"]
    assert error["code"] == "timeoutProvider"
    assert len(engine.requests) == 1  # sent once: it may be generating there


def test_an_unset_key_variable_refuses_the_task_before_acceptance(
    server_factory: Callable[..., RunningServer],
    tmp_path: Path,
    engine: EngineDouble,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    server = start(server_factory, tmp_path, engine.url)
    (error,) = server.post([task()]).json()["errors"]
    assert error["code"] == "providerNotConfigured"
    assert engine.requests == []


def _batches(server: RunningServer, model: str) -> float:
    text = httpx.get(f"{server.base}/metrics", timeout=10).text
    match = re.search(
        rf'^impasto_batch_size_count\{{model="{re.escape(model)}"\}} (\S+)$', text, re.M
    )
    return float(match.group(1)) if match else 0.0


def test_a_runware_task_runs_on_another_impasto(
    server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    """Impasto A's engine entry forwards to impasto B's OpenAI Images API, model impasto:tiny@1."""
    b = server_factory(data_dir=tmp_path / "b-data", safety_checker="none")
    a = server_factory(
        data_dir=tmp_path / "a-data",
        models=models_file(tmp_path, b.url, model="impasto:tiny@1", timeout_s=60),
        safety_checker="none",
    )
    sent = task(width=64, height=64, seed=1234, steps=2, numberResults=1)
    reply = a.post([sent])
    assert reply.status_code == 200, reply.text
    (item,) = reply.json()["data"]
    assert item["seed"] == 1234
    image = decoded(item)
    assert image.size == (64, 64)
    assert _batches(b, "impasto:tiny@1") == 1  # B ran the tiny model ...
    assert _batches(a, AIR) == 1  # ... for A's engine entry
    # B's image for the same seed, asked of B directly over Runware, is the same picture.
    direct = b.post([{**task(width=64, height=64, seed=1234, steps=2), "model": "impasto:tiny@1"}])
    assert direct.status_code == 200, direct.text
    assert decoded(direct.json()["data"][0]).tobytes() == image.tobytes()
