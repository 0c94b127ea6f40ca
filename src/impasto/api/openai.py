"""OpenAI's Images API beside the Runware API: `POST /v1/images/generations`,
`POST /v1/images/edits` (multipart), `GET /v1/models` and `GET /v1/models/{id}`.

A transport only: the request becomes a sync imageInference task (protocol.openai_images)
run by the same dispatcher as Runware tasks, with the same API keys (a Bearer header), quotas,
validation, models, storage and safety. Errors come in OpenAI's envelope with its statuses.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from impasto.api.rest import bearer_token, client_address, read_body, runtime_of
from impasto.protocol.errors import (
    ImpastoError,
    QueueFull,
    RateLimited,
    RequestError,
    ServiceUnavailable,
)
from impasto.protocol.openai_images import (
    ImagesRequest,
    edit_task,
    images_request,
    images_response,
    openai_error,
)
from impasto.service.runtime import Runtime
from impasto.tenancy.keys import Principal

log = logging.getLogger("impasto.openai")

router = APIRouter(tags=["OpenAI Images API"])

MAX_FORM_FILES = 16

_FIELDS: dict[str, Any] = {
    "prompt": {"type": "string", "minLength": 1},
    "model": {"type": "string", "description": "an AIR such as impasto:tiny@1, or an alias"},
    "n": {"type": "integer", "minimum": 1, "maximum": 10, "default": 1},
    "size": {"type": "string", "pattern": "^(auto|[0-9]+x[0-9]+)$", "example": "512x512"},
    "response_format": {"enum": ["url", "b64_json"], "default": "url"},
    "output_format": {"enum": ["png", "jpeg", "webp"], "default": "png"},
    "output_compression": {"type": "integer", "minimum": 0, "maximum": 100},
    "quality": {"type": "string"},
    "background": {"enum": ["auto", "opaque", "transparent"]},
    "style": {"type": "string"},
    "moderation": {"type": "string"},
    "user": {"type": "string"},
    "negative_prompt": {"type": "string"},
    "seed": {"type": "integer", "minimum": 0, "maximum": 9223372036854775807},
    "num_inference_steps": {"type": "integer", "minimum": 1, "maximum": 1000},
    "guidance_scale": {"type": "number", "minimum": 0, "maximum": 100},
}
_ERROR = {
    "description": "OpenAI's error envelope",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {
                            "message": {"type": "string"},
                            "type": {"type": "string"},
                            "param": {"type": ["string", "null"]},
                            "code": {"type": ["string", "null"]},
                        },
                    }
                },
            }
        }
    },
}
_RESPONSES = {str(status): _ERROR for status in (400, 401, 403, 404, 413, 429, 500, 503)}
_GENERATIONS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object", "required": ["prompt"], "properties": _FIELDS}
            }
        },
    },
    "responses": _RESPONSES,
}
_FILE = {"type": "string", "format": "binary"}
_EDITS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "prompt"],
                    "properties": {**_FIELDS, "image": _FILE, "mask": _FILE},
                }
            }
        },
    },
    "responses": _RESPONSES,
}


def error_response(error: ImpastoError) -> JSONResponse:
    """OpenAI's error reply. compat: the openai SDKs retry 408, 409, 429 and every 5xx unless
    told `x-should-retry: false`. Only a refusal of a task that was never accepted (a rate
    limit, a full queue, a state store away) may be sent again as it is; a failed or timed-out
    generation would run again with each retry, and a bad request stays bad."""
    status, body = openai_error(error)
    retry = isinstance(error, RateLimited | QueueFull | ServiceUnavailable)
    headers = {"x-should-retry": "true" if retry else "false"}
    if isinstance(error, RateLimited | ServiceUnavailable):
        headers["Retry-After"] = str(error.retry_after_s)
    return JSONResponse(body, status_code=status, headers=headers)


async def authenticate(request: Request, runtime: Runtime) -> Principal:
    return await runtime.dispatcher.auth.authenticate(
        bearer_token(request), client_address(request)
    )


def default_model(runtime: Runtime) -> str:
    """What a request without `model` runs: IMPASTO_OPENAI_DEFAULT_MODEL, else the first
    preloaded model, else the first model of the registry (not an asset such as a LoRA)."""
    settings = runtime.settings
    if settings.openai_default_model:
        return settings.openai_default_model
    if settings.preload:
        return settings.preload[0]
    for entry in runtime.registry.entries():
        if not entry.is_asset:
            return entry.air
    return ""


async def run(runtime: Runtime, principal: Principal, images: ImagesRequest) -> Response:
    envelope = await runtime.dispatcher.handle_task(images.task, principal)
    if envelope.errors:
        # OpenAI's API answers a request whole: one failed image fails it.
        return error_response(envelope.errors[0])
    if images.notes:
        log.info("images request %s: %s", images.task["taskUUID"], "; ".join(images.notes))
    return JSONResponse(images_response(images, envelope.data))


@router.post(
    "/v1/images/generations",
    summary="Create images (OpenAI Images API)",
    openapi_extra=_GENERATIONS_BODY,
)
async def generations(request: Request) -> Response:
    runtime = runtime_of(request)
    try:
        principal = await authenticate(request, runtime)
        body = await read_body(request, runtime.settings.max_body_bytes)
        try:
            fields = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise RequestError("Request body is not valid JSON.", code="invalid_json") from None
        if not isinstance(fields, dict):
            raise RequestError("Request body must be a JSON object.", code="invalid_json")
        images = images_request(fields, default_model=default_model(runtime))
    except ClientDisconnect:
        return Response(status_code=400)
    except ImpastoError as exc:
        return error_response(exc)
    return await run(runtime, principal, images)


@router.post(
    "/v1/images/edits",
    summary="Edit an image (OpenAI Images API, multipart)",
    openapi_extra=_EDITS_BODY,
)
async def edits(request: Request) -> Response:
    runtime = runtime_of(request)
    try:
        principal = await authenticate(request, runtime)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise RequestError(
                "Request body must be multipart/form-data with an image file.",
                code="invalid_request",
            )
        # Read with the body limit first; the form is parsed from what was read.
        request._body = await read_body(request, runtime.settings.max_body_bytes)
        try:
            form = await request.form(
                max_files=MAX_FORM_FILES, max_fields=100, max_part_size=1024 * 1024
            )
        except Exception:
            raise RequestError(
                "Request body must be multipart/form-data with an image file.",
                code="invalid_request",
            ) from None
        fields: dict[str, Any] = {}
        files: list[bytes] = []
        mask = None
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read()
                if name == "mask":
                    mask = data
                elif name in ("image", "image[]"):
                    files.append(data)
                else:
                    fields[name] = "file"
            elif name not in ("image", "image[]", "mask"):
                fields[name] = value
        images = images_request(fields, default_model=default_model(runtime))
        resolved = runtime.registry.resolve(images.task["model"])
        edit_task(images, files, mask, inpainting=resolved.rules.accepts("maskImage"))
    except ClientDisconnect:
        return Response(status_code=400)
    except ImpastoError as exc:
        return error_response(exc)
    return await run(runtime, principal, images)


def model_item(air: str, created: int) -> dict[str, Any]:
    return {"id": air, "object": "model", "created": created, "owned_by": "impasto"}


@router.get("/v1/models", summary="The models (OpenAI's model list)")
async def list_models(request: Request) -> Response:
    runtime = runtime_of(request)
    try:
        await authenticate(request, runtime)
    except ImpastoError as exc:
        return error_response(exc)
    created = int(runtime.started_at)
    # The models a client can run: not assets (LoRAs, VAEs, ...), not a provider's models
    # without the provider's key.
    acceptance = runtime.inference.acceptance
    data = [
        model_item(e.air, created)
        for e in runtime.registry.entries()
        if not e.is_asset and acceptance.available(e.air)
    ]
    return JSONResponse({"object": "list", "data": data})


@router.get("/v1/models/{model_id:path}", summary="One model (OpenAI's model object)")
async def get_model(model_id: str, request: Request) -> Response:
    runtime = runtime_of(request)
    try:
        await authenticate(request, runtime)
        resolved = runtime.registry.resolve(model_id)
    except ImpastoError as exc:
        return error_response(exc)
    return JSONResponse(model_item(resolved.requested.air, int(runtime.started_at)))
