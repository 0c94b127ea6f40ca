"""The torch device and dtype of bench/gpu_throughput.py: which dtype a setting means on a
device, where new tensors are made, waiting for the device, handing its memory back, and its
name.
"""

from __future__ import annotations

import contextlib
import gc
import platform
import re
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def default_device_and_dtype(device: str, dtype: Any) -> Iterator[None]:
    """Create tensors on `device` in `dtype`: random weights are made where they will run,
    without a float32 copy (FLUX in float32 would not fit next to its bf16 copy)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def torch_dtype(name: str, device: str) -> Any:
    """The dtype impasto's DiffusersBackend uses for a `dtype` setting on `device`."""
    import torch

    if device == "cpu" or name in ("float32", "fp32"):
        return torch.float32
    return {"float16": torch.float16, "fp16": torch.float16}.get(name, torch.bfloat16)


def release_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return str(torch.cuda.get_device_name(torch.device(device)))
    return platform.processor() or platform.machine()


def device_slug(name: str) -> str:
    """A file-name form of a device name: `NVIDIA H200` -> `nvidia-h200`."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"
