"""REST transport: `POST /v1` with a JSON array of tasks, image files, health."""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from impasto.api.errors import EnvelopeResponse, error_response
from impasto.protocol.errors import ImpastoError, PayloadTooLarge, RequestError
from impasto.service.runtime import Runtime

router = APIRouter()

_TASKS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "array", "items": {"type": "object"}},
                "example": [
                    {
                        "taskType": "imageInference",
                        "taskUUID": "f47ac10b-58cc-4372-a567-0e02b2c3d493",
                        "model": "impasto:tiny@1",
                        "positivePrompt": "a lighthouse at dusk",
                        "width": 512,
                        "height": 512,
                    }
                ],
            }
        },
    }
}


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def read_task_array(request: Request, limit: int) -> list[Any]:
    """The body as a JSON array, read with a size limit whatever Content-Length claims."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # json raises RecursionError on deeply nested arrays: bad input, not a server fault.
        raise RequestError("Request body is not valid JSON.", code="invalidJSON") from None
    if not isinstance(parsed, list):
        raise RequestError("Request body must be a JSON array of tasks.")
    if not parsed:
        raise RequestError("Request array is empty; send at least one task.")
    return parsed


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


@router.post("/v1", openapi_extra=_TASKS_BODY, summary="Run Runware tasks")
async def run_tasks(request: Request) -> Response:
    runtime = runtime_of(request)
    try:
        tasks = await read_task_array(request, runtime.settings.max_body_bytes)
    except ImpastoError as exc:
        return error_response([exc])
    envelope = await runtime.dispatcher.handle_request(tasks, bearer_token(request))
    return EnvelopeResponse(envelope.body(), status_code=envelope.http_status)


@router.api_route(
    "/image/{name}", methods=["GET", "HEAD"], summary="An image we store (output or upload)"
)
async def get_image(name: str, request: Request) -> Response:
    runtime = runtime_of(request)
    image_uuid, _, _ = name.partition(".")
    record = await runtime.state.get_image(image_uuid)
    now = time.time()
    data = None
    if record is not None and record.key == name and record.expires_at > now:
        data = await runtime.images.get(record.key)
    if record is None or data is None:
        error = ImpastoError("Image not found (unknown or expired).", code="imageNotFound")
        error.http_status = 404
        return error_response([error])
    max_age = max(0, int(record.expires_at - now))
    return Response(
        data,
        media_type=record.content_type,
        headers={"Cache-Control": f"private, max-age={max_age}"},
    )


@router.get("/healthz", summary="200 once the server accepts tasks")
async def healthz(request: Request) -> dict[str, Any]:
    runtime = runtime_of(request)
    return {
        "status": "ok",
        "uptime_s": round(time.time() - runtime.started_at, 3),
        "queued_jobs": runtime.scheduler.queued(),
    }


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    return Response(
        runtime_of(request).metrics.render(),
        media_type="text/plain; version=0.0.4; charset=utf-8",
    )
