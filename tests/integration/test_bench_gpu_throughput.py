"""bench/gpu_throughput.py keeps working: its --tiny mode (impasto:tiny@1, CPU-sized) runs the
plain loop and a real `impasto serve` subprocess with 1 and 8 clients, prints the table and
writes the JSON. Speed is not asserted, only that every mode made images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODES = ["plain loop", "impasto 1 client", "impasto 8 clients"]


def test_tiny_benchmark_prints_three_modes_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "results" / "gpu_throughput.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMPASTO_")}
    completed = subprocess.run(
        [
            sys.executable,
            "bench/gpu_throughput.py",
            "--tiny",
            "--images",
            "3",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--json",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    table = completed.stdout.splitlines()
    for mode in MODES:
        assert any(line.startswith(f"tiny  {mode} ") for line in table), completed.stdout

    document = json.loads(out.read_text())
    rows = document["results"]
    assert [row["mode"] for row in rows] == MODES
    assert [row["images"] for row in rows] == [3, 3, 8]
    for row in rows:
        assert row["images_per_s"] > 0
        assert row["p50_s"] > 0
        assert len(row["latencies_s"]) == row["images"]
    assert rows[0]["ratio_images_per_s"] == 1.0
    assert document["workloads"][0]["air"] == "impasto:tiny@1"
