"""The one place where errors become HTTP responses (always the Runware error envelope)."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from impasto.protocol.errors import (
    ImpastoError,
    RateLimited,
    ServiceUnavailable,
    http_status_for,
)

log = logging.getLogger("impasto.api")


class EnvelopeResponse(JSONResponse):
    """A Runware envelope as ASCII JSON. Clients may send strings with lone surrogates (valid
    JSON, not valid Unicode) that come back in error items; escaped, they cannot break the
    reply the way Starlette's UTF-8 rendering does."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(errors: list[ImpastoError]) -> JSONResponse:
    status = http_status_for(errors)
    return EnvelopeResponse(
        {"errors": [e.to_item() for e in errors]},
        status_code=status,
        headers=retry_after(errors, status),
    )


def retry_after(errors: list[ImpastoError], status: int) -> dict[str, str] | None:
    """A 503 for infrastructure trouble and a 429 for a rate limit tell clients when to come
    back (the longest wait any of the errors asks for)."""
    if status not in (429, 503):
        return None
    hints = [e.retry_after_s for e in errors if isinstance(e, ServiceUnavailable | RateLimited)]
    return {"Retry-After": str(max(hints))} if hints else None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ImpastoError)
    async def impasto_error(request: Request, exc: ImpastoError) -> JSONResponse:
        return error_response([exc])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "notFound", 405: "methodNotAllowed"}.get(exc.status_code, "httpError")
        error = ImpastoError(str(exc.detail), code=code)
        error.http_status = exc.status_code
        return error_response([error])

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response([ImpastoError("Internal server error.", code="internalServerError")])
