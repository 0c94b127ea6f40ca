"""OpenAIImagesBackend: a model served by an OpenAI-compatible image engine (SGLang-Diffusion,
vLLM-Omni, LocalAI, or another impasto) through `POST {url}/images/generations`.

    [models."engine:sglang@1"]
    backend = "openai-images"
    [models."engine:sglang@1".settings]
    url = "http://gpu-host:30000/v1"     # the engine's base URL (where /images/... lives)
    model = "Qwen/Qwen-Image"            # the engine's model name, sent as `model`
    api_key_env = "SGLANG_API_KEY"       # optional: env var with the engine's key (Bearer)
    timeout_s = 300                      # optional: read timeout of one generation
    max_retries = 2                      # optional: re-sends of requests that never left
    response_format = "b64_json"         # optional: or "url"
    concurrency = 4                      # optional: requests in flight at once

What SGLang-Diffusion documents, and where it says so
-----------------------------------------------------
- docs.sglang.io/diffusion/api/openai_api.html (docs/diffusion/api/openai_api.md in
  github.com/sgl-project/sglang): `sglang serve --model-path ... --port 30010` (default port
  30000) serves an OpenAI-compatible Images API under `/v1/images`; `POST
  /v1/images/generations` with JSON `{"prompt", "size": "1024x1024", "n": 1,
  "response_format": "b64_json"}` and an `Authorization: Bearer ...` header, answered with
  `{"data": [{"b64_json": ...}]}`; with `response_format=url` and no cloud storage it answers
  a relative URL `/v1/images/<IMAGE_ID>/content`.
- The request model, python/sglang/multimodal_gen/runtime/entrypoints/openai/protocol.py
  (`ImageGenerationsRequest`, a pydantic model): `prompt: str` (required), `model`, `n` (1),
  `quality`, `response_format` ("url" default; "url" | "b64_json"), `size` ("1024x1024"),
  `style`, `background`, `output_format`, `user`, and the "SGLang extensions"
  `num_inference_steps: int`, `guidance_scale: float`, `true_cfg_scale`, `seed` (an int; in
  newer versions an int or a list of ints), `generator_device`, `negative_prompt: str`,
  `enable_teacache`, `output_quality`, `output_compression`, `diffusers_kwargs`; newer
  versions add `width`/`height`, `max_sequence_length`, `flow_shift`, upscaling and
  progressive-generation fields and set `extra="allow"` (unknown fields pass), older ones
  use pydantic's default (unknown fields are ignored). image_api.py clamps `n` to 1..10 and
  builds one sampling request from these fields.
- Errors: the diffusion server (runtime/entrypoints/http_server.py) installs no exception
  handlers of its own, so they are FastAPI's defaults: a malformed body is a 422 with
  `{"detail": [{"loc": ["body", field], "msg", "type"}]}`, an HTTPException (e.g. an
  unsupported response_format) is `{"detail": "..."}` with its status.

Inferred, not documented: that vLLM-Omni and LocalAI take the same extension fields
(negative_prompt, seed, num_inference_steps, guidance_scale) and answer errors with OpenAI's
`{"error": {"message", "type", "param", "code"}}` (or vLLM's older top-level
`{"object": "error", "message", ...}`); all three shapes are read here. Impasto's own
`/v1/images/generations` takes exactly these extension fields.

What is sent
------------
`{"model", "prompt", "n": 1, "size": "WxH", "response_format", "seed"}`, plus
`negative_prompt`, `num_inference_steps` and `guidance_scale` when the job has them (a new
entry accepts negativePrompt, seed, steps and CFGScale; nothing else is forwarded, so the
registry refuses other parameters for these entries). One request per job with `n = 1` and
the job's own seed: a single `seed` with `n > 1` gives the engine's images seeds of its own
choosing (the list form exists only in newer SGLang), so every image would report a seed that
does not reproduce it. Jobs of a task still run side by side, up to `concurrency` requests in
flight, and the engine may batch them itself.

Failures become Runware error items: 401/403 providerKeyRejected, 429 providerRateLimited,
a 400/422 naming a field we sent an invalidParameter for the Runware parameter (other 4xx a
providerError), 5xx providerError (504 timeoutProvider), a read or write timeout
timeoutProvider. The engine's message is included, sanitized (one line, no key, no traceback)
and truncated. A request is re-sent only when it cannot have reached the engine (connection
refused, connect or pool timeout): once the body went out a generation may be running there.
The key is sent as a Bearer header and never logged.

The engine URL is the operator's (models file), trusted like Runway's base URL: it is not
vetted by the outbound guard. Result URLs on the engine's own origin are fetched with the
engine's client (and key); result URLs elsewhere go through the outbound guard, without the
key.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

import httpx
from PIL import Image

from impasto.backends.base import (
    CheckpointCallback,
    GeneratedImage,
    GenerationJob,
    OneJobPerCall,
    ProgressCallback,
)
from impasto.backends.entries import ModelEntry
from impasto.backends.openai_engine import (
    CONNECT_TIMEOUT_S,
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT_S,
    MAX_BACKOFF_S,
    MAX_IMAGE_BYTES,
    MAX_RESPONSE_BYTES,
    RETRY_BACKOFF_S,
    EngineErrors,
    TooLarge,
    check_settings,
    decode_base64,
    decode_image,
    engine_text,
    missing_key,
    never_sent,
    request_body,
    same_origin,
)

if TYPE_CHECKING:
    from impasto.backends.factory import BackendContext

log = logging.getLogger("impasto.backends.openai_images")


class OpenAIImagesBackend(OneJobPerCall):
    """Forwards each job as one `POST {url}/images/generations` with n=1."""

    def __init__(
        self,
        entry: ModelEntry,
        context: BackendContext | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        problems = check_settings(entry.settings)
        if problems:
            raise ValueError(f"model {entry.air}: {'; '.join(problems)}")
        not_configured = missing_key(entry)
        if not_configured is not None:
            raise not_configured
        settings = entry.settings
        self.entry = entry
        self.base_url = str(settings["url"]).rstrip("/")
        self.endpoint = f"{self.base_url}/images/generations"
        self.model = str(settings["model"])
        self.response_format = str(settings.get("response_format", "b64_json"))
        self.timeout_s = float(settings.get("timeout_s", DEFAULT_TIMEOUT_S))
        self.max_retries = int(settings.get("max_retries", DEFAULT_MAX_RETRIES))
        self.concurrency = int(settings.get("concurrency", DEFAULT_CONCURRENCY))
        key_env = settings.get("api_key_env")
        self._key = os.environ.get(str(key_env)) if key_env else None
        self._errors = EngineErrors(entry.air, self._key)
        self._outbound = context.outbound if context is not None else None
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self._client = httpx.AsyncClient(
            transport=transport,
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s, connect=min(CONNECT_TIMEOUT_S, self.timeout_s)),
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"OpenAIImagesBackend({self.entry.air!r}, {self.endpoint!r})"

    async def close(self) -> None:
        await self._client.aclose()

    # -- one job ------------------------------------------------------------------------------

    async def generate_one(
        self, job: GenerationJob, progress: ProgressCallback, checkpoint: CheckpointCallback
    ) -> GeneratedImage:
        """One request with n=1 and the job's own seed (see the module docstring)."""
        progress([job], 0)
        body = request_body(job, self.model, self.response_format)
        document = await self._post(job, body)
        data = await self._image_bytes(job, document)
        try:
            image = await asyncio.to_thread(decode_image, data, job.width, job.height)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            log.warning("job %s: the engine's image is not readable: %s", job.job_id, exc)
            raise self._errors.failed("answered an image that could not be read") from None
        progress([job], 100)
        return GeneratedImage(image=image, seed=job.seed)

    async def _post(self, job: GenerationJob, body: dict[str, Any]) -> Any:
        for attempt in range(self.max_retries + 1):
            try:
                async with self._client.stream("POST", self.endpoint, json=body) as response:
                    content = await _read_capped(response, MAX_RESPONSE_BYTES)
            except httpx.HTTPError as exc:
                if not never_sent(exc):
                    log.warning(
                        "job %s: request to %s failed after it was sent (%s); not retried, the "
                        "engine may be generating",
                        job.job_id,
                        self.endpoint,
                        type(exc).__name__,
                    )
                    if isinstance(exc, httpx.TimeoutException):
                        raise self._errors.timeout() from None
                    raise self._errors.failed("failed while answering") from None
                if attempt < self.max_retries:
                    log.info(
                        "job %s: %s not reached (%s); retrying",
                        job.job_id,
                        self.endpoint,
                        type(exc).__name__,
                    )
                    await asyncio.sleep(min(MAX_BACKOFF_S, RETRY_BACKOFF_S * 2**attempt))
                    continue
                log.warning(
                    "job %s: %s not reached after %d attempts (%s)",
                    job.job_id,
                    self.endpoint,
                    attempt + 1,
                    type(exc).__name__,
                )
                if isinstance(exc, httpx.TimeoutException):
                    raise self._errors.timeout() from None
                raise self._errors.unreachable() from None
            except TooLarge:
                log.warning("job %s: the engine's answer is over the size limit", job.job_id)
                raise self._errors.failed("answered more than this server takes") from None
            return self._answer(job, response.status_code, content)
        raise AssertionError("the loop returns or raises")

    def _answer(self, job: GenerationJob, status: int, content: bytes) -> Any:
        try:
            document = json.loads(content)
        except ValueError:
            document = None
        if status == 200 and document is not None:
            return document
        if status == 200:
            log.warning("job %s: the engine answered 200 without JSON", job.job_id)
            raise self._errors.failed("answered something that is not JSON")
        error = self._errors.for_status(status, document)
        log.warning(
            "job %s: the engine answered HTTP %d: %s",
            job.job_id,
            status,
            engine_text(content.decode("utf-8", "replace"), self._key),
        )
        raise error

    async def _image_bytes(self, job: GenerationJob, document: Any) -> bytes:
        items = document.get("data") if isinstance(document, Mapping) else None
        item = items[0] if isinstance(items, list) and items else None
        if not isinstance(item, Mapping):
            log.warning("job %s: the engine's answer has no data", job.job_id)
            raise self._errors.failed("answered without an image")
        encoded = item.get("b64_json")
        if isinstance(encoded, str) and encoded:
            try:
                return decode_base64(encoded)
            except (binascii.Error, ValueError):
                log.warning("job %s: the engine's b64_json is not base64", job.job_id)
                raise self._errors.failed("answered an image that could not be read") from None
        url = item.get("url")
        if isinstance(url, str) and url:
            return await self._fetch(job, url)
        log.warning("job %s: the engine's answer has neither b64_json nor url", job.job_id)
        raise self._errors.failed("answered without an image")

    async def _fetch(self, job: GenerationJob, url: str) -> bytes:
        if url.startswith("data:"):
            _, _, encoded = url.partition(",")
            try:
                return decode_base64(encoded)
            except (binascii.Error, ValueError):
                raise self._errors.failed("answered an image that could not be read") from None
        absolute = urljoin(self.base_url + "/", url)
        if same_origin(absolute, self.base_url):
            # The engine's own content endpoint: trusted like the engine, with its key.
            try:
                async with self._client.stream("GET", absolute) as response:
                    if response.status_code != 200:
                        log.warning(
                            "job %s: fetching the engine's image: HTTP %d",
                            job.job_id,
                            response.status_code,
                        )
                        raise self._errors.failed("could not hand over its image")
                    return await _read_capped(response, MAX_IMAGE_BYTES)
            except (httpx.HTTPError, TooLarge) as exc:
                log.warning("job %s: fetching the engine's image failed: %r", job.job_id, exc)
                raise self._errors.failed("could not hand over its image") from None
        if self._outbound is None:
            log.warning(
                "job %s: the engine's image URL is elsewhere, with no outbound client", job.job_id
            )
            raise self._errors.failed("could not hand over its image")
        # Elsewhere (e.g. cloud storage): the outbound guard vets it; the key is not sent.
        try:
            data, _ = await self._outbound.fetch(
                absolute, max_bytes=MAX_IMAGE_BYTES, timeout=self.timeout_s
            )
        except ValueError as exc:  # OutboundRefused, OutboundFailed
            log.warning("job %s: fetching the engine's image URL failed: %s", job.job_id, exc)
            raise self._errors.failed("could not hand over its image") from None
        return bytes(data)


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body.extend(chunk)
        if len(body) > limit:
            raise TooLarge
    return bytes(body)
