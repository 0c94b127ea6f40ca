"""`impasto generate` and `impasto models` as a user runs them: subprocesses, in this process on
the embedded defaults (no server) and against a real server on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.conftest import RunningServer


def impasto(
    *args: str, data_dir: Path, models_dir: Path, columns: int = 80
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "IMPASTO_DATA_DIR": str(data_dir),
        "IMPASTO_MODELS_CACHE": str(models_dir),
        "IMPASTO_SAFETY_CHECKER": "none",
        "IMPASTO_TORCH_THREADS": "1",
        "COLUMNS": str(columns),
    }
    for name in ("IMPASTO_API_KEY", "IMPASTO_API_KEYS", "RUNWAYML_API_SECRET"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "impasto", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def saved_paths(stdout: str) -> list[Path]:
    """`PATH  seed S  cost C` per image."""
    return [Path(line.split()[0]) for line in stdout.splitlines() if "  seed " in line]


def test_generate_in_process_writes_two_pngs_without_a_server(
    tmp_path: Path, tiny_models_dir: Path
) -> None:
    out = tmp_path / "out"
    done = impasto(
        "generate", "a red kite", "--model", "impasto:tiny@1", "-n", "2", "--format", "png",
        "--size", "96x64", "--seed", "41", "--steps", "2", "--out", str(out),
        data_dir=tmp_path / "data", models_dir=tiny_models_dir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    paths = saved_paths(done.stdout)
    assert sorted(paths) == sorted(out.iterdir())
    assert len(paths) == 2
    seeds = sorted(int(line.split("  seed ")[1].split()[0]) for line in done.stdout.splitlines())
    assert seeds == [41, 42]
    assert all("  cost " in line for line in done.stdout.splitlines())
    for path in paths:
        with Image.open(path) as image:
            assert (image.format, image.size) == ("PNG", (96, 64))
    # The same seed gives the same image on the same device, run after run.
    again = impasto(
        "generate", "a red kite", "--size", "96x64", "--seed", "41", "--steps", "2",
        "--out", str(tmp_path / "again"),
        data_dir=tmp_path / "data", models_dir=tiny_models_dir,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    first = next(p for p in paths if "-41." in p.name)
    assert saved_paths(again.stdout)[0].read_bytes() == first.read_bytes()


def test_generate_against_a_server(server: RunningServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = impasto(
        "generate", "a lighthouse", "--url", server.base, "-n", "1", "--format", "webp",
        "--size", "64x64", "--steps", "1", "--out", str(out),
        data_dir=tmp_path / "unused", models_dir=tmp_path / "unused-models",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [path] = saved_paths(done.stdout)
    with Image.open(path) as image:
        assert (image.format, image.size) == ("WEBP", (64, 64))
    # Nothing ran in the CLI's own process: it made no state of its own.
    assert not (tmp_path / "unused").exists()


def test_generate_errors_are_one_line_and_a_non_zero_exit(
    server: RunningServer, tmp_path: Path, tiny_models_dir: Path
) -> None:
    cases = [
        (["generate", "", "--url", server.base], "invalidPositivePrompt"),
        (["generate", "x", "--url", server.base, "--model", "nope:1@1"], "parameter: model"),
        (["generate", "x", "--url", server.base, "--size", "64x"], "--size must look like"),
        (["generate", "x", "--url", server.base, "--format", "bmp"], "--format must be one of"),
        (["generate", "x", "--url", "http://127.0.0.1:9"], "cannot reach http://127.0.0.1:9/v1"),
        (
            ["generate", "x", "--url", server.base, "--ref", str(tmp_path / "no.png")],
            "cannot read reference image",
        ),
    ]
    for args, expected in cases:
        done = impasto(*args, data_dir=tmp_path / "d", models_dir=tiny_models_dir)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, (args, done.stderr)
        assert lines[0].startswith("impasto generate: "), lines
        assert expected in lines[0], (args, lines)
        assert "Traceback" not in done.stderr


def test_models_piped_shows_full_air_ids_in_plain_columns(
    tmp_path: Path, tiny_models_dir: Path
) -> None:
    done = impasto("models", data_dir=tmp_path, models_dir=tiny_models_dir, columns=40)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:2] == ["AIR", "name"]
    airs = [line.split()[0] for line in lines[1:]]
    for air in ("impasto:tiny@1", "impasto:tiny-controlnet@1", "runway:4@1", "runware:101@1"):
        assert air in airs
    assert "…" not in done.stdout
    assert not any(ch in done.stdout for ch in "┃│━")  # no table drawing in a pipe
    runway = next(line for line in lines if line.startswith("runway:4@1 "))
    assert "no: no Runway API key" in runway
    tiny = next(line for line in lines if line.startswith("impasto:tiny@1 "))
    assert "yes: built in" in tiny
    assert "cpu" in tiny.split()


def test_models_json_for_scripts(tmp_path: Path, tiny_models_dir: Path) -> None:
    done = impasto("models", "--json", data_dir=tmp_path, models_dir=tiny_models_dir)
    assert done.returncode == 0, done.stderr
    rows = {row["air"]: row for row in json.loads(done.stdout)}
    tiny = rows["impasto:tiny@1"]
    assert tiny["ready"] is True
    assert tiny["defaultSize"] == [512, 512]
    assert "text2img" in tiny["modes"]
    assert tiny["device"] == "cpu"
    assert rows["runway:4@1"]["ready"] is False
    assert rows["runway:4@1"]["device"] == "runway API"
    assert rows["impasto:tiny-lora@1"]["category"] == "lora"
    assert rows["impasto:tiny-lora@1"]["defaultSize"] is None
