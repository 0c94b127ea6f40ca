"""The playground's HTTP side: `GET /` and its static files, with their content types and the
page's Content-Security-Policy; nothing but those files is served."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer, make_settings, start_server

CSP = (
    "default-src 'self'; img-src 'self' data: blob: http: https:; "
    "connect-src 'self' ws: wss: http: https:; style-src 'self'; script-src 'self'"
)


@pytest.fixture(scope="module")
def playground_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[RunningServer]:
    """One server for the module: these tests only read."""
    settings = make_settings(
        tmp_path_factory.mktemp("playground-http") / "data", tiny_models_dir, safety_checker="none"
    )
    running = start_server(settings)
    yield running
    running.stop()


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/", "text/html; charset=utf-8"),
        ("/static/index.html", "text/html; charset=utf-8"),
        ("/static/playground.js", "text/javascript; charset=utf-8"),
        ("/static/playground.css", "text/css; charset=utf-8"),
    ],
)
def test_page_and_static_files_have_their_types_and_the_csp(
    playground_server: RunningServer, path: str, content_type: str
) -> None:
    reply = httpx.get(playground_server.base + path, timeout=10)
    assert reply.status_code == 200
    assert reply.headers["content-type"] == content_type
    assert reply.headers["content-security-policy"] == CSP
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.content


def test_page_loads_its_script_and_style_and_has_nothing_inline(
    playground_server: RunningServer,
) -> None:
    page = httpx.get(playground_server.base + "/", timeout=10).text
    assert '<script src="static/playground.js" defer></script>' in page
    assert '<link rel="stylesheet" href="static/playground.css">' in page
    # The CSP allows no inline script or style: the page must not need any.
    assert "<style" not in page
    assert " style=" not in page
    assert page.count("<script") == 1
    assert " on" + "click=" not in page


@pytest.mark.parametrize(
    "path",
    [
        "/static/settings.py",
        "/static/..%2Fsettings.py",
        "/static/..%2F..%2Fsettings.py",
        "/static/%2E%2E%2Fplayground.py",
        "/static/",
        "/static/playground.JS",
        "/static/index.html%00",
        "/static/../settings.py",
    ],
)
def test_anything_but_the_known_files_is_404(playground_server: RunningServer, path: str) -> None:
    # A raw target, so the client does not normalise the `..` away before sending it.
    with httpx.Client(base_url=playground_server.base, timeout=10) as client:
        request = client.build_request("GET", playground_server.base)
        request.url = request.url.copy_with(raw_path=path.encode())
        reply = client.send(request)
    assert reply.status_code == 404
    assert reply.json()["errors"][0]["code"] == "notFound"


def test_playground_routes_are_not_in_the_openapi_document(
    playground_server: RunningServer,
) -> None:
    paths = httpx.get(playground_server.base + "/openapi.json", timeout=10).json()["paths"]
    assert "/" not in paths
    assert not any(p.startswith("/static") for p in paths)
