"""The FastAPI application factory; its lifespan owns the Runtime."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from impasto.api.errors import install_error_handlers
from impasto.api.rest import router as rest_router
from impasto.api.websocket import router as websocket_router
from impasto.service.runtime import Runtime
from impasto.settings import Settings

log = logging.getLogger("impasto")


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
    app.include_router(rest_router)
    app.include_router(websocket_router)
    return app
