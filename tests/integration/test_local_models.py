"""Local models over REST: cross-request batching, modelSearch, a custom backend by import
path, and the clear error when a hub model's weights are not available offline."""

from __future__ import annotations

import base64
import io
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from tests.conftest import RunningServer
from tests.gated_backend import Gate


def task(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "impasto:tiny@1",
        "positivePrompt": "a paper boat on a pond",
        "width": 192,
        "height": 128,
        "outputFormat": "PNG",
    }
    body.update(overrides)
    return body


def pixels(item: dict[str, Any]) -> np.ndarray:
    data = httpx.get(item["imageURL"]).content
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_requests_that_queue_while_the_model_is_busy_run_in_one_pipeline_call(
    server_factory: Any, tmp_path: Path
) -> None:
    gate = Gate()
    models = tmp_path / "models.toml"
    models.write_text(
        '[models."impasto:tiny@1"]\n'
        'backend = "tests.gated_backend:GatedTinyBackend"\n'
        f'settings = {{ gate = "{gate.name}", max_batch_size = 4, batch_invariant = true }}\n'
    )
    server: RunningServer = server_factory(models=models)
    runtime = server.runtime()
    tasks = [task(seed=300 + i, positivePrompt=f"boat {i}") for i in range(4)]
    with gate.hold():
        # The model is busy with a first task ...
        server.post([task(deliveryMethod="async")])
        gate.wait_held(1)
        # ... while four more of one shape arrive from four clients.
        for body in tasks:
            server.post([dict(body, deliveryMethod="async")])
        wait_until(lambda: runtime.scheduler.queued() == 4)
    for body in tasks:
        wait_until(lambda b=body: statuses(server, b) == ["success"])

    backend = runtime.scheduler.backend_of("impasto:tiny@1")
    assert backend.batch_sizes == [1, 4]
    batched = {
        body["taskUUID"]: pixels(server.post([poll(body)]).json()["data"][0]) for body in tasks
    }
    # The same seeds alone, one request at a time: the same pixels (batch-invariant model).
    for original in tasks:
        solo = server.post([dict(original, taskUUID=str(uuid.uuid4()))]).json()["data"][0]
        assert np.array_equal(pixels(solo), batched[original["taskUUID"]])
    assert backend.batch_sizes == [1, 4, 1, 1, 1, 1]


def poll(body: dict[str, Any]) -> dict[str, Any]:
    return {"taskType": "getResponse", "taskUUID": body["taskUUID"]}


def statuses(server: RunningServer, body: dict[str, Any]) -> list[str]:
    return [item["status"] for item in server.post([poll(body)]).json().get("data", [])]


def wait_until(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_number_results_are_split_into_batches_by_model_limit(
    server_factory: Any, tmp_path: Path
) -> None:
    models = tmp_path / "models.toml"
    models.write_text('[models."impasto:tiny@1".settings]\nmax_batch_size = 2\n')
    server: RunningServer = server_factory(models=models, batch_wait_ms=200)

    reply = server.post([task(numberResults=5, seed=7)]).json()

    assert sorted(item["seed"] for item in reply["data"]) == [7, 8, 9, 10, 11]
    backend = server.runtime().scheduler.backend_of("impasto:tiny@1")
    assert sorted(backend.batch_sizes) == [1, 2, 2]


def test_model_search_lists_configured_models(server: RunningServer) -> None:
    reply = server.post(
        [{"taskType": "modelSearch", "taskUUID": str(uuid.uuid4()), "search": "tiny@"}]
    ).json()
    result = reply["data"][0]
    assert result["taskType"] == "modelSearch"
    assert result["totalResults"] == 1
    model = result["results"][0]
    assert model["air"] == "impasto:tiny@1"
    assert model["architecture"] == "sd1x"
    assert (model["defaultWidth"], model["defaultHeight"]) == (512, 512)
    assert model["defaultSteps"] == 2

    everything = server.post(
        [{"taskType": "modelSearch", "taskUUID": str(uuid.uuid4()), "limit": 100}]
    ).json()["data"][0]
    airs = {m["air"] for m in everything["results"]}
    assert {"runway:4@1", "runway:4@2", "runware:100@1", "runware:101@1"} <= airs
    paged = server.post(
        [{"taskType": "modelSearch", "taskUUID": str(uuid.uuid4()), "limit": 2, "offset": 1}]
    ).json()["data"][0]
    assert len(paged["results"]) == 2
    assert paged["totalResults"] == everything["totalResults"]


def test_a_custom_backend_named_by_import_path_serves_the_runware_api(
    server_factory: Any,
) -> None:
    models = Path(__file__).parents[2] / "examples" / "custom_backend" / "models.toml"
    server: RunningServer = server_factory(models=models)

    reply = server.post(
        [task(model="acme:gradient@1", width=300, height=200, numberResults=2, includeCost=True)]
    ).json()

    assert len(reply["data"]) == 2
    for item in reply["data"]:
        assert item["cost"] == 0.001
        image = Image.open(io.BytesIO(httpx.get(item["imageURL"]).content))
        assert image.size == (300, 200)


def test_a_hub_model_without_local_weights_fails_with_a_clear_error(
    server_factory: Any,
) -> None:
    server: RunningServer = server_factory(offline=True)

    reply = server.post([task(model="runware:100@1", width=256, height=256)])

    error = reply.json()["errors"][0]
    assert error["code"] == "modelUnavailable"
    assert "black-forest-labs/FLUX.1-schnell" in error["message"]
    assert "Traceback" not in reply.text


def test_metrics_count_tasks_and_batches(server: RunningServer) -> None:
    server.post([task(numberResults=2)])
    server.post([task(width=13)])

    text = httpx.get(f"{server.base}/metrics").text

    assert 'impasto_tasks_total{outcome="ok",task_type="imageInference"} 1.0' in text
    assert 'impasto_tasks_total{outcome="invalidWidth",task_type="imageInference"} 1.0' in text
    assert 'impasto_batch_size_count{model="impasto:tiny@1"}' in text
    assert "impasto_queued_jobs 0.0" in text


def test_a_full_queue_answers_429_and_accepts_the_same_task_later(
    server_factory: Any, tmp_path: Path
) -> None:
    gate = Gate()
    server: RunningServer = server_factory(models=gate.models_file(tmp_path), max_queued_images=2)
    runtime = server.runtime()
    later = task()
    with gate.hold():
        server.post([task(deliveryMethod="async")])
        gate.wait_held(1)  # running, so not waiting
        assert server.post([task(deliveryMethod="async", numberResults=2)]).status_code == 200
        wait_until(lambda: runtime.scheduler.queued() == 2)

        refused = server.post([later])

        assert refused.status_code == 429
        error = refused.json()["errors"][0]
        assert error["code"] == "rateLimitExceeded"
        assert error["taskUUID"] == later["taskUUID"]
    wait_until(lambda: runtime.scheduler.queued() == 0)
    # Nothing was accepted: the same taskUUID goes through once there is room.
    accepted = server.post([later])
    assert accepted.status_code == 200, accepted.text
    assert len(accepted.json()["data"]) == 1


def test_reference_images_are_image_prompts_on_a_model_with_an_ip_adapter(
    server: RunningServer,
) -> None:
    def generate(colour: str) -> np.ndarray:
        buffer = io.BytesIO()
        Image.new("RGB", (96, 64), colour).save(buffer, format="PNG")
        reference = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        reply = server.post(
            [task(model="impasto:tiny-ip@1", seed=5, referenceImages=[reference])]
        ).json()
        assert "errors" not in reply, reply
        return pixels(reply["data"][0])

    red, blue = generate("red"), generate("blue")

    assert red.shape == (128, 192, 3)
    # Same seed and prompt: only the image prompt differs, and it shows.
    assert np.abs(red - blue).mean() > 0.05
    backend = server.runtime().scheduler.backend_of("impasto:tiny-ip@1")
    replica = next(iter(backend._replicas.values()))
    assert replica.pipeline.image_encoder is not None
    # The image prompt path, not img2img (no variant pipeline was made).
    assert replica.variants == {}


def test_a_task_that_cannot_be_scheduled_ends_with_an_error_instead_of_hanging(
    server: RunningServer, monkeypatch: Any
) -> None:
    runtime = server.runtime()

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("queue unreachable")

    monkeypatch.setattr(runtime.scheduler, "submit", broken)
    body = task(numberResults=2, deliveryMethod="async")

    server.post([body])
    items = server.post([poll(body)]).json()["data"]

    assert [item["status"] for item in items] == ["error", "error"]
    assert items[0]["error"]["code"] == "inferenceError"
