"""The image geometry of img2img, inpainting and outpainting: pure functions on PIL images that
the diffusers backend calls before and after a pipeline call. Pillow and numpy only.

Conventions, chosen to match what users of Automatic1111 and of Runware expect:

- A seed image of another size is scaled to *cover* the requested output (aspect ratio kept,
  LANCZOS), then center-cropped, as A1111's "crop and resize" does. Stretching distorts faces,
  and letterboxing would hand the model borders it never saw in training. `fit_mask` uses the
  same source rectangle, so a mask stays aligned with its seed image pixel for pixel.
- Masks are white (255) = repaint and black (0) = keep, as in Runware's `maskImage` and A1111's
  "inpaint masked". Grey levels are kept, not thresholded: `blend_back` uses them as a soft
  edge, and pipelines that want a hard mask binarize it themselves (diffusers' inpainting
  pipelines do, at 0.5). A mask with transparency is read as if composited over black (its
  luminance times its alpha), so a white brush stroke on a transparent layer means "repaint the
  stroke" whatever colour the editor stored under alpha 0; an opaque mask reads as its plain
  ITU-R 601 luminance.
- Pipelines re-encode the whole image through the VAE, which shifts even the pixels that the
  mask keeps. `blend_back` puts the original back: bit-identical where the mask is 0, the
  generated pixel where it is 255, linear in between with integer rounding.
- Runware's `maskMargin` ("extra context pixels around the masked region") is A1111's "inpaint
  only masked" with its padding: `masked_region` is the mask's bounding box grown by the margin,
  `crop_for_inpaint` scales that crop to the model's working size so that a small region is
  repainted at the model's full resolution, and `paste_back` scales the result back into the
  box and blends it into the original with the mask.
- Runware's `outpaint` (pixels to add on each side, and a `blur` for the seam) becomes an
  inpainting job: `outpaint_canvas` makes the larger canvas, the seed image at (left, top) and
  its edge pixels stretched outward as a start for the new area, and a mask that is white on the
  new area, black on the original, and feathered *into* the original by `blur` pixels only, so
  that with blur 0 every original pixel is kept exactly. The wire ranges (e.g. blur 0-32) are
  the protocol layer's to check; here sides and blur need only be non-negative.

Boxes are PIL's `(left, top, right, bottom)` with right and bottom exclusive.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

Box = tuple[int, int, int, int]

# The latent grid of SD-family VAEs is 1/8 of the pixel grid.
LATENT_MULTIPLE = 8

_LANCZOS = Image.Resampling.LANCZOS
_BILINEAR = Image.Resampling.BILINEAR


def round_to_multiple(value: float, multiple: int = LATENT_MULTIPLE) -> int:
    """`value` rounded to the nearest multiple of `multiple`, and never below `multiple`."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    return max(multiple, math.floor(value / multiple + 0.5) * multiple)


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """The seed image as an RGB `width` x `height` image: scaled to cover, then center-cropped."""
    rgb = image.convert("RGB")  # a copy, even of an RGB image
    if rgb.size == (width, height):
        return rgb
    return rgb.resize((width, height), _LANCZOS, box=_cover_box(rgb.size, width, height))


def fit_mask(mask: Image.Image, width: int, height: int) -> Image.Image:
    """The mask as an "L" `width` x `height` image, cropped exactly as `fit_image` crops."""
    grey = mask_to_l(mask)
    if grey.size == (width, height):
        return grey
    # Bilinear keeps a hard mask hard inside and out and leaves grey only along its edge.
    return grey.resize((width, height), _BILINEAR, box=_cover_box(grey.size, width, height))


def _cover_box(size: tuple[int, int], width: int, height: int) -> tuple[float, float, float, float]:
    """The centered source rectangle of aspect `width`:`height` that is as large as fits."""
    if width < 1 or height < 1:
        raise ValueError(f"the output size must be positive, got {width}x{height}")
    source_w, source_h = size
    if source_w * height > source_h * width:  # the source is wider: crop its sides
        crop_w = source_h * width / height
        x0 = (source_w - crop_w) / 2
        return (x0, 0.0, x0 + crop_w, float(source_h))
    crop_h = source_w * height / width
    y0 = (source_h - crop_h) / 2
    return (0.0, y0, float(source_w), y0 + crop_h)


def mask_to_l(mask: Image.Image) -> Image.Image:
    """Any mask (RGBA, RGB, L, 1, P, ...) as a new "L" image: 255 = repaint, 0 = keep."""
    if mask.mode == "L":
        return mask.copy()
    if not mask.has_transparency_data:
        return mask.convert("L")
    rgba = mask.convert("RGBA")
    luminance = _u32(rgba.convert("RGB").convert("L"))
    alpha = _u32(rgba.getchannel("A"))
    return Image.fromarray(((luminance * alpha + 127) // 255).astype(np.uint8))


def is_blank(mask: Image.Image) -> bool:
    """Whether the mask asks for nothing to be repainted (every pixel reads as 0)."""
    return mask_to_l(mask).getbbox() is None


def blend_back(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """`original` where the mask is 0, `generated` where it is 255, linear in between (RGB)."""
    if not generated.size == original.size == mask.size:
        raise ValueError(
            "blend_back needs images and mask of one size, got "
            f"{generated.size}, {original.size} and {mask.size}"
        )
    new = _u32(generated.convert("RGB"))
    old = _u32(original.convert("RGB"))
    alpha = _u32(mask_to_l(mask))[..., np.newaxis]
    # (x * 255 + 127) // 255 == x, so a 0 (or 255) mask gives back the exact input pixel.
    blended = (new * alpha + old * (255 - alpha) + 127) // 255
    return Image.fromarray(blended.astype(np.uint8))


def masked_region(mask: Image.Image, margin: int, multiple: int = LATENT_MULTIPLE) -> Box | None:
    """The box to inpaint for `maskMargin`: the mask's bounding box grown by `margin` on each
    side, clamped to the image, then grown (inside the image) to sides that are multiples of
    `multiple`; a side that cannot be takes the image's full extent. None for a blank mask."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    grey = mask_to_l(mask)
    bbox = grey.getbbox()
    if bbox is None:
        return None
    width, height = grey.size
    left, top, right, bottom = bbox
    left, right = _aligned_span(max(0, left - margin), min(width, right + margin), width, multiple)
    top, bottom = _aligned_span(
        max(0, top - margin), min(height, bottom + margin), height, multiple
    )
    return (left, top, right, bottom)


def _aligned_span(low: int, high: int, limit: int, multiple: int) -> tuple[int, int]:
    """[low, high) grown about its center to a multiple of `multiple`, shifted to fit [0, limit)."""
    target = -(-(high - low) // multiple) * multiple
    if target > limit:
        return 0, limit
    start = low - (target - (high - low)) // 2
    start = min(max(0, start), limit - target)
    return start, start + target


def working_size(
    box: Box, width: int, height: int, multiple: int = LATENT_MULTIPLE
) -> tuple[int, int]:
    """The size to run the model at for crop `box`: the crop's aspect ratio, as large as fits in
    `width` x `height`, each side rounded to a multiple of `multiple`."""
    if width < 1 or height < 1:
        raise ValueError(f"the working size must be positive, got {width}x{height}")
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    if crop_w < 1 or crop_h < 1:
        raise ValueError(f"empty box {box}")
    scale = min(width / crop_w, height / crop_h)
    # Rounding to the nearest multiple may not overshoot a limit that is itself a multiple.
    max_w = max(multiple, width // multiple * multiple)
    max_h = max(multiple, height // multiple * multiple)
    return (
        min(max_w, round_to_multiple(crop_w * scale, multiple)),
        min(max_h, round_to_multiple(crop_h * scale, multiple)),
    )


def crop_for_inpaint(
    image: Image.Image,
    mask: Image.Image,
    box: Box,
    width: int,
    height: int,
    multiple: int = LATENT_MULTIPLE,
) -> tuple[Image.Image, Image.Image]:
    """The RGB image and "L" mask inside `box`, scaled to `working_size(box, width, height)`."""
    if mask.size != image.size:
        raise ValueError(f"mask size {mask.size} differs from image size {image.size}")
    _check_box(box, image.size)
    size = working_size(box, width, height, multiple)
    return (
        image.convert("RGB").resize(size, _LANCZOS, box=box),
        mask_to_l(mask).resize(size, _BILINEAR, box=box),
    )


def paste_back(
    full_original: Image.Image, generated_crop: Image.Image, mask: Image.Image, box: Box
) -> Image.Image:
    """`generated_crop` scaled back into `box` and blended into `full_original` with the full-size
    mask: the result equals `full_original` wherever the mask is 0 and everywhere outside `box`."""
    if mask.size != full_original.size:
        raise ValueError(f"mask size {mask.size} differs from image size {full_original.size}")
    _check_box(box, full_original.size)
    original = full_original.convert("RGB")
    patch = generated_crop.convert("RGB")
    box_size = (box[2] - box[0], box[3] - box[1])
    if patch.size != box_size:
        patch = patch.resize(box_size, _LANCZOS)
    generated = original.copy()
    generated.paste(patch, box[:2])
    return blend_back(generated, original, mask)


def _check_box(box: Box, size: tuple[int, int]) -> None:
    left, top, right, bottom = box
    if not (0 <= left < right <= size[0] and 0 <= top < bottom <= size[1]):
        raise ValueError(f"box {box} is empty or outside an image of size {size}")


def outpaint_canvas(
    image: Image.Image, top: int, right: int, bottom: int, left: int, blur: int = 0
) -> tuple[Image.Image, Image.Image]:
    """The (RGB canvas, "L" mask) of an outpaint job, both (w + left + right) x (h + top + bottom):
    the seed image at (left, top) with its edge pixels stretched over the new area, and a mask
    that is 255 on the new area, 0 on the original, and ramps down over the `blur` original
    pixels next to each extended side."""
    for name, value in (("top", top), ("right", right), ("bottom", bottom), ("left", left)):
        if value < 0:
            raise ValueError(f"outpaint {name} must be >= 0, got {value}")
    if blur < 0:
        raise ValueError(f"outpaint blur must be >= 0, got {blur}")
    pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    # Stretched edges give img2img-style pipelines colours that continue the seed image; an
    # inpainting model mostly repaints the area anyway.
    canvas = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    mask[top : top + height, left : left + width] = _inward_feather(
        width, height, top, right, bottom, left, blur
    )
    return Image.fromarray(canvas), Image.fromarray(mask)


def _inward_feather(
    width: int, height: int, top: int, right: int, bottom: int, left: int, blur: int
) -> NDArray[np.uint8]:
    """The mask over the original area: 255 * (blur + 1 - d) / (blur + 1) at distance d (1 for
    the pixels touching an extended side) from the new area, 0 beyond `blur`."""
    far = blur + 1
    xs = np.arange(width)
    ys = np.arange(height)
    dx = np.full(width, far)
    dy = np.full(height, far)
    if left:
        dx = np.minimum(dx, xs + 1)
    if right:
        dx = np.minimum(dx, width - xs)
    if top:
        dy = np.minimum(dy, ys + 1)
    if bottom:
        dy = np.minimum(dy, height - ys)
    distance = np.minimum(dy[:, np.newaxis], dx[np.newaxis, :])
    ramp = ((far - distance) * 255 + far // 2) // far
    return np.where(distance <= blur, ramp, 0).astype(np.uint8)


def _u32(image: Image.Image) -> NDArray[Any]:
    return np.asarray(image, dtype=np.uint32)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """The middle `width` x `height` of an image at least that large."""
    if image.size == (width, height):
        return image
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))
