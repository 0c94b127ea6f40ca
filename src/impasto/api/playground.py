"""The web playground: `GET /` and its static files, plain HTML/CSS/JS from package data.

The page is a client of the server's own WebSocket API (`/v1`), like any SDK; nothing here
knows about tasks.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, Response

router = APIRouter(include_in_schema=False)

# No inline script or style anywhere on the page, so none is allowed. Images may come from
# any http(s) origin (a public URL or an S3 store serves them), and the socket from this host.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob: http: https:; "
    "connect-src 'self' ws: wss: http: https:; style-src 'self'; script-src 'self'"
)

# The only files served: a name is looked up here, never joined onto a path.
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}

PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    # The page can spend money (provider models): it must not be framed by another site.
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Small files that change with the package: revalidate rather than serve a stale page.
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return files("impasto.api").joinpath("static", name).read_bytes()


@router.get("/")
async def playground_page() -> HTMLResponse:
    return HTMLResponse(_read("index.html"), headers=PAGE_HEADERS)


@router.get("/static/{name}")
async def playground_file(name: str) -> Response:
    content_type = STATIC_FILES.get(name)
    if content_type is None:
        raise HTTPException(status_code=404, detail="Not found.")
    return Response(_read(name), media_type=content_type, headers=PAGE_HEADERS)
