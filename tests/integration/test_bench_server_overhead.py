"""bench/server_overhead.py keeps working: its --short run starts the cog-like baseline, impasto
with the no-model backend and impasto with impasto:tiny@1 as real subprocesses, drives every
level with real HTTP clients, prints both tables and writes the JSON. Speed is not asserted:
only that every part and level finished requests, that the ratios are numbers, and that
impasto refused and failed nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _impasto_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if row["server"] == "impasto"]


def test_short_benchmark_measures_both_parts_against_their_baselines(
    tmp_path: Path, tiny_models_dir: Path
) -> None:
    out = tmp_path / "server_overhead.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMPASTO_")}
    completed = subprocess.run(
        [
            sys.executable,
            "bench/server_overhead.py",
            "--short",
            "--baseline",
            "cog-like",  # no venv to build in CI: the fallback has Cog's semantics
            "--cache-dir",
            str(tiny_models_dir),  # the session's tiny pipeline: not built again
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
    assert any(line.startswith("A. no model") for line in completed.stdout.splitlines())
    assert any(line.startswith("B. impasto:tiny@1") for line in completed.stdout.splitlines())

    document = json.loads(out.read_text())
    assert document["machine_before"]["cpu_count"] >= 1
    part_a, part_b = document["part_a"], document["part_b"]
    assert part_a["baseline"] == "cog-like"

    levels_a = document["arguments"]["clients"]
    assert [(row["clients"], row["server"]) for row in part_a["results"]] == [
        (clients, server) for clients in levels_a for server in ("cog-like", "impasto")
    ]
    levels_b = document["arguments"]["model_clients"]
    assert [(row["clients"], row["server"]) for row in part_b["results"]] == [
        (1, "plain loop"),
        *((clients, "impasto") for clients in levels_b),
    ]

    for row in part_a["results"] + part_b["results"]:
        assert row["done"] == row["requests"] > 0, row
        assert row["per_s"] > 0, row
        assert row["errors"] == 0, row["error_samples"]
        assert _positive_number(row["ratio_per_s"]), row
        assert _positive_number(row["ratio_p50"]), row
        assert len(row["latencies_s"]) == row["done"]
    for row in _impasto_rows(part_a["results"]) + _impasto_rows(part_b["results"]):
        assert row["refused"] == 0, row

    assert _positive_number(part_a["bare_encode_s"])
    assert set(part_a["added_latency_p50_s"]) == {"cog-like", "impasto"}
    assert math.isfinite(part_b["added_latency_p50_s"])
    assert part_b["target"]["clients"] == 8
    assert _positive_number(part_b["target"]["ratio_per_s"])
