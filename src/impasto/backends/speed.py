"""The per-model speed options of a diffusers pipeline: memory layout, fused QKV projections,
the attention backend, fp8 weights, torch.compile (regional, cached on disk, CUDA graphs), and
VAE tiling and slicing per call.

Each option is off unless it is lossless and proven (only `channels_last`, on CUDA), and each
fails soft: an option the device, the installed packages or the model cannot take is skipped
with the reason (logged at WARNING, kept in the `SpeedReport`), and the pipeline runs eager
with diffusers' defaults. docs/speed.md describes every setting.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from impasto.backends.speed_settings import (
    SpeedReport,
    SpeedSettings,
    check_speed_settings,
)

__all__ = ["SpeedReport", "apply_speed_settings", "check_speed_settings", "prepare_call"]

log = logging.getLogger("impasto.backends.speed")

# What torch.compiler.save_cache_artifacts returns, kept beside inductor's own cache.
MEGA_CACHE_FILE = "mega-cache.bin"
# Attention backends that run on a CPU (the others need CUDA, an NPU or XLA).
CPU_BACKENDS = frozenset({"native", "_native_math", "_native_flash", "flex"})
FP8_MIN_CAPABILITY = (8, 9)


class OptionSkipped(Exception):
    """An option this pipeline, device or installation cannot take; the message says why."""


def denoiser_of(pipeline: Any) -> Any:
    """The pipeline's UNet or transformer, or None."""
    for name in ("unet", "transformer"):
        module = getattr(pipeline, name, None)
        if module is not None:
            return module
    return None


# -- load time ---------------------------------------------------------------------------------


def apply_speed_settings(
    pipeline: Any, settings: Mapping[str, Any], device: str, *, cache_dir: Path | None = None
) -> SpeedReport:
    """Applies the load-time options to a freshly loaded pipeline already on `device`:
    channels_last, fused QKV, the attention backend and fp8 before compile, which traces them."""
    speed, problems = SpeedSettings.parse(settings)
    report = SpeedReport()
    for key, problem in problems.items():
        report.skip(key, f"invalid setting: {problem}")
    denoiser = denoiser_of(pipeline)
    steps: list[tuple[str, bool, Callable[[], str]]] = [
        (
            "channels_last",
            device.startswith("cuda") if speed.channels_last is None else speed.channels_last,
            lambda: _channels_last(pipeline),
        ),
        ("fuse_qkv", speed.fuse_qkv, lambda: _fuse_qkv(pipeline, denoiser)),
        (
            "attention_backend",
            speed.attention_backend is not None,
            lambda: _attention_backend(denoiser, str(speed.attention_backend), device),
        ),
        ("quantize", speed.quantize == "fp8", lambda: _quantize_fp8(denoiser, device)),
        ("cuda_graphs", speed.cuda_graphs, lambda: _cuda_graphs(speed, device)),
        ("compile_cache", speed.compile and cache_dir is not None, lambda: _cache(cache_dir)),
        ("compile", speed.compile, lambda: _compile(denoiser, speed, device, report)),
    ]
    for setting, wanted, step in steps:
        if not wanted or setting in report.skipped:
            continue
        try:
            label = step()
        except Exception as exc:  # fail soft: the pipeline stays usable without the option
            reason = str(exc) if isinstance(exc, OptionSkipped) else f"{type(exc).__name__}: {exc}"
            if setting == "compile":
                report.compile_failed(reason)
            else:
                report.skip(setting, reason)
        else:
            report.applied.append(label)
            log.info("speed option applied: %s on %s", label, device)
    return report


def _channels_last(pipeline: Any) -> str:
    import torch

    candidates = [getattr(pipeline, name, None) for name in ("unet", "vae")]
    modules = [module for module in candidates if isinstance(module, torch.nn.Module)]
    if not modules:
        raise OptionSkipped("the pipeline has no unet or vae")
    for module in modules:
        module.to(memory_format=torch.channels_last)
    return "channels_last"


def _fuse_qkv(pipeline: Any, denoiser: Any) -> str:
    if denoiser is None:
        raise OptionSkipped("the pipeline has no unet or transformer")
    if hasattr(pipeline, "fuse_qkv_projections"):
        pipeline.fuse_qkv_projections()
    elif hasattr(denoiser, "fuse_qkv_projections"):
        denoiser.fuse_qkv_projections()
    else:
        raise OptionSkipped(f"{type(pipeline).__name__} and its denoiser cannot fuse QKV")
    if not any(getattr(m, "fused_projections", False) for m in denoiser.modules()):
        raise OptionSkipped("no attention module of this model supports fused projections")
    return "fuse_qkv"


def _attention_backend(denoiser: Any, name: str, device: str) -> str:
    import torch
    from diffusers.models import attention_dispatch as dispatch

    if denoiser is None or not hasattr(denoiser, "set_attention_backend"):
        raise OptionSkipped("the denoiser has no set_attention_backend; SDPA kept")
    try:
        backend = dispatch.AttentionBackendName(name)
    except ValueError:
        raise OptionSkipped(f"diffusers has no attention backend {name!r}; SDPA kept") from None
    reasons = []
    if not device.startswith("cuda") and name not in CPU_BACKENDS:
        reasons.append(f"{name} needs a CUDA device and this model is on {device}")
    requirements = getattr(dispatch, "_check_attention_backend_requirements", None)
    if requirements is not None:
        try:
            requirements(backend)
        except RuntimeError as exc:  # a missing or too old package
            reasons.append(str(exc))
    if reasons:
        raise OptionSkipped("; ".join(reasons) + "; SDPA kept")
    processors = [
        m.processor
        for m in denoiser.modules()
        if hasattr(getattr(m, "processor", None), "_attention_backend")
    ]
    if not processors:
        if name == "native":
            return f"attention_backend={name}"  # its processors call torch SDPA already
        raise OptionSkipped(
            f"{type(denoiser).__name__}'s attention processors call torch SDPA directly, not "
            "diffusers' attention dispatch; SDPA kept"
        )
    saved = [(processor, processor._attention_backend) for processor in processors]
    registry = getattr(dispatch, "_AttentionBackendRegistry", None)
    previous = None if registry is None else registry.get_active_backend()[0]
    try:
        denoiser.set_attention_backend(name)
    finally:
        # set_attention_backend also sets the process-wide default: other models keep theirs.
        if registry is not None:
            registry.set_active_backend(previous)
    dtype = getattr(denoiser, "dtype", torch.float32)
    try:
        probe = torch.randn(1, 16, 2, 64, device=device, dtype=dtype)
        dispatch.dispatch_attention_fn(probe, probe, probe, backend=backend)
    except Exception as exc:
        for processor, value in saved:
            processor._attention_backend = value
        raise OptionSkipped(
            f"a test attention call with {name} on {device} in {dtype} failed "
            f"({type(exc).__name__}: {exc}); SDPA kept"
        ) from None
    return f"attention_backend={name}"


def _quantize_fp8(denoiser: Any, device: str) -> str:
    import torch

    reasons = []
    if not device.startswith("cuda"):
        reasons.append(f"fp8 needs a CUDA GPU of compute capability >= 8.9; this is {device}")
    else:
        capability = tuple(torch.cuda.get_device_capability(torch.device(device)))
        if capability < FP8_MIN_CAPABILITY:
            reasons.append(
                f"fp8 needs compute capability >= 8.9 (Ada, Hopper or newer); {device} has "
                f"{capability[0]}.{capability[1]}"
            )
    try:
        torchao = importlib.import_module("torchao.quantization")
    except ImportError:
        reasons.append("torchao is not installed (pip install torchao)")
    if reasons:
        raise OptionSkipped("; ".join(reasons))
    if denoiser is None:
        raise OptionSkipped("the pipeline has no unet or transformer")
    # Per-row scales are the more accurate, but torchao takes them for bfloat16 weights only.
    per_row = getattr(denoiser, "dtype", None) == torch.bfloat16
    granularity = torchao.PerRow() if per_row else torchao.PerTensor()
    config = torchao.Float8DynamicActivationFloat8WeightConfig(granularity=granularity)
    torchao.quantize_(denoiser, config)
    return "quantize=fp8"


def _cuda_graphs(speed: SpeedSettings, device: str) -> str:
    reasons = []
    if not speed.compile:
        reasons.append("needs compile = true")
    if not device.startswith("cuda"):
        reasons.append(f"needs a CUDA device; this model is on {device}")
    if not speed.batch_invariant:
        reasons.append("needs batch_invariant = true (CUDA graphs replay one static shape)")
    if reasons:
        raise OptionSkipped("; ".join(reasons))
    return "cuda_graphs"


def compile_mode(speed: SpeedSettings, device: str, *, cuda_graphs: bool) -> str:
    """The torch.compile mode: max-autotune with CUDA graphs, else the setting or a default."""
    if cuda_graphs:
        return "max-autotune"
    if speed.compile_mode is not None:
        return speed.compile_mode
    return "max-autotune-no-cudagraphs" if device.startswith("cuda") else "default"


def _compile(denoiser: Any, speed: SpeedSettings, device: str, report: SpeedReport) -> str:
    if denoiser is None:
        raise OptionSkipped("the pipeline has no unet or transformer")
    mode = compile_mode(speed, device, cuda_graphs="cuda_graphs" in report.applied)
    regional = speed.compile_regional and bool(getattr(denoiser, "_repeated_blocks", None))
    fullgraph = regional if speed.compile_fullgraph is None else speed.compile_fullgraph
    try:
        if regional:
            denoiser.compile_repeated_blocks(mode=mode, fullgraph=fullgraph)
        else:
            denoiser.compile(mode=mode, fullgraph=fullgraph)
    except Exception:
        _uncompile(denoiser.modules())
        raise
    label = f"compile={'regional' if regional else 'module'}"
    compiled = [m for m in denoiser.modules() if m._compiled_call_impl is not None]
    for module in compiled:
        module._compiled_call_impl = _eager_on_failure(module, compiled, report, label)
    log.info(
        "%s: mode=%s fullgraph=%s, %d modules; the first call compiles them (cold start)",
        label,
        mode,
        fullgraph,
        len(compiled),
    )
    return label


def _uncompile(modules: Any) -> None:
    for module in modules:
        module._compiled_call_impl = None


def _eager_on_failure(
    module: Any, compiled: list[Any], report: SpeedReport, label: str
) -> Callable[..., Any]:
    """torch.compile works at the first call: if it fails there (no C++ compiler, an op it
    cannot trace), every compiled module goes back to eager and the call is rerun eager."""
    import torch

    compiled_call = module._compiled_call_impl
    failure = torch._dynamo.exc.TorchDynamoException

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled_call(*args, **kwargs)
        except failure as exc:
            _uncompile(compiled)
            if label in report.applied:
                # Dynamo's message is many lines: "backend='inductor' raised:", then the cause.
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                summary = " ".join(lines[:2])[:300]
                report.compile_failed(f"{type(exc).__name__} when compiling at a call: {summary}")
            return module._call_impl(*args, **kwargs)

    return call


# -- the compile cache -------------------------------------------------------------------------


def _cache(cache_dir: Path | None) -> str:
    import torch
    import torch._inductor.config as inductor_config

    if cache_dir is None:
        raise OptionSkipped("no cache directory")
    cache_dir.mkdir(parents=True, exist_ok=True)
    # An operator's own TORCHINDUCTOR_CACHE_DIR wins.
    used = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
    inductor_config.fx_graph_cache = True
    mega = cache_dir / MEGA_CACHE_FILE
    loader = getattr(torch.compiler, "load_cache_artifacts", None)
    if loader is not None and mega.is_file():
        try:
            info = loader(mega.read_bytes())
        except Exception as exc:  # a cache from another torch: compile from scratch
            log.warning("cannot load the compile cache %s: %s", mega, exc)
        else:
            log.info("loaded compile artifacts from %s: %s", mega, info)
    return f"compile_cache={used}"


def save_compile_cache(cache_dir: Path) -> Path | None:
    """After warm-up: saves this process's compile artifacts (torch's mega-cache) so the next
    start loads them before compiling; returns the file, or None when there was nothing."""
    import torch

    saver = getattr(torch.compiler, "save_cache_artifacts", None)
    if saver is None:
        return None
    try:
        saved = saver()
        if saved is None:
            return None
        data = saved[0]
        cache_dir.mkdir(parents=True, exist_ok=True)
        path = cache_dir / MEGA_CACHE_FILE
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(data)
        partial.replace(path)
    except Exception as exc:  # fail soft: the next start compiles from the FX graph cache
        log.warning("cannot save the compile cache to %s: %s", cache_dir, exc)
        return None
    log.info("saved %d bytes of compile artifacts to %s", len(data), path)
    return path


# -- per call ----------------------------------------------------------------------------------


def prepare_call(
    pipeline: Any, settings: Mapping[str, Any], width: int, height: int, batch: int
) -> None:
    """VAE tiling on at and above `vae_tiling_min_pixels` (off below), VAE slicing when
    batch > 1, each only when its setting is on."""
    speed, _ = SpeedSettings.parse(settings)
    vae = getattr(pipeline, "vae", None)
    if vae is None:
        return
    tiling = speed.vae_tiling and width * height >= speed.vae_tiling_min_pixels
    if hasattr(vae, "use_tiling") and vae.use_tiling != tiling:
        if tiling:
            vae.enable_tiling()
        else:
            vae.disable_tiling()
    slicing = speed.vae_slicing and batch > 1
    if hasattr(vae, "use_slicing") and vae.use_slicing != slicing:
        if slicing:
            vae.enable_slicing()
        else:
            vae.disable_slicing()
