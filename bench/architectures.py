"""The architectures bench/gpu_throughput.py runs, as the published checkpoints configure them.

`sdxl` (SDXL base 1.0), `flux` (FLUX.1-schnell) and `flux-dev` (FLUX.1-dev: schnell's
transformer plus a guidance embedder): the pipeline and registry entry of each, and the configs
of its networks, whose shapes give the real FLOPs per image. `toy=True` gives the same networks
at toy widths, to run the whole path on a CPU. `tiny` is impasto's own tiny pipeline
(impasto:tiny@1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Architecture:
    """One benchmark architecture: the pipeline, the registry entry and the defaults of a call."""

    name: str
    title: str
    air: str
    pipeline_class: str
    registry_architecture: str  # the models file's `architecture` (acceleratorOptions use it)
    denoiser: Literal["unet", "transformer"]
    steps: int
    toy_steps: int
    guidance: float
    hub_id: str | None = None


ARCHITECTURES = {
    "sdxl": Architecture(
        "sdxl",
        "SDXL base 1.0",
        "bench:sdxl@1",
        "StableDiffusionXLPipeline",
        "sdxl",
        "unet",
        steps=30,
        toy_steps=3,
        guidance=6.0,
        hub_id="stabilityai/stable-diffusion-xl-base-1.0",
    ),
    "flux": Architecture(
        "flux",
        "FLUX.1-schnell",
        "bench:flux-schnell@1",
        "FluxPipeline",
        "flux1s",
        "transformer",
        steps=4,
        toy_steps=2,
        guidance=0.0,
        hub_id="black-forest-labs/FLUX.1-schnell",
    ),
    "flux-dev": Architecture(
        "flux-dev",
        "FLUX.1-dev",
        "bench:flux-dev@1",
        "FluxPipeline",
        "flux1d",
        "transformer",
        steps=28,
        toy_steps=2,
        guidance=3.5,
        hub_id="black-forest-labs/FLUX.1-dev",
    ),
    "tiny": Architecture(
        "tiny",
        "impasto tiny",
        "impasto:tiny@1",
        "StableDiffusionPipeline",
        "sd1x",
        "unet",
        steps=2,
        toy_steps=2,
        guidance=2.0,
    ),
}
HUB_IDS = {name: spec.hub_id for name, spec in ARCHITECTURES.items() if spec.hub_id}
GPU_ARCHES = ("sdxl", "flux", "flux-dev")


# -- the networks: configs of the real checkpoints, and toy versions of the same shape ---------


def clip_config(width: int, layers: int, heads: int, act: str, vocab: int, toy: bool) -> Any:
    """A CLIP text encoder's config: the real vocabulary unless `toy` (then `vocab` ids)."""
    from transformers import CLIPTextConfig

    bos, eos = vocab - 2, vocab - 1  # the byte-level tokenizer's last two ids
    return CLIPTextConfig(
        vocab_size=vocab if toy else 49408,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=width,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def sdxl_unet_config(toy: bool = False) -> dict[str, Any]:
    """UNet2DConditionModel arguments of SDXL base 1.0 (2.57 B parameters), or a toy of them."""
    config: dict[str, Any] = {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        # diffusers' historical name: these are head counts (head width 64).
        "attention_head_dim": (5, 10, 20),
        "cross_attention_dim": 2048,  # CLIP-L 768 + OpenCLIP-bigG 1280
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,  # 6 x 256 time ids + 1280 pooled
        "norm_num_groups": 32,
    }
    if toy:
        config.update(
            sample_size=16,
            layers_per_block=1,
            block_out_channels=(32, 64, 64),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 4),
            cross_attention_dim=64,
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
        )
    return config


def _vae_config(latent_channels: int, toy: bool, **extra: Any) -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": latent_channels,
        "block_out_channels": (32, 32, 32, 32) if toy else (128, 256, 512, 512),
        "layers_per_block": 1 if toy else 2,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "norm_num_groups": 32,
        "sample_size": 128 if toy else 1024,
        "force_upcast": True,
        **extra,
    }


def sdxl_vae_config(toy: bool = False) -> dict[str, Any]:
    """AutoencoderKL arguments of the SDXL VAE."""
    return _vae_config(4, toy, scaling_factor=0.13025)


def flux_vae_config(toy: bool = False) -> dict[str, Any]:
    """AutoencoderKL arguments of the FLUX.1 VAE (16 latent channels, no quant convs)."""
    return _vae_config(
        16,
        toy,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def flux_transformer_config(toy: bool = False, guidance_embeds: bool = False) -> dict[str, Any]:
    """FluxTransformer2DModel arguments of FLUX.1-schnell (11.89 B parameters), or with
    `guidance_embeds` of FLUX.1-dev (11.90 B: the same blocks and a guidance embedder)."""
    config: dict[str, Any] = {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": guidance_embeds,
        "axes_dims_rope": (16, 56, 56),
    }
    if toy:
        config.update(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(4, 6, 6),
        )
    return config


def t5_config(toy: bool = False, vocab: int = 32128) -> Any:
    """T5 v1.1 XXL (the FLUX text encoder 2: 4.76 B parameters as an encoder)."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab if toy else 32128,
        d_model=32 if toy else 4096,
        d_kv=16 if toy else 64,
        d_ff=64 if toy else 10240,
        num_layers=2 if toy else 24,
        num_decoder_layers=2 if toy else 24,
        num_heads=2 if toy else 64,
        feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new",
        is_gated_act=True,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
