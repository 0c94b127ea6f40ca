"""The small HTTP face of `impasto worker`: liveness and metrics for orchestrators."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from impasto.service.runtime import Runtime


def create_worker_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(title="impasto worker", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> Response:
        worker = runtime.worker
        problems = await runtime.problems()
        body: dict[str, Any] = {
            "status": "unavailable" if problems else "ok",
            **(worker.stats() if worker else {}),
        }
        if problems:
            body["problems"] = problems
        return JSONResponse(body, status_code=503 if problems else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(
            runtime.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    return app
