"""The two parts of bench/server_overhead.py, each with its servers and how it measures them.

`PartA`, no model: the baseline (Cog or cog-like) and impasto with the no-model backend, every
request a solid 1360x768 JPEG, against the bare in-process encode. `PartB`, the tiny model:
impasto serving impasto:tiny@1 against the plain diffusers loop in this process (`PlainLoop`).
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from bench.harness import OFFLINE_ENV, PROMPT, logger, quiet_libraries
from bench.loadgen import (
    QUALITY,
    LevelResult,
    RetryPolicy,
    cog_target,
    impasto_target,
    ratio,
    run_level,
)
from bench.overhead_servers import choose_baseline, cog_server, coglike_server, impasto_server

log = logger("server_overhead")
WIDTH, HEIGHT = 1360, 768
# The colour all three part A servers paint (cog_predictor.py, coglike_server.py,
# nomodel_backend.py): the same pixels to encode everywhere.
COLOUR = (181, 112, 64)
SOLID_AIR = "bench:solid@1"
TINY_AIR = "impasto:tiny@1"


# -- part A: no model ----------------------------------------------------------------------------


def bare_encode_s(repeats: int) -> float:
    """Median seconds of the work every part A server does per request, done in-process."""
    image = Image.new("RGB", (WIDTH, HEIGHT), COLOUR)
    times = []
    for _ in range(repeats + 3):
        buffer = io.BytesIO()
        begin = time.perf_counter()
        image.save(buffer, format="JPEG", quality=QUALITY)
        times.append(time.perf_counter() - begin)
    return statistics.median(times[3:])


def solid_models_file(batch_limit: int) -> str:
    return f"""\
[models."{SOLID_AIR}"]
name = "no model: a solid image per job (server overhead benchmark)"
backend = "bench.nomodel_backend:SolidBackend"
architecture = "none"
default_width = {WIDTH}
default_height = {HEIGHT}
parameters = ["seed"]
[models."{SOLID_AIR}".settings]
batch_limit = {batch_limit}
"""


class PartA:
    """No model: the baseline server (Cog or cog-like) and impasto with SolidBackend."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.kind, self.why = choose_baseline(args)
        if self.kind == "cog":
            self.baseline = cog_server(root / "cog", args.cog_venv)
        else:
            self.baseline = coglike_server(root / "coglike")
        self.impasto_env = {
            "IMPASTO_PRELOAD": SOLID_AIR,
            "IMPASTO_DEVICES": "cpu",
            "IMPASTO_ENCODE_THREADS": str(args.encode_threads),
        }
        self.impasto = impasto_server(
            root / "impasto-a",
            "impasto",
            solid_models_file(args.nomodel_batch_limit),
            self.impasto_env,
        )
        self.servers = [self.baseline, self.impasto]

    def measure(self) -> dict[str, Any]:
        args = self.args
        encode_s = bare_encode_s(args.encode_repeats)
        log(f"A: bare encode of {WIDTH}x{HEIGHT} JPEG q{QUALITY}: {encode_s * 1000:.2f} ms")
        retry = RetryPolicy(args.retry_ms / 1000, args.retry_max_ms / 1000)
        task = {"model": SOLID_AIR, "width": WIDTH, "height": HEIGHT}
        theirs_target = cog_target(self.baseline.base, self.baseline.name, self.baseline.pid)
        ours_target = impasto_target(self.impasto.base, self.impasto.pid, task, args.impasto_output)
        rows: list[dict[str, Any]] = []
        for clients in args.clients:
            requests = max(args.requests, clients)
            theirs = run_level(theirs_target, "A", clients, requests, retry).record()
            mine = run_level(ours_target, "A", clients, requests, retry).record()
            mine["ratio_per_s"] = ratio(mine["per_s"], theirs["per_s"])
            mine["ratio_p50"] = ratio(mine["p50_s"], theirs["p50_s"])
            theirs["ratio_per_s"] = 1.0
            theirs["ratio_p50"] = 1.0
            rows += [theirs, mine]
        first = min(args.clients)
        added = {
            row["server"]: round(row["p50_s"] - encode_s, 5)
            for row in rows
            if row["clients"] == first and row["p50_s"] is not None
        }
        return {
            "baseline": self.kind,
            "baseline_name": self.baseline.name,
            "baseline_why": self.why,
            "baseline_reported": self.baseline.reported.get("version", {}),
            "baseline_command": " ".join(self.baseline.command),
            "baseline_env": {
                k: v
                for k, v in self.baseline.env.items()
                if k.startswith("COG_") or k in ("PORT", "VIRTUAL_ENV")
            },
            "image": {"width": WIDTH, "height": HEIGHT, "format": "JPEG", "quality": QUALITY},
            "bare_encode_s": round(encode_s, 6),
            "added_latency_p50_s": added,
            "added_latency_clients": first,
            "impasto_settings": {
                "model": SOLID_AIR,
                "backend": "bench.nomodel_backend:SolidBackend",
                "backend_concurrency": 1,
                "batch_limit": args.nomodel_batch_limit,
                "outputType": args.impasto_output,
                **self.impasto_env,
            },
            "retry": {"first_ms": args.retry_ms, "max_ms": args.retry_max_ms},
            "results": rows,
        }


# -- part B: the tiny model ----------------------------------------------------------------------


@dataclass
class PlainLoop:
    """The diffusers baseline, loaded once in this process."""

    source: Path
    size: int
    steps: int
    guidance: float
    threads: int
    pipeline: Any = None

    def load(self) -> None:
        import torch
        from diffusers import StableDiffusionPipeline

        torch.set_num_threads(self.threads)  # what IMPASTO_TORCH_THREADS does in the server
        self.pipeline = StableDiffusionPipeline.from_pretrained(str(self.source))
        self.pipeline.set_progress_bar_config(disable=True)

    def one(self, seed: int) -> float:
        import torch

        begin = time.perf_counter()
        image = self.pipeline(
            prompt=PROMPT,
            width=self.size,
            height=self.size,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            output_type="pil",
        ).images[0]
        image.save(io.BytesIO(), format="JPEG", quality=QUALITY)  # the server encodes too
        return time.perf_counter() - begin

    def run(self, images: int, first_seed: int) -> LevelResult:
        self.one(first_seed - 1)  # warm-up, not measured
        result = LevelResult(part="B", server="plain loop", clients=1, requests=images)
        client_before = time.process_time()
        begin = time.perf_counter()
        for i in range(images):
            result.latencies_s.append(self.one(first_seed + i))
        result.wall_s = time.perf_counter() - begin
        result.client_cpu_s = time.process_time() - client_before
        result.server_cpu_s = result.client_cpu_s  # this process does the work: comparable
        result.done = images
        return result

    def close(self) -> None:
        self.pipeline = None
        gc.collect()


def merge(first: LevelResult, second: LevelResult) -> LevelResult:
    return LevelResult(
        part=first.part,
        server=first.server,
        clients=first.clients,
        requests=first.requests + second.requests,
        done=first.done + second.done,
        wall_s=first.wall_s + second.wall_s,
        latencies_s=first.latencies_s + second.latencies_s,
        client_cpu_s=first.client_cpu_s + second.client_cpu_s,
        server_cpu_s=(first.server_cpu_s or 0.0) + (second.server_cpu_s or 0.0),
    )


def tiny_models_file(args: argparse.Namespace, steps: int, guidance: float) -> str:
    size = args.model_size
    return f"""\
[models."{TINY_AIR}".settings]
steps = {steps}
guidance_scale = {guidance}
max_batch_size = {args.max_batch_size}
max_batch_pixels = {args.max_batch_size * size * size}
"""


class PartB:
    """The tiny model: the plain diffusers loop in this process and impasto serving it."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        from impasto.backends.registry import ModelRegistry

        self.args = args
        entry = ModelRegistry.load(None).resolve(TINY_AIR).target
        self.steps = int(entry.settings["steps"])
        self.guidance = float(entry.settings["guidance_scale"])
        self.impasto_env = {
            "IMPASTO_PRELOAD": TINY_AIR,
            "IMPASTO_DEVICES": "cpu",
            # The server builds impasto:tiny@1 there if it is missing; the plain loop then
            # loads the very same saved pipeline.
            "IMPASTO_MODELS_CACHE": str(args.cache_dir),
            "IMPASTO_TORCH_THREADS": str(args.torch_threads),
            "IMPASTO_MAX_BATCH_SIZE": str(args.max_batch_size),
            "IMPASTO_BATCH_WAIT_MS": f"{args.batch_wait_ms:g}",
            "IMPASTO_ENCODE_THREADS": str(args.encode_threads),
        }
        self.server = impasto_server(
            root / "impasto-b",
            "impasto",
            tiny_models_file(args, self.steps, self.guidance),
            self.impasto_env,
        )
        self.servers = [self.server]
        self.plain: PlainLoop | None = None

    @staticmethod
    def import_libraries() -> None:
        """While the servers start: torch and diffusers take seconds to import."""
        os.environ.update(OFFLINE_ENV)  # before diffusers and transformers are imported
        quiet_libraries()

    def measure(self) -> dict[str, Any]:
        from impasto.backends.tiny import ensure_tiny_pipeline

        args = self.args
        # Built by the server before it answered /healthz: found, not rebuilt.
        source = ensure_tiny_pipeline(args.cache_dir / "impasto-tiny")
        plain = PlainLoop(source, args.model_size, self.steps, self.guidance, args.torch_threads)
        plain.load()
        first_half = max(1, args.plain_images // 2)
        task = {
            "model": TINY_AIR,
            "width": args.model_size,
            "height": args.model_size,
            "steps": self.steps,
            "CFGScale": self.guidance,
        }
        retry = RetryPolicy(args.retry_ms / 1000, args.retry_max_ms / 1000)
        target = impasto_target(self.server.base, self.server.pid, task, args.impasto_output)
        levels: list[LevelResult] = []
        try:
            before = plain.run(first_half, 1000)
            log(f"B: plain loop (first half): {before.per_s:.3f} images/s")
            for clients in args.model_clients:
                requests = max(args.model_requests, clients)
                levels.append(run_level(target, "B", clients, requests, retry))
            after = plain.run(max(1, args.plain_images - first_half), 2000)
            log(f"B: plain loop (second half): {after.per_s:.3f} images/s")
        finally:
            plain.close()
        base_row = merge(before, after).record()
        base_row.update(ratio_per_s=1.0, ratio_p50=1.0)
        rows = [base_row]
        for level in levels:
            row = level.record()
            row["ratio_per_s"] = ratio(row["per_s"], base_row["per_s"])
            row["ratio_p50"] = ratio(row["p50_s"], base_row["p50_s"])
            rows.append(row)
        first = min(args.model_clients)
        one = next(row for row in rows[1:] if row["clients"] == first)
        eight = next((row for row in rows[1:] if row["clients"] == 8), None)
        return {
            "model": TINY_AIR,
            "source": str(source),
            "size": args.model_size,
            "steps": self.steps,
            "guidance": self.guidance,
            "torch_threads": args.torch_threads,
            "plain_halves_per_s": [round(before.per_s, 4), round(after.per_s, 4)],
            "added_latency_p50_s": (
                round(one["p50_s"] - base_row["p50_s"], 5) if one["p50_s"] is not None else None
            ),
            "added_latency_clients": first,
            "target": {
                "clients": 8,
                "wanted_ratio_per_s": 0.95,
                "ratio_per_s": eight["ratio_per_s"] if eight else None,
                "met": None if eight is None else bool((eight["ratio_per_s"] or 0) >= 0.95),
            },
            "impasto_settings": {
                **self.impasto_env,
                "model_settings": {
                    "max_batch_size": args.max_batch_size,
                    "max_batch_pixels": args.max_batch_size * args.model_size**2,
                },
                "outputType": args.impasto_output,
            },
            "results": rows,
        }
