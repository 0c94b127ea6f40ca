"""Encoding of outputs and the hard limits on decoding what clients send."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib

import pytest
from PIL import Image

from impasto.delivery.codecs import (
    ImageDecodeError,
    decode_base64_payload,
    decode_image,
    encode_image,
    fit_within,
    is_data_uri,
)

MAX_PIXELS = 4096 * 4096


def noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A deterministic image that compresses badly, so that quality shows in the size."""
    bands = len(mode)
    data = random.Random(seed).randbytes(size[0] * size[1] * bands)
    return Image.frombytes(mode, size, data)


def saved(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a size its (tiny) pixel data does not hold."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _chunk(b"IEND", b"")
    )


# -- encoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output_format", "content_type", "extension", "pil_format"),
    [
        ("JPG", "image/jpeg", "jpg", "JPEG"),
        ("PNG", "image/png", "png", "PNG"),
        ("WEBP", "image/webp", "webp", "WEBP"),
    ],
)
def test_encoded_image_decodes_at_its_exact_size_with_matching_content_type(
    output_format: str, content_type: str, extension: str, pil_format: str
) -> None:
    image = noise((173, 91))
    encoded = encode_image(image, output_format, 90)
    assert (encoded.output_format, encoded.content_type, encoded.extension) == (
        output_format,
        content_type,
        extension,
    )
    assert (encoded.width, encoded.height) == (173, 91)
    with Image.open(io.BytesIO(encoded.data)) as reopened:
        assert reopened.format == pil_format
        assert reopened.size == (173, 91)


def test_png_encoding_is_lossless() -> None:
    image = noise((64, 48))
    encoded = encode_image(image, "PNG", 20)
    with Image.open(io.BytesIO(encoded.data)) as reopened:
        assert reopened.convert("RGB").tobytes() == image.tobytes()


def test_png_keeps_alpha_and_jpg_drops_it() -> None:
    image = noise((32, 32), "RGBA")
    with Image.open(io.BytesIO(encode_image(image, "PNG", 95).data)) as png:
        assert png.mode == "RGBA"
    with Image.open(io.BytesIO(encode_image(image, "JPG", 95).data)) as jpg:
        assert jpg.mode == "RGB"


@pytest.mark.parametrize("output_format", ["JPG", "WEBP"])
def test_lower_quality_gives_a_smaller_lossy_file(output_format: str) -> None:
    image = noise((128, 128))
    low = encode_image(image, output_format, 20)
    high = encode_image(image, output_format, 99)
    assert len(low.data) < len(high.data)


def test_encoding_to_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown output format"):
        encode_image(noise((8, 8)), "GIF", 90)


# -- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_accepted_input_formats_decode_to_rgb_with_their_format(fmt: str) -> None:
    data = saved(noise((40, 30)), fmt)
    image, source_format = decode_image(data, MAX_PIXELS)
    assert source_format == fmt
    assert image.size == (40, 30)
    assert image.mode in ("RGB", "RGBA")


def test_multi_picture_jpeg_from_a_camera_decodes_as_jpeg() -> None:
    # Phones and cameras write MPO: a JPEG with extra pictures appended; Pillow names it MPO.
    buffer = io.BytesIO()
    noise((40, 30)).save(buffer, format="MPO", save_all=True, append_images=[noise((40, 30))])
    image, source_format = decode_image(buffer.getvalue(), MAX_PIXELS)
    assert source_format == "JPEG"
    assert (image.size, image.mode) == ((40, 30), "RGB")


def test_palette_image_with_transparency_decodes_to_rgba() -> None:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([255, 0, 0, 0, 0, 255])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0)
    decoded, _ = decode_image(buffer.getvalue(), MAX_PIXELS)
    assert decoded.mode == "RGBA"


def test_greyscale_image_decodes_to_rgb() -> None:
    decoded, _ = decode_image(saved(Image.new("L", (16, 16), 128), "PNG"), MAX_PIXELS)
    assert decoded.mode == "RGB"


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, this is not an image", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", b"\x00" * 1024],
    ids=["empty", "text", "pdf", "zeros"],
)
def test_decode_refuses_bytes_that_are_not_an_image(data: bytes) -> None:
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        decode_image(data, MAX_PIXELS)


@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "PPM"])
def test_decode_refuses_image_formats_outside_the_accepted_list(fmt: str) -> None:
    with pytest.raises(ImageDecodeError, match="not accepted"):
        decode_image(saved(noise((32, 32)), fmt), MAX_PIXELS)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decode_refuses_truncated_image_data(fmt: str) -> None:
    data = saved(noise((128, 128)), fmt)
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], MAX_PIXELS)


def test_decode_refuses_a_real_image_over_the_pixel_limit() -> None:
    data = saved(noise((200, 100)), "PNG")
    with pytest.raises(ImageDecodeError, match="200x100 pixels; the limit is 19999"):
        decode_image(data, 19_999)
    image, _ = decode_image(data, 20_000)
    assert image.size == (200, 100)


def test_decode_refuses_a_header_claiming_more_pixels_than_the_limit_before_decoding() -> None:
    with pytest.raises(ImageDecodeError, match="4000x4000 pixels"):
        decode_image(png_claiming(4000, 4000), 1_000_000)


@pytest.mark.parametrize(
    ("width", "height"), [(10_000, 10_000), (100_000, 100_000)], ids=["bomb", "huge-bomb"]
)
def test_decode_refuses_decompression_bombs_whatever_the_limit(width: int, height: int) -> None:
    # Past Pillow's own MAX_IMAGE_PIXELS: refused when the header is read (not "truncated",
    # which would mean it tried to allocate and decode), even with a generous limit of ours.
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        decode_image(png_claiming(width, height), 10**12)


# -- base64 and data URIs ---------------------------------------------------------------------


PAYLOAD = saved(noise((8, 8)), "PNG")
B64 = base64.b64encode(PAYLOAD).decode()


@pytest.mark.parametrize(
    "text",
    [
        B64,
        f"data:image/png;base64,{B64}",
        f"DATA:IMAGE/PNG;BASE64,{B64}",
        f"data:;base64,{B64}",
        f"data:image/png;name=a.png;base64,{B64}",
        "\n".join(B64[i : i + 76] for i in range(0, len(B64), 76)),
    ],
    ids=[
        "raw",
        "data-uri",
        "data-uri-upper-case",
        "data-uri-no-type",
        "data-uri-params",
        "wrapped",
    ],
)
def test_base64_and_data_uri_decode_to_the_original_bytes(text: str) -> None:
    assert decode_base64_payload(text, 1_000_000) == PAYLOAD


@pytest.mark.parametrize(
    "text",
    ["not base64 at all!", B64[:-1] + "*", "abc", f"data:image/png;base64,{B64[:-2]}#"],
    ids=["punctuation", "bad-char", "bad-padding", "data-uri-bad-char"],
)
def test_invalid_base64_is_refused(text: str) -> None:
    with pytest.raises(ImageDecodeError, match="not valid base64"):
        decode_base64_payload(text, 1_000_000)


@pytest.mark.parametrize(
    "text", [f"data:image/png,{B64}", "data:image/png;utf8,<svg/>", "data:"], ids=str
)
def test_data_uri_without_base64_marker_is_refused(text: str) -> None:
    with pytest.raises(ImageDecodeError, match="data URI must be"):
        decode_base64_payload(text, 1_000_000)


def test_base64_over_the_size_limit_is_refused_before_decoding() -> None:
    assert decode_base64_payload(base64.b64encode(b"abc").decode(), 3) == b"abc"
    with pytest.raises(ImageDecodeError, match="larger than 2 bytes"):
        decode_base64_payload(base64.b64encode(b"abc").decode(), 2)
    with pytest.raises(ImageDecodeError, match="larger than"):
        decode_base64_payload(f"data:image/png;base64,{B64}", len(PAYLOAD) - 10)


def test_is_data_uri_ignores_case_and_needs_the_scheme() -> None:
    assert is_data_uri("data:image/png;base64,AAAA")
    assert is_data_uri("DATA:image/png;base64,AAAA")
    assert not is_data_uri("https://example.com/data:")
    assert not is_data_uri(B64)


# -- fit_within -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((400, 200), 100, (100, 50)),
        ((150, 600), 300, (75, 300)),
        ((1000, 1000), 512, (512, 512)),
        ((1920, 1080), 960, (960, 540)),
        ((1000, 333), 300, (300, 100)),
        ((5000, 3), 100, (100, 1)),
    ],
)
def test_fit_within_caps_the_long_side_and_keeps_the_aspect_ratio(
    size: tuple[int, int], max_side: int, expected: tuple[int, int]
) -> None:
    fitted = fit_within(Image.new("RGB", size), max_side)
    assert fitted.size == expected


@pytest.mark.parametrize("size", [(100, 50), (64, 64)])
def test_fit_within_returns_images_already_small_enough_unchanged(size: tuple[int, int]) -> None:
    image = Image.new("RGB", size)
    assert fit_within(image, 100) is image
