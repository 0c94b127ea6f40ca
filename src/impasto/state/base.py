"""The StateStore and EventBus seams."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from impasto.state.records import (
    DeliveryRecord,
    DeliveryStatus,
    ImageRecord,
    ResultRecord,
    TaskRecord,
    TaskStatus,
    TaskView,
)


class StateStore(Protocol):
    """Tasks, result items and image records: the single truth that every delivery path reads.

    Every method raises ServiceUnavailable when the backing service cannot be used (StorageFull
    when it has no space left); after an outage the same store works again without reopening.
    """

    async def ping(self) -> None:
        """Return if the store can be used now; raise ServiceUnavailable saying why not."""

    async def create_task(self, task: TaskRecord) -> None:
        """Insert a task; raises ConflictTaskUUID if its UUID was used before."""

    async def get_task(self, task_uuid: str) -> TaskRecord | None:
        """The task, or None if unknown or swept."""

    async def finish_task(
        self,
        task_uuid: str,
        status: TaskStatus,
        error: dict[str, Any] | None,
        at: float,
        deliveries: Sequence[DeliveryRecord] = (),
    ) -> bool:
        """Mark a still-processing task finished and queue `deliveries` with it, atomically;
        False (and nothing changed) if it was already finished."""

    async def update_task_extra(self, task_uuid: str, extra: dict[str, Any]) -> None:
        """Merge backend bookkeeping into the task's `extra`."""

    async def add_result(
        self,
        result: ResultRecord,
        deliveries: Sequence[DeliveryRecord] = (),
        image: ImageRecord | None = None,
    ) -> bool:
        """Store one result and queue its deliveries, atomically; False (and nothing changed)
        if that index is already stored. `image` (the result's output image) is recorded
        with it; a store that cannot do both in one step records the image first."""

    async def results(self, task_uuid: str) -> list[ResultRecord]:
        """All stored results of a task, by index."""

    async def task_view(self, task_uuid: str) -> TaskView | None:
        """The task, its results by index and its deliveries oldest first, read at once;
        None if the task is unknown or swept."""

    async def set_progress(self, task_uuid: str, index: int, percent: int) -> None:
        """Record how far generation `index` of a task is (0-100)."""

    async def progress(self, task_uuid: str) -> dict[int, int]:
        """Progress per generation index of a running task."""

    async def unfinished_tasks(self) -> list[TaskRecord]:
        """Tasks still processing (after a restart: the ones that were interrupted)."""

    async def deliveries(self, task_uuid: str) -> list[DeliveryRecord]:
        """Every delivery of a task, oldest first."""

    async def claim_deliveries(
        self, now: float, limit: int, lease_s: float
    ) -> list[DeliveryRecord]:
        """Take up to `limit` pending deliveries that are due, pushing their next attempt
        `lease_s` into the future so no other node takes them meanwhile (a node that dies
        mid-attempt lets the lease run out and the delivery is taken again)."""

    async def next_delivery_at(self) -> float | None:
        """When the earliest pending delivery is due, or None if none is pending."""

    async def reschedule_delivery(
        self, delivery_id: str, attempts: int, next_attempt_at: float, error: dict[str, Any]
    ) -> None:
        """Record a failed attempt and when to try again."""

    async def settle_delivery(
        self,
        delivery_id: str,
        status: DeliveryStatus,
        attempts: int,
        error: dict[str, Any] | None,
        follow_ups: Sequence[DeliveryRecord] = (),
    ) -> bool:
        """Mark a pending delivery done or failed and queue its follow-ups, atomically;
        False if it had already settled."""

    async def put_image(self, image: ImageRecord) -> None:
        """Record a stored image."""

    async def get_image(self, image_uuid: str) -> ImageRecord | None:
        """The image record, or None."""

    async def delete_image(self, image_uuid: str) -> None:
        """Forget an image record."""

    async def expired_images(self, now: float, limit: int) -> list[ImageRecord]:
        """Images whose expiry has passed."""

    async def sweep_tasks(self, finished_before: float) -> int:
        """Delete tasks (and their results) finished before the given time; returns how many."""

    async def close(self) -> None:
        """Release connections."""


class Subscription(Protocol):
    """A stream of change notifications for one task."""

    async def wait(self, timeout: float | None) -> bool:
        """True when a change arrived, False on timeout."""


class EventBus(Protocol):
    """Announces that a task has a new result, progress, or finished.

    `publish` raises ServiceUnavailable when the bus cannot be used. A bus that loses its
    connection reconnects by itself and then wakes every subscriber once, since what was
    published meanwhile is lost: subscribers re-read state after every wakeup.
    """

    @property
    def healthy(self) -> bool:
        """Whether notifications are being received now (False while reconnecting)."""

    async def ping(self) -> None:
        """Return if the bus delivers notifications now; raise ServiceUnavailable if not."""

    async def publish(self, task_uuid: str) -> None:
        """Wake everyone subscribed to this task."""

    def subscribe(self, task_uuid: str) -> AbstractAsyncContextManager[Subscription]:
        """Subscribe before reading state, so that no change is missed in between."""


@dataclass(frozen=True)
class QueuedJob:
    """A generation waiting in a JobQueue: which task, which image, for which model."""

    air: str
    task_uuid: str
    index: int
    entry_id: str = ""
    # How many times the job has been handed to a worker (1 the first time).
    deliveries: int = 1


class JobQueue(Protocol):
    """Generation jobs shared between API nodes (producers) and workers (consumers).

    At least once: a job stays owned by the worker that took it until acknowledged; a worker
    that dies without acknowledging lets its lease lapse, and another worker takes the job
    again. Results are stored idempotently per (task, index), so a job run twice stores once.
    Every method raises ServiceUnavailable when the queue's service cannot be used.
    """

    async def ping(self) -> None:
        """Return if the queue can be used now; raise ServiceUnavailable saying why not."""

    async def put(self, jobs: Sequence[QueuedJob]) -> None:
        """Queue jobs (each for its own model's queue)."""

    async def take(self, airs: Sequence[str], count: int, block_s: float) -> list[QueuedJob]:
        """Up to `count` jobs for these models, waiting at most `block_s` for the first."""

    async def reclaim(self, airs: Sequence[str], lease_s: float, count: int) -> list[QueuedJob]:
        """Jobs whose owner has not touched them for `lease_s`: now ours."""

    async def touch(self, jobs: Sequence[QueuedJob]) -> None:
        """Renew our lease on jobs we are still working on."""

    async def ack(self, job: QueuedJob) -> None:
        """The job's outcome is stored: forget it."""

    async def depth(self, air: str) -> int:
        """Jobs of a model not yet acknowledged (waiting or running)."""

    async def close(self) -> None:
        """Release connections."""
