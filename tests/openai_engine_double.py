"""An SGLang-Diffusion double: a real HTTP server on loopback that serves
`POST /v1/images/generations` the way SGLang-Diffusion's OpenAI-compatible server documents it
(docs/diffusion/api/openai_api.md; the request model `ImageGenerationsRequest` in
python/sglang/multimodal_gen/runtime/entrypoints/openai/protocol.py) and answers with solid
PNGs of the requested size whose color is derived from the seed (`color_for`).

It is stricter than SGLang in one way on purpose: a field SGLang does not declare, or a value
of the wrong type, is refused with a 400 in OpenAI's envelope
`{"error": {"message", "type", "param", "code"}}` (SGLang itself ignores or, in newer
versions, keeps unknown fields, and answers type errors with FastAPI's 422), so a test proves
impasto sends only what SGLang reads. With `api_key` set, a missing or other Bearer key is a
401. `failures` scripts answers: each request first pops one (status, JSON body) if any.
`delay_s` holds every generation that long. `response_format=url` answers a relative URL
`/v1/images/<id>/content` (SGLang without cloud storage), served by GET. Every request is
recorded.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

TEST_KEY = "sk-engine-" + "5f3a9c1e" * 4
DEFAULT_SEED = 1024  # SGLang's documented default
MAX_N = 10  # image_api.py clamps n to 1..10


def _string(value: Any) -> bool:
    return isinstance(value, str)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _boolean(value: Any) -> bool:
    return isinstance(value, bool)


def _seed(value: Any) -> bool:
    return _integer(value) or (isinstance(value, list) and all(_integer(v) for v in value))


def _mapping(value: Any) -> bool:
    return isinstance(value, dict)


# ImageGenerationsRequest's fields (all Optional except prompt) and their types.
FIELDS: dict[str, Callable[[Any], bool]] = {
    "prompt": _string,
    "model": _string,
    "n": _integer,
    "quality": _string,
    "response_format": _string,
    "size": _string,
    "style": _string,
    "background": _string,
    "output_format": _string,
    "user": _string,
    "width": _integer,
    "height": _integer,
    "num_inference_steps": _integer,
    "guidance_scale": _number,
    "true_cfg_scale": _number,
    "seed": _seed,
    "generator_device": _string,
    "negative_prompt": _string,
    "output_quality": _string,
    "output_compression": _integer,
    "enable_teacache": _boolean,
    "diffusers_kwargs": _mapping,
}
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def color_for(seed: int) -> tuple[int, int, int]:
    """The solid color of the image made for `seed`."""
    return (seed * 37 + 11) % 256, (seed * 91 + 23) % 256, (seed * 173 + 47) % 256


def openai_error(
    message: str, *, param: str | None = None, code: str | None = None, kind: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": kind or "invalid_request_error",
            "param": param,
            "code": code,
        }
    }


class Refused(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


@dataclass
class EngineRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class EngineDouble:
    port: int = 0
    api_key: str | None = None
    failures: list[tuple[int, Any]] = field(default_factory=list)
    delay_s: float = 0.0
    requests: list[EngineRequest] = field(default_factory=list)
    generations: list[dict[str, Any]] = field(default_factory=list)  # the accepted bodies
    images: dict[str, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        """The base URL an OpenAI client is given (its /images/... live under it)."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- the endpoint -------------------------------------------------------------------------

    def validate(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise Refused(400, openai_error("The request body must be a JSON object."))
        for name, value in body.items():
            check = FIELDS.get(name)
            if check is None:
                raise Refused(
                    400,
                    openai_error(
                        f"Unrecognized request argument supplied: {name}",
                        param=name,
                        code="unknown_parameter",
                    ),
                )
            if value is not None and not check(value):
                raise Refused(
                    400,
                    openai_error(
                        f"Invalid type for '{name}': {value!r}", param=name, code="invalid_type"
                    ),
                )
        if not isinstance(body.get("prompt"), str):
            raise Refused(
                400, openai_error("Missing required parameter: 'prompt'.", param="prompt")
            )
        size = body.get("size") or "1024x1024"
        if not _SIZE.match(size):
            raise Refused(400, openai_error(f"Invalid size {size!r}: use WxH.", param="size"))
        response_format = body.get("response_format") or "url"
        if response_format not in ("url", "b64_json"):
            # image_api.py: HTTPException(400, "response_format=... is not supported")
            raise Refused(400, {"detail": f"response_format={response_format} is not supported"})
        n = body.get("n") or 1
        if n < 1:
            raise Refused(400, openai_error("n must be at least 1.", param="n"))
        steps = body.get("num_inference_steps")
        if steps is not None and steps < 1:
            raise Refused(
                400,
                openai_error("num_inference_steps must be positive.", param="num_inference_steps"),
            )
        return body

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        match = _SIZE.match(body.get("size") or "1024x1024")
        assert match is not None
        width = body.get("width") or int(match.group(1))
        height = body.get("height") or int(match.group(2))
        n = max(1, min(int(body.get("n") or 1), MAX_N))
        seed = body.get("seed")
        seeds = (
            list(seed)
            if isinstance(seed, list)
            else [(DEFAULT_SEED if seed is None else seed) + i for i in range(n)]
        )
        if self.delay_s:
            time.sleep(self.delay_s)
        response_format = body.get("response_format") or "url"
        data = []
        for i in range(n):
            buffer = io.BytesIO()
            Image.new("RGB", (width, height), color_for(seeds[i % len(seeds)])).save(
                buffer, format="PNG"
            )
            png = buffer.getvalue()
            item: dict[str, Any] = {"revised_prompt": body["prompt"]}
            if response_format == "b64_json":
                item["b64_json"] = base64.b64encode(png).decode("ascii")
            else:
                image_id = uuid.uuid4().hex
                with self.lock:
                    self.images[image_id] = png
                item["url"] = f"/v1/images/{image_id}/content"
            data.append(item)
        return {"id": uuid.uuid4().hex, "created": int(time.time()), "data": data}

    def handle(self, request: EngineRequest) -> tuple[int, str, bytes]:
        path = request.path.split("?")[0]
        if self.api_key is not None and request.headers.get("authorization") != (
            f"Bearer {self.api_key}"
        ):
            return _json(
                401,
                openai_error(
                    "Incorrect API key provided.",
                    code="invalid_api_key",
                    kind="authentication_error",
                ),
            )
        if request.method == "GET":
            match = re.fullmatch(r"/v1/images/([0-9a-f]+)/content", path)
            png = self.images.get(match.group(1)) if match else None
            if png is None:
                return _json(404, {"detail": "Not Found"})
            return 200, "image/png", png
        if request.method != "POST" or path != "/v1/images/generations":
            return _json(404, {"detail": "Not Found"})
        with self.lock:
            failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            return _json(*failure)
        try:
            body = self.validate(request.body)
        except Refused as refused:
            return _json(refused.status, refused.body)
        with self.lock:
            self.generations.append(body)
        return _json(200, self.generate(body))


def _json(status: int, body: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body).encode()


@contextmanager
def running_engine(api_key: str | None = TEST_KEY) -> Iterator[EngineDouble]:
    double = EngineDouble(api_key=api_key)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body: Any = json.loads(raw) if raw else None
            except ValueError:
                body = raw
            headers = {name.lower(): value for name, value in self.headers.items()}
            request = EngineRequest(self.command, self.path, headers, body)
            with double.lock:
                double.requests.append(request)
            status, content_type, payload = double.handle(request)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _serve

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    double.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield double
    finally:
        httpd.shutdown()
        httpd.server_close()
