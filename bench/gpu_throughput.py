"""Throughput and latency of impasto against the plain diffusers pipeline, on one device.

For each architecture, in one run on one device:

  plain loop          the same diffusers pipeline class and weights, called once per image in a
                      loop (batch 1, a fresh generator per image): the baseline
  impasto 1 client    `python -m impasto serve` as a subprocess, one client posting sync
                      imageInference tasks (outputType URL, JPG) one after another
  impasto 8 clients   the same server, 8 clients posting at once (cross-request batching with
                      IMPASTO_MAX_BATCH_SIZE and IMPASTO_BATCH_WAIT_MS)

Architectures: `sdxl` (SDXL base, 1024x1024, 30 steps, CFG 6) and `flux` (FLUX.1-schnell,
1024x1024, 4 steps, guidance 0). Real weights are used when given (--sdxl-path, --flux-path:
local diffusers folders) or found in the Hugging Face cache; otherwise random weights of the real
architecture (same shapes, hence the same FLOPs per image) are made on the device in the chosen
dtype, saved once with `save_pretrained` under --cache-dir and loaded by both the baseline and
the server with `from_pretrained`, as a real model would be. Nothing is ever downloaded
(HF_HUB_OFFLINE=1 for this process and the server).

    .venv/bin/python bench/gpu_throughput.py                      # GPU: sdxl and flux
    .venv/bin/python bench/gpu_throughput.py --arch sdxl --images 16 --max-batch-size 8
    .venv/bin/python bench/gpu_throughput.py --tiny --images 3    # CPU: impasto:tiny@1, seconds
    .venv/bin/python bench/gpu_throughput.py --arch sdxl,flux --toy --device cpu  # code path

--tiny runs impasto's own tiny pipeline at 256x256 (the default without CUDA); --toy builds the
SDXL and FLUX pipelines with toy widths, to check the whole path on a CPU. Neither says anything
about GPU speed. The table and --json (default bench/results/gpu_throughput.json) give images/s,
p50 latency and both as ratios to the plain loop; on a GPU with the full architectures the
issue's targets are printed beside them. Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

# Bump when a random-weights build changes, so old copies under --cache-dir are rebuilt.
BENCH_MODEL_VERSION = 1
_MARKER = "impasto-bench.json"
PROMPT = "a lighthouse on a cliff at dusk, thick oil paint, impasto brush strokes"
FIRST_SEED = 1000
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
MODES = ("plain loop", "impasto 1 client", "impasto {n} clients")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO_ROOT / "bench" / "results" / "gpu_throughput.json"
HUB_IDS = {
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "flux": "black-forest-labs/FLUX.1-schnell",
}


# -- architectures: configs of the real checkpoints, and toy versions of the same shape --------


def _clip_config(width: int, layers: int, heads: int, act: str, vocab: int, toy: bool) -> Any:
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


def flux_transformer_config(toy: bool = False) -> dict[str, Any]:
    """FluxTransformer2DModel arguments of FLUX.1-schnell (11.89 B parameters)."""
    config: dict[str, Any] = {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": False,
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


def build_modules(arch: str, toy: bool = False, clip_vocab: int = 514) -> dict[str, Any]:
    """The networks of a pipeline, with fresh random weights, in torch's current default device
    and dtype (use `torch.device("meta")` to count parameters without memory)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    if arch == "sdxl":
        return {
            "unet": UNet2DConditionModel(**sdxl_unet_config(toy)),
            "vae": AutoencoderKL(**sdxl_vae_config(toy)),
            "text_encoder": CLIPTextModel(
                _clip_config(*((32, 2, 2) if toy else (768, 12, 12)), "quick_gelu", clip_vocab, toy)
            ),
            "text_encoder_2": CLIPTextModelWithProjection(
                _clip_config(*((32, 2, 2) if toy else (1280, 32, 20)), "gelu", clip_vocab, toy)
            ),
        }
    if arch == "flux":
        return {
            "transformer": FluxTransformer2DModel(**flux_transformer_config(toy)),
            "vae": AutoencoderKL(**flux_vae_config(toy)),
            "text_encoder": CLIPTextModel(
                _clip_config(*((32, 2, 2) if toy else (768, 12, 12)), "quick_gelu", clip_vocab, toy)
            ),
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


@contextlib.contextmanager
def default_device_and_dtype(device: str, dtype: Any) -> Iterator[None]:
    """Create tensors on `device` in `dtype`: random weights are made where they will run,
    without a float32 copy (FLUX in float32 would not fit next to its bf16 copy)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


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


def ensure_random_pipeline(
    arch: str, cache_dir: Path, device: str, dtype_name: str, toy: bool
) -> Path:
    """The saved random-weights pipeline for `arch`, built on `device` unless already cached."""
    saved_dtype = "float32" if device == "cpu" else dtype_name
    name = f"{arch}{'-toy' if toy else ''}-random-{saved_dtype}"
    directory = cache_dir / name
    wanted = {"version": BENCH_MODEL_VERSION, "arch": arch, "toy": toy, "dtype": saved_dtype}
    marker = directory / _MARKER
    with contextlib.suppress(OSError, ValueError):
        if json.loads(marker.read_text()) == wanted:
            return directory
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    started = time.perf_counter()
    log(f"building {name} (random weights) on {device} into {directory} ...")
    try:
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


# -- what runs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One architecture at one size: what the baseline loads and the server registers."""

    arch: str
    air: str
    pipeline_class: str
    source: Path
    weights: str  # real | random | tiny
    width: int
    height: int
    steps: int
    guidance: float
    variant: str | None = None
    full_size: bool = True  # the real architecture (targets apply on a GPU)


def torch_dtype(name: str, device: str) -> Any:
    """The dtype impasto's DiffusersBackend uses for a `dtype` setting on `device`."""
    import torch

    if device == "cpu" or name in ("float32", "fp32"):
        return torch.float32
    return {"float16": torch.float16, "fp16": torch.float16}.get(name, torch.bfloat16)


def release_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a hub repository, if the Hugging Face cache has one."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or no huggingface_hub: random weights then
        return None
    return path if (path / "model_index.json").exists() else None


def fp16_variant(path: Path, denoiser: str) -> str | None:
    """`fp16` when the folder only has the fp16 variant of the denoiser's weights."""
    files = [p.name for p in (path / denoiser).glob("*.safetensors")]
    plain = [f for f in files if ".fp16." not in f]
    return "fp16" if files and not plain else None


def resolve_workload(arch: str, args: argparse.Namespace, device: str) -> Workload:
    if arch == "tiny":
        from impasto.backends.tiny import ensure_tiny_pipeline

        size = args.size or 256
        return Workload(
            arch="tiny",
            air="impasto:tiny@1",
            pipeline_class="StableDiffusionPipeline",
            source=ensure_tiny_pipeline(args.cache_dir / "impasto-tiny"),
            weights="tiny",
            width=size,
            height=size,
            steps=args.steps or 2,
            guidance=2.0,
            full_size=False,
        )
    given = args.sdxl_path if arch == "sdxl" else args.flux_path
    real: Path | None = None
    if args.weights != "random" and not args.toy:
        real = given or cached_snapshot(HUB_IDS[arch])
        if args.weights == "real" and real is None:
            raise SystemExit(
                f"--weights real: no local weights for {arch}; pass --{arch}-path or put "
                f"{HUB_IDS[arch]} in the Hugging Face cache"
            )
    denoiser = "unet" if arch == "sdxl" else "transformer"
    if real is not None:
        source, weights, variant = real, "real", fp16_variant(real, denoiser)
    else:
        source = ensure_random_pipeline(arch, args.cache_dir, device, args.dtype, args.toy)
        weights, variant = "random", None
    default_size = 128 if args.toy else 1024
    if arch == "sdxl":
        return Workload(
            arch="sdxl",
            air="bench:sdxl@1",
            pipeline_class="StableDiffusionXLPipeline",
            source=source,
            weights=weights,
            width=args.size or default_size,
            height=args.size or default_size,
            steps=args.steps or (3 if args.toy else 30),
            guidance=6.0,
            variant=variant,
            full_size=not args.toy,
        )
    return Workload(
        arch="flux",
        air="bench:flux-schnell@1",
        pipeline_class="FluxPipeline",
        source=source,
        weights=weights,
        width=args.size or default_size,
        height=args.size or default_size,
        steps=args.steps or (2 if args.toy else 4),
        guidance=0.0,
        variant=variant,
        full_size=not args.toy,
    )


# -- measurements -----------------------------------------------------------------------------


@dataclass
class ModeResult:
    arch: str
    mode: str
    clients: int
    images: int
    wall_s: float
    latencies_s: list[float] = field(repr=False)
    target: str = ""
    meets_target: bool | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def p50_s(self) -> float:
        return statistics.median(self.latencies_s)

    def row(self, baseline: ModeResult) -> dict[str, Any]:
        record = asdict(self)
        record.update(
            images_per_s=round(self.images_per_s, 4),
            s_per_image=round(1 / self.images_per_s, 4),
            p50_s=round(self.p50_s, 4),
            p95_s=round(percentile(self.latencies_s, 95), 4),
            ratio_images_per_s=round(self.images_per_s / baseline.images_per_s, 3),
            ratio_p50=round(self.p50_s / baseline.p50_s, 3),
            latencies_s=[round(v, 4) for v in self.latencies_s],
        )
        return record


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def log(message: str) -> None:
    print(f"[gpu_throughput] {message}", file=sys.stderr, flush=True)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def run_plain_loop(
    work: Workload, device: str, dtype_name: str, images: int, warmup: int, channels_last: bool
) -> ModeResult:
    """The baseline: the pipeline called once per image, as a diffusers user writes it."""
    import diffusers
    import torch

    options: dict[str, Any] = {"dtype": torch_dtype(dtype_name, device)}
    if work.variant and device != "cpu":
        options["variant"] = work.variant
    started = time.perf_counter()
    cls = getattr(diffusers, work.pipeline_class)
    pipeline: Any = cls.from_pretrained(str(work.source), **options)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(device)
    if channels_last:
        for name in ("unet", "vae"):
            module = getattr(pipeline, name, None)
            if isinstance(module, torch.nn.Module):
                module.to(memory_format=torch.channels_last)
    log(f"{work.arch}: plain pipeline loaded in {time.perf_counter() - started:.1f} s")
    generator_device = "cpu" if device == "cpu" else device

    def one(seed: int) -> float:
        begin = time.perf_counter()
        pipeline(
            prompt=PROMPT,
            width=work.width,
            height=work.height,
            num_inference_steps=work.steps,
            guidance_scale=work.guidance,
            generator=torch.Generator(device=generator_device).manual_seed(seed),
            output_type="pil",
        )
        synchronize(device)
        return time.perf_counter() - begin

    try:
        for i in range(warmup):
            one(FIRST_SEED - 1 - i)
        latencies = []
        begin = time.perf_counter()
        for i in range(images):
            latencies.append(one(FIRST_SEED + i))
        wall = time.perf_counter() - begin
    finally:
        pipeline = None  # the server gets the device to itself
        release_memory(device)
    return ModeResult(work.arch, MODES[0], 1, images, wall, latencies)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def models_file(work: Workload, args: argparse.Namespace) -> str:
    """The models file that registers the benchmark model (or tunes impasto:tiny@1)."""
    settings: dict[str, Any] = {
        "dtype": args.dtype,
        "steps": work.steps,
        "guidance_scale": work.guidance,
        "pipeline_class": work.pipeline_class,
        "max_batch_size": args.max_batch_size,
        # The default pixel budget (4 MP) would cap 1024x1024 batches at 4.
        "max_batch_pixels": args.max_batch_size * work.width * work.height,
    }
    if work.variant:
        settings["variant"] = work.variant
    if args.compile:
        settings["compile"] = True
    lines = [f"[models.{toml_value(work.air)}]"]
    if work.arch != "tiny":  # the built-in tiny entry keeps its backend, it only gets settings
        entry: dict[str, Any] = {
            "name": f"benchmark {work.arch} ({work.weights} weights)",
            "backend": "diffusers",
            "architecture": "flux1s" if work.arch == "flux" else work.arch,
            "path": str(work.source),
            "default_width": work.width,
            "default_height": work.height,
            "parameters": ["seed", "steps", "CFGScale"],
        }
        lines += [f"{key} = {toml_value(value)}" for key, value in entry.items()]
    lines.append(f"[models.{toml_value(work.air)}.settings]")
    lines += [f"{key} = {toml_value(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


@dataclass
class ImpastoServer:
    """`python -m impasto serve` in a subprocess with its own data dir and models file."""

    root: Path
    device: str
    work: Workload
    args: argparse.Namespace
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def environment(self) -> dict[str, str]:
        # An operator's own IMPASTO_* (API keys, devices, ...) must not leak into the benchmark.
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMPASTO_")}
        env.update(OFFLINE_ENV)
        env.update(
            IMPASTO_HOST="127.0.0.1",
            IMPASTO_PORT=str(self.port),
            IMPASTO_DATA_DIR=str(self.root / "data"),
            IMPASTO_MODELS=str(self.root / "models.toml"),
            IMPASTO_MODELS_CACHE=str(self.args.cache_dir),
            IMPASTO_DEVICES=self.device,
            IMPASTO_MAX_BATCH_SIZE=str(self.args.max_batch_size),
            IMPASTO_BATCH_WAIT_MS=str(self.args.batch_wait_ms),
            IMPASTO_SAFETY_CHECKER="none",
            IMPASTO_SYNC_TIMEOUT_S="3600",
            IMPASTO_LOG_LEVEL="warning",
            # Load (and, with --compile, compile) before /healthz answers.
            IMPASTO_PRELOAD=self.work.air,
        )
        return env

    def start(self, timeout_s: float) -> None:
        (self.root / "models.toml").write_text(models_file(self.work, self.args))
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "impasto", "serve"],
                env=self.environment(),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"impasto exited with {self.process.returncode}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.base}/healthz").status_code == 200:
                        return
                time.sleep(0.2)
        raise RuntimeError(f"impasto did not answer /healthz within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def inference_task(work: Workload, seed: int) -> list[dict[str, Any]]:
    return [
        {
            "taskType": "imageInference",
            "taskUUID": str(uuid.uuid4()),
            "model": work.air,
            "positivePrompt": PROMPT,
            "width": work.width,
            "height": work.height,
            "steps": work.steps,
            "CFGScale": work.guidance,
            "seed": seed,
            "numberResults": 1,
            "outputType": "URL",
            "outputFormat": "JPG",
        }
    ]


def post_task(client: httpx.Client, url: str, work: Workload, seed: int) -> float:
    begin = time.perf_counter()
    response = client.post(url, json=inference_task(work, seed))
    elapsed = time.perf_counter() - begin
    body = response.json() if response.headers.get("content-type", "").startswith("app") else {}
    items = body.get("data") or []
    if response.status_code != 200 or "errors" in body or not items or "imageURL" not in items[0]:
        raise RuntimeError(f"impasto answered HTTP {response.status_code}: {response.text[:500]}")
    return elapsed


def run_clients(
    server: ImpastoServer, work: Workload, clients: int, images: int, first_seed: int
) -> tuple[float, list[float]]:
    """`clients` threads post `images` tasks in all, each waiting for its reply before the next;
    returns the wall time and every request's latency."""
    url = f"{server.base}/v1"
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []

    def client_loop() -> None:
        with httpx.Client(timeout=3600) as client:
            while True:
                with lock:
                    index = next(counter)
                if index >= images:
                    return
                latency = post_task(client, url, work, first_seed + index)
                with lock:
                    latencies.append(latency)

    begin = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for future in [pool.submit(client_loop) for _ in range(clients)]:
            future.result()
    return time.perf_counter() - begin, latencies


def run_impasto(
    work: Workload, device: str, args: argparse.Namespace, images: int
) -> list[ModeResult]:
    with tempfile.TemporaryDirectory(prefix="impasto-bench-") as tmp:
        server = ImpastoServer(Path(tmp), device, work, args)
        started = time.perf_counter()
        try:
            server.start(timeout_s=args.server_timeout)
            log(f"{work.arch}: impasto up (model loaded) in {time.perf_counter() - started:.1f} s")
            results = []
            for clients in (1, args.clients):
                count = max(images, clients)
                # Warm-up (not measured): one round at this concurrency, so batched shapes have
                # run once (and, with --compile, been compiled) before the clock starts.
                run_clients(server, work, clients, clients * args.warmup, 10_000_000)
                wall, latencies = run_clients(server, work, clients, count, FIRST_SEED)
                mode = MODES[1] if clients == 1 else MODES[2].format(n=clients)
                results.append(ModeResult(work.arch, mode, clients, count, wall, latencies))
                log(f"{work.arch}: {mode}: {count / wall:.3f} images/s")
            return results
        except Exception:
            log(f"impasto server log (last lines):\n{server.log_tail()}")
            raise
        finally:
            server.stop()


# -- targets and report -----------------------------------------------------------------------


def apply_targets(results: list[ModeResult], baseline: ModeResult, on_gpu: bool) -> None:
    """Issue 7's targets (one H100, bf16, random weights), for the full architectures on a GPU."""
    for result in results:
        if not on_gpu or result.mode == MODES[0]:
            continue
        if result.clients == 1:
            result.target = "p50 <= 1.03x plain"
            result.meets_target = result.p50_s <= 1.03 * baseline.p50_s
        elif result.arch == "sdxl":
            result.target = "<= 0.8 s/img and >= 2.5x plain"
            result.meets_target = (
                1 / result.images_per_s <= 0.8
                and result.images_per_s >= 2.5 * baseline.images_per_s
            )
        elif result.arch == "flux":
            result.target = "<= 0.5 s/img"
            result.meets_target = 1 / result.images_per_s <= 0.5


def print_table(rows: list[dict[str, Any]], header: str) -> None:
    columns = [
        ("arch", "arch", "{}"),
        ("mode", "mode", "{}"),
        ("images", "images", "{}"),
        ("images_per_s", "img/s", "{:.3f}"),
        ("s_per_image", "s/img", "{:.3f}"),
        ("p50_s", "p50 s", "{:.3f}"),
        ("ratio_images_per_s", "img/s vs plain", "{:.2f}x"),
        ("ratio_p50", "p50 vs plain", "{:.2f}x"),
        ("target", "target", "{}"),
        ("meets_target", "met", "{}"),
    ]

    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        value = row.get(key)
        if key == "meets_target":
            return "-" if value is None else ("yes" if value else "NO")
        return "-" if value in (None, "") else fmt.format(value)

    table = [[title for _, title, _ in columns]]
    table += [[cell(row, key, fmt) for key, _, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    print(header)
    for number, line in enumerate(table):
        cells = (text.ljust(width) for text, width in zip(line, widths, strict=True))
        print("  ".join(cells).rstrip())
        if number == 0:
            print("  ".join("-" * width for width in widths))


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None, cuda: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if cuda else "cpu", help="torch device")
    parser.add_argument("--arch", default=None, help="comma-separated: sdxl,flux (GPU default)")
    parser.add_argument(
        "--tiny",
        action="store_true",
        default=None,
        help="impasto:tiny@1 at 256x256: a seconds-long CPU check (default without CUDA)",
    )
    parser.add_argument(
        "--toy", action="store_true", help="SDXL/FLUX architectures with toy widths (CPU check)"
    )
    parser.add_argument(
        "--images", type=int, default=8, help="measured images per mode (>= --clients with 8)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds per mode")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (2nd mode)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="IMPASTO_MAX_BATCH_SIZE")
    parser.add_argument(
        "--batch-wait-ms", type=float, default=5.0, help="IMPASTO_BATCH_WAIT_MS (server default)"
    )
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 | float16 | float32")
    parser.add_argument(
        "--weights",
        choices=("auto", "real", "random"),
        default="auto",
        help="auto: real weights when local (paths, HF cache), else random",
    )
    parser.add_argument("--sdxl-path", type=Path, help="local diffusers folder of SDXL base")
    parser.add_argument("--flux-path", type=Path, help="local diffusers folder of FLUX.1-schnell")
    parser.add_argument("--size", type=int, help="width and height (default per architecture)")
    parser.add_argument("--steps", type=int, help="steps (default per architecture)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="the server torch.compiles the denoiser (model setting compile = true) and warms "
        "up at start; the plain loop stays eager",
    )
    parser.add_argument(
        "--baseline-channels-last",
        action="store_true",
        help="plain loop also uses channels_last UNet/VAE, as impasto does",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("IMPASTO_BENCH_CACHE", Path.home() / ".cache/impasto-bench")),
        help="where random-weights pipelines are saved and reused [IMPASTO_BENCH_CACHE]",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file")
    parser.add_argument(
        "--server-timeout", type=float, default=1200, help="seconds for the server to load"
    )
    args = parser.parse_args(argv)
    if args.tiny is None:
        args.tiny = args.arch is None and not args.device.startswith("cuda")
    if args.tiny and args.toy:
        parser.error("--tiny and --toy exclude each other")
    arches = ["tiny"] if args.tiny else (args.arch or "sdxl,flux").split(",")
    args.arches = [a.strip() for a in arches if a.strip()]
    unknown = set(args.arches) - {"sdxl", "flux", "tiny"}
    if unknown:
        parser.error(f"unknown --arch {sorted(unknown)}; choose from sdxl, flux")
    if min(args.images, args.clients, args.max_batch_size) < 1 or args.warmup < 0:
        parser.error("--images, --clients and --max-batch-size must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.update(OFFLINE_ENV)  # before diffusers and transformers are imported
    import torch

    quiet_libraries()

    args = parse_args(argv, torch.cuda.is_available())
    device = args.device
    if device == "cuda":
        device = "cuda:0"
    on_gpu = device.startswith("cuda")
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for arch in args.arches:
        work = resolve_workload(arch, args, device)
        log(
            f"{arch}: {work.weights} weights from {work.source}, {work.width}x{work.height}, "
            f"{work.steps} steps, guidance {work.guidance}"
        )
        baseline = run_plain_loop(
            work, device, args.dtype, args.images, args.warmup, args.baseline_channels_last
        )
        log(f"{arch}: plain loop: {baseline.images_per_s:.3f} images/s")
        results = [baseline, *run_impasto(work, device, args, args.images)]
        apply_targets(results, baseline, on_gpu and work.full_size)
        rows += [result.row(baseline) for result in results]
        runs.append({k: str(v) if isinstance(v, Path) else v for k, v in asdict(work).items()})
    dtype = "float32" if device == "cpu" else args.dtype
    header = (
        f"impasto vs plain diffusers on {device} ({device_description(device)}), {dtype}, "
        f"max batch {args.max_batch_size}, batch wait {args.batch_wait_ms:g} ms, "
        f"compile {'on' if args.compile else 'off'}"
    )
    print_table(rows, header)
    sys.stdout.flush()
    document = {
        "header": header,
        "device": device,
        "device_name": device_description(device),
        "dtype": dtype,
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "max_batch_size": args.max_batch_size,
        "batch_wait_ms": args.batch_wait_ms,
        "clients": args.clients,
        "compile": args.compile,
        "baseline": "diffusers from_pretrained + .to(device), eager, batch 1, "
        + ("channels_last UNet/VAE" if args.baseline_channels_last else "default memory format"),
        "workloads": runs,
        "results": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    log(f"wrote {args.json}")
    return 0


def quiet_libraries() -> None:
    """No progress bars or info chatter from diffusers and transformers on stderr."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.exit(main())
