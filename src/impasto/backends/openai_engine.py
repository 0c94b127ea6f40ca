"""The wire of an OpenAI-compatible image engine, for OpenAIImagesBackend: the entry's
settings, the request body of one job, the engine's errors as Runware errors, and the
decoding of its images. What the engines document is in backends/openai_images.py."""

from __future__ import annotations

import base64
import io
import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
from PIL import Image

from impasto.backends.base import GenerationJob
from impasto.backends.entries import ModelEntry
from impasto.protocol.errors import (
    ImpastoError,
    InvalidParameter,
    ProviderContentRejected,
    ProviderError,
    ProviderKeyRejected,
    ProviderNotConfigured,
    ProviderRateLimited,
    ProviderTimeout,
    code_name,
)

log = logging.getLogger("impasto.backends.openai_images")

BACKEND_NAME = "openai-images"
RESPONSE_FORMATS = ("b64_json", "url")
# The Runware parameters these entries take (and forward); the registry refuses others.
SUPPORTED_PARAMETERS = frozenset({"negativePrompt", "seed", "steps", "CFGScale"})
SETTING_KEYS = frozenset(
    {"url", "model", "api_key_env", "timeout_s", "max_retries", "response_format", "concurrency"}
)
DEFAULT_TIMEOUT_S = 300.0
CONNECT_TIMEOUT_S = 10.0
DEFAULT_MAX_RETRIES = 2
DEFAULT_CONCURRENCY = 4
RETRY_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
MAX_RESPONSE_BYTES = 96 * 1024 * 1024  # a JSON answer with one base64 image
MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_IMAGE_PIXELS = 50_000_000
MAX_ENGINE_TEXT = 200

# A field of our request named by the engine's error -> the Runware parameter it came from.
REQUEST_PARAMETERS = {
    "prompt": "positivePrompt",
    "negative_prompt": "negativePrompt",
    "size": "width",
    "width": "width",
    "height": "height",
    "n": "numberResults",
    "seed": "seed",
    "num_inference_steps": "steps",
    "guidance_scale": "CFGScale",
}
CONTENT_CODES = frozenset({"content_policy_violation", "moderation_blocked", "content_filter"})
_TRACEBACK = re.compile(r"Traceback \(most recent call last\)")


# -- settings ---------------------------------------------------------------------------------


def _positive_number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def check_settings(settings: Mapping[str, Any]) -> list[str]:
    """What is wrong with an openai-images entry's settings (empty: nothing)."""
    problems = []
    url = settings.get("url")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(
            "settings.url must be the engine's http(s) base URL, e.g. http://host:30000/v1"
        )
    elif parts.query or parts.fragment:
        problems.append("settings.url must not have a query or fragment")
    model = settings.get("model")
    if not isinstance(model, str) or not model:
        problems.append("settings.model must be the engine's model name (a string)")
    key_env = settings.get("api_key_env")
    if key_env is not None and (not isinstance(key_env, str) or not key_env):
        problems.append("settings.api_key_env must be the name of an environment variable")
    timeout = settings.get("timeout_s")
    if timeout is not None and not _positive_number(timeout):
        problems.append("settings.timeout_s must be a positive number of seconds")
    for key, low in (("max_retries", 0), ("concurrency", 1)):
        value = settings.get(key)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < low
        ):
            problems.append(f"settings.{key} must be an integer >= {low}")
    response_format = settings.get("response_format")
    if response_format is not None and response_format not in RESPONSE_FORMATS:
        problems.append(f"settings.response_format must be one of {', '.join(RESPONSE_FORMATS)}")
    if "api_key" in settings:
        problems.append(
            "settings.api_key is not read; put the key in an environment variable and name it "
            "in settings.api_key_env"
        )
    return problems


def missing_key(entry: ModelEntry) -> ProviderNotConfigured | None:
    """The error of an entry whose api_key_env names an unset variable, else None."""
    key_env = entry.settings.get("api_key_env")
    if key_env and not os.environ.get(str(key_env)):
        return ProviderNotConfigured(
            f"Model {entry.air} is served by an OpenAI-compatible engine whose API key is not "
            "configured on this server.",
            parameter="model",
        )
    return None


# -- request and answer mapping ---------------------------------------------------------------


def request_body(job: GenerationJob, model: str, response_format: str) -> dict[str, Any]:
    """The JSON of `POST /images/generations` for one job."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": job.prompt,
        "n": 1,
        "size": f"{job.width}x{job.height}",
        "response_format": response_format,
        "seed": job.seed,
    }
    if job.negative_prompt:
        body["negative_prompt"] = job.negative_prompt
    if job.steps is not None:
        body["num_inference_steps"] = job.steps
    if job.cfg_scale is not None:
        body["guidance_scale"] = job.cfg_scale
    return body


def engine_text(value: Any, secret: str | None = None) -> str:
    """An engine's message fit for a client: one line, no traceback, no key, truncated."""
    text = value if isinstance(value, str) else str(value)
    match = _TRACEBACK.search(text)
    if match:
        text = text[: match.start()]
    if secret:
        text = text.replace(secret, "***")
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    if len(text) > MAX_ENGINE_TEXT:
        text = text[: MAX_ENGINE_TEXT - 1].rstrip() + "…"
    return text


def parse_error(body: Any) -> tuple[str, str | None, str | None]:
    """(message, param, code) of an error answer: OpenAI's `{"error": {...}}`, vLLM's
    top-level `{"object": "error", "message", ...}`, or FastAPI's `{"detail": ...}`."""
    if not isinstance(body, Mapping):
        return "", None, None
    error = body.get("error")
    if isinstance(error, Mapping):
        document: Mapping[str, Any] = error
    elif isinstance(error, str):
        return error, None, None
    else:
        document = body
    if "message" in document:
        param = document.get("param")
        code = document.get("code")
        kind = document.get("type")
        return (
            str(document.get("message") or ""),
            param if isinstance(param, str) else None,
            code if isinstance(code, str) else kind if isinstance(kind, str) else None,
        )
    detail = body.get("detail")
    if isinstance(detail, str):
        return detail, None, None
    if isinstance(detail, list) and detail and isinstance(detail[0], Mapping):
        first = detail[0]
        loc = first.get("loc")
        fields = [part for part in loc if isinstance(part, str)] if isinstance(loc, list) else []
        names = [part for part in fields if part != "body"]
        kind = first.get("type")
        return (
            str(first.get("msg") or ""),
            names[0] if names else None,
            kind if isinstance(kind, str) else None,
        )
    return "", None, None


class EngineErrors:
    """The Runware error items of one engine's failures (messages name the model's AIR)."""

    def __init__(self, air: str, secret: str | None) -> None:
        self.air = air
        self.secret = secret

    def _said(self, message: str) -> str:
        text = engine_text(message, self.secret)
        return f": {text}" if text else "."

    def for_status(self, status: int, body: Any) -> ImpastoError:
        message, param, code = parse_error(body)
        said = self._said(message)
        engine = f"The engine serving {self.air}"
        if status in (401, 403):
            return ProviderKeyRejected(
                f"{engine} refused this server's API key (HTTP {status}); the operator must "
                "check the key named by the model's api_key_env."
            )
        if status == 429:
            return ProviderRateLimited(f"{engine} is over its rate limit, try again later{said}")
        if status == 504 or status == 408:
            return ProviderTimeout(f"{engine} did not finish in time (HTTP {status}).")
        if status >= 500:
            return ProviderError(f"{engine} failed (HTTP {status}){said}")
        if code in CONTENT_CODES:
            return ProviderContentRejected(f"{engine} refused the content{said}")
        parameter = REQUEST_PARAMETERS.get(param or "")
        if parameter is not None and status in (400, 422):
            return InvalidParameter(
                f"Invalid value for {parameter} parameter: the engine serving {self.air} "
                f"refused it{said}",
                code=f"invalid{code_name(parameter)}",
                parameter=parameter,
            )
        return ProviderError(f"{engine} refused the request (HTTP {status}){said}")

    def timeout(self) -> ProviderTimeout:
        return ProviderTimeout(f"The engine serving {self.air} did not answer in time.")

    def unreachable(self) -> ProviderError:
        return ProviderError(f"The engine serving {self.air} could not be reached.")

    def failed(self, what: str) -> ProviderError:
        return ProviderError(f"The engine serving {self.air} {what}.")


def never_sent(exc: httpx.HTTPError) -> bool:
    """True when the request cannot have reached the engine (no connection was made)."""
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


def decode_image(data: bytes, width: int, height: int) -> Image.Image:
    """Decode the engine's image and make it exactly width x height (cover, center crop)."""
    image: Image.Image = Image.open(io.BytesIO(data))
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ValueError("image too large")
    image.load()
    image = image.convert("RGB")
    if image.size == (width, height):
        return image
    log.info("engine image is %dx%d, not %dx%d; fitting it", *image.size, width, height)
    scale = max(width / image.width, height / image.height)
    cover = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(cover, Image.Resampling.LANCZOS)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def decode_base64(text: str) -> bytes:
    return base64.b64decode("".join(text.split()), validate=True)


def same_origin(url: str, base: str) -> bool:
    a, b = urlsplit(url), urlsplit(base)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


# -- the backend ------------------------------------------------------------------------------


class TooLarge(Exception):
    pass
