"""Async tasks, getResponse polling, webhooks and upload endpoints against real receivers."""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from typing import Any

import httpx
from PIL import Image

from impasto.delivery.signing import SIGNATURE_HEADER, verify_signature
from tests.conftest import LoopbackHTTP, Recorded, RunningServer
from tests.failing_backend import failing_models_file

FAST_RETRIES: dict[str, Any] = {
    "delivery_base_delay_s": 0.02,
    "delivery_max_delay_s": 0.1,
    "delivery_connect_timeout_s": 2.0,
}


def task(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "impasto:tiny@1",
        "positivePrompt": "a red kite over the dunes",
        "width": 256,
        "height": 192,
    }
    body.update(overrides)
    return body


def poll_until_done(
    server: RunningServer, task_uuid: str, polls: int = 600
) -> list[dict[str, Any]]:
    """getResponse until no item is processing; returns every reply seen, last one last."""
    seen: list[dict[str, Any]] = []
    for _ in range(polls):
        reply = server.post([{"taskType": "getResponse", "taskUUID": task_uuid}]).json()
        seen.append(reply)
        items = reply.get("data", [])
        if items and all(item["status"] != "processing" for item in items):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"task {task_uuid} still processing after {polls} polls")


def wait_for(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def test_async_task_is_acknowledged_then_polled_through_processing_to_success(
    server: RunningServer,
) -> None:
    # Big enough to be caught mid-way: progress comes from the diffusers step callback.
    body = task(width=1024, height=1024, steps=40, numberResults=2, deliveryMethod="async")

    ack = server.post([body])

    assert ack.status_code == 200
    assert ack.json() == {"data": [{"taskType": "imageInference", "taskUUID": body["taskUUID"]}]}
    replies = poll_until_done(server, body["taskUUID"])
    final = replies[-1]["data"]
    assert [item["status"] for item in final] == ["success", "success"]
    for item in final:
        assert item["taskType"] == "imageInference"
        assert item["taskUUID"] == body["taskUUID"]
        assert httpx.get(item["imageURL"]).status_code == 200
    processing = [
        item for reply in replies for item in reply["data"] if item["status"] == "processing"
    ]
    assert processing, "never saw the task processing"
    assert all(0 <= item["progress"] <= 100 for item in processing)
    assert any(item["progress"] > 0 for item in processing)


def test_webhook_retries_a_failing_receiver_until_it_succeeds_and_signs_the_body(
    server_factory: Any, loopback_http: LoopbackHTTP
) -> None:
    secret = "whsec-test"
    server = server_factory(webhook_secret=secret, **FAST_RETRIES)
    calls: list[Recorded] = []

    def flaky(request: Recorded) -> tuple[int, str, bytes]:
        calls.append(request)
        return (503, "text/plain", b"busy") if len(calls) <= 2 else (200, "text/plain", b"ok")

    loopback_http.handler = flaky
    body = task(webhookURL=loopback_http.url("/hook?token=abc"), numberResults=1)

    reply = server.post([body]).json()

    assert len(reply["data"]) == 1
    wait_for(lambda: len(calls) >= 3)
    delivered = calls[2]
    assert delivered.method == "POST"
    assert delivered.path == "/hook?token=abc"
    payload = json.loads(delivered.body)
    assert payload == {"data": [reply["data"][0]]}
    assert delivered.headers["User-Agent"].startswith("impasto/")
    assert verify_signature(secret, delivered.headers[SIGNATURE_HEADER], delivered.body)
    assert not verify_signature("wrong", delivered.headers[SIGNATURE_HEADER], delivered.body)
    # Every attempt carries the same delivery id, so receivers can drop duplicates.
    assert len({c.headers["X-Impasto-Delivery"] for c in calls}) == 1


def test_webhook_is_not_retried_after_a_400(
    server_factory: Any, loopback_http: LoopbackHTTP
) -> None:
    server = server_factory(**FAST_RETRIES)
    loopback_http.routes["/hook"] = (400, "text/plain", b"bad")
    body = task(webhookURL=loopback_http.url("/hook"), deliveryMethod="async")
    server.post([body])
    poll_until_done(server, body["taskUUID"])

    runtime = server.runtime()
    wait_for(
        lambda: all(
            d.status == "failed" for d in server.call(runtime.state.deliveries(body["taskUUID"]))
        )
    )
    deliveries = server.call(runtime.state.deliveries(body["taskUUID"]))
    assert [d.attempts for d in deliveries] == [1]
    assert len([r for r in loopback_http.requests if r.path == "/hook"]) == 1


def test_webhook_receiver_that_hangs_past_the_read_timeout_is_retried(
    server_factory: Any, loopback_http: LoopbackHTTP
) -> None:
    server = server_factory(webhook_read_timeout_s=0.3, **FAST_RETRIES)
    release = threading.Event()
    calls: list[Recorded] = []

    def hang_once(request: Recorded) -> tuple[int, str, bytes]:
        calls.append(request)
        if len(calls) == 1:
            release.wait(5)
        return (200, "text/plain", b"ok")

    loopback_http.handler = hang_once
    body = task(webhookURL=loopback_http.url("/slow"))
    server.post([body])
    wait_for(lambda: len(calls) >= 2)
    release.set()
    runtime = server.runtime()
    wait_for(
        lambda: (
            [d.status for d in server.call(runtime.state.deliveries(body["taskUUID"]))] == ["done"]
        )
    )
    delivery = server.call(runtime.state.deliveries(body["taskUUID"]))[0]
    assert delivery.attempts == 2


def test_webhook_fires_for_a_failed_task_with_errors(
    server_factory: Any, loopback_http: LoopbackHTTP, tmp_path: Any
) -> None:
    # A backend that fails every generation after acceptance: a task-level error.
    server = server_factory(models=failing_models_file(tmp_path), **FAST_RETRIES)
    loopback_http.routes["/hook"] = (200, "text/plain", b"ok")
    body = task(webhookURL=loopback_http.url("/hook"))
    body["deliveryMethod"] = "async"
    server.post([body])
    wait_for(lambda: any(r.path == "/hook" for r in loopback_http.requests))
    payload = json.loads(next(r for r in loopback_http.requests if r.path == "/hook").body)
    assert list(payload) == ["errors"]
    assert payload["errors"][0]["taskUUID"] == body["taskUUID"]
    assert payload["errors"][0]["code"]


def test_upload_endpoint_receives_each_image_with_its_content_type(
    server: RunningServer, loopback_http: LoopbackHTTP
) -> None:
    loopback_http.routes["/bucket/out.webp"] = (200, "text/plain", b"")
    body = task(
        outputFormat="WEBP",
        numberResults=2,
        uploadEndpoint=loopback_http.url("/bucket/out.webp?X-Amz-Signature=abc"),
    )

    reply = server.post([body])

    assert reply.status_code == 200
    assert "errors" not in reply.json()
    puts = [r for r in loopback_http.requests if r.method == "PUT"]
    # The sync reply waits until the uploads have settled.
    assert len(puts) == 2
    for put in puts:
        assert put.headers["Content-Type"] == "image/webp"
        image = Image.open(io.BytesIO(put.body))
        assert image.format == "WEBP"
        assert image.size == (256, 192)


def test_failed_upload_is_reported_on_the_task_and_the_image_is_kept(
    server_factory: Any, loopback_http: LoopbackHTTP
) -> None:
    server = server_factory(delivery_max_attempts=3, **FAST_RETRIES)
    loopback_http.routes["/bucket/x.jpg"] = (500, "text/plain", b"broken")
    body = task(uploadEndpoint=loopback_http.url("/bucket/x.jpg"))

    reply = server.post([body]).json()

    assert len(reply["data"]) == 1
    kept = reply["data"][0]
    assert httpx.get(kept["imageURL"]).status_code == 200
    assert [e["code"] for e in reply["errors"]] == ["uploadFailed"]
    assert reply["errors"][0]["taskUUID"] == body["taskUUID"]
    assert reply["errors"][0]["parameter"] == "uploadEndpoint"
    assert len([r for r in loopback_http.requests if r.method == "PUT"]) == 3
    polled = server.post([{"taskType": "getResponse", "taskUUID": body["taskUUID"]}]).json()
    statuses = sorted(item["status"] for item in polled["data"])
    assert statuses == ["error", "success"]
    error_item = next(i for i in polled["data"] if i["status"] == "error")
    assert error_item["error"]["code"] == "uploadFailed"


def test_webhook_and_upload_urls_are_refused_for_private_addresses_by_default(
    server_factory: Any, loopback_http: LoopbackHTTP
) -> None:
    server = server_factory(allow_private_networks=False)
    for parameter in ("webhookURL", "uploadEndpoint"):
        body = task(**{parameter: loopback_http.url("/x")})
        reply = server.post([body])
        assert reply.status_code == 400
        error = reply.json()["errors"][0]
        assert error["parameter"] == parameter
        assert error["code"] == f"invalid{parameter[0].upper()}{parameter[1:]}"
    assert loopback_http.requests == []
