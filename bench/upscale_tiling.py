"""What tiling buys an upscale: peak memory and time of impasto's Swin2SRUpscaler with its tile
setting against the same model run on the whole image at once (the baseline: what a loader
without tiling does), each in a fresh process so peak RSS is that run's own.

The model is the tiny Swin2SR x4 (random weights, built in code), so the numbers say how the
activations scale, not how fast a real checkpoint is; on a GPU the same holds for VRAM.

    .venv/bin/python bench/upscale_tiling.py [--side 768] [--tile 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def one_run(side: int, tile: int, models_dir: Path) -> dict[str, float]:
    """In this process: upscale a side x side image x4 with `tile` (0: the whole image)."""
    import torch
    from PIL import Image

    from impasto.backends.devices import DeviceWorker
    from impasto.backends.registry import ModelRegistry
    from impasto.backends.utility.base import UpscaleRequest
    from impasto.backends.utility.factory import utility_source
    from impasto.backends.utility.upscalers import Swin2SRUpscaler

    torch.set_num_threads(1)
    entry = ModelRegistry.load(None).get("impasto:tiny-upscaler@1")
    assert entry is not None
    entry = replace(entry, settings={**entry.settings, "tile": tile or side * 2})
    source = utility_source(entry, models_dir)
    worker = DeviceWorker("cpu")
    model = Swin2SRUpscaler(entry, source, worker)
    image = Image.effect_noise((side, side), 64).convert("RGB")

    async def run() -> float:
        await model.run(UpscaleRequest(Image.new("RGB", (16, 16)), 4))  # load
        started = time.perf_counter()
        output = await model.run(UpscaleRequest(image, 4))
        assert isinstance(output, Image.Image)
        assert output.size == (side * 4, side * 4)
        return time.perf_counter() - started

    seconds = asyncio.run(run())
    worker.shutdown()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_rss_mb": peak_mb}


def measure(side: int, tile: int, models_dir: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--one", str(side), str(tile), str(models_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", type=int, default=768)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--one", nargs=3)
    args = parser.parse_args()
    if args.one:
        side, tile, models_dir = args.one
        print(json.dumps(one_run(int(side), int(tile), Path(models_dir))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = Path(tmp)
        whole = measure(args.side, 0, models_dir)
        tiled = measure(args.side, args.tile, models_dir)
    print(f"x4 upscale of {args.side}x{args.side}, tiny Swin2SR, CPU, 1 thread")
    print(f"{'':14}{'seconds':>10}{'peak RSS MB':>14}")
    print(f"{'whole image':14}{whole['seconds']:>10.2f}{whole['peak_rss_mb']:>14.0f}")
    print(f"{f'tile {args.tile}':14}{tiled['seconds']:>10.2f}{tiled['peak_rss_mb']:>14.0f}")
    print(
        f"tiled/whole: time {tiled['seconds'] / whole['seconds']:.2f}x, "
        f"peak memory {tiled['peak_rss_mb'] / whole['peak_rss_mb']:.2f}x"
    )


if __name__ == "__main__":
    main()
