"""The JSON schemas of `POST /v1` for /openapi.json: the request array of tasks, one schema per
task type, and the envelope of the reply. Built from the wire models, so the published schema
cannot drift from what `parse_task` takes; the models' validators carry their JSON-schema side
(see `tasks.py`), so data valid by this schema parses.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from impasto.protocol.parsing import TASK_MODELS

REF_TEMPLATE = "#/components/schemas/{model}"
ERROR_ITEM = "ErrorItem"
TASK_REPLY = "TaskReply"

_ERROR_ITEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "One Runware error item.",
    "required": ["code", "message"],
    "properties": {
        "code": {"type": "string", "examples": ["invalidPositivePrompt"]},
        "message": {"type": "string"},
        "parameter": {"type": "string"},
        "taskType": {"type": "string"},
        "taskUUID": {"type": "string"},
    },
}

_TASK_REPLY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "The Runware envelope: result items under `data`, failed tasks under "
    "`errors`; a reply may carry both.",
    "properties": {
        "data": {"type": "array", "items": {"type": "object"}},
        "errors": {"type": "array", "items": {"$ref": REF_TEMPLATE.format(model=ERROR_ITEM)}},
    },
    "minProperties": 1,
}

_REPLY_STATUSES = {
    "200": "Results (and the errors of tasks that failed)",
    "202": "syncTimeout: the task goes on; ask for it with getResponse",
    "400": "A task or the body is invalid",
    "401": "Missing or rejected API key",
    "404": "getResponse for an unknown or expired task",
    "413": "Body too large or too many tasks",
    "429": "Queue full or provider rate limit; retry later",
    "500": "Inference failed",
    "502": "A provider or an upload failed",
    "503": "Storage, state or provider unavailable; retry later",
    "504": "A provider timed out",
}


def tasks_request_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """(The requestBody schema of POST /v1, the component schemas it and the replies name).

    The request is an array of tasks, each one of the task types chosen by `taskType`; every
    `$ref` points into `#/components/schemas`, which the second value fills (task models, their
    nested models, `ErrorItem` and `TaskReply`).
    """
    models = [(model, "validation") for model in TASK_MODELS.values()]
    refs, top = models_json_schema(models, ref_template=REF_TEMPLATE)  # type: ignore[arg-type]
    components: dict[str, Any] = dict(top.get("$defs", {}))
    mapping = {
        task_type: refs[(model, "validation")]["$ref"] for task_type, model in TASK_MODELS.items()
    }
    task_schema = {
        "oneOf": [{"$ref": ref} for ref in mapping.values()],
        "discriminator": {"propertyName": "taskType", "mapping": mapping},
    }
    components[ERROR_ITEM] = _ERROR_ITEM_SCHEMA
    components[TASK_REPLY] = _TASK_REPLY_SCHEMA
    request = {"type": "array", "minItems": 1, "items": task_schema}
    return request, components


def tasks_responses() -> dict[str, Any]:
    """The `responses` of POST /v1: every status carries the envelope."""
    content = {"application/json": {"schema": {"$ref": REF_TEMPLATE.format(model=TASK_REPLY)}}}
    return {
        status: {"description": description, "content": content}
        for status, description in _REPLY_STATUSES.items()
    }


def add_components(document: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """Merge component schemas into an OpenAPI document (in place; returned for chaining)."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(components)
    return document
