"""What the server remembers: image TTLs and the sweeper, getResponse for sync and async tasks,
the sync wait limit, and state that survives a restart on the same data dir."""

from __future__ import annotations

import dataclasses
import io
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from tests.conftest import RunningServer, tiny_task

MAX_POLLS = 1200
POLL_INTERVAL_S = 0.1


def get_response(server: RunningServer, task_uuid: str) -> httpx.Response:
    return server.post([{"taskType": "getResponse", "taskUUID": task_uuid}])


def poll_until_finished(server: RunningServer, task_uuid: str) -> list[dict[str, Any]]:
    """getResponse until no item is processing (a bounded number of polls)."""
    for _ in range(MAX_POLLS):
        response = get_response(server, task_uuid)
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["data"]
        for item in items:
            if item["status"] == "processing":
                assert set(item) == {"taskType", "taskUUID", "status", "progress"}
                assert 0 <= item["progress"] <= 100
        if items and all(item["status"] != "processing" for item in items):
            return items
        time.sleep(POLL_INTERVAL_S)
    raise AssertionError(f"task {task_uuid} still processing after {MAX_POLLS} polls")


def image_files(data_dir: Path) -> set[str]:
    return {path.name for path in (data_dir / "images").rglob("*") if path.is_file()}


def generate_one(server: RunningServer, **fields: Any) -> dict[str, Any]:
    response = server.post([tiny_task(**fields)])
    assert response.status_code == 200, response.text
    item: dict[str, Any] = response.json()["data"][0]
    return item


# -- TTL --------------------------------------------------------------------------------------


def test_ttl_expired_image_is_swept_and_its_url_answers_404(server: RunningServer) -> None:
    item = generate_one(server, ttl=60)
    data_dir = server.settings.data_dir
    name = item["imageURL"].rsplit("/", 1)[1]
    assert httpx.get(item["imageURL"], timeout=30).status_code == 200
    assert name in image_files(data_dir)

    # Before the TTL runs out the sweeper keeps the image.
    assert server.call(server.runtime().sweeper.sweep(now=time.time() + 30)) == (0, 0)
    assert httpx.get(item["imageURL"], timeout=30).status_code == 200

    swept, _ = server.call(server.runtime().sweeper.sweep(now=time.time() + 61))

    assert swept == 1
    gone = httpx.get(item["imageURL"], timeout=30)
    assert gone.status_code == 404
    assert gone.json()["errors"][0]["code"] == "imageNotFound"
    assert name not in image_files(data_dir)
    assert server.call(server.runtime().state.get_image(item["imageUUID"])) is None


def test_ttl_expired_url_returns_404_before_any_sweep(server: RunningServer) -> None:
    item = generate_one(server, ttl=60)
    state = server.runtime().state
    record = server.call(state.get_image(item["imageUUID"]))
    assert record is not None
    assert record.expires_at > time.time()
    # Time passes: the record's expiry is now behind us, and no sweep has run.
    server.call(state.put_image(dataclasses.replace(record, expires_at=time.time() - 1)))

    response = httpx.get(item["imageURL"], timeout=30)

    assert response.status_code == 404
    assert response.json()["errors"][0]["code"] == "imageNotFound"
    assert record.key in image_files(server.settings.data_dir)


def test_ttl_expired_image_cannot_be_used_as_a_reference(server: RunningServer) -> None:
    item = generate_one(server, ttl=60)
    state = server.runtime().state
    record = server.call(state.get_image(item["imageUUID"]))
    assert record is not None
    server.call(state.put_image(dataclasses.replace(record, expires_at=time.time() - 1)))

    response = server.post([tiny_task(referenceImages=[item["imageUUID"]])])

    assert response.status_code == 400, response.text
    error = response.json()["errors"][0]
    assert error["code"] == "invalidReferenceImages"
    assert error["parameter"] == "referenceImages[0]"


def test_unknown_image_name_answers_404(server: RunningServer) -> None:
    response = httpx.get(f"{server.base}/image/{uuid.uuid4()}.jpg", timeout=30)
    assert response.status_code == 404
    assert response.json()["errors"][0]["code"] == "imageNotFound"


def test_image_url_with_the_wrong_extension_answers_404(server: RunningServer) -> None:
    item = generate_one(server, outputFormat="PNG")
    response = httpx.get(f"{server.base}/image/{item['imageUUID']}.jpg", timeout=30)
    assert response.status_code == 404


# -- getResponse ------------------------------------------------------------------------------


def test_get_response_after_a_sync_task_returns_its_items_as_success(
    server: RunningServer,
) -> None:
    task = tiny_task(numberResults=2, seed=77)
    sync_items = server.post([task]).json()["data"]

    response = get_response(server, task["taskUUID"])

    assert response.status_code == 200, response.text
    items = response.json()["data"]
    assert len(items) == 2
    for item in items:
        assert item["status"] == "success"
        assert item["taskType"] == "imageInference"
        assert item["taskUUID"] == task["taskUUID"]
    assert {i["imageUUID"] for i in items} == {i["imageUUID"] for i in sync_items}
    assert sorted(i["seed"] for i in items) == [77, 78]


def test_get_response_for_an_unknown_task_is_404_task_not_found(server: RunningServer) -> None:
    unknown = str(uuid.uuid4())

    response = get_response(server, unknown)

    assert response.status_code == 404, response.text
    body = response.json()
    assert "data" not in body
    (error,) = body["errors"]
    assert error["code"] == "taskNotFound"
    assert error["taskUUID"] == unknown
    assert error["taskType"] == "getResponse"


def test_get_response_with_a_malformed_task_uuid_is_400(server: RunningServer) -> None:
    response = server.post([{"taskType": "getResponse", "taskUUID": "not-a-uuid"}])
    assert response.status_code == 400, response.text
    error = response.json()["errors"][0]
    assert error["code"] == "invalidTaskUUID"
    assert error["parameter"] == "taskUUID"


def test_async_task_is_acknowledged_then_polled_to_success(server: RunningServer) -> None:
    task = tiny_task(deliveryMethod="async", numberResults=2, width=128, height=96)

    response = server.post([task])

    assert response.status_code == 200, response.text
    assert response.json() == {
        "data": [{"taskType": "imageInference", "taskUUID": task["taskUUID"]}]
    }
    items = poll_until_finished(server, task["taskUUID"])
    assert len(items) == 2
    assert [item["status"] for item in items] == ["success", "success"]
    assert len({item["imageUUID"] for item in items}) == 2
    for item in items:
        assert item["taskUUID"] == task["taskUUID"]
        served = httpx.get(item["imageURL"], timeout=30)
        assert served.status_code == 200
        assert Image.open(io.BytesIO(served.content)).size == (128, 96)


def test_async_task_with_bad_parameters_fails_at_once(server: RunningServer) -> None:
    task = tiny_task(deliveryMethod="async", width=4096)

    response = server.post([task])

    assert response.status_code == 400, response.text
    error = response.json()["errors"][0]
    assert error["code"] == "invalidWidth"
    assert error["taskUUID"] == task["taskUUID"]
    assert get_response(server, task["taskUUID"]).status_code == 404


def test_sync_wait_limit_gives_sync_timeout_then_get_response_has_every_image(
    server_factory: Any,
) -> None:
    server = server_factory(sync_timeout_s=0.001)
    task = tiny_task(width=1920, height=1080, numberResults=3)

    response = server.post([task])

    assert response.status_code == 202, response.text
    body = response.json()
    assert "data" not in body
    (error,) = body["errors"]
    assert error["code"] == "syncTimeout"
    assert error["taskUUID"] == task["taskUUID"]
    assert error["taskType"] == "imageInference"
    items = poll_until_finished(server, task["taskUUID"])
    assert [item["status"] for item in items] == ["success"] * 3
    assert len({item["imageUUID"] for item in items}) == 3


# -- restart ----------------------------------------------------------------------------------


def test_results_and_images_survive_a_restart_on_the_same_data_dir(
    server_factory: Any, tmp_path: Path
) -> None:
    data_dir = tmp_path / "kept"
    first = server_factory(data_dir=data_dir)
    task = tiny_task(outputFormat="PNG", width=96, height=64)
    (item,) = first.post([task]).json()["data"]
    original = httpx.get(item["imageURL"], timeout=30).content
    first.stop()

    second = server_factory(data_dir=data_dir, port=first.settings.port)

    response = get_response(second, task["taskUUID"])
    assert response.status_code == 200, response.text
    (again,) = response.json()["data"]
    assert again["status"] == "success"
    assert again["imageUUID"] == item["imageUUID"]
    assert again["imageURL"] == item["imageURL"]
    served = httpx.get(again["imageURL"], timeout=30)
    assert served.status_code == 200
    assert served.headers["content-type"] == "image/png"
    assert served.content == original
    # The taskUUID stays used after the restart.
    conflict = second.post([task]).json()["errors"][0]
    assert conflict["code"] == "conflictTaskUUID"


def test_stored_image_is_served_by_uuid_on_a_new_port_after_restart(
    server_factory: Any, tmp_path: Path
) -> None:
    data_dir = tmp_path / "kept"
    first = server_factory(data_dir=data_dir)
    (item,) = first.post([tiny_task()]).json()["data"]
    first.stop()

    second = server_factory(data_dir=data_dir)

    served = httpx.get(f"{second.base}/image/{item['imageUUID']}.jpg", timeout=30)
    assert served.status_code == 200
    assert served.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(served.content)).size == (64, 64)


def test_task_cut_off_by_a_restart_ends_instead_of_processing_forever(
    server_factory: Any, tmp_path: Path
) -> None:
    data_dir = tmp_path / "kept"
    first = server_factory(data_dir=data_dir)
    task = tiny_task(deliveryMethod="async", width=1920, height=1080, numberResults=3)
    assert first.post([task]).status_code == 200
    first.stop()

    second = server_factory(data_dir=data_dir)

    # Whether the new process re-runs the task or reports it interrupted, it ends.
    items = poll_until_finished(second, task["taskUUID"])
    assert len(items) == 3
    for item in items:
        assert item["taskUUID"] == task["taskUUID"]
        if item["status"] == "success":
            served = httpx.get(f"{second.base}/image/{item['imageUUID']}.jpg", timeout=30)
            assert served.status_code == 200
            assert Image.open(io.BytesIO(served.content)).size == (1920, 1080)
        else:
            assert item["status"] == "error"
            assert item["error"]["code"] == "taskInterrupted"
