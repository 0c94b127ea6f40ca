"""Outcomes: what happens to a finished generation (cog's event handler). Safety check, encode,
store the image, record the result item with its deliveries, finish the task, announce.

Recording never gives up on an outcome it holds: an image that cannot be checked or encoded
becomes an error result; an image or error that cannot be stored because the state store or the
image storage is unavailable is retried with backoff until it is (a restarted Redis, a disk
with room again), so an accepted task always ends without a restart. A full image store fails
the generation with `storageFull` (the error itself is retried until it is stored).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from typing import Any

from impasto.backends.base import GeneratedImage, GenerationJob, Outcome
from impasto.backends.registry import ResolvedModel
from impasto.delivery.codecs import EncodedImage, encode_image
from impasto.delivery.outbox import new_delivery
from impasto.logcontext import current_task
from impasto.protocol.errors import (
    ContentBlocked,
    ImpastoError,
    InferenceError,
    ServiceUnavailable,
    StorageFull,
)
from impasto.protocol.results import image_item
from impasto.protocol.tasks import ImageInferenceIn
from impasto.service.completion import TaskCompletion
from impasto.service.safety import ContentSafety, wants_output_check
from impasto.service.usage import UsageMeter
from impasto.state.base import StateStore
from impasto.state.records import DeliveryRecord, ImageRecord, ResultRecord
from impasto.storage.base import ImageStore

log = logging.getLogger("impasto.outcomes")

TASK_TYPE = "imageInference"

Sleep = Callable[[float], Awaitable[None]]
# Awaited once a generation's outcome is stored (worker acknowledgements).
StoredCallback = Callable[[GenerationJob], Awaitable[None]]


def result_deliveries(
    task_uuid: str,
    index: int,
    item: dict[str, Any],
    *,
    webhook_url: str | None,
    upload: tuple[str, str, str] | None = None,
) -> list[DeliveryRecord]:
    """What a stored result sends: its image PUT to the upload endpoint (`upload`: endpoint,
    storage key, content type), then or else its webhook `{"data": [item]}`."""
    webhook = {"url": webhook_url, "payload": json.dumps({"data": [item]})} if webhook_url else None
    if upload is not None:
        endpoint, key, content_type = upload
        return [
            new_delivery(
                "upload",
                task_uuid,
                endpoint,
                key,
                index=index,
                content_type=content_type,
                then=webhook,
            )
        ]
    if webhook is not None:
        return [new_delivery("webhook", task_uuid, webhook["url"], webhook["payload"], index=index)]
    return []


class OutcomeRecorder:
    """Turns a generation's outcome into a stored result item."""

    def __init__(
        self,
        *,
        state: StateStore,
        images: ImageStore,
        completion: TaskCompletion,
        safety: ContentSafety,
        encode_pool: Executor,
        image_base_url: str,
        output_retention_s: int,
        wake_outbox: Callable[[], None],
        sleep: Sleep = asyncio.sleep,
        retry_max_s: float = 10.0,
        meter: UsageMeter | None = None,
    ) -> None:
        self._state = state
        self._meter = meter
        self._images = images
        self._completion = completion
        self._safety = safety
        self._encode_pool = encode_pool
        self._image_base_url = image_base_url
        self._output_retention_s = output_retention_s
        self._wake_outbox = wake_outbox
        self._sleep = sleep
        self._retry_max_s = retry_max_s
        # Generations whose outcome is waiting for storage to come back, with the reason.
        self._waiting: dict[str, str] = {}

    def problems(self) -> list[str]:
        """One line while finished generations wait for storage (a full disk, a store away)."""
        if not self._waiting:
            return []
        reason = next(iter(self._waiting.values()))
        return [f"{len(self._waiting)} finished generation(s) waiting to be stored: {reason}"]

    async def record(
        self, task: ImageInferenceIn, resolved: ResolvedModel, job: GenerationJob, outcome: Outcome
    ) -> None:
        """Store `outcome` (or the error it turns into), retrying while storage is down."""
        try:
            await self._record(task, resolved, job, outcome)
        finally:
            self._waiting.pop(job.job_id, None)

    async def _record(
        self, task: ImageInferenceIn, resolved: ResolvedModel, job: GenerationJob, outcome: Outcome
    ) -> None:
        current: Outcome = outcome
        delay = 0.25
        failures = 0
        while True:
            try:
                await self._store(task, resolved, job, current)
                if failures:
                    log.info("stored generation %s after %d failed tries", job.job_id, failures)
                return
            except StorageFull as exc:
                if isinstance(current, GeneratedImage):
                    current = exc  # no room for the image: the generation fails with that
                    continue
                reason = exc.message
            except ServiceUnavailable as exc:
                reason = exc.message
            except ImpastoError as exc:
                if isinstance(current, GeneratedImage):
                    current = exc  # withheld by the content checker, say
                    continue
                raise AssertionError("storing an error outcome raised a client error") from exc
            except Exception:
                log.exception("storing generation %s failed", job.job_id)
                if isinstance(current, GeneratedImage):
                    current = InferenceError("The generated image could not be stored.")
                    continue
                reason = "unexpected error"
            failures += 1
            self._waiting[job.job_id] = reason
            if failures == 1 or failures % 20 == 0:
                log.warning(
                    "cannot store generation %s (%s); retrying until storage is back",
                    job.job_id,
                    reason,
                )
            await self._sleep(delay)
            delay = min(delay * 2, self._retry_max_s)

    async def _store(
        self, task: ImageInferenceIn, resolved: ResolvedModel, job: GenerationJob, outcome: Outcome
    ) -> None:
        if isinstance(outcome, GeneratedImage):
            await self._store_image(task, resolved, job, outcome)
        else:
            error = outcome.for_task(TASK_TYPE, task.taskUUID).to_item()
            error["taskType"], error["taskUUID"] = TASK_TYPE, task.taskUUID
            await self._state.add_result(
                ResultRecord(task.taskUUID, job.index, "error", error, time.time())
            )
        await self._completion.maybe_finish(task.taskUUID)

    async def _store_image(
        self,
        task: ImageInferenceIn,
        resolved: ResolvedModel,
        job: GenerationJob,
        generated: GeneratedImage,
    ) -> None:
        now = time.time()
        nsfw = None
        if wants_output_check(task):
            verdict = (await self._safety.check_outputs(task, [generated.image]))[0]
            if verdict.withhold:
                raise ContentBlocked(
                    "The generated image was flagged by the content checker and withheld.",
                    parameter="safety.checkContent",
                )
            nsfw = verdict.nsfw
        image_uuid = str(uuid.uuid4())
        # A store that writes in the calling thread (local files) is written by the encoder's
        # thread: one hop for encoding and storing.
        put_now: Callable[[str, bytes, str], None] | None = getattr(self._images, "put_now", None)

        def encode_and_store() -> tuple[EncodedImage, str]:
            encoded = encode_image(generated.image, task.outputFormat, task.outputQuality)
            key = f"{image_uuid}.{encoded.extension}"
            if put_now is not None:
                put_now(key, encoded.data, encoded.content_type)
            return encoded, key

        loop = asyncio.get_running_loop()
        encoded, key = await loop.run_in_executor(self._encode_pool, encode_and_store)
        if put_now is None:
            await self._images.put(key, encoded.data, encoded.content_type)
        # Whether this copy is (or may be) the stored one; an add_result that raised may still
        # have been written (a connection cut after the command): its image is kept while its
        # record exists, and the record's expiry cleans it up if the result was not stored.
        keep = False
        try:
            expires_at = now + (task.ttl or self._output_retention_s)
            image_record = ImageRecord(
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
            # What the image costs is metered whether or not the client asked to see it.
            spent = (
                generated.cost
                if generated.cost is not None
                else resolved.rules.price.cost((job.width, job.height))
            )
            cost = spent if task.includeCost else None
            item = image_item(
                task_type=TASK_TYPE,
                task_uuid=task.taskUUID,
                image_uuid=image_uuid,
                output_type=task.output_types(),
                data=encoded.data,
                content_type=encoded.content_type,
                url=self._images.direct_url(key, expires_at) or self.image_url(key),
                seed=generated.seed,
                cost=cost,
                nsfw=nsfw,
            )
            record = ResultRecord(task.taskUUID, job.index, "success", item, now)
            deliveries = result_deliveries(
                task.taskUUID,
                job.index,
                item,
                webhook_url=task.webhookURL,
                upload=(task.uploadEndpoint, key, encoded.content_type)
                if task.uploadEndpoint
                else None,
            )
            keep = True
            try:
                stored = await self._state.add_result(record, deliveries, image=image_record)
            except Exception:
                # Written or not? A result is only stored with its image record (or after it),
                # so a copy without a record is named by nothing and goes.
                with contextlib.suppress(Exception):
                    keep = await self._state.get_image(image_uuid) is not None
                raise
            keep = stored
            if stored and deliveries:
                self._wake_outbox()
            if stored and self._meter is not None:
                await self._meter.image_stored(
                    task.taskUUID, job.index, task.model, encoded.width, encoded.height, spent
                )
        finally:
            if not keep:
                # Failed, or already stored by a re-run that raced this one: keep nothing.
                with contextlib.suppress(Exception):
                    await self._images.delete(key)
                with contextlib.suppress(Exception):
                    await self._state.delete_image(image_uuid)

    def image_url(self, key: str) -> str:
        return f"{self._image_base_url}/image/{key}"


class TaskSink:
    """The engine's view of one task."""

    def __init__(
        self,
        recorder: OutcomeRecorder,
        state: StateStore,
        task: ImageInferenceIn,
        resolved: ResolvedModel,
        after: StoredCallback | None = None,
    ) -> None:
        self._recorder = recorder
        self._state = state
        self._task = task
        self._resolved = resolved
        self._after = after

    async def on_progress(self, job: GenerationJob, percent: int) -> None:
        # Progress is a hint: losing one while the store is away costs nothing.
        with contextlib.suppress(ServiceUnavailable):
            await self._state.set_progress(job.task_uuid, job.index, percent)

    async def on_checkpoint(self, job: GenerationJob, data: Mapping[str, Any]) -> None:
        await self._state.update_task_extra(job.task_uuid, {f"job{job.index}": dict(data)})

    async def on_outcome(self, job: GenerationJob, outcome: Outcome) -> None:
        current_task.set(job.task_uuid)
        await self._recorder.record(self._task, self._resolved, job, outcome)
        if self._after is not None:
            await self._after(job)
