"""What switching LoRA sets costs, on impasto:tiny@1 (the tiny random-weight model, on CPU).

Two ways to go from one LoRA set to another, measured in the same run, over N switches that
alternate between {tiny-lora@1} and {tiny-lora@2} (weight 1 each):

  (a) hot swap (impasto): one pipeline with both LoRAs resident in a LoraAdapters cache; a
      switch is `activate`, i.e. `set_adapters` with the new names and weights, no I/O;
  (b) reload (baseline): a switch is a fresh `from_pretrained` of the base pipeline and
      `load_lora_weights` of the set's LoRA, as a server without a LoRA cache would do.

Prints the milliseconds per switch of each (median and mean), their ratio, and whether both
ways end on the same pixels (a check that they do the same work, not a timing). The tiny
model's load time is far from a real checkpoint's, so the ratio here is a floor: with a
multi-gigabyte base, (b) costs seconds and (a) stays in milliseconds.

    .venv/bin/python -m bench.lora_switch [--switches 10] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SETS = ("impasto:tiny-lora@1", "impasto:tiny-lora@2")
ASSETS = {"impasto:tiny-lora@1": "lora1", "impasto:tiny-lora@2": "lora2"}


def _quiet(pipeline: Any) -> Any:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _render(pipeline: Any) -> Any:
    import numpy as np
    import torch

    image = pipeline(
        "a lighthouse at dusk",
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(5),
    ).images[0]
    return np.asarray(image)


def hot_swap(pipeline_dir: Path, loras: dict[str, Path], switches: int) -> tuple[list[float], Any]:
    """Seconds per switch with both LoRAs resident, and the pipeline as the last switch left
    it."""
    from diffusers import StableDiffusionPipeline

    from impasto.backends.loras import LoraAdapters

    pipeline = _quiet(StableDiffusionPipeline.from_pretrained(pipeline_dir))
    adapters = LoraAdapters()
    for air in SETS:  # load both once, untimed
        adapters.activate(pipeline, [(air, loras[air], 1.0)])
    times = []
    for index in range(switches):
        air = SETS[index % 2]
        started = time.perf_counter()
        adapters.activate(pipeline, [(air, loras[air], 1.0)])
        times.append(time.perf_counter() - started)
    if adapters.loads != len(SETS):
        raise RuntimeError(f"the hot swap reloaded: {adapters.loads} loads")
    return times, pipeline


def reload(pipeline_dir: Path, loras: dict[str, Path], switches: int) -> tuple[list[float], Any]:
    """Seconds per switch when each switch loads the base and the set's LoRA afresh, and the
    pipeline of the last switch."""
    from diffusers import StableDiffusionPipeline

    def switch_to(air: str) -> Any:
        pipeline = _quiet(StableDiffusionPipeline.from_pretrained(pipeline_dir))
        pipeline.load_lora_weights(
            loras[air], weight_name="pytorch_lora_weights.safetensors", adapter_name="lora"
        )
        pipeline.set_adapters(["lora"], adapter_weights=[1.0])
        return pipeline

    pipeline = switch_to(SETS[1])  # warm the file cache, untimed
    times = []
    for index in range(switches):
        started = time.perf_counter()
        pipeline = switch_to(SETS[index % 2])
        times.append(time.perf_counter() - started)
    return times, pipeline


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--switches", type=int, default=10, help="alternating switches to time")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.switches < 1:
        parser.error("--switches must be at least 1")

    import numpy as np
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from impasto.backends.tiny import ensure_tiny_pipeline
    from impasto.backends.tiny_assets import ensure_tiny_asset

    torch.set_num_threads(args.threads)
    # Loading a text-encoder LoRA makes transformers print a load report each time.
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        pipeline_dir = ensure_tiny_pipeline(models / "impasto-tiny")
        loras = {air: ensure_tiny_asset(name, models, pipeline_dir) for air, name in ASSETS.items()}
        hot, hot_pipeline = hot_swap(pipeline_dir, loras, args.switches)
        cold, cold_pipeline = reload(pipeline_dir, loras, args.switches)
        same_pixels = bool(np.array_equal(_render(hot_pipeline), _render(cold_pipeline)))

    hot_ms = [t * 1000 for t in hot]
    cold_ms = [t * 1000 for t in cold]
    ratio = statistics.median(cold_ms) / statistics.median(hot_ms)
    print(
        f"impasto:tiny@1 (tiny random-weight model) on CPU, torch threads = {args.threads}: "
        f"{args.switches} switches between {SETS[0]} and {SETS[1]}"
    )
    print(f"{'way':<34} {'median ms':>10} {'mean ms':>10}")
    for label, values in (
        ("(a) hot swap (LoraAdapters)", hot_ms),
        ("(b) reload (from_pretrained+LoRA)", cold_ms),
    ):
        print(f"{label:<34} {statistics.median(values):10.2f} {statistics.mean(values):10.2f}")
    print(f"ratio reload / hot swap (median): {ratio:.1f}x")
    print(f"same pixels after the last switch: {'yes' if same_pixels else 'NO'}")
    print("tiny model on CPU: a real checkpoint's reload costs far more; the ratio is a floor.")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "model": "impasto:tiny@1",
                    "device": "cpu",
                    "torch_threads": args.threads,
                    "switches": args.switches,
                    "sets": list(SETS),
                    "hot_swap_ms": hot_ms,
                    "reload_ms": cold_ms,
                    "hot_swap_median_ms": statistics.median(hot_ms),
                    "reload_median_ms": statistics.median(cold_ms),
                    "ratio_median": ratio,
                    "same_pixels": same_pixels,
                },
                indent=2,
            )
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
