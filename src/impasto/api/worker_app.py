"""The small HTTP face of `impasto worker`: liveness, readiness and metrics for orchestrators."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import Response

from impasto.api.rest import probe_response
from impasto.service.runtime import Runtime


def create_worker_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(title="impasto worker", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> Response:
        return probe_response(runtime, {"loops": runtime.liveness_problems()})

    @app.get("/readyz")
    async def readyz() -> Response:
        return probe_response(runtime, await runtime.readiness())

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(
            runtime.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    return app
