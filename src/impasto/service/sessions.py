"""WebSocket sessions: what a connection delivers, and what waits for a client that dropped.

A session outlives its socket. Frames for a detached session are buffered for `ttl_s` seconds
and flushed, in order, when the client re-authenticates with its connectionSessionUUID; the
tasks a session started keep running meanwhile (their results are in the StateStore anyway).
A session can only be resumed with the API key that opened it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger("impasto.sessions")

Frame = dict[str, Any]
Sender = Callable[[Frame], Awaitable[None]]


class Session:
    """One client's session: an attached sender, or a buffer while it has none."""

    def __init__(self, session_uuid: str, owner: str, max_buffered: int) -> None:
        self.session_uuid = session_uuid
        self.owner = owner
        self._sender: Sender | None = None
        self._buffer: deque[Frame] = deque(maxlen=max_buffered)
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.detached_at: float | None = time.monotonic()

    @property
    def attached(self) -> bool:
        return self._sender is not None

    async def attach(self, sender: Sender) -> None:
        """Deliver to `sender` from now on, starting with what was buffered."""
        async with self._lock:
            self._sender = sender
            self.detached_at = None
            while self._buffer and self._sender is not None:
                frame = self._buffer[0]
                if not await self._send(frame):
                    return
                self._buffer.popleft()

    def detach(self, sender: Sender) -> None:
        """The socket behind `sender` is gone; buffer from now on (unless another took over)."""
        if self._sender is sender:
            self._sender = None
            self.detached_at = time.monotonic()

    async def deliver(self, frame: Frame) -> None:
        """Send now if attached, else keep it for when the client comes back."""
        async with self._lock:
            if self._sender is None or not await self._send(frame):
                if len(self._buffer) == self._buffer.maxlen:
                    log.warning("session %s buffer full; dropping oldest frame", self.session_uuid)
                self._buffer.append(frame)

    async def _send(self, frame: Frame) -> bool:
        sender = self._sender
        if sender is None:
            return False
        try:
            await sender(frame)
        except Exception:
            # The socket went away mid-send: keep the frame, wait for a resume.
            self.detach(sender)
            return False
        return True

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a task of this session; it keeps running while the client is away."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._buffer.clear()

    @property
    def buffered(self) -> int:
        return len(self._buffer)


class SessionRegistry:
    """All sessions of this process; detached ones expire after `ttl_s`."""

    def __init__(self, ttl_s: float = 120.0, max_buffered: int = 1000) -> None:
        self._ttl_s = ttl_s
        self._max_buffered = max_buffered
        self._sessions: dict[str, Session] = {}

    def open(self, resume: str | None, api_key: str) -> Session:
        """The session to resume if it is still known and was opened with `api_key`, else a
        new one. Only a digest of the key is kept."""
        owner = hashlib.sha256(api_key.encode()).hexdigest()
        if resume is not None:
            session = self._sessions.get(resume)
            if (
                session is not None
                and hmac.compare_digest(session.owner, owner)
                and not self._expired(session, time.monotonic())
            ):
                return session
        session = Session(str(uuid.uuid4()), owner, self._max_buffered)
        self._sessions[session.session_uuid] = session
        return session

    def get(self, session_uuid: str) -> Session | None:
        return self._sessions.get(session_uuid)

    def _expired(self, session: Session, now: float) -> bool:
        return session.detached_at is not None and now - session.detached_at > self._ttl_s

    def reap(self) -> int:
        """Forget sessions detached for longer than the TTL, with what they buffered."""
        now = time.monotonic()
        expired = [s for s in self._sessions.values() if self._expired(s, now)]
        for session in expired:
            session.close()
            del self._sessions[session.session_uuid]
        return len(expired)

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
