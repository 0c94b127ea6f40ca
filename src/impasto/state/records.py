"""Internal records kept by a StateStore (frozen dataclasses; wire JSON only in `request`,
`item` and `error`, which are stored exactly as they go on the wire)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Any, Literal

TaskStatus = Literal["processing", "success", "error"]
ResultStatus = Literal["success", "error"]
ImageKind = Literal["output", "upload", "input"]
DeliveryKind = Literal["webhook", "upload"]
DeliveryStatus = Literal["pending", "done", "failed"]


@dataclass(frozen=True)
class TaskRecord:
    """One accepted task."""

    task_uuid: str
    task_type: str
    request: dict[str, Any]
    expected: int
    created_at: float
    status: TaskStatus = "processing"
    error: dict[str, Any] | None = None
    finished_at: float | None = None
    model: str | None = None
    # Backend bookkeeping that must survive a restart (e.g. a provider's task ids).
    extra: dict[str, Any] = field(default_factory=dict)

    def visible_to(self, owner: str | None) -> bool:
        """Whether the key whose digest is `owner` may see this task: the one that made it,
        or anyone for a task made while the server was open (it has no owner)."""
        task_owner = self.extra.get("owner")
        return task_owner is None or hmac.compare_digest(str(task_owner), owner or "")


@dataclass(frozen=True)
class ResultRecord:
    """One finished generation of a task: its wire item, stored before it is announced."""

    task_uuid: str
    index: int
    status: ResultStatus
    item: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class ImageRecord:
    """An image we store (an output or an upload), with its storage key and expiry."""

    image_uuid: str
    key: str
    content_type: str
    kind: ImageKind
    width: int
    height: int
    created_at: float
    expires_at: float
    task_uuid: str | None = None


@dataclass(frozen=True)
class DeliveryRecord:
    """One outbound delivery (a webhook POST or an upload PUT), persisted until it settles.

    For uploads `payload` is the image's storage key; for webhooks it is the JSON body.
    `then` is a webhook to queue once this delivery settles: {"url": ..., "payload": ...}.
    """

    delivery_id: str
    task_uuid: str
    kind: DeliveryKind
    url: str
    payload: str
    content_type: str
    created_at: float
    next_attempt_at: float
    index: int | None = None
    attempts: int = 0
    status: DeliveryStatus = "pending"
    last_error: dict[str, Any] | None = None
    then: dict[str, Any] | None = None


@dataclass(frozen=True)
class TaskView:
    """A task with its results and deliveries, read together (one round trip)."""

    task: TaskRecord
    results: list[ResultRecord]
    deliveries: list[DeliveryRecord]
