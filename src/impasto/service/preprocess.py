"""ControlNet preprocessing (`imageControlNetPreProcess`, `controlNetPreprocess`): turn a client
image into a guide image, store both, and answer with guideImageUUID, inputImageUUID and the
guide in the requested output type. The guide is stored like a generated image (a URL and the
output retention, or `ttl`), so its UUID works as a controlNet guideImage or any other image
input; the input is stored like an upload (its UUID is the input's own when it was one of ours).

Only preprocessors that are plain image algorithms run here: no model weights, CPU, OpenCV and
numpy, in a worker thread. Each follows the ControlNet 1.1 annotator of that name, so a guide
looks like what the ControlNet models were trained on:

- `canny`: `cv2.Canny` on the RGB image (gradient of the strongest channel, 3x3 Sobel, L1
  norm), thresholds default 100/200 (ControlNet's annotator and Runware's recommendation).
- `tile_gaussian` (alias `tile`): a Gaussian pyramid round trip, the tile preprocessor of
  controlnet_aux: area-downscale by 8, then three `cv2.pyrUp` steps (each a 2x upsample
  smoothed with a 5x5 Gaussian). Fine detail goes, layout and colour stay.
- `shuffle`: controlnet_aux's content shuffle: the image is resampled (`cv2.remap`) through
  two smooth random fields (uniform noise on a coarse grid, bicubically upscaled), which keeps
  colours and textures and scrambles their layout. The noise has a fixed seed, so the same
  input gives the same guide; the grid is one cell per half of the long side, as the
  annotator's 256 px cells are at its 512 px working size.
- `lineart_standard`: sd-webui-controlnet's weight-free line art: how much darker each pixel
  is than a Gaussian blur of the image (sigma 6 px), the darkest channel, normalised by the
  median of the clear lines; white lines on black.
- `scribble_xdog`: sd-webui-controlnet's XDoG scribble: a difference of Gaussians (sigma 0.5
  and 5 px) thresholded at 32, white strokes on black.

Depth, pose, segmentation, normal maps, HED/PiDiNet soft edges, M-LSD and learned line art need
trained networks and are refused (unsupportedParameter), as is any unknown name
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
from impasto.service.images import ImageInput, ImageResolver, StorableImage, store_image
from impasto.service.uploads import UploadService
from impasto.state.base import StateStore
from impasto.storage.base import ImageStore

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Pixels = npt.NDArray[np.uint8]

ALIASES = {"tile": "tile_gaussian"}
# The content shuffle's noise seed: fixed, so a guide can be made again.
SHUFFLE_SEED = 0
_TILE_LEVELS = 3
_LINEART_SIGMA = 6.0
_XDOG_SIGMAS = (0.5, 5.0)
_XDOG_THRESHOLD = 32


@dataclass(frozen=True)
class PreprocessOptions:
    """The settings a preprocessor may read (the others ignore them, as Runware's do)."""

    low_threshold: int = DEFAULT_LOW_THRESHOLD
    high_threshold: int = DEFAULT_HIGH_THRESHOLD


# -- the preprocessors: pure functions of PIL images --------------------------------------------


def canny(
    image: Image.Image, low_threshold: int | None = None, high_threshold: int | None = None
) -> Image.Image:
    """Canny edges, white on black, the size of `image`."""
    import cv2

    low = DEFAULT_LOW_THRESHOLD if low_threshold is None else low_threshold
    high = DEFAULT_HIGH_THRESHOLD if high_threshold is None else high_threshold
    return _image(cv2.Canny(_pixels(image), low, high))


def tile_gaussian(image: Image.Image) -> Image.Image:
    """The Gaussian-pyramid tile guide: detail removed, layout and colour kept."""
    import cv2

    pixels = _pixels(image)
    height, width = pixels.shape[:2]
    step = 2**_TILE_LEVELS
    small = cv2.resize(
        pixels, (max(1, width // step), max(1, height // step)), interpolation=cv2.INTER_AREA
    )
    for _ in range(_TILE_LEVELS):
        small = cv2.pyrUp(small)
    if small.shape[:2] != (height, width):
        small = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    return _image(small)


def shuffle(image: Image.Image, seed: int = SHUFFLE_SEED) -> Image.Image:
    """Content shuffle: the image resampled through a smooth random warp."""
    import cv2
    import numpy as np

    pixels = _pixels(image)
    height, width = pixels.shape[:2]
    cell = max(8, max(height, width) // 2)
    rng = np.random.default_rng(seed)
    x = (_noise_field(height, width, cell, rng) * float(width - 1)).astype(np.float32)
    y = (_noise_field(height, width, cell, rng) * float(height - 1)).astype(np.float32)
    return _image(cv2.remap(pixels, x, y, cv2.INTER_LINEAR))


def lineart_standard(image: Image.Image) -> Image.Image:
    """Weight-free line art: darker-than-surroundings, white lines on black."""
    import cv2
    import numpy as np

    x = _pixels(image).astype(np.float32)
    blurred = cv2.GaussianBlur(x, (0, 0), _LINEART_SIGMA)
    intensity = np.min(blurred - x, axis=2).clip(0, 255)
    lines = intensity[intensity > 8]
    scale = max(16.0, float(np.median(lines))) if lines.size else 16.0
    return _image((intensity / scale * 127).clip(0, 255).astype(np.uint8))


def scribble_xdog(image: Image.Image) -> Image.Image:
    """XDoG scribble: strong edges as white strokes on black."""
    import cv2
    import numpy as np

    x = _pixels(image).astype(np.float32)
    fine = cv2.GaussianBlur(x, (0, 0), _XDOG_SIGMAS[0])
    coarse = cv2.GaussianBlur(x, (0, 0), _XDOG_SIGMAS[1])
    dog = (255 - np.min(coarse - fine, axis=2)).clip(0, 255)
    # In int arithmetic: the annotator's uint8 `2 * (255 - dog)` wraps around past 127.
    strokes = 2 * (255 - dog.astype(np.int32)) > _XDOG_THRESHOLD
    return _image(np.where(strokes, 255, 0).astype(np.uint8))


_RUNS: dict[str, Callable[[Image.Image, PreprocessOptions], Image.Image]] = {
    "canny": lambda image, options: canny(image, options.low_threshold, options.high_threshold),
    "tile_gaussian": lambda image, options: tile_gaussian(image),
    "shuffle": lambda image, options: shuffle(image),
    "lineart_standard": lambda image, options: lineart_standard(image),
    "scribble_xdog": lambda image, options: scribble_xdog(image),
}
SUPPORTED = tuple(_RUNS)


def run_preprocessor(
    name: str,
    image: Image.Image,
    size: tuple[int, int] | None = None,
    options: PreprocessOptions | None = None,
) -> Image.Image:
    """The guide image of preprocessor `name` (a supported one), at `size` (default: the
    image's own). CPU work: call it in a thread."""
    run = _RUNS[ALIASES.get(name, name)]
    flat = _flatten(image)
    if size is not None and flat.size != size:
        flat = flat.resize(size, Image.Resampling.LANCZOS)
    return run(flat, options or PreprocessOptions())


def guide_size(size: tuple[int, int], width: int | None, height: int | None) -> tuple[int, int]:
    """The guide's size: width and height as given, the missing one by the aspect ratio."""
    source_width, source_height = size
    if width is not None and height is not None:
        return width, height
    if width is not None:
        return width, max(1, round(source_height * width / source_width))
    if height is not None:
        return max(1, round(source_width * height / source_height)), height
    return size


def _flatten(image: Image.Image) -> Image.Image:
    # Transparent pixels read as white, as ControlNet's annotators composite them (HWC3).
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _pixels(image: Image.Image) -> Pixels:
    import numpy as np

    return np.array(_flatten(image), dtype=np.uint8)


def _image(pixels: Any) -> Image.Image:
    import numpy as np

    array = np.asarray(pixels, dtype=np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def _noise_field(height: int, width: int, cell: int, rng: np.random.Generator) -> Any:
    """Uniform noise on a grid of `cell`-pixel cells, bicubically upscaled and cropped to the
    image, spread to 0..1 (controlnet_aux `make_noise_disk`)."""
    import cv2

    coarse = rng.uniform(0.0, 1.0, size=(height // cell + 2, width // cell + 2))
    field = cv2.resize(
        coarse, (width + 2 * cell, height + 2 * cell), interpolation=cv2.INTER_CUBIC
    )[cell : cell + height, cell : cell + width]
    field -= field.min()
    top = float(field.max())
    return field / top if top > 0 else field


# -- the task --------------------------------------------------------------------------------


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
    if canonical in _RUNS:
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
    if air.startswith(PREPROCESSOR_AIR_PREFIX) and ALIASES.get(name, name) in _RUNS:
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
            job.image, parameter=job.image_parameter, code=job.image_code
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
