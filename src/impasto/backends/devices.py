"""Devices and their worker threads: all work for one device runs on its one thread."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

# Held while weights are loaded or modules built (from_pretrained, LoRA, textual inversion,
# IP-Adapter, the tiny builds). diffusers and accelerate build models under
# `init_empty_weights`, which patches torch.nn.Module for the whole process: a module built
# in another thread meanwhile gets meta tensors ("Cannot copy out of meta tensor"). Loading is
# rare and disk-bound; inference does not take this lock.
LOAD_LOCK = threading.RLock()

T = TypeVar("T")


class ModelCache:
    """Which models are resident on one device, kept within a memory budget.

    Every use marks a model most recently used; registering one that does not fit unloads the
    least recently used others until it does (a model larger than the whole budget is kept
    alone). Called only from the device's worker thread, so it needs no lock.
    """

    def __init__(self, budget_bytes: int | None) -> None:
        self.budget_bytes = budget_bytes
        self._resident: OrderedDict[str, tuple[int, Callable[[], None]]] = OrderedDict()

    def use(self, key: str, size_bytes: int, unload: Callable[[], None]) -> list[str]:
        """Mark `key` (of `size_bytes`) resident and most recent; returns the keys evicted."""
        self._resident[key] = (size_bytes, unload)
        self._resident.move_to_end(key)
        evicted: list[str] = []
        if self.budget_bytes is None:
            return evicted
        while self.used_bytes > self.budget_bytes and len(self._resident) > 1:
            victim, (_, victim_unload) = next(iter(self._resident.items()))
            del self._resident[victim]
            victim_unload()
            evicted.append(victim)
        return evicted

    def forget(self, key: str) -> None:
        self._resident.pop(key, None)

    @property
    def used_bytes(self) -> int:
        return sum(size for size, _ in self._resident.values())

    def resident(self) -> list[str]:
        """Keys from least to most recently used."""
        return list(self._resident)


class DeviceWorker:
    """One device (`cpu`, `cuda:0`, ...), the single thread that runs its work in order, and
    the cache of models resident on it."""

    def __init__(self, device: str, budget_bytes: int | None = None) -> None:
        self.device = device
        self.models = ModelCache(budget_bytes)
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


def device_budget(device: str, budget_gb: float | None) -> int | None:
    """Bytes of model weights to keep on a device: the setting, else 90 % of a GPU's memory,
    and no limit for the CPU."""
    if budget_gb is not None:
        return int(budget_gb * 1024**3)
    if not device.startswith("cuda"):
        return None
    import torch

    total = int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return int(total * 0.9)


class DevicePool:
    """The device workers of this process, created on first use."""

    def __init__(
        self,
        requested: Sequence[str],
        budget_gb: float | None = None,
        torch_threads: int | None = None,
    ) -> None:
        self._requested = list(requested)
        self._budget_gb = budget_gb
        self._torch_threads = torch_threads
        self._workers: list[DeviceWorker] | None = None
        self._next = 0

    def workers(self) -> list[DeviceWorker]:
        if self._workers is None:
            if self._torch_threads:
                import torch

                # Process-wide: on a shared CPU, oversubscribed threads cost more than they give.
                torch.set_num_threads(self._torch_threads)
            self._workers = [
                DeviceWorker(d, device_budget(d, self._budget_gb))
                for d in resolve_devices(self._requested)
            ]
        return self._workers

    def assign(self) -> DeviceWorker:
        """The device for the next model loaded: round robin over the devices."""
        workers = self.workers()
        worker = workers[self._next % len(workers)]
        self._next += 1
        return worker

    def shutdown(self) -> None:
        for worker in self._workers or []:
            worker.shutdown()
