"""Mask refinement and composition for background removal, in numpy and Pillow only.

The segmenter gives a soft mask (L, 0-255, white subject). Runware's `removeBackground`
options then work on it as rembg does:

- `post_process_mask`: drop specks and smooth the outline (rembg's `post_process`: a 3x3
  morphological opening, a 5x5 Gaussian blur with sigma 2, and a threshold at 127), giving a
  binary mask whose edges follow a smoothed contour.
- `alpha_matte`: a trimap from the mask (sure foreground above `foreground_threshold`, sure
  background below `background_threshold`, each shrunk by an `erode_size` square; unknown
  between), then the unknown band solved against the image. rembg solves it with pymatting's
  closed-form matting (a sparse linear system per image); this module uses a colour guided
  filter (He, Sun and Tang, "Guided Image Filtering", 2010/2013) with the image as guide,
  applied to the mask: an edge-aware approximation that pulls the mask's edge onto the image's
  edges at the cost of a few box filters. It is not pymatting's closed form, and it does not
  re-estimate the foreground colours (rembg's `estimate_foreground_ml`): the image's own
  colours are kept under the new alpha.
- `compose`: the image with an alpha channel, optionally painted over a solid colour.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from PIL import Image

FloatArray = npt.NDArray[np.float32]
UInt8Array = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]

# Trimap values (the convention of pymatting and rembg).
TRIMAP_BACKGROUND = 0
TRIMAP_UNKNOWN = 128
TRIMAP_FOREGROUND = 255

# Guided-filter regulariser on [0, 1] intensities: smaller follows the image's edges (and
# its noise and texture) more closely, larger is smoother. 1e-3 sits in the middle of the
# 1e-4..1e-2 commonly used to refine masks; it has not been tuned on photographs here.
GUIDED_FILTER_EPS = 1e-3

# Guided-filter passes of alpha_matte (each clamps the trimap's known regions back).
MATTING_ITERATIONS = 4

# rembg's post_process: cv2.getStructuringElement(MORPH_ELLIPSE, (3, 3)) is this cross.
_OPENING_CROSS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))
# A 5-tap Gaussian with sigma 2 (cv2.GaussianBlur((5, 5), sigmaX=2)).
_BLUR_TAPS = np.exp(-(np.arange(-2, 3, dtype=np.float64) ** 2) / (2 * 2.0**2))
_BLUR_TAPS /= _BLUR_TAPS.sum()


def _as_mask_array(mask: Image.Image) -> UInt8Array:
    return np.asarray(mask.convert("L"), dtype=np.uint8)


def _shifted(array: UInt8Array, dy: int, dx: int) -> UInt8Array:
    """`array` moved by (dy, dx), its edge pixels repeated into the gap."""
    height, width = array.shape
    padded = np.pad(array, 1, mode="edge")
    return padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]


def _open_cross(mask: UInt8Array) -> UInt8Array:
    """Grayscale opening (erosion, then dilation) with the 3x3 cross."""
    eroded = np.minimum.reduce([_shifted(mask, dy, dx) for dy, dx in _OPENING_CROSS])
    opened = np.maximum.reduce([_shifted(eroded, dy, dx) for dy, dx in _OPENING_CROSS])
    return np.asarray(opened, dtype=np.uint8)


def _gaussian_blur(mask: UInt8Array) -> FloatArray:
    """The separable 5x5 Gaussian, mirrored at the borders (cv2's BORDER_REFLECT_101)."""
    values = mask.astype(np.float64)
    for axis in (0, 1):
        # numpy's "reflect" mirrors without repeating the edge pixel, as REFLECT_101 does;
        # it needs at least 3 pixels along the axis, "edge" does for thinner masks.
        pad = [(0, 0), (0, 0)]
        pad[axis] = (2, 2)
        if values.shape[axis] > 2:
            padded = np.pad(values, pad, mode="reflect")
        else:
            padded = np.pad(values, pad, mode="edge")
        length = values.shape[axis]
        values = sum(
            tap * np.take(padded, np.arange(i, i + length), axis=axis)
            for i, tap in enumerate(_BLUR_TAPS)
        )
    return values.astype(np.float32)


def post_process_mask(mask: Image.Image) -> Image.Image:
    """rembg's mask clean-up: remove specks (3x3 opening), smooth the outline (Gaussian blur)
    and binarise at 127. Returns an L image of 0 and 255."""
    opened = _open_cross(_as_mask_array(mask))
    blurred = _gaussian_blur(opened)
    return Image.fromarray(np.where(blurred < 127, 0, 255).astype(np.uint8), mode="L")


def _erode(region: BoolArray, size: int) -> BoolArray:
    """Binary erosion with a `size` x `size` square centred as scipy centres it (offsets
    -size//2 .. size-1-size//2). Outside the image counts as the region's own edge, so a
    region touching the border is not eaten from there (rembg's scipy call treats outside as
    empty, which turns a band along the border into unknown)."""
    if size <= 1:
        return region
    before, after = size // 2, size - 1 - size // 2
    result = region
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (before, after)
        padded = np.pad(result, pad, mode="edge")
        windows = np.lib.stride_tricks.sliding_window_view(padded, size, axis=axis)
        result = np.asarray(windows.all(axis=-1))
    return result


def trimap(
    mask: Image.Image, foreground_threshold: int, background_threshold: int, erode_size: int
) -> UInt8Array:
    """The trimap of rembg's alpha matting: TRIMAP_FOREGROUND where the mask is above
    `foreground_threshold`, TRIMAP_BACKGROUND where it is below `background_threshold`,
    each region eroded by an `erode_size` square, TRIMAP_UNKNOWN elsewhere."""
    values = _as_mask_array(mask)
    foreground = _erode(values > foreground_threshold, erode_size)
    background = _erode(values < background_threshold, erode_size)
    result = np.full(values.shape, TRIMAP_UNKNOWN, dtype=np.uint8)
    result[foreground] = TRIMAP_FOREGROUND
    result[background] = TRIMAP_BACKGROUND
    return result


def _box_mean64(values: npt.NDArray[np.floating], radius: int) -> npt.NDArray[np.float64]:
    """The mean of [H, W] `values` over the (2r+1)^2 window around each pixel, the window cut
    at the image's border (He's box filter, normalised by the pixels actually inside), in
    float64."""
    # Separable running sums in float64: float32 loses the low digits that the variances
    # below are differences of. A window's sum is the difference of two cumulative sums.
    sums = values.astype(np.float64)
    counts = np.ones((1, 1), dtype=np.float64)
    for axis in (0, 1):
        length = sums.shape[axis]
        zeros = np.zeros_like(np.take(sums, [0], axis=axis))
        cumulative = np.concatenate([zeros, sums.cumsum(axis=axis)], axis=axis)
        high = np.minimum(np.arange(length) + radius + 1, length)
        low = np.maximum(np.arange(length) - radius, 0)
        sums = np.take(cumulative, high, axis=axis) - np.take(cumulative, low, axis=axis)
        counts = counts * np.expand_dims((high - low).astype(np.float64), 1 - axis)
    return np.asarray(sums / counts, dtype=np.float64)


def _box_mean(values: npt.NDArray[np.floating], radius: int) -> FloatArray:
    """_box_mean64 as float32."""
    return _box_mean64(values, radius).astype(np.float32)


def _box_covariance(
    x: FloatArray, y: FloatArray, mean_x: FloatArray, mean_y: FloatArray, radius: int
) -> FloatArray:
    """The windowed covariance mean(xy) - mean(x)mean(y), subtracted in float64: in float32
    the difference of two values near 1 keeps only ~1e-7 of them, too little for variances
    regularised by an eps of 1e-4 and below."""
    value = _box_mean64(x * y, radius) - mean_x.astype(np.float64) * mean_y
    return value.astype(np.float32)


class _GuidedFilter:
    """He et al.'s guided filter with a colour guide [H, W, 3] on [0, 1]. The guide's
    statistics (window means, the inverse of its regularised 3x3 colour covariance) are
    computed once, so filtering several sources with one guide costs 8 box filters each."""

    def __init__(self, guide: FloatArray, radius: int, eps: float) -> None:
        self.radius = radius
        self.channels = [np.ascontiguousarray(guide[..., c], dtype=np.float32) for c in range(3)]
        self.means = [_box_mean(channel, radius) for channel in self.channels]

        def covariance(i: int, j: int) -> FloatArray:
            x, y = self.channels[i], self.channels[j]
            value = _box_covariance(x, y, self.means[i], self.means[j], radius)
            return value + np.float32(eps) if i == j else value

        # The symmetric cofactor inverse of Sigma + eps*I per pixel (He's reference code):
        # no [H, W, 3, 3] arrays, which on a large image would be hundreds of megabytes. In
        # float64: where the colours in a window lie on a line (an edge between two flat
        # colours) the cofactors are differences of nearly equal products, and float32
        # arithmetic there blows the inverse up for an eps below ~1e-3.
        rr, rg, rb, gg, gb, bb = (
            covariance(i, j).astype(np.float64)
            for i, j in ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
        )
        cofactors = [
            gg * bb - gb * gb,
            gb * rb - rg * bb,
            rg * gb - gg * rb,
            rr * bb - rb * rb,
            rb * rg - rr * gb,
            rr * gg - rg * rg,
        ]
        det = rr * cofactors[0] + rg * cofactors[1] + rb * cofactors[2]
        self.inverse = [(entry / det).astype(np.float32) for entry in cofactors]

    def __call__(self, source: FloatArray) -> FloatArray:
        """The filtered `source` [H, W] (not clamped)."""
        radius = self.radius
        mean_p = _box_mean(source, radius)
        cov = [
            _box_covariance(channel, source, mean, mean_p, radius)
            for channel, mean in zip(self.channels, self.means, strict=True)
        ]
        i_rr, i_rg, i_rb, i_gg, i_gb, i_bb = self.inverse
        # a = (Sigma + eps*I)^-1 cov(I, p); b = mean(p) - a . mean(I).
        a = [
            i_rr * cov[0] + i_rg * cov[1] + i_rb * cov[2],
            i_rg * cov[0] + i_gg * cov[1] + i_gb * cov[2],
            i_rb * cov[0] + i_gb * cov[1] + i_bb * cov[2],
        ]
        b = mean_p - sum((a_c * m for a_c, m in zip(a, self.means, strict=True)), np.float32(0))
        filtered = _box_mean(b, radius)
        for a_c, channel in zip(a, self.channels, strict=True):
            filtered += _box_mean(a_c, radius) * channel
        return filtered


def guided_filter(guide: FloatArray, source: FloatArray, radius: int, eps: float) -> FloatArray:
    """He et al.'s guided filter with a colour guide: `guide` [H, W, 3] and `source` [H, W],
    both on [0, 1]; returns the filtered source [H, W] (not clamped)."""
    return _GuidedFilter(guide, radius, eps)(source)


def alpha_matte(
    image: Image.Image,
    mask: Image.Image,
    foreground_threshold: int = 240,
    background_threshold: int = 10,
    erode_size: int = 10,
) -> Image.Image:
    """Refine `mask` (L) against `image` (RGB); returns an L alpha. A guided-filter
    approximation of rembg's closed-form alpha matting, not pymatting's solver.

    The trimap's known regions become 0 and 255; its unknown band takes the mask guided-
    filtered against the image (radius `erode_size`, at least 1), with the known regions
    clamped back after each of MATTING_ITERATIONS passes. He et al. show that the guided
    filter's kernel is tied to the affinities of Levin et al.'s matting Laplacian (the closed
    form that pymatting solves), so repeating it under the trimap's constraints moves the band
    the same way, a few sweeps instead of a sparse solve: on a blurred disc edge one pass
    removed about a fifth of the error, four passes most of it."""
    if image.size != mask.size:
        raise ValueError(f"image {image.size} and mask {mask.size} differ in size")
    regions = trimap(mask, foreground_threshold, background_threshold, erode_size)
    alpha = regions.copy()
    unknown = regions == TRIMAP_UNKNOWN
    if not unknown.any():
        return Image.fromarray(alpha, mode="L")
    radius = max(1, erode_size)
    # Only the band and the pixels its windows reach take part: on a large image the band
    # is often a small part of it.
    rows = np.flatnonzero(unknown.any(axis=1))
    cols = np.flatnonzero(unknown.any(axis=0))
    margin = 2 * radius + 1
    top, bottom = max(0, rows[0] - margin), min(alpha.shape[0], rows[-1] + margin + 1)
    left, right = max(0, cols[0] - margin), min(alpha.shape[1], cols[-1] + margin + 1)
    crop = (slice(top, bottom), slice(left, right))
    guide = np.asarray(image.convert("RGB"), dtype=np.float32)[crop] / np.float32(255)
    band = unknown[crop]
    known_values = regions[crop].astype(np.float32) / np.float32(255)
    estimate = np.where(band, _as_mask_array(mask)[crop] / np.float32(255), known_values)
    refine = _GuidedFilter(guide, radius, GUIDED_FILTER_EPS)
    for _ in range(MATTING_ITERATIONS):
        estimate = np.where(band, np.clip(refine(estimate), 0.0, 1.0), known_values)
    alpha[crop][band] = np.rint(estimate[band] * 255).astype(np.uint8)
    return Image.fromarray(alpha, mode="L")


def compose(
    image: Image.Image, alpha: Image.Image, background: tuple[int, int, int, int] | None = None
) -> Image.Image:
    """`image` with `alpha` as its alpha channel (RGBA); with `background` (r, g, b, a), the
    subject painted over that colour: where the subject is transparent the result has the
    colour and its alpha `a`, where it is opaque the subject."""
    if image.size != alpha.size:
        raise ValueError(f"image {image.size} and alpha {alpha.size} differ in size")
    subject = image.convert("RGB")
    subject.putalpha(alpha.convert("L"))
    if background is None:
        return subject
    if len(background) != 4 or any(not 0 <= int(c) <= 255 for c in background):
        raise ValueError(f"background must be four values in 0-255, got {background!r}")
    canvas = Image.new("RGBA", subject.size, tuple(int(c) for c in background))
    canvas.alpha_composite(subject)
    return canvas
