"""The task state machine that getResponse, sync replies (`follow`) and the outbox share.

A task is `processing` until every generation has a stored result and every upload PUT has
settled; then it is `success`, or `error` with its distinct failures (and one webhook carrying
them). While an image's upload is still being retried the image is not done: getResponse shows
it `processing`, and a failed upload shows as an `uploadFailed` error beside the image.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from impasto.delivery.outbox import new_delivery
from impasto.protocol.errors import ImpastoError, ServiceUnavailable, SyncTimeout, UploadFailed
from impasto.protocol.results import error_status_item, processing_item
from impasto.state.base import EventBus, StateStore, Subscription
from impasto.state.records import DeliveryRecord, ResultRecord, TaskRecord

log = logging.getLogger("impasto.completion")

# How often a follower re-reads state even without a notification: a bus message can be lost
# (a Redis reconnect drops what was published meanwhile), state cannot.
FOLLOW_RECHECK_S = 2.0


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
                task_type=item.get("taskType", "imageInference"),
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


def status_items(
    task: TaskRecord,
    results: list[ResultRecord],
    progress: dict[int, int],
    uploads: list[DeliveryRecord],
) -> list[dict[str, Any]]:
    """The cumulative getResponse view of a task: one item per generation, then one
    uploadFailed item per image whose upload gave up."""
    by_index = {r.index: r for r in results}
    uploading = {d.index for d in uploads if d.status == "pending"}
    items: list[dict[str, Any]] = []
    for index in range(task.expected):
        result = by_index.get(index)
        if result is None:
            if task.status == "processing":
                items.append(
                    processing_item(task.task_type, task.task_uuid, progress.get(index, 0))
                )
            elif task.error is not None:
                items.append(error_status_item(task.task_type, task.task_uuid, task.error))
        elif result.status == "error":
            items.append(error_status_item(task.task_type, task.task_uuid, result.item))
        elif index in uploading:
            # Generated (its UUID is known), but its PUT is still being retried: not done
            # until it settles, as success or with an uploadFailed error.
            item = processing_item(task.task_type, task.task_uuid, 100)
            item["imageUUID"] = result.item.get("imageUUID")
            items.append(item)
        else:
            items.append({**result.item, "status": "success"})
    for error in upload_errors(results, uploads):
        items.append(error_status_item(task.task_type, task.task_uuid, error.to_item()))
    return items


class TaskCompletion:
    """Finishes tasks once everything is in, and follows them for sync replies."""

    def __init__(
        self,
        state: StateStore,
        bus: EventBus,
        wake_outbox: Callable[[], None],
        *,
        recheck_s: float = FOLLOW_RECHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._state = state
        self._bus = bus
        self._wake_outbox = wake_outbox
        self._recheck_s = recheck_s
        # Times sync waits (`follow`); tests inject one.
        self._clock = clock

    async def uploads(self, task_uuid: str) -> list[DeliveryRecord]:
        return [d for d in await self._state.deliveries(task_uuid) if d.kind == "upload"]

    async def maybe_finish(self, task_uuid: str) -> None:
        """Finish the task once every generation is stored and every upload has settled; a
        task with failures then sends one webhook with its distinct errors. Announces."""
        view = await self._state.task_view(task_uuid)
        if view is None or view.task.status != "processing":
            await self._announce(task_uuid)
            return
        record, results = view.task, view.results
        uploads = [d for d in view.deliveries if d.kind == "upload"]
        if len(results) < record.expected or any(d.status == "pending" for d in uploads):
            await self._announce(task_uuid)
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
        await self._announce(task_uuid)

    async def _announce(self, task_uuid: str) -> None:
        # What is announced is already stored: a notification lost while the bus is away only
        # delays followers until they re-read state (every `recheck_s`).
        try:
            await self._bus.publish(task_uuid)
        except ServiceUnavailable as exc:
            log.warning("could not announce task %s: %s", task_uuid, exc.message)

    async def fail_missing(self, task_uuid: str, indices: list[int], error: ImpastoError) -> None:
        """Store `error` for every generation of `indices` that has no result yet, then finish."""
        item = error.to_item()
        now = time.time()
        for index in indices:
            await self._state.add_result(ResultRecord(task_uuid, index, "error", item, now))
        await self.maybe_finish(task_uuid)

    async def upload_failures(self, task_uuid: str) -> list[ImpastoError]:
        """uploadFailed errors of a task's images (each image is still in our store)."""
        uploads = await self.uploads(task_uuid)
        if not any(d.status == "failed" for d in uploads):
            return []
        return upload_errors(await self._state.results(task_uuid), uploads)

    async def on_delivery_settled(self, delivery: DeliveryRecord, ok: bool) -> None:
        """The outbox finished a delivery: an upload may complete its task."""
        if delivery.kind == "upload":
            await self.maybe_finish(delivery.task_uuid)

    async def follow(
        self, task_uuid: str, subscription: Subscription, timeout: float
    ) -> AsyncIterator[ResultRecord]:
        """Yield each result of a task as it is stored, until the task is finished.

        Raises SyncTimeout if the task is still running after `timeout` seconds.
        """
        seen: set[int] = set()
        deadline = self._clock() + timeout
        while True:
            # Status and results in one read: a task seen finished has all its results stored.
            view = await self._state.task_view(task_uuid)
            for result in view.results if view is not None else ():
                if result.index not in seen:
                    seen.add(result.index)
                    yield result
            if view is None or view.task.status != "processing":
                return
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise SyncTimeout(
                    f"Task {task_uuid} did not finish within {timeout:g} s; it goes on, and "
                    "getResponse returns its results.",
                )
            # Woken by a notification or not, state is read again within `recheck_s`.
            await subscription.wait(min(remaining, self._recheck_s))
