"""How fast is impasto:tiny@1 on one CPU core, and what does impasto add around it?

Runs, in one process with torch limited to one thread: (a) the plain diffusers pipeline call
(baseline) and (b) impasto's DiffusersBackend on the same saved pipeline (its device thread,
per-image generators, crop to the exact size), at several sizes; prints the median seconds
per image and the ratio. The target from issue 2: 1920x1080 under one second.

    .venv/bin/python bench/tiny_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from impasto.backends.base import GenerationJob
from impasto.backends.devices import DeviceWorker
from impasto.backends.diffusers_backend import DiffusersBackend
from impasto.backends.registry import TINY_AIR, ModelRegistry
from impasto.backends.tiny import ensure_tiny_pipeline

SIZES = [(512, 512), (1024, 1024), (1920, 1080)]


def median_seconds(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = ensure_tiny_pipeline(Path(tmp) / "impasto-tiny")
        entry = ModelRegistry.load(None).resolve(TINY_AIR).target
        steps = int(entry.settings["steps"])
        guidance = float(entry.settings["guidance_scale"])

        from diffusers import StableDiffusionPipeline

        plain = StableDiffusionPipeline.from_pretrained(path)
        plain.set_progress_bar_config(disable=True)
        worker = DeviceWorker("cpu")
        backend = DiffusersBackend(entry, path, [worker], max_batch_size=1)

        async def through_impasto(width: int, height: int) -> None:
            job = GenerationJob(
                task_uuid="bench",
                index=0,
                model=TINY_AIR,
                prompt="a lighthouse at dusk",
                width=width,
                height=height,
                seed=1,
            )
            await backend.generate([job], lambda jobs, percent: None, _checkpoint)

        loop = asyncio.new_event_loop()
        print(f"impasto:tiny@1, {steps} steps, CFG {guidance}, torch threads = 1 (CPU)")
        print(f"{'size':>10} {'plain s':>9} {'impasto s':>10} {'ratio':>7} {'< 1 s':>6}")
        for width, height in SIZES:
            # The pipeline needs sides divisible by its VAE factor: impasto rounds up and crops.
            w16, h16 = -(-width // 16) * 16, -(-height // 16) * 16

            def baseline(w: int = w16, h: int = h16) -> None:
                plain(
                    "a lighthouse at dusk",
                    width=w,
                    height=h,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(1),
                )

            def ours(w: int = width, h: int = height) -> None:
                loop.run_until_complete(through_impasto(w, h))

            base = median_seconds(baseline, args.repeats)
            mine = median_seconds(ours, args.repeats)
            print(
                f"{width}x{height:<5} {base:9.3f} {mine:10.3f} {mine / base:7.2f} "
                f"{'yes' if mine < 1 else 'NO':>6}"
            )
        loop.close()
        worker.shutdown()


async def _checkpoint(job: GenerationJob, data: Any) -> None:
    return None


if __name__ == "__main__":
    main()
