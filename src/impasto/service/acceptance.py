"""Accepting an imageInference task: everything that can fail for a client's reason fails here,
before anything is stored. Then the inputs are stored, the task is created, and its
generations are handed on; from then on the task always ends with results or errors.

Input images (references, seed and mask images, guide images) are fetched and decoded once,
here, screened (blockContent), and stored as input images: the stored request names them by
UUID, so a re-run after a restart or a worker on another machine reads them from the image
store and never fetches a client URL again (see task_images.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from PIL import Image

from impasto.backends.registry import ModelRegistry, ResolvedModel
from impasto.backends.schedulers import known_schedulers, scheduler_problem
from impasto.delivery.outbound import OutboundFailed, OutboundGuard, OutboundRefused
from impasto.protocol.errors import (
    ConflictTaskUUID,
    ImpastoError,
    InferenceError,
    InvalidParameter,
    QueueFull,
    code_name,
)
from impasto.protocol.tasks import ImageInferenceIn, check_against_rules
from impasto.service.assets import check_accelerators, check_assets, check_model_kind
from impasto.service.completion import TaskCompletion
from impasto.service.images import ImageInput, ImageResolver, storable, store_image
from impasto.service.jobs import LocalRunner, seeds_for
from impasto.service.safety import ContentSafety
from impasto.service.task_images import (
    TaskImages,
    check_inputs,
    resolve_slots,
    slots_of,
    task_images,
    with_stored_images,
)
from impasto.state.base import JobQueue, QueuedJob, StateStore
from impasto.state.records import TaskRecord
from impasto.storage.base import ImageStore
from impasto.tenancy.keys import Principal

log = logging.getLogger("impasto.acceptance")

TASK_TYPE = "imageInference"


def screened_inputs(task: ImageInferenceIn, images: TaskImages) -> list[tuple[str, Image.Image]]:
    """The input images blockContent screens besides the references: the seed image, guide
    images and IP-Adapter images (a mask is only black and white)."""
    base = task.reference_parameter()
    skip = {f"{base}[{i}]" for i in range(len(task.reference_images()))}
    mask = task.mask_image()
    if mask is not None:
        skip.add(mask[0])
    return [(p, image) for p, image in images.by_parameter.items() if p not in skip]


def check_weighting(task: ImageInferenceIn, weighting: str) -> None:
    from impasto.backends.prompting import PromptSyntaxError, check_prompt_syntax

    for parameter, text in (
        ("positivePrompt", task.positivePrompt),
        ("negativePrompt", task.negativePrompt),
    ):
        if not text:
            continue
        try:
            check_prompt_syntax(text, weighting, parameter)
        except PromptSyntaxError as exc:
            raise InvalidParameter(
                f"Invalid value for {parameter} parameter ({weighting} syntax): {exc}",
                code=f"invalid{code_name(parameter)}",
                parameter=parameter,
            ) from None


async def vet_destinations(guard: OutboundGuard, urls: list[tuple[str, str | None]]) -> None:
    """webhookURL and uploadEndpoint go through the outbound guard at submit time too."""
    for parameter, url in urls:
        if url is None:
            continue
        try:
            await guard.vet(url)
        except (OutboundRefused, OutboundFailed) as exc:
            raise InvalidParameter(
                f"Invalid value for {parameter} parameter: {exc}.",
                code=f"invalid{code_name(parameter)}",
                parameter=parameter,
            ) from None


class TaskAcceptance:
    """Validates, stores inputs, creates the task and schedules it."""

    def __init__(
        self,
        *,
        registry: ModelRegistry,
        state: StateStore,
        images: ImageStore,
        resolver: ImageResolver,
        safety: ContentSafety,
        guard: OutboundGuard,
        completion: TaskCompletion,
        runner: LocalRunner,
        scheduler_depth: Callable[[str], int],
        input_retention_s: int,
        unavailable: Mapping[str, ImpastoError] | None = None,
        queue: JobQueue | None = None,
        max_queued: int | None = None,
    ) -> None:
        self._registry = registry
        self._state = state
        self._images = images
        self._resolver = resolver
        self._safety = safety
        self._guard = guard
        self._completion = completion
        self._runner = runner
        self._scheduler_depth = scheduler_depth
        self._input_retention_s = input_retention_s
        self._unavailable = dict(unavailable or {})
        # Set on API nodes of a distributed deployment: workers run the jobs.
        self._queue = queue
        self._max_queued = max_queued
        self._schedulers = frozenset(known_schedulers())

    def available(self, air: str) -> bool:
        """Whether tasks for the model can be accepted here (not, e.g., a provider's model
        without the provider's key)."""
        return air not in self._unavailable

    def validate(self, task: ImageInferenceIn) -> ResolvedModel:
        """Everything that can be checked without I/O; raises an error item."""
        resolved = self._registry.resolve(task.model)
        problem = self._unavailable.get(resolved.requested.air)
        if problem is not None:
            raise problem
        check_model_kind(resolved)
        check_against_rules(task, resolved.rules)
        check_assets(task, self._registry, resolved)
        check_accelerators(task, resolved)
        weighting = task.weighting()
        if weighting is not None:
            check_weighting(task, weighting)
        if task.scheduler is not None:
            if task.scheduler not in self._schedulers:
                raise InvalidParameter(
                    f"Unknown scheduler {task.scheduler!r}; "
                    f"known: {', '.join(sorted(self._schedulers))}.",
                    code="invalidScheduler",
                    parameter="scheduler",
                )
            mismatch = scheduler_problem(task.scheduler, resolved.target.architecture)
            if mismatch is not None:
                raise InvalidParameter(
                    f"Invalid value for scheduler parameter for model {task.model}: {mismatch}.",
                    code="invalidScheduler",
                    parameter="scheduler",
                )
        self._safety.validate(task)
        return resolved

    async def submit(self, task: ImageInferenceIn, principal: Principal | None = None) -> None:
        """Validate, store the inputs, persist and schedule; after this the task is accepted.
        The task records who sent it: the key's digest (its owner) and, for usage, its id and
        name."""
        resolved = self.validate(task)
        slots = slots_of(task)
        # A used taskUUID is refused before any input image is fetched and stored; without
        # inputs, creating the task refuses it (one state round trip fewer).
        if slots and await self._state.get_task(task.taskUUID) is not None:
            raise ConflictTaskUUID(
                f"taskUUID {task.taskUUID} was already used; fetch its results with getResponse "
                "or send a new taskUUID.",
                parameter="taskUUID",
            )
        await self._check_capacity(resolved, task.numberResults)
        await self._vet_destinations(task)
        owner = principal.owner if principal is not None and principal.owner else None
        inputs = await resolve_slots(self._resolver, slots, owner)
        check_inputs(task, slots, inputs, resolved.rules.sizes)
        images = task_images(task, slots, inputs)
        await self._safety.screen_input(task, images.references, screened_inputs(task, images))
        stored = await self._store_inputs(task, inputs)
        seeds = seeds_for(task.seed, task.numberResults)
        extra: dict[str, Any] = {"seeds": seeds}
        if principal is not None and not principal.anonymous:
            extra["owner"] = principal.owner
        if principal is not None:
            extra["keyId"], extra["keyName"] = principal.key_id, principal.name
        if images.references:
            extra["references"] = [
                {"imageUUID": image_uuid, "sourceURL": ref.source_url}
                # References are the first slots (slots_of), so the first UUIDs are theirs.
                for image_uuid, ref in zip(stored, images.references, strict=False)
            ]
        record = TaskRecord(
            task_uuid=task.taskUUID,
            task_type=TASK_TYPE,
            model=task.model,
            request=with_stored_images(task, slots, stored),
            expected=task.numberResults,
            created_at=time.time(),
            extra=extra,
        )
        await self._state.create_task(record)
        try:
            await self._schedule(task, resolved, images, seeds)
        except Exception:
            # Accepted but not handed on (e.g. the queue is unreachable): end the task with an
            # error rather than leave it processing forever.
            log.exception("scheduling task %s failed", task.taskUUID)
            failure = InferenceError("The task was accepted but could not be scheduled.")
            await self._completion.fail_missing(
                task.taskUUID,
                list(range(task.numberResults)),
                failure.for_task(TASK_TYPE, task.taskUUID),
            )

    async def _check_capacity(self, resolved: ResolvedModel, images: int) -> None:
        """Refuse (before accepting anything) when the model's queue is full."""
        if self._max_queued is None:
            return
        air = resolved.target.air
        waiting = (
            await self._queue.depth(air) if self._queue is not None else self._scheduler_depth(air)
        )
        if waiting + images > self._max_queued:
            raise QueueFull(
                f"Model {resolved.requested.air} has {waiting} images waiting, the most this "
                "server queues; retry later.",
                parameter="model",
            )

    async def _vet_destinations(self, task: ImageInferenceIn) -> None:
        await vet_destinations(
            self._guard,
            [("webhookURL", task.webhookURL), ("uploadEndpoint", task.uploadEndpoint)],
        )

    async def _store_inputs(self, task: ImageInferenceIn, inputs: list[ImageInput]) -> list[str]:
        """Store each input image (an image UUID of ours is already stored) and return the
        UUIDs the stored request names them by; an image named in several places is stored
        once."""
        stored: list[str] = []
        by_input: dict[int, str] = {}
        now = time.time()
        for fetched in inputs:
            if fetched.stored_uuid is not None:
                stored.append(fetched.stored_uuid)
                continue
            if id(fetched) in by_input:
                stored.append(by_input[id(fetched)])
                continue
            image = await asyncio.to_thread(storable, fetched.image, fetched.data, fetched.format)
            image_uuid, _ = await store_image(
                self._images,
                self._state,
                image,
                kind="input",
                task_uuid=task.taskUUID,
                now=now,
                retention_s=self._input_retention_s,
            )
            by_input[id(fetched)] = image_uuid
            stored.append(image_uuid)
        return stored

    async def _schedule(
        self,
        task: ImageInferenceIn,
        resolved: ResolvedModel,
        images: TaskImages,
        seeds: list[int],
    ) -> None:
        """Hand an accepted task's generations to the workers' queue, or run them here."""
        indices = range(task.numberResults)
        if self._queue is not None:
            await self._queue.put(
                [QueuedJob(resolved.target.air, task.taskUUID, index) for index in indices]
            )
            return
        await self._runner.run(task, resolved, images, seeds, list(indices))
