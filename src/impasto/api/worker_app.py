"""The small HTTP face of `impasto worker`: liveness and metrics for orchestrators."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response

from impasto.service.runtime import Runtime


def create_worker_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(title="impasto worker", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        worker = runtime.worker
        return {"status": "ok", **(worker.stats() if worker else {})}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(
            runtime.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    return app
