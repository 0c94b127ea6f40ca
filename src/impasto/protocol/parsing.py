"""Parsing one task of a request: taskType to its wire type, and pydantic's validation errors
to Runware error items (`invalid<Param>`, `missing<Param>`, `unsupportedParameter`...)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from impasto.protocol.account import AccountManagementIn, GetTaskDetailsIn
from impasto.protocol.errors import (
    ImpastoError,
    InvalidParameter,
    RequestError,
    UnknownParameter,
    UnsupportedParameter,
)
from impasto.protocol.fields import CONTROL, SURROGATE
from impasto.protocol.rules import KNOWN_UNSUPPORTED_INPUTS, KNOWN_UNSUPPORTED_PARAMETERS, code_name
from impasto.protocol.tasks import (
    AuthenticationIn,
    GetResponseIn,
    ImageInferenceIn,
    ImageUploadIn,
    ModelSearchIn,
    PingIn,
)
from impasto.protocol.utility import (
    ControlNetPreprocessIn,
    ImageControlNetPreProcessIn,
    MediaStorageIn,
)
from impasto.protocol.utility_tasks import UTILITY_TASK_MODELS, UtilityTaskIn

TaskIn = (
    ImageInferenceIn
    | ImageUploadIn
    | GetResponseIn
    | ModelSearchIn
    | PingIn
    | AuthenticationIn
    | MediaStorageIn
    | ImageControlNetPreProcessIn
    | ControlNetPreprocessIn
    | AccountManagementIn
    | GetTaskDetailsIn
    | UtilityTaskIn
)

# BaseModel, not WireModel: the utility tasks' models live in protocol/utility.py, which
# this module imports, so they cannot derive from WireModel (they share its config).
TASK_MODELS: dict[str, type[BaseModel]] = {
    "imageInference": ImageInferenceIn,
    "imageUpload": ImageUploadIn,
    "getResponse": GetResponseIn,
    "modelSearch": ModelSearchIn,
    "ping": PingIn,
    "authentication": AuthenticationIn,
    "mediaStorage": MediaStorageIn,
    "imageControlNetPreProcess": ImageControlNetPreProcessIn,
    "controlNetPreprocess": ControlNetPreprocessIn,
    "accountManagement": AccountManagementIn,
    "getTaskDetails": GetTaskDetailsIn,
    **UTILITY_TASK_MODELS,
}

# A taskType or taskUUID is echoed in error items only when it could be one: short, and free of
# control characters and lone surrogates, so a reply or a log line cannot be bloated or forged.
_MAX_ECHOED = 128


def _echoable(value: Any) -> str | None:
    if not isinstance(value, str) or len(value) > _MAX_ECHOED:
        return None
    if CONTROL.search(value) or SURROGATE.search(value):
        return None
    return value


def task_context(raw: Any) -> tuple[str | None, str | None]:
    """The (taskType, taskUUID) of a raw task, where they are sane strings, for error items."""
    if not isinstance(raw, dict):
        return None, None
    return _echoable(raw.get("taskType")), _echoable(raw.get("taskUUID"))


def parse_task(raw: Any) -> TaskIn:
    """Validate one element of the request array; raises an ImpastoError with task context."""
    task_type, task_uuid = task_context(raw)
    if not isinstance(raw, dict):
        raise RequestError("Each element of the request array must be a JSON object (a task).")
    if "taskType" not in raw:
        raise InvalidParameter(
            "taskType is required.",
            code="missingTaskType",
            parameter="taskType",
            task_uuid=task_uuid,
        )
    model = TASK_MODELS.get(task_type or "")
    if model is None:
        supported = ", ".join(TASK_MODELS)
        given = f"Task type {task_type!r}" if task_type is not None else "This taskType"
        raise InvalidParameter(
            f"{given} is not supported; supported: {supported}.",
            code="unsupportedTaskType",
            parameter="taskType",
            task_type=task_type,
            task_uuid=task_uuid,
        )
    try:
        task = model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        raise error_from_validation(first).for_task(task_type, task_uuid) from None
    bad_text = _lone_surrogate_path(task, ())
    if bad_text is not None:
        raise error_from_validation(
            {
                "type": "value_error",
                "loc": bad_text,
                "msg": "must be valid Unicode text (it has a lone surrogate)",
                "input": None,
            }
        ).for_task(task_type, task_uuid)
    return task  # type: ignore[return-value]


def _lone_surrogate_path(value: Any, path: tuple[int | str, ...]) -> tuple[int | str, ...] | None:
    """Where a string with a lone surrogate is: JSON lets `\\ud800` through, pydantic refuses it
    in some string fields but not all, and UTF-8 storage, logs and JSON serialisers choke."""
    if isinstance(value, str):
        return path if SURROGATE.search(value) else None
    if isinstance(value, BaseModel):
        items: Any = ((name, getattr(value, name)) for name in type(value).model_fields)
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _lone_surrogate_path(item, (*path, key))
        if found is not None:
            return found
    return None


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\-]{1,64}")


def _parameter_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        # An unknown key is the client's text: quoted and cut so it cannot forge a log line.
        name = part if _PLAIN_KEY.fullmatch(part) else ascii(part[:64])
        path += f".{name}" if path else name
    return path


def error_from_validation(error: ErrorDetails) -> ImpastoError:
    """Map one pydantic error to the Runware error item a client expects."""
    loc = tuple(error["loc"])
    parameter = _parameter_path(loc)
    root = str(loc[0]) if loc else ""
    # Errors deep inside `inputs` are named for the input they concern.
    named = str(loc[1]) if root == "inputs" and len(loc) > 1 else root
    kind = error["type"]
    if kind == "extra_forbidden":
        name = str(loc[-1])
        if root == "providerSettings" and len(loc) == 2:
            return InvalidParameter(
                f"Unknown provider {_parameter_path(loc[-1:])} in providerSettings.",
                code="unknownProviderSettingsProvider",
                parameter=parameter,
            )
        known_input = root == "inputs" and len(loc) == 2 and name in KNOWN_UNSUPPORTED_INPUTS
        if name in KNOWN_UNSUPPORTED_PARAMETERS or known_input:
            return UnsupportedParameter(
                f"Parameter {parameter} is not supported by impasto.", parameter=parameter
            )
        return UnknownParameter(f"Unknown parameter {parameter}.", parameter=parameter)
    if not named:
        return InvalidParameter(f"Invalid task: {error['msg']}.")
    if kind == "missing" and len(loc) == 1:
        return InvalidParameter(
            f"Missing required parameter {parameter}.",
            code=f"missing{code_name(named)}",
            parameter=parameter,
        )
    message = str(error["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return InvalidParameter(
        f"Invalid value for {parameter} parameter: {message}.",
        code=f"invalid{code_name(named)}",
        parameter=parameter,
    )
