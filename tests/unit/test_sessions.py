"""WebSocket sessions and the connection that drives them, with fakes for the socket and the
dispatcher: the limits one client can hit, checked without a server or wall-clock windows."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from starlette.websockets import WebSocketDisconnect

from impasto.api import websocket as ws_module
from impasto.api.websocket import WebSocketConnection, origin_allowed
from impasto.protocol.errors import ServiceUnavailable
from impasto.service.dispatcher import Envelope
from impasto.service.sessions import Session, SessionRegistry, encode_frame
from impasto.tenancy.directory import KeyDirectory

WAIT_S = 10.0
PING = {"taskType": "ping", "ping": True}
PONG = {"data": [{"taskType": "ping", "pong": True}]}


class FakeWebSocket:
    """What WebSocketConnection uses of starlette's WebSocket: client messages from a queue,
    sent frames recorded; sends can fail (socket gone) or never complete (a client that
    does not read)."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: list[dict[str, Any]] = []
        self.closed: tuple[int, str | None] | None = None
        # starlette's Address of the peer; None as for a socket without one.
        self.client: Any = None
        self.fail_after: int | None = None
        self.stall_after: int | None = None
        self.stall_close = False

    def client_sends(self, payload: Any) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        self.incoming.put_nowait({"type": "websocket.receive", "text": text})

    def client_sends_bytes(self, data: bytes) -> None:
        self.incoming.put_nowait({"type": "websocket.receive", "bytes": data})

    def client_leaves(self) -> None:
        self.incoming.put_nowait({"type": "websocket.disconnect", "code": 1006})

    async def receive(self) -> dict[str, Any]:
        return await self.incoming.get()

    async def send_text(self, text: str) -> None:
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise WebSocketDisconnect(code=1006)
        if self.stall_after is not None and len(self.sent) >= self.stall_after:
            await asyncio.Event().wait()
        self.sent.append(json.loads(text))

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        if self.stall_close:
            await asyncio.Event().wait()
        self.closed = (code, reason)


class FakeDispatcher:
    """Answers every task with an ack; `hold` keeps tasks running until it is set."""

    def __init__(self, keys: list[str] | None = None) -> None:
        self.auth = KeyDirectory(keys or [])
        self.started: list[Any] = []
        self.hold: asyncio.Event | None = None
        self.delivered = asyncio.Event()

    async def stream_task(self, raw: Any, owner: str | None = None) -> AsyncIterator[Envelope]:
        self.started.append(raw)
        if self.hold is not None:
            await self.hold.wait()
        yield Envelope(data=[{"taskType": raw.get("taskType"), "taskUUID": raw.get("taskUUID")}])
        # Resumed once the connection has delivered what was yielded.
        self.delivered.set()


def auth(key: str = "k", resume: str | None = None) -> dict[str, Any]:
    task: dict[str, Any] = {"taskType": "authentication", "apiKey": key}
    if resume is not None:
        task["connectionSessionUUID"] = resume
    return task


def task(n: int) -> dict[str, Any]:
    return {"taskType": "getResponse", "taskUUID": f"00000000-0000-4000-8000-{n:012d}"}


def connection(
    ws: FakeWebSocket,
    dispatcher: FakeDispatcher | None = None,
    sessions: SessionRegistry | None = None,
    **options: Any,
) -> WebSocketConnection:
    return WebSocketConnection(
        cast(Any, ws),
        cast(Any, dispatcher or FakeDispatcher()),
        sessions if sessions is not None else SessionRegistry(),
        idle_timeout_s=3600.0,
        **options,
    )


async def serve_until_left(conn: WebSocketConnection, ws: FakeWebSocket) -> None:
    """Everything queued so far, then the client leaves; serve must return."""
    ws.client_leaves()
    await asyncio.wait_for(conn.serve(), WAIT_S)


def codes(frames: list[dict[str, Any]]) -> list[str]:
    return [item["code"] for frame in frames for item in frame.get("errors", [])]


def test_a_deeply_nested_frame_is_invalid_json_and_the_socket_is_kept() -> None:
    async def scenario() -> None:
        ws = FakeWebSocket()
        conn = connection(ws)
        ws.client_sends("[" * 100_000)
        ws.client_sends("[" * 5_000 + "]" * 5_000)
        ws.client_sends_bytes(b"\xff\xfe[\x80]")
        ws.client_sends([PING])
        await serve_until_left(conn, ws)
        assert codes(ws.sent) == ["invalidJSON"] * 3
        assert ws.sent[-1] == PONG

    asyncio.run(scenario())


def test_a_large_frame_is_parsed_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed_on: list[bool] = []
    parse_frame = ws_module.parse_frame

    def recording(text: str) -> Any:
        parsed_on.append(threading.current_thread() is threading.main_thread())
        return parse_frame(text)

    monkeypatch.setattr(ws_module, "parse_frame", recording)

    async def scenario() -> None:
        ws = FakeWebSocket()
        conn = connection(ws)
        ws.client_sends([PING])
        ws.client_sends("[" + " " * (ws_module.OFF_LOOP_FRAME_CHARS + 1) + json.dumps(PING) + "]")
        await serve_until_left(conn, ws)
        assert ws.sent == [PONG, PONG]

    asyncio.run(scenario())
    assert parsed_on == [True, False]


def test_an_unauthenticated_frame_gets_one_error_naming_its_first_task() -> None:
    async def scenario() -> None:
        ws = FakeWebSocket()
        dispatcher = FakeDispatcher()
        conn = connection(ws, dispatcher)
        ws.client_sends([task(n) for n in range(50)])
        ws.client_sends([PING])
        await serve_until_left(conn, ws)
        assert len(ws.sent) == 2, ws.sent
        [error] = ws.sent[0]["errors"]
        assert error["code"] == "missingApiKey"
        assert error["taskUUID"] == task(0)["taskUUID"]
        assert ws.sent[1] == PONG
        assert dispatcher.started == []

    asyncio.run(scenario())


def test_a_frame_over_the_task_cap_gets_one_too_many_tasks_and_nothing_runs() -> None:
    async def scenario() -> None:
        ws = FakeWebSocket()
        dispatcher = FakeDispatcher()
        conn = connection(ws, dispatcher, max_tasks=3)
        ws.client_sends([auth()])
        ws.client_sends([task(n) for n in range(4)])
        ws.client_sends([PING for _ in range(4)])
        await serve_until_left(conn, ws)
        assert codes(ws.sent) == ["tooManyTasks"] * 2
        assert ws.sent[1]["errors"][0]["parameter"] == "tasks"
        assert PONG not in ws.sent
        assert dispatcher.started == []

    asyncio.run(scenario())


def test_the_rest_of_a_frame_is_dropped_once_the_socket_is_gone() -> None:
    async def scenario() -> None:
        ws = FakeWebSocket()
        dispatcher = FakeDispatcher()
        conn = connection(ws, dispatcher)
        ws.client_sends([auth()])
        ws.client_sends([PING, task(1), task(2)])
        # The authentication reply goes out; the pong finds the socket gone.
        ws.fail_after = 1
        await serve_until_left(conn, ws)
        await asyncio.sleep(0)
        assert dispatcher.started == []
        assert conn.gone

    asyncio.run(scenario())


@pytest.mark.parametrize("stall_close", [False, True])
def test_a_client_that_never_reads_is_dropped_and_its_session_keeps_the_frame(
    stall_close: bool,
) -> None:
    async def scenario() -> None:
        ws = FakeWebSocket()
        ws.stall_after = 1
        ws.stall_close = stall_close
        sessions = SessionRegistry()
        conn = connection(ws, sessions=sessions, send_timeout_s=0.05)
        ws.client_sends([auth()])
        ws.client_sends([task(1)])
        # No client_leaves: the connection itself must give up on the socket and return.
        await asyncio.wait_for(conn.serve(), WAIT_S)
        [session_uuid] = [item["connectionSessionUUID"] for item in ws.sent[0]["data"]]
        session = sessions.get(session_uuid)
        assert session is not None
        assert not session.attached
        assert session.buffered == 1
        assert ws.closed == (None if stall_close else (1008, "client reads too slowly"))

    asyncio.run(scenario())


def test_re_authenticating_on_one_connection_keeps_one_session() -> None:
    async def scenario() -> None:
        ws = FakeWebSocket()
        sessions = SessionRegistry()
        conn = connection(ws, sessions=sessions)
        ws.client_sends([auth() for _ in range(20)])
        await serve_until_left(conn, ws)
        assert len([f for f in ws.sent if "data" in f]) == 20
        assert len(sessions) == 1

    asyncio.run(scenario())


def test_a_session_left_with_a_running_task_is_kept_for_a_resume() -> None:
    async def scenario() -> None:
        ws = FakeWebSocket()
        dispatcher = FakeDispatcher()
        dispatcher.hold = asyncio.Event()
        sessions = SessionRegistry()
        conn = connection(ws, dispatcher, sessions)
        ws.client_sends([auth(), task(1), auth()])
        await serve_until_left(conn, ws)
        first, second = (f["data"][0]["connectionSessionUUID"] for f in ws.sent[:2])
        assert len(sessions) == 2
        dispatcher.hold.set()
        kept = sessions.get(first)
        assert kept is not None
        # The held task finishes into the buffer of the session it was started on.
        await asyncio.wait_for(dispatcher.delivered.wait(), WAIT_S)
        assert kept.buffered == 1
        assert sessions.get(second) is not None

    asyncio.run(scenario())


def test_a_new_session_beyond_the_cap_is_refused_and_the_socket_closed_1013() -> None:
    async def scenario() -> None:
        sessions = SessionRegistry(max_sessions=1)
        ws = FakeWebSocket()
        conn = connection(ws, sessions=sessions)
        ws.client_sends([auth()])
        await serve_until_left(conn, ws)
        other = FakeWebSocket()
        conn = connection(other, sessions=sessions)
        other.client_sends([auth(), PING])
        await asyncio.wait_for(conn.serve(), WAIT_S)
        [frame] = other.sent
        [error] = frame["errors"]
        assert error["code"] == "tooManySessions"
        assert error["taskType"] == "authentication"
        assert "taskUUID" not in error
        assert other.closed is not None
        assert other.closed[0] == 1013
        assert len(sessions) == 1

    asyncio.run(scenario())


def test_registry_cap_counts_live_sessions_and_reaps_expired_ones_first() -> None:
    now = [0.0]
    registry = SessionRegistry(ttl_s=10.0, max_sessions=2, clock=lambda: now[0])
    first = registry.open(None, "k")
    registry.open(None, "k")
    with pytest.raises(ServiceUnavailable) as refused:
        registry.open(None, "k")
    assert refused.value.code == "tooManySessions"
    # Resuming is not a new session: it works at the cap.
    assert registry.open(first.session_uuid, "k") is first
    now[0] = 11.0
    fresh = registry.open(None, "k")
    assert registry.get(first.session_uuid) is None
    assert registry.get(fresh.session_uuid) is fresh
    assert len(registry) == 1


def test_release_forgets_only_a_session_that_loses_nothing() -> None:
    async def scenario() -> None:
        registry = SessionRegistry()
        idle, buffered = registry.open(None, "k"), registry.open(None, "k")
        await buffered.deliver({"data": [{"n": 1}]})
        assert registry.release(idle)
        assert not registry.release(buffered)
        assert registry.get(idle.session_uuid) is None
        assert registry.get(buffered.session_uuid) is buffered

    asyncio.run(scenario())


def test_a_session_buffer_keeps_the_newest_frames_within_its_byte_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    frames = [{"data": [{"n": n, "pad": "x" * 100}]} for n in range(10)]
    size = len(encode_frame(frames[0]))

    async def scenario() -> list[int]:
        session = Session("s", "owner", max_buffered=1000, max_buffered_bytes=4 * size)
        for frame in frames:
            await session.deliver(frame)
        assert session.buffered == 4
        assert session.buffered_bytes == 4 * size
        assert session.dropped == 6
        received: list[int] = []

        async def sender(text: str) -> None:
            received.append(json.loads(text)["data"][0]["n"])

        await session.attach(sender)
        assert session.buffered == 0
        assert session.buffered_bytes == 0
        return received

    with caplog.at_level(logging.WARNING, logger="impasto.sessions"):
        assert asyncio.run(scenario()) == [6, 7, 8, 9]
    # One warning for the detached spell, not one per dropped frame.
    assert len([r for r in caplog.records if "buffer full" in r.getMessage()]) == 1


def test_a_frame_larger_than_the_whole_byte_cap_is_not_kept() -> None:
    async def scenario() -> None:
        session = Session("s", "owner", max_buffered_bytes=50)
        await session.deliver({"data": [{"pad": "x" * 100}]})
        assert session.buffered == 0
        assert session.buffered_bytes == 0

    asyncio.run(scenario())


def test_a_session_buffer_still_caps_its_frame_count() -> None:
    async def scenario() -> None:
        session = Session("s", "owner", max_buffered=3)
        for n in range(5):
            await session.deliver({"data": [{"n": n}]})
        assert session.buffered == 3

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "ok"),
    [
        (None, "example.com", [], True),
        ("http://example.com", "example.com", [], True),
        ("https://example.com", "example.com", [], True),
        ("http://Example.com:8080", "example.com:8080", [], True),
        ("http://127.0.0.1:9000", "127.0.0.1:9000", [], True),
        ("http://[::1]:9000", "[::1]:9000", [], True),
        ("http://example.com:80", "example.com", [], True),
        ("http://example.com", "example.com:8080", [], False),
        ("http://evil.example", "example.com", [], False),
        ("http://example.com.evil.example", "example.com", [], False),
        ("null", "example.com", [], False),
        ("http://example.com:99999", "example.com", [], False),
        ("http://evil.example", None, [], False),
        ("https://app.example", "api.example", ["https://app.example/"], True),
        ("https://APP.example", "api.example", ["https://app.example"], True),
        ("https://other.example", "api.example", ["https://app.example"], False),
        ("https://other.example", "api.example", ["*"], True),
        ("null", "api.example", ["null"], True),
    ],
)
def test_origin_allowed(origin: str | None, host: str | None, allowed: list[str], ok: bool) -> None:
    assert origin_allowed(origin, host, allowed) is ok
