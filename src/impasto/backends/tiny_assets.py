"""Offline companions of `impasto:tiny@1`: a LoRA, a ControlNet, an inpainting pipeline, an SDXL
base and refiner, a VAE and a textual-inversion embedding, each with random weights from a fixed
seed, each saved in the on-disk format a user's real asset of that kind has, so that tests and
an offline first run load them with the same diffusers calls as real ones.

Every `ensure_*` builds into a staging directory beside its target and renames it into place
with a marker (`tiny.build_atomically`), and returns at once when a current copy is there.
Assets made from the tiny pipeline record its version in their marker, so they are rebuilt
when it changes.

The weights are random, so images are noise-like; what the assets guarantee is that each one
really changes the output: LoRA up-projections, ControlNet zero-convolutions and the embedding
are random and non-zero, not the zero initialisation that leaves a model as it was.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from impasto.backends.tiny import (
    TINY_VERSION,
    _write_tokenizer_files,
    build_atomically,
    tiny_scheduler,
    tiny_vae,
)

# Bump when an asset's architecture or weights change, so old copies are rebuilt.
TINY_ASSETS_VERSION = 1

TINY_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
TINY_EMBEDDING_WEIGHTS = "learned_embeds.safetensors"
TINY_EMBEDDING_TOKEN = "<impasto-tiny>"

# The names the model factory asks for; each lives under models_dir / f"impasto-tiny-{name}".
TINY_ASSET_NAMES = (
    "lora1",
    "lora2",
    "controlnet",
    "inpaint",
    "xl",
    "xl-refiner",
    "vae",
    "embedding",
)

# LoRA shape: rank 4 with alpha = rank (scale 1), on the attention projections of the UNet and
# the text encoder. The up-projections get this spread instead of peft's zeros: at weight 1 a
# 2-step 64x64 image then moves by several 8-bit levels on average.
_LORA_RANK = 4
_LORA_UP_STD = 0.3
_UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
_TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# ControlNet zero-convolutions, made non-zero with this spread.
_CONTROLNET_STD = 0.3

# The SDXL UNet's extra conditioning: six size/crop numbers for the base, five (sizes, crop and
# aesthetic score) for the refiner, each embedded in this many channels, plus the pooled text
# embedding of the second encoder.
_XL_TIME_EMBED_DIM = 8
_XL_TEXT_HIDDEN = 32
_XL_POOLED_DIM = 32


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Random weights from `seed`, without disturbing the caller's global torch RNG."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _marker(asset: str, *, from_pipeline: bool = True, **extra: object) -> dict[str, object]:
    marker: dict[str, object] = {"version": TINY_ASSETS_VERSION, "asset": asset, **extra}
    if from_pipeline:
        marker["pipeline"] = TINY_VERSION
    return marker


# -- LoRA ---------------------------------------------------------------------------------------


def _randomize_lora_up(model: Any) -> None:
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(0.0, _LORA_UP_STD)


def _build_lora(directory: Path, pipeline_dir: Path, seed: int) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    with _seeded(seed):
        unet = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet")
        text_encoder = CLIPTextModel.from_pretrained(pipeline_dir / "text_encoder")
        unet.add_adapter(
            LoraConfig(r=_LORA_RANK, lora_alpha=_LORA_RANK, target_modules=_UNET_LORA_TARGETS)
        )
        # peft directly, as diffusers' training scripts do: transformers' own add_adapter
        # insists on a newer peft than diffusers needs.
        inject_adapter_in_model(
            LoraConfig(r=_LORA_RANK, lora_alpha=_LORA_RANK, target_modules=_TEXT_LORA_TARGETS),
            text_encoder,
        )
        _randomize_lora_up(unet)
        _randomize_lora_up(text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(
            get_peft_model_state_dict(text_encoder)
        ),
        weight_name=TINY_LORA_WEIGHTS,
    )


def ensure_tiny_lora(directory: Path, pipeline_dir: Path, *, seed: int = 1) -> Path:
    """A LoRA for the tiny pipeline's UNet and text encoder (`pytorch_lora_weights.safetensors`,
    diffusers' own format); each seed gives a different LoRA."""
    return build_atomically(
        directory,
        lambda staging: _build_lora(staging, pipeline_dir, seed),
        _marker("lora", seed=seed),
        prefix=".tiny-lora-",
    )


# -- ControlNet ---------------------------------------------------------------------------------


def _build_controlnet(directory: Path, pipeline_dir: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    with _seeded(20261129):
        unet = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet")
        # The conditioning embedding brings the control image down to the latent size: one
        # stride-2 step fewer than it has levels, as many as the VAE has (16x for tiny).
        levels = len(AutoencoderKL.load_config(pipeline_dir / "vae")["block_out_channels"])
        channels = tuple(min(16, 4 * 2 ** (level // 2)) for level in range(levels))
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
        zero_initialised = [
            controlnet.controlnet_cond_embedding.conv_out,
            *controlnet.controlnet_down_blocks,
            controlnet.controlnet_mid_block,
        ]
        with torch.no_grad():
            for module in zero_initialised:
                for parameter in module.parameters():
                    parameter.normal_(0.0, _CONTROLNET_STD)
    controlnet.save_pretrained(directory)


def ensure_tiny_controlnet(directory: Path, pipeline_dir: Path) -> Path:
    """A ControlNet for the tiny pipeline (`ControlNetModel.from_pretrained(directory)`)."""
    return build_atomically(
        directory,
        lambda staging: _build_controlnet(staging, pipeline_dir),
        _marker("controlnet"),
        prefix=".tiny-controlnet-",
    )


# -- inpainting ---------------------------------------------------------------------------------


def _build_inpaint(directory: Path, pipeline_dir: Path) -> None:
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    with _seeded(20261130):
        config = dict(UNet2DConditionModel.load_config(pipeline_dir / "unet"))
        # Latents, the mask and the masked image's latents, stacked: 4 + 1 + 4 channels.
        config["in_channels"] = 9
        unet = UNet2DConditionModel.from_config(config)
    pipeline = StableDiffusionInpaintPipeline.from_pretrained(
        pipeline_dir, unet=unet, safety_checker=None, requires_safety_checker=False
    )
    pipeline.save_pretrained(directory)


def ensure_tiny_inpaint(directory: Path, pipeline_dir: Path) -> Path:
    """An inpainting pipeline: the tiny pipeline's text encoder, tokenizer, VAE and scheduler
    with a UNet of its own that takes 9 input channels."""
    return build_atomically(
        directory,
        lambda staging: _build_inpaint(staging, pipeline_dir),
        _marker("inpaint"),
        prefix=".tiny-inpaint-",
    )


# -- SDXL ---------------------------------------------------------------------------------------


def _xl_unet(cross_attention_dim: int, conditioning_numbers: int) -> Any:
    from diffusers import UNet2DConditionModel

    # The tiny pipeline's UNet shape, with SDXL's size/crop (and aesthetic score) conditioning.
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_XL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=(
            _XL_TIME_EMBED_DIM * conditioning_numbers + _XL_POOLED_DIM
        ),
    )


def _build_xl(directory: Path) -> None:
    from diffusers import (
        StableDiffusionXLPipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    with _seeded(20261131):
        token_dir = directory / "_tokenizer_src"
        vocab = _write_tokenizer_files(token_dir)

        def text_config(projection: bool) -> Any:
            return CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=_XL_TEXT_HIDDEN,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=_XL_POOLED_DIM if projection else 32,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
            )

        tokenizer = CLIPTokenizer(
            str(token_dir / "vocab.json"), str(token_dir / "merges.txt"), model_max_length=77
        )
        text_encoder = CLIPTextModel(text_config(projection=False))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(projection=True))
        # SDXL conditions on both encoders' hidden states side by side, and on six numbers:
        # original size, crop corner and target size.
        unet = _xl_unet(2 * _XL_TEXT_HIDDEN, conditioning_numbers=6)
        vae = tiny_vae(force_upcast=False)
    scheduler = tiny_scheduler(timestep_spacing="leading")
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipeline.save_pretrained(directory)
    shutil.rmtree(token_dir)


def ensure_tiny_xl(directory: Path) -> Path:
    """A tiny SDXL base pipeline (two CLIP text encoders, `text_time` conditioning)."""
    return build_atomically(
        directory, _build_xl, _marker("xl", from_pipeline=False), prefix=".tiny-xl-"
    )


def _build_xl_refiner(directory: Path, xl_dir: Path) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    with _seeded(20261132):
        # Like SDXL's refiner: the second text encoder only, and five numbers of conditioning
        # (original size, crop corner, aesthetic score).
        unet = _xl_unet(_XL_TEXT_HIDDEN, conditioning_numbers=5)
    pipeline = StableDiffusionXLImg2ImgPipeline(
        vae=AutoencoderKL.from_pretrained(xl_dir / "vae"),
        text_encoder=None,
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(xl_dir / "text_encoder_2"),
        tokenizer=None,
        tokenizer_2=CLIPTokenizer.from_pretrained(xl_dir / "tokenizer_2"),
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_pretrained(xl_dir / "scheduler"),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    pipeline.save_pretrained(directory)


def ensure_tiny_xl_refiner(directory: Path, xl_dir: Path) -> Path:
    """A tiny SDXL refiner for `ensure_tiny_xl`'s base: it shares the base's VAE, second text
    encoder and latent space, so it can finish the base's latents."""
    return build_atomically(
        directory,
        lambda staging: _build_xl_refiner(staging, xl_dir),
        _marker("xl-refiner", from_pipeline=False),
        prefix=".tiny-xl-refiner-",
    )


# -- VAE and embedding --------------------------------------------------------------------------


def _build_vae(directory: Path, pipeline_dir: Path) -> None:
    from diffusers import AutoencoderKL

    with _seeded(20261133):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(pipeline_dir / "vae"))
    vae.save_pretrained(directory)


def ensure_tiny_vae(directory: Path, pipeline_dir: Path) -> Path:
    """A VAE with the tiny pipeline's architecture and other weights (an override to try)."""
    return build_atomically(
        directory,
        lambda staging: _build_vae(staging, pipeline_dir),
        _marker("vae"),
        prefix=".tiny-vae-",
    )


def _build_embedding(directory: Path, pipeline_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig

    hidden = int(CLIPTextConfig.from_pretrained(pipeline_dir / "text_encoder").hidden_size)
    with _seeded(20261134):
        vector = torch.randn(1, hidden)
    # diffusers' textual-inversion layout: {token: [vectors, hidden]}.
    directory.mkdir(parents=True, exist_ok=True)
    save_file({TINY_EMBEDDING_TOKEN: vector}, str(directory / TINY_EMBEDDING_WEIGHTS))


def ensure_tiny_embedding(directory: Path, pipeline_dir: Path) -> Path:
    """A one-vector textual-inversion embedding for the tiny text encoder, for the token
    `TINY_EMBEDDING_TOKEN` (`learned_embeds.safetensors`)."""
    return build_atomically(
        directory,
        lambda staging: _build_embedding(staging, pipeline_dir),
        _marker("embedding"),
        prefix=".tiny-embedding-",
    )


# -- by name ------------------------------------------------------------------------------------


def tiny_asset_dir(name: str, models_dir: Path) -> Path:
    """Where the tiny asset `name` lives under `models_dir`."""
    return models_dir / f"impasto-tiny-{name}"


def ensure_tiny_asset(name: str, models_dir: Path, pipeline_dir: Path) -> Path:
    """Build (once) the tiny asset `name` (one of `TINY_ASSET_NAMES`) for the tiny pipeline at
    `pipeline_dir`; returns its directory."""
    directory = tiny_asset_dir(name, models_dir)
    if name in ("lora1", "lora2"):
        return ensure_tiny_lora(directory, pipeline_dir, seed=int(name[-1]))
    if name == "controlnet":
        return ensure_tiny_controlnet(directory, pipeline_dir)
    if name == "inpaint":
        return ensure_tiny_inpaint(directory, pipeline_dir)
    if name == "xl":
        return ensure_tiny_xl(directory)
    if name == "xl-refiner":
        return ensure_tiny_xl_refiner(directory, ensure_tiny_xl(tiny_asset_dir("xl", models_dir)))
    if name == "vae":
        return ensure_tiny_vae(directory, pipeline_dir)
    if name == "embedding":
        return ensure_tiny_embedding(directory, pipeline_dir)
    raise ValueError(f"unknown tiny asset {name!r}; known: {', '.join(TINY_ASSET_NAMES)}")
