"""DiffusersBackend: any diffusers text-to-image pipeline, by Hugging Face id or local path.

The pipeline is loaded lazily on its device's worker thread. Jobs with the same size, steps,
guidance, scheduler and strength run in one pipeline call with one generator per image, so each
image keeps its own seed. Reference images take the img2img path of the same components
(`AutoPipelineForImage2Image.from_pipe`), conditioned on the first reference.
"""

from __future__ import annotations

import inspect
import logging
import math
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
from impasto.backends.devices import DeviceWorker
from impasto.backends.registry import ModelEntry
from impasto.backends.schedulers import resolve_scheduler
from impasto.protocol.errors import ImpastoError, InferenceError, InvalidParameter

log = logging.getLogger("impasto.backends.diffusers")

DEFAULT_STRENGTH = 0.8


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


class DiffusersBackend:
    """Runs one diffusers pipeline on one device."""

    concurrency = 1

    def __init__(
        self,
        entry: ModelEntry,
        source: str | Path,
        worker: DeviceWorker,
        max_batch_size: int,
    ) -> None:
        self.entry = entry
        self.source = source
        self.worker = worker
        self.max_batch_size = int(entry.settings.get("max_batch_size", max_batch_size))
        self._settings: Mapping[str, Any] = entry.settings
        self._pipeline: Any = None
        self._img2img: Any = None
        self._schedulers: dict[str, Any] = {}

    # -- batching -------------------------------------------------------------------------

    def batch_key(self, job: GenerationJob) -> Hashable:
        return (
            job.width,
            job.height,
            job.steps,
            job.cfg_scale,
            job.scheduler,
            job.strength,
            bool(job.reference_images),
        )

    # -- generation -------------------------------------------------------------------------

    async def generate(
        self,
        jobs: Sequence[GenerationJob],
        progress: ProgressCallback,
        checkpoint: CheckpointCallback,
    ) -> list[Outcome]:
        images = await self.worker.run(self._generate, list(jobs), progress)
        return [
            GeneratedImage(image=image, seed=job.seed)
            for job, image in zip(jobs, images, strict=True)
        ]

    def _generate(self, jobs: list[GenerationJob], progress: ProgressCallback) -> list[Image.Image]:
        import torch

        first = jobs[0]
        pipeline = self._load()
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
        generator_device = "cpu" if self.worker.device == "cpu" else self.worker.device
        generators = [
            torch.Generator(device=generator_device).manual_seed(job.seed) for job in jobs
        ]
        kwargs: dict[str, Any] = {
            "prompt": [job.prompt for job in jobs],
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "generator": generators,
            "output_type": "pil",
        }
        if first.reference_images:
            pipeline = self._image_to_image()
            strength = first.strength if first.strength is not None else DEFAULT_STRENGTH
            # img2img runs int(steps * strength) steps; keep at least one.
            kwargs["num_inference_steps"] = min(
                1000, max(steps, math.ceil(1 / max(strength, 1e-3)))
            )
            kwargs["strength"] = strength
            kwargs["image"] = [
                job.reference_images[0]
                .image.convert("RGB")
                .resize((width, height), Image.Resampling.LANCZOS)
                for job in jobs
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
            kwargs["negative_prompt"] = [job.negative_prompt or "" for job in jobs]

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
            total = max(1, int(getattr(pipe, "_num_timesteps", 0) or steps))
            progress(jobs, min(99, (step + 1) * 100 // total))
            return tensors

        if "callback_on_step_end" in accepted:
            kwargs["callback_on_step_end"] = on_step_end
        pipeline.scheduler = self._scheduler(first.scheduler)
        try:
            output = pipeline(**kwargs)
        except ImpastoError:
            raise
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError) as exc:
            log.exception("pipeline call failed for %s", self.entry.air)
            raise InferenceError(f"Model {self.entry.air} failed to generate the image.") from exc
        return [
            _center_crop(image, job.width, job.height)
            for job, image in zip(jobs, output.images, strict=True)
        ]

    # -- loading ----------------------------------------------------------------------------

    def _load(self) -> Any:
        if self._pipeline is not None:
            return self._pipeline
        import diffusers
        import torch

        device = self.worker.device
        options: dict[str, Any] = {"dtype": _dtype(self._settings.get("dtype"), device)}
        if "variant" in self._settings and device != "cpu":
            options["variant"] = self._settings["variant"]
        class_name = self._settings.get("pipeline_class")
        loader = (
            getattr(diffusers, class_name) if class_name else diffusers.AutoPipelineForText2Image
        )
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
        # channels_last speeds up the convolutions of UNets and VAEs on CPUs and GPUs alike.
        for name in ("unet", "vae"):
            module = getattr(pipeline, name, None)
            if isinstance(module, torch.nn.Module):
                module.to(memory_format=torch.channels_last)
        self._schedulers["Default"] = pipeline.scheduler
        self._pipeline = pipeline
        log.info("loaded %s from %s on %s", self.entry.air, self.source, device)
        return pipeline

    def _image_to_image(self) -> Any:
        if self._img2img is None:
            from diffusers import AutoPipelineForImage2Image

            try:
                self._img2img = AutoPipelineForImage2Image.from_pipe(self._load())
            except ValueError:
                raise InvalidParameter(
                    f"Model {self.entry.air} cannot use reference images.",
                    code="unsupportedParameter",
                    parameter="referenceImages",
                ) from None
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

    def _scheduler(self, name: str | None) -> Any:
        """The scheduler for a Runware name; built once from the model's own config."""
        import diffusers

        default = self._schedulers["Default"]
        wanted = resolve_scheduler(name) if name else None
        if wanted is None:
            return default
        key = name or "Default"
        if key not in self._schedulers:
            class_name, overrides = wanted
            compatible = {c.__name__ for c in default.compatibles} | {type(default).__name__}
            if class_name not in compatible:
                raise InvalidParameter(
                    f"Scheduler {name!r} does not work with model {self.entry.air}.",
                    code="invalidScheduler",
                    parameter="scheduler",
                )
            cls = getattr(diffusers, class_name)
            self._schedulers[key] = cls.from_config(default.config, **overrides)
        return self._schedulers[key]

    async def close(self) -> None:
        def release() -> None:
            self._pipeline = None
            self._img2img = None

        await self.worker.run(release)
