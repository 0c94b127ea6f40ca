"""Lint, types and the layer rules run as part of the test command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*command: str) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"


def test_ruff_lint() -> None:
    _run(str(BIN / "ruff"), "check", "src", "tests", "bench", "examples")


def test_ruff_format() -> None:
    _run(str(BIN / "ruff"), "format", "--check", "src", "tests", "bench", "examples")


def test_mypy_strict() -> None:
    _run(str(BIN / "mypy"))


@pytest.mark.parametrize("config", ["pyproject.toml"])
def test_import_layers(config: str) -> None:
    _run(str(BIN / "lint-imports"), config)
