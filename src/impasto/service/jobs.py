"""From an accepted task to generation jobs: seeds, job fields, and handing them to the local
scheduler with a sink that records their outcomes."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from impasto.backends.base import GenerationJob, ReferenceImage
from impasto.backends.registry import ResolvedModel
from impasto.engine.scheduler import Scheduler
from impasto.protocol.fields import MAX_RANDOM_SEED, MAX_SEED
from impasto.protocol.tasks import ImageInferenceIn
from impasto.service.outcomes import OutcomeRecorder, StoredCallback, TaskSink
from impasto.state.base import StateStore


def seeds_for(seed: int | None, count: int) -> list[int]:
    """A given seed s gives s, s+1, ... (wrapping within MAX_SEED); otherwise random seeds
    that are exact in a JavaScript number.

    compat: @runware/sdk-js parses seeds into JavaScript numbers, exact only up to 2**53 - 1; a
    larger random seed comes back rounded and cannot reproduce its image."""
    if seed is None:
        return [secrets.randbelow(MAX_RANDOM_SEED + 1) for _ in range(count)]
    return [(seed + i) % (MAX_SEED + 1) for i in range(count)]


def build_jobs(
    task: ImageInferenceIn,
    resolved: ResolvedModel,
    references: tuple[ReferenceImage, ...],
    seeds: Sequence[int],
    indices: Sequence[int],
    resume: Mapping[int, Mapping[str, Any]],
) -> list[GenerationJob]:
    width, height = (
        (task.width, task.height)
        if task.width is not None and task.height is not None
        else resolved.rules.sizes.default
    )
    provider = task.providerSettings.model_dump(exclude_none=True) if task.providerSettings else {}
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
            reference_images=references,
            provider_settings=provider,
            resume=resume.get(i, {}),
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
        references: tuple[ReferenceImage, ...],
        seeds: Sequence[int],
        indices: Sequence[int],
        resume: Mapping[int, Mapping[str, Any]] | None = None,
        after: StoredCallback | None = None,
    ) -> None:
        jobs = build_jobs(task, resolved, references, seeds, indices, resume or {})
        sink = TaskSink(self._recorder, self._state, task, resolved, after)
        await self._scheduler.submit(resolved.target.air, jobs, sink)
