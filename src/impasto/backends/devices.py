"""Devices and their worker threads: all work for one device runs on its one thread."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class DeviceWorker:
    """One device (`cpu`, `cuda:0`, ...) and the single thread that runs its work in order."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"impasto-{device.replace(':', '')}"
        )

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        call = functools.partial(context.run, fn, *args)
        return await loop.run_in_executor(self._executor, call)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def resolve_devices(requested: Sequence[str]) -> list[str]:
    """`auto` means every CUDA device if there is one, else the CPU."""
    if list(requested) not in ([], ["auto"]):
        return list(requested)
    try:
        import torch
    except ImportError:
        return ["cpu"]
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


class DevicePool:
    """The device workers of this process, created on first use."""

    def __init__(self, requested: Sequence[str]) -> None:
        self._requested = list(requested)
        self._workers: list[DeviceWorker] | None = None

    def workers(self) -> list[DeviceWorker]:
        if self._workers is None:
            self._workers = [DeviceWorker(d) for d in resolve_devices(self._requested)]
        return self._workers

    def shutdown(self) -> None:
        for worker in self._workers or []:
            worker.shutdown()
