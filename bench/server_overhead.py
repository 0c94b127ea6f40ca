"""What impasto's server path costs, against baselines run on the same machine in the same run.

Part A, no model: every server makes a solid 1360x768 JPEG (quality 95) per request, so what
is measured is the server around the model.

  Cog 0.23.1      its Rust HTTP server (coglet) as a Cog container runs it: a cog.yaml, a
                  predictor (bench/cog_predictor.py as predict.py, returning a `cog.Path`: the
                  JSON reply carries it as a data URI), the OpenAPI schema `cog build` would
                  write, `python -m cog.server.http` with COG_PREDICT_TYPE_STUB. Installed into
                  its own venv (bench/.venv-cog, made on first use from PyPI). Cog runs one
                  prediction at a time and answers 409 to the others.
  cog-like        the fallback when Cog cannot be installed (--baseline cog-like):
                  bench/coglike_server.py, Starlette with Cog's semantics (one at a time, 409).
  impasto         `python -m impasto serve` with a models file whose entry is a custom backend
                  without a model (bench/nomodel_backend.py:SolidBackend, concurrency 1, batch
                  limit 1: no batching wait, one job per generate call; --nomodel-batch-limit):
                  sync POST /v1 imageInference, outputType URL, JPG quality 95, so impasto
                  encodes and stores the image per request.

Part B, the tiny model (impasto:tiny@1, a real diffusers Stable Diffusion pipeline with random
weights) at its default size 512x512 (the model's own default, where the model's work dominates
a request as a real model's does; --short uses 256x256), its 2 steps and CFG 2.0:

  plain loop      StableDiffusionPipeline.from_pretrained in this process, one image per call,
                  a fresh generator per image, encoded to JPEG quality 95; half of the images
                  before the impasto levels and half after, so drift in the machine's load shows
  impasto         `impasto serve` with impasto:tiny@1 on the server's defaults
                  (IMPASTO_MAX_BATCH_SIZE 1; --max-batch-size 8 turns on cross-request
                  batching, which on a CPU costs more than it gives: measured 0.89x the plain
                  loop at 8 clients with batches of 8, 1.02x without)

Both use the same torch thread count (--torch-threads, IMPASTO_TORCH_THREADS), 1 by default:
on a small shared CPU, more torch threads than free cores made the same image 10x slower.

All servers start at once before anything is measured (and sit idle while others are measured).
Every level of concurrency runs the same client code against every server: asyncio with one
httpx.AsyncClient, `clients` tasks each posting its next request once the last one is answered
(a refused one is retried after a jittered, doubling pause; refusals are counted apart and only
finished requests count). Reported per level: done requests/s, p50/p99 latency (from the first
attempt), refusals, errors, server CPU ms per request (from /proc), and the ratio to the
baseline. "Added latency" is impasto's p50 at one client minus the bare work: the median
in-process Pillow encode (part A) or the plain loop's p50 (part B).

    .venv/bin/python bench/server_overhead.py                      # both parts, real Cog
    .venv/bin/python bench/server_overhead.py --short              # seconds: CI's check
    .venv/bin/python bench/server_overhead.py --part a --clients 1,4 --requests 100
    .venv/bin/python bench/server_overhead.py --baseline cog-like --json /tmp/out.json

The servers share the machine's cores with this load generator: on a small CPU the numbers say
more about the ratio than about either server alone. Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/server_overhead.py`: bench/ is on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import BENCH_DIR, logger, package_version, table_lines
from bench.loadgen import IMPASTO_OUTPUT_FIELDS, QUALITY
from bench.overhead_parts import HEIGHT, WIDTH, PartA, PartB
from bench.overhead_servers import DEFAULT_COG_VENV, running

log = logger("server_overhead")
DEFAULT_JSON = BENCH_DIR / "results" / "server_overhead.json"


# -- report --------------------------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]], header: str, unit: str, against: str) -> None:
    columns = [
        ("clients", "clients", "{}"),
        ("server", "server", "{}"),
        ("done", "done", "{}"),
        ("refused", "refused", "{}"),
        ("errors", "errors", "{}"),
        ("per_s", f"{unit}/s", "{:.2f}"),
        ("p50_s", "p50 ms", "ms"),
        ("p99_s", "p99 ms", "ms"),
        ("server_cpu_ms_per_request", "srv cpu ms/req", "{:.1f}"),
        ("ratio_per_s", f"{unit}/s vs {against}", "{:.2f}x"),
        ("ratio_p50", f"p50 vs {against}", "{:.2f}x"),
    ]

    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        value = row.get(key)
        if value is None or value == "":
            return "-"
        if fmt == "ms":
            return f"{value * 1000:.1f}"
        return fmt.format(value)

    table = [[title for _, title, _ in columns]]
    table += [[cell(row, key, fmt) for key, _, fmt in columns] for row in rows]
    print(header)
    for line in table_lines(table):
        print(line)
    print()


def clients_text(clients: int) -> str:
    return f"{clients} client{'' if clients == 1 else 's'}"


def report_a(part: dict[str, Any]) -> None:
    name = part["baseline_name"]
    print_table(
        part["results"],
        f"A. no model, {WIDTH}x{HEIGHT} JPEG q{QUALITY} per request: impasto vs {name} "
        f"(baseline: {part['baseline_why']})",
        "req",
        "base",
    )
    encode_ms = part["bare_encode_s"] * 1000
    added = ", ".join(
        f"{server} {value * 1000:+.1f} ms" for server, value in part["added_latency_p50_s"].items()
    )
    print(
        f"   bare encode (in-process Pillow, median) {encode_ms:.2f} ms; p50 minus it at "
        f"{clients_text(part['added_latency_clients'])}: {added}"
    )
    print(
        f"   impasto: batch_limit {part['impasto_settings']['batch_limit']}, backend "
        f"concurrency 1, outputType {part['impasto_settings']['outputType']}; srv cpu = user + "
        "system CPU of the server's processes per done request; refused = 409s retried\n"
    )


def report_b(part: dict[str, Any]) -> None:
    settings = part["impasto_settings"]
    print_table(
        part["results"],
        f"B. {part['model']} {part['size']}x{part['size']}, {part['steps']} steps, CFG "
        f"{part['guidance']}, torch threads {part['torch_threads']}: impasto vs plain diffusers "
        f"loop (max batch {settings['IMPASTO_MAX_BATCH_SIZE']}, batch wait "
        f"{settings['IMPASTO_BATCH_WAIT_MS']} ms)",
        "img",
        "plain",
    )
    added = part["added_latency_p50_s"]
    halves = part["plain_halves_per_s"]
    print(
        f"   plain loop halves (before/after the impasto levels) {halves[0]:.3f} / {halves[1]:.3f}"
        " img/s;"
        f" impasto p50 minus plain p50 at {clients_text(part['added_latency_clients'])}: "
        + ("-" if added is None else f"{added * 1000:+.1f} ms")
    )
    target = part["target"]
    if target["ratio_per_s"] is not None:
        verdict = "met" if target["met"] else "NOT met"
        print(
            f"   target: 8 clients >= {target['wanted_ratio_per_s']}x the plain loop: "
            f"{target['ratio_per_s']:.2f}x, {verdict} (a shared CPU says little about a GPU)"
        )
    print()


def versions() -> dict[str, str]:
    found = {}
    packages = ("impasto", "torch", "diffusers", "transformers", "pillow", "httpx", "uvicorn")
    for package in (*packages, "starlette", "fastapi"):
        if (number := package_version(package)) is not None:
            found[package] = number
    return found


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "loadavg": [round(v, 2) for v in load] if load else None,
    }


# -- main ----------------------------------------------------------------------------------------


def _levels(text: str) -> list[int]:
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return levels


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("a", "b", "both"), default="both")
    parser.add_argument(
        "--short", action="store_true", help="CI: few levels and requests, well under a minute"
    )
    parser.add_argument(
        "--baseline",
        choices=("auto", "cog", "cog-like"),
        default="auto",
        help="part A: auto = real Cog (installed on first use), else the cog-like fallback",
    )
    parser.add_argument("--cog-venv", type=Path, default=DEFAULT_COG_VENV)
    parser.add_argument("--clients", type=_levels, help="part A levels (default 1,4,16,64)")
    parser.add_argument("--requests", type=int, help="part A requests per level (default 200)")
    parser.add_argument("--model-clients", type=_levels, help="part B levels (1,4,8,16,64)")
    parser.add_argument("--model-requests", type=int, help="part B requests per level (128)")
    parser.add_argument("--plain-images", type=int, help="plain loop images (default 64)")
    parser.add_argument(
        "--model-size", type=int, help="part B width = height (512, the model's default)"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads of the plain loop and IMPASTO_TORCH_THREADS: 1, since on a small "
        "shared CPU more threads than free cores make every timing erratic",
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=1, help="IMPASTO_MAX_BATCH_SIZE (server default)"
    )
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="IMPASTO_BATCH_WAIT_MS")
    parser.add_argument("--encode-threads", type=int, default=2, help="IMPASTO_ENCODE_THREADS")
    parser.add_argument(
        "--nomodel-batch-limit", type=int, default=1, help="part A backend's batch limit"
    )
    parser.add_argument("--impasto-output", choices=sorted(IMPASTO_OUTPUT_FIELDS), default="URL")
    parser.add_argument("--retry-ms", type=float, default=5.0, help="first pause after a refusal")
    parser.add_argument("--retry-max-ms", type=float, default=100.0, help="longest such pause")
    parser.add_argument("--encode-repeats", type=int, default=50)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("IMPASTO_BENCH_CACHE", Path.home() / ".cache/impasto-bench")),
        help="where the tiny pipeline is saved and reused [IMPASTO_BENCH_CACHE]",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file")
    parser.add_argument("--server-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    short = args.short
    args.clients = args.clients or ([1, 4] if short else [1, 4, 16, 64])
    args.requests = args.requests or (12 if short else 200)
    args.model_clients = args.model_clients or ([1, 8] if short else [1, 4, 8, 16, 64])
    args.model_requests = args.model_requests or (8 if short else 128)
    args.plain_images = args.plain_images or (4 if short else 64)
    args.model_size = args.model_size or (256 if short else 512)
    if short:
        args.encode_repeats = min(args.encode_repeats, 10)
    if min(args.requests, args.model_requests, args.plain_images, args.torch_threads) < 1:
        parser.error("counts and thread numbers must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    document: dict[str, Any] = {
        "machine_before": machine(),
        "versions": versions(),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory(prefix="impasto-overhead-") as tmp:
        root = Path(tmp)
        part_a = PartA(args, root) if args.part in ("a", "both") else None
        part_b = PartB(args, root) if args.part in ("b", "both") else None
        servers = [*(part_a.servers if part_a else []), *(part_b.servers if part_b else [])]
        meanwhile = part_b.import_libraries if part_b else None
        with running(servers, args.server_timeout, meanwhile):
            if part_a is not None:
                document["part_a"] = part_a.measure()
            if part_b is not None:
                document["part_b"] = part_b.measure()
    document["machine_after"] = machine()
    document["versions"] = versions()  # torch and diffusers are imported by now
    document["elapsed_s"] = round(time.perf_counter() - started, 1)
    before, after = document["machine_before"], document["machine_after"]
    print(
        f"{before['cpu_count']} CPUs, {before['platform']}; load average {before['loadavg']} "
        f"before, {after['loadavg']} after; {document['elapsed_s']} s\n"
    )
    if "part_a" in document:
        report_a(document["part_a"])
    if "part_b" in document:
        report_b(document["part_b"])
    sys.stdout.flush()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    log(f"wrote {args.json}")
    failed = [
        row
        for part in ("part_a", "part_b")
        for row in document.get(part, {}).get("results", [])
        if row["errors"]
    ]
    for row in failed:
        log(f"{row['server']} x{row['clients']}: {row['errors']} errors: {row['error_samples']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
