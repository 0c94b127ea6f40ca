"""POST /v1 over plain HTTP: the request envelope, per-task errors, body limits, auth, ping,
unknown routes and taskUUID conflicts, against a real server on loopback."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import RunningServer, image_bytes, tiny_task

ERROR_FIELDS = {"code", "message", "parameter", "taskType", "taskUUID"}
PNG_DATA_URI = "data:image/png;base64," + base64.b64encode(image_bytes()).decode()


def assert_clean_error_reply(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """A JSON Runware error envelope with this status and first code; no 500, no traceback."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert "Traceback" not in response.text
    body = response.json()
    assert set(body) == {"errors"}, body
    assert body["errors"], body
    error: dict[str, Any] = body["errors"][0]
    assert error["code"] == code, body
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


def post_raw(
    server: RunningServer, content: bytes | Iterator[bytes], **kwargs: Any
) -> httpx.Response:
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(server.url, content=content, headers=headers, timeout=60, **kwargs)


# -- envelope --------------------------------------------------------------------------------


def test_one_bad_task_fails_alone_and_the_good_ones_return_data(server: RunningServer) -> None:
    good_a, good_b = tiny_task(), tiny_task()
    bad = tiny_task(width=10)

    response = server.post([good_a, bad, good_b])

    assert response.status_code == 200, response.text
    body = response.json()
    assert {item["taskUUID"] for item in body["data"]} == {good_a["taskUUID"], good_b["taskUUID"]}
    assert all("imageUUID" in item for item in body["data"])
    assert len(body["errors"]) == 1
    error = body["errors"][0]
    assert set(error) >= ERROR_FIELDS
    assert error["code"] == "invalidWidth"
    assert error["parameter"] == "width"
    assert error["taskType"] == "imageInference"
    assert error["taskUUID"] == bad["taskUUID"]


def test_request_where_every_task_is_bad_answers_400_with_one_error_each(
    server: RunningServer,
) -> None:
    no_prompt = tiny_task()
    del no_prompt["positivePrompt"]
    bad_model = tiny_task(model="nobody:0@0")
    bad_type = {"taskType": "textToSomething", "taskUUID": str(uuid.uuid4())}

    response = server.post([no_prompt, bad_model, bad_type])

    assert response.status_code == 400, response.text
    body = response.json()
    assert "data" not in body
    errors = {e["taskUUID"]: e for e in body["errors"]}
    assert errors[no_prompt["taskUUID"]]["code"] == "missingPositivePrompt"
    assert errors[no_prompt["taskUUID"]]["parameter"] == "positivePrompt"
    assert errors[bad_model["taskUUID"]]["code"] == "invalidModel"
    assert errors[bad_model["taskUUID"]]["parameter"] == "model"
    assert errors[bad_type["taskUUID"]]["code"] == "unsupportedTaskType"
    assert errors[bad_type["taskUUID"]]["parameter"] == "taskType"
    assert "Traceback" not in response.text


def test_malformed_json_is_400_invalid_json(server: RunningServer) -> None:
    response = post_raw(server, b'[{"taskType": "ping", ')
    assert_clean_error_reply(response, 400, "invalidJSON")


def test_non_utf8_body_is_400_invalid_json(server: RunningServer) -> None:
    response = post_raw(server, b"[\xff\xfe\x00]")
    assert_clean_error_reply(response, 400, "invalidJSON")


def test_deeply_nested_json_is_400_invalid_json_not_a_500(server: RunningServer) -> None:
    depth = 100_000
    response = post_raw(server, b"[" * depth + b"]" * depth)
    assert_clean_error_reply(response, 400, "invalidJSON")


def test_lone_surrogates_echoed_in_error_items_do_not_break_the_reply(
    server: RunningServer,
) -> None:
    # Valid JSON text whose strings are not valid Unicode; they come back in the error items.
    body = b'[{"taskType": "imageInference", "taskUUID": "\\ud800"}, {"taskType": "\\udfff"}]'

    response = post_raw(server, body)

    assert response.status_code == 400, response.text
    assert "Traceback" not in response.text
    errors = response.json()["errors"]
    assert [e["code"] for e in errors] == ["invalidTaskUUID", "unsupportedTaskType"]
    # Strings that are not valid Unicode are not echoed back as the task's context.
    assert "taskUUID" not in errors[0]
    assert "taskType" not in errors[1]


def test_json_object_instead_of_array_is_400_invalid_request_body(server: RunningServer) -> None:
    response = post_raw(server, json.dumps(tiny_task()).encode())
    assert_clean_error_reply(response, 400, "invalidRequestBody")


def test_empty_array_is_400(server: RunningServer) -> None:
    response = post_raw(server, b"[]")
    assert_clean_error_reply(response, 400, "invalidRequestBody")


def test_array_element_that_is_not_an_object_is_a_400_error_item(server: RunningServer) -> None:
    response = server.post([42])
    assert_clean_error_reply(response, 400, "invalidRequestBody")


def test_body_over_max_body_bytes_is_413_payload_too_large(server_factory: Any) -> None:
    server = server_factory(max_body_bytes=1000)
    task = tiny_task(positivePrompt="x" * 990)

    response = server.post([task])

    error = assert_clean_error_reply(response, 413, "payloadTooLarge")
    assert "1000" in error["message"]


def test_chunked_body_over_max_body_bytes_is_413_whatever_the_headers_say(
    server_factory: Any,
) -> None:
    server = server_factory(max_body_bytes=1000)
    payload = json.dumps([tiny_task(positivePrompt="x" * 990)]).encode()

    def chunks() -> Iterator[bytes]:
        # No Content-Length: the server must count what it reads.
        for start in range(0, len(payload), 256):
            yield payload[start : start + 256]

    response = post_raw(server, chunks())

    assert_clean_error_reply(response, 413, "payloadTooLarge")


def test_connection_stays_usable_after_a_413(server_factory: Any) -> None:
    server = server_factory(max_body_bytes=1000)
    with httpx.Client(timeout=60) as client:
        big = client.post(server.url, content=b"[" + b" " * 200_000 + b"]")
        after = client.post(server.url, json=[{"taskType": "ping", "ping": True}])

    assert_clean_error_reply(big, 413, "payloadTooLarge")
    assert after.status_code == 200, after.text
    assert after.json() == {"data": [{"taskType": "ping", "pong": True}]}


def test_body_just_under_max_body_bytes_is_accepted(server_factory: Any) -> None:
    server = server_factory(max_body_bytes=1000)
    response = server.post([{"taskType": "ping", "ping": True}])
    assert response.status_code == 200, response.text


def test_unknown_route_is_404_in_the_runware_error_envelope(server: RunningServer) -> None:
    response = httpx.get(f"{server.base}/v2/nothing-here", timeout=30)
    assert_clean_error_reply(response, 404, "notFound")


def test_wrong_method_on_v1_is_405_in_the_runware_error_envelope(server: RunningServer) -> None:
    response = httpx.get(server.url, timeout=30)
    assert_clean_error_reply(response, 405, "methodNotAllowed")


# -- authentication and ping ------------------------------------------------------------------


@pytest.fixture
def keyed_server(server_factory: Any) -> RunningServer:
    server: RunningServer = server_factory(api_keys=["k1"])
    return server


PING = {"taskType": "ping", "ping": True}


def test_no_api_key_is_401_missing_api_key(keyed_server: RunningServer) -> None:
    response = keyed_server.post([PING])
    error = assert_clean_error_reply(response, 401, "missingApiKey")
    assert error["taskType"] == "authentication"


def test_wrong_bearer_key_is_401_invalid_api_key(keyed_server: RunningServer) -> None:
    response = keyed_server.post([PING], headers={"Authorization": "Bearer k2"})
    error = assert_clean_error_reply(response, 401, "invalidApiKey")
    assert error["parameter"] == "apiKey"


def test_right_bearer_key_runs_the_tasks(keyed_server: RunningServer) -> None:
    task = tiny_task()
    response = keyed_server.post([task], headers={"Authorization": "Bearer k1"})
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["taskUUID"] == task["taskUUID"]


def test_leading_authentication_task_works_without_a_header(keyed_server: RunningServer) -> None:
    task = tiny_task()
    response = keyed_server.post([{"taskType": "authentication", "apiKey": "k1"}, task])
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body
    assert [item["taskUUID"] for item in body["data"]] == [task["taskUUID"]]


def test_leading_authentication_task_with_a_wrong_key_is_401(keyed_server: RunningServer) -> None:
    response = keyed_server.post([{"taskType": "authentication", "apiKey": "nope"}, PING])
    assert_clean_error_reply(response, 401, "invalidApiKey")


@pytest.mark.parametrize(
    ("auth_task", "code"),
    [
        ({"taskType": "authentication"}, "missingApiKey"),
        ({"taskType": "authentication", "apiKey": 5}, "invalidApiKey"),
    ],
    ids=["missing-key", "non-string-key"],
)
def test_malformed_authentication_task_is_401(
    keyed_server: RunningServer, auth_task: dict[str, Any], code: str
) -> None:
    response = keyed_server.post([auth_task, PING])
    error = assert_clean_error_reply(response, 401, code)
    assert error["parameter"] == "apiKey"


def test_ping_answers_pong(keyed_server: RunningServer) -> None:
    response = keyed_server.post([PING], headers={"Authorization": "Bearer k1"})
    assert response.status_code == 200, response.text
    assert response.json() == {"data": [{"taskType": "ping", "pong": True}]}


def test_open_server_accepts_requests_without_a_key(server: RunningServer) -> None:
    response = server.post([PING])
    assert response.status_code == 200, response.text
    assert response.json() == {"data": [{"taskType": "ping", "pong": True}]}


# -- conflictTaskUUID -------------------------------------------------------------------------


def test_reused_task_uuid_is_conflict_task_uuid(server: RunningServer) -> None:
    task = tiny_task()
    assert server.post([task]).status_code == 200

    response = server.post([dict(task, positivePrompt="something else")])

    error = assert_clean_error_reply(response, 400, "conflictTaskUUID")
    assert error["parameter"] == "taskUUID"
    assert error["taskUUID"] == task["taskUUID"]
    assert error["taskType"] == "imageInference"


def test_reused_task_uuid_for_image_upload_is_conflict_task_uuid(server: RunningServer) -> None:
    upload = {
        "taskType": "imageUpload",
        "taskUUID": str(uuid.uuid4()),
        "image": PNG_DATA_URI,
    }
    assert server.post([upload]).status_code == 200

    response = server.post([upload])

    error = assert_clean_error_reply(response, 400, "conflictTaskUUID")
    assert error["parameter"] == "taskUUID"
    assert error["taskUUID"] == upload["taskUUID"]
    assert error["taskType"] == "imageUpload"


def test_upload_reusing_an_inference_task_uuid_is_conflict_task_uuid(
    server: RunningServer,
) -> None:
    task = tiny_task()
    assert server.post([task]).status_code == 200
    upload = {"taskType": "imageUpload", "taskUUID": task["taskUUID"], "image": PNG_DATA_URI}

    response = server.post([upload])

    error = assert_clean_error_reply(response, 400, "conflictTaskUUID")
    assert error["parameter"] == "taskUUID"


def test_same_task_uuid_twice_in_one_request_runs_once(server: RunningServer) -> None:
    task = tiny_task()

    response = server.post([task, dict(task)])

    assert response.status_code == 200, response.text
    body = response.json()
    assert [item["taskUUID"] for item in body["data"]] == [task["taskUUID"]]
    assert len(body["errors"]) == 1
    assert body["errors"][0]["code"] == "conflictTaskUUID"
    assert body["errors"][0]["parameter"] == "taskUUID"
    assert body["errors"][0]["taskUUID"] == task["taskUUID"]
