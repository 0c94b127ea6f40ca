"""The WebSocket transport on /v1, spoken with the plain `websockets` client library.

A gate in front of the tiny model (tests/gated_backend.py) holds generations where a test needs
"the task is still running" to be a fact rather than a race.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import RunningServer, tiny_task
from tests.gated_backend import Gate, gated_server
from tests.live import task_status, wait_detached, wait_finished

RECV_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def gate() -> Gate:
    return Gate()


@pytest.fixture(scope="module")
def ws_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path, gate: Gate
) -> Iterator[RunningServer]:
    """One server for the tests that need no settings of their own."""
    with gated_server(tmp_path_factory.mktemp("ws"), tiny_models_dir, gate) as server:
        yield server


def ws_url(server: RunningServer, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.settings.port}/v1{query}"


async def send(ws: ClientConnection, *tasks: dict[str, Any]) -> None:
    await ws.send(json.dumps(list(tasks)))


async def recv(ws: ClientConnection, timeout: float = RECV_TIMEOUT_S) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    return frame


async def authenticate(ws: ClientConnection, key: str = "k", resume: str | None = None) -> str:
    task: dict[str, Any] = {"taskType": "authentication", "apiKey": key}
    if resume is not None:
        task["connectionSessionUUID"] = resume
    await send(ws, task)
    frame = await recv(ws)
    assert list(frame) == ["data"], frame
    [item] = frame["data"]
    assert set(item) == {"taskType", "connectionSessionUUID"}, item
    assert item["taskType"] == "authentication"
    session: str = item["connectionSessionUUID"]
    return session


def drop(ws: ClientConnection) -> None:
    """Lose the connection the way a network does: no close frame."""
    ws.transport.abort()


def get_response(task_uuid: str) -> dict[str, Any]:
    return {"taskType": "getResponse", "taskUUID": task_uuid}


async def poll_until_done(ws: ClientConnection, task_uuid: str, count: int) -> list[dict[str, Any]]:
    """getResponse on `ws` until `count` items are successes; each reply must be one frame."""
    deadline = time.monotonic() + RECV_TIMEOUT_S
    while True:
        await send(ws, get_response(task_uuid))
        frame = await recv(ws)
        assert list(frame) == ["data"], frame
        items = frame["data"]
        assert len(items) == count, "a getResponse reply holds every generation in one frame"
        if all(item["status"] == "success" for item in items):
            return list(items)
        assert time.monotonic() < deadline, items
        await asyncio.sleep(0.05)


def test_authentication_reply_is_a_session_uuid_without_a_task_uuid(
    ws_server: RunningServer,
) -> None:
    async def scenario() -> None:
        async with connect(ws_url(ws_server)) as ws:
            session = await authenticate(ws)
            assert uuid.UUID(session).version == 4

    asyncio.run(scenario())


def test_a_bad_api_key_is_invalid_api_key_without_a_task_uuid(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory(api_keys=["k"])

    async def scenario() -> None:
        async with connect(ws_url(server)) as ws:
            await send(ws, {"taskType": "authentication", "apiKey": "wrong"})
            frame = await recv(ws)
            assert list(frame) == ["errors"], frame
            [error] = frame["errors"]
            assert error["code"] == "invalidApiKey"
            assert error["taskType"] == "authentication"
            assert error["parameter"] == "apiKey"
            assert "taskUUID" not in error
            # The socket stays usable: the right key then authenticates.
            await authenticate(ws, "k")

    asyncio.run(scenario())


def test_a_task_before_authentication_is_refused_and_not_run(ws_server: RunningServer) -> None:
    task = tiny_task()

    async def scenario() -> None:
        async with connect(ws_url(ws_server)) as ws:
            await send(ws, task)
            frame = await recv(ws)
            assert list(frame) == ["errors"], frame
            [error] = frame["errors"]
            assert error["code"] == "missingApiKey"
            assert error["taskUUID"] == task["taskUUID"]

    asyncio.run(scenario())
    assert task_status(ws_server, task["taskUUID"]) is None


def test_query_string_and_sdk_headers_are_accepted(ws_server: RunningServer) -> None:
    headers = {"X-SDK-Name": "js", "X-SDK-Version": "1.3.2", "User-Agent": "impasto-test"}

    async def scenario() -> None:
        async with connect(
            ws_url(ws_server, "?sdk=js&version=1.3.2"), additional_headers=headers
        ) as ws:
            await authenticate(ws)

    asyncio.run(scenario())


def test_ping_gets_a_pong_in_a_frame_of_its_own_while_a_task_runs(
    ws_server: RunningServer, gate: Gate
) -> None:
    task = tiny_task(numberResults=2)

    async def scenario() -> None:
        async with connect(ws_url(ws_server)) as ws:
            await authenticate(ws)
            with gate.hold(passes=1):
                await send(ws, task)
                first = await recv(ws)
                await asyncio.to_thread(gate.wait_held)
                await send(ws, {"taskType": "ping", "ping": True})
                assert await recv(ws) == {"data": [{"taskType": "ping", "pong": True}]}
            second = await recv(ws)
            images = [frame["data"][0]["imageUUID"] for frame in (first, second)]
            assert len(set(images)) == 2

    asyncio.run(scenario())


def test_a_sync_task_streams_one_image_per_frame_without_ack_or_progress(
    ws_server: RunningServer,
) -> None:
    task = tiny_task(numberResults=3, deliveryMethod="sync")

    async def scenario() -> None:
        async with connect(ws_url(ws_server)) as ws:
            await authenticate(ws)
            await send(ws, task)
            images = []
            for _ in range(3):
                frame = await recv(ws)
                assert list(frame) == ["data"], frame
                [item] = frame["data"]
                assert item["taskUUID"] == task["taskUUID"]
                assert item["imageURL"].startswith("http://")
                assert "status" not in item
                assert "progress" not in item
                images.append(item["imageUUID"])
            assert len(set(images)) == 3
            # Nothing else was sent for the task: the next frame answers the next request.
            await send(ws, {"taskType": "ping", "ping": True})
            assert await recv(ws) == {"data": [{"taskType": "ping", "pong": True}]}

    asyncio.run(scenario())


def test_an_async_task_is_acknowledged_then_get_response_answers_on_the_same_socket(
    ws_server: RunningServer, gate: Gate
) -> None:
    task = tiny_task(numberResults=2, deliveryMethod="async")

    async def scenario() -> None:
        async with connect(ws_url(ws_server)) as ws:
            await authenticate(ws)
            with gate.hold():
                await send(ws, task)
                ack = await recv(ws)
                assert ack == {
                    "data": [{"taskType": "imageInference", "taskUUID": task["taskUUID"]}]
                }
                await send(ws, get_response(task["taskUUID"]))
                frame = await recv(ws)
                assert [item["status"] for item in frame["data"]] == ["processing"] * 2
            items = await poll_until_done(ws, task["taskUUID"], 2)
            assert len({item["imageUUID"] for item in items}) == 2
            assert {item["taskType"] for item in items} == {"imageInference"}

    asyncio.run(scenario())


def test_data_and_errors_never_share_a_frame(ws_server: RunningServer) -> None:
    good = tiny_task(deliveryMethod="async")
    bad = tiny_task(width=13)

    async def scenario() -> None:
        async with connect(ws_url(ws_server)) as ws:
            await authenticate(ws)
            await send(ws, good, bad)
            frames = [await recv(ws), await recv(ws)]
            by_key = {next(iter(frame)): frame for frame in frames}
            assert all(len(frame) == 1 for frame in frames), frames
            assert by_key["data"]["data"][0]["taskUUID"] == good["taskUUID"]
            [error] = by_key["errors"]["errors"]
            assert error["taskUUID"] == bad["taskUUID"]
            assert error["code"] == "invalidWidth"
            assert error["parameter"] == "width"

    asyncio.run(scenario())


def test_frames_that_are_not_task_arrays_get_errors(ws_server: RunningServer) -> None:
    async def scenario() -> None:
        async with connect(ws_url(ws_server)) as ws:
            await ws.send("not json")
            assert (await recv(ws))["errors"][0]["code"] == "invalidJSON"
            await ws.send("42")
            assert (await recv(ws))["errors"][0]["code"] == "invalidRequestBody"
            # A binary frame is read as UTF-8 text.
            await ws.send(json.dumps([{"taskType": "ping", "ping": True}]).encode())
            assert await recv(ws) == {"data": [{"taskType": "ping", "pong": True}]}

    asyncio.run(scenario())


def test_an_idle_connection_is_closed_after_the_idle_timeout(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory(ws_idle_timeout_s=0.5)

    async def scenario() -> None:
        async with connect(ws_url(server)) as ws:
            await authenticate(ws)
            # Activity keeps it open past the timeout: a client pinging every 0.3 s.
            for _ in range(3):
                await asyncio.sleep(0.3)
                await send(ws, {"taskType": "ping", "ping": True})
                assert (await recv(ws))["data"][0]["pong"] is True
            with pytest.raises(ConnectionClosed) as closed:
                await recv(ws, timeout=10)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1000

    asyncio.run(scenario())


def test_a_resumed_session_gets_its_uuid_back_and_the_images_buffered_meanwhile(
    ws_server: RunningServer, gate: Gate
) -> None:
    task = tiny_task(numberResults=3)

    async def scenario() -> None:
        with gate.hold(passes=1):
            async with connect(ws_url(ws_server)) as ws:
                session = await authenticate(ws)
                await send(ws, task)
                first = (await recv(ws))["data"][0]
                await asyncio.to_thread(gate.wait_held)
                drop(ws)
            await asyncio.to_thread(wait_detached, ws_server, session)
        # The rest is generated while nobody listens.
        await asyncio.to_thread(wait_finished, ws_server, task["taskUUID"])
        async with connect(ws_url(ws_server)) as ws:
            assert await authenticate(ws, resume=session) == session
            rest = [(await recv(ws))["data"][0] for _ in range(2)]
        uuids = {item["imageUUID"] for item in [first, *rest]}
        assert len(uuids) == 3
        assert {item["taskUUID"] for item in rest} == {task["taskUUID"]}

    asyncio.run(scenario())


def test_a_session_resumed_after_its_ttl_is_a_new_session(
    server_factory: Callable[..., RunningServer],
) -> None:
    ttl = 0.3
    server = server_factory(ws_session_ttl_s=ttl)

    async def scenario() -> None:
        async with connect(ws_url(server)) as ws:
            session = await authenticate(ws)
        await asyncio.to_thread(wait_detached, server, session)
        # The TTL itself is what is under test: let it pass.
        await asyncio.sleep(ttl * 2)
        async with connect(ws_url(server)) as ws:
            fresh = await authenticate(ws, resume=session)
        assert fresh != session

    asyncio.run(scenario())


def test_a_session_resumes_only_with_the_key_that_opened_it(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory(api_keys=["alice", "bob"])

    async def scenario() -> None:
        async with connect(ws_url(server)) as ws:
            session = await authenticate(ws, "alice")
        async with connect(ws_url(server)) as ws:
            assert await authenticate(ws, "bob", resume=session) != session
        async with connect(ws_url(server)) as ws:
            assert await authenticate(ws, "alice", resume=session) == session

    asyncio.run(scenario())


def test_a_task_resent_after_a_reconnect_is_a_conflict_and_get_response_has_its_results(
    ws_server: RunningServer, gate: Gate
) -> None:
    task = tiny_task(numberResults=2)

    async def scenario() -> None:
        with gate.hold():
            async with connect(ws_url(ws_server)) as ws:
                await authenticate(ws)
                await send(ws, task)
                await asyncio.to_thread(gate.wait_held)
                drop(ws)
            # A client that does not resume (runware 0.5.24, sdk-js) sends the task again.
            async with connect(ws_url(ws_server)) as ws:
                await authenticate(ws)
                await send(ws, task)
                frame = await recv(ws)
                assert list(frame) == ["errors"], frame
                [error] = frame["errors"]
                assert error["code"] == "conflictTaskUUID"
                assert error["taskUUID"] == task["taskUUID"]
                gate.release()
                items = await poll_until_done(ws, task["taskUUID"], 2)
        assert len({item["imageUUID"] for item in items}) == 2

    asyncio.run(scenario())


@pytest.mark.parametrize(("output_type", "limit"), [("URL", 1024), ("base64Data", None)])
def test_four_results_come_one_image_per_frame(
    ws_server: RunningServer, output_type: str, limit: int | None
) -> None:
    task = tiny_task(numberResults=4, outputType=output_type, width=128, height=128)

    async def scenario() -> list[str]:
        raw_frames = []
        async with connect(ws_url(ws_server)) as ws:
            await authenticate(ws)
            await send(ws, task)
            for _ in range(4):
                raw_frames.append(str(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S)))
        return raw_frames

    raw_frames = asyncio.run(scenario())
    frames = [json.loads(raw) for raw in raw_frames]
    assert [len(frame["data"]) for frame in frames] == [1, 1, 1, 1]
    assert len({frame["data"][0]["imageUUID"] for frame in frames}) == 4
    if limit is not None:
        # With URL output a frame carries a link, never the image: far below any client's limit.
        assert max(len(raw.encode()) for raw in raw_frames) < limit
