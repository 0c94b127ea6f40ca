"""White-box looks at a running test server (RunningServer from conftest), and a bounded wait."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tests.conftest import RunningServer


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Poll `predicate` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.01)


def session_attached(server: RunningServer, session_uuid: str) -> bool:
    """Whether the server has a socket attached to this WebSocket session."""

    async def check() -> bool:
        session = server.runtime().sessions.get(session_uuid)
        return session is not None and session.attached

    return bool(server.call(check()))


def session_buffered(server: RunningServer, session_uuid: str) -> int:
    """How many frames the server keeps for this (detached) session."""

    async def count() -> int:
        session = server.runtime().sessions.get(session_uuid)
        return 0 if session is None else session.buffered

    return int(server.call(count()))


def wait_detached(server: RunningServer, session_uuid: str) -> None:
    """Wait until the server has noticed that the session's socket is gone."""
    wait_until(lambda: not session_attached(server, session_uuid), what="the session to detach")


def task_status(server: RunningServer, task_uuid: str) -> str | None:
    """processing / success / error, or None for an unknown task."""

    async def status() -> str | None:
        record = await server.runtime().state.get_task(task_uuid)
        return None if record is None else str(record.status)

    result: str | None = server.call(status())
    return result


def wait_finished(server: RunningServer, task_uuid: str) -> None:
    wait_until(
        lambda: task_status(server, task_uuid) in ("success", "error"), what="the task to finish"
    )


@contextmanager
def recorded_errors(server: RunningServer) -> Iterator[list[dict[str, Any]]]:
    """The error items the server's dispatcher answers with (REST or WebSocket) meanwhile."""
    dispatcher = server.runtime().dispatcher
    stream_task = dispatcher.stream_task
    errors: list[dict[str, Any]] = []

    async def recording(raw: Any, *args: Any) -> AsyncIterator[Any]:
        async for envelope in stream_task(raw, *args):
            errors.extend(error.to_item() for error in envelope.errors)
            yield envelope

    dispatcher.stream_task = recording
    try:
        yield errors
    finally:
        del dispatcher.stream_task
