"""A managed key's rate limit as the official SDKs meet it, unchanged: they surface our 429
rateLimitExceeded and retry it exactly as their code does against Runware.

What each pinned SDK does with it (read from its installed code):

- runware-sdk 1.8.0 over REST retries HTTP 408, 429 and 5xx (transport/rest.py
  `_RETRYABLE_STATUS`, `_should_retry`) `max_retries` times (3 by default) with the same
  payload, so the same taskUUID, backing off `retry_delay * 2**n` ms plus up to 1 s of jitter
  (utils/retry.py); it does not read Retry-After. What is left is a RunwareError with code
  "rateLimit" (errors.py `derive_code`), retryable, status_code 429.
- runware-sdk 1.8.0 over WebSocket does not retry an error frame: the RunwareError (code
  "rateLimit", retryable, no status) ends run() / image_upload() at once (client.py
  `_ws_run_async`, `_ws_send_and_collect`).
- runware 0.5.24 (WebSocket) raises RunwareAPIError carrying our error item, code
  "rateLimitExceeded"; its retry loop retries only ConnectionError (base.py
  `_retry_async_with_reconnect`, `_retry_with_reconnect`).
- @runware/sdk-js 1.3.2 rejects with the error item, `{error: {code: "rateLimitExceeded", …}}`;
  its retry helper rethrows anything with an `error` at once ("API error — skipping retry").

Attempts are counted on the server, impasto_key_tasks_total{key, outcome="rateLimitExceeded"}
of GET /metrics (one per task answered), and for runware-sdk also in its own debug log (what it
sent, its retry lines). The key's bucket is deterministic: the test holds the QuotaGate's clock
still (a drained bucket stays drained through any backoff) and, where a retry should land
after a refill, moves it a minute on once the server has refused the key once.

Every scenario first makes calls within the key's limit: a valid key still gets its images.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from impasto.cli import app
from tests.conftest import RunningServer, image_bytes, make_settings, start_server, tiny_task
from tests.live import wait_finished
from tests.sdk.clients import (
    JS_DIR,
    SDK_DIR,
    assert_images,
    js_sdk_command,
    new_sdk_command,
    png_data_uri,
    run_client,
)

# As tests/integration/test_sdk_runware_legacy.py sets it, before either imports the SDK.
os.environ.setdefault("RUNWARE_VIDEO_INITIAL_TIMEOUT", "2000")

try:
    from runware import IImage, IImageInference, Runware, RunwareAPIError
except ImportError as missing:
    pytest.fail(
        f"runware 0.5.24 is not installed in .venv ({missing}): run ./scripts/install",
        pytrace=False,
    )

SIZE = (128, 128)
WITHIN = {"width": SIZE[0], "height": SIZE[1], "outputType": "base64Data"}
# runware-sdk backs off retry_delay * 2**n ms plus up to 1 s of jitter; a short base keeps
# its default three retries within a few seconds.
RETRY_DELAY_MS = 100


class GateClock:
    """The QuotaGate's clock during one test. It stands still, so a drained bucket stays
    drained however long an SDK backs off; after `refill_after_refusal(key)`, the first reading
    once the server has refused that key is a minute later, when every bucket is full again."""

    def __init__(self, refused: Callable[[str], float]) -> None:
        self.now = time.time()
        self._refused = refused
        self._refill_key: str | None = None

    def refill_after_refusal(self, key: str) -> None:
        self._refill_key = key

    def __call__(self) -> float:
        if self._refill_key is not None and self._refused(self._refill_key) >= 1:
            self._refill_key = None
            self.now += 60.0
        return self.now


def create_key(data_dir: Path, name: str, rate: str | None = None) -> str:
    """`impasto keys create` against the server's data dir; the new key's secret."""
    command = ["keys", "create", "--name", name, "--json"]
    if rate is not None:
        command += ["--rate", rate]
    result = CliRunner().invoke(app, command, env={"IMPASTO_DATA_DIR": str(data_dir)})
    assert result.exit_code == 0, result.output
    return str(json.loads(result.stdout)["apiKey"])


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[RunningServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("sdk-rate") / "data", tiny_models_dir, safety_checker="none"
    )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # A key made before the server starts closes it from the first request on: an open server
    # takes every task as nobody's, without limits. Later keys are found by their digest.
    create_key(settings.data_dir, "bootstrap")
    running = start_server(settings)
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def gate_clock(server: RunningServer) -> Iterator[GateClock]:
    runtime = server.runtime()
    quotas = runtime.dispatcher._quotas
    registry = runtime.metrics.registry

    def refused(key: str) -> float:
        labels = {"key": key, "outcome": "rateLimitExceeded"}
        return registry.get_sample_value("impasto_key_tasks_total", labels) or 0.0

    clock = GateClock(refused)
    saved, quotas._clock = quotas._clock, clock
    yield clock
    quotas._clock = saved


def new_key(server: RunningServer, prefix: str, rate: str) -> tuple[str, str]:
    """A fresh key (its own buckets and metric series): name and secret."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    return name, create_key(server.settings.data_dir, name, rate)


def refusals(server: RunningServer, key: str) -> int:
    """Tasks of `key` the server answered with rateLimitExceeded, from GET /metrics."""
    text = httpx.get(f"{server.base}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "impasto_key_tasks_total"
                and sample.labels.get("key") == key
                and sample.labels.get("outcome") == "rateLimitExceeded"
            ):
                return int(sample.value)
    return 0


def ws_url(server: RunningServer) -> str:
    return f"ws://127.0.0.1:{server.settings.port}/v1"


def url_for(server: RunningServer, transport: str) -> str:
    return ws_url(server) if transport == "websocket" else server.url


def image_items(images: list[IImage]) -> list[dict[str, Any]]:
    """The legacy SDK's IImage results as the dicts assert_images reads."""
    return [{k: v for k, v in asdict(image).items() if v is not None} for image in images]


@pytest.fixture(scope="module")
def new_sdk() -> list[str]:
    python, _ = new_sdk_command()
    return [python, str(SDK_DIR / "python_new_rate_client.py")]


@pytest.fixture(scope="module")
def js_sdk() -> list[str]:
    node, _ = js_sdk_command()
    return [node, str(JS_DIR / "rate_client.mjs")]


def burst(refused_uuid: str, within: int) -> list[dict[str, Any]]:
    """`within` runs the key's limit allows (sync, then the SDK's default delivery), then one
    over it with `refused_uuid`."""
    deliveries: list[dict[str, Any]] = [{"deliveryMethod": "sync"}, {}]
    calls = [{"run": {**WITHIN, **deliveries[i % 2]}} for i in range(within)]
    return [*calls, {"run": {**WITHIN, "taskUUID": refused_uuid}}]


def test_over_its_rate_a_key_gets_429_retry_after_and_an_error_item(server: RunningServer) -> None:
    """What the SDKs parse: a 429 whose Retry-After says when the bucket has a token again, and
    one error item naming the task; the same taskUUID is refused again, as nothing of it was
    accepted."""
    name, secret = new_key(server, "wire", "1/min")
    auth = {"Authorization": f"Bearer {secret}"}
    assert server.post([tiny_task(deliveryMethod="async")], headers=auth).status_code == 200
    refused = tiny_task(deliveryMethod="async")
    for _ in range(2):
        reply = server.post([refused], headers=auth)
        assert reply.status_code == 429
        assert reply.headers["Retry-After"] == "60"  # 1/min, the clock standing still
        [error] = reply.json()["errors"]
        assert "data" not in reply.json()
        assert error["code"] == "rateLimitExceeded"
        assert (error["taskType"], error["taskUUID"]) == ("imageInference", refused["taskUUID"])
        assert name in error["message"]
    assert refusals(server, name) == 2


def test_runware_sdk_over_rest_retries_a_429_then_raises_it(
    server: RunningServer, new_sdk: list[str], gate_clock: GateClock
) -> None:
    name, secret = new_key(server, "new-rest", "2/min")
    refused = str(uuid.uuid4())
    args = {"api_key": secret, "retry_delay": RETRY_DELAY_MS, "calls": burst(refused, 2)}
    result = run_client(new_sdk, server.url, "calls", args)
    *within, over = result["outcomes"]
    assert len(within) == 2
    for outcome in within:
        assert_images(outcome["items"], 1, "base64Data", SIZE)
    error = over["error"]
    assert error["type"] == "RunwareError"
    assert (error["code"], error["retryable"], error["status_code"]) == ("rateLimit", True, 429)
    assert (error["task_type"], error["task_uuid"]) == ("imageInference", refused)
    assert name in error["message"]
    # The SDK's default: three retries, each the same task again.
    max_retries = result["config"]["max_retries"]
    assert max_retries == 3
    assert result["sends"][refused] == 1 + max_retries
    assert len(result["retries"]) == max_retries
    assert all("HTTP 429" in line for line in result["retries"]), result["retries"]
    assert refusals(server, name) == 1 + max_retries
    # Refused retries took nothing: half a minute on (one token at 2/min), the same taskUUID
    # is accepted.
    gate_clock.now += 30.0
    again = tiny_task(taskUUID=refused, deliveryMethod="async")
    assert server.post([again], headers={"Authorization": f"Bearer {secret}"}).status_code == 200


def test_runware_sdk_over_rest_gets_its_images_when_a_retry_lands_after_the_refill(
    server: RunningServer, new_sdk: list[str], gate_clock: GateClock
) -> None:
    name, secret = new_key(server, "new-refill", "1/min")
    gate_clock.refill_after_refusal(name)
    refused = str(uuid.uuid4())
    args = {"api_key": secret, "retry_delay": RETRY_DELAY_MS, "calls": burst(refused, 1)}
    result = run_client(new_sdk, server.url, "calls", args)
    first, retried = result["outcomes"]
    assert_images(first["items"], 1, "base64Data", SIZE)
    # The refused taskUUID, sent again after the backoff, was accepted and ran.
    assert_images(retried["items"], 1, "base64Data", SIZE)
    assert {item["taskUUID"] for item in retried["items"]} == {refused}
    assert result["sends"][refused] == 2
    [retry] = result["retries"]
    assert "HTTP 429" in retry
    assert refusals(server, name) == 1


def test_runware_sdk_over_websocket_raises_the_rate_limit_without_retrying(
    server: RunningServer, new_sdk: list[str]
) -> None:
    name, secret = new_key(server, "new-ws", "2/min")
    refused = str(uuid.uuid4())
    args = {"api_key": secret, "retry_delay": RETRY_DELAY_MS, "calls": burst(refused, 2)}
    result = run_client(new_sdk, ws_url(server), "calls", args)
    *within, over = result["outcomes"]
    assert len(within) == 2
    for outcome in within:
        assert_images(outcome["items"], 1, "base64Data", SIZE)
    error = over["error"]
    assert error["type"] == "RunwareError"
    # An error frame has no HTTP status; the raw code shows in the SDK's log of frames.
    assert (error["code"], error["retryable"], error["status_code"]) == ("rateLimit", True, None)
    assert (error["task_type"], error["task_uuid"]) == ("imageInference", refused)
    assert error["wire_codes"] == ["rateLimitExceeded"]
    assert name in error["message"]
    assert result["sends"][refused] == 1
    assert result["retries"] == []
    assert refusals(server, name) == 1


def test_the_legacy_sdk_raises_runware_api_error_with_our_code_without_retrying(
    server: RunningServer,
) -> None:
    name, secret = new_key(server, "legacy", "2/min")
    refused = str(uuid.uuid4())

    def request(**fields: Any) -> IImageInference:
        return IImageInference(
            model="impasto:tiny@1",
            positivePrompt="a lighthouse at dusk",
            width=SIZE[0],
            height=SIZE[1],
            outputType="base64Data",
            **fields,
        )

    async def scenario() -> tuple[list[list[IImage]], RunwareAPIError]:
        client = Runware(api_key=secret, url=ws_url(server))
        await client.connect()
        try:
            # Sync (the SDK's default), then async with getResponse.
            within = [await client.imageInference(request())]
            ack = await client.imageInference(request(deliveryMethod="async"))
            await asyncio.to_thread(wait_finished, server, ack.taskUUID)
            within.append(await client.getResponse(ack.taskUUID, numberResults=1))
            with pytest.raises(RunwareAPIError) as raised:
                await client.imageInference(request(taskUUID=refused))
            return within, raised.value
        finally:
            await client.disconnect()

    within, error = asyncio.run(scenario())
    for images in within:
        assert_images(image_items(images), 1, "base64Data", SIZE)
    assert error.code == "rateLimitExceeded"
    assert error.error_data["taskUUID"] == refused
    assert error.error_data["taskType"] == "imageInference"
    assert name in error.error_data["message"]
    assert refusals(server, name) == 1


def test_the_js_sdk_rejects_with_our_error_item_without_retrying(
    server: RunningServer, js_sdk: list[str]
) -> None:
    name, secret = new_key(server, "js", "2/min")
    refused = str(uuid.uuid4())
    calls = [{"run": WITHIN}, {"run": WITHIN}, {"run": {**WITHIN, "taskUUID": refused}}]
    result = run_client(js_sdk, ws_url(server), "calls", {"apiKey": secret, "calls": calls})
    *within, over = result["outcomes"]
    assert len(within) == 2
    for outcome in within:
        assert_images(outcome["images"], 1, "base64Data", SIZE)
    error = over["rejection"]["error"]
    assert error["code"] == "rateLimitExceeded"
    assert (error["taskType"], error["taskUUID"]) == ("imageInference", refused)
    assert name in error["message"]
    assert refusals(server, name) == 1


@pytest.mark.parametrize("transport", ["rest", "websocket"])
def test_an_image_upload_over_the_rate_meets_the_same_handling_in_runware_sdk(
    server: RunningServer, new_sdk: list[str], transport: str
) -> None:
    """imageUpload takes a token too (it does work); REST retries it (here once), WebSocket
    raises it."""
    name, secret = new_key(server, f"upload-{transport}", "1/min")
    image = png_data_uri()
    args = {
        "api_key": secret,
        "max_retries": 1,
        "retry_delay": RETRY_DELAY_MS,
        "calls": [{"upload": image}, {"upload": image}],
    }
    result = run_client(new_sdk, url_for(server, transport), "calls", args)
    uploaded, over = result["outcomes"]
    [item] = uploaded["items"]
    assert item["imageUUID"]
    error = over["error"]
    assert (error["code"], error["task_type"]) == ("rateLimit", "imageUpload")
    attempts = 2 if transport == "rest" else 1
    assert error["status_code"] == (429 if transport == "rest" else None)
    assert result["sends"][error["task_uuid"]] == attempts
    assert refusals(server, name) == attempts


def test_an_image_upload_over_the_rate_is_rejected_by_the_js_and_legacy_sdks(
    server: RunningServer, js_sdk: list[str], tmp_path: Path
) -> None:
    name, secret = new_key(server, "upload-js", "1/min")
    image = png_data_uri()
    calls = [{"upload": image}, {"upload": image}]
    result = run_client(js_sdk, ws_url(server), "calls", {"apiKey": secret, "calls": calls})
    uploaded, over = result["outcomes"]
    assert uploaded["upload"]["imageUUID"]
    error = over["rejection"]["error"]
    assert (error["code"], error["taskType"]) == ("rateLimitExceeded", "imageUpload")
    assert refusals(server, name) == 1

    name, secret = new_key(server, "upload-legacy", "1/min")
    path = tmp_path / "reference.png"
    path.write_bytes(image_bytes())

    async def scenario() -> tuple[Any, RunwareAPIError]:
        client = Runware(api_key=secret, url=ws_url(server))
        await client.connect()
        try:
            first = await client.uploadImage(str(path))
            with pytest.raises(RunwareAPIError) as raised:
                await client.uploadImage(str(path))
            return first, raised.value
        finally:
            await client.disconnect()

    first, legacy_error = asyncio.run(scenario())
    assert first.imageUUID
    assert legacy_error.code == "rateLimitExceeded"
    assert legacy_error.error_data["taskType"] == "imageUpload"
    assert refusals(server, name) == 1
