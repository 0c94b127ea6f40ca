"""imageInference: validate against the model's rules, resolve reference images, persist the
task, expand numberResults into jobs with their seeds, and store each finished image (encoded,
saved, recorded) before it is announced."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import Executor
from typing import Any

from impasto.backends.base import GeneratedImage, GenerationJob, Outcome, ReferenceImage
from impasto.backends.registry import ModelRegistry, ResolvedModel
from impasto.backends.schedulers import known_schedulers
from impasto.delivery.codecs import encode_image
from impasto.engine.scheduler import Scheduler
from impasto.protocol.errors import (
    ConflictTaskUUID,
    ContentBlocked,
    ImpastoError,
    InferenceError,
    InvalidParameter,
    SyncTimeout,
)
from impasto.protocol.results import image_item
from impasto.protocol.tasks import MAX_SEED, ImageInferenceIn, check_against_rules
from impasto.service.images import ImageResolver
from impasto.service.safety import ContentSafety, wants_output_check
from impasto.state.base import EventBus, StateStore, Subscription
from impasto.state.records import ImageRecord, ResultRecord, TaskRecord
from impasto.storage.base import ImageStore

log = logging.getLogger("impasto.inference")

TASK_TYPE = "imageInference"


def seeds_for(seed: int | None, count: int) -> list[int]:
    """A given seed s gives s, s+1, ... (wrapping within 63 bits); otherwise random seeds."""
    if seed is None:
        return [secrets.randbits(63) for _ in range(count)]
    return [(seed + i) % (MAX_SEED + 1) for i in range(count)]


class InferenceService:
    """Accepts imageInference tasks and turns the engine's outcomes into stored result items."""

    def __init__(
        self,
        *,
        registry: ModelRegistry,
        state: StateStore,
        bus: EventBus,
        images: ImageStore,
        resolver: ImageResolver,
        scheduler: Scheduler,
        encode_pool: Executor,
        image_base_url: str,
        output_retention_s: int,
        safety: ContentSafety,
    ) -> None:
        self._registry = registry
        self._state = state
        self._bus = bus
        self._images = images
        self._resolver = resolver
        self._scheduler = scheduler
        self._encode_pool = encode_pool
        self._image_base_url = image_base_url
        self._output_retention_s = output_retention_s
        self._safety = safety
        self._schedulers = frozenset(known_schedulers())

    def image_url(self, key: str) -> str:
        return f"{self._image_base_url}/image/{key}"

    # -- accepting ------------------------------------------------------------------------

    def validate(self, task: ImageInferenceIn) -> ResolvedModel:
        """Everything that can be checked without I/O; raises an error item."""
        resolved = self._registry.resolve(task.model)
        check_against_rules(task, resolved.rules)
        if task.scheduler is not None and task.scheduler not in self._schedulers:
            raise InvalidParameter(
                f"Unknown scheduler {task.scheduler!r}; "
                f"known: {', '.join(sorted(self._schedulers))}.",
                code="invalidScheduler",
                parameter="scheduler",
            )
        self._safety.validate(task)
        return resolved

    async def submit(self, task: ImageInferenceIn) -> None:
        """Validate, persist and schedule; after this returns the task is accepted."""
        resolved = self.validate(task)
        if await self._state.get_task(task.taskUUID) is not None:
            raise ConflictTaskUUID(
                f"taskUUID {task.taskUUID} was already used; fetch its results with getResponse "
                "or send a new taskUUID.",
                parameter="taskUUID",
            )
        references = await self._references(task)
        await self._safety.screen_input(task, references)
        seeds = seeds_for(task.seed, task.numberResults)
        record = TaskRecord(
            task_uuid=task.taskUUID,
            task_type=TASK_TYPE,
            model=task.model,
            request=task.model_dump(mode="json", exclude_unset=True),
            expected=task.numberResults,
            created_at=time.time(),
            extra={"seeds": seeds},
        )
        await self._state.create_task(record)
        await self._schedule(task, resolved, references, seeds, range(task.numberResults))

    async def _references(self, task: ImageInferenceIn) -> tuple[ReferenceImage, ...]:
        given = task.reference_images()
        base = "referenceImages" if task.referenceImages else "inputs.referenceImages"

        async def one(i: int) -> ReferenceImage:
            ref = given[i]
            resolved = await self._resolver.resolve(
                ref.image, parameter=f"{base}[{i}]", code="invalidReferenceImages"
            )
            https = resolved.url if resolved.url and resolved.url.startswith("https://") else None
            return ReferenceImage(image=resolved.image, tag=ref.tag, source_url=https)

        return tuple(await asyncio.gather(*(one(i) for i in range(len(given)))))

    async def _schedule(
        self,
        task: ImageInferenceIn,
        resolved: ResolvedModel,
        references: tuple[ReferenceImage, ...],
        seeds: list[int],
        indices: range | list[int],
        resume: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> None:
        width, height = (
            (task.width, task.height)
            if task.width is not None and task.height is not None
            else resolved.rules.sizes.default
        )
        provider = (
            task.providerSettings.model_dump(exclude_none=True) if task.providerSettings else {}
        )
        jobs = [
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
                resume=(resume or {}).get(i, {}),
            )
            for i in indices
        ]
        sink = _TaskSink(self, task, resolved)
        await self._scheduler.submit(resolved.target.air, jobs, sink)

    # -- finishing ------------------------------------------------------------------------

    async def store_outcome(
        self, task: ImageInferenceIn, resolved: ResolvedModel, job: GenerationJob, outcome: Outcome
    ) -> None:
        """Persist one outcome as a result item, finish the task when all are in, announce."""
        now = time.time()
        if isinstance(outcome, GeneratedImage):
            record = await self._store_image(task, resolved, job, outcome, now)
        else:
            error = outcome.for_task(TASK_TYPE, task.taskUUID).to_item()
            error["taskType"], error["taskUUID"] = TASK_TYPE, task.taskUUID
            record = ResultRecord(task.taskUUID, job.index, "error", error, now)
            await self._state.add_result(record)
        results = await self._state.results(task.taskUUID)
        if len(results) >= task.numberResults:
            failed = [r for r in results if r.status == "error"]
            await self._state.finish_task(
                task.taskUUID,
                "error" if failed else "success",
                failed[0].item if failed else None,
                time.time(),
            )
        await self._bus.publish(task.taskUUID)

    async def _store_image(
        self,
        task: ImageInferenceIn,
        resolved: ResolvedModel,
        job: GenerationJob,
        generated: GeneratedImage,
        now: float,
    ) -> ResultRecord:
        nsfw = None
        if wants_output_check(task):
            verdict = (await self._safety.check_outputs(task, [generated.image]))[0]
            if verdict.withhold:
                raise ContentBlocked(
                    "The generated image was flagged by the content checker and withheld.",
                    parameter="safety.checkContent",
                )
            nsfw = verdict.nsfw
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(
            self._encode_pool, encode_image, generated.image, task.outputFormat, task.outputQuality
        )
        image_uuid = str(uuid.uuid4())
        key = f"{image_uuid}.{encoded.extension}"
        await self._images.put(key, encoded.data, encoded.content_type)
        await self._state.put_image(
            ImageRecord(
                image_uuid=image_uuid,
                key=key,
                content_type=encoded.content_type,
                kind="output",
                width=encoded.width,
                height=encoded.height,
                created_at=now,
                expires_at=now + (task.ttl or self._output_retention_s),
                task_uuid=task.taskUUID,
            )
        )
        cost = None
        if task.includeCost:
            cost = (
                generated.cost
                if generated.cost is not None
                else resolved.rules.price.cost((job.width, job.height))
            )
        item = image_item(
            task_type=TASK_TYPE,
            task_uuid=task.taskUUID,
            image_uuid=image_uuid,
            output_type=task.outputType,
            data=encoded.data,
            content_type=encoded.content_type,
            url=self.image_url(key),
            seed=generated.seed,
            cost=cost,
            nsfw=nsfw,
        )
        record = ResultRecord(task.taskUUID, job.index, "success", item, now)
        if not await self._state.add_result(record):
            # This generation was already stored (a re-run raced it): keep the first.
            await self._images.delete(key)
            await self._state.delete_image(image_uuid)
        return record

    # -- following ------------------------------------------------------------------------

    async def follow(
        self, task_uuid: str, subscription: Subscription, timeout: float
    ) -> AsyncIterator[ResultRecord]:
        """Yield each result of a task as it is stored, until the task is finished.

        Raises SyncTimeout if the task is still running after `timeout` seconds.
        """
        seen: set[int] = set()
        deadline = time.monotonic() + timeout
        while True:
            # Status first, then results: a task seen finished has all its results stored.
            task = await self._state.get_task(task_uuid)
            for result in await self._state.results(task_uuid):
                if result.index not in seen:
                    seen.add(result.index)
                    yield result
            if task is None or task.status != "processing":
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await subscription.wait(remaining):
                raise SyncTimeout(
                    f"Task {task_uuid} did not finish within {timeout:g} s; it goes on, and "
                    "getResponse returns its results.",
                )


class _TaskSink:
    """The engine's view of one task."""

    def __init__(
        self, service: InferenceService, task: ImageInferenceIn, resolved: ResolvedModel
    ) -> None:
        self._service = service
        self._task = task
        self._resolved = resolved

    async def on_progress(self, job: GenerationJob, percent: int) -> None:
        await self._service._state.set_progress(job.task_uuid, job.index, percent)

    async def on_checkpoint(self, job: GenerationJob, data: Mapping[str, Any]) -> None:
        await self._service._state.update_task_extra(job.task_uuid, {f"job{job.index}": dict(data)})

    async def on_outcome(self, job: GenerationJob, outcome: Outcome) -> None:
        try:
            await self._service.store_outcome(self._task, self._resolved, job, outcome)
        except ImpastoError as exc:
            await self._service.store_outcome(self._task, self._resolved, job, exc)
        except Exception:
            log.exception("storing generation %s failed", job.job_id)
            failure = InferenceError("The generated image could not be stored.")
            await self._service.store_outcome(self._task, self._resolved, job, failure)
