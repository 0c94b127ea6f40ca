"""bench/ws_sessions.py runs end to end (with 20 sessions instead of 200), so it cannot rot.
It asserts nothing about speed: only that every session was held and every task came back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ws_sessions_bench_holds_every_session_and_loses_no_task(tiny_models_dir: Path) -> None:
    sessions = 20
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "ws_sessions.py"),
            f"--sessions={sessions}",
            "--tasks-per-session=1",
            "--size=64",
            "--timeout=120",
            f"--models-cache={tiny_models_dir}",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        # One torch thread: the server's generations then do not fight the other test
        # processes for the CPUs (the bench measures the WebSocket layer, not the model).
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["sessions_held"] == sessions
    for transport in ("ws", "rest"):
        assert summary[transport]["images"] == sessions
        assert summary[transport]["lost"] == 0
        assert summary[transport]["tasks_per_s"] > 0
        assert summary[transport]["p50_s"] <= summary[transport]["p99_s"]
    assert all(kb > 0 for kb in summary["rss_kb"].values())
    assert isinstance(summary["kb_per_idle_session"], float)
