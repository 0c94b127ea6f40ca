"""Tiny random-weight upscalers, built in code and saved with `save_pretrained`, so that tests
and an offline first run load them with the very `from_pretrained` calls that load the real
ones: a Swin2SR (with its image processor) at a chosen scale, and a Stable Diffusion x4
upscaler pipeline (text encoder, tokenizer, UNet, VAE and both schedulers). Their images are
noise-like; their sizes, types and code paths are the real ones.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from impasto.backends.tiny import build_atomically, tiny_clip_text
from impasto.backends.tiny_assets import _seeded

# Bump when an architecture or its weights change, so old copies are rebuilt.
TINY_UPSCALERS_VERSION = 1

# Swin2SR's windows; the processor pads to a multiple of this, as the real checkpoints do.
_SWIN_WINDOW = 4


def _build_swin2sr(directory: Path, scale: int) -> None:
    from transformers import (
        Swin2SRConfig,
        Swin2SRForImageSuperResolution,
        Swin2SRImageProcessor,
    )

    config = Swin2SRConfig(
        image_size=32,
        embed_dim=16,
        depths=(1,),
        num_heads=(2,),
        window_size=_SWIN_WINDOW,
        mlp_ratio=2.0,
        upscale=scale,
        upsampler="pixelshuffle",
        drop_path_rate=0.0,
    )
    with _seeded(20261201 + scale):
        model = Swin2SRForImageSuperResolution(config)
    model.save_pretrained(directory)
    Swin2SRImageProcessor(size_divisor=_SWIN_WINDOW).save_pretrained(directory)


def ensure_tiny_swin2sr(directory: Path, scale: int) -> Path:
    """A tiny Swin2SR that upscales `scale` (2, 3 or 4) times, saved under `directory` unless a
    current copy is there."""
    marker = {"version": TINY_UPSCALERS_VERSION, "asset": "swin2sr", "scale": scale}
    return build_atomically(directory, lambda staging: _build_swin2sr(staging, scale), marker)


def _build_sd_upscaler(directory: Path) -> None:
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )

    token_dir = directory / "_tokenizer_src"
    with _seeded(20261202):
        tokenizer, text_encoder = tiny_clip_text(token_dir, layers=1)
        # As the real x4 upscaler: the latents are concatenated with the (noised) low-res
        # image, 4 + 3 channels in, and the noise level is a class label.
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=7,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
            num_class_embeds=1000,
        )
        # Three levels: the pipeline reads a 4x upscale from 2 ** (levels - 1).
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(8, 8, 16),
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            norm_num_groups=4,
            sample_size=128,
            mid_block_add_attention=False,
            scaling_factor=0.08333,
        )
    # The real checkpoint's schedules: a linear DDPM one to noise the low-res image, and DDIM
    # with v-prediction to sample.
    low_res_scheduler = DDPMScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    scheduler = DDIMScheduler(
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        low_res_scheduler=low_res_scheduler,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        max_noise_level=350,
    )
    pipeline.save_pretrained(directory)
    shutil.rmtree(token_dir)


def ensure_tiny_sd_upscaler(directory: Path) -> Path:
    """A tiny Stable Diffusion x4 upscaler pipeline, saved under `directory` unless a current
    copy is there."""
    marker = {"version": TINY_UPSCALERS_VERSION, "asset": "sd-x4-upscaler"}
    return build_atomically(directory, _build_sd_upscaler, marker)
