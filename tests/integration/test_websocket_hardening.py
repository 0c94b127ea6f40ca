"""The WebSocket transport under hostile or broken clients, against a real server on loopback:
malformed and oversized frames, unauthenticated floods, session piles, clients that stop
reading, cross-site pages, and clients that vanish. A property test throws arbitrary frames at
one connection and checks that it survives all of them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection as SyncConnection
from websockets.sync.client import connect as sync_connect

from tests.conftest import RunningServer, tiny_task
from tests.integration.test_websocket import authenticate, recv, send
from tests.live import session_attached, task_status, wait_detached, wait_finished, wait_until

RECV_TIMEOUT_S = 60.0
PING = {"taskType": "ping", "ping": True}
PONG = {"data": [{"taskType": "ping", "pong": True}]}


def ws_url(server: RunningServer) -> str:
    return f"ws://127.0.0.1:{server.settings.port}/v1"


async def assert_pong(ws: ClientConnection) -> None:
    """The socket still works, and nothing else was queued before the pong."""
    await send(ws, PING)
    assert await recv(ws) == PONG


def sessions_held(server: RunningServer) -> int:
    async def count() -> int:
        return len(server.runtime().sessions)

    return int(server.call(count()))


def session_state(server: RunningServer, session_uuid: str) -> tuple[int, int, int]:
    """(frames, bytes, dropped frames) the server keeps for a session."""

    async def state() -> tuple[int, int, int]:
        session = server.runtime().sessions.get(session_uuid)
        assert session is not None
        return session.buffered, session.buffered_bytes, session.dropped

    result: tuple[int, int, int] = server.call(state())
    return result


@pytest.fixture
def open_server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    return server_factory(safety_checker="none")


def test_deeply_nested_frames_are_invalid_json_and_the_socket_stays(
    open_server: RunningServer,
) -> None:
    async def scenario() -> None:
        async with connect(ws_url(open_server)) as ws:
            await authenticate(ws)
            # The second is over the size that is parsed off the event loop.
            for text in ("[" * 100_000, "[" * 300_000, "[" * 50_000 + "]" * 50_000):
                await ws.send(text)
                frame = await recv(ws)
                assert [e["code"] for e in frame["errors"]] == ["invalidJSON"], frame
            await assert_pong(ws)

    asyncio.run(scenario())


def test_an_unauthenticated_frame_is_answered_once_and_runs_nothing(
    open_server: RunningServer,
) -> None:
    tasks = [tiny_task() for _ in range(50)]

    async def scenario() -> None:
        async with connect(ws_url(open_server)) as ws:
            await send(ws, *tasks)
            frame = await recv(ws)
            [error] = frame["errors"]
            assert error["code"] == "missingApiKey"
            assert error["taskUUID"] == tasks[0]["taskUUID"]
            await assert_pong(ws)

    asyncio.run(scenario())
    assert {task_status(open_server, t["taskUUID"]) for t in (tasks[0], tasks[-1])} == {None}


def test_a_frame_over_the_task_cap_is_one_too_many_tasks_error_and_runs_nothing(
    open_server: RunningServer,
) -> None:
    tasks = [tiny_task(deliveryMethod="async") for _ in range(20_000)]

    async def scenario() -> None:
        async with connect(ws_url(open_server)) as ws:
            # Before and after authentication alike.
            for _ in range(2):
                await send(ws, *tasks)
                frame = await recv(ws)
                [error] = frame["errors"]
                assert error["code"] == "tooManyTasks"
                assert str(open_server.settings.max_tasks_per_request) in error["message"]
                await assert_pong(ws)
                await authenticate(ws)

    asyncio.run(scenario())
    assert {task_status(open_server, t["taskUUID"]) for t in (tasks[0], tasks[-1])} == {None}


def test_a_frame_of_authentications_leaves_one_session(open_server: RunningServer) -> None:
    auths = [{"taskType": "authentication", "apiKey": "k"} for _ in range(50)]

    async def scenario() -> None:
        async with connect(ws_url(open_server)) as ws:
            await send(ws, *auths)
            for _ in auths:
                assert "connectionSessionUUID" in (await recv(ws))["data"][0]
            await assert_pong(ws)
            assert sessions_held(open_server) == 1

    asyncio.run(scenario())


def test_a_new_session_beyond_the_cap_is_refused_and_closed_1013_while_resumes_work(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory(safety_checker="none", ws_max_sessions=2)

    async def scenario() -> None:
        async with connect(ws_url(server)) as first, connect(ws_url(server)) as second:
            kept = await authenticate(first)
            await authenticate(second)
            async with connect(ws_url(server)) as third:
                await send(third, {"taskType": "authentication", "apiKey": "k"})
                [error] = (await recv(third))["errors"]
                assert error["code"] == "tooManySessions"
                assert error["taskType"] == "authentication"
                with pytest.raises(ConnectionClosed) as closed:
                    await recv(third)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 1013
        async with connect(ws_url(server)) as again:
            assert await authenticate(again, resume=kept) == kept
        assert sessions_held(server) == 2

    asyncio.run(scenario())


class StalledClient:
    """A WebSocket client that never reads: a raw socket with a tiny receive buffer, so what
    the server sends backs up into its own buffers within a few megabytes."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(RECV_TIMEOUT_S)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /v1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self._pending = b""
        while b"\r\n\r\n" not in self._pending:
            self._pending += self._recv()
        head, self._pending = self._pending.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        return chunk

    def _read(self, n: int) -> bytes:
        while len(self._pending) < n:
            self._pending += self._recv()
        data, self._pending = self._pending[:n], self._pending[n:]
        return data

    def send(self, *tasks: Any) -> None:
        payload = json.dumps(list(tasks)).encode()
        n = len(payload)
        if n < 126:
            length = bytes([0x80 | n])
        elif n < 65536:
            length = bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            length = bytes([0x80 | 127]) + n.to_bytes(8, "big")
        # A zero masking key leaves the payload as it is: valid, and no XOR in Python.
        self.sock.sendall(bytes([0x81]) + length + b"\0\0\0\0" + payload)

    def _next(self) -> tuple[int, bytes]:
        first, second = self._read(2)
        n = second & 0x7F
        if n == 126:
            n = int.from_bytes(self._read(2), "big")
        elif n == 127:
            n = int.from_bytes(self._read(8), "big")
        return first, self._read(n)

    def read_frame(self) -> dict[str, Any]:
        first, payload = self._next()
        assert first == 0x81, first
        frame: dict[str, Any] = json.loads(payload)
        return frame

    def read_to_end(self) -> int | None:
        """Read on until the server ends the connection; its close code, if it sent one."""
        try:
            while True:
                first, payload = self._next()
                if first == 0x88:
                    # Answer the close, as a client does, so the server need not wait for it.
                    self.sock.sendall(bytes([0x88, 0x80]) + b"\0\0\0\0")
                    while self.sock.recv(65536):
                        pass
                    return int.from_bytes(payload[:2], "big")
        except ConnectionError:
            return None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def stalled_server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    # Generous for every client that reads; a client that never reads exceeds any timeout.
    return server_factory(
        safety_checker="none", ws_send_timeout_s=2.0, ws_session_buffer_bytes=2_000_000
    )


def stall(server: RunningServer, task_uuid: str) -> tuple[StalledClient, str]:
    """A session whose client stopped reading while 16 large replies were on their way."""
    client = StalledClient(server.settings.port)
    client.send({"taskType": "authentication", "apiKey": "k"})
    session: str = client.read_frame()["data"][0]["connectionSessionUUID"]
    for _ in range(16):
        client.send({"taskType": "getResponse", "taskUUID": task_uuid})
    return client, session


def large_result(server: RunningServer) -> str:
    """A finished task whose getResponse reply is most of a megabyte (4 noisy base64 PNGs)."""
    task = tiny_task(
        numberResults=4, width=256, height=256, outputType="base64Data", outputFormat="PNG"
    )
    assert server.post([task]).status_code == 200
    return str(task["taskUUID"])


def test_a_client_that_stops_reading_is_dropped_and_its_session_resumes(
    stalled_server: RunningServer,
) -> None:
    task_uuid = large_result(stalled_server)
    client, session = stall(stalled_server, task_uuid)
    try:
        wait_until(lambda: not session_attached(stalled_server, session), timeout=RECV_TIMEOUT_S)
        assert session_state(stalled_server, session)[0] >= 1
        # The server let go of the socket: once read, it ends (with 1008 if the close frame
        # still got out).
        assert client.read_to_end() in (None, 1008)
    finally:
        client.close()

    async def resume() -> None:
        async with connect(ws_url(stalled_server), max_size=None) as ws:
            assert await authenticate(ws, resume=session) == session
            frame = await recv(ws)
            assert {item["taskUUID"] for item in frame["data"]} == {task_uuid}

    asyncio.run(resume())


def test_a_detached_session_keeps_at_most_its_byte_cap(stalled_server: RunningServer) -> None:
    client, session = stall(stalled_server, large_result(stalled_server))
    try:
        # 16 replies of ~750 kB each, most of them kept while detached: over the 2 MB cap.
        wait_until(lambda: session_state(stalled_server, session)[2] > 0, timeout=RECV_TIMEOUT_S)
        frames, size, _ = session_state(stalled_server, session)
        assert frames >= 1
        assert size <= 2_000_000
    finally:
        client.close()


@pytest.mark.parametrize("keys", [[], ["k"]])
def test_a_cross_site_origin_is_refused_before_the_upgrade(
    server_factory: Callable[..., RunningServer], keys: list[str]
) -> None:
    server = server_factory(
        safety_checker="none", api_keys=keys, ws_allowed_origins=["https://app.example"]
    )
    port = server.settings.port

    async def scenario() -> None:
        for origin in ("https://evil.example", "null", f"http://127.0.0.1:{port + 1}"):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(ws_url(server), origin=origin):  # type: ignore[arg-type]
                    pass
            assert refused.value.response.status_code == 403
        for allowed in (f"http://127.0.0.1:{port}", "https://app.example", None):
            async with connect(ws_url(server), origin=allowed) as ws:  # type: ignore[arg-type]
                await authenticate(ws)

    asyncio.run(scenario())


def test_any_origin_is_accepted_when_the_operator_allows_star(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory(safety_checker="none", ws_allowed_origins=["*"])

    async def scenario() -> None:
        async with connect(ws_url(server), origin="https://anywhere.example") as ws:  # type: ignore[arg-type]
            await authenticate(ws)

    asyncio.run(scenario())


class RecordsHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def server_log(open_server: RunningServer) -> Iterator[list[logging.LogRecord]]:
    """Every record of the server's loggers (uvicorn's do not propagate to the root)."""
    handler = RecordsHandler()
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "asyncio")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def test_clients_that_vanish_leave_no_traceback_in_the_log(
    open_server: RunningServer, server_log: list[logging.LogRecord]
) -> None:
    port = open_server.settings.port
    streaming = tiny_task(numberResults=3, deliveryMethod="sync")

    async def scenario() -> None:
        # Gone during the handshake.
        raw = socket.create_connection(("127.0.0.1", port))
        raw.sendall(b"GET /v1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        raw.close()
        # Gone right after the upgrade; gone with a deep frame and a flood on their way.
        async with connect(ws_url(open_server)) as ws:
            ws.transport.abort()
        async with connect(ws_url(open_server)) as ws:
            await ws.send("[" * 100_000)
            await send(ws, *(tiny_task() for _ in range(100)))
            ws.transport.abort()
        # Gone while a sync task streams its images, without and with a close frame.
        for polite in (False, True):
            async with connect(ws_url(open_server)) as ws:
                session = await authenticate(ws)
                task = dict(streaming, taskUUID=str(uuid.uuid4()))
                await send(ws, task)
                await recv(ws)
                if not polite:
                    ws.transport.abort()
            await asyncio.to_thread(wait_detached, open_server, session)
            await asyncio.to_thread(wait_finished, open_server, task["taskUUID"])
        # Everything above has been handled by the time this answers.
        async with connect(ws_url(open_server)) as ws:
            await assert_pong(ws)

    asyncio.run(scenario())
    noisy = [
        r
        for r in server_log
        if r.exc_info is not None or "Traceback" in r.getMessage() or r.levelno >= logging.ERROR
    ]
    assert noisy == [], [r.getMessage() for r in noisy]


# --- property: no frame kills a socket -----------------------------------------------------

TASK_TYPES = ["imageInference", "imageUpload", "getResponse", "modelSearch", "ping"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=16,
)
task_like = st.fixed_dictionaries(
    {"taskType": st.sampled_from(TASK_TYPES) | st.text(max_size=12)},
    optional={
        "taskUUID": st.uuids(version=4).map(str) | json_values,
        "model": st.sampled_from(["runware:100@1", "runway:4@1", "nope:1@1"]) | json_values,
        "positivePrompt": json_values,
        "width": st.integers(-(2**70), 2**70) | json_values,
        "height": st.integers(0, 4096),
        "numberResults": json_values,
        "image": json_values,
        "search": json_values,
        "extra": json_values,
    },
)
frames = st.one_of(
    json_values.map(json.dumps),
    st.lists(task_like, min_size=1, max_size=5).map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda data: b"\xff" + data),
    st.integers(1_000, 300_000).map(lambda n: "[" * n),
    st.integers(1_000, 60_000).map(lambda n: '{"a":' * n),
    st.integers(1_000, 60_000).map(lambda n: "[" * n + "]" * n),
)


def check_reply(raw: str | bytes) -> dict[str, Any]:
    assert isinstance(raw, str), "the server answers in text frames"
    assert "Traceback" not in raw
    frame: dict[str, Any] = json.loads(raw)
    assert set(frame) in ({"data"}, {"errors"}), frame
    for item in frame.get("errors", []):
        assert item["code"] not in ("unknownError", "internalServerError"), item
    return frame


def exchange(ws: SyncConnection, frame: str | bytes) -> None:
    """Send a frame, then a ping; every reply up to the pong must be well formed."""
    ws.send(frame)
    ws.send(json.dumps([PING]))
    while check_reply(ws.recv(timeout=RECV_TIMEOUT_S)) != PONG:
        pass


def test_no_frame_kills_the_socket_or_earns_an_internal_error(open_server: RunningServer) -> None:
    with sync_connect(ws_url(open_server), max_size=None) as ws:
        ws.send(json.dumps([{"taskType": "authentication", "apiKey": "k"}]))
        check_reply(ws.recv(timeout=RECV_TIMEOUT_S))

        @settings(
            max_examples=60,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(frame=frames)
        def survives(frame: str | bytes) -> None:
            exchange(ws, frame)

        survives()
        # Replies of tasks still running when the last pong came are checked too.
        exchange(ws, json.dumps([PING]))
