"""Wire types of the tasks a client sends, and the one place that turns pydantic's validation
errors into Runware error items (`invalid<Param>`, `missing<Param>`, `unsupportedParameter`...).

Every field is bounded (numbers, string lengths, list lengths) and every float is finite, so an
accepted task can be stored, logged and computed with; the JSON schema of each type, which
`openapi.py` publishes, describes what the validators really take.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationError,
    WithJsonSchema,
    field_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, ErrorDetails

from impasto.protocol.errors import (
    ImpastoError,
    InvalidParameter,
    RequestError,
    UnknownParameter,
    UnsupportedParameter,
)
from impasto.protocol.rules import KNOWN_UNSUPPORTED_INPUTS, KNOWN_UNSUPPORTED_PARAMETERS, code_name

# Re-exported: callers import these from here, where they lived before the model checks moved.
from impasto.protocol.rules import RUNWAY_MAX_PROMPT_UNITS as RUNWAY_MAX_PROMPT_UNITS
from impasto.protocol.rules import RUNWAY_TAG as RUNWAY_TAG
from impasto.protocol.rules import check_against_rules as check_against_rules
from impasto.protocol.urls import looks_like_http_url, url_problem

# Runware documents seeds 1 ... 2**63 - 1; impasto also takes 0.
MAX_SEED = 2**63 - 1
# compat: @runware/sdk-js reads JSON numbers as doubles and rounds a seed above 2**53 - 1,
# so a drawn seed it is sent back could not reproduce the image. Seeds we draw stay below this;
# a client may still send any seed up to MAX_SEED.
MAX_RANDOM_SEED = 2**53 - 1
# 30 days: longer than any store keeps an image, and far from overflowing a timestamp.
MAX_TTL_S = 30 * 24 * 3600
MAX_SEARCH_OFFSET = 1_000_000
OUTPUT_FORMATS = ("JPG", "PNG", "WEBP")
OUTPUT_TYPES = ("URL", "base64Data", "dataURI")
SIZE_PARAMETERS = ("width", "height")

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# The JSON-schema side of the validators below, so that a schema-driven fuzzer's "valid" data
# is valid here too; each pattern accepts a subset of what the validator takes.
_NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"
_UUID4_PATTERN = (
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-4[0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}$"
)
_HTTP_URL_PATTERN = (
    r"^[hH][tT][tT][pP][sS]?://[A-Za-z][A-Za-z0-9-]{0,62}(\.[A-Za-z][A-Za-z0-9-]{0,62}){0,2}"
    r"(:[1-9][0-9]{0,3})?(/[!-~]*)?$"
)
# One character that is not whitespace to JavaScript's `\s` nor to Python's `str.strip`.
_NOT_BLANK_PATTERN = r"[^\s\x1c-\x1f\x85]"
_HTTP_PREFIX_PATTERN = r"^[hH][tT][tT][pP][sS]?://"
_OUTPUT_FORMAT_PATTERN = r"^([Jj][Pp][Ee]?[Gg]|[Pp][Nn][Gg]|[Ww][Ee][Bb][Pp])$"


@dataclass(frozen=True)
class JsonPattern:
    """Annotation that adds a `pattern` to a type's JSON schema (the validator does the check)."""

    pattern: str

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema["pattern"] = self.pattern
        return json_schema


def is_uuid4(value: str) -> bool:
    try:
        parsed = uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        return False
    return parsed.version == 4 and str(parsed) == value.lower()


def _check_uuid4(value: str) -> str:
    if not is_uuid4(value):
        raise ValueError("must be a UUID v4 string such as 'f47ac10b-58cc-4372-a567-0e02b2c3d493'")
    return value


def _check_printable(value: str) -> str:
    # Names and tags end up in logs and provider requests, where CR/LF would forge lines.
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


def _check_url(value: str) -> str:
    problem = url_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _check_image_string(value: str) -> str:
    return _check_url(value) if looks_like_http_url(value) else value


def _reference_item(value: Any) -> Any:
    # A reference image may be a bare string (UUID, URL, data URI, base64) or {image, tag}.
    return {"image": value} if isinstance(value, str) else value


def _single_output_type(value: Any) -> Any:
    # compat: runware 0.5.24 types outputType as a list such as ["URL"].
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


def _output_format(value: Any) -> Any:
    if isinstance(value, str):
        upper = value.upper()
        return "JPG" if upper == "JPEG" else upper
    return value


def _integral_float(value: Any) -> Any:
    # compat: JSON has one number type; `512.0` is the integer 512 to a JavaScript server such
    # as Runware's and to JSON Schema (so schemathesis sends it), though never 512.5 or `true`.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Constraints go inside the Annotated, before this, or the JSON schema of an optional field
# gets pydantic's `ge`/`le` instead of `minimum`/`maximum`.
INTEGRAL = BeforeValidator(_integral_float)
UUID4 = Annotated[str, AfterValidator(_check_uuid4), JsonPattern(_UUID4_PATTERN)]
Name = Annotated[str, AfterValidator(_check_printable), JsonPattern(_NO_CONTROL_PATTERN)]
HttpURL = Annotated[str, AfterValidator(_check_url), JsonPattern(_HTTP_URL_PATTERN)]
# Image strings carry no length bound of their own: a data URI may be as long as the body.
ImageString = Annotated[
    str,
    Field(min_length=1),
    AfterValidator(_check_image_string),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": _HTTP_URL_PATTERN, "maxLength": 2048},
                {"type": "string", "minLength": 1, "not": {"pattern": _HTTP_PREFIX_PATTERN}},
            ]
        }
    ),
]
OutputType = Literal["URL", "base64Data", "dataURI"]


class WireModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class ReferenceImageIn(WireModel):
    image: ImageString
    tag: Name | None = Field(default=None, max_length=64)


ReferenceImageList = Annotated[
    list[
        Annotated[
            ReferenceImageIn,
            BeforeValidator(_reference_item, json_schema_input_type=ImageString | ReferenceImageIn),
        ]
    ],
    Field(min_length=1, max_length=3),
]


class InputsIn(WireModel):
    referenceImages: ReferenceImageList | None = None


class ContentModerationIn(WireModel):
    publicFigureThreshold: Literal["auto", "low"] = "auto"


class RunwaySettingsIn(WireModel):
    contentModeration: ContentModerationIn | None = None


class ProviderSettingsIn(WireModel):
    runway: RunwaySettingsIn | None = None

    def providers(self) -> list[str]:
        return [name for name in type(self).model_fields if getattr(self, name) is not None]


class SafetyIn(WireModel):
    checkContent: bool | None = None
    blockContent: bool | None = None
    mode: Name | None = Field(default=None, max_length=50)
    checkInputs: bool | None = None
    tolerance: bool | None = None


class ImageInferenceIn(WireModel):
    taskType: Literal["imageInference"]
    taskUUID: UUID4
    model: Name = Field(min_length=1, max_length=200)
    positivePrompt: Annotated[str, JsonPattern(_NOT_BLANK_PATTERN)] = Field(
        min_length=1, max_length=1000
    )
    negativePrompt: str | None = Field(default=None, max_length=1000)
    width: Annotated[int, Field(ge=1, le=16384), INTEGRAL] | None = None
    height: Annotated[int, Field(ge=1, le=16384), INTEGRAL] | None = None
    numberResults: Annotated[int, Field(ge=1, le=20), INTEGRAL] = 1
    outputType: Annotated[
        OutputType,
        BeforeValidator(
            _single_output_type,
            json_schema_input_type=OutputType
            | Annotated[list[OutputType], Field(min_length=1, max_length=1)],
        ),
    ] = "URL"
    outputFormat: Annotated[
        Literal["JPG", "PNG", "WEBP"],
        BeforeValidator(_output_format),
        WithJsonSchema({"type": "string", "pattern": _OUTPUT_FORMAT_PATTERN, "default": "JPG"}),
    ] = "JPG"
    outputQuality: Annotated[int, Field(ge=20, le=99), INTEGRAL] = 95
    ttl: Annotated[int, Field(ge=60, le=MAX_TTL_S), INTEGRAL] | None = None
    includeCost: bool = False
    deliveryMethod: Literal["sync", "async"] = "sync"
    webhookURL: HttpURL | None = Field(default=None, min_length=1, max_length=2048)
    uploadEndpoint: HttpURL | None = Field(default=None, min_length=1, max_length=4096)
    referenceImages: ReferenceImageList | None = None
    inputs: InputsIn | None = None
    providerSettings: ProviderSettingsIn | None = None
    safety: SafetyIn | None = None
    checkNSFW: bool | None = None
    checkNsfw: bool | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), INTEGRAL] | None = None
    steps: Annotated[int, Field(ge=1, le=100), INTEGRAL] | None = None
    CFGScale: float | None = Field(default=None, ge=0, le=50)
    scheduler: Name | None = Field(default=None, min_length=1, max_length=100)
    strength: float | None = Field(default=None, ge=0, le=1)

    @field_validator("positivePrompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must contain a non-whitespace character")
        return value

    def reference_images(self) -> tuple[ReferenceImageIn, ...]:
        """Reference images from top level or `inputs`, whichever the client used."""
        if self.referenceImages:
            return tuple(self.referenceImages)
        if self.inputs is not None and self.inputs.referenceImages:
            return tuple(self.inputs.referenceImages)
        return ()


class ImageUploadIn(WireModel):
    taskType: Literal["imageUpload"]
    taskUUID: UUID4
    image: ImageString


class GetResponseIn(WireModel):
    taskType: Literal["getResponse"]
    taskUUID: UUID4


class ModelSearchIn(WireModel):
    taskType: Literal["modelSearch"]
    taskUUID: UUID4
    search: str | None = Field(default=None, max_length=200)
    tags: list[Annotated[Name, Field(max_length=100)]] | None = Field(default=None, max_length=50)
    category: Name | None = Field(default=None, max_length=100)
    type: Name | None = Field(default=None, max_length=100)
    architecture: Name | None = Field(default=None, max_length=100)
    conditioning: Name | None = Field(default=None, max_length=100)
    visibility: Literal["public", "private", "all"] | None = None
    limit: Annotated[int, Field(ge=1, le=100), INTEGRAL] = 20
    offset: Annotated[int, Field(ge=0, le=MAX_SEARCH_OFFSET), INTEGRAL] = 0


class PingIn(WireModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True, allow_inf_nan=False)
    taskType: Literal["ping"]
    ping: bool = True
    # Echoed in the pong, so held to the size of an identifier.
    taskUUID: Name | None = Field(default=None, max_length=100)


class AuthenticationIn(WireModel):
    taskType: Literal["authentication"]
    apiKey: str = Field(min_length=1, max_length=512)
    connectionSessionUUID: Name | None = Field(default=None, max_length=100)


TaskIn = (
    ImageInferenceIn | ImageUploadIn | GetResponseIn | ModelSearchIn | PingIn | AuthenticationIn
)

TASK_MODELS: dict[str, type[WireModel]] = {
    "imageInference": ImageInferenceIn,
    "imageUpload": ImageUploadIn,
    "getResponse": GetResponseIn,
    "modelSearch": ModelSearchIn,
    "ping": PingIn,
    "authentication": AuthenticationIn,
}

# A taskType or taskUUID is echoed in error items only when it could be one: short, and free of
# control characters and lone surrogates, so a reply or a log line cannot be bloated or forged.
_MAX_ECHOED = 128


def _echoable(value: Any) -> str | None:
    if not isinstance(value, str) or len(value) > _MAX_ECHOED:
        return None
    if _CONTROL.search(value) or _SURROGATE.search(value):
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
        return path if _SURROGATE.search(value) else None
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
