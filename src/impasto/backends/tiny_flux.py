"""`impasto:tiny-flux@1`: a real FLUX.1 pipeline (CLIP and T5 text encoders and tokenizers, a
FLUX transformer, a 16-channel VAE, the flow-matching Euler scheduler) with toy sizes and
random weights from a fixed seed, saved once with `save_pretrained` and loaded with
`from_pretrained`, so that tests and offline first runs go through diffusers' FLUX loading and
inference path, and the step caches for transformer (DiT) denoisers have a model to run on.

Shape: FLUX.1-schnell's layout (two dual-stream and two single-stream blocks, no guidance
embedding, 16 latent channels packed 2x2 into 64) at widths of 16 to 64 channels; the VAE
downsamples 8x as FLUX's does, in four narrow levels without attention. The images are
noise-like: the weights are random, the code path is real.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from impasto.backends.tiny import _write_tokenizer_files, build_atomically

# Bump when the architecture or the weights change, so old copies are rebuilt.
TINY_FLUX_VERSION = 1
_SEED = 20261201
# The width of both text encoders: the transformer's joint attention (T5) and pooled (CLIP)
# projections take it.
_TEXT_WIDTH = 32


def tiny_flux_transformer_config() -> dict[str, Any]:
    """FluxTransformer2DModel arguments: FLUX.1-schnell's layout at toy widths."""
    return {
        "patch_size": 1,
        "in_channels": 64,  # 16 latent channels, packed 2x2
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": _TEXT_WIDTH,
        "pooled_projection_dim": _TEXT_WIDTH,
        "guidance_embeds": False,
        "axes_dims_rope": (4, 6, 6),  # sums to the head width
    }


def tiny_flux_vae() -> Any:
    """FLUX's VAE layout (16 latent channels, no quant convs, 8x) in four narrow levels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(4, 8, 16, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4,
        sample_size=64,
        mid_block_add_attention=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def t5_tokenizer() -> Any:
    """A T5 tokenizer made offline: a Unigram vocabulary of single characters (transformers 5
    builds it from (piece, score) pairs). FLUX pads every prompt to 512 tokens anyway."""
    from transformers import T5Tokenizer

    characters = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in characters] + [("\u2581" + c, -2.5) for c in characters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _t5_encoder(vocab_size: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    # T5 v1.1's layout (gated GELU, relative attention buckets), two narrow layers.
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=_TEXT_WIDTH,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            layer_norm_epsilon=1e-6,
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def _build(directory: Path) -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    token_dir = directory / "_tokenizer_src"
    vocab = _write_tokenizer_files(token_dir)
    tokenizer = CLIPTokenizer(
        str(token_dir / "vocab.json"), str(token_dir / "merges.txt"), model_max_length=77
    )
    tokenizer_2 = t5_tokenizer()
    # Random weights from our seed, without disturbing the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=_TEXT_WIDTH,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=_TEXT_WIDTH,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
            )
        )
        text_encoder_2 = _t5_encoder(len(tokenizer_2))
        transformer = FluxTransformer2DModel(**tiny_flux_transformer_config())
        vae = tiny_flux_vae()
    # FLUX.1-schnell's schedule: no resolution-dependent shift.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False
    )
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipeline.save_pretrained(directory)
    shutil.rmtree(token_dir)


def ensure_tiny_flux(directory: Path) -> Path:
    """Build and save the tiny FLUX pipeline under `directory` unless a current copy is there
    (`FluxPipeline.from_pretrained(directory)` loads it)."""
    return build_atomically(
        directory, _build, {"version": TINY_FLUX_VERSION, "asset": "flux"}, prefix=".tiny-flux-"
    )
