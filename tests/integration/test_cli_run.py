"""`impasto run TASKS.json --url ... --out DIR` against a real server on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from tests.conftest import RunningServer, tiny_task


def impasto_run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    env.pop("IMPASTO_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "impasto", "run", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def write_tasks(path: Path, tasks: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(tasks))
    return path


def test_cli_run_saves_one_image_of_the_requested_size(
    server: RunningServer, tmp_path: Path
) -> None:
    task = tiny_task(width=96, height=64)
    tasks_file = write_tasks(tmp_path / "tasks.json", [task])
    out = tmp_path / "out"

    result = impasto_run(str(tasks_file), "--url", server.url, "--out", str(out))

    assert result.returncode == 0, result.stdout + result.stderr
    (saved,) = list(out.iterdir())
    assert saved.name.startswith(task["taskUUID"])
    with Image.open(saved) as image:
        assert (image.format, image.size) == ("JPEG", (96, 64))


def test_cli_run_saves_base64_and_data_uri_outputs(server: RunningServer, tmp_path: Path) -> None:
    tasks = [
        tiny_task(outputType="base64Data", outputFormat="PNG"),
        tiny_task(outputType="dataURI", outputFormat="WEBP", width=80),
    ]
    tasks_file = write_tasks(tmp_path / "tasks.json", tasks)
    out = tmp_path / "out"

    result = impasto_run(str(tasks_file), "--url", server.url, "--out", str(out))

    assert result.returncode == 0, result.stdout + result.stderr
    saved = sorted(out.iterdir())
    assert len(saved) == 2
    sizes = set()
    for path in saved:
        with Image.open(path) as image:
            sizes.add((image.format, image.size))
    assert sizes == {("PNG", (64, 64)), ("WEBP", (80, 64))}


def test_cli_run_with_a_bad_task_exits_1_and_prints_the_error_code(
    server: RunningServer, tmp_path: Path
) -> None:
    tasks_file = write_tasks(tmp_path / "tasks.json", [tiny_task(width=10)])
    out = tmp_path / "out"

    result = impasto_run(str(tasks_file), "--url", server.url, "--out", str(out))

    assert result.returncode == 1, result.stdout + result.stderr
    assert "invalidWidth" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert list(out.iterdir()) == []


def test_cli_run_sends_the_api_key(server_factory: Any, tmp_path: Path) -> None:
    server = server_factory(api_keys=["k1"])
    tasks_file = write_tasks(tmp_path / "tasks.json", [tiny_task()])
    out = tmp_path / "out"

    refused = impasto_run(str(tasks_file), "--url", server.url, "--out", str(out))
    accepted = impasto_run(
        str(tasks_file), "--url", server.url, "--out", str(out), "--api-key", "k1"
    )

    assert refused.returncode == 1
    assert "missingApiKey" in refused.stdout + refused.stderr
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert len(list(out.iterdir())) == 1
