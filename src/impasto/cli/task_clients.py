"""Where `impasto generate` sends its tasks: this process's own runtime on the embedded
defaults (no server), or a running server's `POST /v1`. Both answer with the Runware envelope
(`{"data": [...], "errors": [...]}`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

import httpx

from impasto.settings import Settings
from impasto.tenancy.keys import LOCAL


class ClientError(Exception):
    """The tasks could not be sent at all (no server, not JSON): one line for the user."""


class TaskClient(Protocol):
    async def send(self, tasks: list[dict[str, Any]]) -> dict[str, Any]: ...


class InProcessClient:
    """The dispatcher of a Runtime started in this process: the same handlers a server runs."""

    def __init__(self, dispatcher: Any) -> None:
        self._dispatcher = dispatcher

    async def send(self, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        # Whoever can start the server's own handlers on this machine is its operator.
        envelope = await self._dispatcher.handle_request(tasks, None, principal=LOCAL)
        body: dict[str, Any] = envelope.body()
        return body


class HttpClient:
    """A server's REST endpoint."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self._client = client
        self._url = url

    async def send(self, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        try:
            response = await self._client.post(self._url, json=tasks)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach {self._url}: {exc}") from None
        try:
            body = response.json()
        except ValueError:
            raise ClientError(
                f"{self._url} answered HTTP {response.status_code} without JSON"
            ) from None
        if not isinstance(body, dict):
            raise ClientError(f"{self._url} answered with something other than an envelope")
        return body


def endpoint(url: str) -> str:
    """`http://host:8080`, `http://host:8080/` and `http://host:8080/v1` all mean the latter."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


@asynccontextmanager
async def in_process(settings: Settings) -> AsyncIterator[TaskClient]:
    from impasto.service.runtime import Runtime

    async with Runtime.start(settings) as runtime:
        yield InProcessClient(runtime.dispatcher)


@asynccontextmanager
async def remote(url: str, api_key: str | None, timeout_s: float) -> AsyncIterator[TaskClient]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=timeout_s, headers=headers) as client:
        yield HttpClient(client, endpoint(url))
