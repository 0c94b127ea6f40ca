"""imageInference: validate against the model's rules, resolve reference images, persist the
task, expand numberResults into jobs with their seeds, and store each finished image (encoded,
saved, recorded) before it is announced."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from typing import Any

from impasto.backends.base import GeneratedImage, GenerationJob, Outcome, ReferenceImage
from impasto.backends.registry import ModelRegistry, ResolvedModel
from impasto.backends.schedulers import known_schedulers
from impasto.delivery.codecs import encode_image
from impasto.delivery.outbound import OutboundFailed, OutboundGuard, OutboundRefused
from impasto.delivery.outbox import new_delivery
from impasto.engine.scheduler import Scheduler
from impasto.logcontext import current_task
from impasto.protocol.errors import (
    ConflictTaskUUID,
    ContentBlocked,
    ImpastoError,
    InferenceError,
    InvalidParameter,
    QueueFull,
    SyncTimeout,
    UploadFailed,
)
from impasto.protocol.results import image_item
from impasto.protocol.tasks import MAX_SEED, ImageInferenceIn, check_against_rules
from impasto.service.images import ImageResolver
from impasto.service.safety import ContentSafety, wants_output_check
from impasto.state.base import EventBus, JobQueue, QueuedJob, StateStore, Subscription
from impasto.state.records import DeliveryRecord, ImageRecord, ResultRecord, TaskRecord
from impasto.storage.base import ImageStore

log = logging.getLogger("impasto.inference")

TASK_TYPE = "imageInference"

# Awaited once a generation's outcome is stored (worker acknowledgements).
StoredCallback = Callable[[GenerationJob], Awaitable[None]]
JobDone = Callable[[QueuedJob], Awaitable[None]]


def seeds_for(seed: int | None, count: int) -> list[int]:
    """A given seed s gives s, s+1, ... (wrapping within 63 bits); otherwise random seeds."""
    if seed is None:
        return [secrets.randbits(63) for _ in range(count)]
    return [(seed + i) % (MAX_SEED + 1) for i in range(count)]


def upload_errors(results: list[ResultRecord], uploads: list[DeliveryRecord]) -> list[ImpastoError]:
    """One uploadFailed error per image whose PUT to uploadEndpoint gave up."""
    items = {r.index: r.item for r in results}
    errors: list[ImpastoError] = []
    for upload in uploads:
        if upload.status != "failed":
            continue
        item = items.get(upload.index if upload.index is not None else -1, {})
        reason = (upload.last_error or {}).get("message", "unknown error")
        where = f" It is kept at {item['imageURL']}." if "imageURL" in item else ""
        errors.append(
            UploadFailed(
                f"Uploading image {item.get('imageUUID', '')} to uploadEndpoint failed after "
                f"{upload.attempts} attempt(s): {reason}.{where}",
                parameter="uploadEndpoint",
                task_type=TASK_TYPE,
                task_uuid=upload.task_uuid,
            )
        )
    return errors


def distinct_errors(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[tuple[Any, Any]] = set()
    distinct = []
    for item in items:
        key = (item.get("code"), item.get("message"))
        if key not in seen:
            seen.add(key)
            distinct.append(item)
    return distinct


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
        guard: OutboundGuard,
        queue: JobQueue | None = None,
        max_queued: int | None = None,
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
        self._guard = guard
        # Set on API nodes of a distributed deployment: workers run the jobs.
        self._queue = queue
        self._max_queued = max_queued
        self._wake_outbox: Callable[[], None] = lambda: None
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
        await self._check_capacity(resolved, task.numberResults)
        await self._vet_destinations(task)
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
        try:
            await self._schedule(task, resolved, references, seeds, range(task.numberResults))
        except Exception:
            # Accepted but not handed on (e.g. the queue is unreachable): end the task with an
            # error rather than leave it processing forever.
            log.exception("scheduling task %s failed", task.taskUUID)
            failure = InferenceError("The task was accepted but could not be scheduled.")
            error = failure.for_task(TASK_TYPE, task.taskUUID).to_item()
            for index in range(task.numberResults):
                await self._state.add_result(
                    ResultRecord(task.taskUUID, index, "error", error, time.time())
                )
            await self.maybe_finish(task.taskUUID)

    async def _check_capacity(self, resolved: ResolvedModel, images: int) -> None:
        """Refuse (before accepting anything) when the model's queue is full."""
        if self._max_queued is None:
            return
        air = resolved.target.air
        waiting = (
            await self._queue.depth(air) if self._queue is not None else self._scheduler.queued(air)
        )
        if waiting + images > self._max_queued:
            raise QueueFull(
                f"Model {resolved.requested.air} has {waiting} images waiting, the most this "
                "server queues; retry later.",
                parameter="model",
            )

    async def _vet_destinations(self, task: ImageInferenceIn) -> None:
        """webhookURL and uploadEndpoint go through the outbound guard at submit time too."""
        for parameter, url in (
            ("webhookURL", task.webhookURL),
            ("uploadEndpoint", task.uploadEndpoint),
        ):
            if url is None:
                continue
            try:
                await self._guard.vet(url)
            except (OutboundRefused, OutboundFailed) as exc:
                raise InvalidParameter(
                    f"Invalid value for {parameter} parameter: {exc}.",
                    code=f"invalid{parameter[0].upper()}{parameter[1:]}",
                    parameter=parameter,
                ) from None

    async def resume(self, record: TaskRecord) -> None:
        """After a restart: re-run the generations of an accepted task that were not stored."""
        await self.rerun(record, range(record.expected))

    async def execute(self, queued: Sequence[QueuedJob], done: JobDone) -> None:
        """Worker side of a JobQueue: run queued generations of one task; `done(job)` is
        awaited once each one's outcome is stored (or was already)."""
        task_uuid = queued[0].task_uuid
        record = await self._state.get_task(task_uuid)
        if record is None:
            # Swept or never stored: nothing to run, nothing to keep.
            for job in queued:
                await done(job)
            return
        by_index = {job.index: job for job in queued}

        async def stored(job: GenerationJob) -> None:
            await done(by_index[job.index])

        await self.rerun(record, sorted(by_index), stored)

    async def rerun(
        self, record: TaskRecord, indices: Iterable[int], after: StoredCallback | None = None
    ) -> None:
        """Run the generations `indices` of an accepted task that are not stored yet, with
        their original seeds and any backend checkpoint (e.g. a provider's task id)."""
        done = {r.index for r in await self._state.results(record.task_uuid)}
        wanted = list(indices)
        missing = [i for i in wanted if i not in done]
        if after is not None:
            for index in wanted:
                if index in done:
                    await after(_placeholder(record, index))
        try:
            task = ImageInferenceIn.model_validate(record.request)
            resolved = self.validate(task)
            references = await self._references(task) if missing else ()
        except ImpastoError as exc:
            for index in missing:
                error = exc.for_task(TASK_TYPE, record.task_uuid).to_item()
                await self._state.add_result(
                    ResultRecord(record.task_uuid, index, "error", error, time.time())
                )
                if after is not None:
                    await after(_placeholder(record, index))
            await self.maybe_finish(record.task_uuid)
            return
        if not missing:
            await self.maybe_finish(record.task_uuid)
            return
        seeds = list(record.extra.get("seeds") or seeds_for(task.seed, task.numberResults))
        resume = {
            i: record.extra[f"job{i}"]
            for i in missing
            if isinstance(record.extra.get(f"job{i}"), dict)
        }
        log.info("running task %s again: %d generation(s)", record.task_uuid, len(missing))
        await self._run_here(task, resolved, references, seeds, missing, resume, after)

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
        indices: range,
    ) -> None:
        """Hand an accepted task's generations to the workers' queue, or run them here."""
        if self._queue is not None:
            await self._queue.put(
                [QueuedJob(resolved.target.air, task.taskUUID, index) for index in indices]
            )
            return
        await self._run_here(task, resolved, references, seeds, list(indices), {}, None)

    async def _run_here(
        self,
        task: ImageInferenceIn,
        resolved: ResolvedModel,
        references: tuple[ReferenceImage, ...],
        seeds: list[int],
        indices: list[int],
        resume: Mapping[int, Mapping[str, Any]],
        after: StoredCallback | None,
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
                resume=resume.get(i, {}),
            )
            for i in indices
        ]
        sink = _TaskSink(self, task, resolved, after)
        await self._scheduler.submit(resolved.target.air, jobs, sink)

    # -- finishing ------------------------------------------------------------------------

    async def store_outcome(
        self, task: ImageInferenceIn, resolved: ResolvedModel, job: GenerationJob, outcome: Outcome
    ) -> None:
        """Persist one outcome as a result item (with its deliveries), finish the task when
        everything is in, announce."""
        now = time.time()
        if isinstance(outcome, GeneratedImage):
            await self._store_image(task, resolved, job, outcome, now)
        else:
            error = outcome.for_task(TASK_TYPE, task.taskUUID).to_item()
            error["taskType"], error["taskUUID"] = TASK_TYPE, task.taskUUID
            await self._state.add_result(
                ResultRecord(task.taskUUID, job.index, "error", error, now)
            )
        await self.maybe_finish(task.taskUUID)

    async def maybe_finish(self, task_uuid: str) -> None:
        """Finish the task once every generation is stored and every upload has settled; a
        task with failures then sends one webhook with its distinct errors. Announces."""
        record = await self._state.get_task(task_uuid)
        if record is None or record.status != "processing":
            await self._bus.publish(task_uuid)
            return
        results = await self._state.results(task_uuid)
        uploads = [d for d in await self._state.deliveries(task_uuid) if d.kind == "upload"]
        if len(results) < record.expected or any(d.status == "pending" for d in uploads):
            await self._bus.publish(task_uuid)
            return
        failures = [r.item for r in results if r.status == "error"]
        failures += [e.to_item() for e in upload_errors(results, uploads)]
        deliveries = []
        webhook = record.request.get("webhookURL")
        if failures and webhook:
            payload = json.dumps({"errors": distinct_errors(failures)})
            deliveries.append(new_delivery("webhook", task_uuid, webhook, payload))
        await self._state.finish_task(
            task_uuid,
            "error" if failures else "success",
            failures[0] if failures else None,
            time.time(),
            deliveries,
        )
        if deliveries:
            self._wake_outbox()
        await self._bus.publish(task_uuid)

    async def upload_failures(self, task_uuid: str) -> list[ImpastoError]:
        """uploadFailed errors of a task's images (each image is still in our store)."""
        uploads = [d for d in await self._state.deliveries(task_uuid) if d.kind == "upload"]
        if not any(d.status == "failed" for d in uploads):
            return []
        return upload_errors(await self._state.results(task_uuid), uploads)

    async def on_delivery_settled(self, delivery: DeliveryRecord, ok: bool) -> None:
        """The outbox finished a delivery: an upload may complete its task."""
        if delivery.kind == "upload":
            await self.maybe_finish(delivery.task_uuid)

    def attach_outbox(self, wake: Callable[[], None]) -> None:
        self._wake_outbox = wake

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
        expires_at = now + (task.ttl or self._output_retention_s)
        await self._state.put_image(
            ImageRecord(
                image_uuid=image_uuid,
                key=key,
                content_type=encoded.content_type,
                kind="output",
                width=encoded.width,
                height=encoded.height,
                created_at=now,
                expires_at=expires_at,
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
            url=self._images.direct_url(key, expires_at) or self.image_url(key),
            seed=generated.seed,
            cost=cost,
            nsfw=nsfw,
        )
        record = ResultRecord(task.taskUUID, job.index, "success", item, now)
        deliveries = []
        webhook = (
            {"url": task.webhookURL, "payload": json.dumps({"data": [item]})}
            if task.webhookURL
            else None
        )
        if task.uploadEndpoint:
            deliveries.append(
                new_delivery(
                    "upload",
                    task.taskUUID,
                    task.uploadEndpoint,
                    key,
                    index=job.index,
                    content_type=encoded.content_type,
                    then=webhook,
                )
            )
        elif webhook is not None:
            deliveries.append(
                new_delivery(
                    "webhook", task.taskUUID, webhook["url"], webhook["payload"], index=job.index
                )
            )
        if await self._state.add_result(record, deliveries):
            if deliveries:
                self._wake_outbox()
        else:
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


def _placeholder(record: TaskRecord, index: int) -> GenerationJob:
    """A job identity for callbacks about a generation that will not run here."""
    return GenerationJob(
        task_uuid=record.task_uuid,
        index=index,
        model=record.model or "",
        prompt="",
        width=0,
        height=0,
        seed=0,
    )


class _TaskSink:
    """The engine's view of one task."""

    def __init__(
        self,
        service: InferenceService,
        task: ImageInferenceIn,
        resolved: ResolvedModel,
        after: StoredCallback | None = None,
    ) -> None:
        self._service = service
        self._task = task
        self._resolved = resolved
        self._after = after

    async def on_progress(self, job: GenerationJob, percent: int) -> None:
        await self._service._state.set_progress(job.task_uuid, job.index, percent)

    async def on_checkpoint(self, job: GenerationJob, data: Mapping[str, Any]) -> None:
        await self._service._state.update_task_extra(job.task_uuid, {f"job{job.index}": dict(data)})

    async def on_outcome(self, job: GenerationJob, outcome: Outcome) -> None:
        current_task.set(job.task_uuid)
        try:
            await self._service.store_outcome(self._task, self._resolved, job, outcome)
        except ImpastoError as exc:
            await self._service.store_outcome(self._task, self._resolved, job, exc)
        except Exception:
            log.exception("storing generation %s failed", job.job_id)
            failure = InferenceError("The generated image could not be stored.")
            await self._service.store_outcome(self._task, self._resolved, job, failure)
        if self._after is not None:
            await self._after(job)
