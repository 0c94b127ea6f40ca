"""The seam between the utility tasks and the models that run them.

A utility model answers one kind of request: an upscaler an UpscaleRequest with the upscaled
image, a background remover a BackgroundRequest with an RGBA image (or the mask alone), a
captioner a CaptionRequest with one text, a prompt enhancer an EnhanceRequest with one text per
version. Local models run on their device's worker thread (backends/devices.py); a model
served over HTTP (an OpenAI-compatible chat endpoint) awaits its client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from PIL import Image

# The Runware task each kind of utility model serves, by the entry's category.
UPSCALER = "upscaler"
BACKGROUND_REMOVER = "background-removal"
CAPTIONER = "captioner"
PROMPT_ENHANCER = "prompt-enhancer"
TASK_OF_CATEGORY = {
    UPSCALER: "upscale",
    BACKGROUND_REMOVER: "removeBackground",
    CAPTIONER: "caption",
    PROMPT_ENHANCER: "promptEnhance",
}
UTILITY_CATEGORIES = tuple(TASK_OF_CATEGORY)


@dataclass(frozen=True)
class UpscaleRequest:
    """Make `image` (RGB) `factor` times larger on each side."""

    image: Image.Image
    factor: int
    # Diffusion upscalers only (others ignore them).
    prompt: str = ""
    negative_prompt: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class BackgroundRequest:
    """Cut the subject of `image` (RGB) out of its background."""

    image: Image.Image
    # The mask alone (white subject on black), as an RGB image.
    return_only_mask: bool = False
    # Refine the mask's edges against the image (rembg's alpha matting knobs, 0-255 / px).
    alpha_matting: bool = False
    foreground_threshold: int = 240
    background_threshold: int = 10
    erode_size: int = 10
    # Clean the mask: drop specks, smooth and binarise its edges.
    post_process_mask: bool = False
    # Paint this colour (r, g, b, a) behind the subject instead of transparency.
    background: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class CaptionRequest:
    """Describe `image` in words; `prompt` is an instruction for models that take one."""

    image: Image.Image
    prompt: str | None = None


@dataclass(frozen=True)
class EnhanceRequest:
    """Rewrite `prompt` into `versions` richer image prompts of at most `max_length`
    characters each; `seed` makes the sampling repeatable."""

    prompt: str
    max_length: int
    versions: int
    seed: int


UtilityRequest = UpscaleRequest | BackgroundRequest | CaptionRequest | EnhanceRequest
# An image (upscalers, background removers) or texts (captioners: one; enhancers: versions).
UtilityOutput = Image.Image | list[str]


class UtilityModel(Protocol):
    """One loaded utility model."""

    async def run(self, request: UtilityRequest) -> UtilityOutput:
        """Answer one request; raises ImpastoError for a request this model cannot take."""

    async def close(self) -> None:
        """Release the weights, clients and threads."""
