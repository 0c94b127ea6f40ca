"""How RedisStateStore keeps its records in Redis hashes and reads them back (every value a
string; JSON for the wire parts). Key layout: see impasto.state.redis_store."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import cast

from impasto.state.records import (
    DeliveryKind,
    DeliveryRecord,
    DeliveryStatus,
    ImageKind,
    ImageRecord,
    ResultRecord,
    ResultStatus,
    TaskRecord,
    TaskStatus,
)


def float_text(value: float) -> str:
    return repr(float(value))


def task_fields(task: TaskRecord) -> list[str]:
    fields = {
        "task_type": task.task_type,
        "request": json.dumps(task.request),
        "expected": str(task.expected),
        "status": task.status,
        "extra": json.dumps(task.extra),
        "created_at": float_text(task.created_at),
    }
    if task.model is not None:
        fields["model"] = task.model
    # compat: SqliteStateStore stores a falsy error as NULL, so `{}` reads back as None.
    if task.error:
        fields["error"] = json.dumps(task.error)
    if task.finished_at is not None:
        fields["finished_at"] = float_text(task.finished_at)
    return [part for pair in fields.items() for part in pair]


def results_of(task_uuid: str, stored: dict[str, str]) -> list[ResultRecord]:
    records = []
    for index in sorted(stored, key=int):
        value = json.loads(stored[index])
        records.append(
            ResultRecord(
                task_uuid=task_uuid,
                index=int(index),
                status=cast(ResultStatus, value["status"]),
                item=value["item"],
                created_at=float(value["created_at"]),
            )
        )
    return records


def task_of(task_uuid: str, h: dict[str, str]) -> TaskRecord:
    return TaskRecord(
        task_uuid=task_uuid,
        task_type=h["task_type"],
        model=h.get("model"),
        request=json.loads(h["request"]),
        expected=int(h["expected"]),
        status=cast(TaskStatus, h["status"]),
        error=json.loads(h["error"]) if "error" in h else None,
        extra=json.loads(h["extra"]),
        created_at=float(h["created_at"]),
        finished_at=float(h["finished_at"]) if "finished_at" in h else None,
    )


def delivery_fields(d: DeliveryRecord) -> list[str]:
    fields = {
        "task_uuid": d.task_uuid,
        "kind": d.kind,
        "url": d.url,
        "payload": d.payload,
        "content_type": d.content_type,
        "attempts": str(d.attempts),
        "status": d.status,
        "created_at": float_text(d.created_at),
        "next_attempt_at": float_text(d.next_attempt_at),
    }
    if d.index is not None:
        fields["index"] = str(d.index)
    # Falsy JSON is stored as absent, like SqliteStateStore's NULL.
    if d.last_error:
        fields["last_error"] = json.dumps(d.last_error)
    if d.then:
        fields["then"] = json.dumps(d.then)
    return [part for pair in fields.items() for part in pair]


def deliveries_arg(deliveries: Sequence[DeliveryRecord]) -> str:
    # ensure_ascii=False: the strings reach Lua as UTF-8 and cjson has no escapes to undo.
    return json.dumps(
        [
            {
                "id": d.delivery_id,
                "task": d.task_uuid,
                "pending": d.status == "pending",
                "due": float_text(d.next_attempt_at),
                "fields": delivery_fields(d),
            }
            for d in deliveries
        ],
        ensure_ascii=False,
    )


def delivery_of(delivery_id: str, h: dict[str, str]) -> DeliveryRecord:
    return DeliveryRecord(
        delivery_id=delivery_id,
        task_uuid=h["task_uuid"],
        index=int(h["index"]) if "index" in h else None,
        kind=cast(DeliveryKind, h["kind"]),
        url=h["url"],
        payload=h["payload"],
        content_type=h["content_type"],
        attempts=int(h["attempts"]),
        status=cast(DeliveryStatus, h["status"]),
        last_error=json.loads(h["last_error"]) if "last_error" in h else None,
        then=json.loads(h["then"]) if "then" in h else None,
        created_at=float(h["created_at"]),
        next_attempt_at=float(h["next_attempt_at"]),
    )


def image_fields(image: ImageRecord) -> dict[str, str]:
    fields = {
        "key": image.key,
        "content_type": image.content_type,
        "kind": image.kind,
        "width": str(image.width),
        "height": str(image.height),
        "created_at": float_text(image.created_at),
        "expires_at": float_text(image.expires_at),
    }
    if image.task_uuid is not None:
        fields["task_uuid"] = image.task_uuid
    return fields


def image_of(image_uuid: str, h: dict[str, str]) -> ImageRecord:
    return ImageRecord(
        image_uuid=image_uuid,
        key=h["key"],
        content_type=h["content_type"],
        kind=cast(ImageKind, h["kind"]),
        width=int(h["width"]),
        height=int(h["height"]),
        task_uuid=h.get("task_uuid"),
        created_at=float(h["created_at"]),
        expires_at=float(h["expires_at"]),
    )


def pairs(flat: list[str]) -> dict[str, str]:
    """A hash as HGETALL returns it from inside a script: [field, value, field, value, ...]."""
    return dict(zip(flat[::2], flat[1::2], strict=True))
