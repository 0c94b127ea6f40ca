"""Result items as they go on the wire."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any


def image_item(
    *,
    task_type: str,
    task_uuid: str,
    image_uuid: str,
    output_type: str | Sequence[str],
    data: bytes,
    content_type: str,
    url: str,
    seed: int | None = None,
    cost: float | None = None,
    nsfw: bool | None = None,
) -> dict[str, Any]:
    """One image result: the output field(s) named by `outputType`, plus seed, cost, NSFW
    flag."""
    item: dict[str, Any] = {
        "taskType": task_type,
        "taskUUID": task_uuid,
        "imageUUID": image_uuid,
    }
    for kind in (output_type,) if isinstance(output_type, str) else output_type:
        if kind == "base64Data":
            item["imageBase64Data"] = base64.b64encode(data).decode("ascii")
        elif kind == "dataURI":
            encoded = base64.b64encode(data).decode("ascii")
            item["imageDataURI"] = f"data:{content_type};base64,{encoded}"
        else:
            item["imageURL"] = url
    if seed is not None:
        item["seed"] = seed
    if nsfw is not None:
        item["NSFWContent"] = nsfw
    if cost is not None:
        item["cost"] = round(cost, 6)
    return item


def ack_item(task_type: str, task_uuid: str) -> dict[str, Any]:
    """The acknowledgement of an async task: no result fields."""
    return {"taskType": task_type, "taskUUID": task_uuid}


def processing_item(task_type: str, task_uuid: str, progress: int) -> dict[str, Any]:
    return {
        "taskType": task_type,
        "taskUUID": task_uuid,
        "status": "processing",
        "progress": max(0, min(100, progress)),
    }


def error_status_item(task_type: str, task_uuid: str, error: dict[str, Any]) -> dict[str, Any]:
    """A failed generation inside a getResponse reply (not a top-level error)."""
    detail = {k: v for k, v in error.items() if k not in ("taskType", "taskUUID")}
    return {"taskType": task_type, "taskUUID": task_uuid, "status": "error", "error": detail}
