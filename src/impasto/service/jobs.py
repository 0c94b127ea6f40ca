"""From an accepted task to generation jobs: seeds, job fields, and handing them to the local
scheduler with a sink that records their outcomes."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from PIL import Image

from impasto.backends.base import (
    AdapterUse,
    CacheUse,
    ControlUse,
    EmbeddingUse,
    GenerationJob,
    LoraUse,
    Outpaint,
    RefinerUse,
)
from impasto.backends.registry import ResolvedModel
from impasto.engine.scheduler import Scheduler
from impasto.protocol.accelerators import (
    DEEPCACHE_BRANCH,
    DEEPCACHE_INTERVAL,
    FBCACHE_DISTANCE,
    TEACACHE_DISTANCE,
    AcceleratorOptionsIn,
)
from impasto.protocol.fields import MAX_RANDOM_SEED, MAX_SEED
from impasto.protocol.modes import ControlNetIn
from impasto.protocol.tasks import ImageInferenceIn
from impasto.service.outcomes import OutcomeRecorder, StoredCallback, TaskSink
from impasto.service.task_images import TaskImages
from impasto.state.base import StateStore


def seeds_for(seed: int | None, count: int) -> list[int]:
    """A given seed s gives s, s+1, ... (wrapping within MAX_SEED); otherwise random seeds
    that are exact in a JavaScript number.

    compat: @runware/sdk-js parses seeds into JavaScript numbers, exact only up to 2**53 - 1; a
    larger random seed comes back rounded and cannot reproduce its image."""
    if seed is None:
        return [secrets.randbelow(MAX_RANDOM_SEED + 1) for _ in range(count)]
    return [(seed + i) % (MAX_SEED + 1) for i in range(count)]


def preprocess_guide(image: Image.Image, control: ControlNetIn) -> Image.Image:
    """compat: runware 0.5.24's IControlNetCanny sends a photo and asks for its edges."""
    from impasto.service.guides import canny

    return canny(image, control.lowThresholdCanny, control.highThresholdCanny)


def cache_use(options: AcceleratorOptionsIn | None) -> CacheUse | None:
    """The step cache acceleratorOptions switch on (validated: at most one), if any."""
    if options is None or not options.methods():
        return None
    method = options.methods()[0]
    use = CacheUse(
        method.lower(),
        start_step=options.cacheStartStep,
        stop_step=options.cacheStopStep,
        start_percent=options.cacheStartStepPercentage,
        end_percent=options.cacheEndStepPercentage,
        max_consecutive=options.cacheMaxConsecutiveSteps,
    )
    if method == "deepCache":
        branch = options.deepCacheBranchId
        return replace(
            use,
            interval=options.deepCacheInterval or DEEPCACHE_INTERVAL,
            branch=DEEPCACHE_BRANCH if branch is None else branch,
            skip_mode=options.deepCacheSkipMode or "uniform",
        )
    # Each method has its own distance; the other one's is taken when only it is given.
    own, other, default = (
        (options.cacheDistance, options.teaCacheDistance, FBCACHE_DISTANCE)
        if method == "fbcache"
        else (options.teaCacheDistance, options.cacheDistance, TEACACHE_DISTANCE)
    )
    distance = own if own is not None else other
    return replace(use, threshold=default if distance is None else distance)


def image_modes(task: ImageInferenceIn, images: TaskImages) -> dict[str, Any]:
    """The GenerationJob fields of the task's image modes (the same for all its images)."""
    seed = task.seed_image()
    mask = task.mask_image()
    outpaint = None
    if task.outpaint is not None:
        top, right, bottom, left = task.outpaint.sides()
        outpaint = Outpaint(top, right, bottom, left, task.outpaint.blur or 0)
    controls = []
    for i, control in enumerate(task.controlNet or ()):
        guide = images.by_parameter[f"controlNet[{i}].guideImage"]
        if control.preprocessor is not None:
            guide = preprocess_guide(guide, control)
        controls.append(
            ControlUse(
                air=control.model,
                image=guide,
                weight=1.0 if control.weight is None else control.weight,
                start_step=control.startStep,
                end_step=control.endStep,
                start_percent=control.startStepPercentage,
                end_percent=control.endStepPercentage,
                mode=control.controlMode or "balanced",
            )
        )
    adapters = []
    for i, adapter in enumerate(task.ipAdapters or ()):
        pictures: tuple[Image.Image, ...]
        if adapter.guideImage is not None:
            pictures = (images.by_parameter[f"ipAdapters[{i}].guideImage"],)
        else:
            pictures = tuple(
                images.by_parameter[f"ipAdapters[{i}].guideImages[{j}]"]
                for j in range(len(adapter.guideImages or ()))
            )
        adapters.append(
            AdapterUse(
                air=adapter.model,
                images=pictures,
                weight=1.0 if adapter.weight is None else adapter.weight,
            )
        )
    refiner = None
    if task.refiner is not None:
        refiner = RefinerUse(
            task.refiner.model, task.refiner.startStep, task.refiner.startStepPercentage
        )
    return {
        "seed_image": images.get(seed[0]) if seed else None,
        "mask_image": images.get(mask[0]) if mask else None,
        "mask_margin": task.maskMargin,
        "outpaint": outpaint,
        "loras": tuple(
            LoraUse(lora.model, 1.0 if lora.weight is None else lora.weight)
            for lora in task.lora or ()
        ),
        "controlnets": tuple(controls),
        "ip_adapters": tuple(adapters),
        "refiner": refiner,
        "vae": task.vae,
        "embeddings": tuple(
            EmbeddingUse(e.model, 1.0 if e.weight is None else e.weight)
            for e in task.embeddings or ()
        ),
        "clip_skip": task.clipSkip or None,
        "prompt_weighting": task.weighting(),
        "cache": cache_use(task.acceleratorOptions),
    }


def output_size(
    task: ImageInferenceIn, images: TaskImages, default: tuple[int, int]
) -> tuple[int, int]:
    """The size asked for; else for outpainting the seed image's size (on the 8-pixel latent
    grid) plus the sides added, and otherwise the model's default."""
    if task.width is not None and task.height is not None:
        return task.width, task.height
    seed = task.seed_image()
    if task.outpaint is not None and seed is not None:
        image = images.by_parameter[seed[0]]
        top, right, bottom, left = task.outpaint.sides()
        return image.width // 8 * 8 + left + right, image.height // 8 * 8 + top + bottom
    return default


def build_jobs(
    task: ImageInferenceIn,
    resolved: ResolvedModel,
    images: TaskImages,
    seeds: Sequence[int],
    indices: Sequence[int],
    resume: Mapping[int, Mapping[str, Any]],
) -> list[GenerationJob]:
    width, height = output_size(task, images, resolved.rules.sizes.default)
    provider = task.providerSettings.model_dump(exclude_none=True) if task.providerSettings else {}
    modes = image_modes(task, images)
    return [
        GenerationJob(
            task_uuid=task.taskUUID,
            index=i,
            model=task.model,
            prompt=task.positivePrompt,
            width=width,
            height=height,
            seed=seeds[i],
            negative_prompt=task.negativePrompt,
            steps=task.steps,
            cfg_scale=task.CFGScale,
            scheduler=task.scheduler,
            strength=task.strength,
            reference_images=images.references,
            provider_settings=provider,
            resume=resume.get(i, {}),
            **modes,
        )
        for i in indices
    ]


class LocalRunner:
    """Runs an accepted task's generations on this process's scheduler."""

    def __init__(self, scheduler: Scheduler, recorder: OutcomeRecorder, state: StateStore) -> None:
        self._scheduler = scheduler
        self._recorder = recorder
        self._state = state

    async def run(
        self,
        task: ImageInferenceIn,
        resolved: ResolvedModel,
        images: TaskImages,
        seeds: Sequence[int],
        indices: Sequence[int],
        resume: Mapping[int, Mapping[str, Any]] | None = None,
        after: StoredCallback | None = None,
    ) -> None:
        jobs = build_jobs(task, resolved, images, seeds, indices, resume or {})
        sink = TaskSink(self._recorder, self._state, task, resolved, after)
        await self._scheduler.submit(resolved.target.air, jobs, sink)
