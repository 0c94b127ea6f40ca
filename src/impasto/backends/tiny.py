"""`impasto:tiny@1`: a real Stable Diffusion pipeline (CLIP text encoder and tokenizer, UNet,
VAE, scheduler) whose config, tokenizer files and random weights are made here, saved once with
`save_pretrained` and loaded with `from_pretrained`, so tests and an offline first run go through
the same diffusers loading and inference path as a real model.

Shape: the VAE downsamples 16x (five levels) with narrow full-resolution blocks and no
attention, and the UNet's only self-attention sits two levels down, so that 1920x1080 on one CPU
core stays under a second (bench/tiny_speed.py). The images are noise-like: the weights are
random, the code path is real.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from impasto.backends.devices import LOAD_LOCK

# Bump when the architecture changes, so old copies in data dirs are rebuilt.
TINY_VERSION = 1
_MARKER = "impasto-tiny.json"


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte-to-unicode table (transformers 5 no longer exports it).
    visible = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = visible[:]
    extra = 0
    for byte in range(256):
        if byte not in visible:
            visible.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(visible, (chr(c) for c in codes), strict=True))


def _write_tokenizer_files(directory: Path) -> dict[str, int]:
    """A byte-level CLIP vocabulary without merges: every byte is a token."""
    characters = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for char in characters:
        vocab[char] = len(vocab)
    for char in characters:
        vocab[char + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return vocab


def tiny_clip_text(token_dir: Path, layers: int) -> tuple[Any, Any]:
    """A byte-level CLIP tokenizer (its files written into `token_dir`) and a CLIP text
    encoder of `layers` narrow layers with random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = _write_tokenizer_files(token_dir)
    tokenizer = CLIPTokenizer(
        str(token_dir / "vocab.json"), str(token_dir / "merges.txt"), model_max_length=77
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    return tokenizer, text_encoder


def tiny_vae(**extra: Any) -> Any:
    """The tiny VAE: 16x downsampling in five narrow levels, no attention (random weights)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(4, 4, 8, 16, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 5,
        up_block_types=("UpDecoderBlock2D",) * 5,
        norm_num_groups=4,
        sample_size=64,
        mid_block_add_attention=False,
        **extra,
    )


def tiny_scheduler(**extra: Any) -> Any:
    """Stable Diffusion's Euler schedule."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        **extra,
    )


def _build(directory: Path) -> None:
    import torch
    from diffusers import (
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(20261127)
    token_dir = directory / "_tokenizer_src"
    tokenizer, text_encoder = tiny_clip_text(token_dir, layers=2)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = tiny_vae()
    scheduler = tiny_scheduler()
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory)
    shutil.rmtree(token_dir)


def is_built(directory: Path, marker: Mapping[str, object]) -> bool:
    """Whether `directory` holds a finished build whose marker file says exactly `marker`."""
    try:
        return bool(json.loads((directory / _MARKER).read_text()) == dict(marker))
    except (OSError, ValueError):
        return False


def build_atomically(
    directory: Path,
    build: Callable[[Path], None],
    marker: Mapping[str, object],
    *,
    prefix: str = ".tiny-",
) -> Path:
    """Run `build` into a staging directory beside `directory`, write `marker` into it and
    rename it into place, unless `directory` already holds a build with that marker."""
    if is_built(directory, marker):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash never leaves a half-written model.
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=directory.parent))
    try:
        with LOAD_LOCK:
            build(staging)
        (staging / _MARKER).write_text(json.dumps(dict(marker)))
        # Another process may have finished the same build meanwhile: its copy is as good.
        if is_built(directory, marker):
            return directory
        if directory.exists():
            shutil.rmtree(directory)
        try:
            staging.rename(directory)
        except OSError:
            if not is_built(directory, marker):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def ensure_tiny_pipeline(directory: Path) -> Path:
    """Build and save the tiny pipeline under `directory` unless a current copy is there."""
    return build_atomically(directory, _build, {"version": TINY_VERSION})


TINY_IP_ADAPTER = "impasto-tiny-ip-adapter"
TINY_IP_ADAPTER_WEIGHTS = "ip-adapter_tiny.safetensors"


def _build_ip_adapter(directory: Path, pipeline_dir: Path) -> None:
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(20261128)
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet")
    cross = int(unet.config.cross_attention_dim)
    channels = list(unet.config.block_out_channels)
    embed_dim = 32
    models = directory / "models"
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
            projection_dim=embed_dim,
        )
    )
    encoder.save_pretrained(models / "image_encoder")
    # The layout diffusers' load_ip_adapter reads: an image projection to 4 extra tokens, and
    # key/value projections for every cross-attention layer, numbered 1, 3, 5, ...
    tensors = {
        "image_proj.proj.weight": torch.randn(cross * 4, embed_dim) * 0.02,
        "image_proj.proj.bias": torch.zeros(cross * 4),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    key_id = 1
    for name in unet.attn_processors:
        if not name.endswith("attn2.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        for projection in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{key_id}.{projection}.weight"] = torch.randn(hidden, cross) * 0.02
        key_id += 2
    save_file(tensors, str(models / TINY_IP_ADAPTER_WEIGHTS))


def ensure_tiny_ip_adapter(directory: Path, pipeline_dir: Path) -> Path:
    """A tiny IP-Adapter (image encoder and adapter weights, random) for the tiny pipeline, in
    the layout of a real one, so the IP-Adapter path of diffusers runs offline too."""
    return build_atomically(
        directory,
        lambda staging: _build_ip_adapter(staging, pipeline_dir),
        {"version": TINY_VERSION},
        prefix=".tiny-ip-",
    )
