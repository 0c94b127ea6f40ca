"""WebSocket sessions: what a connection delivers, and what waits for a client that dropped.

A session outlives its socket. Frames for a detached session are buffered for `ttl_s` seconds
and flushed, in order, when the client re-authenticates with its connectionSessionUUID; the
tasks a session started keep running meanwhile (their results are in the StateStore anyway).
A session can only be resumed with the API key that opened it.

Everything a client can make the server hold here is bounded: sessions in all
(`max_sessions`), and per session the frames kept while it is detached, by count
(`max_buffered`) and by bytes (`max_buffered_bytes`); beyond those the oldest frames go.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from impasto.protocol.errors import ServiceUnavailable

log = logging.getLogger("impasto.sessions")

Frame = dict[str, Any]
# A sender takes a frame's JSON text: a frame is encoded once, whether it is sent or kept.
Sender = Callable[[str], Awaitable[None]]
Clock = Callable[[], float]

DEFAULT_MAX_BUFFERED = 1000
DEFAULT_MAX_BUFFERED_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_SESSIONS = 10_000


def encode_frame(frame: Frame) -> str:
    """The wire text of a frame. ASCII only, so its length is its size in bytes."""
    return json.dumps(frame, ensure_ascii=True, separators=(",", ":"))


class Session:
    """One client's session: an attached sender, or a buffer while it has none."""

    def __init__(
        self,
        session_uuid: str,
        owner: str,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
        clock: Clock = time.monotonic,
    ) -> None:
        self.session_uuid = session_uuid
        self.owner = owner
        self._max_buffered = max_buffered
        self._max_buffered_bytes = max_buffered_bytes
        self._clock = clock
        self._sender: Sender | None = None
        self._buffer: deque[str] = deque()
        self._buffered_bytes = 0
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned = False
        self._revoke_callbacks: list[Callable[[], None]] = []
        self.dropped = 0
        self.detached_at: float | None = clock()

    def on_revoke(self, callback: Callable[[], None]) -> None:
        """Called (by the connection that holds this session) when its key is revoked."""
        if callback not in self._revoke_callbacks:
            self._revoke_callbacks.append(callback)

    def forget_revoke(self, callback: Callable[[], None]) -> None:
        if callback in self._revoke_callbacks:
            self._revoke_callbacks.remove(callback)

    def revoke(self) -> None:
        """Its key was revoked: tell its connection (which closes the socket) and keep
        nothing for a client that can no longer authenticate."""
        callbacks, self._revoke_callbacks = self._revoke_callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("closing a revoked session's socket failed")
        self._sender = None
        self.close()

    @property
    def attached(self) -> bool:
        return self._sender is not None

    @property
    def idle(self) -> bool:
        """Nothing running and nothing kept: forgetting this session loses nothing."""
        return not self._tasks and not self._buffer

    async def attach(self, sender: Sender) -> None:
        """Deliver to `sender` from now on, starting with what was buffered."""
        async with self._lock:
            self._sender = sender
            self.detached_at = None
            self._warned = False
            while self._buffer and self._sender is not None:
                if not await self._send(self._buffer[0]):
                    return
                self._buffered_bytes -= len(self._buffer.popleft())

    def detach(self, sender: Sender) -> None:
        """The socket behind `sender` is gone; buffer from now on (unless another took over)."""
        if self._sender is sender:
            self._sender = None
            self.detached_at = self._clock()

    async def deliver(self, frame: Frame) -> None:
        """Send now if attached, else keep it for when the client comes back."""
        text = encode_frame(frame)
        async with self._lock:
            if self._sender is None or not await self._send(text):
                self._keep(text)

    def _keep(self, text: str) -> None:
        self._buffer.append(text)
        self._buffered_bytes += len(text)
        dropped = 0
        while self._buffer and (
            len(self._buffer) > self._max_buffered
            or self._buffered_bytes > self._max_buffered_bytes
        ):
            self._buffered_bytes -= len(self._buffer.popleft())
            dropped += 1
        if dropped:
            self.dropped += dropped
            # Once per detached spell: a client that stays away would otherwise earn a log
            # line per result.
            if not self._warned:
                self._warned = True
                log.warning(
                    "session %s buffer full (%d frames, %d bytes at most); dropping oldest frames",
                    self.session_uuid,
                    self._max_buffered,
                    self._max_buffered_bytes,
                )

    async def _send(self, text: str) -> bool:
        sender = self._sender
        if sender is None:
            return False
        try:
            await sender(text)
        except Exception:
            # The socket went away mid-send, or its client reads too slowly: keep the frame,
            # wait for a resume.
            self.detach(sender)
            return False
        return True

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a task of this session; it keeps running while the client is away."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._settle)

    def _settle(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # The dispatcher answers every task's failure with an error item: this is a bug
            # of ours, and asyncio would only report it when the task is collected.
            log.error("task of session %s failed", self.session_uuid, exc_info=exc)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._buffer.clear()
        self._buffered_bytes = 0

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def buffered_bytes(self) -> int:
        return self._buffered_bytes


class SessionRegistry:
    """All sessions of this process, at most `max_sessions`; detached ones expire after
    `ttl_s`."""

    def __init__(
        self,
        ttl_s: float = 120.0,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        *,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        clock: Clock = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._max_buffered = max_buffered
        self._max_buffered_bytes = max_buffered_bytes
        self._max_sessions = max_sessions
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def open(self, resume: str | None, api_key: str) -> Session:
        """The session to resume if it is still known and was opened with `api_key`, else a
        new one. Only a digest of the key is kept. Raises ServiceUnavailable
        (tooManySessions) when a new one would be one too many."""
        owner = hashlib.sha256(api_key.encode()).hexdigest()
        if resume is not None:
            session = self._sessions.get(resume)
            if (
                session is not None
                and hmac.compare_digest(session.owner, owner)
                and not self._expired(session, self._clock())
            ):
                return session
        if len(self._sessions) >= self._max_sessions:
            self.reap()
        if len(self._sessions) >= self._max_sessions:
            raise ServiceUnavailable(
                "The server holds as many WebSocket sessions as it may; try again later.",
                code="tooManySessions",
                task_type="authentication",
            )
        session = Session(
            str(uuid.uuid4()),
            owner,
            self._max_buffered,
            self._max_buffered_bytes,
            self._clock,
        )
        self._sessions[session.session_uuid] = session
        return session

    def release(self, session: Session) -> bool:
        """Its connection moved on to another session: forget this one if that loses nothing
        (no socket, no running task, nothing buffered). Whether it was forgotten."""
        if session.attached or not session.idle:
            return False
        if self._sessions.get(session.session_uuid) is not session:
            return False
        session.close()
        del self._sessions[session.session_uuid]
        return True

    def get(self, session_uuid: str) -> Session | None:
        return self._sessions.get(session_uuid)

    def _expired(self, session: Session, now: float) -> bool:
        return session.detached_at is not None and now - session.detached_at > self._ttl_s

    def reap(self) -> int:
        """Forget sessions detached for longer than the TTL, with what they buffered."""
        now = self._clock()
        expired = [s for s in self._sessions.values() if self._expired(s, now)]
        for session in expired:
            session.close()
            del self._sessions[session.session_uuid]
        return len(expired)

    def revoke(self, owner: str) -> int:
        """Close and forget every session opened with the key whose digest is `owner` (its
        sockets close); how many there were."""
        revoked = [s for s in self._sessions.values() if hmac.compare_digest(s.owner, owner)]
        for session in revoked:
            session.revoke()
            del self._sessions[session.session_uuid]
        if revoked:
            log.info("closed %d WebSocket session(s) of a revoked API key", len(revoked))
        return len(revoked)

    def __len__(self) -> int:
        return len(self._sessions)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self._ttl_s / 4))
            with contextlib.suppress(Exception):
                self.reap()

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()
