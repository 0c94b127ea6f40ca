"""The utility models every impasto server knows: well-known hub models under Runware's AIRs
(or impasto's where Runware has none for them), and tiny random-weight versions built in code
for tests and offline first runs, loaded by the same classes.

    backend          loads                                           task
    swin2sr          transformers Swin2SRForImageSuperResolution     upscale
    sd-upscaler      diffusers StableDiffusionUpscalePipeline        upscale
    segmenter        transformers AutoModelForImageSegmentation      removeBackground
                     (BiRefNet, RMBG-2.0: remote code)
    captioner        transformers AutoModelForImageTextToText         caption
                     (BLIP, Florence-2, small VLMs)
    text-generator   transformers AutoModelForCausalLM (instruct)      promptEnhance
    openai-chat      an OpenAI-compatible /chat/completions endpoint  promptEnhance

A tiny entry names what to build in `settings.tiny`; factory.py builds it under the models
directory once.
"""

from __future__ import annotations

from typing import Any

from impasto.backends.entries import ModelEntry, any_size
from impasto.backends.utility.base import (
    BACKGROUND_REMOVER,
    CAPTIONER,
    PROMPT_ENHANCER,
    UPSCALER,
)
from impasto.protocol.rules import ModelRules

UTILITY_BACKENDS = (
    "swin2sr",
    "sd-upscaler",
    "segmenter",
    "captioner",
    "text-generator",
    "openai-chat",
)
# The backends each category may use.
BACKENDS_OF_CATEGORY = {
    UPSCALER: ("swin2sr", "sd-upscaler"),
    BACKGROUND_REMOVER: ("segmenter",),
    CAPTIONER: ("captioner",),
    PROMPT_ENHANCER: ("text-generator", "openai-chat"),
}

# What runs a utility task that names no model (Settings can change each).
DEFAULT_UPSCALER = "runware:503@1"
DEFAULT_BACKGROUND_REMOVER = "runware:112@5"
DEFAULT_CAPTIONER = "impasto:blip-large@1"
DEFAULT_PROMPT_ENHANCER = "impasto:qwen2.5-0.5b-instruct@1"

TINY_UPSCALER = "impasto:tiny-upscaler@1"
TINY_UPSCALER_X2 = "impasto:tiny-upscaler@2"
TINY_SD_UPSCALER = "impasto:tiny-sd-upscaler@1"
TINY_SEGMENTER = "impasto:tiny-segmenter@1"
TINY_CAPTIONER = "impasto:tiny-captioner@1"
TINY_ENHANCER = "impasto:tiny-enhancer@1"


def _entry(
    air: str,
    name: str,
    category: str,
    backend: str,
    path: str | None = None,
    architecture: str = "utility",
    **settings: Any,
) -> ModelEntry:
    return ModelEntry(
        air=air,
        name=name,
        architecture=architecture,
        backend=backend,
        category=category,
        path=path,
        rules=ModelRules(air=air, sizes=any_size((1024, 1024))),
        settings=settings,
    )


def utility_entries() -> list[ModelEntry]:
    return [
        # Upscalers. Runware's 503@1 is SwinIR; Swin2SR is its successor, trained on the same
        # degradations (BSRGAN), loaded by transformers.
        _entry(
            "runware:503@1",
            "Swin2SR real-world x4 (SwinIR family)",
            UPSCALER,
            "swin2sr",
            "caidas/swin2SR-realworld-sr-x4-64-bsrgan-psnr",
        ),
        _entry(
            "impasto:swin2sr-x2@1",
            "Swin2SR classical x2",
            UPSCALER,
            "swin2sr",
            "caidas/swin2SR-classical-sr-x2-64",
        ),
        _entry(
            "impasto:sd-x4-upscaler@1",
            "Stable Diffusion x4 upscaler (diffusion; takes settings.positivePrompt)",
            UPSCALER,
            "sd-upscaler",
            "stabilityai/stable-diffusion-x4-upscaler",
        ),
        # Background removal: BiRefNet and BRIA RMBG-2.0 (same architecture, remote code).
        _entry(
            "runware:112@5",
            "BiRefNet general",
            BACKGROUND_REMOVER,
            "segmenter",
            "ZhengPeng7/BiRefNet",
        ),
        _entry(
            "runware:112@9",
            "BiRefNet matting",
            BACKGROUND_REMOVER,
            "segmenter",
            "ZhengPeng7/BiRefNet-matting",
        ),
        _entry(
            "runware:112@10",
            "BiRefNet portrait",
            BACKGROUND_REMOVER,
            "segmenter",
            "ZhengPeng7/BiRefNet-portrait",
        ),
        _entry(
            "bria:2@1",
            "BRIA RMBG 2.0 (gated on the hub: needs a Hugging Face token)",
            BACKGROUND_REMOVER,
            "segmenter",
            "briaai/RMBG-2.0",
        ),
        # Captioning.
        _entry(
            DEFAULT_CAPTIONER,
            "BLIP large (image captioning)",
            CAPTIONER,
            "captioner",
            "Salesforce/blip-image-captioning-large",
        ),
        _entry(
            "runware:152@1",
            "Qwen2.5-VL 3B Instruct",
            CAPTIONER,
            "captioner",
            "Qwen/Qwen2.5-VL-3B-Instruct",
            dtype="bfloat16",
        ),
        # Prompt enhancement.
        _entry(
            DEFAULT_PROMPT_ENHANCER,
            "Qwen2.5 0.5B Instruct (prompt enhancer)",
            PROMPT_ENHANCER,
            "text-generator",
            "Qwen/Qwen2.5-0.5B-Instruct",
        ),
        _entry(
            "runware:llama-3-1-8b@prompt-enhancer",
            "Llama 3.1 8B Instruct (prompt enhancer; gated on the hub)",
            PROMPT_ENHANCER,
            "text-generator",
            "meta-llama/Llama-3.1-8B-Instruct",
            dtype="bfloat16",
        ),
        *tiny_utility_entries(),
    ]


def tiny_utility_entries() -> list[ModelEntry]:
    """Random weights, built in code: the real loading and inference path in seconds."""
    return [
        _entry(
            TINY_UPSCALER,
            "impasto tiny Swin2SR x4 (random weights)",
            UPSCALER,
            "swin2sr",
            architecture="tiny",
            tiny="swin2sr-x4",
            tile=64,
        ),
        _entry(
            TINY_UPSCALER_X2,
            "impasto tiny Swin2SR x2 (random weights)",
            UPSCALER,
            "swin2sr",
            architecture="tiny",
            tiny="swin2sr-x2",
            tile=64,
        ),
        _entry(
            TINY_SD_UPSCALER,
            "impasto tiny SD x4 upscaler (random weights)",
            UPSCALER,
            "sd-upscaler",
            architecture="tiny",
            tiny="sd-upscaler",
            steps=2,
            tile=32,
            tile_overlap=8,
        ),
        _entry(
            TINY_SEGMENTER,
            "impasto tiny segmenter (BiRefNet-style remote code, random weights)",
            BACKGROUND_REMOVER,
            "segmenter",
            architecture="tiny",
            tiny="segmenter",
            resolution=64,
        ),
        _entry(
            TINY_CAPTIONER,
            "impasto tiny BLIP captioner (random weights)",
            CAPTIONER,
            "captioner",
            architecture="tiny",
            tiny="captioner",
            max_new_tokens=12,
        ),
        _entry(
            TINY_ENHANCER,
            "impasto tiny instruct LM prompt enhancer (random weights)",
            PROMPT_ENHANCER,
            "text-generator",
            architecture="tiny",
            tiny="enhancer",
            max_new_tokens=24,
        ),
    ]
