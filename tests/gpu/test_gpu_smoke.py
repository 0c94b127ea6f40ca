"""impasto on a CUDA device: the tiny model through a real server, batching that keeps each
image (within rounding, or bit-exact for `batch_invariant` models), and the throughput benchmark
on the real SDXL architecture with random weights."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from impasto.backends.registry import TINY_AIR
from tests.conftest import RunningServer, tiny_task

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
CUDA = "cuda:0"
SEED = 4242
# diffusers_backend.py: batching changes the order kernels sum in, so a batched image may differ
# from the same seed made alone by rounding (one 8-bit level on the CPU); allow 2 on a GPU.
MAX_PIXEL_DIFFERENCE = 2


def generate(server: RunningServer, number: int, seed: int = SEED) -> list[np.ndarray]:
    """`number` PNG images of one task, decoded, in seed order."""
    task = tiny_task(
        width=256,
        height=256,
        seed=seed,
        numberResults=number,
        outputType="base64Data",
        outputFormat="PNG",
    )
    response = server.post([task])
    assert response.status_code == 200, response.text
    items = sorted(response.json()["data"], key=lambda item: item["seed"])
    assert [item["seed"] for item in items] == list(range(seed, seed + number))
    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(item["imageBase64Data"]))).convert("RGB"))
        for item in items
    ]


def batch_sizes(server: RunningServer) -> list[int]:
    backend: Any = server.runtime().scheduler.backend_of(TINY_AIR)
    return list(backend.batch_sizes)


def test_tiny_model_generates_on_cuda_through_a_real_server(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory(devices=[CUDA])
    before = torch.cuda.memory_allocated(CUDA)

    task = tiny_task(width=512, height=512, outputType="URL")
    response = server.post([task])

    assert response.status_code == 200, response.text
    (item,) = response.json()["data"]
    assert item["imageURL"].endswith(".jpg")
    assert torch.cuda.memory_allocated(CUDA) > before  # the pipeline now lives on the GPU


def test_batched_images_match_unbatched_on_cuda(
    server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    alone = server_factory(tmp_path / "alone", devices=[CUDA], max_batch_size=1)
    batched = server_factory(
        tmp_path / "batched", devices=[CUDA], max_batch_size=4, batch_wait_ms=500
    )

    expected = [generate(alone, 1, SEED + i)[0] for i in range(4)]
    got = generate(batched, 4)

    assert batch_sizes(batched) == [4]
    for one, other in zip(expected, got, strict=True):
        difference = np.abs(one.astype(np.int16) - other.astype(np.int16))
        assert int(difference.max()) <= MAX_PIXEL_DIFFERENCE


def test_batch_invariant_model_gives_identical_images_batched_or_alone(
    server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    models = tmp_path / "models.toml"
    models.write_text(
        f'[models."{TINY_AIR}".settings]\nbatch_invariant = true\nmax_batch_size = 4\n'
    )
    server = server_factory(devices=[CUDA], models=models, batch_wait_ms=500)

    alone = [generate(server, 1, SEED + i)[0] for i in range(4)]
    together = generate(server, 4)

    assert batch_sizes(server) == [1, 1, 1, 1, 4]
    for one, other in zip(alone, together, strict=True):
        assert np.array_equal(one, other)


def test_benchmark_runs_sdxl_with_random_weights_on_cuda(tmp_path: Path) -> None:
    out = tmp_path / "gpu_throughput.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMPASTO_")}
    if "IMPASTO_BENCH_CACHE" in os.environ:  # share the saved weights with bench/gpu_check.sh
        env["IMPASTO_BENCH_CACHE"] = os.environ["IMPASTO_BENCH_CACHE"]
    # No warm-up rounds: speed is not what this test checks, and they cost a minute.
    command = [sys.executable, "bench/gpu_throughput.py", "--arch", "sdxl", "--images", "2"]
    completed = subprocess.run(
        [*command, "--warmup", "0", "--weights", "random", "--device", "cuda", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    document = json.loads(out.read_text())
    (workload,) = document["workloads"]
    assert (workload["weights"], workload["width"], workload["steps"]) == ("random", 1024, 30)
    rows = document["results"]
    assert [row["mode"] for row in rows] == ["plain loop", "impasto 1 client", "impasto 8 clients"]
    assert all(row["images_per_s"] > 0 for row in rows)
    assert all(row["target"] for row in rows[1:])  # full architecture on a GPU: targets shown
