"""The FastAPI application factory; its lifespan owns the Runtime."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from impasto.api.errors import install_error_handlers
from impasto.api.rest import TASK_COMPONENTS
from impasto.api.rest import router as rest_router
from impasto.api.websocket import router as websocket_router
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

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                message = {**message, "headers": headers}
            await send(message)

        await self._app(scope, receive, send_with_header)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with Runtime.start(settings) as runtime:
            app.state.runtime = runtime
            if runtime.dispatcher.auth.open:
                log.warning(
                    "no API keys configured: the server is OPEN to anyone who can reach "
                    "%s:%s (set IMPASTO_API_KEYS to require keys)",
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

    app = FastAPI(
        title="impasto",
        version="0.1.0",
        summary="Self-hosted image inference that speaks the Runware task API",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(NoSniff)
    app.include_router(rest_router)
    app.include_router(websocket_router)

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
