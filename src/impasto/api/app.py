"""The FastAPI application factory; its lifespan owns the Runtime."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from impasto.api.errors import error_response, install_error_handlers
from impasto.api.openai import router as openai_router
from impasto.api.playground import router as playground_router
from impasto.api.rest import TASK_COMPONENTS, run_tasks
from impasto.api.rest import router as rest_router
from impasto.api.websocket import router as websocket_router
from impasto.protocol.errors import ImpastoError
from impasto.protocol.openapi import add_components
from impasto.service.runtime import Runtime
from impasto.settings import Settings

log = logging.getLogger("impasto")


class NoSniff:
    """`X-Content-Type-Options: nosniff` on every response: stored images are client bytes, and
    a browser must never sniff one into HTML or script."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        await self._app(scope, receive, _with_nosniff(send))


def _with_nosniff(send: Send) -> Send:
    async def send_with_header(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            headers.append((b"x-content-type-options", b"nosniff"))
            message = {**message, "headers": headers}
        await send(message)

    return send_with_header


class ImpastoApp(FastAPI):
    """FastAPI, with `POST /v1` (the task endpoint, i.e. nearly all traffic) handed straight to
    its handler: Starlette's middleware stack, routing and FastAPI's dependency solving cost
    about half a millisecond of CPU per request, which at a no-model benchmark is a tenth of
    the request. The route stays registered for /docs and /openapi.json; what the handler
    raises becomes the same Runware error envelope the exception handlers give."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] == "/v1"
            and not self.root_path
        ):
            scope["app"] = self
            await self._tasks(scope, receive, _with_nosniff(send))
            return
        await super().__call__(scope, receive, send)

    @staticmethod
    async def _tasks(scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response: Response
        try:
            response = await run_tasks(request)
        except ImpastoError as exc:
            response = error_response([exc])
        except Exception:
            log.exception("unhandled error on POST /v1")
            response = error_response(
                [ImpastoError("Internal server error.", code="internalServerError")]
            )
        await response(scope, receive, send)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with Runtime.start(settings) as runtime:
            app.state.runtime = runtime
            if runtime.dispatcher.auth.open:
                log.warning(
                    "no API keys configured: the server is OPEN to anyone who can reach "
                    "%s:%s (set IMPASTO_API_KEYS or run `impasto keys create` to require keys)",
                    settings.host,
                    settings.port,
                )
            log.info(
                "impasto ready on %s, data in %s, %d models",
                settings.image_base_url,
                settings.data_dir,
                len(runtime.registry.entries()),
            )
            yield

    app = ImpastoApp(
        title="impasto",
        version="0.1.0",
        summary="Self-hosted image inference that speaks the Runware task API",
        lifespan=lifespan,
        # FastAPI's own OpenTelemetry hooks check for a configured provider on every request;
        # impasto exports Prometheus metrics instead.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_error_handlers(app)
    app.add_middleware(NoSniff)
    app.include_router(rest_router)
    app.include_router(websocket_router)
    app.include_router(openai_router)
    app.include_router(playground_router)

    def openapi() -> dict[str, Any]:
        # openapi_extra cannot add components: the task schemas are merged in here.
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            app.openapi_schema = add_components(document, TASK_COMPONENTS)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
