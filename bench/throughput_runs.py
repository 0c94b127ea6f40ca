"""What bench/gpu_throughput.py measures of one architecture: the plain diffusers loop
(`run_plain_loop`), and each variant's fresh impasto server with 1 and then --clients clients
(`run_variant`), with what the server's log says it did with the speed options
(`parse_server_log`).
"""

from __future__ import annotations

import argparse
import itertools
import re
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.devices import release_memory, synchronize, torch_dtype
from bench.gpu_models import Workload, inference_task, models_file
from bench.harness import PROMPT, ServerProcess, clean_env, impasto_serve, logger
from bench.variants import CACHE_DEFAULTS, Variant

log = logger("gpu_throughput")
FIRST_SEED = 1000
MODES = ("plain loop", "impasto 1 client", "impasto {n} clients")


# -- measurements -----------------------------------------------------------------------------


@dataclass
class ModeResult:
    arch: str
    mode: str
    clients: int
    images: int
    wall_s: float  # the measured window (after the warm-up)
    latencies_s: list[float] = field(repr=False)
    variant: str = ""  # empty for the plain loop
    lossy: bool = False
    cold_start_s: float | None = None  # server start to first image (1-client rows)
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
        if self.cold_start_s is not None:
            record["cold_start_s"] = round(self.cold_start_s, 2)
        return record


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


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


# -- the server --------------------------------------------------------------------------------


def impasto_server(
    root: Path, device: str, work: Workload, args: argparse.Namespace
) -> ServerProcess:
    """`python -m impasto serve` for `work` on `device`, with the benchmark's batching and its
    data under `root`; the caller writes the models file."""
    # An operator's own IMPASTO_* (API keys, devices, ...) must not leak into the benchmark.
    env = clean_env("IMPASTO_")
    env.update(
        IMPASTO_MODELS_CACHE=str(args.cache_dir),
        IMPASTO_DEVICES=device,
        IMPASTO_MAX_BATCH_SIZE=str(args.max_batch_size),
        IMPASTO_BATCH_WAIT_MS=str(args.batch_wait_ms),
        # INFO: the speed options applied and the warm-up time are logged at INFO.
        IMPASTO_LOG_LEVEL="info",
        IMPASTO_LOG_FORMAT="text",
        # Load (and, with compile, compile) before /readyz answers 200.
        IMPASTO_PRELOAD=work.air,
    )
    # In this process's group: a `timeout` around the benchmark stops the server with it.
    return impasto_serve(root, env, new_session=False, poll_s=0.2, stop_timeout_s=60.0)


@dataclass
class ServerReport:
    """What the server's log says it did with the speed options and the step cache."""

    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # setting -> reason
    warmup_s: float | None = None

    def status(self, setting: str) -> str:
        """`applied`, `skipped: reason`, or `not reported` for one requested setting (a step
        cache is only logged when a call runs without it)."""
        if setting in self.skipped:
            return f"skipped: {self.skipped[setting]}"
        if setting in CACHE_DEFAULTS:
            return "asked on every task (no call logged running without it)"
        if any(label.split("=")[0] == setting for label in self.applied):
            return "applied"
        return "not reported"


_APPLIED = re.compile(r"speed option applied: (?P<label>\S+) on \S+\s*$")
_SKIPPED = re.compile(r"speed option (?P<setting>\S+) skipped: (?P<reason>.*?)\s*$")
_WARMED = re.compile(r"warmed up \S+ in (?P<seconds>[\d.]+) s \(speed options: (?P<labels>.*)\)")
_NO_CACHE = re.compile(r": running without (?P<method>\w+): (?P<reason>.*?)\s*$")


def parse_server_log(text: str) -> ServerReport:
    """The speed options' lines of an impasto log (speed.py, the warm-up, the step cache)."""
    report = ServerReport()
    warmed: list[str] | None = None
    for line in text.splitlines():
        if match := _APPLIED.search(line):
            report.applied.append(match["label"])
        elif match := _SKIPPED.search(line):
            setting = match["setting"]
            report.skipped[setting] = match["reason"]
            # compile is moved from applied to skipped when its first call fails.
            report.applied = [a for a in report.applied if a.split("=")[0] != setting]
        elif match := _WARMED.search(line):
            report.warmup_s = float(match["seconds"])
            labels = match["labels"].strip()
            warmed = [] if labels == "none" else [s.strip() for s in labels.split(",")]
        elif match := _NO_CACHE.search(line):
            report.skipped.setdefault(match["method"].lower(), match["reason"])
    if warmed is not None:
        report.applied = warmed
    return report


def post_task(
    client: httpx.Client, url: str, work: Workload, seed: int, variant: Variant | None = None
) -> float:
    begin = time.perf_counter()
    response = client.post(url, json=inference_task(work, seed, variant))
    elapsed = time.perf_counter() - begin
    body = response.json() if response.headers.get("content-type", "").startswith("app") else {}
    items = body.get("data") or []
    if response.status_code != 200 or "errors" in body or not items or "imageURL" not in items[0]:
        raise RuntimeError(f"impasto answered HTTP {response.status_code}: {response.text[:500]}")
    return elapsed


@dataclass(frozen=True)
class Measured:
    """One run of clients: the measured window after the warm-up, and its latencies."""

    wall_s: float
    latencies_s: list[float]
    first_done: float  # time.perf_counter() of the first reply, warm-up included


def run_clients(
    server: ServerProcess, work: Workload, variant: Variant, clients: int, warm: int, images: int
) -> Measured:
    """`clients` threads post `warm + images` tasks in all, each waiting for its reply before
    the next. The first `warm` replies are the warm-up: the window starts at the last of them
    (at the start without warm-up) and ends at the last reply, so the count is sustained
    throughput, without the ramp-up of the first batch."""
    url = f"{server.base}/v1"
    counter = itertools.count()
    lock = threading.Lock()
    done: list[tuple[float, float]] = []  # (reply time, latency)

    def client_loop() -> None:
        with httpx.Client(timeout=3600) as client:
            while True:
                with lock:
                    index = next(counter)
                if index >= warm + images:
                    return
                latency = post_task(client, url, work, FIRST_SEED + index, variant)
                with lock:
                    done.append((time.perf_counter(), latency))

    begin = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for future in [pool.submit(client_loop) for _ in range(clients)]:
            future.result()
    done.sort()
    window_start = done[warm - 1][0] if warm else begin
    measured = done[warm:]
    return Measured(done[-1][0] - window_start, [lat for _, lat in measured], done[0][0])


@dataclass
class VariantRun:
    """One variant on one architecture: its two server modes, or why it did not run."""

    arch: str
    variant: Variant
    status: str  # ran | skipped | failed
    reason: str = ""  # why it was skipped, or the error
    results: list[ModeResult] = field(default_factory=list)
    server: ServerReport | None = None
    startup_s: float | None = None  # server start to /healthz (load and warm-up)
    first_image_s: float | None = None  # server start to the first image a client got
    elapsed_s: float = 0.0
    log_tail: str = ""

    @property
    def all_skipped_by_server(self) -> bool:
        """Every option the variant asked for was skipped: it would run as the default."""
        requested = self.variant.requested
        return bool(self.server and requested) and all(
            self.server.status(key).startswith("skipped") for key in requested
        )

    def record(self) -> dict[str, Any]:
        variant = self.variant
        record: dict[str, Any] = {
            "arch": self.arch,
            "variant": variant.name,
            "status": self.status,
            "reason": self.reason,
            "lossy": variant.lossy,
            "settings": variant.settings,
            "acceleratorOptions": variant.accelerator,
            "startup_s": _rounded(self.startup_s),
            "cold_start_s": _rounded(self.first_image_s),
            "elapsed_s": round(self.elapsed_s, 2),
        }
        if self.server is not None:
            record["server"] = {
                "applied": self.server.applied,
                "skipped": self.server.skipped,
                "warmup_s": self.server.warmup_s,
                "requested": {key: self.server.status(key) for key in variant.requested},
            }
        for result in self.results:
            key = "one_client" if result.clients == 1 else "n_clients"
            record[key] = {
                "clients": result.clients,
                "images_per_s": round(result.images_per_s, 4),
                "s_per_image": round(1 / result.images_per_s, 4),
                "p50_s": round(result.p50_s, 4),
            }
        if self.log_tail:
            record["server_log_tail"] = self.log_tail
        return record


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def run_variant(
    work: Workload, variant: Variant, device: str, args: argparse.Namespace, timeout_s: float
) -> VariantRun:
    """A fresh server with the variant, 1 client then --clients clients. A variant whose every
    option the server skipped at load is not measured (it would run as the default); a failure
    (the server does not start, a task comes back with an error) is recorded, not raised."""
    run = VariantRun(work.arch, variant, "ran")
    name = f"{work.arch} [{variant.name}]"
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="impasto-bench-") as tmp:
        root = Path(tmp)
        server = impasto_server(root, device, work, args)
        try:
            (root / "models.toml").write_text(models_file(work, args, variant))
            server.launch()
            server.wait_ready(timeout_s)
            run.startup_s = time.perf_counter() - server.started_at
            log(f"{name}: impasto up (loaded, warmed up) in {run.startup_s:.1f} s")
            run.server = parse_server_log(server.log_text())
            if run.all_skipped_by_server:
                reasons = [f"{key}: {run.server.skipped[key]}" for key in variant.requested]
                run.status = "skipped"
                run.reason = f"the server skipped {'; '.join(reasons)} (not measured)"
            else:
                measure(server, work, run, args)
        except Exception as exc:
            run.status, run.reason = "failed", f"{type(exc).__name__}: {exc}"
            run.log_tail = server.log_tail(40)
            log(f"{name} failed: {run.reason}\nserver log (last lines):\n{run.log_tail}")
        finally:
            server.stop()
            run.server = parse_server_log(server.log_text())
    run.elapsed_s = time.perf_counter() - begin
    for key in variant.requested:
        log(f"{name}: {key}: {run.server.status(key)}")
    return run


def measure(
    server: ServerProcess, work: Workload, run: VariantRun, args: argparse.Namespace
) -> None:
    """The server modes: 1 client, then --clients clients, into `run`."""
    variant = run.variant
    name = f"{work.arch} [{variant.name}]"
    for clients in dict.fromkeys((1, args.clients)):
        # At least one full round, and whole rounds, so the last batch is full too.
        count = max(args.images, clients)
        count = -(-count // clients) * clients
        measured = run_clients(server, work, variant, clients, clients * args.warmup, count)
        mode = MODES[1] if clients == 1 else MODES[2].format(n=clients)
        result = ModeResult(
            work.arch,
            mode,
            clients,
            count,
            measured.wall_s,
            measured.latencies_s,
            variant=variant.name,
            lossy=variant.lossy,
        )
        if clients == 1:
            run.first_image_s = result.cold_start_s = measured.first_done - server.started_at
            log(f"{name}: cold start (server start to first image) {run.first_image_s:.1f} s")
        run.results.append(result)
        log(f"{name}: {mode}: {result.images_per_s:.3f} images/s")
