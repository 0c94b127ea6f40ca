"""What content checking costs: the checker alone per 1024x1024 image, then impasto end to end
(tiny model, 1024x1024) without and with safety.checkContent, and whether checks hold up the
server: pairs of requests one after the other and at once, without and with checks, with
/healthz latency measured all along.

    .venv/bin/python -m bench.safety_latency [--repeat 5]

Needs the `safety` extra (NudeNet) and the `local` extra (the tiny model). Prints CPU (or
whatever the machine has) numbers; nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from PIL import Image, ImageDraw

from impasto.api.app import create_app
from impasto.backends.safety import NudeNetChecker
from impasto.backends.tiny import ensure_tiny_pipeline
from impasto.service.safety import views
from impasto.settings import Settings

SIDE = 1024


def scenes(count: int) -> list[Image.Image]:
    """Drawn 1024x1024 scenes, different each time (no cache can help)."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        sky = tuple(int(v) for v in rng.integers(90, 230, 3))
        image = Image.new("RGB", (SIDE, SIDE), sky)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = (int(v) for v in rng.integers(0, SIDE, 2))
            color = tuple(int(v) for v in rng.integers(0, 256, 3))
            draw.polygon([(x, y), (x + 300, y + 500), (x - 300, y + 500)], fill=color)
        images.append(image)
    return images


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


def median_time(run: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- the checker alone -----------------------------------------------------------------------


def bench_checker(repeat: int) -> float:
    """Prints the checker's cost; returns the time of one full-mode check."""
    checker = NudeNetChecker.load(max_batch_size=8)
    images = scenes(8)
    checker.scores(images[:1])  # warm-up: the first ONNX run allocates
    one = median_time(lambda: checker.scores(images[:1]), repeat * 4)
    batch = median_time(lambda: checker.scores(images), repeat) / len(images)
    full_views = views(images[0], "full", checker.input_size)
    full = median_time(lambda: checker.scores(full_views), repeat)
    print(f"\nNudeNet checker alone, per {SIDE}x{SIDE} image (onnxruntime CPU):")
    print(f"  fast, one image per call      {ms(one)}")
    print(f"  fast, 8 images per call       {ms(batch)}  (per image)")
    print(f"  full, whole + 4 tiles         {ms(full)}")
    return full


# -- impasto end to end ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(root: Path) -> Iterator[str]:
    models = root / "models"
    ensure_tiny_pipeline(models / "impasto-tiny")
    settings = Settings(
        data_dir=root / "data", models_cache=models, host="127.0.0.1", port=free_port()
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=settings.port, log_level="error"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("impasto did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def task(safety: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    body: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "impasto:tiny@1",
        "positivePrompt": "a lighthouse at dusk",
        "width": SIDE,
        "height": SIDE,
        "outputType": "base64Data",
    }
    if safety is not None:
        body["safety"] = safety
    return [body]


def post(client: httpx.Client, base: str, body: list[dict[str, Any]]) -> dict[str, Any]:
    response = client.post(f"{base}/v1", json=body, timeout=300)
    response.raise_for_status()
    reply: dict[str, Any] = response.json()
    return reply


VARIANTS: dict[str, dict[str, Any] | None] = {
    "without checkContent": None,
    "checkContent, mode fast": {"checkContent": True},
    "checkContent, mode full": {"checkContent": True, "mode": "full"},
}


def bench_end_to_end(base: str, repeat: int) -> None:
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with httpx.Client() as client:
        post(client, base, task({"checkContent": True}))  # warm-up: loads the model
        # Rounds with a rotating order, so that drift in the machine's load, and whatever one
        # request leaves behind for the next, hits every variant alike.
        names = list(VARIANTS)
        for round_ in range(repeat):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                post(client, base, task(VARIANTS[name]))
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    baseline = medians["without checkContent"]
    print(f"\nimpasto end to end, one {SIDE}x{SIDE} image on the tiny model (median of {repeat}):")
    for name, seconds in medians.items():
        added = (seconds - baseline) * 1000
        print(f"  {name:26s}{ms(seconds)}   {added:+7.1f} ms   ratio {seconds / baseline:.3f}")


def bench_concurrency(base: str, repeat: int, full_check_s: float) -> None:
    """Pairs of requests, one after the other and both at once, without and with checks, with
    /healthz polled all along: checks must not hold up the event loop."""
    variants = {
        "without checkContent": None,
        "checkContent, mode full": VARIANTS["checkContent, mode full"],
    }
    sequential: dict[str, list[float]] = {name: [] for name in variants}
    concurrent: dict[str, list[float]] = {name: [] for name in variants}
    polls: dict[str, list[float]] = {name: [] for name in variants}
    idle: list[float] = []
    with httpx.Client() as client, ThreadPoolExecutor(2) as pool:
        for round_ in range(repeat):
            idle.extend(healthz(client, base) for _ in range(20))
            names = list(variants) if round_ % 2 == 0 else list(variants)[::-1]
            for name in names:
                safety = variants[name]
                with polling(base, polls[name]):
                    for at_once in (round_ % 2 == 0, round_ % 2 == 1):
                        start = time.perf_counter()
                        if at_once:
                            pair = [pool.submit(post_once, base, task(safety)) for _ in range(2)]
                            for future in pair:
                                future.result()
                        else:
                            post(client, base, task(safety))
                            post(client, base, task(safety))
                        took = time.perf_counter() - start
                        (concurrent if at_once else sequential)[name].append(took)
    print(f"\nPairs of requests, median of {repeat}; /healthz polled every 10 ms meanwhile:")
    print(
        f"  {'':26s}{'one after other':>16s}{'both at once':>14s}{'ratio':>7s}"
        f"{'healthz p50':>13s}{'p99':>9s}{'max':>9s}"
    )
    for name in variants:
        after = statistics.median(sequential[name])
        once = statistics.median(concurrent[name])
        lat = sorted(polls[name])
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(
            f"  {name:26s}{after * 1000:13.1f} ms{once * 1000:11.1f} ms{once / after:7.2f}"
            f"{statistics.median(lat) * 1000:10.1f} ms{p99 * 1000:6.1f} ms{lat[-1] * 1000:6.1f} ms"
        )
    print(
        f"  /healthz with no request running: p50 {statistics.median(idle) * 1000:.1f} ms, "
        f"max {max(idle) * 1000:.1f} ms; one full check of a {SIDE}x{SIDE} image takes "
        f"{full_check_s * 1000:.1f} ms"
    )


@contextmanager
def polling(base: str, latencies: list[float]) -> Iterator[None]:
    """Polls /healthz every 10 ms from another thread while the block runs."""
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client() as poller:
            while not stop.wait(0.01):
                latencies.append(healthz(poller, base))

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)


def post_once(base: str, body: list[dict[str, Any]]) -> dict[str, Any]:
    with httpx.Client() as client:
        return post(client, base, body)


def healthz(client: httpx.Client, base: str) -> float:
    start = time.perf_counter()
    client.get(f"{base}/healthz", timeout=30).raise_for_status()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"CPU: {os.cpu_count()} logical cores; onnxruntime and torch on CPU")
    full_check_s = bench_checker(args.repeat)
    with tempfile.TemporaryDirectory() as root, running_server(Path(root)) as base:
        bench_end_to_end(base, args.repeat)
        bench_concurrency(base, args.repeat, full_check_s)


if __name__ == "__main__":
    main()
