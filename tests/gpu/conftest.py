"""Opt-in GPU tests: everything in this folder is skipped unless IMPASTO_GPU_TESTS=1 and torch
sees a CUDA device. Run them with bench/gpu_check.sh, or:

    IMPASTO_GPU_TESTS=1 .venv/bin/python -m pytest tests/gpu -q
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _require_cuda() -> None:
    if os.environ.get("IMPASTO_GPU_TESTS") != "1":
        pytest.skip("GPU tests are opt-in: set IMPASTO_GPU_TESTS=1")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("IMPASTO_GPU_TESTS=1 but torch sees no CUDA device")
