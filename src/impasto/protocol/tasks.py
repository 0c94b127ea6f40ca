"""Wire types of the tasks a client sends, and the one place that turns pydantic's validation
errors into Runware error items (`invalid<Param>`, `missing<Param>`, `unsupportedParameter`...).
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from pydantic_core import ErrorDetails

from impasto.protocol.errors import (
    ImpastoError,
    InvalidParameter,
    RequestError,
    UnknownParameter,
    UnsupportedParameter,
)
from impasto.protocol.rules import (
    GENERATION_PARAMETERS,
    KNOWN_UNSUPPORTED_INPUTS,
    KNOWN_UNSUPPORTED_PARAMETERS,
    ModelRules,
)

MAX_SEED = 2**63 - 1
# Runway's reference tag rule: 3-16 characters, a letter first, then letters, digits or `_`.
# Its spec regex is lowercase-only while its own examples use `EiffelTower`; impasto accepts
# either case and passes the tag on as given, so the prompt's `@Tag` still matches it.
RUNWAY_TAG = re.compile(r"[A-Za-z][A-Za-z0-9_]{2,15}")
RUNWAY_MAX_PROMPT_UNITS = 1000
OUTPUT_FORMATS = ("JPG", "PNG", "WEBP")
OUTPUT_TYPES = ("URL", "base64Data", "dataURI")
SIZE_PARAMETERS = ("width", "height")


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


UUID4 = Annotated[str, AfterValidator(_check_uuid4)]


class WireModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class ReferenceImageIn(WireModel):
    image: str = Field(min_length=1)
    tag: str | None = None


ReferenceImageList = Annotated[
    list[Annotated[ReferenceImageIn, BeforeValidator(_reference_item)]],
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
    mode: str | None = None
    checkInputs: bool | None = None
    tolerance: bool | None = None


class ImageInferenceIn(WireModel):
    taskType: Literal["imageInference"]
    taskUUID: UUID4
    model: str = Field(min_length=1, max_length=200)
    positivePrompt: str = Field(min_length=1, max_length=1000)
    negativePrompt: str | None = Field(default=None, max_length=1000)
    width: int | None = Field(default=None, ge=1, le=16384)
    height: int | None = Field(default=None, ge=1, le=16384)
    numberResults: int = Field(default=1, ge=1, le=20)
    outputType: Annotated[
        Literal["URL", "base64Data", "dataURI"], BeforeValidator(_single_output_type)
    ] = "URL"
    outputFormat: Annotated[Literal["JPG", "PNG", "WEBP"], BeforeValidator(_output_format)] = "JPG"
    outputQuality: int = Field(default=95, ge=20, le=99)
    ttl: int | None = Field(default=None, ge=60)
    includeCost: bool = False
    deliveryMethod: Literal["sync", "async"] = "sync"
    webhookURL: str | None = Field(default=None, min_length=1, max_length=2048)
    uploadEndpoint: str | None = Field(default=None, min_length=1, max_length=4096)
    referenceImages: ReferenceImageList | None = None
    inputs: InputsIn | None = None
    providerSettings: ProviderSettingsIn | None = None
    safety: SafetyIn | None = None
    checkNSFW: bool | None = None
    checkNsfw: bool | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    steps: int | None = Field(default=None, ge=1, le=100)
    CFGScale: float | None = Field(default=None, ge=0, le=50)
    scheduler: str | None = Field(default=None, min_length=1, max_length=100)
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
    image: str = Field(min_length=1)


class GetResponseIn(WireModel):
    taskType: Literal["getResponse"]
    taskUUID: UUID4


class ModelSearchIn(WireModel):
    taskType: Literal["modelSearch"]
    taskUUID: UUID4
    search: str | None = Field(default=None, max_length=200)
    tags: list[str] | None = None
    category: str | None = None
    type: str | None = None
    architecture: str | None = None
    conditioning: str | None = None
    visibility: Literal["public", "private", "all"] | None = None
    limit: int = Field(default=20, ge=1, le=100)
    offset: int = Field(default=0, ge=0)


class PingIn(WireModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    taskType: Literal["ping"]
    ping: bool = True
    taskUUID: str | None = None


class AuthenticationIn(WireModel):
    taskType: Literal["authentication"]
    apiKey: str = Field(min_length=1, max_length=512)
    connectionSessionUUID: str | None = None


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


def task_context(raw: Any) -> tuple[str | None, str | None]:
    """The (taskType, taskUUID) of a raw task, as far as they are strings, for error items."""
    if not isinstance(raw, dict):
        return None, None
    task_type = raw.get("taskType")
    task_uuid = raw.get("taskUUID")
    return (
        task_type if isinstance(task_type, str) else None,
        task_uuid if isinstance(task_uuid, str) else None,
    )


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
        raise InvalidParameter(
            f"Task type {raw['taskType']!r} is not supported; supported: {supported}.",
            code="unsupportedTaskType",
            parameter="taskType",
            task_type=task_type,
            task_uuid=task_uuid,
        )
    try:
        return model.model_validate(raw)  # type: ignore[return-value]
    except ValidationError as exc:
        raise error_from_validation(exc.errors()[0]).for_task(task_type, task_uuid) from None


def _parameter_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path


def _code_name(parameter: str) -> str:
    return parameter[0].upper() + parameter[1:]


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
                f"Unknown provider {name!r} in providerSettings.",
                code="unknownProviderSettingsProvider",
                parameter=parameter,
            )
        known_input = root == "inputs" and len(loc) == 2 and name in KNOWN_UNSUPPORTED_INPUTS
        if name in KNOWN_UNSUPPORTED_PARAMETERS or known_input:
            return UnsupportedParameter(
                f"Parameter {parameter} is not supported by impasto.", parameter=parameter
            )
        return UnknownParameter(f"Unknown parameter {parameter}.", parameter=parameter)
    if kind == "missing" and len(loc) == 1:
        return InvalidParameter(
            f"Missing required parameter {parameter}.",
            code=f"missing{_code_name(named)}",
            parameter=parameter,
        )
    message = str(error["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return InvalidParameter(
        f"Invalid value for {parameter} parameter: {message}.",
        code=f"invalid{_code_name(named)}",
        parameter=parameter,
    )


def check_against_rules(task: ImageInferenceIn, rules: ModelRules) -> None:
    """Model-specific rules: sizes, parameters the model takes, result and reference counts."""
    given = task.model_fields_set
    for name in sorted(GENERATION_PARAMETERS & given):
        if not rules.accepts(name):
            raise UnsupportedParameter(
                f"Parameter {name} is not supported by model {rules.air}.", parameter=name
            )
    _check_size(task, rules)
    if task.numberResults > rules.max_results:
        raise InvalidParameter(
            f"Invalid value for numberResults parameter: model {rules.air} makes at most "
            f"{rules.max_results} images per task.",
            code="invalidNumberResults",
            parameter="numberResults",
        )
    _check_reference_images(task, rules)
    if rules.provider == "runway":
        _check_runway_inputs(task)
    if task.providerSettings is not None:
        for provider in task.providerSettings.providers():
            if provider != rules.provider:
                raise InvalidParameter(
                    f"providerSettings.{provider} does not match model {rules.air}.",
                    code="mismatchProviderSettingsProvider",
                    parameter=f"providerSettings.{provider}",
                )


def _check_size(task: ImageInferenceIn, rules: ModelRules) -> None:
    if (task.width is None) != (task.height is None):
        missing = "height" if task.height is None else "width"
        raise InvalidParameter(
            "width and height must be given together.",
            code=f"missing{_code_name(missing)}",
            parameter=missing,
        )
    if task.width is None or task.height is None:
        return
    problem = rules.sizes.check((task.width, task.height))
    if problem is None:
        return
    parameter = "width"
    allowed = rules.sizes.allowed
    if allowed is not None:
        if any(w == task.width for w, _ in allowed):
            parameter = "height"
    elif rules.sizes.min_side <= task.width <= rules.sizes.max_side:
        parameter = "height"
    raise InvalidParameter(
        f"Invalid value for {parameter} parameter for model {rules.air}: {problem}.",
        code=f"invalid{_code_name(parameter)}",
        parameter=parameter,
    )


def _check_reference_images(task: ImageInferenceIn, rules: ModelRules) -> None:
    top = task.referenceImages
    nested = task.inputs.referenceImages if task.inputs is not None else None
    if top and nested:
        raise InvalidParameter(
            "Give referenceImages either at top level or under inputs, not both.",
            code="invalidReferenceImages",
            parameter="referenceImages",
        )
    parameter = "inputs.referenceImages" if nested else "referenceImages"
    count = len(task.reference_images())
    if count and rules.max_reference_images == 0:
        raise UnsupportedParameter(
            f"Model {rules.air} does not take reference images.", parameter=parameter
        )
    if count > rules.max_reference_images:
        raise InvalidParameter(
            f"Model {rules.air} takes at most {rules.max_reference_images} reference images.",
            code="invalidReferenceImages",
            parameter=parameter,
        )
    if count < rules.min_reference_images:
        raise InvalidParameter(
            f"Model {rules.air} needs at least {rules.min_reference_images} reference image(s).",
            code="missingReferenceImages",
            parameter="inputs.referenceImages",
        )


def _check_runway_inputs(task: ImageInferenceIn) -> None:
    """What Runway would refuse after the task was accepted: tags and the prompt length it
    measures in UTF-16 code units (an emoji counts twice)."""
    if len(task.positivePrompt.encode("utf-16-le")) // 2 > RUNWAY_MAX_PROMPT_UNITS:
        raise InvalidParameter(
            "Invalid value for positivePrompt parameter: Runway takes at most "
            f"{RUNWAY_MAX_PROMPT_UNITS} UTF-16 code units (characters outside the basic "
            "plane, such as emoji, count as two).",
            code="invalidPositivePrompt",
            parameter="positivePrompt",
        )
    base = "referenceImages" if task.referenceImages else "inputs.referenceImages"
    for i, ref in enumerate(task.reference_images()):
        if ref.tag is not None and not RUNWAY_TAG.fullmatch(ref.tag):
            raise InvalidParameter(
                f"Invalid value for {base}[{i}].tag parameter: a tag is 3-16 characters, starts "
                "with a letter and has only letters, digits and underscores.",
                code="invalidReferenceImages",
                parameter=f"{base}[{i}].tag",
            )
