"""Local models over REST: cross-request batching, modelSearch, a custom backend by import
path, and the clear error when a hub model's weights are not available offline."""

from __future__ import annotations

import io
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from tests.conftest import RunningServer


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


def test_concurrent_requests_of_one_shape_run_in_one_pipeline_call(
    server_factory: Any, tmp_path: Path
) -> None:
    models = tmp_path / "models.toml"
    models.write_text(
        '[models."impasto:tiny@1".settings]\nmax_batch_size = 4\nbatch_invariant = true\n'
    )
    server: RunningServer = server_factory(models=models, batch_wait_ms=500)
    tasks = [task(seed=300 + i, positivePrompt=f"boat {i}") for i in range(4)]

    # One array: the four tasks reach the scheduler together and share a call.
    reply = server.post(tasks).json()

    assert len(reply["data"]) == 4
    backend = server.runtime().scheduler.backend_of("impasto:tiny@1")
    assert backend.batch_sizes == [4]
    batched = {item["taskUUID"]: pixels(item) for item in reply["data"]}
    # The same seeds alone, one request at a time: the same pixels (batch-invariant model).
    for original in tasks:
        solo = server.post([dict(original, taskUUID=str(uuid.uuid4()))]).json()["data"][0]
        assert np.array_equal(pixels(solo), batched[original["taskUUID"]])
    assert backend.batch_sizes == [4, 1, 1, 1, 1]


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
        [{"taskType": "modelSearch", "taskUUID": str(uuid.uuid4()), "search": "tiny"}]
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
