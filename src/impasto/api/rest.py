"""REST transport: `POST /v1` with a JSON array of tasks, image files, health."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from impasto.api.errors import EnvelopeResponse, error_response, retry_after
from impasto.protocol.errors import ImpastoError, PayloadTooLarge, RequestError
from impasto.protocol.openapi import tasks_request_schema, tasks_responses
from impasto.service.images import image_owned
from impasto.service.runtime import Runtime

router = APIRouter()

_INLINE_PARSE_BYTES = 256 * 1024

TASKS_REQUEST_SCHEMA, TASK_COMPONENTS = tasks_request_schema()

_TASKS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": TASKS_REQUEST_SCHEMA,
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
    },
    "responses": tasks_responses(),
}


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read with a size limit whatever Content-Length claims."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")
    return bytes(body)


async def read_task_array(request: Request, limit: int) -> list[Any]:
    """The body as a JSON array, read with a size limit whatever Content-Length claims."""
    body = await read_body(request, limit)
    # A large body is parsed off the event loop, which keeps serving everyone else meanwhile.
    parsed = (
        await asyncio.to_thread(parse_json, bytes(body))
        if len(body) > _INLINE_PARSE_BYTES
        else parse_json(bytes(body))
    )
    if not isinstance(parsed, list):
        raise RequestError("Request body must be a JSON array of tasks.")
    if not parsed:
        raise RequestError("Request array is empty; send at least one task.")
    return parsed


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # json raises RecursionError on deeply nested arrays: bad input, not a server fault.
        raise RequestError("Request body is not valid JSON.", code="invalidJSON") from None


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def client_address(request: Request) -> str | None:
    """The peer's address, which failed authentications are counted against. Behind a
    reverse proxy, run uvicorn with --forwarded-allow-ips so this is the client's, not the
    proxy's."""
    return request.client.host if request.client is not None else None


@router.post(
    "/v1",
    openapi_extra=_TASKS_BODY,
    summary="Run Runware tasks",
    response_class=EnvelopeResponse,
)
async def run_tasks(request: Request) -> Response:
    runtime = runtime_of(request)
    dispatcher = runtime.dispatcher
    bearer = bearer_token(request)
    client = client_address(request)
    limit = runtime.settings.max_body_bytes
    principal = None
    if not dispatcher.auth.open:
        # The key is checked before the body is read: an unauthenticated client cannot make
        # the server read and parse megabytes. A body that authenticates itself (a leading
        # authentication task) is read only up to a small limit before its key is known.
        if bearer is not None:
            try:
                principal = await dispatcher.auth.authenticate(bearer, client)
            except ImpastoError as exc:
                return error_response([exc])
        else:
            limit = min(limit, runtime.settings.max_unauthenticated_body_bytes)
    try:
        tasks = await read_task_array(request, limit)
    except ClientDisconnect:
        # Nobody is left to answer; nothing was accepted.
        return Response(status_code=400)
    except ImpastoError as exc:
        return error_response([exc])
    envelope = await dispatcher.handle_request(tasks, bearer, client, principal)
    status = envelope.http_status
    return EnvelopeResponse(
        envelope.body(), status_code=status, headers=retry_after(envelope.errors, status)
    )


@router.get("/image/{name}", summary="An image we store", operation_id="get_image")
@router.head("/image/{name}", summary="An image's headers", operation_id="head_image")
async def get_image(name: str, request: Request) -> Response:
    runtime = runtime_of(request)
    image_uuid, _, _ = name.partition(".")
    record = await runtime.state.get_image(image_uuid)
    now = time.time()
    data = None
    if runtime.settings.private_images and not runtime.dispatcher.auth.open:
        # The URL alone is not enough: the key that made the image must come with it.
        try:
            principal = await runtime.dispatcher.auth.authenticate(
                bearer_token(request), client_address(request)
            )
        except ImpastoError as exc:
            return error_response([exc])
        if record is not None and not await image_owned(runtime.state, record, principal.owner):
            record = None
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


@router.get(
    "/healthz", summary="Liveness: 200 while the process works, 503 when a restart would help"
)
async def healthz(request: Request) -> Response:
    runtime = runtime_of(request)
    return probe_response(runtime, {"loops": runtime.liveness_problems()})


@router.get("/readyz", summary="Readiness: 200 while the server can accept and finish tasks")
async def readyz(request: Request) -> Response:
    runtime = runtime_of(request)
    return probe_response(runtime, await runtime.readiness())


def probe_response(runtime: Runtime, checks: dict[str, list[str]]) -> Response:
    """`{"status", "checks": {name: "ok" | [problems]}, "problems"}`: 503 when any fails."""
    problems = [line for lines in checks.values() for line in lines]
    body: dict[str, Any] = {
        "status": "unavailable" if problems else "ok",
        "role": runtime.role,
        "uptime_s": round(time.time() - runtime.started_at, 3),
        "queued_jobs": runtime.scheduler.queued(),
        "checks": {name: lines or "ok" for name, lines in checks.items()},
    }
    if runtime.worker is not None:
        body.update(runtime.worker.stats())
    if problems:
        body["problems"] = problems
    return EnvelopeResponse(body, status_code=503 if problems else 200)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    return Response(
        runtime_of(request).metrics.render(),
        media_type="text/plain; version=0.0.4; charset=utf-8",
    )
