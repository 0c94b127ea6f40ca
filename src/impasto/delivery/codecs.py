"""Image encoding (JPG/PNG/WEBP) and decoding of client-supplied images with hard limits."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

CONTENT_TYPES = {"JPG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
EXTENSIONS = {"JPG": "jpg", "PNG": "png", "WEBP": "webp"}
FORMAT_OF_EXTENSION = {ext: fmt for fmt, ext in EXTENSIONS.items()} | {"jpeg": "JPG"}
# What we accept as input (imageUpload, reference images).
INPUT_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "MPO"})

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,", re.I)


class ImageDecodeError(ValueError):
    """The bytes are not an image we accept; the message says why, for the client."""


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    output_format: str
    content_type: str
    extension: str
    width: int
    height: int


def encode_image(image: Image.Image, output_format: str, quality: int) -> EncodedImage:
    """Encode to JPG, PNG or WEBP. `quality` applies to the lossy formats."""
    buffer = io.BytesIO()
    if output_format == "JPG":
        # convert() copies even an RGB image: 3 MB at 1360x768, for nothing.
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        rgb.save(buffer, format="JPEG", quality=quality, optimize=False)
    elif output_format == "WEBP":
        image.save(buffer, format="WEBP", quality=quality, method=4)
    elif output_format == "PNG":
        # PNG is lossless; a low compress level keeps encoding fast for large images.
        image.save(buffer, format="PNG", compress_level=3)
    else:
        raise ValueError(f"unknown output format {output_format!r}")
    return EncodedImage(
        data=buffer.getvalue(),
        output_format=output_format,
        content_type=CONTENT_TYPES[output_format],
        extension=EXTENSIONS[output_format],
        width=image.width,
        height=image.height,
    )


def is_data_uri(value: str) -> bool:
    return value[:5].lower() == "data:"


def decode_base64_payload(value: str, max_bytes: int) -> bytes:
    """Bytes of a data URI or of raw base64 text; refuses payloads over `max_bytes`."""
    payload = value
    if is_data_uri(value):
        match = _DATA_URI.match(value)
        if match is None:
            raise ImageDecodeError("data URI must be of the form data:image/<type>;base64,<data>")
        payload = value[match.end() :]
    # Four base64 characters carry three bytes; check before decoding anything.
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageDecodeError(f"image is larger than {max_bytes} bytes")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError("image is not valid base64") from None


def decode_image(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """Decode and fully load an input image, with its format (JPEG, PNG, ...); refuses other
    formats and decompression bombs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
            if image.format not in INPUT_FORMATS:
                raise ImageDecodeError(
                    f"image format {image.format} is not accepted; use JPEG, PNG, WEBP, BMP or GIF"
                )
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} pixels; the limit is {max_pixels} pixels"
                )
            image.load()
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError("data is not a readable image") from None
    except (OSError, ValueError, SyntaxError):
        raise ImageDecodeError("image data is truncated or corrupt") from None
    # Cameras and phones write MPO: a JPEG with more pictures appended. Its first picture is
    # what we decoded, and the file is a JPEG to every reader.
    source_format = "JPEG" if image.format == "MPO" else str(image.format)
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert(
            "RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB"
        )
    return image, source_format


def fit_within(image: Image.Image, max_side: int) -> Image.Image:
    """Shrink so that the longest side is at most `max_side`, keeping the aspect ratio."""
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)
