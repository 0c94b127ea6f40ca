"""Secrets in URLs stay out of the log, and no message can forge a log line."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import httpx
import pytest

from impasto.delivery.redact import redact_url, redact_urls_in
from impasto.logcontext import configure_logging

PRESIGNED = (
    "https://bucket.s3.example.com:9000/out/a.png"
    "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA&X-Amz-Signature=deadbeef"
)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (PRESIGNED, "https://bucket.s3.example.com:9000/out/a.png?…"),
        ("http://127.0.0.1:8080/hook?token=s3cr3t", "http://127.0.0.1:8080/hook?…"),
        ("https://user:pw@example.com/p", "https://example.com/p"),
        ("https://example.com/p#access_token=x", "https://example.com/p#…"),
        ("https://example.com/path/only", "https://example.com/path/only"),
        ("http://[::1]:9/x?y=1", "http://[::1]:9/x?…"),
        ("http://[::1/x?token=1", "http://[::1/x?…"),
        ("http://u:p@[::1/x", "http://[::1/x"),
        ("http://example.com/a\r\nINFO forged?t=1", "http://example.com/a\\r\\nINFO forged?…"),
        ("", ""),
    ],
)
def test_redact_url_keeps_scheme_host_port_and_path_only(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_redact_urls_in_text_redacts_every_url() -> None:
    text = f'HTTP Request: PUT {PRESIGNED} "HTTP/1.1 200 OK" then http://a.example/?b=c.'
    assert redact_urls_in(text) == (
        'HTTP Request: PUT https://bucket.s3.example.com:9000/out/a.png?… "HTTP/1.1 200 OK"'
        " then http://a.example/?…"
    )


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _post(url: str) -> None:
    async def main() -> None:
        transport = httpx.MockTransport(lambda request: httpx.Response(204))
        async with httpx.AsyncClient(transport=transport) as client:
            await client.post(url, content=b"{}")

    asyncio.run(main())


@pytest.mark.usefixtures("root_logging")
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_httpx_request_lines_carry_no_query_string(
    fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info", fmt)
    _post("http://127.0.0.1:8080/hook?token=s3cr3t")
    _post(PRESIGNED)
    err = capsys.readouterr().err
    if fmt == "json":
        assert all(json.loads(line)["logger"] == "httpx" for line in err.splitlines())
        err = "\n".join(json.loads(line)["message"] for line in err.splitlines())
    assert "s3cr3t" not in err
    assert "deadbeef" not in err
    assert "AKIA" not in err
    assert "http://127.0.0.1:8080/hook?…" in err
    assert "https://bucket.s3.example.com:9000/out/a.png?…" in err


@pytest.mark.usefixtures("root_logging")
def test_other_loggers_keep_their_urls(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info")
    logging.getLogger("impasto.test").info("see %s", "http://a.example/?page=2")
    assert "http://a.example/?page=2" in capsys.readouterr().err


@pytest.mark.usefixtures("root_logging")
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_newline_in_a_message_cannot_forge_a_log_line(
    fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info", fmt)
    forged = "http://x.example/a\r\n2026-12-01 00:00:00 ERROR impasto.auth [-] admin logged in"
    logging.getLogger("impasto.outbox").warning("webhook to %s failed", forged)
    _post("http://127.0.0.1:8080/a%0D%0AINJECTED")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])["message"] if fmt == "json" else lines[0]
    assert "webhook to http://x.example/a\\r\\n2026-12-01" in first
    assert "ERROR" not in lines[0].split("webhook to", 1)[0]
