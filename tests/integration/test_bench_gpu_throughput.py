"""bench/gpu_throughput.py keeps working on a CPU: its --tiny mode (impasto:tiny@1, CPU-sized)
runs the plain loop and a real `impasto serve` subprocess per variant with 1 and 2 clients,
prints the table and writes the JSON. `fp8` is skipped by the server itself on a CPU (the
reason it logged is recorded), `deepcache=3` runs as acceleratorOptions on every task, and
`teacache=0.4` is skipped by the benchmark (the tiny model has a UNet). Speed is not asserted,
only that every mode made images and every skip has its reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODES = ["plain loop", "impasto 1 client", "impasto 2 clients"]


def test_tiny_benchmark_runs_each_variant_or_records_why_not(tmp_path: Path) -> None:
    out = tmp_path / "results" / "gpu_throughput.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMPASTO_")}
    command = [sys.executable, "bench/gpu_throughput.py", "--tiny", "--size", "128"]
    command += ["--images", "2", "--clients", "2", "--cache-dir", str(tmp_path / "cache")]
    command += ["--variants", "default,fp8,deepcache=3,teacache=0.4", "--json", str(out)]
    completed = subprocess.run(
        command,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    table = completed.stdout.splitlines()
    cells = [line.split()[:5] for line in table]
    assert ["tiny", "-", "plain", "loop", "2"] in cells, completed.stdout
    for variant in ("default", "deepcache=3"):
        for mode in MODES[1:]:
            assert ["tiny", variant, *mode.split()] in cells, completed.stdout
    assert any("fp8" in line and "quantize skipped" in line for line in table), completed.stdout

    document = json.loads(out.read_text())
    assert document["device_name"]
    assert document["torch"]
    assert document["diffusers"]
    assert document["variants"] == ["default", "fp8", "deepcache=3", "teacache=0.4"]
    rows = document["results"]
    assert [(row["variant"], row["mode"]) for row in rows] == [
        ("", "plain loop"),
        ("default", "impasto 1 client"),
        ("default", "impasto 2 clients"),
        ("deepcache=3", "impasto 1 client"),
        ("deepcache=3", "impasto 2 clients"),
    ]
    assert [row["images"] for row in rows] == [2, 2, 2, 2, 2]
    for row in rows:
        assert row["images_per_s"] > 0
        assert row["p50_s"] > 0
        assert len(row["latencies_s"]) == row["images"]
    assert rows[0]["ratio_images_per_s"] == 1.0
    assert [row["lossy"] for row in rows] == [False, False, False, True, True]
    assert all(row["cold_start_s"] > 0 for row in rows if row["clients"] == 1 and row["variant"])
    assert document["workloads"][0]["air"] == "impasto:tiny@1"

    runs = {run["variant"]: run for run in document["variant_runs"]}
    assert [runs[v]["status"] for v in document["variants"]] == [
        "ran",
        "skipped",
        "ran",
        "skipped",
    ]
    assert "fp8" in runs["fp8"]["server"]["requested"]["quantize"]  # the server's own reason
    assert runs["fp8"]["reason"].startswith("the server skipped quantize: ")
    assert runs["deepcache=3"]["acceleratorOptions"] == {"deepCache": True, "deepCacheInterval": 3}
    assert runs["deepcache=3"]["n_clients"]["images_per_s"] > 0
    assert runs["deepcache=3"]["server"]["skipped"] == {}
    assert "UNet" in runs["teacache=0.4"]["reason"]
    assert "server" not in runs["teacache=0.4"]  # the benchmark skipped it: no server started
