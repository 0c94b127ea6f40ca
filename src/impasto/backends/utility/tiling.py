"""Upscaling an image in overlapping tiles, so that a model's memory use stays bounded by the
tile size rather than the image size.

Each tile's output is blended into the result with weights that ramp linearly across the
overlap with its neighbours: where two tiles meet, one fades out exactly as the other fades in,
so differences between them (a model sees different context at a tile's edge) leave no seam.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

# (left, top, right, bottom) in input pixels, as PIL's crop takes it.
Box = tuple[int, int, int, int]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of side `tile` start along an axis of `length` px, `overlap` px apart;
    the last one is moved back to end at the edge (overlapping its neighbour more)."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"a tile of {tile} px cannot overlap by {overlap} px")
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = [0]
    while starts[-1] + tile < length:
        starts.append(min(starts[-1] + stride, length - tile))
    return starts


def tile_grid(width: int, height: int, tile: int, overlap: int) -> list[Box]:
    """The tiles covering a `width` x `height` image, row by row."""
    tile_w, tile_h = min(tile, width), min(tile, height)
    return [
        (left, top, left + tile_w, top + tile_h)
        for top in tile_starts(height, tile, overlap)
        for left in tile_starts(width, tile, overlap)
    ]


def _ramp(size: int, width: int, fade_in: bool, fade_out: bool) -> np.ndarray:
    """Weights along one axis of a tile's output: 1 inside, rising over `width` px at an edge
    shared with a neighbour. Never 0, so every output pixel has some weight."""
    weights = np.ones(size, dtype=np.float32)
    width = min(width, size)
    if width > 0:
        # Complementary halves of a pixel-centred ramp: a fade-out and the neighbour's fade-in
        # over the same pixels sum to exactly 1.
        rising = (np.arange(width, dtype=np.float32) + 0.5) / width
        if fade_in:
            weights[:width] = np.minimum(weights[:width], rising)
        if fade_out:
            weights[size - width :] = np.minimum(weights[size - width :], rising[::-1])
    return weights


def upscale_tiled(
    image: Image.Image,
    scale: int,
    run_tile: Callable[[Image.Image], Image.Image],
    tile: int,
    overlap: int,
) -> Image.Image:
    """Upscale `image` (RGB) `scale` times with `run_tile`, which takes a crop and returns it
    `scale` times larger, in tiles of `tile` input px overlapping by `overlap` px, blended
    without seams; an image that fits in one tile goes through `run_tile` whole."""
    width, height = image.size
    boxes = tile_grid(width, height, tile, overlap)
    if len(boxes) == 1:
        return _checked(run_tile(image), (width * scale, height * scale))
    total = np.zeros((height * scale, width * scale, 3), dtype=np.float32)
    weight_sum = np.zeros((height * scale, width * scale, 1), dtype=np.float32)
    ramp = overlap * scale
    for left, top, right, bottom in boxes:
        out_w, out_h = (right - left) * scale, (bottom - top) * scale
        piece = _checked(run_tile(image.crop((left, top, right, bottom))), (out_w, out_h))
        weights = np.outer(
            _ramp(out_h, ramp, fade_in=top > 0, fade_out=bottom < height),
            _ramp(out_w, ramp, fade_in=left > 0, fade_out=right < width),
        )[:, :, None]
        rows = slice(top * scale, top * scale + out_h)
        cols = slice(left * scale, left * scale + out_w)
        total[rows, cols] += np.asarray(piece, dtype=np.float32) * weights
        weight_sum[rows, cols] += weights
    blended = np.clip(np.rint(total / weight_sum), 0, 255).astype(np.uint8)
    return Image.fromarray(blended)


def _checked(piece: Image.Image, size: tuple[int, int]) -> Image.Image:
    if piece.size != size:
        raise ValueError(
            f"a tile came back {piece.size[0]}x{piece.size[1]}, not {size[0]}x{size[1]}"
        )
    return piece.convert("RGB")
