"""The workloads bench/gpu_throughput.py runs, and what its server is given for one.

A `Workload` is one architecture (bench/architectures.py) at one size, with its weights: real
ones when given or in the Hugging Face cache, else random ones (bench/random_weights.py).
`models_file` is the models-file entry that registers it with a variant's speed settings
(bench/variants.py), and `inference_task` a task for it. Nothing here downloads anything.
"""

from __future__ import annotations

import argparse
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.architectures import ARCHITECTURES, Architecture
from bench.harness import PROMPT
from bench.random_weights import ensure_random_pipeline
from bench.variants import Variant


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
    variant: str | None = None  # the weights' file variant (fp16), not a speed variant
    full_size: bool = True  # the real architecture (targets apply on a GPU)

    @property
    def spec(self) -> Architecture:
        return ARCHITECTURES[self.arch]


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
    """The weights (real when local, else random, built now if not cached) and the call."""
    spec = ARCHITECTURES[arch]
    if arch == "tiny":
        from impasto.backends.tiny import ensure_tiny_pipeline

        size = args.size or 256
        return Workload(
            arch="tiny",
            air=spec.air,
            pipeline_class=spec.pipeline_class,
            source=ensure_tiny_pipeline(args.cache_dir / "impasto-tiny"),
            weights="tiny",
            width=size,
            height=size,
            steps=args.steps or spec.steps,
            guidance=spec.guidance,
            full_size=False,
        )
    option = f"--{arch}-path"
    given = getattr(args, f"{arch.replace('-', '_')}_path", None)
    real: Path | None = None
    if args.weights != "random" and not args.toy:
        real = given or (cached_snapshot(spec.hub_id) if spec.hub_id else None)
        if args.weights == "real" and real is None:
            raise SystemExit(
                f"--weights real: no local weights for {arch}; pass {option} or put "
                f"{spec.hub_id} in the Hugging Face cache"
            )
    if real is not None:
        source, weights, variant = real, "real", fp16_variant(real, spec.denoiser)
    else:
        source = ensure_random_pipeline(arch, args.cache_dir, device, args.dtype, args.toy)
        weights, variant = "random", None
    size = args.size or (128 if args.toy else 1024)
    return Workload(
        arch=arch,
        air=spec.air,
        pipeline_class=spec.pipeline_class,
        source=source,
        weights=weights,
        width=size,
        height=size,
        steps=args.steps or (spec.toy_steps if args.toy else spec.steps),
        guidance=spec.guidance,
        variant=variant,
        full_size=not args.toy,
    )


# -- what the server is given: the models-file entry and the tasks -----------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def models_file(work: Workload, args: argparse.Namespace, variant: Variant | None = None) -> str:
    """The models file that registers the benchmark model (or tunes impasto:tiny@1), with the
    variant's speed settings."""
    variant = variant or Variant("default")
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
    if getattr(args, "compile", False):
        settings["compile"] = True
    settings.update(variant.settings)
    # The warm-up before /healthz answers runs at the default size: the benchmark's.
    entry: dict[str, Any] = {"default_width": work.width, "default_height": work.height}
    if work.arch != "tiny":  # the built-in tiny entry keeps its backend and parameters
        parameters = ["seed", "steps", "CFGScale"]
        if variant.accelerator:
            parameters.append("acceleratorOptions")
        entry = {
            "name": f"benchmark {work.arch} ({work.weights} weights)",
            "backend": "diffusers",
            "architecture": work.spec.registry_architecture,
            "path": str(work.source),
            **entry,
            "parameters": parameters,
        }
    lines = [f"[models.{toml_value(work.air)}]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in entry.items()]
    lines.append(f"[models.{toml_value(work.air)}.settings]")
    lines += [f"{key} = {toml_value(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def inference_task(
    work: Workload, seed: int, variant: Variant | None = None
) -> list[dict[str, Any]]:
    task: dict[str, Any] = {
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
    if variant is not None and variant.accelerator:
        task["acceleratorOptions"] = dict(variant.accelerator)
    return [task]
