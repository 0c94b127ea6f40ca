"""runway:4@1 and runway:4@2 served through Runway's API: a real impasto server and the real
runwayml SDK against the Runway double on loopback (tests/runway_double.py)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from impasto.backends.base import GeneratedImage, GenerationJob, Outcome, ReferenceImage
from impasto.backends.factory import RunwayOptions
from impasto.backends.registry import ModelRegistry
from impasto.backends.runway import (
    CREATE_RETRIES,
    DOWNLOAD_ATTEMPTS,
    POLL_RETRIES,
    RunwayBackend,
)
from impasto.protocol.errors import ImpastoError
from tests.conftest import LoopbackHTTP, RunningServer, free_port, image_bytes
from tests.runway_double import RAW_FAILURE_TEXT, TEST_KEY, RunwayDouble, running_double

EXAMPLES = json.loads((Path(__file__).parents[1] / "data" / "seed-tasks.json").read_text())
REGISTRY = ModelRegistry.load(None)
FAST = 0.01  # poll interval in tests; the state machine moves per poll, not by the clock


@pytest.fixture
def runway() -> Iterator[RunwayDouble]:
    with running_double() as double:
        yield double


def _server(
    server_factory: Callable[..., RunningServer], double: RunwayDouble, **overrides: Any
) -> RunningServer:
    values: dict[str, Any] = {
        "runway_api_secret": TEST_KEY,
        "runway_base_url": double.url,
        "runway_poll_interval_s": FAST,
    }
    values.update(overrides)
    return server_factory(**values)


def _task(**fields: Any) -> dict[str, Any]:
    task: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "runway:4@1",
        "positivePrompt": "a lighthouse on a cliff at dusk",
        "width": 1360,
        "height": 768,
    }
    task.update(fields)
    return task


def _image(item: dict[str, Any]) -> Image.Image:
    response = httpx.get(item["imageURL"], timeout=30)
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.content))


# A failure after the task was accepted is the task's outcome: HTTP 200 carrying the error
# item, so that runware-sdk does not retry it into conflictTaskUUID (docs/delivery.md).
ACCEPTED = 200


def _error(server: RunningServer, task: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = server.post([task])
    body = response.json()
    assert "data" not in body or not body["data"], body
    (error,) = body["errors"]
    return response.status_code, error


def _reference(http: LoopbackHTTP, name: str, size: tuple[int, int] = (640, 480)) -> str:
    http.routes[f"/{name}.jpg"] = (200, "image/jpeg", image_bytes(size, "JPEG", "blue"))
    return http.url(f"/{name}.jpg")


# -- the documented examples --------------------------------------------------------------------


def test_seed_examples_run_on_runway_and_return_documented_items(
    server_factory: Any, runway: RunwayDouble, loopback_http: LoopbackHTTP
) -> None:
    server = _server(server_factory, runway)
    tasks = []
    for n, example in enumerate(EXAMPLES):
        task = dict(example["request"])
        if task.get("referenceImages"):
            # assets.runware.ai is out of reach here: the same images from loopback, which
            # reach Runway as data URIs (only https URLs are passed on as they are).
            task["referenceImages"] = [
                _reference(loopback_http, f"ex{n}-{i}") for i in range(len(task["referenceImages"]))
            ]
        tasks.append(task)

    response = server.post(tasks)

    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body
    items = {item["taskUUID"]: item for item in body["data"]}
    assert len(items) == len(EXAMPLES)
    creates = {c.body["promptText"]: c.body for c in runway.creates}
    assert len(runway.creates) == len(EXAMPLES)
    for example in EXAMPLES:
        request, documented = example["request"], example["response"]
        item = items[request["taskUUID"]]
        assert set(item) == set(documented) - {"cost"}, example["name"]
        uuid.UUID(item["imageUUID"])
        image = _image(item)
        assert image.format == "JPEG"
        assert image.size == (request["width"], request["height"])
        sent = creates[request["positivePrompt"]]
        assert sent["model"] == "gen4_image"
        assert sent["ratio"] == f"{request['width']}:{request['height']}"
        assert sent["contentModeration"] == {"publicFigureThreshold": "auto"}
        assert item["seed"] == sent["seed"]
        assert 0 <= item["seed"] <= 4294967295
        references = sent.get("referenceImages", [])
        assert len(references) == len(request.get("referenceImages", []))
        for reference in references:
            assert reference["uri"].startswith("data:image/jpeg;base64,")
            assert set(reference) == {"uri"}
    api_calls = [c for c in runway.calls if c.path.startswith("/v1/")]
    assert all(c.headers["authorization"] == f"Bearer {TEST_KEY}" for c in api_calls)
    assert all(c.headers["x-runway-version"] == "2024-11-06" for c in runway.creates)


def test_default_size_is_1024x1024(server_factory: Any, runway: RunwayDouble) -> None:
    server = _server(server_factory, runway)
    task = _task()
    del task["width"], task["height"]
    body = server.post([task]).json()
    assert _image(body["data"][0]).size == (1024, 1024)
    assert runway.creates[0].body["ratio"] == "1024:1024"


def test_number_results_two_makes_two_runway_tasks_with_distinct_seeds(
    server_factory: Any, runway: RunwayDouble
) -> None:
    server = _server(server_factory, runway)
    body = server.post([_task(numberResults=2)]).json()
    items = body["data"]
    assert len(items) == 2
    assert len(runway.creates) == 2
    sent = sorted(c.body["seed"] for c in runway.creates)
    assert sorted(item["seed"] for item in items) == sent
    assert len(set(sent)) == 2
    assert all(0 <= seed <= 4294967295 for seed in sent)


@pytest.mark.parametrize(
    ("width", "height", "credits", "cost"),
    [(1360, 768, None, 0.08), (1280, 720, None, 0.05), (1024, 1024, 3, 0.03)],
)
def test_include_cost_reports_runways_credits_at_one_cent(
    server_factory: Any,
    runway: RunwayDouble,
    width: int,
    height: int,
    credits: int | None,
    cost: float,
) -> None:
    runway.script.credits = credits
    server = _server(server_factory, runway)
    body = server.post([_task(width=width, height=height, includeCost=True)]).json()
    assert body["data"][0]["cost"] == cost


def test_without_runways_cost_the_price_table_applies(
    server_factory: Any, runway: RunwayDouble
) -> None:
    runway.script.omit_cost = True
    server = _server(server_factory, runway)
    body = server.post([_task(width=720, height=1280, includeCost=True)]).json()
    assert body["data"][0]["cost"] == 0.05


def test_turbo_runs_gen4_image_turbo_with_its_reference_and_tag(
    server_factory: Any, runway: RunwayDouble, loopback_http: LoopbackHTTP
) -> None:
    server = _server(server_factory, runway)
    task = _task(
        model="runway:4@2",
        positivePrompt="@Cat on a mat",
        width=720,
        height=720,
        includeCost=True,
        inputs={"referenceImages": [{"image": _reference(loopback_http, "cat"), "tag": "Cat"}]},
        providerSettings={"runway": {"contentModeration": {"publicFigureThreshold": "low"}}},
    )
    body = server.post([task]).json()
    item = body["data"][0]
    assert item["cost"] == 0.02
    assert _image(item).size == (720, 720)
    (create,) = runway.creates
    assert create.body["model"] == "gen4_image_turbo"
    assert create.body["promptText"] == "@Cat on a mat"
    assert create.body["contentModeration"] == {"publicFigureThreshold": "low"}
    (reference,) = create.body["referenceImages"]
    assert reference["tag"] == "Cat"
    header, _, payload = reference["uri"].partition(",")
    assert header == "data:image/jpeg;base64"
    assert Image.open(io.BytesIO(base64.b64decode(payload))).size == (640, 480)


def test_output_of_another_size_is_fitted_to_the_requested_size(
    server_factory: Any, runway: RunwayDouble
) -> None:
    runway.script.output_size = (1000, 1000)
    runway.script.output_format = "JPEG"
    server = _server(server_factory, runway)
    body = server.post([_task(width=1808, height=768, outputFormat="PNG")]).json()
    image = _image(body["data"][0])
    assert (image.format, image.size) == ("PNG", (1808, 768))


# -- refused before Runway is called ------------------------------------------------------------


def test_server_without_a_key_answers_provider_not_configured(
    server_factory: Any, runway: RunwayDouble
) -> None:
    server = _server(server_factory, runway, runway_api_secret=None)
    status, error = _error(server, _task())
    assert status == 503
    assert error["code"] == "providerNotConfigured"
    assert error["parameter"] == "model"
    assert "Runway" in error["message"]
    assert runway.calls == []


def test_bad_tag_is_refused_at_submit_without_calling_runway(
    server_factory: Any, runway: RunwayDouble, loopback_http: LoopbackHTTP
) -> None:
    server = _server(server_factory, runway)
    url = _reference(loopback_http, "ref")
    task = _task(
        inputs={"referenceImages": [{"image": url, "tag": "eiffel"}, {"image": url, "tag": "a-b"}]}
    )
    status, error = _error(server, task)
    assert status == 400
    assert error["code"] == "invalidReferenceImages"
    assert error["parameter"] == "inputs.referenceImages[1].tag"
    assert runway.calls == []


# -- Runway's failures, one test per row of the table in docs/runway.md -------------------------


@pytest.mark.parametrize(
    ("failure_code", "code"),
    [
        ("SAFETY.INPUT.TEXT", "invalidProviderContent"),
        ("SAFETY.OUTPUT.IMAGE", "invalidProviderContent"),
        ("INPUT_PREPROCESSING.SAFETY.TEXT", "invalidProviderContent"),
        ("ASSET.INVALID", "invalidReferenceImages"),
        ("INTERNAL.BAD_OUTPUT.CODE01", "providerError"),
        ("INTERNAL", "providerError"),
    ],
)
def test_failed_runway_task_becomes_an_error_item(
    server_factory: Any, runway: RunwayDouble, failure_code: str, code: str
) -> None:
    runway.script.failure_code = failure_code
    server = _server(server_factory, runway)
    task = _task()
    http_status, error = _error(server, task)
    assert (http_status, error["code"]) == (ACCEPTED, code)
    assert error["taskUUID"] == task["taskUUID"]
    assert error["taskType"] == "imageInference"
    assert RAW_FAILURE_TEXT not in json.dumps(error)
    assert len(runway.creates) == 1


def test_task_cancelled_at_runway_is_a_provider_error(
    server_factory: Any, runway: RunwayDouble
) -> None:
    runway.script.cancelled = True
    server = _server(server_factory, runway)
    status, error = _error(server, _task())
    assert (status, error["code"]) == (ACCEPTED, "providerError")
    assert len(runway.creates) == 1


@pytest.mark.parametrize(("output_status", "downloads"), [(500, DOWNLOAD_ATTEMPTS), (403, 1)])
def test_output_that_cannot_be_downloaded_is_a_provider_error(
    server_factory: Any, runway: RunwayDouble, output_status: int, downloads: int
) -> None:
    runway.script.output_status = output_status
    server = _server(server_factory, runway)
    status, error = _error(server, _task())
    assert (status, error["code"]) == (ACCEPTED, "providerError")
    assert len([c for c in runway.calls if c.path.startswith("/outputs/")]) == downloads
    assert len(runway.creates) == 1


def test_output_that_is_no_image_is_a_provider_error(
    server_factory: Any, runway: RunwayDouble
) -> None:
    runway.script.output_corrupt = True
    server = _server(server_factory, runway)
    _, error = _error(server, _task())
    assert error["code"] == "providerError"
    assert len(runway.creates) == 1


@pytest.mark.parametrize(
    ("create_status", "code", "creates"),
    [
        (401, "invalidProviderApiKey", 1),
        (429, "providerRateLimitExceeded", 1 + CREATE_RETRIES),
        (500, "providerError", 1),
        (503, "providerError", 1),
    ],
)
def test_refused_create_becomes_an_error_item_and_is_retried_only_on_429(
    server_factory: Any, runway: RunwayDouble, create_status: int, code: str, creates: int
) -> None:
    runway.script.create_status = create_status
    server = _server(server_factory, runway)
    _, error = _error(server, _task())
    assert error["code"] == code
    assert len(runway.creates) == creates
    assert runway.polls() == []


def test_wrong_key_is_rejected_by_runway(server_factory: Any, runway: RunwayDouble) -> None:
    server = _server(server_factory, runway, runway_api_secret="key_" + "f" * 128)
    status, error = _error(server, _task())
    assert (status, error["code"]) == (ACCEPTED, "invalidProviderApiKey")
    assert "key_" not in error["message"]


def test_429_then_accepted_makes_one_task(server_factory: Any, runway: RunwayDouble) -> None:
    runway.script.create_status, runway.script.create_failures = 429, 1
    server = _server(server_factory, runway)
    body = server.post([_task()]).json()
    assert len(body["data"]) == 1
    assert len(runway.creates) == 2
    assert len(runway.tasks) == 1


def test_create_timeout_is_not_retried(server_factory: Any, runway: RunwayDouble) -> None:
    runway.script.create_hold = threading.Event()
    server = _server(server_factory, runway, runway_request_timeout_s=0.3)
    status, error = _error(server, _task())
    assert (status, error["code"]) == (ACCEPTED, "timeoutProvider")
    assert len(runway.creates) == 1


def test_unreachable_runway_is_a_provider_error(server_factory: Any) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    server = server_factory(
        runway_api_secret=TEST_KEY, runway_base_url=closed, runway_poll_interval_s=FAST
    )
    _, error = _error(server, _task())
    assert error["code"] == "providerError"


def test_runways_validation_issue_names_our_parameter(
    server_factory: Any, runway: RunwayDouble, loopback_http: LoopbackHTTP
) -> None:
    # Runway's spec regex for tags is lowercase-only; should Runway enforce it, the client
    # learns which tag, under our parameter name.
    runway.lowercase_tags = True
    server = _server(server_factory, runway)
    url = _reference(loopback_http, "ref")
    task = _task(inputs={"referenceImages": [{"image": url, "tag": "EiffelTower"}]})
    status, error = _error(server, task)
    assert status == ACCEPTED
    assert error["code"] == "invalidReferenceImages"
    assert error["parameter"] == "inputs.referenceImages[0].tag"
    assert runway.tasks == {}


def test_task_deleted_at_runway_is_a_provider_error(
    server_factory: Any, runway: RunwayDouble
) -> None:
    runway.script.poll_status = 404
    server = _server(server_factory, runway)
    status, error = _error(server, _task())
    assert (status, error["code"]) == (ACCEPTED, "providerError")
    assert len(runway.creates) == 1
    assert len(runway.polls()) == 1


def test_failing_polls_are_retried_then_succeed(server_factory: Any, runway: RunwayDouble) -> None:
    runway.script.poll_status, runway.script.poll_failures = 503, 2
    server = _server(server_factory, runway)
    body = server.post([_task()]).json()
    assert len(body["data"]) == 1
    assert len(runway.creates) == 1


def test_polls_failing_for_good_give_a_provider_error(
    server_factory: Any, runway: RunwayDouble
) -> None:
    runway.script.poll_status = 500
    server = _server(server_factory, runway)
    _, error = _error(server, _task())
    assert error["code"] == "providerError"
    assert len(runway.creates) == 1
    assert len(runway.polls()) == POLL_RETRIES + 1


def test_task_throttled_past_the_task_timeout_is_cancelled(
    server_factory: Any, runway: RunwayDouble
) -> None:
    runway.script.throttled_polls = 1
    runway.hold = True  # stays THROTTLED
    server = _server(server_factory, runway, runway_task_timeout_s=0.3)
    status, error = _error(server, _task())
    assert (status, error["code"]) == (ACCEPTED, "timeoutProvider")
    (task,) = runway.tasks.values()
    assert task.deleted
    assert [c.path for c in runway.deletes()] == [f"/v1/tasks/{task.id}"]
    assert all(c.path == f"/v1/tasks/{task.id}" for c in runway.polls())


# -- the backend on its own ---------------------------------------------------------------------


def _backend(double: RunwayDouble, air: str = "runway:4@1") -> RunwayBackend:
    return RunwayBackend(
        REGISTRY.resolve(air).target,
        api_key=TEST_KEY,
        base_url=double.url,
        options=RunwayOptions(poll_interval_s=FAST),
    )


def _job(**fields: Any) -> GenerationJob:
    values: dict[str, Any] = {
        "task_uuid": str(uuid.uuid4()),
        "index": 0,
        "model": "runway:4@1",
        "prompt": "@eiffel at night",
        "width": 1440,
        "height": 1080,
        "seed": 2**62 + 77,
    }
    values.update(fields)
    return GenerationJob(**values)


def _run(
    double: RunwayDouble, job: GenerationJob
) -> tuple[Outcome, list[int], list[dict[str, Any]]]:
    percents: list[int] = []
    checkpoints: list[dict[str, Any]] = []

    async def checkpoint(_: GenerationJob, data: Any) -> None:
        checkpoints.append(dict(data))

    async def go() -> Outcome:
        backend = _backend(double)
        try:
            (outcome,) = await backend.generate(
                [job], lambda _, percent: percents.append(percent), checkpoint
            )
            return outcome
        finally:
            await backend.close()

    return asyncio.run(go()), percents, checkpoints


def test_https_reference_is_passed_to_runway_unchanged(runway: RunwayDouble) -> None:
    url = "https://assets.runware.ai/assets/inputs/9cf22251-9510-44aa-bae6-a78558170517.jpg"
    reference = ReferenceImage(Image.new("RGB", (64, 64)), tag="eiffel", source_url=url)
    outcome, _, _ = _run(runway, _job(reference_images=(reference,)))
    assert isinstance(outcome, GeneratedImage)
    (create,) = runway.creates
    assert create.body["referenceImages"] == [{"uri": url, "tag": "eiffel"}]


def test_progress_checkpoint_and_seed_of_one_task(runway: RunwayDouble) -> None:
    job = _job()
    outcome, percents, checkpoints = _run(runway, job)
    assert isinstance(outcome, GeneratedImage)
    assert outcome.image.size == (1440, 1080)
    assert outcome.seed == job.seed % 2**32 == runway.creates[0].body["seed"]
    assert outcome.cost == 0.08
    assert percents == [25, 75]
    (task,) = runway.tasks.values()
    assert checkpoints == [{"runway_task_id": task.id, "runway_seed": outcome.seed}]


def test_runways_prompt_issue_names_positive_prompt(runway: RunwayDouble) -> None:
    # Longer than Runway takes; submit validation would refuse it, the backend hears Runway.
    outcome, _, _ = _run(runway, _job(prompt="x" * 1001))
    assert isinstance(outcome, ImpastoError)
    assert (outcome.code, outcome.parameter) == ("invalidPositivePrompt", "positivePrompt")


def test_job_with_a_stored_task_id_polls_it_without_creating(runway: RunwayDouble) -> None:
    earlier = runway.add_task(ratio="1440:1080", seed=1234)
    job = _job(resume={"runway_task_id": earlier.id, "runway_seed": 1234})
    outcome, _, checkpoints = _run(runway, job)
    assert isinstance(outcome, GeneratedImage)
    assert outcome.seed == 1234
    assert outcome.image.size == (1440, 1080)
    assert runway.creates == []
    assert len(runway.polls(earlier.id)) == 4  # PENDING, RUNNING, RUNNING, SUCCEEDED
    assert checkpoints == []


def test_stored_task_gone_at_runway_is_a_provider_error(runway: RunwayDouble) -> None:
    outcome, _, _ = _run(runway, _job(resume={"runway_task_id": str(uuid.uuid4())}))
    assert isinstance(outcome, ImpastoError)
    assert outcome.code == "providerError"
    assert runway.creates == []


# -- restart ------------------------------------------------------------------------------------


def _get_response(server: RunningServer, task_uuid: str) -> list[dict[str, Any]]:
    body = server.post([{"taskType": "getResponse", "taskUUID": task_uuid}]).json()
    return list(body.get("data") or []) + list(body.get("errors") or [])


def test_restart_during_polling_resumes_without_a_second_create(
    server_factory: Any, runway: RunwayDouble, tmp_path: Path
) -> None:
    data_dir = tmp_path / "restart"
    runway.hold = True  # the task stays PENDING while the first server polls it
    first = _server(server_factory, runway, data_dir=data_dir)
    task = _task(deliveryMethod="async")
    assert first.post([task]).status_code == 200
    # The id is checkpointed before the first poll: once a poll arrives, it is stored.
    runway.wait_for(lambda: len(runway.polls()) >= 1)
    first.stop()
    runway.hold = False

    second = _server(server_factory, runway, data_dir=data_dir)
    deadline = time.monotonic() + 30
    items = _get_response(second, task["taskUUID"])
    while not any(i.get("status") in ("success", "error") for i in items):
        assert time.monotonic() < deadline, items
        time.sleep(0.02)  # bounded polling of getResponse, as a client does
        items = _get_response(second, task["taskUUID"])

    (item,) = items
    assert item["status"] == "success", item
    assert len(runway.creates) == 1
    assert item["seed"] == runway.creates[0].body["seed"]


# -- the double refuses what Runway refuses -----------------------------------------------------

_PNG = base64.b64encode(image_bytes((8, 8))).decode()
_VALID: dict[str, Any] = {"model": "gen4_image", "promptText": "a cat", "ratio": "1024:1024"}


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({**_VALID, "model": "gen5_image"}, ["model"]),
        ({**_VALID, "ratio": "1000:1000"}, ["ratio"]),
        ({**_VALID, "promptText": ""}, ["promptText"]),
        ({**_VALID, "promptText": "🎨" * 501}, ["promptText"]),
        ({**_VALID, "seed": 2**32}, ["seed"]),
        ({**_VALID, "negativePrompt": "dogs"}, []),
        ({**_VALID, "referenceImages": [{"uri": f"data:image/png;base64,{_PNG}"}] * 4}, None),
        ({**_VALID, "model": "gen4_image_turbo"}, ["referenceImages"]),
        ({**_VALID, "referenceImages": [{"uri": "http://e.com/a.png"}]}, None),
        ({**_VALID, "referenceImages": [{"uri": "https://e.com/a.png", "tag": "a-b"}]}, None),
        ({**_VALID, "referenceImages": [{"uri": "https://e.com/a.png", "tag": "ab"}]}, None),
        ({**_VALID, "referenceImages": [{"uri": "https://e.com/a.png", "role": "x"}]}, None),
        (
            {**_VALID, "referenceImages": [{"uri": "data:image/png;base64," + "A" * 5_242_880}]},
            None,
        ),
        ({**_VALID, "contentModeration": {"publicFigureThreshold": "high"}}, None),
    ],
)
def test_double_refuses_bodies_runway_refuses(
    runway: RunwayDouble, body: dict[str, Any], path: list[Any] | None
) -> None:
    headers = {"Authorization": f"Bearer {TEST_KEY}", "X-Runway-Version": "2024-11-06"}
    response = httpx.post(f"{runway.url}/v1/text_to_image", json=body, headers=headers)
    assert response.status_code == 400
    issues = response.json()["issues"]
    if path is not None:
        assert issues[0]["path"] == path
    assert runway.tasks == {}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"X-Runway-Version": "2024-11-06"}, 401),
        ({"Authorization": "Bearer key_other", "X-Runway-Version": "2024-11-06"}, 401),
        ({"Authorization": f"Bearer {TEST_KEY}"}, 400),
        ({"Authorization": f"Bearer {TEST_KEY}", "X-Runway-Version": "2025-01-01"}, 400),
    ],
)
def test_double_refuses_missing_key_or_version(
    runway: RunwayDouble, headers: dict[str, str], status: int
) -> None:
    response = httpx.post(f"{runway.url}/v1/text_to_image", json=_VALID, headers=headers)
    assert response.status_code == status
    assert "error" in response.json()


def test_double_refuses_a_data_uri_that_is_not_its_image_type(runway: RunwayDouble) -> None:
    headers = {"Authorization": f"Bearer {TEST_KEY}", "X-Runway-Version": "2024-11-06"}
    body = {**_VALID, "referenceImages": [{"uri": f"data:image/jpeg;base64,{_PNG}"}]}
    response = httpx.post(f"{runway.url}/v1/text_to_image", json=body, headers=headers)
    assert response.status_code == 400
    assert "issues" not in response.json()
    valid = {**_VALID, "referenceImages": [{"uri": f"data:image/png;base64,{_PNG}", "tag": "Ab1"}]}
    assert httpx.post(f"{runway.url}/v1/text_to_image", json=valid, headers=headers).is_success
