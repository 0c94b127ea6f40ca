"""ControlNet preprocessing (`imageControlNetPreProcess`, `controlNetPreprocess`): turn a client
image into a guide image, store both, and answer with guideImageUUID, inputImageUUID and the
guide in the requested output type. The guide is stored like a generated image (a URL and the
output retention, or `ttl`), so its UUID works as a controlNet guideImage or any other image
input; the input is stored like an upload (its UUID is the input's own when it was one of ours).

Only preprocessors that are plain image algorithms run here (canny, tile_gaussian alias tile,
shuffle, lineart_standard, scribble_xdog: see service/guides.py), on the CPU in a worker
thread. Depth, pose, segmentation, normal maps, HED/PiDiNet soft edges, M-LSD and learned line
art need trained networks and are refused (unsupportedParameter), as is any unknown name
(invalidPreProcessorType / invalidModel); both errors list what runs. `width`/`height` resize
the input (the other side follows the aspect ratio when only one is given) before the
preprocessor runs, so the guide has exactly that size and one-pixel edges at it.

compat: @runware/sdk-js sends this task with deliveryMethod "async" and polls getResponse. The
work takes milliseconds, so it is done before the acknowledgement goes out: the first poll
finds the result.
"""

from __future__ import annotations

import asyncio
import importlib.util
from dataclasses import dataclass
from typing import Any

from PIL import Image

from impasto.delivery.codecs import EncodedImage, encode_image, fit_within
from impasto.protocol.errors import InvalidParameter, ModelNotFound, UnsupportedParameter
from impasto.protocol.results import ack_item
from impasto.protocol.rules import code_name
from impasto.protocol.utility import (
    DEFAULT_HIGH_THRESHOLD,
    DEFAULT_LOW_THRESHOLD,
    MAX_GUIDE_SIDE,
    PREPROCESSOR_AIR_PREFIX,
    PREPROCESSOR_AIRS,
    PREPROCESSORS,
    WEIGHTED_PREPROCESSORS,
    ControlNetPreprocessIn,
    ImageControlNetPreProcessIn,
    PreprocessIn,
    guide_image_item,
)
from impasto.service.guides import (
    ALIASES,
    SUPPORTED,
    PreprocessOptions,
    guide_size,
    run_preprocessor,
)
from impasto.service.images import ImageInput, ImageResolver, StorableImage, store_image
from impasto.service.uploads import UploadService
from impasto.state.base import StateStore
from impasto.storage.base import ImageStore


@dataclass(frozen=True)
class PreprocessJob:
    """One preprocessing task, whichever form the client sent it in."""

    task_type: str
    task_uuid: str
    image: str
    image_parameter: str
    image_code: str
    preprocessor: str
    preprocessor_parameter: str
    width: int | None
    height: int | None
    options: PreprocessOptions
    output_type: str
    output_format: str
    output_quality: int
    ttl: int | None
    include_cost: bool
    asynchronous: bool


_FLAT_FIELDS = (
    "inputImage",
    "preProcessorType",
    "lowThresholdCanny",
    "highThresholdCanny",
    "includeHandsAndFaceOpenPose",
)


def preprocess_job(task: PreprocessIn) -> PreprocessJob:
    """The job a task asks for, or the error item of what is missing or wrong in it."""
    if isinstance(task, ImageControlNetPreProcessIn):
        return _job(
            task,
            image=(task.inputImage, "inputImage"),
            preprocessor=preprocessor_of(task.preProcessorType, "preProcessorType"),
            thresholds=(task.lowThresholdCanny, task.highThresholdCanny, ""),
        )
    flat = [name for name in _FLAT_FIELDS if getattr(task, name) is not None]
    new = [name for name in ("model", "inputs", "settings") if getattr(task, name) is not None]
    if flat and new:
        raise InvalidParameter(
            f"Invalid value for {flat[0]} parameter: the task names its preprocessor with "
            f"{new[0]}; give either model, inputs.image and settings, or the flat "
            "inputImage, preProcessorType and thresholds, not both.",
            code=f"invalid{code_name(flat[0])}",
            parameter=flat[0],
        )
    if flat:
        return _flat_job(task)
    if task.model is None:
        raise InvalidParameter(
            f"Missing required parameter model (a preprocessor such as {PREPROCESSOR_AIRS[0]}).",
            code="missingModel",
            parameter="model",
        )
    if task.inputs is None:
        raise InvalidParameter(
            "Missing required parameter inputs (inputs.image: the image to preprocess).",
            code="missingInputs",
            parameter="inputs",
        )
    settings = task.settings
    return _job(
        task,
        image=(task.inputs.image, "inputs.image"),
        preprocessor=preprocessor_of_model(task.model),
        thresholds=(
            settings.lowThresholdCanny if settings else None,
            settings.highThresholdCanny if settings else None,
            "settings.",
        ),
    )


def _flat_job(task: ControlNetPreprocessIn) -> PreprocessJob:
    if task.inputImage is None:
        raise InvalidParameter(
            "Missing required parameter inputImage.",
            code="missingInputImage",
            parameter="inputImage",
        )
    if task.preProcessorType is None:
        raise InvalidParameter(
            "Missing required parameter preProcessorType.",
            code="missingPreProcessorType",
            parameter="preProcessorType",
        )
    return _job(
        task,
        image=(task.inputImage, "inputImage"),
        preprocessor=preprocessor_of(task.preProcessorType, "preProcessorType"),
        thresholds=(task.lowThresholdCanny, task.highThresholdCanny, ""),
    )


def _job(
    task: PreprocessIn,
    *,
    image: tuple[str, str],
    preprocessor: tuple[str, str],
    thresholds: tuple[int | None, int | None, str],
) -> PreprocessJob:
    low, high, prefix = thresholds
    options = PreprocessOptions(
        DEFAULT_LOW_THRESHOLD if low is None else low,
        DEFAULT_HIGH_THRESHOLD if high is None else high,
    )
    if options.low_threshold > options.high_threshold:
        raise InvalidParameter(
            f"Invalid value for {prefix}lowThresholdCanny parameter: {options.low_threshold} is "
            f"above highThresholdCanny ({options.high_threshold}).",
            code="invalidLowThresholdCanny",
            parameter=f"{prefix}lowThresholdCanny",
        )
    value, parameter = image
    # Errors inside `inputs` are named for the input, as imageInference's are.
    code = f"invalid{code_name(parameter.rsplit('.', 1)[-1])}"
    return PreprocessJob(
        task_type=task.taskType,
        task_uuid=task.taskUUID,
        image=value,
        image_parameter=parameter,
        image_code=code,
        preprocessor=preprocessor[0],
        preprocessor_parameter=preprocessor[1],
        width=task.width,
        height=task.height,
        options=options,
        output_type=task.outputType,
        output_format=task.outputFormat,
        output_quality=task.outputQuality,
        ttl=task.ttl,
        include_cost=task.includeCost,
        asynchronous=task.deliveryMethod == "async",
    )


def preprocessor_of(name: str, parameter: str) -> tuple[str, str]:
    """(The supported preprocessor a legacy name stands for, the parameter it came in)."""
    canonical = ALIASES.get(name, name)
    if canonical in SUPPORTED:
        return canonical, parameter
    supported = ", ".join(PREPROCESSORS)
    if name in WEIGHTED_PREPROCESSORS:
        raise UnsupportedParameter(
            f"Preprocessor {name!r} needs a trained model, which impasto does not run; "
            f"{parameter} may be one of: {supported}.",
            parameter=parameter,
        )
    raise InvalidParameter(
        f"Invalid value for {parameter} parameter: unknown preprocessor {name!r}; "
        f"supported: {supported}.",
        code=f"invalid{code_name(parameter)}",
        parameter=parameter,
    )


def preprocessor_of_model(air: str) -> tuple[str, str]:
    """The preprocessor a `runware:controlnet-preprocess@<name>` AIR stands for."""
    supported = ", ".join(PREPROCESSOR_AIRS)
    name = air.removeprefix(PREPROCESSOR_AIR_PREFIX).replace("-", "_")
    if air.startswith(PREPROCESSOR_AIR_PREFIX) and ALIASES.get(name, name) in SUPPORTED:
        return ALIASES.get(name, name), "model"
    if air.startswith(PREPROCESSOR_AIR_PREFIX) and name in WEIGHTED_PREPROCESSORS:
        raise UnsupportedParameter(
            f"Preprocessor {air} needs a trained model, which impasto does not run; model may "
            f"be one of: {supported}.",
            parameter="model",
        )
    raise ModelNotFound(
        f"Invalid value for model parameter: {air!r} is not a ControlNet preprocessor that "
        f"runs here; supported: {supported}.",
        parameter="model",
    )


class PreprocessService:
    """Runs ControlNet preprocessing tasks: one guide image each, stored with its input."""

    def __init__(
        self,
        *,
        state: StateStore,
        images: ImageStore,
        resolver: ImageResolver,
        uploads: UploadService,
        image_base_url: str,
        output_retention_s: int,
    ) -> None:
        self._state = state
        self._images = images
        self._resolver = resolver
        self._uploads = uploads
        self._image_base_url = image_base_url
        self._output_retention_s = output_retention_s

    async def run(self, task: PreprocessIn, owner: str | None = None) -> dict[str, Any]:
        """The reply item: the guide image, or the acknowledgement of an async task."""
        job = preprocess_job(task)
        if importlib.util.find_spec("cv2") is None:
            raise UnsupportedParameter(
                "ControlNet preprocessing needs OpenCV (the opencv-python-headless package), "
                "which this server does not have.",
                parameter=job.preprocessor_parameter,
            )
        await self._uploads.ensure_unused(job.task_uuid)
        source = await self._resolver.resolve(
            job.image, parameter=job.image_parameter, code=job.image_code, owner=owner
        )
        guide = await asyncio.to_thread(self._guide, job, source.image)
        stored_input = None if source.stored_uuid else await self._uploads.prepare(source)

        async def work(now: float) -> dict[str, Any]:
            return await self._store(job, source, stored_input, guide, now)

        item = await self._uploads.run_once(
            job.task_type,
            job.task_uuid,
            owner,
            work,
            failure="The guide image could not be stored.",
        )
        return ack_item(job.task_type, job.task_uuid) if job.asynchronous else item

    def _guide(self, job: PreprocessJob, image: Image.Image) -> EncodedImage:
        # The input as it is stored (within the upload limit) is what the guide is made from,
        # so a guide without width/height has the size of its inputImageUUID.
        working = fit_within(image, self._uploads.max_side)
        size = guide_size(working.size, job.width, job.height)
        if max(size) > MAX_GUIDE_SIDE:
            given = "width" if job.width is not None else "height"
            raise InvalidParameter(
                f"Invalid value for {given} parameter: keeping the input's aspect ratio gives a "
                f"{size[0]}x{size[1]} guide, over {MAX_GUIDE_SIDE} px; give width and height.",
                code=f"invalid{code_name(given)}",
                parameter=given,
            )
        guide = run_preprocessor(job.preprocessor, working, size, job.options)
        return encode_image(guide, job.output_format, job.output_quality)

    async def _store(
        self,
        job: PreprocessJob,
        source: ImageInput,
        stored_input: StorableImage | None,
        guide: EncodedImage,
        now: float,
    ) -> dict[str, Any]:
        if stored_input is None:
            assert source.stored_uuid is not None
            input_uuid = source.stored_uuid
        else:
            input_uuid = (await self._uploads.store(stored_input, job.task_uuid, now)).image_uuid
        retention_s = job.ttl or self._output_retention_s
        encoded = guide
        guide_uuid, key = await store_image(
            self._images,
            self._state,
            StorableImage(
                encoded.data,
                encoded.extension,
                encoded.content_type,
                encoded.width,
                encoded.height,
            ),
            kind="output",
            task_uuid=job.task_uuid,
            now=now,
            retention_s=retention_s,
        )
        url = self._images.direct_url(key, now + retention_s)
        return guide_image_item(
            task_type=job.task_type,
            task_uuid=job.task_uuid,
            guide_uuid=guide_uuid,
            input_uuid=input_uuid,
            output_type=job.output_type,
            data=encoded.data,
            content_type=encoded.content_type,
            url=url or f"{self._image_base_url}/image/{key}",
            # Local work: nothing is charged.
            cost=0.0 if job.include_cost else None,
        )
