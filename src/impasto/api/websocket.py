"""WebSocket transport on /v1: the Runware framing over the same dispatcher as REST.

Client frames are JSON arrays of tasks; server frames are `{"data": [...]}` or
`{"errors": [...]}`, never both. A sync imageInference streams one image per frame; any other
task answers in one data frame (a getResponse reply holds every generation). The first task
must be `authentication`; its session outlives the socket (see service.sessions).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from impasto.protocol.errors import AuthError, ImpastoError, RequestError
from impasto.protocol.tasks import AuthenticationIn, parse_task, task_context
from impasto.service.dispatcher import Envelope, TaskDispatcher
from impasto.service.runtime import Runtime
from impasto.service.sessions import Frame, Session, SessionRegistry

router = APIRouter()


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


class WebSocketConnection:
    """One socket: authentication, pings, and tasks run on its session."""

    def __init__(
        self,
        websocket: WebSocket,
        dispatcher: TaskDispatcher,
        sessions: SessionRegistry,
        idle_timeout_s: float,
    ) -> None:
        self._ws = websocket
        self._dispatcher = dispatcher
        self._sessions = sessions
        self._idle_timeout_s = idle_timeout_s
        self._send_lock = asyncio.Lock()
        self._last_activity = time.monotonic()
        self._session: Session | None = None
        # One bound method for the session to hold and to compare on detach (each attribute
        # access would make a new, non-identical one).
        self._sender = self.send

    async def send(self, frame: Frame) -> None:
        """Send one frame; raises if the socket is gone (a session then buffers it)."""
        async with self._send_lock:
            await self._ws.send_text(json.dumps(frame))
        self._last_activity = time.monotonic()

    async def reply(self, frame: Frame) -> None:
        """A direct answer (pong, auth, request errors): lost with the socket, like the socket's
        own request."""
        with contextlib.suppress(Exception):
            await self.send(frame)

    async def serve(self) -> None:
        try:
            while True:
                text = await self._receive()
                if text is None:
                    return
                await self._handle(text)
        finally:
            if self._session is not None:
                self._session.detach(self._sender)

    async def _receive(self) -> str | None:
        """The next text of a frame, or None once the socket closed or sat idle too long."""
        while True:
            idle = time.monotonic() - self._last_activity
            try:
                message = await asyncio.wait_for(
                    self._ws.receive(), max(0.0, self._idle_timeout_s - idle)
                )
            except TimeoutError:
                if time.monotonic() - self._last_activity < self._idle_timeout_s:
                    continue
                with contextlib.suppress(Exception):
                    await self._ws.close(code=1000, reason="idle timeout")
                return None
            except (WebSocketDisconnect, RuntimeError):
                return None
            if message.get("type") == "websocket.disconnect":
                return None
            self._last_activity = time.monotonic()
            text = message.get("text")
            if text is None:
                data = message.get("bytes") or b""
                text = data.decode("utf-8", errors="replace")
            return str(text)

    async def _handle(self, text: str) -> None:
        try:
            tasks: Any = json.loads(text)
        except ValueError:
            error = RequestError("Frame is not valid JSON.", code="invalidJSON")
            await self.reply({"errors": [error.to_item()]})
            return
        if isinstance(tasks, dict):
            tasks = [tasks]
        if not isinstance(tasks, list) or not tasks:
            error = RequestError("A frame must be a non-empty JSON array of tasks.")
            await self.reply({"errors": [error.to_item()]})
            return
        for raw in tasks:
            await self._handle_task(raw)

    async def _handle_task(self, raw: Any) -> None:
        task_type, task_uuid = task_context(raw)
        if task_type == "authentication":
            await self._authenticate(raw)
            return
        if task_type == "ping":
            await self.reply({"data": [{"taskType": "ping", "pong": True}]})
            return
        session = self._session
        if session is None:
            error = AuthError(
                "Authenticate first: send an authentication task with your apiKey.",
                code="missingApiKey",
                parameter="apiKey",
            ).for_task(task_type, task_uuid)
            await self.reply({"errors": [error.to_item()]})
            return
        session.spawn(self._run(session, raw))

    async def _authenticate(self, raw: Any) -> None:
        try:
            auth = parse_task(raw)
            assert isinstance(auth, AuthenticationIn)
            self._dispatcher.auth.check(auth.apiKey)
        except ImpastoError as exc:
            # compat: no taskUUID on authentication replies (@runware/sdk-js matches them on
            # taskType, and fails fast only on code invalidApiKey).
            exc.task_type, exc.task_uuid = "authentication", None
            await self.reply({"errors": [exc.to_item()]})
            return
        if self._session is not None:
            self._session.detach(self._sender)
        session = self._sessions.open(auth.connectionSessionUUID, auth.apiKey)
        self._session = session
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

    async def _run(self, session: Session, raw: Any) -> None:
        async for envelope in self._dispatcher.stream_task(raw):
            for frame in frames_of(envelope):
                await session.deliver(frame)


@router.websocket("/v1")
async def websocket_tasks(websocket: WebSocket) -> None:
    runtime: Runtime = websocket.app.state.runtime
    await websocket.accept()
    connection = WebSocketConnection(
        websocket,
        runtime.dispatcher,
        runtime.sessions,
        runtime.settings.ws_idle_timeout_s,
    )
    await connection.serve()
