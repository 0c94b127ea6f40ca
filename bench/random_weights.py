"""Random weights for the architectures of bench/architectures.py, when no real ones are local.

`build_modules` makes the networks of a pipeline with fresh random weights: the same shapes as
the published checkpoints, hence the same FLOPs per image. `ensure_random_pipeline` assembles
them into a pipeline, saves it once with `save_pretrained` under the cache dir and reuses it
after, so that the baseline and the server both load it with `from_pretrained`, as a real model
would be; FLUX.1-dev links FLUX.1-schnell's files and adds its guidance embedder. Nothing here
downloads anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.architectures import (
    clip_config,
    flux_transformer_config,
    flux_vae_config,
    sdxl_unet_config,
    sdxl_vae_config,
    t5_config,
)
from bench.devices import default_device_and_dtype, release_memory, torch_dtype
from bench.harness import logger

log = logger("gpu_throughput")
# Bump when a random-weights build changes, so old copies under --cache-dir are rebuilt.
BENCH_MODEL_VERSION = 1
_MARKER = "impasto-bench.json"
# FLUX.1-dev's extra weights, saved beside the linked schnell shards.
GUIDANCE_SHARD = "diffusion_pytorch_model-guidance.safetensors"
SHARD_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def build_modules(arch: str, toy: bool = False, clip_vocab: int = 514) -> dict[str, Any]:
    """The networks of a pipeline, with fresh random weights, in torch's current default device
    and dtype (use `torch.device("meta")` to count parameters without memory)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    clip_l = (32, 2, 2) if toy else (768, 12, 12)
    if arch == "sdxl":
        return {
            "unet": UNet2DConditionModel(**sdxl_unet_config(toy)),
            "vae": AutoencoderKL(**sdxl_vae_config(toy)),
            "text_encoder": CLIPTextModel(clip_config(*clip_l, "quick_gelu", clip_vocab, toy)),
            "text_encoder_2": CLIPTextModelWithProjection(
                clip_config(*((32, 2, 2) if toy else (1280, 32, 20)), "gelu", clip_vocab, toy)
            ),
        }
    if arch in ("flux", "flux-dev"):
        transformer = flux_transformer_config(toy, guidance_embeds=arch == "flux-dev")
        return {
            "transformer": FluxTransformer2DModel(**transformer),
            "vae": AutoencoderKL(**flux_vae_config(toy)),
            "text_encoder": CLIPTextModel(clip_config(*clip_l, "quick_gelu", clip_vocab, toy)),
            "text_encoder_2": T5EncoderModel(t5_config(toy, vocab=256)),
        }
    raise ValueError(f"unknown architecture {arch!r}")


def _clip_tokenizer(workdir: Path) -> Any:
    """A byte-level CLIP tokenizer (every byte a token, no merges), as impasto:tiny@1 has."""
    from transformers import CLIPTokenizer

    from impasto.backends.tiny import _write_tokenizer_files

    _write_tokenizer_files(workdir)
    return CLIPTokenizer(
        str(workdir / "vocab.json"), str(workdir / "merges.txt"), model_max_length=77
    )


def t5_tokenizer() -> Any:
    """A T5 tokenizer made offline: a Unigram vocabulary of single characters (transformers 5
    builds it from a list of (piece, score)); FLUX pads every prompt to 512 tokens anyway."""
    from transformers import T5Tokenizer

    characters = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in characters] + [("\u2581" + c, -2.5) for c in characters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def build_random_pipeline(
    arch: str, directory: Path, device: str, dtype_name: str, toy: bool = False
) -> None:
    """Assemble an `arch` pipeline with random weights on `device` and save it to `directory`."""
    import torch
    from diffusers import (
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusionXLPipeline,
    )

    torch.manual_seed(20261127)
    dtype = torch_dtype(dtype_name, device)
    clip_dir = directory / "_clip_tokenizer_src"
    tokenizer = _clip_tokenizer(clip_dir)
    with default_device_and_dtype(device, dtype):
        modules = build_modules(arch, toy, clip_vocab=len(tokenizer))
    for module in modules.values():
        module.eval()
    pipeline: Any
    if arch == "sdxl":
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            steps_offset=1,
            timestep_spacing="leading",
            prediction_type="epsilon",
        )
        pipeline = StableDiffusionXLPipeline(
            tokenizer=tokenizer,
            tokenizer_2=_clip_tokenizer(clip_dir),
            scheduler=scheduler,
            **modules,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False
        )
        pipeline = FluxPipeline(
            tokenizer=tokenizer, tokenizer_2=t5_tokenizer(), scheduler=scheduler, **modules
        )
    pipeline.save_pretrained(directory)
    shutil.rmtree(clip_dir, ignore_errors=True)


def _shard_keys(transformer_dir: Path) -> dict[str, str]:
    """Weight name -> shard file of a saved diffusers model folder (sharded or one file)."""
    from safetensors import safe_open

    index = transformer_dir / SHARD_INDEX
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    weight_map: dict[str, str] = {}
    for shard in sorted(transformer_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            weight_map.update(dict.fromkeys(handle.keys(), shard.name))
    return weight_map


def build_flux_dev_from_schnell(
    schnell: Path, directory: Path, device: str, dtype_name: str
) -> None:
    """FLUX.1-dev beside a saved random FLUX.1-schnell: dev's transformer is schnell's blocks
    plus a guidance embedder, so the schnell folders and shards (33 GB at full size) are linked
    and only the embedder (20 MB) is new. The disk of a GPU machine holds both then."""
    import torch
    from diffusers.models.embeddings import TimestepEmbedding
    from safetensors.torch import save_file

    def link(target: Path, name: Path) -> None:
        name.symlink_to(os.path.relpath(target, name.parent))

    for component in ("text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2"):
        link(schnell / component, directory / component)
    shutil.copytree(schnell / "scheduler", directory / "scheduler")
    shutil.copy(schnell / "model_index.json", directory / "model_index.json")
    source, transformer = schnell / "transformer", directory / "transformer"
    transformer.mkdir()
    config = json.loads((source / "config.json").read_text())
    config["guidance_embeds"] = True
    (transformer / "config.json").write_text(json.dumps(config, indent=2))
    weight_map = {}
    for key, shard in _shard_keys(source).items():
        linked = f"schnell-{shard}"
        if not (transformer / linked).exists():
            link(source / shard, transformer / linked)
        weight_map[key] = linked
    torch.manual_seed(20261128)
    width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    with default_device_and_dtype(device, torch_dtype(dtype_name, device)):
        embedder = TimestepEmbedding(in_channels=256, time_embed_dim=width)
    prefix = "time_text_embed.guidance_embedder."
    state = {prefix + k: v.detach().contiguous() for k, v in embedder.state_dict().items()}
    save_file(state, str(transformer / GUIDANCE_SHARD), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(state, GUIDANCE_SHARD))
    total = sum((transformer / name).stat().st_size for name in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (transformer / SHARD_INDEX).write_text(json.dumps(index, indent=2))


def ensure_random_pipeline(
    arch: str, cache_dir: Path, device: str, dtype_name: str, toy: bool
) -> Path:
    """The saved random-weights pipeline for `arch`, built on `device` unless already cached
    (flux-dev builds and reuses the flux one)."""
    saved_dtype = "float32" if device == "cpu" else dtype_name
    name = f"{arch}{'-toy' if toy else ''}-random-{saved_dtype}"
    directory = cache_dir / name
    wanted: dict[str, Any] = {
        "version": BENCH_MODEL_VERSION,
        "arch": arch,
        "toy": toy,
        "dtype": saved_dtype,
    }
    schnell = None
    if arch == "flux-dev":
        schnell = ensure_random_pipeline("flux", cache_dir, device, dtype_name, toy)
        wanted["schnell"] = schnell.name
    marker = directory / _MARKER
    with contextlib.suppress(OSError, ValueError):
        if json.loads(marker.read_text()) == wanted:
            return directory
    cache_dir.mkdir(parents=True, exist_ok=True)
    # The staging folder sits beside the final one: the links of flux-dev stay relative.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    started = time.perf_counter()
    log(f"building {name} (random weights) on {device} into {directory} ...")
    try:
        if schnell is not None:
            build_flux_dev_from_schnell(schnell, staging, device, dtype_name)
        else:
            build_random_pipeline(arch, staging, device, dtype_name, toy)
        release_memory(device)  # the weights made here now live on disk only
        (staging / _MARKER).write_text(json.dumps(wanted))
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log(f"built {name} in {time.perf_counter() - started:.1f} s")
    return directory
