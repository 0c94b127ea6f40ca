"""DiffusersBackend: any diffusers text-to-image pipeline, by Hugging Face id or local path.

One replica of the pipeline per device, loaded lazily on that device's worker thread and kept
within the device's memory budget (least recently used models are unloaded). Jobs with the
same size, steps, guidance, scheduler and strength run in one pipeline call with one generator
per image, so each image keeps its own seed and its own initial noise.

Batching and pixels: kernels sum in a different order for different batch sizes, so an image
made in a batch of 4 can differ from the same seed made alone by rounding (measured on the
tiny model on CPU: at most ~3e-5 before 8-bit quantisation, i.e. a few pixels one level
apart). Models whose settings say `batch_invariant = true` run every call at their full batch
size, padding with throw-away samples: the shape never changes, and an image is then
bit-identical whether it was batched or alone, at the price of full-batch work at low load.

Image modes (img2img, inpainting, outpainting, LoRA, ControlNet, IP-Adapters, refiner, VAE,
embeddings, prompt weighting) are built per call in diffusers_call.py; the batch key holds
everything they depend on, so jobs of different modes or LoRA sets never share a call.
Loading, and the extras a call adds to a checkpoint, are in diffusers_loading.py.

A CUDA out-of-memory error splits the batch in halves and retries each (the worker never dies
of it); the size that failed is remembered so later batches of that shape start smaller.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from impasto.backends.base import (
    CheckpointCallback,
    GeneratedImage,
    GenerationJob,
    Outcome,
    ProgressCallback,
)
from impasto.backends.call_modes import mode_key
from impasto.backends.devices import DeviceWorker
from impasto.backends.diffusers_call import CallBuilder
from impasto.backends.diffusers_loading import (
    AssetLocator,
    ModelUnavailable,
    Replica,
    ReplicaLoader,
)
from impasto.backends.registry import ModelEntry
from impasto.backends.schedulers import resolve_scheduler
from impasto.backends.speed import save_compile_cache
from impasto.protocol.errors import ImpastoError, InferenceError, InvalidParameter

log = logging.getLogger("impasto.backends.diffusers")

__all__ = ["DiffusersBackend", "ModelUnavailable", "is_out_of_memory"]


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


class DiffusersBackend:
    """Runs one diffusers pipeline, one replica per device."""

    def __init__(
        self,
        entry: ModelEntry,
        source: str | Path,
        workers: Sequence[DeviceWorker],
        max_batch_size: int,
        *,
        offline: bool = False,
        assets: AssetLocator | None = None,
        compile_cache: Path | None = None,
    ) -> None:
        self.entry = entry
        self.source = source
        self._workers = list(workers)
        self._settings: Mapping[str, Any] = entry.settings
        self.max_batch_size = max(1, int(self._settings.get("max_batch_size", max_batch_size)))
        # Pixels of one call (width x height x batch): bounds the batch at large sizes.
        self._max_batch_pixels = int(self._settings.get("max_batch_pixels", 4 * 1024 * 1024))
        self._batch_invariant = bool(self._settings.get("batch_invariant", False))
        self._compile = bool(self._settings.get("compile", False))
        self._loader = ReplicaLoader(
            entry, source, assets, offline=offline, compile_cache=compile_cache
        )
        self._ip_adapter = self._loader.ip_adapter
        self._calls = CallBuilder(
            self._loader,
            self._settings,
            max_batch_size=self.max_batch_size,
            batch_invariant=self._batch_invariant,
        )
        self._replicas: dict[str, Replica] = {}
        self._oom_limits: dict[tuple[int, int], int] = {}
        self._idle: asyncio.Queue[DeviceWorker] | None = None
        self._fetching: asyncio.Task[None] | None = None
        self.compile_seconds: float | None = None
        # Sizes of the batches run so far (bounded), for metrics and tests.
        self.batch_sizes: list[int] = []

    @property
    def concurrency(self) -> int:
        return len(self._workers)

    # -- batching -------------------------------------------------------------------------

    def batch_key(self, job: GenerationJob) -> Hashable:
        # An IP-Adapter call takes one image prompt for the whole batch: only jobs with the
        # same reference (the images of one task) share a call.
        reference: Hashable = bool(job.reference_images)
        if self._ip_adapter is not None and job.reference_images:
            reference = id(job.reference_images[0].image)
        return (
            job.width,
            job.height,
            job.steps,
            job.cfg_scale,
            job.scheduler,
            job.strength,
            reference,
            mode_key(job, self._calls.mode(job)),
        )

    def batch_limit(self, job: GenerationJob) -> int:
        """How many jobs like this one may share a call: the model's maximum, fewer at sizes
        where that many would not fit the pixel budget or ran out of memory before."""
        by_pixels = max(1, self._max_batch_pixels // max(1, job.width * job.height))
        limit = min(self.max_batch_size, by_pixels)
        return min(limit, self._oom_limits.get((job.width, job.height), limit))

    # -- generation -------------------------------------------------------------------------

    async def generate(
        self,
        jobs: Sequence[GenerationJob],
        progress: ProgressCallback,
        checkpoint: CheckpointCallback,
    ) -> list[Outcome]:
        if self._idle is None:
            self._idle = asyncio.Queue()
            for worker in self._workers:
                self._idle.put_nowait(worker)
        worker = await self._idle.get()
        try:
            if worker.device not in self._replicas:
                await self._fetch()
            images = await worker.run(self._generate_split, worker, list(jobs), progress)
        finally:
            self._idle.put_nowait(worker)
        return [
            GeneratedImage(image=image, seed=job.seed)
            for job, image in zip(jobs, images, strict=True)
        ]

    def _generate_split(
        self, worker: DeviceWorker, jobs: list[GenerationJob], progress: ProgressCallback
    ) -> list[Image.Image]:
        try:
            return self._generate(worker, jobs, progress)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            self._release_memory(worker)
            first = jobs[0]
            if len(jobs) == 1:
                log.error(
                    "out of memory for one %dx%d image of %s",
                    first.width,
                    first.height,
                    self.entry.air,
                )
                raise InferenceError(
                    f"Model {self.entry.air} ran out of GPU memory at "
                    f"{first.width}x{first.height}; try a smaller size."
                ) from None
            half = len(jobs) // 2
            self._oom_limits[(first.width, first.height)] = half
            log.warning(
                "out of memory for a batch of %d at %dx%d; splitting",
                len(jobs),
                first.width,
                first.height,
            )
            return self._generate_split(worker, jobs[:half], progress) + self._generate_split(
                worker, jobs[half:], progress
            )

    @staticmethod
    def _release_memory(worker: DeviceWorker) -> None:
        if worker.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def _generate(
        self, worker: DeviceWorker, jobs: list[GenerationJob], progress: ProgressCallback
    ) -> list[Image.Image]:
        replica = self._replica(worker)
        scheduler = self._scheduler(replica, jobs[0].scheduler)
        self.batch_sizes = [*self.batch_sizes[-999:], len(jobs)]
        try:
            images = self._calls.run(replica, worker.device, jobs, progress, scheduler)
        except ImpastoError:
            raise
        except (RuntimeError, ValueError, TypeError) as exc:
            if is_out_of_memory(exc):
                raise
            log.exception("pipeline call failed for %s", self.entry.air)
            raise InferenceError(f"Model {self.entry.air} failed to generate the image.") from exc
        finally:
            # LoRAs, ControlNets and other extras loaded by the call count in the budget.
            self._account(worker, replica)
        return images

    # -- loading ----------------------------------------------------------------------------

    async def _fetch(self) -> None:
        """Bring the weights into the local cache in a thread of its own (downloads can take
        minutes; the device thread goes on serving the models it has). Once per backend."""
        if self._fetching is None:
            self._fetching = asyncio.create_task(asyncio.to_thread(self._loader.fetch))
        await asyncio.shield(self._fetching)

    def _replica(self, worker: DeviceWorker) -> Replica:
        replica = self._replicas.get(worker.device)
        if replica is None:
            replica = self._loader.load(worker.device)
            self._replicas[worker.device] = replica
        self._account(worker, replica)
        return replica

    def _account(self, worker: DeviceWorker, replica: Replica) -> None:
        if self._replicas.get(worker.device) is not replica:
            return
        evicted = worker.models.use(
            self.entry.air, replica.total_bytes, lambda: self._unload(worker)
        )
        for air in evicted:
            log.info("unloaded %s from %s to make room for %s", air, worker.device, self.entry.air)

    def _unload(self, worker: DeviceWorker) -> None:
        if self._replicas.pop(worker.device, None) is not None:
            self._release_memory(worker)

    async def warmup(self) -> float:
        """Load every replica and run one image at the default size (this is when
        torch.compile does its work); returns the seconds it took."""
        width, height = self.entry.rules.sizes.default
        job = GenerationJob(
            task_uuid="warmup",
            index=0,
            model=self.entry.air,
            prompt="warm-up",
            width=width,
            height=height,
            seed=0,
        )
        started = time.monotonic()
        for worker in self._workers:
            await worker.run(self._generate_split, worker, [job], lambda jobs, percent: None)
        seconds = time.monotonic() - started
        speed = self._loader.speed
        speed.record_cold_start(seconds)
        if self._compile:
            self.compile_seconds = seconds
            if self._loader.compile_cache is not None:
                save_compile_cache(self._loader.compile_cache)
        log.info(
            "warmed up %s in %.1f s (speed options: %s)",
            self.entry.air,
            seconds,
            ", ".join(speed.applied) or "none",
        )
        return seconds

    def _scheduler(self, replica: Replica, name: str | None) -> Any:
        """The scheduler for a Runware name; built once from the model's own config."""
        import diffusers

        default = replica.schedulers["Default"]
        wanted = resolve_scheduler(name) if name else None
        if wanted is None:
            return default
        key = name or "Default"
        if key not in replica.schedulers:
            class_name, overrides = wanted
            # Flow-matching models (FLUX, SD3) and noise-prediction models (SD, SDXL) each need
            # a scheduler of their own family; within a family any scheduler works.
            is_flow = "FlowMatch" in type(default).__name__
            if is_flow != ("FlowMatch" in class_name):
                raise InvalidParameter(
                    f"Scheduler {name!r} does not work with model {self.entry.air}.",
                    code="invalidScheduler",
                    parameter="scheduler",
                )
            cls = getattr(diffusers, class_name)
            replica.schedulers[key] = cls.from_config(default.config, **overrides)
        return replica.schedulers[key]

    async def close(self) -> None:
        for worker in self._workers:
            await worker.run(self._unload, worker)
            worker.models.forget(self.entry.air)
