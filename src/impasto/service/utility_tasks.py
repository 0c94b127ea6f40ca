"""The model-backed utility tasks (upscale, removeBackground, caption, promptEnhance): accepted
like imageInference (everything a client got wrong fails before anything is stored; then the
input image is stored, the task created, its job handed on), run on the utility engine, here
or on a worker that serves the model, and answered through the same task state machine:
sync replies, getResponse, webhooks and uploadEndpoint PUTs.

The stored request names the input by the UUID it was stored under, so a re-run after a
restart or a worker on another machine reads it from the image store.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

from impasto.backends.registry import ModelRegistry, ResolvedModel
from impasto.backends.utility.base import (
    BackgroundRequest,
    CaptionRequest,
    EnhanceRequest,
    UpscaleRequest,
    UtilityRequest,
)
from impasto.delivery.outbound import OutboundGuard
from impasto.engine.utility import UtilityEngine
from impasto.protocol.errors import (
    ConflictTaskUUID,
    ImpastoError,
    InferenceError,
    InvalidParameter,
    code_name,
)
from impasto.protocol.fields import MAX_RANDOM_SEED
from impasto.protocol.utility_tasks import (
    CANONICAL_TASK,
    UTILITY_TASK_MODELS,
    CaptionFields,
    ImageTaskFields,
    PromptEnhanceIn,
    RemoveBackgroundFields,
    UpscaleFields,
    UtilityTaskIn,
)
from impasto.service.acceptance import vet_destinations
from impasto.service.completion import TaskCompletion
from impasto.service.images import ImageInput, ImageResolver, storable, store_image
from impasto.service.utility_outcomes import Delivery, UtilityOutcomes
from impasto.state.base import JobQueue, QueuedJob, StateStore
from impasto.state.records import TaskRecord
from impasto.storage.base import ImageStore
from impasto.tenancy.keys import Principal

log = logging.getLogger("impasto.utility")

DEFAULT_UPSCALE_FACTOR = 2
_NAMES = {
    "upscale": "an upscaler",
    "removeBackground": "a background-removal model",
    "caption": "a captioning model",
    "promptEnhance": "a prompt enhancer",
}


@dataclass(frozen=True)
class UtilityDefaults:
    """The model each task type runs when it names none, and the upscale bound."""

    models: Mapping[str, str]
    upscale_max_side: int = 8192


def upscale_size(task: UpscaleFields, size: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """(the factor the model runs at, the output size): upscaleFactor, or for
    targetMegapixels the smallest factor that reaches it and the exact size it names."""
    width, height = size
    if task.targetMegapixels is None:
        factor = task.upscaleFactor or DEFAULT_UPSCALE_FACTOR
        return factor, (width * factor, height * factor)
    scale = math.sqrt(task.targetMegapixels * 1_000_000 / (width * height))
    if scale < 1:
        raise InvalidParameter(
            f"Invalid value for targetMegapixels parameter: the image is already "
            f"{width * height / 1e6:.2f} megapixels.",
            code="invalidTargetMegapixels",
            parameter="targetMegapixels",
        )
    factor = min(4, max(2, math.ceil(scale)))
    if scale > 4:
        raise InvalidParameter(
            "Invalid value for targetMegapixels parameter: more than 4x the image's size on "
            "each side.",
            code="invalidTargetMegapixels",
            parameter="targetMegapixels",
        )
    return factor, (max(1, round(width * scale)), max(1, round(height * scale)))


def background_request(task: RemoveBackgroundFields, image: Image.Image) -> BackgroundRequest:
    # compat: runware 0.5.24 spreads the settings over the task; the new SDKs nest them.
    source: Any = task.settings if task.settings is not None else task
    rgba = source.rgba
    return BackgroundRequest(
        image=image,
        return_only_mask=bool(source.returnOnlyMask),
        alpha_matting=bool(source.alphaMatting),
        foreground_threshold=_default(source.alphaMattingForegroundThreshold, 240),
        background_threshold=_default(source.alphaMattingBackgroundThreshold, 10),
        erode_size=_default(source.alphaMattingErodeSize, 10),
        post_process_mask=bool(source.postProcessMask),
        background=(rgba[0], rgba[1], rgba[2], rgba[3]) if rgba else None,
    )


def _default(value: int | None, default: int) -> int:
    return default if value is None else value


class UtilityService:
    """Accepts and runs the utility tasks."""

    def __init__(
        self,
        *,
        registry: ModelRegistry,
        state: StateStore,
        images: ImageStore,
        resolver: ImageResolver,
        engine: UtilityEngine,
        completion: TaskCompletion,
        outcomes: UtilityOutcomes,
        guard: OutboundGuard,
        defaults: UtilityDefaults,
        input_retention_s: int,
        unavailable: Mapping[str, ImpastoError] | None = None,
        queue: JobQueue | None = None,
    ) -> None:
        self._registry = registry
        self._state = state
        self._images = images
        self._resolver = resolver
        self._engine = engine
        self._completion = completion
        self._outcomes = outcomes
        self._guard = guard
        self._defaults = defaults
        self._input_retention_s = input_retention_s
        self._unavailable = dict(unavailable or {})
        # Set on API nodes of a distributed deployment: workers run the jobs.
        self._queue = queue
        self._running: set[asyncio.Task[None]] = set()

    def model_of(self, task: UtilityTaskIn) -> str:
        return task.model or self._defaults.models[CANONICAL_TASK[task.taskType]]

    def validate(self, task: UtilityTaskIn) -> ResolvedModel:
        """Everything that can be checked without I/O; raises an error item."""
        canonical = CANONICAL_TASK[task.taskType]
        resolved = self._registry.resolve(self.model_of(task))
        served = resolved.requested.utility_task
        if served != canonical:
            if served is not None:
                what = _NAMES[served]
            elif resolved.requested.is_asset:
                what = f"a {resolved.requested.category}"
            else:
                what = "an image-generation model"
            raise InvalidParameter(
                f"Model {resolved.requested.air} is {what}, not {_NAMES[canonical]}; the "
                "models of each task type are listed by modelSearch and `impasto models`.",
                code="invalidModel",
                parameter="model",
            )
        problem = self._unavailable.get(resolved.requested.air)
        if problem is not None:
            raise problem
        if isinstance(task, ImageTaskFields | CaptionFields) and task.image() is None:
            raise InvalidParameter(
                "Missing required parameter inputImage (or inputs.image): the image to "
                f"{'describe' if isinstance(task, CaptionFields) else 'process'}.",
                code="missingInputImage",
                parameter="inputImage",
            )
        if isinstance(task, ImageTaskFields) and task.inputImage and task.inputs is not None:
            raise InvalidParameter(
                "Invalid value for inputs parameter: the image is given as inputImage already; "
                "give one of inputImage and inputs.image.",
                code="invalidInputs",
                parameter="inputs",
            )
        if isinstance(task, UpscaleFields) and task.upscaleFactor and task.targetMegapixels:
            raise InvalidParameter(
                "Invalid value for targetMegapixels parameter: give upscaleFactor or "
                "targetMegapixels, not both.",
                code="invalidTargetMegapixels",
                parameter="targetMegapixels",
            )
        if isinstance(task, RemoveBackgroundFields) and task.settings and task.flat_settings():
            flat = task.flat_settings()[0]
            raise InvalidParameter(
                f"Invalid value for {flat} parameter: the task has settings; put {flat} in "
                "settings too.",
                code=f"invalid{code_name(flat)}",
                parameter=flat,
            )
        return resolved

    async def submit(self, task: UtilityTaskIn, principal: Principal | None = None) -> None:
        """Validate, store the input, persist and schedule; after this the task is accepted."""
        resolved = self.validate(task)
        if await self._state.get_task(task.taskUUID) is not None:
            raise ConflictTaskUUID(
                f"taskUUID {task.taskUUID} was already used; fetch its results with getResponse "
                "or send a new taskUUID.",
                parameter="taskUUID",
            )
        await vet_destinations(
            self._guard,
            [
                ("webhookURL", task.webhookURL),
                ("uploadEndpoint", getattr(task, "uploadEndpoint", None)),
            ],
        )
        owner = principal.owner if principal is not None and principal.owner else None
        request = task.model_dump(exclude_none=True)
        request["model"] = resolved.requested.air
        image_field = task.image() if isinstance(task, ImageTaskFields | CaptionFields) else None
        if image_field is not None:
            parameter, value = image_field
            source = await self._resolver.resolve(
                value,
                parameter=parameter,
                code=f"invalid{code_name(parameter.split('.')[-1].split('[')[0])}",
                owner=owner,
            )
            if isinstance(task, UpscaleFields):
                self._check_upscale(task, source.image.size)
            # The stored request names the input by UUID, in the field the client used.
            request.pop("inputImage", None)
            request.pop("inputImages", None)
            request.pop("inputs", None)
            request["inputImage"] = await self._store_input(task, source)
        extra: dict[str, Any] = {}
        if isinstance(task, PromptEnhanceIn):
            extra["seed"] = secrets.randbelow(MAX_RANDOM_SEED + 1)
        if principal is not None and not principal.anonymous:
            extra["owner"] = principal.owner
        if principal is not None:
            extra["keyId"], extra["keyName"] = principal.key_id, principal.name
        record = TaskRecord(
            task_uuid=task.taskUUID,
            task_type=task.taskType,
            model=resolved.requested.air,
            request=request,
            expected=task.promptVersions if isinstance(task, PromptEnhanceIn) else 1,
            created_at=time.time(),
            extra=extra,
        )
        await self._state.create_task(record)
        try:
            if self._queue is not None:
                await self._queue.put([QueuedJob(resolved.target.air, task.taskUUID, 0)])
            else:
                self._start(record)
        except Exception:
            log.exception("scheduling task %s failed", task.taskUUID)
            await self._fail(record, InferenceError("The task was accepted but not scheduled."))

    def _check_upscale(self, task: UpscaleFields, size: tuple[int, int]) -> None:
        _, (width, height) = upscale_size(task, size)
        limit = self._defaults.upscale_max_side
        if max(width, height) > limit:
            parameter = "targetMegapixels" if task.targetMegapixels else "upscaleFactor"
            raise InvalidParameter(
                f"Invalid value for {parameter} parameter: the {size[0]}x{size[1]} image would "
                f"become {width}x{height}, over {limit} px a side; upscale a smaller image.",
                code=f"invalid{code_name(parameter)}",
                parameter=parameter,
            )

    async def _store_input(self, task: UtilityTaskIn, source: ImageInput) -> str:
        if source.stored_uuid is not None:
            return source.stored_uuid
        image = await asyncio.to_thread(storable, source.image, source.data, source.format)
        image_uuid, _ = await store_image(
            self._images,
            self._state,
            image,
            kind="input",
            task_uuid=task.taskUUID,
            now=time.time(),
            retention_s=self._input_retention_s,
        )
        return image_uuid

    def _start(self, record: TaskRecord) -> None:
        running = asyncio.create_task(self.run(record), name=f"utility {record.task_uuid}")
        self._running.add(running)
        running.add_done_callback(self._running.discard)

    async def resume(self, record: TaskRecord) -> None:
        """After a restart: run again a task whose results were not stored."""
        self._start(record)

    async def run(self, record: TaskRecord) -> None:
        """Run an accepted task (again: what is stored already stays) and store its results;
        every failure ends the task with an error item."""
        if len(await self._state.results(record.task_uuid)) >= record.expected:
            await self._completion.maybe_finish(record.task_uuid)
            return
        try:
            task = UTILITY_TASK_MODELS[record.task_type].model_validate(record.request)
            assert isinstance(
                task, UpscaleFields | RemoveBackgroundFields | CaptionFields | PromptEnhanceIn
            )
            resolved = self._registry.resolve(record.model or self.model_of(task))
            image = await self._input(task)
            request, size = self._request(task, record, image)
            output = await self._engine.run(resolved.target.air, request)
            delivery = self._delivery(task, resolved, request)
            if isinstance(output, Image.Image):
                if size is not None and output.size != size:
                    output = output.resize(size, Image.Resampling.LANCZOS)
                await self._outcomes.image(delivery, output)
            else:
                await self._outcomes.texts(delivery, self._versions(output, record.expected))
        except asyncio.CancelledError:
            raise
        except ImpastoError as exc:
            await self._fail(record, exc)
        except Exception:
            log.exception("utility task %s failed", record.task_uuid)
            await self._fail(record, InferenceError("The task failed inside the server."))

    async def _input(self, task: UtilityTaskIn) -> Image.Image | None:
        if not isinstance(task, ImageTaskFields | CaptionFields) or task.inputImage is None:
            return None
        source = await self._resolver.resolve(
            task.inputImage, parameter="inputImage", code="invalidInputImage"
        )
        return source.image

    def _request(
        self, task: UtilityTaskIn, record: TaskRecord, image: Image.Image | None
    ) -> tuple[UtilityRequest, tuple[int, int] | None]:
        if isinstance(task, PromptEnhanceIn):
            seed = int(record.extra.get("seed") or 0)
            return EnhanceRequest(
                task.prompt, task.promptMaxLength, task.promptVersions, seed
            ), None
        assert image is not None
        rgb = image if image.mode == "RGB" else _on_white(image)
        if isinstance(task, UpscaleFields):
            factor, size = upscale_size(task, rgb.size)
            settings = task.settings
            return (
                UpscaleRequest(
                    rgb,
                    factor,
                    prompt=(settings.positivePrompt if settings else None) or "",
                    negative_prompt=settings.negativePrompt if settings else None,
                    steps=settings.steps if settings else None,
                    cfg_scale=settings.CFGScale if settings else None,
                    seed=settings.seed if settings else None,
                ),
                size,
            )
        if isinstance(task, RemoveBackgroundFields):
            return background_request(task, rgb), rgb.size
        return CaptionRequest(rgb, task.prompt), None

    def _delivery(
        self, task: UtilityTaskIn, resolved: ResolvedModel, request: UtilityRequest
    ) -> Delivery:
        size = request.image.size if not isinstance(request, EnhanceRequest) else (0, 0)
        common: dict[str, Any] = {
            "task_type": task.taskType,
            "task_uuid": task.taskUUID,
            "model": resolved.requested.air,
            "webhook_url": task.webhookURL,
            "cost": resolved.rules.price.cost(size),
            "include_cost": task.includeCost,
        }
        if isinstance(task, ImageTaskFields):
            return Delivery(
                **common,
                output_type=task.outputType,
                output_format=task.outputFormat,
                output_quality=task.outputQuality,
                ttl=task.ttl,
                upload_endpoint=task.uploadEndpoint,
            )
        return Delivery(**common)

    @staticmethod
    def _versions(texts: list[str], expected: int) -> list[str]:
        """Exactly `expected` texts: a model that found fewer distinct ones repeats them.

        compat: runware 0.5.24 and @runware/sdk-js wait for promptVersions items."""
        found = [t for t in texts if t]
        if not found:
            raise InferenceError("The model produced no text.")
        return [found[i % len(found)] for i in range(expected)]

    async def _fail(self, record: TaskRecord, error: ImpastoError) -> None:
        await self._completion.fail_missing(
            record.task_uuid,
            list(range(record.expected)),
            error.for_task(record.task_type, record.task_uuid),
        )

    async def close(self) -> None:
        for running in list(self._running):
            running.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)


def _on_white(image: Image.Image) -> Image.Image:
    """An RGB copy; transparent pixels become white."""
    rgba = image.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, (255, 255, 255))
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas
