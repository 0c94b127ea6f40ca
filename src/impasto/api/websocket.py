"""WebSocket transport on /v1: the Runware framing over the same dispatcher as REST.

Client frames are JSON arrays of tasks; server frames are `{"data": [...]}` or
`{"errors": [...]}`, never both. A sync imageInference streams one image per frame; any other
task answers in one data frame (a getResponse reply holds every generation). The first task
must be `authentication`; its session outlives the socket (see service.sessions).

What one client can cost is bounded: a frame holds at most `max_tasks` tasks, a refused frame
earns one error frame, a large frame is parsed off the event loop, a connection holds one
session, and a client that does not read a frame within `send_timeout_s` is dropped (its
session keeps the frame for a resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from impasto.protocol.errors import (
    AuthError,
    ImpastoError,
    RequestError,
    ServiceUnavailable,
    TooManyTasks,
)
from impasto.protocol.parsing import parse_task, task_context
from impasto.protocol.tasks import AuthenticationIn
from impasto.service.dispatcher import Envelope, TaskDispatcher
from impasto.service.runtime import Runtime
from impasto.service.sessions import Frame, Session, SessionRegistry, encode_frame
from impasto.tenancy.keys import ANONYMOUS, Principal

router = APIRouter()
log = logging.getLogger("impasto.websocket")

# Parsing a frame this large takes milliseconds: off the loop, so one client cannot stall
# every other.
OFF_LOOP_FRAME_CHARS = 256 * 1024

# RFC 6455 close codes.
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_TRY_LATER = 1013


class SocketGone(Exception):
    """The socket is closed, closing, or its client stopped reading."""


def frames_of(envelope: Envelope) -> list[Frame]:
    """The data of an envelope in one frame, its errors in a frame of their own.

    compat: runware-sdk ignores `data` in a frame that has `errors`; @runware/sdk-js reads a
    getResponse reply from the first frame that names the task, so it must be whole.
    """
    frames: list[Frame] = []
    if envelope.data:
        frames.append({"data": list(envelope.data)})
    if envelope.errors:
        frames.append({"errors": [e.to_item() for e in envelope.errors]})
    return frames


def parse_frame(text: str) -> Any:
    """The JSON of a frame; RequestError(invalidJSON) for anything json cannot read."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        # json raises RecursionError on deep nesting: bad input, not a server fault.
        raise RequestError("Frame is not valid JSON.", code="invalidJSON") from None


def origin_allowed(origin: str | None, host: str | None, allowed: Sequence[str]) -> bool:
    """Whether a WebSocket request may be accepted for its Origin header.

    Browsers send Origin on every WebSocket request and let any page open one, so without this
    a page on any site could drive an open server from its visitors' machines. SDKs and curl
    send no Origin and are not affected. Same host (Origin's host:port is the Host header) and
    the operator's list (`*` for any) are allowed.
    """
    if origin is None:
        return True
    wanted = origin.strip().rstrip("/").lower()
    if any(entry == "*" or entry.strip().rstrip("/").lower() == wanted for entry in allowed):
        return True
    if not host:
        return False
    try:
        parts = urlsplit(wanted)
        host_parts = urlsplit("//" + host.strip().lower())
        default = 443 if parts.scheme in ("https", "wss") else 80
        origin_address = (parts.hostname, parts.port or default)
        host_address = (host_parts.hostname, host_parts.port or default)
    except ValueError:
        # A port that is not a number, or out of range.
        return False
    return parts.hostname is not None and origin_address == host_address


class WebSocketConnection:
    """One socket: authentication, pings, and tasks run on its session."""

    def __init__(
        self,
        websocket: WebSocket,
        dispatcher: TaskDispatcher,
        sessions: SessionRegistry,
        idle_timeout_s: float,
        *,
        send_timeout_s: float = 30.0,
        max_tasks: int = 100,
    ) -> None:
        self._ws = websocket
        self._dispatcher = dispatcher
        self._sessions = sessions
        self._idle_timeout_s = idle_timeout_s
        self._send_timeout_s = send_timeout_s
        self._max_tasks = max_tasks
        self._send_lock = asyncio.Lock()
        self._last_activity = time.monotonic()
        self._session: Session | None = None
        self._principal: Principal = ANONYMOUS
        self._gone = asyncio.Event()
        self._close: tuple[int, str] | None = None
        # One bound method for the session to hold and to compare on detach (each attribute
        # access would make a new, non-identical one).
        self._sender = self.send

    @property
    def gone(self) -> bool:
        return self._gone.is_set()

    async def send(self, text: str) -> None:
        """Send one frame's text; raises SocketGone if the socket is gone or its client did
        not take the frame within the send timeout (a session then keeps it)."""
        async with self._send_lock:
            if self._gone.is_set():
                raise SocketGone
            try:
                await asyncio.wait_for(self._ws.send_text(text), self._send_timeout_s)
            except TimeoutError:
                log.info(
                    "WebSocket client read nothing for %.1f s; dropping it", self._send_timeout_s
                )
                self._leave(CLOSE_POLICY, "client reads too slowly")
                raise SocketGone from None
            except Exception:
                self._leave()
                raise SocketGone from None
        self._last_activity = time.monotonic()

    async def reply(self, frame: Frame) -> None:
        """A direct answer (pong, auth, request errors): lost with the socket, like the socket's
        own request."""
        with contextlib.suppress(SocketGone):
            await self.send(encode_frame(frame))

    def _leave(self, code: int | None = None, reason: str = "") -> None:
        """Stop serving this socket; close it with `code` once the receive loop has ended."""
        if code is not None and self._close is None:
            self._close = (code, reason)
        self._gone.set()

    async def serve(self) -> None:
        try:
            while not self._gone.is_set():
                text = await self._receive()
                if text is None:
                    break
                await self._handle(text)
        finally:
            if self._session is not None:
                self._session.detach(self._sender)
            if self._close is not None:
                code, reason = self._close
                # Bounded: a client that reads nothing would hold the close frame forever.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self._ws.close(code=code, reason=reason), self._send_timeout_s
                    )

    async def _receive(self) -> str | None:
        """The next text of a frame, or None once the socket closed, sat idle too long, or
        this connection gave up on it."""
        while True:
            idle = time.monotonic() - self._last_activity
            receiving = asyncio.ensure_future(self._ws.receive())
            leaving = asyncio.ensure_future(self._gone.wait())
            try:
                done, _ = await asyncio.wait(
                    {receiving, leaving},
                    timeout=max(0.0, self._idle_timeout_s - idle),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                receiving.cancel()
                leaving.cancel()
            if self._gone.is_set():
                if receiving.done() and not receiving.cancelled():
                    # Retrieved, or asyncio would log it as never retrieved.
                    receiving.exception()
                return None
            if receiving not in done:
                if time.monotonic() - self._last_activity < self._idle_timeout_s:
                    continue
                self._leave(CLOSE_NORMAL, "idle timeout")
                return None
            try:
                message = receiving.result()
            except (WebSocketDisconnect, RuntimeError):
                return None
            if message.get("type") == "websocket.disconnect":
                return None
            self._last_activity = time.monotonic()
            text = message.get("text")
            if text is not None:
                return str(text)
            data = message.get("bytes") or b""
            try:
                return bytes(data).decode("utf-8")
            except UnicodeDecodeError:
                # Not JSON text either: the frame gets invalidJSON like any other.
                return "\ufffd"

    async def _handle(self, text: str) -> None:
        try:
            if len(text) > OFF_LOOP_FRAME_CHARS:
                tasks: Any = await asyncio.to_thread(parse_frame, text)
            else:
                tasks = parse_frame(text)
        except RequestError as error:
            await self.reply({"errors": [error.to_item()]})
            return
        if isinstance(tasks, dict):
            tasks = [tasks]
        if not isinstance(tasks, list) or not tasks:
            not_tasks = RequestError("A frame must be a non-empty JSON array of tasks.")
            await self.reply({"errors": [not_tasks.to_item()]})
            return
        if len(tasks) > self._max_tasks:
            too_many = TooManyTasks(
                f"A frame holds at most {self._max_tasks} tasks; this one has {len(tasks)}.",
                parameter="tasks",
            )
            await self.reply({"errors": [too_many.to_item()]})
            return
        for raw in tasks:
            # Work for a client that has left would be answered into the void.
            if self._gone.is_set() or not await self._handle_task(raw):
                return

    async def _handle_task(self, raw: Any) -> bool:
        """Handle one task of a frame; False when the rest of the frame is not to be handled."""
        task_type, task_uuid = task_context(raw)
        if task_type == "authentication":
            return await self._authenticate(raw)
        if task_type == "ping":
            await self.reply({"data": [{"taskType": "ping", "pong": True}]})
            return True
        session = self._session
        if session is None:
            # One answer per frame: every later task would only earn the same error.
            error = AuthError(
                "Authenticate first: send an authentication task with your apiKey.",
                code="missingApiKey",
                parameter="apiKey",
            ).for_task(task_type, task_uuid)
            await self.reply({"errors": [error.to_item()]})
            return False
        session.spawn(self._run(session, raw))
        return True

    async def _authenticate(self, raw: Any) -> bool:
        try:
            auth = parse_task(raw)
            assert isinstance(auth, AuthenticationIn)
            client = self._ws.client.host if self._ws.client is not None else None
            principal = await self._dispatcher.auth.authenticate(auth.apiKey, client)
        except ImpastoError as exc:
            # compat: no taskUUID on authentication replies (@runware/sdk-js matches them on
            # taskType, and fails fast only on code invalidApiKey).
            exc.task_type, exc.task_uuid = "authentication", None
            await self.reply({"errors": [exc.to_item()]})
            return False
        # A connection holds one session: the one it leaves is forgotten unless that loses
        # something (running tasks, buffered frames), so re-authenticating in a loop cannot
        # pile sessions up.
        previous = self._session
        if previous is not None and previous.session_uuid != auth.connectionSessionUUID:
            self._drop_session(previous)
        try:
            session = self._sessions.open(auth.connectionSessionUUID, auth.apiKey)
        except ServiceUnavailable as exc:
            exc.task_type, exc.task_uuid = "authentication", None
            await self.reply({"errors": [exc.to_item()]})
            self._leave(CLOSE_TRY_LATER, "too many sessions")
            return False
        if previous is not None and previous is not session:
            self._drop_session(previous)
        self._session = session
        self._principal = principal
        session.on_revoke(self._revoked)
        # The reply goes before the flush of what the session buffered: runware-sdk reads
        # frames until the authentication item, and resumes its tasks only after it.
        await self.reply(
            {
                "data": [
                    {"taskType": "authentication", "connectionSessionUUID": session.session_uuid}
                ]
            }
        )
        await session.attach(self._sender)
        return True

    def _revoked(self) -> None:
        """The key of this connection's session was revoked: the socket closes."""
        self._session = None
        self._leave(CLOSE_POLICY, "API key revoked")

    def _drop_session(self, session: Session) -> None:
        session.forget_revoke(self._revoked)
        session.detach(self._sender)
        self._sessions.release(session)
        if self._session is session:
            self._session = None

    async def _run(self, session: Session, raw: Any) -> None:
        # The session's tasks belong to the key that opened it, as for REST tasks; on an open
        # server to nobody (any client may read any task).
        async for envelope in self._dispatcher.stream_task(raw, self._principal):
            for frame in frames_of(envelope):
                await session.deliver(frame)


@router.websocket("/v1")
async def websocket_tasks(websocket: WebSocket) -> None:
    runtime: Runtime = websocket.app.state.runtime
    settings = runtime.settings
    origin = websocket.headers.get("origin")
    if not origin_allowed(origin, websocket.headers.get("host"), settings.ws_allowed_origins):
        # Closing before accept answers the upgrade with HTTP 403.
        log.info("WebSocket refused for Origin %r", origin)
        with contextlib.suppress(Exception):
            await websocket.close(code=CLOSE_POLICY)
        return
    try:
        await websocket.accept()
    except (WebSocketDisconnect, OSError):
        # The client left during the handshake (uvicorn raises ClientDisconnected, an OSError).
        return
    connection = WebSocketConnection(
        websocket,
        runtime.dispatcher,
        runtime.sessions,
        settings.ws_idle_timeout_s,
        send_timeout_s=settings.ws_send_timeout_s,
        max_tasks=settings.max_tasks_per_request,
    )
    await connection.serve()
