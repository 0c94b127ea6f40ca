"""Which image mode a job runs in, and what must be equal for jobs to share a pipeline call
(the batch key's mode part)."""

from __future__ import annotations

from typing import Any

from impasto.backends.base import GenerationJob

TEXT2IMG, IMG2IMG, INPAINT = "text2img", "img2img", "inpaint"


def job_mode(job: GenerationJob, *, inpainting_model: bool, ip_adapter: bool) -> str:
    if job.outpaint is not None or job.mask_image is not None or inpainting_model:
        return INPAINT
    if job.seed_image is not None:
        return IMG2IMG
    if job.reference_images and not ip_adapter:
        return IMG2IMG
    return TEXT2IMG


def mode_key(job: GenerationJob, mode: str) -> tuple[Any, ...]:
    """What, besides size and sampling, must be equal for jobs to share a call."""
    geometry: Any = None
    if mode == INPAINT:
        # The mask, its crop box and the canvas belong to one seed image: one task's jobs.
        geometry = (id(job.seed_image), id(job.mask_image), job.mask_margin, job.outpaint)
    return (
        mode,
        geometry,
        tuple((lora.air, lora.weight) for lora in job.loras),
        tuple(
            (c.air, id(c.image), c.weight, c.mode, c.window(job.steps or 1000))
            for c in job.controlnets
        ),
        tuple((a.air, tuple(id(i) for i in a.images), a.weight) for a in job.ip_adapters),
        job.refiner,
        job.vae,
        tuple((e.air, e.weight) for e in job.embeddings),
        job.clip_skip,
        job.prompt_weighting,
        job.cache,
    )
