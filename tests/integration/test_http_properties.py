"""Hostile input against a running server (real uvicorn on loopback): whatever a client POSTs
to /v1 — any JSON, any bytes, a valid task with one field replaced by anything — the reply is
a Runware envelope with a 4xx or 2xx status, never a 5xx, an unknownError or a traceback, and
the server logs no ERROR. schemathesis then checks the server against its own /openapi.json."""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import RunningServer, make_settings, start_server
from tests.live import wait_until

# Codes that mean "the server did not know what went wrong": never for a client's input.
UNEXPECTED_CODES = {"unknownError", "internalServerError"}
PROPERTY_SETTINGS = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("http-properties")
    running = start_server(
        make_settings(
            root / "data",
            tiny_models_dir,
            safety_checker="none",
            # Accepted tasks with a loopback uploadEndpoint give up fast instead of for minutes.
            delivery_max_attempts=2,
            delivery_base_delay_s=0.05,
            delivery_connect_timeout_s=1.0,
        )
    )
    yield running
    running.stop()


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog, also fed by uvicorn's loggers (they do not propagate to the root logger)."""
    uvicorn_logger = logging.getLogger("uvicorn")
    uvicorn_logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        uvicorn_logger.removeHandler(caplog.handler)


def assert_envelope(response: httpx.Response) -> None:
    """The reply any input must get: a 2xx/4xx Runware envelope with a known error code, which
    a browser may not sniff into anything else."""
    assert "Traceback" not in response.text, response.text[:2000]
    body = response.json()
    codes = {e.get("code") for e in body.get("errors", [])} if isinstance(body, dict) else set()
    # The one documented 5xx before acceptance: a provider model without its key (no Runway
    # key here). A healthy server has no serviceUnavailable to give.
    if not (response.status_code == 503 and codes == {"providerNotConfigured"}):
        assert response.status_code < 500, (response.status_code, response.text[:2000])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    assert response.headers.get("x-content-type-options") == "nosniff", response.headers
    assert isinstance(body, dict), body
    assert {"data", "errors"} & set(body), body
    assert set(body) <= {"data", "errors"}, body
    for error in body.get("errors", []):
        assert isinstance(error.get("code"), str), error
        assert error["code"] not in UNEXPECTED_CODES, error
        assert isinstance(error.get("message"), str), error


def assert_no_server_errors(server: RunningServer, log: pytest.LogCaptureFixture) -> None:
    """Every accepted task has finished, and nothing was logged at ERROR (or with a trace)."""

    def all_finished() -> bool:
        return not server.call(server.runtime().state.unfinished_tasks())

    wait_until(all_finished, timeout=180, what="every accepted task to finish")
    bad = [r for r in log.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, "\n".join(f"{r.name}: {r.getMessage()}" for r in bad)


def post_raw(client: httpx.Client, server: RunningServer, body: bytes) -> httpx.Response:
    return client.post(server.url, content=body, headers={"content-type": "application/json"})


# --- strategies ----------------------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**53, 2**63, -(2**63) - 1, 10**40, 10**400])
    | st.floats(allow_nan=True, allow_infinity=True)
    # Lone surrogates survive json.dumps as \\udXXX escapes and come back as unpaired code
    # points: every later encode (logs, SQLite, the reply) must cope.
    | st.text(max_size=30)
    | st.text(st.characters(categories=["Cs"]) | st.characters(), max_size=8)
    | st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u202e", "http://[::1", "http://]/"])
)
JSON = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
TASK_TYPES = st.sampled_from(
    ["imageInference", "imageUpload", "getResponse", "modelSearch", "ping", "authentication"]
)
TASKISH = st.fixed_dictionaries(
    {"taskType": TASK_TYPES | JSON, "taskUUID": st.uuids().map(str) | JSON},
    optional={"model": JSON, "positivePrompt": JSON, "image": JSON, "apiKey": JSON},
)


def deeply_nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


RAW_BODIES = [
    b"[NaN]",
    b'[{"taskType": "ping", "ping": NaN}]',
    b'[{"taskType": "imageInference", "width": Infinity}]',
    b'[{"taskType": "imageInference", "seed": -Infinity}]',
    b"[" + b"9" * 5000 + b"]",
    b'[{"taskType": "ping", "x": "\\ud800"}]',
    deeply_nested(100_000),
    b'[{"a":' * 20_000 + b"1" + b"}" * 20_000 + b"]",
    b"\xff\xfe[",
    b"",
    b"[]",
]


def base_task() -> dict[str, Any]:
    return {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "impasto:tiny@1",
        "positivePrompt": "a lighthouse at dusk",
        "width": 64,
        "height": 64,
        "steps": 1,
        "deliveryMethod": "async",
        "outputType": "URL",
        "outputFormat": "PNG",
    }


URLS = [
    "http://[::1",
    "http://]/",
    "http://[::1]:99999/x",
    "http://127.0.0.1:1/x\r\nInjected: yes",
    "http://127.0.0.1:1/unreachable",
    "ftp://127.0.0.1/x",
    "data:image/png;base64,!!!!",
]
NUMBERS = [10**400, 2**64, 2**63, 2**63 - 1, 2**53 + 1, -1, 0, 1.5, math.nan, math.inf, 1e308]
STRINGS = ["", " ", "\ud800", "\x00\x00", "x" * 5000, "FlowMatch Euler", "runway:4@1"]
# The values most likely to break each field, beside any JSON value at all.
HOSTILE: dict[str, list[Any]] = {
    "webhookURL": URLS,
    "uploadEndpoint": URLS,
    "referenceImages": [[url] for url in URLS] + [[{"image": url}] for url in URLS],
    "inputs": [{"referenceImages": [url]} for url in URLS],
    "model": STRINGS,
    "positivePrompt": STRINGS,
    "negativePrompt": STRINGS,
    "scheduler": STRINGS,
    "outputType": STRINGS,
    "outputFormat": STRINGS,
}
FIELDS = [
    *base_task(),
    *HOSTILE,
    "numberResults",
    "seed",
    "CFGScale",
    "ttl",
    "strength",
    "outputQuality",
    "includeCost",
    "providerSettings",
    "safety",
    "checkNSFW",
]


@st.composite
def mutated_tasks(draw: st.DrawFn) -> dict[str, Any]:
    """A valid, cheap imageInference task with one field replaced (or added, or dropped)."""
    task = base_task()
    key = draw(st.sampled_from(FIELDS) | st.text(max_size=10))
    if draw(st.integers(0, 9)) == 0:
        task.pop(key, None)
    else:
        task[key] = draw(st.sampled_from(HOSTILE.get(key, NUMBERS + STRINGS)) | JSON)
    return task


def mutation(**fields: Any) -> dict[str, Any]:
    return {**base_task(), **fields}


# Findings of the hostile-input campaign (issue 10): each example is always tried.
KNOWN_BREAKERS = [
    mutation(webhookURL="http://[::1"),
    mutation(uploadEndpoint="http://]/"),
    mutation(referenceImages=["http://[::1"]),
    mutation(ttl=10**400),
    mutation(seed=2**63),
    mutation(positivePrompt="\ud800 lighthouse"),
]


def with_known_breakers(test: Any) -> Any:
    for task in KNOWN_BREAKERS:
        test = example(task=task)(test)
    return test


# --- properties ----------------------------------------------------------------------------


def test_any_json_body_gets_an_envelope_never_a_server_error(
    server: RunningServer, server_log: pytest.LogCaptureFixture
) -> None:
    with httpx.Client(timeout=120) as client:

        @PROPERTY_SETTINGS
        @given(body=JSON | st.lists(TASKISH, min_size=1, max_size=3))
        def check(body: Any) -> None:
            assert_envelope(post_raw(client, server, json.dumps(body).encode()))

        check()

        for raw in RAW_BODIES:
            assert_envelope(post_raw(client, server, raw))
    assert_no_server_errors(server, server_log)


def test_any_bytes_get_an_envelope_never_a_server_error(
    server: RunningServer, server_log: pytest.LogCaptureFixture
) -> None:
    with httpx.Client(timeout=120) as client:

        @PROPERTY_SETTINGS
        @given(body=st.binary(max_size=512) | st.text().map(lambda t: t.encode("utf-8", "replace")))
        def check(body: bytes) -> None:
            assert_envelope(post_raw(client, server, body))

        check()
    assert_no_server_errors(server, server_log)


def test_a_valid_task_with_any_one_field_replaced_is_refused_or_finishes_cleanly(
    server: RunningServer, server_log: pytest.LogCaptureFixture
) -> None:
    with httpx.Client(timeout=120) as client:

        @PROPERTY_SETTINGS
        @given(task=mutated_tasks())
        @with_known_breakers
        def check(task: dict[str, Any]) -> None:
            assert_envelope(post_raw(client, server, json.dumps([task]).encode()))

        check()
    assert_no_server_errors(server, server_log)


# --- schemathesis against /openapi.json ----------------------------------------------------


@pytest.fixture(scope="module")
def api_schema(server: RunningServer) -> Any:
    schemathesis = pytest.importorskip("schemathesis")
    return schemathesis.openapi.from_url(f"{server.base}/openapi.json")


def schema_checks() -> list[Any]:
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
    )

    return [not_a_server_error, response_schema_conformance, content_type_conformance]


def loopback_only(value: Any) -> Any:
    """The value with every http(s) URL pointed at a closed loopback port: generated host
    names must not send the server's fetches and deliveries anywhere else."""
    if isinstance(value, str) and value.lower().startswith(("http://", "https://")):
        return "http://127.0.0.1:9/x"
    if isinstance(value, list):
        return [loopback_only(v) for v in value]
    if isinstance(value, dict):
        return {k: loopback_only(v) for k, v in value.items()}
    return value


def runnable(data: st.DataObject, body: Any) -> Any:
    """Some generated imageInference tasks made cheap and runnable here (the tiny model at
    64x64, one step, async), so accepted tasks are covered, not only refusals."""
    if not isinstance(body, list):
        return body
    for task in body:
        inference = isinstance(task, dict) and task.get("taskType") == "imageInference"
        if inference and data.draw(st.booleans(), label="runnable"):
            task.update(CHEAP_INFERENCE)
    return body


CHEAP_INFERENCE = {
    "model": "impasto:tiny@1",
    "width": 64,
    "height": 64,
    "steps": 1,
    "numberResults": 1,
    "deliveryMethod": "async",
}


def run_operation(schema: Any, server: RunningServer, path: str, method: str, n: int) -> list[Any]:
    """Call `method path` with `n` cases drawn from its schema; every reply must conform (and
    say nosniff, as every reply of ours does)."""
    operation = schema[path][method]
    assert operation.definition.raw.get("responses"), f"{method} {path} documents no responses"
    strategy = operation.as_strategy()
    replies: list[Any] = []

    @settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def check(data: st.DataObject) -> None:
        case = data.draw(strategy)
        if case.body is not None:
            case.body = runnable(data, loopback_only(case.body))
        response = case.call_and_validate(base_url=server.base, checks=schema_checks())
        # schemathesis keeps each header as a list of its values.
        assert response.headers.get("x-content-type-options") == ["nosniff"], response.headers
        replies.append(response)

    check()
    return replies


def test_post_v1_conforms_to_its_openapi_schema(
    api_schema: Any, server: RunningServer, server_log: pytest.LogCaptureFixture
) -> None:
    request = api_schema["/v1"]["POST"].definition.raw["requestBody"]
    items = request["content"]["application/json"]["schema"]["items"]
    # Every task type has its schema, not a bare `array of object`.
    assert "oneOf" in items, items
    replies = run_operation(api_schema, server, "/v1", "POST", 50)
    accepted = [
        item
        for reply in replies
        for item in reply.json().get("data", [])
        if item.get("taskType") == "imageInference"
    ]
    # Schema-valid tasks may be refused by model rules (400), but not every one of them.
    assert accepted, [reply.text[:300] for reply in replies]
    assert_no_server_errors(server, server_log)


@pytest.mark.parametrize(("path", "method"), [("/healthz", "GET"), ("/image/{name}", "GET")])
def test_health_and_image_routes_conform_to_their_openapi_schema(
    api_schema: Any, server: RunningServer, path: str, method: str
) -> None:
    assert run_operation(api_schema, server, path, method, 15)
