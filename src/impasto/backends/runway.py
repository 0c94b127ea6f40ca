"""RunwayBackend: `runway:4@1` (Gen-4 Image) and `runway:4@2` (Gen-4 Image Turbo) through
Runway's task API with the official `runwayml` SDK.

One job is one Runway task. It is created once (`POST /v1/text_to_image`, which has no
idempotency key, so it is repeated only when Runway cannot have created anything), its id is
checkpointed with our task, then `GET /v1/tasks/{id}` is polled every poll interval until it
ends, and the output is downloaded at once (Runway's URLs expire). A job that comes back after
a restart with a stored task id polls that task instead of creating a second, billed one.

Runway's failures become Runware error items through the tables below (also in
docs/runway.md); Runway's own failure text is logged, never shown to the client.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import runwayml
from PIL import Image

from impasto.backends.base import (
    CheckpointCallback,
    GeneratedImage,
    GenerationJob,
    OneJobPerCall,
    ProgressCallback,
    ReferenceImage,
)
from impasto.backends.factory import RunwayOptions
from impasto.backends.registry import ModelEntry
from impasto.protocol.errors import (
    ImpastoError,
    InvalidParameter,
    ProviderContentRejected,
    ProviderError,
    ProviderKeyRejected,
    ProviderRateLimited,
    ProviderTimeout,
)
from impasto.protocol.rules import RUNWAY_SIZES
from impasto.protocol.tasks import RUNWAY_TAG

log = logging.getLogger("impasto.backends.runway")

RUNWAY_VERSION = "2024-11-06"
RUNWAY_MODELS = frozenset({"gen4_image", "gen4_image_turbo"})
# Runway's `ratio` enum is the output size in pixels, W:H: the 16 sizes of the model's rules.
RUNWAY_RATIOS = frozenset(f"{width}:{height}" for width, height in RUNWAY_SIZES)
SEED_RANGE = 2**32  # Runway seeds are 0..4294967295
DATA_URI_LIMIT = 5 * 1024 * 1024  # the whole `data:image/...;base64,...` string
HTTPS_URI_LIMIT = 2048
# Third-party wrappers say Runway wants sides under 8000 px (unverified for the API itself).
REFERENCE_MAX_SIDE = 7999
JPEG_QUALITIES = (92, 80)
CREATE_RETRIES = 2  # only for creates Runway refused (429) or that never left this host
POLL_RETRIES = 5  # consecutive failed polls (5xx, 429, timeouts, connection) tolerated
DOWNLOAD_ATTEMPTS = 3
MAX_OUTPUT_BYTES = 64 * 1024 * 1024
MAX_OUTPUT_PIXELS = 50_000_000
MAX_BACKOFF_S = 60.0

RESUME_TASK_ID = "runway_task_id"
RESUME_SEED = "runway_seed"


# -- the error tables -------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorRow:
    """One row of a mapping table: the impasto error a Runway failure becomes."""

    error: type[ImpastoError]
    message: str
    code: str | None = None
    parameter: str | None = None

    def build(self, parameter: str | None = None) -> ImpastoError:
        return self.error(self.message, code=self.code, parameter=parameter or self.parameter)


# FAILED tasks, by `failureCode`; the first matching prefix wins ("" matches anything).
TASK_FAILURES: tuple[tuple[str, ErrorRow], ...] = (
    (
        "SAFETY.INPUT",
        ErrorRow(
            ProviderContentRejected,
            "Runway's content moderation rejected the input (the prompt or a reference image).",
        ),
    ),
    (
        "SAFETY.OUTPUT",
        ErrorRow(ProviderContentRejected, "Runway's content moderation withheld the image."),
    ),
    (
        "INPUT_PREPROCESSING.SAFETY",
        ErrorRow(ProviderContentRejected, "Runway's content moderation rejected the prompt."),
    ),
    (
        "ASSET.INVALID",
        ErrorRow(
            InvalidParameter,
            "Runway could not use a reference image; send a JPEG, PNG or WEBP image.",
            code="invalidReferenceImages",
            parameter="inputs.referenceImages",
        ),
    ),
    (
        "INTERNAL.BAD_OUTPUT",
        ErrorRow(
            ProviderError,
            "Runway could not produce a usable image for this request (text or graphics "
            "overlaid on reference images are a common cause); try other inputs.",
        ),
    ),
    ("", ErrorRow(ProviderError, "Runway failed to generate the image.")),
)

# HTTP errors from Runway, by status (400 is mapped through its issues, below).
STATUS_ERRORS: dict[int, ErrorRow] = {
    401: ErrorRow(
        ProviderKeyRejected,
        "Runway rejected this server's API key; the operator must check RUNWAYML_API_SECRET.",
    ),
    403: ErrorRow(ProviderKeyRejected, "Runway refused this server's API key access to the model."),
    404: ErrorRow(
        ProviderError, "The Runway task no longer exists (it was deleted or cancelled at Runway)."
    ),
    429: ErrorRow(
        ProviderRateLimited,
        "Runway's generation quota of this server's account is used up; try again later.",
    ),
}
SERVER_ERROR = ErrorRow(ProviderError, "Runway is unavailable (server error); try again later.")
TIMEOUT_ERROR = ErrorRow(ProviderTimeout, "Runway did not answer in time.")
CONNECTION_ERROR = ErrorRow(ProviderError, "Runway could not be reached.")
REJECTED_ERROR = ErrorRow(ProviderError, "Runway rejected the request.")
CANCELLED_ERROR = ErrorRow(ProviderError, "The Runway task was cancelled at Runway.")
TASK_TIMEOUT_ERROR = ErrorRow(ProviderTimeout, "Runway did not finish the image in time.")
DOWNLOAD_ERROR = ErrorRow(ProviderError, "The image made by Runway could not be downloaded.")

# A 400's `issues[].path[0]` → our (code, parameter); the rest of the path is appended.
ISSUE_PARAMETERS: dict[str, tuple[str, str]] = {
    "promptText": ("invalidPositivePrompt", "positivePrompt"),
    "ratio": ("invalidWidth", "width"),
    "referenceImages": ("invalidReferenceImages", "inputs.referenceImages"),
    "contentModeration": (
        "invalidProviderSettings",
        "providerSettings.runway.contentModeration",
    ),
    "seed": ("invalidSeed", "seed"),
    "model": ("invalidModel", "model"),
}

_REFERENCE_INDEX = re.compile(r"referenceImages(?:\[|\.)(\d+)")


def error_for_failure(failure_code: str | None) -> ImpastoError:
    """The error item of a FAILED task."""
    code = failure_code or ""
    for prefix, row in TASK_FAILURES:
        if code.startswith(prefix):
            return row.build()
    raise AssertionError("TASK_FAILURES ends with a catch-all row")


def _issue_parameter(base: str, path: Sequence[Any]) -> str:
    parameter = base
    for part in path:
        parameter += f"[{part}]" if isinstance(part, int) else f".{part}"
    return parameter


def error_for_rejection(body: object) -> ImpastoError:
    """The error item of a 400: the first issue whose field we know names our parameter."""
    document = body if isinstance(body, Mapping) else {}
    issues = document.get("issues")
    for issue in issues if isinstance(issues, list) else []:
        path = issue.get("path") if isinstance(issue, Mapping) else None
        if not isinstance(path, list) or not path or path[0] not in ISSUE_PARAMETERS:
            continue
        code, base = ISSUE_PARAMETERS[str(path[0])]
        parameter = _issue_parameter(base, path[1:])
        kind = issue.get("code") if isinstance(issue.get("code"), str) else "invalid"
        return InvalidParameter(
            f"Invalid value for {parameter} parameter: Runway refused it ({kind}).",
            code=code,
            parameter=parameter,
        )
    # Asset problems (fetch failures, bad data URIs) come without issues; the text names them.
    text = str(document.get("error", ""))
    if "referenceImages" in text or "asset" in text.lower():
        match = _REFERENCE_INDEX.search(text)
        parameter = "inputs.referenceImages" + (f"[{match.group(1)}]" if match else "")
        return InvalidParameter(
            f"Invalid value for {parameter} parameter: Runway could not use the image.",
            code="invalidReferenceImages",
            parameter=parameter,
        )
    return REJECTED_ERROR.build()


def error_for_status(status: int, body: object) -> ImpastoError:
    """The error item of an HTTP error answer from Runway."""
    if status == 400:
        return error_for_rejection(body)
    row = STATUS_ERRORS.get(status)
    if row is not None:
        return row.build()
    return SERVER_ERROR.build() if status >= 500 else REJECTED_ERROR.build()


def error_for_exception(exc: runwayml.APIError) -> ImpastoError:
    """The error item of an SDK exception (status errors, timeouts, connection failures)."""
    if isinstance(exc, runwayml.APIStatusError):
        return error_for_status(exc.status_code, exc.body)
    if isinstance(exc, runwayml.APITimeoutError):
        return TIMEOUT_ERROR.build()
    if isinstance(exc, runwayml.APIConnectionError):
        return CONNECTION_ERROR.build()
    return SERVER_ERROR.build()


def never_sent(exc: BaseException) -> bool:
    """True when the request cannot have reached Runway (no connection was made)."""
    cause = exc.__cause__
    return isinstance(cause, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


# -- request mapping --------------------------------------------------------------------------


def runway_model(entry: ModelEntry) -> str:
    model = str(entry.settings.get("model", "gen4_image"))
    if model not in RUNWAY_MODELS:
        raise ValueError(
            f"model {entry.air}: Runway model {model!r} is not one of {sorted(RUNWAY_MODELS)}"
        )
    return model


def ratio_for(width: int, height: int) -> str:
    ratio = f"{width}:{height}"
    if ratio not in RUNWAY_RATIOS:
        allowed = ", ".join(sorted(r.replace(":", "x") for r in RUNWAY_RATIOS))
        raise InvalidParameter(
            f"Invalid value for width parameter: Runway makes {allowed}, not {width}x{height}.",
            code="invalidWidth",
            parameter="width",
        )
    return ratio


def runway_seed(seed: int) -> int:
    """Our 63-bit seed folded into Runway's 32-bit range; the item reports this one."""
    return seed % SEED_RANGE


def content_moderation(provider_settings: Mapping[str, Any]) -> dict[str, str] | None:
    """providerSettings.runway.contentModeration in the SDK's (snake_case) shape."""
    runway = provider_settings.get("runway") or {}
    moderation = runway.get("contentModeration") if isinstance(runway, Mapping) else None
    if not isinstance(moderation, Mapping) or "publicFigureThreshold" not in moderation:
        return None
    return {"public_figure_threshold": str(moderation["publicFigureThreshold"])}


def passes_through(url: str | None) -> bool:
    """Whether Runway can fetch this URL itself: https, a domain name (not an IP), <= 2048."""
    if not url or not 13 <= len(url) <= HTTPS_URI_LIMIT:
        return False
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        return False
    try:
        ipaddress.ip_address(parts.hostname)
    except ValueError:
        return True
    return False


def _encoded(image: Image.Image, fmt: str, quality: int = 0) -> str:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=quality)
        mime = "image/jpeg"
    else:
        image.save(buffer, format="PNG", compress_level=6)
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def _opaque(image: Image.Image) -> Image.Image:
    if not _has_alpha(image):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGB", image.size, "white")
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _scaled(image: Image.Image, scale: float) -> Image.Image:
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def data_uri(image: Image.Image, limit: int = DATA_URI_LIMIT) -> str:
    """A `data:image/...` URI of the image within `limit` characters: PNG if it has alpha and
    fits, else JPEG at falling quality, then downscaled until it fits."""
    if max(image.size) > REFERENCE_MAX_SIDE:
        image = _scaled(image, REFERENCE_MAX_SIDE / max(image.size))
    if _has_alpha(image):
        uri = _encoded(image, "PNG")
        if len(uri) <= limit:
            return uri
    rgb = _opaque(image)
    for quality in JPEG_QUALITIES:
        uri = _encoded(rgb, "JPEG", quality)
        if len(uri) <= limit:
            return uri
    quality = JPEG_QUALITIES[-1]
    while True:
        # The encoded size follows the pixel count: shrink by the square root of the excess.
        scale = min(0.9, math.sqrt(limit / len(uri)) * 0.95)
        rgb = _scaled(rgb, scale)
        uri = _encoded(rgb, "JPEG", quality)
        if len(uri) <= limit or max(rgb.size) <= 16:
            return uri


def reference_uri(reference: ReferenceImage) -> str:
    """The client's https URL as given when Runway can fetch it, else a data URI."""
    if reference.source_url is not None and passes_through(reference.source_url):
        return reference.source_url
    return data_uri(reference.image)


def create_arguments(job: GenerationJob, model: str, seed: int) -> dict[str, Any]:
    """Keyword arguments of `text_to_image.create` for one job (encodes references: CPU)."""
    arguments: dict[str, Any] = {
        "model": model,
        "prompt_text": job.prompt,
        "ratio": ratio_for(job.width, job.height),
        "seed": seed,
    }
    references = []
    for i, reference in enumerate(job.reference_images):
        item = {"uri": reference_uri(reference)}
        if reference.tag is not None:
            if not RUNWAY_TAG.fullmatch(reference.tag):
                raise InvalidParameter(
                    f"Invalid value for inputs.referenceImages[{i}].tag parameter: a tag is "
                    "3-16 characters, starts with a letter and has only letters, digits and "
                    "underscores.",
                    code="invalidReferenceImages",
                    parameter=f"inputs.referenceImages[{i}].tag",
                )
            item["tag"] = reference.tag
        references.append(item)
    if references:
        arguments["reference_images"] = references
    moderation = content_moderation(job.provider_settings)
    if moderation is not None:
        arguments["content_moderation"] = moderation
    return arguments


def fit_output(data: bytes, width: int, height: int) -> Image.Image:
    """Decode Runway's output and make it exactly width x height (cover, then center crop)."""
    try:
        image: Image.Image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_OUTPUT_PIXELS:
            raise ValueError("output image too large")
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        log.warning("Runway output is not a readable image: %s", exc)
        raise ProviderError("The image made by Runway could not be read.") from None
    image = image.convert("RGB")
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    cover = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(cover, Image.Resampling.LANCZOS)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


# -- the backend ------------------------------------------------------------------------------


class RunwayBackend(OneJobPerCall):
    """Runs each job as one Runway task; `concurrency` tasks at once per model."""

    max_batch_size = 1

    def __init__(
        self, entry: ModelEntry, *, api_key: str, base_url: str, options: RunwayOptions
    ) -> None:
        self.entry = entry
        self.model = runway_model(entry)
        settings = entry.settings
        self.concurrency = max(1, int(settings.get("concurrency", options.concurrency)))
        self.poll_interval_s = float(settings.get("poll_interval_s", options.poll_interval_s))
        self.task_timeout_s = float(settings.get("task_timeout_s", options.task_timeout_s))
        timeout = httpx.Timeout(
            options.request_timeout_s, connect=min(10.0, options.request_timeout_s)
        )
        # max_retries=0: every retry is decided below, because a repeated create can make a
        # second, billed task (the endpoint takes no idempotency key).
        self._client = runwayml.AsyncRunwayML(
            api_key=api_key,
            base_url=base_url,
            runway_version=RUNWAY_VERSION,
            timeout=timeout,
            max_retries=0,
        )
        # Outputs are public CDN URLs signed by Runway: no API key, no outbound guard.
        self._http = httpx.AsyncClient(timeout=timeout, follow_redirects=True)

    def failure_of(self, job: GenerationJob, exc: Exception) -> ImpastoError | None:
        if not isinstance(exc, runwayml.APIError):
            return None
        # E.g. an answer the SDK could not parse.
        log.warning("job %s: Runway call failed: %r", job.job_id, exc)
        return error_for_exception(exc)

    async def close(self) -> None:
        await self._client.close()
        await self._http.aclose()

    # -- one job ------------------------------------------------------------------------------

    async def generate_one(
        self, job: GenerationJob, progress: ProgressCallback, checkpoint: CheckpointCallback
    ) -> GeneratedImage:
        """One Runway task makes one image."""
        stored_seed = job.resume.get(RESUME_SEED)
        seed = stored_seed if isinstance(stored_seed, int) else runway_seed(job.seed)
        task_id = job.resume.get(RESUME_TASK_ID)
        resumed = isinstance(task_id, str) and bool(task_id)
        if resumed:
            log.info("job %s: resuming Runway task %s", job.job_id, task_id)
        else:
            arguments = await asyncio.to_thread(create_arguments, job, self.model, seed)
            task_id = await self._create(job, arguments)
            await self._checkpoint(checkpoint, job, {RESUME_TASK_ID: task_id, RESUME_SEED: seed})
        assert isinstance(task_id, str)
        task = await self._wait(job, task_id, progress, first_wait=not resumed)
        image = await self._download(job, task_id, getattr(task, "output", None) or [])
        cost = getattr(task, "cost", None)
        credits = getattr(cost, "credits", None)
        return GeneratedImage(
            image=image,
            seed=seed,
            cost=credits / 100 if isinstance(credits, int | float) else None,
        )

    async def _create(self, job: GenerationJob, arguments: dict[str, Any]) -> str:
        for attempt in range(CREATE_RETRIES + 1):
            delay: float | None = None
            try:
                created = await self._client.text_to_image.create(**arguments)
                log.info("job %s: Runway task %s created", job.job_id, created.id)
                return str(created.id)
            except runwayml.RateLimitError as exc:
                # Runway refused it: nothing was created, so it may be sent again.
                failure: runwayml.APIError = exc
                delay = _retry_after(exc.response)
            except runwayml.APIConnectionError as exc:
                if not never_sent(exc):
                    log.warning(
                        "job %s: Runway create failed after the request was sent (%s); not "
                        "retried, a task may exist at Runway",
                        job.job_id,
                        type(exc).__name__,
                    )
                    raise error_for_exception(exc) from None
                failure = exc
            except runwayml.APIStatusError as exc:
                log.warning(
                    "job %s: Runway refused the create: HTTP %s %s",
                    job.job_id,
                    exc.status_code,
                    exc.body,
                )
                raise error_for_exception(exc) from None
            if attempt == CREATE_RETRIES:
                break
            log.info("job %s: Runway create not accepted (%s); retrying", job.job_id, failure)
            await asyncio.sleep(delay if delay is not None else self._backoff(attempt))
        log.warning("job %s: Runway create failed: %s", job.job_id, failure)
        raise error_for_exception(failure)

    async def _checkpoint(
        self, checkpoint: CheckpointCallback, job: GenerationJob, data: Mapping[str, Any]
    ) -> None:
        try:
            result = checkpoint(job, data)
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                await result
        except Exception:
            # The task goes on; only a restart would lose track of it.
            log.exception("job %s: storing Runway task id %s failed", job.job_id, data)

    async def _wait(
        self, job: GenerationJob, task_id: str, progress: ProgressCallback, *, first_wait: bool
    ) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.task_timeout_s
        failures = 0
        reported = -1
        wait = self.poll_interval_s if first_wait else 0.0
        while True:
            if wait:
                await asyncio.sleep(wait)
            wait = self.poll_interval_s
            if loop.time() > deadline:
                log.warning("job %s: Runway task %s timed out; cancelling", job.job_id, task_id)
                await self._cancel(task_id)
                raise TASK_TIMEOUT_ERROR.build()
            try:
                task = await self._client.tasks.retrieve(task_id)
            except (
                runwayml.APIConnectionError,
                runwayml.RateLimitError,
                runwayml.InternalServerError,
            ) as exc:
                # A GET changes nothing at Runway: retry it, backing off.
                failures += 1
                log.warning("job %s: polling Runway task %s failed: %s", job.job_id, task_id, exc)
                if failures > POLL_RETRIES:
                    raise error_for_exception(exc) from None
                wait = self._backoff(failures)
                continue
            except runwayml.APIStatusError as exc:
                log.warning(
                    "job %s: polling Runway task %s: HTTP %s %s",
                    job.job_id,
                    task_id,
                    exc.status_code,
                    exc.body,
                )
                raise error_for_exception(exc) from None
            failures = 0
            status = getattr(task, "status", None)
            if status == "SUCCEEDED":
                return task
            if status == "FAILED":
                failure_code = getattr(task, "failure_code", None)
                log.warning(
                    "job %s: Runway task %s failed: %s (%s)",
                    job.job_id,
                    task_id,
                    getattr(task, "failure", ""),
                    failure_code,
                )
                raise error_for_failure(failure_code)
            if status == "CANCELLED":
                log.warning("job %s: Runway task %s was cancelled", job.job_id, task_id)
                raise CANCELLED_ERROR.build()
            if status == "RUNNING":
                fraction = getattr(task, "progress", None)
                if isinstance(fraction, int | float):
                    percent = min(99, max(0, int(fraction * 100)))
                    if percent != reported:
                        reported = percent
                        progress([job], percent)
            # PENDING and THROTTLED (queued over Runway's concurrency limit) just wait.

    async def _cancel(self, task_id: str) -> None:
        try:
            await self._client.tasks.delete(task_id)
        except runwayml.APIError as exc:
            log.warning("cancelling Runway task %s failed: %s", task_id, exc)

    async def _download(
        self, job: GenerationJob, task_id: str, output: Sequence[str]
    ) -> Image.Image:
        if not output:
            log.warning("job %s: Runway task %s succeeded without output", job.job_id, task_id)
            raise DOWNLOAD_ERROR.build()
        url = output[0]
        for attempt in range(DOWNLOAD_ATTEMPTS):
            try:
                data = await self._fetch(url)
                return await asyncio.to_thread(fit_output, data, job.width, job.height)
            except (httpx.HTTPError, _DownloadRefused) as exc:
                log.warning(
                    "job %s: downloading the output of Runway task %s failed: %r",
                    job.job_id,
                    task_id,
                    exc,
                )
                if isinstance(exc, _DownloadRefused) and not exc.transient:
                    break
                if attempt + 1 < DOWNLOAD_ATTEMPTS:
                    await asyncio.sleep(self._backoff(attempt))
        raise DOWNLOAD_ERROR.build()

    async def _fetch(self, url: str) -> bytes:
        async with self._http.stream("GET", url) as response:
            if response.status_code != 200:
                raise _DownloadRefused(
                    f"HTTP {response.status_code}", transient=response.status_code >= 500
                )
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body.extend(chunk)
                if len(body) > MAX_OUTPUT_BYTES:
                    raise _DownloadRefused("output larger than the limit", transient=False)
            return bytes(body)

    def _backoff(self, attempt: int) -> float:
        return float(min(MAX_BACKOFF_S, self.poll_interval_s * 2**attempt))


class _DownloadRefused(Exception):
    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    if seconds is None or not 0 <= seconds <= MAX_BACKOFF_S:
        return None
    return seconds
