"""Regressions of issue 10 over REST, each against a real server on loopback: the key is
checked before the body is read, limits hold, accepted work fails with statuses the SDKs do
not retry, tasks belong to their key, inputs are fetched once, uploads in retry are not
reported done, and /healthz tells the truth."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import socket
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import (
    LoopbackHTTP,
    Recorded,
    RunningServer,
    image_bytes,
    make_settings,
    start_server,
    tiny_task,
)
from tests.failing_backend import failing_models_file
from tests.gated_backend import Gate
from tests.live import wait_finished, wait_until
from tests.sdk.clients import new_sdk_command, run_client

ServerFactory = Callable[..., RunningServer]
KEY_A, KEY_B = "key-a-0123456789", "key-b-0123456789"
FAST = {
    "safety_checker": "none",
    "max_tasks_per_request": 5,
    "max_unauthenticated_body_bytes": 1000,
    "delivery_max_attempts": 2,
    "delivery_base_delay_s": 0.05,
}


def _module_server(factory: pytest.TempPathFactory, cache: Path, **overrides: Any) -> RunningServer:
    root = factory.mktemp("rest-hardening")
    return start_server(make_settings(root / "data", cache, **{**FAST, **overrides}))


@pytest.fixture(scope="module")
def open_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[RunningServer]:
    running = _module_server(tmp_path_factory, tiny_models_dir)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def keyed_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[RunningServer]:
    running = _module_server(tmp_path_factory, tiny_models_dir, api_keys=[KEY_A, KEY_B])
    yield running
    running.stop()


@pytest.fixture(scope="module")
def failing_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[RunningServer]:
    models = failing_models_file(tmp_path_factory.mktemp("failing-models"))
    running = _module_server(tmp_path_factory, tiny_models_dir, models=models)
    yield running
    running.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def get_response(server: RunningServer, task_uuid: str, key: str | None = None) -> httpx.Response:
    task = {"taskType": "getResponse", "taskUUID": task_uuid}
    return server.post([task], headers=bearer(key) if key else {})


def error_codes(response: httpx.Response) -> list[str]:
    return [e["code"] for e in response.json().get("errors", [])]


def raw_request(port: int, head: bytes, body_part: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head + b"\r\n" + body_part)
    return sock


def read_reply(sock: socket.socket) -> tuple[bytes, bytes]:
    """(status line and headers, body) of one reply; the 10 s socket timeout fails the test
    when the server never answers."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return head, body


# --- the key before the body -----------------------------------------------------------------


def test_a_wrong_bearer_key_gets_401_before_the_body_is_read(keyed_server: RunningServer) -> None:
    head = (
        b"POST /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer wrong-key\r\n"
        b"Content-Type: application/json\r\nContent-Length: 30000000\r\n"
    )
    # 30 MB announced, 20 bytes sent: a server that reads the body first never answers.
    with raw_request(keyed_server.settings.port, head, b'[{"taskType": "ping",') as sock:
        head, body = read_reply(sock)
    assert head.startswith(b"HTTP/1.1 401"), head
    assert json.loads(body)["errors"][0]["code"] == "invalidApiKey", body


def test_an_unauthenticated_body_is_capped_small_and_a_leading_authentication_task_works(
    keyed_server: RunningServer,
) -> None:
    auth = {"taskType": "authentication", "apiKey": KEY_A}
    padded = [auth, {"taskType": "ping", "ping": True, "padding": "x" * 2000}]
    too_large = keyed_server.post(padded)
    assert too_large.status_code == 413, too_large.text
    assert error_codes(too_large) == ["payloadTooLarge"]
    small = keyed_server.post([auth, {"taskType": "ping", "ping": True}])
    assert small.status_code == 200, small.text
    assert small.json()["data"] == [{"taskType": "ping", "pong": True}]


# --- limits ----------------------------------------------------------------------------------


def test_more_tasks_than_allowed_are_refused_whole_and_none_runs(
    open_server: RunningServer,
) -> None:
    tasks = [tiny_task(deliveryMethod="async", steps=1) for _ in range(6)]
    response = open_server.post(tasks)
    assert response.status_code == 413, response.text
    assert error_codes(response) == ["tooManyTasks"]
    for task in tasks:
        polled = get_response(open_server, task["taskUUID"])
        assert error_codes(polled) == ["taskNotFound"], polled.text


def test_a_client_that_disconnects_mid_body_leaves_no_error_in_the_log(
    open_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    uvicorn_logger = logging.getLogger("uvicorn")
    uvicorn_logger.addHandler(caplog.handler)
    state = open_server.server.server_state
    try:
        head = b"POST /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
        sock = raw_request(open_server.settings.port, head, b'[{"taskType": "ping"')
        # The request is being handled (its body awaited) before the client goes away.
        wait_until(lambda: bool(state.tasks), what="the request to reach the app")
        sock.close()
        wait_until(lambda: not state.tasks and not state.connections, what="the request to end")
    finally:
        uvicorn_logger.removeHandler(caplog.handler)
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]
    assert "Traceback" not in caplog.text


def test_every_response_says_nosniff(open_server: RunningServer) -> None:
    made = open_server.post([tiny_task(steps=1, outputType="URL")])
    assert made.status_code == 200, made.text
    responses = [
        made,
        open_server.post([{"taskType": "nope"}]),
        httpx.post(open_server.url, content=b"{", timeout=30),
        httpx.get(f"{open_server.base}/healthz", timeout=30),
        httpx.get(made.json()["data"][0]["imageURL"], timeout=30),
        httpx.get(f"{open_server.base}/image/{uuid.uuid4()}.png", timeout=30),
        httpx.get(f"{open_server.base}/openapi.json", timeout=30),
    ]
    for response in responses:
        assert response.headers.get("x-content-type-options") == "nosniff", (
            response.url,
            response.status_code,
        )
    assert responses[4].status_code == 200
    assert responses[5].status_code == 404


# --- ownership -------------------------------------------------------------------------------


def test_a_task_is_visible_only_to_its_key_and_to_anyone_on_an_open_server(
    keyed_server: RunningServer, open_server: RunningServer
) -> None:
    task = tiny_task(deliveryMethod="async", steps=1)
    assert keyed_server.post([task], headers=bearer(KEY_A)).status_code == 200
    other = get_response(keyed_server, task["taskUUID"], KEY_B)
    assert other.status_code == 404, other.text
    assert error_codes(other) == ["taskNotFound"]
    own = get_response(keyed_server, task["taskUUID"], KEY_A)
    assert own.status_code == 200, own.text
    assert own.json()["data"][0]["taskUUID"] == task["taskUUID"]

    shared = tiny_task(deliveryMethod="async", steps=1)
    assert open_server.post([shared], headers=bearer("someone")).status_code == 200
    for key in ("someone-else", None):
        seen = get_response(open_server, shared["taskUUID"], key)
        assert seen.status_code == 200, seen.text
        assert seen.json()["data"][0]["taskUUID"] == shared["taskUUID"]


# --- refused before acceptance ---------------------------------------------------------------


def test_runway_without_a_key_is_refused_before_acceptance(open_server: RunningServer) -> None:
    task = tiny_task(model="runway:4@1", width=1920, height=1080)
    response = open_server.post([task])
    assert error_codes(response) == ["providerNotConfigured"], response.text
    polled = get_response(open_server, task["taskUUID"])
    assert error_codes(polled) == ["taskNotFound"], polled.text


def test_a_scheduler_of_the_wrong_family_is_refused_before_acceptance(
    open_server: RunningServer,
) -> None:
    task = tiny_task(scheduler="FlowMatch Euler", steps=1)
    response = open_server.post([task])
    assert response.status_code == 400, response.text
    [error] = response.json()["errors"]
    assert (error["code"], error["parameter"]) == ("invalidScheduler", "scheduler")
    polled = get_response(open_server, task["taskUUID"])
    assert error_codes(polled) == ["taskNotFound"], polled.text


# --- failures after acceptance ---------------------------------------------------------------


def test_an_accepted_task_that_fails_answers_a_sync_request_with_200(
    failing_server: RunningServer,
) -> None:
    response = failing_server.post([tiny_task(steps=1)])
    assert response.status_code == 200, response.text
    assert error_codes(response) == ["inferenceError"]


def test_runware_sdk_reports_inference_error_not_conflict_task_uuid(
    failing_server: RunningServer,
) -> None:
    sdk = new_sdk_command()
    args = {"task": {"deliveryMethod": "sync", "steps": 1}}
    error = run_client(sdk, failing_server.url, "expect_error", args)
    # runware-sdk maps raw codes to categories: inferenceError is "provider", while a retry
    # into conflictTaskUUID would read as "validation".
    assert error["code"] == "provider", error
    assert error["wire_codes"] == ["inferenceError"], error
    assert "failed on purpose" in error["message"], error


# --- seeds -----------------------------------------------------------------------------------


def test_drawn_seeds_are_exact_in_javascript_and_the_largest_client_seed_is_echoed(
    open_server: RunningServer,
) -> None:
    drawn = open_server.post([tiny_task(numberResults=4, steps=1)])
    assert drawn.status_code == 200, drawn.text
    seeds = [item["seed"] for item in drawn.json()["data"]]
    assert len(seeds) == 4
    assert all(0 <= seed <= 2**53 - 1 for seed in seeds), seeds
    largest = 9223372036854775807
    given = open_server.post([tiny_task(seed=largest, steps=1)])
    assert given.status_code == 200, given.text
    assert [item["seed"] for item in given.json()["data"]] == [largest]


# --- inputs fetched once ---------------------------------------------------------------------


def test_input_urls_are_fetched_once_even_across_a_restart(
    tmp_path: Path, tiny_models_dir: Path, loopback_http: LoopbackHTTP
) -> None:
    loopback_http.routes["/ref.png"] = (200, "image/png", image_bytes((64, 64)))
    seed = Image.effect_noise((64, 64), 64).convert("RGB")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for path, image in (("/seed.png", seed), ("/mask.png", mask)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        loopback_http.routes[path] = (200, "image/png", buffer.getvalue())
    gate = Gate()

    def gated() -> RunningServer:
        models = gate.models_file(tmp_path)
        return start_server(
            make_settings(tmp_path / "data", tiny_models_dir, models=models, **FAST)
        )

    # Every input image of the image modes is kept the same way: inpainting with a
    # ControlNet here, its seed image, mask and guide image all given by URL.
    task = tiny_task(
        deliveryMethod="async",
        steps=1,
        referenceImages=[loopback_http.url("/ref.png")],
        seedImage=loopback_http.url("/seed.png"),
        maskImage=loopback_http.url("/mask.png"),
        controlNet=[
            {"model": "impasto:tiny-controlnet@1", "guideImage": loopback_http.url("/ref.png")}
        ],
        outputType="dataURI",
        outputFormat="PNG",
    )
    first = gated()
    stopping = threading.Thread(target=first.stop)
    try:
        with gate.hold():
            assert first.post([task]).status_code == 200
            gate.wait_held()
            runtime = first.runtime()
            record = first.call(runtime.state.get_task(task["taskUUID"]))
            [reference] = record.request["referenceImages"]
            kept = [
                reference["image"],
                record.request["seedImage"],
                record.request["maskImage"],
                record.request["controlNet"][0]["guideImage"],
            ]
            for image_uuid in kept:
                stored = first.call(runtime.state.get_image(image_uuid))
                assert stored is not None, image_uuid
                assert stored.kind == "input"
            # Stop while the generation is held, and let it go only once the state store is
            # closed: the task is left unfinished for the next process to re-run.
            stopping.start()
            wait_until(lambda: runtime.state._conn is None, what="the first server to stop")
    finally:
        if stopping.ident is None:
            first.stop()
        else:
            stopping.join(timeout=60)
    second = gated()
    try:
        wait_finished(second, task["taskUUID"])
        [item] = get_response(second, task["taskUUID"]).json()["data"]
        assert item["status"] == "success", item
    finally:
        second.stop()
    assert gate.entered == 2, "the second server did not re-run the generation"
    for path in ("/ref.png", "/seed.png", "/mask.png"):
        fetches = [r for r in loopback_http.requests if r.path == path]
        assert len(fetches) == 1, (path, fetches)
    # The re-run inpainted the seed image it had kept: the unmasked pixels are the seed's.
    data = base64.b64decode(item["imageDataURI"].split(",", 1)[1])
    out = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    keep = np.asarray(mask) == 0
    assert np.array_equal(out[keep], np.asarray(seed)[keep])


# --- uploads in retry ------------------------------------------------------------------------


def test_an_image_whose_upload_is_retried_is_processing_until_the_upload_gives_up(
    open_server: RunningServer, loopback_http: LoopbackHTTP
) -> None:
    attempts: list[Recorded] = []
    retrying = threading.Event()
    release = threading.Event()

    def bucket(record: Recorded) -> tuple[int, str, bytes]:
        attempts.append(record)
        if len(attempts) == 2:
            # The retry is in flight until the test has looked.
            retrying.set()
            release.wait(60)
        return (503, "text/plain", b"try later")

    loopback_http.handler = bucket
    task = tiny_task(
        deliveryMethod="async", steps=1, uploadEndpoint=loopback_http.url("/bucket/out.png")
    )
    try:
        assert open_server.post([task]).status_code == 200
        assert retrying.wait(60), attempts
        [item] = get_response(open_server, task["taskUUID"]).json()["data"]
        assert item["status"] == "processing", item
        assert item["progress"] == 100
        assert item["imageUUID"]
    finally:
        release.set()
    wait_finished(open_server, task["taskUUID"])
    items = get_response(open_server, task["taskUUID"]).json()["data"]
    assert [i["status"] for i in items] == ["success", "error"], items
    assert items[0]["imageUUID"] == item["imageUUID"]
    assert items[1]["error"]["code"] == "uploadFailed", items
    assert len(attempts) == 2


# --- health ----------------------------------------------------------------------------------


def healthz(server: RunningServer) -> httpx.Response:
    return httpx.get(f"{server.base}/healthz", timeout=30)


def readyz(server: RunningServer) -> httpx.Response:
    return httpx.get(f"{server.base}/readyz", timeout=30)


def test_healthz_fails_while_a_supervised_loop_is_down_and_recovers(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(safety_checker="none")
    assert healthz(server).status_code == 200
    runtime = server.runtime()

    async def install() -> Callable[[], Any]:
        healed = asyncio.Event()

        async def flaky() -> None:
            if not healed.is_set():
                raise RuntimeError("broken on purpose")
            await asyncio.Event().wait()

        runtime.supervisor.start("flaky", flaky)

        async def heal() -> None:
            healed.set()

        return heal

    heal = server.call(install())

    def down() -> bool:
        live, ready = healthz(server), readyz(server)
        return all(
            r.status_code == 503 and any("flaky" in p for p in r.json().get("problems", []))
            for r in (live, ready)
        )

    wait_until(down, what="/healthz to report the loop down")
    server.call(heal())
    wait_until(lambda: healthz(server).status_code == 200, what="/healthz to recover")
    assert readyz(server).status_code == 200
    assert runtime.supervisor.states()["flaky"].restarts >= 1


def test_healthz_fails_while_the_outbox_loop_is_stuck(server_factory: ServerFactory) -> None:
    server = server_factory(safety_checker="none")
    outbox = server.runtime().outbox
    wait_until(lambda: outbox.last_pass_at is not None, what="the outbox's first pass")
    assert healthz(server).status_code == 200
    passed = outbox.last_pass_at
    # As a pass that never returned would leave it: no pass for longer than three idle polls.
    outbox.last_pass_at = passed - 1000.0
    response = healthz(server)
    assert response.status_code == 503
    assert any("outbox" in p for p in response.json()["problems"])
    assert response.json()["checks"]["loops"] == response.json()["problems"]
    assert readyz(server).status_code == 503
    outbox.last_pass_at = passed
    assert healthz(server).status_code == 200


def test_readyz_fails_while_the_state_store_is_unreachable_and_healthz_does_not(
    server_factory: ServerFactory,
) -> None:
    """A store that is away is not fixed by restarting the process: not ready, but alive."""
    server = server_factory(safety_checker="none")
    store = server.runtime().state
    assert readyz(server).status_code == 200
    dead = sqlite3.connect(":memory:", check_same_thread=False)
    dead.close()

    async def swap(connection: Any) -> Any:
        previous, store._conn = store._conn, connection
        return previous

    original = server.call(swap(dead))
    try:
        response = readyz(server)
        assert response.status_code == 503, response.text
        assert any("state store" in p for p in response.json()["problems"]), response.text
        assert response.json()["checks"]["state"] != "ok"
        assert response.json()["checks"]["events"] == "ok"
        assert healthz(server).status_code == 200
    finally:
        server.call(swap(original))
    assert readyz(server).status_code == 200


def test_readyz_waits_for_preloaded_models_and_lists_its_checks(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(safety_checker="none", preload=["impasto:tiny@1"])
    wait_until(lambda: readyz(server).status_code == 200, what="the preloaded model")
    body = readyz(server).json()
    assert body["status"] == "ok"
    assert body["checks"] == {
        "loops": "ok",
        "state": "ok",
        "events": "ok",
        "storage": "ok",
        "models": "ok",
    }
    # Loaded before any task asked for it.
    assert server.runtime().scheduler.backend_of("impasto:tiny@1") is not None
