"""Synthetic images for the content-safety tests, drawn in code: clean scenes that every check
must pass, and a drawn face that NudeNet's detector really finds (as FACE_FEMALE), so tests can
see the real detector decide without any explicit material in the repository."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SKY = (200, 220, 240)


def solid(color: tuple[int, int, int] | str, size: int = 1024) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def gradient(size: int = 1024) -> Image.Image:
    ramp = np.tile(np.linspace(0, 255, size, dtype=np.uint8), (size, 1))
    return Image.fromarray(np.stack([ramp, ramp.T, 255 - ramp], axis=-1), "RGB")


def noise(size: int = 1024, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def landscape(size: int = 1024) -> Image.Image:
    """Sky, two mountains, a meadow and the sun."""
    image = Image.new("RGB", (size, size), (135, 206, 235))
    draw = ImageDraw.Draw(image)
    s = size / 1024
    draw.polygon([(0, 700 * s), (300 * s, 300 * s), (600 * s, 700 * s)], fill=(90, 90, 100))
    draw.polygon([(400 * s, 700 * s), (750 * s, 250 * s), (size, 700 * s)], fill=(110, 110, 120))
    draw.rectangle([0, 700 * s, size, size], fill=(40, 140, 60))
    draw.ellipse([800 * s, 80 * s, 920 * s, 200 * s], fill=(255, 230, 0))
    return image


def face(size: int = 320) -> Image.Image:
    """A flat cartoon portrait: hair, face, eyes, brows, nose, mouth, neck, shoulders."""
    image = Image.new("RGB", (size, size), SKY)
    draw = ImageDraw.Draw(image)
    s = size / 640
    skin = (230, 190, 160)
    draw.ellipse([150 * s, 60 * s, 490 * s, 480 * s], fill=(60, 40, 20))
    draw.ellipse([190 * s, 120 * s, 450 * s, 470 * s], fill=skin)
    for x in (250, 360):
        draw.ellipse([x * s, 250 * s, (x + 40) * s, 275 * s], fill=(255, 255, 255))
        draw.ellipse([(x + 12) * s, 252 * s, (x + 28) * s, 272 * s], fill=(40, 60, 90))
        draw.arc(
            [(x - 5) * s, 225 * s, (x + 45) * s, 250 * s],
            200,
            340,
            fill=(50, 30, 10),
            width=max(1, round(6 * s)),
        )
    draw.polygon([(320 * s, 280 * s), (305 * s, 350 * s), (335 * s, 350 * s)], fill=(210, 160, 130))
    draw.chord([270 * s, 370 * s, 370 * s, 420 * s], 0, 180, fill=(190, 80, 90))
    draw.rectangle([270 * s, 470 * s, 370 * s, 560 * s], fill=skin)
    draw.ellipse([120 * s, 540 * s, 520 * s, 800 * s], fill=(50, 80, 160))
    return image.filter(ImageFilter.GaussianBlur(3))


def small_face_scene(size: int = 1024, face_size: int = 200) -> Image.Image:
    """A face a fifth of the picture's side, in its top-left corner."""
    image = Image.new("RGB", (size, size), SKY)
    image.paste(face(face_size), (40, 40))
    return image


def clean_images() -> dict[str, Image.Image]:
    return {
        "white": solid("white"),
        "black": solid("black"),
        "skin-tone": solid((224, 172, 140)),
        "gradient": gradient(),
        "noise": noise(),
        "landscape": landscape(),
    }


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
