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

Reference images: with an IP-Adapter configured for the model (settings `ip_adapter = {path,
subfolder, weight_name, scale}`), the first reference is an image prompt to the text-to-image
pipeline; otherwise they take the img2img path of the same components
(`AutoPipelineForImage2Image.from_pipe`), starting from the first reference.

A CUDA out-of-memory error splits the batch in halves and retries each (the worker never dies
of it); the size that failed is remembered so later batches of that shape start smaller.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
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
from impasto.backends.devices import DeviceWorker
from impasto.backends.registry import ModelEntry
from impasto.backends.schedulers import resolve_scheduler
from impasto.protocol.errors import ImpastoError, InferenceError, InvalidParameter

log = logging.getLogger("impasto.backends.diffusers")

DEFAULT_STRENGTH = 0.8
PAD_PROMPT = ""


class ModelUnavailable(ImpastoError):
    code = "modelUnavailable"
    http_status = 503


def _dtype(name: str | None, device: str) -> Any:
    import torch

    # Half precision on a CPU is slow or unsupported: CPUs compute in float32.
    if device == "cpu" or name in (None, "float32", "fp32"):
        return torch.float32
    return {"float16": torch.float16, "fp16": torch.float16}.get(name, torch.bfloat16)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


@dataclass
class _Replica:
    """The pipeline on one device, and what was built from it."""

    pipeline: Any
    size_bytes: int
    img2img: Any = None
    schedulers: dict[str, Any] = field(default_factory=dict)


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
    ) -> None:
        self.entry = entry
        self.source = source
        self._workers = list(workers)
        self._settings: Mapping[str, Any] = entry.settings
        self._offline = offline
        self.max_batch_size = max(1, int(self._settings.get("max_batch_size", max_batch_size)))
        # Pixels of one call (width x height x batch): bounds the batch at large sizes.
        self._max_batch_pixels = int(self._settings.get("max_batch_pixels", 4 * 1024 * 1024))
        self._batch_invariant = bool(self._settings.get("batch_invariant", False))
        self._compile = bool(self._settings.get("compile", False))
        adapter = self._settings.get("ip_adapter")
        self._ip_adapter: Mapping[str, Any] | None = adapter if isinstance(adapter, dict) else None
        self._replicas: dict[str, _Replica] = {}
        self._oom_limits: dict[tuple[int, int], int] = {}
        self._idle: asyncio.Queue[DeviceWorker] | None = None
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
        import torch

        first = jobs[0]
        replica = self._replica(worker)
        pipeline = replica.pipeline
        steps = first.steps or int(self._settings.get("steps", 20))
        guidance = (
            first.cfg_scale
            if first.cfg_scale is not None
            else float(self._settings.get("guidance_scale", 7.0))
        )
        multiple = int(getattr(pipeline, "vae_scale_factor", 8)) * int(
            self._settings.get("size_multiple_factor", 1)
        )
        width, height = _round_up(first.width, multiple), _round_up(first.height, multiple)
        seeds = [job.seed for job in jobs]
        prompts = [job.prompt for job in jobs]
        negatives = [job.negative_prompt or "" for job in jobs]
        references = [job.reference_images[0].image for job in jobs if job.reference_images]
        padding = self.max_batch_size - len(jobs) if self._batch_invariant else 0
        if padding > 0:
            seeds += [0] * padding
            prompts += [PAD_PROMPT] * padding
            negatives += [""] * padding
            references += references[:1] * padding if references else []
        generator_device = "cpu" if worker.device == "cpu" else worker.device
        kwargs: dict[str, Any] = {
            "prompt": prompts,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "generator": [torch.Generator(device=generator_device).manual_seed(s) for s in seeds],
            "output_type": "pil",
        }
        if first.reference_images and self._ip_adapter is not None:
            kwargs["width"], kwargs["height"] = width, height
            kwargs["ip_adapter_image"] = [first.reference_images[0].image.convert("RGB")]
        elif first.reference_images:
            pipeline = self._image_to_image(replica)
            strength = first.strength if first.strength is not None else DEFAULT_STRENGTH
            # img2img runs int(steps * strength) steps; keep at least one.
            kwargs["num_inference_steps"] = min(
                1000, max(steps, math.ceil(1 / max(strength, 1e-3)))
            )
            kwargs["strength"] = strength
            kwargs["image"] = [
                image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
                for image in references
            ]
        else:
            kwargs["width"], kwargs["height"] = width, height
        accepted = inspect.signature(pipeline.__call__).parameters
        if any(job.negative_prompt for job in jobs):
            if "negative_prompt" not in accepted:
                raise InvalidParameter(
                    f"Model {self.entry.air} does not take a negativePrompt.",
                    code="unsupportedParameter",
                    parameter="negativePrompt",
                )
            kwargs["negative_prompt"] = negatives

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
            total = max(1, int(getattr(pipe, "_num_timesteps", 0) or steps))
            progress(jobs, min(99, (step + 1) * 100 // total))
            return tensors

        if "callback_on_step_end" in accepted:
            kwargs["callback_on_step_end"] = on_step_end
        pipeline.scheduler = self._scheduler(replica, first.scheduler)
        self.batch_sizes = [*self.batch_sizes[-999:], len(jobs)]
        try:
            output = pipeline(**kwargs)
        except ImpastoError:
            raise
        except (RuntimeError, ValueError) as exc:
            if is_out_of_memory(exc):
                raise
            log.exception("pipeline call failed for %s", self.entry.air)
            raise InferenceError(f"Model {self.entry.air} failed to generate the image.") from exc
        return [
            _center_crop(image, job.width, job.height)
            for job, image in zip(jobs, output.images[: len(jobs)], strict=True)
        ]

    # -- loading ----------------------------------------------------------------------------

    def _replica(self, worker: DeviceWorker) -> _Replica:
        replica = self._replicas.get(worker.device)
        if replica is None:
            replica = self._load(worker)
            self._replicas[worker.device] = replica
        evicted = worker.models.use(
            self.entry.air, replica.size_bytes, lambda: self._unload(worker)
        )
        for air in evicted:
            log.info("unloaded %s from %s to make room for %s", air, worker.device, self.entry.air)
        return replica

    def _unload(self, worker: DeviceWorker) -> None:
        if self._replicas.pop(worker.device, None) is not None:
            self._release_memory(worker)

    def _load(self, worker: DeviceWorker) -> _Replica:
        import diffusers
        import torch

        device = worker.device
        options: dict[str, Any] = {"dtype": _dtype(self._settings.get("dtype"), device)}
        if self._offline:
            options["local_files_only"] = True
        if "variant" in self._settings and device != "cpu":
            options["variant"] = self._settings["variant"]
        class_name = self._settings.get("pipeline_class")
        loader = (
            getattr(diffusers, class_name) if class_name else diffusers.AutoPipelineForText2Image
        )
        started = time.monotonic()
        try:
            pipeline = loader.from_pretrained(str(self.source), **options)
        except (OSError, ValueError) as exc:
            log.error("cannot load %s from %s: %s", self.entry.air, self.source, exc)
            raise ModelUnavailable(
                f"Model {self.entry.air} could not be loaded from {self.source}: its weights are "
                "not in the local cache and could not be downloaded. Download them where there "
                f"is internet (huggingface-cli download {self.source}) or set `path` to a local "
                "directory in the models file.",
                parameter="model",
            ) from None
        pipeline.set_progress_bar_config(disable=True)
        pipeline.to(device)
        if self._ip_adapter is not None:
            self._load_ip_adapter(pipeline)
        size_bytes = 0
        for name in pipeline.components:
            module = getattr(pipeline, name, None)
            if isinstance(module, torch.nn.Module):
                size_bytes += sum(p.numel() * p.element_size() for p in module.parameters())
                if name in ("unet", "vae"):
                    # channels_last speeds up convolutions on CPUs and GPUs alike.
                    module.to(memory_format=torch.channels_last)
        if self._compile:
            self._compile_denoiser(pipeline)
        replica = _Replica(pipeline=pipeline, size_bytes=size_bytes)
        replica.schedulers["Default"] = pipeline.scheduler
        log.info(
            "loaded %s from %s on %s (%.2f GB) in %.1f s",
            self.entry.air,
            self.source,
            device,
            size_bytes / 1024**3,
            time.monotonic() - started,
        )
        return replica

    def _load_ip_adapter(self, pipeline: Any) -> None:
        adapter = self._ip_adapter or {}
        if not hasattr(pipeline, "load_ip_adapter"):
            raise ModelUnavailable(
                f"Model {self.entry.air} is configured with an IP-Adapter, but its pipeline "
                f"({type(pipeline).__name__}) cannot load one.",
                parameter="model",
            )
        try:
            pipeline.load_ip_adapter(
                str(adapter["path"]),
                subfolder=str(adapter.get("subfolder", "models")),
                weight_name=str(adapter["weight_name"]),
                image_encoder_folder=adapter.get("image_encoder_folder", "image_encoder"),
                local_files_only=self._offline,
            )
        except (OSError, ValueError, KeyError) as exc:
            log.error("cannot load the IP-Adapter of %s: %s", self.entry.air, exc)
            raise ModelUnavailable(
                f"The IP-Adapter configured for model {self.entry.air} "
                f"({adapter.get('path')}) could not be loaded.",
                parameter="model",
            ) from None
        pipeline.set_ip_adapter_scale(float(adapter.get("scale", 0.6)))

    def _compile_denoiser(self, pipeline: Any) -> None:
        import torch

        for name in ("unet", "transformer"):
            module = getattr(pipeline, name, None)
            if module is not None:
                mode = str(self._settings.get("compile_mode", "max-autotune-no-cudagraphs"))
                setattr(pipeline, name, torch.compile(module, mode=mode, fullgraph=False))

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
        if self._compile:
            self.compile_seconds = seconds
        log.info(
            "warmed up %s in %.1f s%s",
            self.entry.air,
            seconds,
            " (including torch.compile)" if self._compile else "",
        )
        return seconds

    def _image_to_image(self, replica: _Replica) -> Any:
        if replica.img2img is None:
            from diffusers import AutoPipelineForImage2Image

            try:
                replica.img2img = AutoPipelineForImage2Image.from_pipe(replica.pipeline)
            except ValueError:
                raise InvalidParameter(
                    f"Model {self.entry.air} cannot use reference images.",
                    code="unsupportedParameter",
                    parameter="referenceImages",
                ) from None
            replica.img2img.set_progress_bar_config(disable=True)
        return replica.img2img

    def _scheduler(self, replica: _Replica, name: str | None) -> Any:
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
