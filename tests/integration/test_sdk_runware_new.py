"""The new official Python SDK, `runware-sdk` 1.8.0 (import name `runware`), as a client of
impasto, unchanged, over both of its transports: WebSocket (its default) and REST.

It runs in its own virtualenv (.venv-sdk, made by ./scripts/install) through
tests/sdk/python_new_client.py, which prints what the SDK returned; the test checks the images.
`run()` defaults to deliveryMethod "async": ACK, then getResponse polling.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import RunningServer
from tests.gated_backend import Gate, gated_server
from tests.integration.test_media_storage import assert_square_outline, data_uri, square_png
from tests.live import session_buffered, wait_detached, wait_finished, wait_until
from tests.sdk.clients import (
    ClientProcess,
    assert_images,
    new_sdk_command,
    png_data_uri,
    run_client,
)
from tests.sdk.tcp_proxy import TcpProxy

OUTPUT_TYPES = ("URL", "base64Data", "dataURI")
TRANSPORTS = ("websocket", "rest")


@pytest.fixture(scope="module")
def sdk() -> list[str]:
    return new_sdk_command()


@pytest.fixture(scope="module")
def gate() -> Gate:
    return Gate()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path, gate: Gate
) -> Iterator[RunningServer]:
    with gated_server(tmp_path_factory.mktemp("sdk-new"), tiny_models_dir, gate) as running:
        yield running


def url_for(server: RunningServer, transport: str) -> str:
    port = server.settings.port
    return f"ws://127.0.0.1:{port}/v1" if transport == "websocket" else server.url


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_text_to_image_gives_two_distinct_images_in_every_output_type(
    server: RunningServer, sdk: list[str], transport: str
) -> None:
    tasks: list[dict[str, Any]] = [
        {"numberResults": 2, "outputType": output, "width": 128, "height": 64, **delivery}
        for output in OUTPUT_TYPES
        for delivery in ({"deliveryMethod": "sync"}, {})  # {}: the SDK's default, async
    ]
    results = run_client(sdk, url_for(server, transport), "generate", {"tasks": tasks})
    assert len(results) == len(tasks)
    for task, items in zip(tasks, results, strict=True):
        assert_images(items, 2, task["outputType"], (128, 64))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_uploaded_image_is_a_reference_image(
    server: RunningServer, sdk: list[str], transport: str
) -> None:
    args = {
        "image": png_data_uri(),
        "task": {"deliveryMethod": "sync", "outputType": "base64Data", "width": 64, "height": 64},
    }
    result = run_client(sdk, url_for(server, transport), "upload_reference", args)
    [upload] = result["upload"]
    assert upload["taskType"] == "imageUpload"
    assert upload["imageUUID"]
    assert upload["imageURL"].startswith("http://")
    assert_images(result["items"], 1, "base64Data", (64, 64))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_stored_media_is_a_reference_image_and_a_preprocess_input_then_deleted(
    server: RunningServer, sdk: list[str], transport: str
) -> None:
    """media_storage (the SDK's replacement for image_upload) upload, then the mediaUUID as a
    reference image and as the input of a controlNetPreprocess run() (async: ACK, then
    getResponse polls), then media_storage delete."""
    args = {
        "media": data_uri(square_png()),
        "task": {"deliveryMethod": "sync", "outputType": "base64Data", "width": 64, "height": 64},
    }
    result = run_client(sdk, url_for(server, transport), "media_storage", args)
    [upload] = result["upload"]
    assert (upload["taskType"], upload["operation"]) == ("mediaStorage", "upload")
    assert upload["mediaURL"].startswith("http://")
    assert_images(result["items"], 1, "base64Data", (64, 64))
    [guide] = result["guide"]
    assert guide["taskType"] == "controlNetPreprocess"
    assert guide["inputImageUUID"] == upload["mediaUUID"]
    edges = Image.open(io.BytesIO(base64.b64decode(guide["guideImageBase64Data"])))
    assert (edges.format, edges.size) == ("PNG", (128, 96))
    assert_square_outline(edges)
    assert result["deleted"] == [
        {
            "taskType": "mediaStorage",
            "taskUUID": result["deleted"][0]["taskUUID"],
            "operation": "delete",
            "mediaUUID": upload["mediaUUID"],
        }
    ]
    assert httpx.get(upload["mediaURL"], timeout=30).status_code == 404


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_get_response_returns_the_results_of_an_async_task(
    server: RunningServer, sdk: list[str], transport: str
) -> None:
    args = {"task": {"numberResults": 2, "outputType": "URL"}}
    result = run_client(sdk, url_for(server, transport), "get_response", args)
    assert_images(result["items"], 2, "URL", (64, 64))
    polled = result["get_response"]
    assert {item["status"] for item in polled} == {"success"}
    assert {item["imageUUID"] for item in polled} == {i["imageUUID"] for i in result["items"]}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_task_details_and_account_details_through_the_sdks_own_calls(
    server: RunningServer, sdk: list[str], transport: str
) -> None:
    args = {"task": {"numberResults": 2, "outputType": "URL", "includeCost": True}}
    result = run_client(sdk, url_for(server, transport), "account", args)
    items = result["items"]
    (details,) = result["task_details"]
    assert details["taskType"] == "getTaskDetails"
    request = details["request"][0]
    assert request["taskUUID"] == details["taskUUID"] == items[0]["taskUUID"]
    assert request["numberResults"] == 2
    assert {i["imageUUID"] for i in details["response"]["data"]} == {i["imageUUID"] for i in items}
    assert details["cost"] == pytest.approx(sum(i["cost"] for i in items))
    assert details["timings"]["totalMs"] >= 0
    (account,) = result["account"]
    assert account["taskType"] == "accountManagement"
    assert account["operation"] == "getDetails"
    # An open server: the client is nobody, and sees the usage of everyone.
    assert account["usage"]["total"]["images"] >= 2


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("field", "value", "wire_code"),
    [("width", 13, "invalidWidth"), ("outputQuality", 5, "invalidOutputQuality")],
)
def test_an_invalid_parameter_is_a_runware_error_naming_it(
    server: RunningServer, sdk: list[str], transport: str, field: str, value: int, wire_code: str
) -> None:
    """runware-sdk deliberately maps the server's code to a small category (`invalid…` →
    "validation") and keeps the parameter; the raw code shows only in its debug log of received
    WebSocket frames."""
    args = {"task": {"deliveryMethod": "sync", field: value}}
    error = run_client(sdk, url_for(server, transport), "expect_error", args)
    assert error["type"] == "RunwareError"
    assert error["code"] == "validation"
    assert error["parameter"] == field
    assert error["task_uuid"]
    if transport == "websocket":
        assert error["wire_codes"] == [wire_code]
    else:
        assert error["status_code"] == 400


def test_a_websocket_frame_over_1_mib_is_a_lost_connection_for_the_sdk_and_url_output_is_not(
    server: RunningServer, sdk: list[str]
) -> None:
    """Pinned SDK limit (docs/websocket.md): runware-sdk's socket takes frames up to 1 MiB (the
    `websockets` default). One 1024x1024 PNG as base64Data is more: the SDK drops the socket
    and fails the task with connectionLost. The same task with URL output comes through."""
    big = {
        "deliveryMethod": "sync",
        "outputFormat": "PNG",
        "outputType": "base64Data",
        "width": 1024,
        "height": 1024,
    }
    url = url_for(server, "websocket")
    error = run_client(sdk, url, "expect_error", {"task": big})
    assert error["code"] == "connection"
    assert "Connection lost" in error["message"]
    [items] = run_client(sdk, url, "generate", {"tasks": [{**big, "outputType": "URL"}]})
    assert_images(items, 1, "URL", (1024, 1024))


def test_websocket_sync_task_survives_a_drop_by_resuming_its_session(
    server: RunningServer, sdk: list[str], gate: Gate
) -> None:
    """Recovery here means: the SDK reconnects and re-authenticates with its
    connectionSessionUUID, the server answers with the same session and flushes the images it
    buffered while the client was away, and run() returns all of them.

    runware-sdk keeps waiting for a sync task across a reconnect only once a frame of it has
    arrived (before that it fails the task with connectionLost), so the cut comes after the
    first image, while the second is held in generation."""
    task = {"numberResults": 3, "deliveryMethod": "sync"}
    with TcpProxy(server.settings.port) as proxy, gate.hold(passes=1):
        client = ClientProcess(sdk, proxy.ws_url(), "drop", {"task": task})
        try:
            session = client.wait_event("connected")["session"]
            task_uuid = client.wait_event("submitted")["taskUUID"]
            client.wait_event("result")
            gate.wait_held()
            proxy.hold_new()
            assert proxy.cut() == 1
            wait_detached(server, session)
            gate.release()
            # The rest is generated and buffered while the client cannot get in.
            wait_finished(server, task_uuid)
            wait_until(lambda: session_buffered(server, session) == 2, what="2 buffered frames")
            proxy.let_in()
            result = client.result()
        finally:
            client.kill()
    assert result["sessions"] == [session], "the SDK resumed its session"
    assert proxy.accepted == 2
    assert_images(result["items"], 3, "URL", (64, 64))


def test_websocket_async_task_survives_a_drop_while_polling(
    server: RunningServer, sdk: list[str], gate: Gate
) -> None:
    """run()'s default: ACK then getResponse polls. The connection is cut between polls while
    the task is still generating; the SDK resumes its session, resends the poll it had in
    flight, and keeps polling until the images are there."""
    task = {"numberResults": 2}
    with TcpProxy(server.settings.port) as proxy, gate.hold():
        client = ClientProcess(sdk, proxy.ws_url(), "drop", {"task": task})
        try:
            session = client.wait_event("connected")["session"]
            client.wait_event("progress")  # a poll answered "processing"
            gate.wait_held()
            assert proxy.cut() == 1
            wait_detached(server, session)
            gate.release()
            result = client.result()
        finally:
            client.kill()
    assert result["sessions"] == [session]
    assert proxy.accepted >= 2
    assert_images(result["items"], 2, "URL", (64, 64))


def test_websocket_async_task_whose_ack_was_lost_is_resent_and_the_conflict_is_its_ack(
    server: RunningServer, sdk: list[str], gate: Gate
) -> None:
    """The ACK never reaches the client (the proxy swallows it), then the connection drops.
    After re-authenticating, the SDK resends the async task with the same taskUUID; impasto
    answers conflictTaskUUID (the task is running), which runware-sdk takes as the ACK of its
    resend, and it polls getResponse to the results."""
    task = {"numberResults": 2}
    with TcpProxy(server.settings.port) as proxy, gate.hold():
        client = ClientProcess(sdk, proxy.ws_url(), "drop", {"task": task, "wait_go": True})
        try:
            session = client.wait_event("connected")["session"]
            client.wait_event("ready")
            proxy.swallow()
            client.tell("go")
            gate.wait_held()  # accepted and generating; its ACK went nowhere
            assert proxy.cut() == 1
            wait_detached(server, session)
            gate.release()
            result = client.result()
        finally:
            client.kill()
    assert result["wire_codes"] == ["conflictTaskUUID"]
    assert result["sessions"] == [session]
    assert_images(result["items"], 2, "URL", (64, 64))


def test_rest_async_task_survives_a_drop_while_polling(
    server: RunningServer, sdk: list[str], gate: Gate
) -> None:
    """Over REST each poll is its own POST: the one that meets the cut connection is retried
    by the SDK on a new one."""
    task = {"numberResults": 2}
    with TcpProxy(server.settings.port) as proxy, gate.hold():
        client = ClientProcess(sdk, proxy.http_url(), "drop", {"task": task})
        try:
            client.wait_event("progress")
            gate.wait_held()
            assert proxy.cut() >= 1
            gate.release()
            result = client.result()
        finally:
            client.kill()
    assert proxy.accepted >= 2, "the polls went on over a new connection"
    assert_images(result["items"], 2, "URL", (64, 64))


def test_rest_sync_task_cut_mid_generation_is_a_conflict_and_get_response_has_it(
    server: RunningServer, sdk: list[str], gate: Gate
) -> None:
    """Pinned behaviour, not recovery: when the connection of a sync POST drops, runware-sdk
    retries the same request, same taskUUID. impasto already runs that task, so the retry gets
    conflictTaskUUID (400), which the SDK raises as a "validation" RunwareError carrying the
    taskUUID. Nothing is lost: getResponse with that taskUUID returns the images. (Use the
    SDK's default async delivery over REST to have this handled for you.)"""
    task = {"numberResults": 2, "deliveryMethod": "sync"}
    with TcpProxy(server.settings.port) as proxy, gate.hold():
        client = ClientProcess(sdk, proxy.http_url(), "drop", {"task": task})
        try:
            gate.wait_held()
            proxy.cut()
            gate.release()
            result = client.outcome()
        finally:
            client.kill()
    assert "result" in result, result
    error = result["result"]["error"]
    assert error["code"] == "validation"
    assert error["status_code"] == 400
    assert error["parameter"] == "taskUUID"
    assert "already used" in error["message"]
    polled = result["result"]["get_response"]
    assert_images(polled, 2, "URL", (64, 64))
    assert {item["taskUUID"] for item in polled} == {error["task_uuid"]}
