"""ControlNet guide images from plain image algorithms: the preprocessors that need no model
weights, pure functions of PIL images (CPU, OpenCV and numpy; call them in a worker thread).
Each follows the ControlNet 1.1 annotator of that name, so a guide looks like what the
ControlNet models were trained on:

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

Transparent pixels read as white, and the input is resized to the guide's size before the
preprocessor runs, so a guide has one-pixel edges at the size asked for. The task around these
functions (parsing, storing, the reply) is service/preprocess.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from impasto.protocol.utility import DEFAULT_HIGH_THRESHOLD, DEFAULT_LOW_THRESHOLD

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
# The canonical names of the preprocessors that run here (ALIASES maps the others onto them).
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
