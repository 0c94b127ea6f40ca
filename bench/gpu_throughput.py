"""Throughput and latency of impasto against the plain diffusers pipeline, on one device, for
each speed variant of the server.

  plain loop          the same diffusers pipeline class and weights, called once per image in a
                      loop (batch 1, a fresh generator per image): the baseline
  impasto 1 client    `python -m impasto serve` as a subprocess, one client posting sync
                      imageInference tasks (outputType URL, JPG) one after another
  impasto 8 clients   the same server, 8 clients posting at once (cross-request batching):
                      sustained throughput, counted after the --warmup rounds came back

Each --variants entry is a fresh server: `default` (the model as registered), speed settings
on its models-file entry (docs/speed.md): `compile`, `fuse_qkv`, `attention=NAME` (`_flash_3`,
`_native_cudnn`, `flash`, ...), `fp8` (quantize = "fp8"), or a step cache in every task's
acceleratorOptions: `fbcache=0.08`, `teacache=0.4` (FLUX), `deepcache=3` (SDXL); `+` joins
them (`compile+fuse_qkv`). A variant that does not apply to an architecture is skipped with the
reason. An option the server cannot take here (fp8 or a CUDA attention kernel on a CPU) it skips
itself: the report gives what its log said ("speed option applied: ..." / "speed option ...
skipped: ..."), and a variant whose every option was skipped is not measured.

Architectures (bench/architectures.py): `sdxl` (SDXL base, 1024x1024, 30 steps, CFG 6), `flux`
(FLUX.1-schnell, 4 steps) and `flux-dev` (FLUX.1-dev, 28 steps, guidance 3.5), with real
weights when given (--sdxl-path, --flux-path, --flux-dev-path) or in the Hugging Face cache,
else random weights of the real architecture. Nothing is downloaded (HF_HUB_OFFLINE=1).

    .venv/bin/python bench/gpu_throughput.py                      # GPU: sdxl, flux, flux-dev
    .venv/bin/python bench/gpu_throughput.py --arch flux --variants default,compile,fbcache=0.08
    .venv/bin/python bench/gpu_throughput.py --tiny --images 3    # CPU: impasto:tiny@1, seconds
    .venv/bin/python bench/gpu_throughput.py --arch sdxl,flux-dev --toy --device cpu  # code path

--tiny runs impasto's tiny pipeline at 256x256 (the default without CUDA); --toy the SDXL and
FLUX pipelines at toy widths: both check the code path on a CPU, neither says anything about
GPU speed. The table and --json (default bench/results/gpu_throughput-<device>.json on a GPU,
bench/results/gpu_throughput.json otherwise) give images/s, p50 latency, both as ratios to the
plain loop, and each server's cold start (its start to the first image); on a GPU with the full
architectures the targets are printed beside them. --budget-s skips what no longer fits, and
says so. Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/gpu_throughput.py`: bench/ is on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.architectures import ARCHITECTURES, GPU_ARCHES
from bench.devices import device_description, device_slug, release_memory
from bench.gpu_models import Workload, resolve_workload
from bench.harness import BENCH_DIR, OFFLINE_ENV, logger, package_version, quiet_libraries
from bench.throughput_report import REFERENCES, apply_targets, print_notes, print_table
from bench.throughput_runs import ModeResult, VariantRun, run_plain_loop, run_variant
from bench.variants import Variant, parse_variants, variant_skip_reason, with_compile

log = logger("gpu_throughput")
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_JSON = RESULTS_DIR / "gpu_throughput.json"


# -- the order of runs, and the time budget ---------------------------------------------------


def schedule(arches: list[str], variants: list[Variant]) -> list[tuple[str, Variant]]:
    """The order runs happen in: every architecture's first variant, then each further variant
    across the architectures, so that a time budget cuts the later variants, not a whole
    architecture."""
    first = [(arch, variants[0]) for arch in arches]
    return first + [(arch, variant) for variant in variants[1:] for arch in arches]


@dataclass
class Budget:
    """A soft time limit for the whole run, checked before each step (a step is not cut)."""

    seconds: float | None
    clock: Callable[[], float] = time.monotonic
    started: float = 0.0

    def __post_init__(self) -> None:
        self.started = self.clock()

    def used(self) -> float:
        return self.clock() - self.started

    def left(self) -> float | None:
        return None if self.seconds is None else self.seconds - self.used()

    def refusal(self, estimate_s: float | None = None) -> str | None:
        """Why the next step must not start: the budget is spent, or the step would overrun it
        (`estimate_s`: what the same step took before); None to go on."""
        if self.seconds is None:
            return None
        used = self.used()
        if used >= self.seconds:
            return f"time budget spent ({used:.0f} s of {self.seconds:.0f} s)"
        if estimate_s is not None and used + estimate_s > self.seconds:
            return (
                f"time budget: {used:.0f} s of {self.seconds:.0f} s used, and a variant of this "
                f"architecture took {estimate_s:.0f} s"
            )
        return None


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None, cuda: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if cuda else "cpu", help="torch device")
    parser.add_argument(
        "--arch", default=None, help="comma-separated: sdxl,flux,flux-dev (the GPU default)"
    )
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
        "--variants",
        default="default",
        help="comma-separated server variants: default, compile, fuse_qkv, attention=NAME, "
        "fp8, fbcache[=0.08], teacache[=0.4], deepcache[=3]; join with + (compile+fuse_qkv)",
    )
    parser.add_argument("--images", type=int, default=8, help="measured images per mode")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="unmeasured rounds per mode (a round: one image per client)",
    )
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
    parser.add_argument("--flux-dev-path", type=Path, help="local diffusers folder of FLUX.1-dev")
    parser.add_argument("--size", type=int, help="width and height (default per architecture)")
    parser.add_argument("--steps", type=int, help="steps (default per architecture)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="every variant also sets compile = true (the plain loop stays eager)",
    )
    parser.add_argument(
        "--baseline-channels-last",
        action="store_true",
        help="plain loop also uses channels_last UNet/VAE, as impasto does",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="time budget of the whole run: variants (and architectures) that would start "
        "after it is spent, or that would overrun it, are skipped and listed",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("IMPASTO_BENCH_CACHE", Path.home() / ".cache/impasto-bench")),
        help="where random-weights pipelines are saved and reused [IMPASTO_BENCH_CACHE]",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="results file (default bench/results/gpu_throughput-<device name>.json on a GPU, "
        "bench/results/gpu_throughput.json otherwise)",
    )
    parser.add_argument(
        "--server-timeout", type=float, default=1200, help="seconds for the server to load"
    )
    args = parser.parse_args(argv)
    if args.tiny is None:
        args.tiny = args.arch is None and not args.device.startswith("cuda")
    if args.tiny and args.toy:
        parser.error("--tiny and --toy exclude each other")
    arches = ["tiny"] if args.tiny else (args.arch or ",".join(GPU_ARCHES)).split(",")
    args.arches = list(dict.fromkeys(a.strip() for a in arches if a.strip()))
    unknown = set(args.arches) - set(ARCHITECTURES)
    if unknown:
        parser.error(f"unknown --arch {sorted(unknown)}; choose from {', '.join(GPU_ARCHES)}")
    if min(args.images, args.clients, args.max_batch_size) < 1 or args.warmup < 0:
        parser.error("--images, --clients and --max-batch-size must be positive")
    try:
        args.variant_list = parse_variants(args.variants)
    except ValueError as exc:
        parser.error(f"--variants: {exc}")
    if args.compile:
        args.variant_list = list({v.name: v for v in map(with_compile, args.variant_list)}.values())
    return args


@dataclass
class ArchRun:
    """An architecture's workload and plain loop, set up once for all its variants."""

    work: Workload | None = None
    baseline: ModeResult | None = None
    why_not: str = ""  # why there is no baseline: skipped or failed
    failed: bool = False
    variant_estimate_s: float | None = None  # what its first variant run took


def set_up(arch: str, args: argparse.Namespace, device: str) -> ArchRun:
    """The workload (weights built if needed) and the plain loop; a failure is recorded."""
    stage = "the weights"
    try:
        work = resolve_workload(arch, args, device)
        log(
            f"{arch}: {work.weights} weights from {work.source}, {work.width}x{work.height}, "
            f"{work.steps} steps, guidance {work.guidance}"
        )
        stage = "the plain loop"
        baseline = run_plain_loop(
            work, device, args.dtype, args.images, args.warmup, args.baseline_channels_last
        )
    except Exception as exc:
        why = f"{stage} failed: {type(exc).__name__}: {exc}"
        log(f"{arch}: {why}")
        release_memory(device)
        return ArchRun(why_not=why, failed=True)
    log(f"{arch}: plain loop: {baseline.images_per_s:.3f} images/s")
    return ArchRun(work, baseline)


def run_everything(
    args: argparse.Namespace, device: str
) -> tuple[dict[str, ArchRun], list[VariantRun]]:
    budget = Budget(args.budget_s)
    arches: dict[str, ArchRun] = {}
    runs: list[VariantRun] = []
    for arch, variant in schedule(args.arches, args.variant_list):
        if arch not in arches:
            refusal = budget.refusal()
            arches[arch] = ArchRun(why_not=refusal) if refusal else set_up(arch, args, device)
        state = arches[arch]
        work = state.work
        if work is None or state.baseline is None:
            refusal: str | None = f"no plain loop for {arch}: {state.why_not}"
        else:
            refusal = variant_skip_reason(variant, arch)
            refusal = refusal or budget.refusal(state.variant_estimate_s)
        if refusal or work is None:
            log(f"{arch} [{variant.name}]: skipped: {refusal}")
            runs.append(VariantRun(arch, variant, "skipped", refusal or ""))
            continue
        left = budget.left()
        timeout = args.server_timeout if left is None else min(args.server_timeout, max(left, 60))
        run = run_variant(work, variant, device, args, timeout)
        if state.variant_estimate_s is None and run.status == "ran":
            state.variant_estimate_s = run.elapsed_s
        runs.append(run)
    return arches, runs


def main(argv: list[str] | None = None) -> int:
    os.environ.update(OFFLINE_ENV)  # before diffusers and transformers are imported
    import torch

    quiet_libraries()
    started = time.monotonic()
    args = parse_args(argv, torch.cuda.is_available())
    device = args.device
    if device == "cuda":
        device = "cuda:0"
    on_gpu = device.startswith("cuda")
    arches, runs = run_everything(args, device)

    rows: list[dict[str, Any]] = []
    workloads: list[dict[str, Any]] = []
    for arch, state in arches.items():
        if state.work is None or state.baseline is None:
            continue
        results = [state.baseline]
        results += [r for run in runs if run.arch == arch for r in run.results]
        apply_targets(results, state.baseline, on_gpu and state.work.full_size)
        rows += [result.row(state.baseline) for result in results]
        record = asdict(state.work)
        workloads.append({k: str(v) if isinstance(v, Path) else v for k, v in record.items()})

    name = device_description(device)
    dtype = "float32" if device == "cpu" else args.dtype
    variants = ", ".join(v.name for v in args.variant_list)
    header = (
        f"impasto vs plain diffusers on {device} ({name}), {dtype}, max batch "
        f"{args.max_batch_size}, batch wait {args.batch_wait_ms:g} ms, {args.clients} clients, "
        f"variants: {variants}"
        + ("" if args.budget_s is None else f", time budget {args.budget_s:g} s")
    )
    print_table(rows, header)
    full = on_gpu and any(s.work is not None and s.work.full_size for s in arches.values())
    print_notes(runs, args.arches, full)
    sys.stdout.flush()
    document = {
        "header": header,
        "device": device,
        "device_name": name,
        "dtype": dtype,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"),
        "torchao": package_version("torchao"),
        "max_batch_size": args.max_batch_size,
        "batch_wait_ms": args.batch_wait_ms,
        "clients": args.clients,
        "images": args.images,
        "warmup_rounds": args.warmup,
        "compile": args.compile,
        "variants": [v.name for v in args.variant_list],
        "budget_s": args.budget_s,
        "elapsed_s": round(time.monotonic() - started, 1),
        "baseline": "diffusers from_pretrained + .to(device), eager, batch 1, "
        + ("channels_last UNet/VAE" if args.baseline_channels_last else "default memory format"),
        "sustained": "server modes count the images after the first --warmup rounds, from the "
        "last warm-up reply to the last reply",
        "workloads": workloads,
        "not_run": {a: s.why_not for a, s in arches.items() if s.baseline is None},
        "results": rows,
        "variant_runs": [run.record() for run in runs],
        "references": [REFERENCES[a] for a in args.arches if a in REFERENCES],
    }
    path = args.json
    if path is None:
        path = RESULTS_DIR / f"gpu_throughput-{device_slug(name)}.json" if on_gpu else DEFAULT_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    log(f"wrote {path}")
    failed = [s for s in arches.values() if s.failed] + [r for r in runs if r.status == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
