"""Wire types of the tasks a client sends, and the one place that turns pydantic's validation
errors into Runware error items (`invalid<Param>`, `missing<Param>`, `unsupportedParameter`...).

Every field is bounded (numbers, string lengths, list lengths) and every float is finite, so an
accepted task can be stored, logged and computed with; the JSON schema of each type, which
`openapi.py` publishes, describes what the validators really take.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
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
from impasto.protocol.fields import (
    CONTROL,
    INTEGRAL,
    MAX_SEARCH_OFFSET,
    MAX_SEED,
    MAX_TTL_S,
    NOT_BLANK_PATTERN,
    OUTPUT_FORMAT_PATTERN,
    SURROGATE,
    UUID4,
    HttpURL,
    ImageString,
    JsonPattern,
    Name,
    OutputTypes,
    output_format,
    reference_item,
)
from impasto.protocol.modes import (
    MAX_CONTROLNETS,
    MAX_EMBEDDINGS,
    MAX_IP_ADAPTERS,
    MAX_LORAS,
    ControlNetIn,
    EmbeddingIn,
    IpAdapterIn,
    LoraIn,
    ModelAIR,
    OutpaintIn,
    RefinerIn,
)
from impasto.protocol.rules import KNOWN_UNSUPPORTED_INPUTS, KNOWN_UNSUPPORTED_PARAMETERS, code_name

# Re-exported: callers import these from here, where they lived before the model checks moved.
from impasto.protocol.rules import RUNWAY_MAX_PROMPT_UNITS as RUNWAY_MAX_PROMPT_UNITS
from impasto.protocol.rules import RUNWAY_TAG as RUNWAY_TAG
from impasto.protocol.rules import check_against_rules as check_against_rules
from impasto.protocol.utility import (
    ControlNetPreprocessIn,
    ImageControlNetPreProcessIn,
    MediaStorageIn,
)


class WireModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class ReferenceImageIn(WireModel):
    image: ImageString
    tag: Name | None = Field(default=None, max_length=64)


ReferenceImageList = Annotated[
    list[
        Annotated[
            ReferenceImageIn,
            BeforeValidator(reference_item, json_schema_input_type=ImageString | ReferenceImageIn),
        ]
    ],
    Field(min_length=1, max_length=3),
]


class InputsIn(WireModel):
    referenceImages: ReferenceImageList | None = None
    # compat: the deprecated name runware-sdk still sends for referenceImages.
    references: ReferenceImageList | None = None
    seedImage: ImageString | None = None
    image: ImageString | None = None
    mask: ImageString | None = None


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
    positivePrompt: Annotated[str, JsonPattern(NOT_BLANK_PATTERN)] = Field(
        min_length=1, max_length=1000
    )
    negativePrompt: str | None = Field(default=None, max_length=1000)
    width: Annotated[int, Field(ge=1, le=16384), INTEGRAL] | None = None
    height: Annotated[int, Field(ge=1, le=16384), INTEGRAL] | None = None
    numberResults: Annotated[int, Field(ge=1, le=20), INTEGRAL] = 1
    outputType: OutputTypes = "URL"
    outputFormat: Annotated[
        Literal["JPG", "PNG", "WEBP"],
        BeforeValidator(output_format),
        WithJsonSchema({"type": "string", "pattern": OUTPUT_FORMAT_PATTERN, "default": "JPG"}),
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
    seedImage: ImageString | None = None
    maskImage: ImageString | None = None
    # Runware: 32-128 context pixels around the masked area.
    maskMargin: Annotated[int, Field(ge=32, le=128), INTEGRAL] | None = None
    outpaint: OutpaintIn | None = None
    lora: list[LoraIn] | None = Field(default=None, max_length=MAX_LORAS)
    controlNet: list[ControlNetIn] | None = Field(default=None, max_length=MAX_CONTROLNETS)
    ipAdapters: list[IpAdapterIn] | None = Field(default=None, max_length=MAX_IP_ADAPTERS)
    refiner: RefinerIn | None = None
    vae: ModelAIR | None = None
    embeddings: list[EmbeddingIn] | None = Field(default=None, max_length=MAX_EMBEDDINGS)
    clipSkip: Annotated[int, Field(ge=0, le=2), INTEGRAL] | None = None
    promptWeighting: Literal["compel", "sdEmbeds"] | None = None
    # compat: the legacy boolean for promptWeighting = "compel".
    usePromptWeighting: bool | None = None

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
        if self.inputs is not None:
            return tuple(self.inputs.referenceImages or self.inputs.references or ())
        return ()

    def reference_parameter(self) -> str:
        """The name the client gave its reference images under, for error items."""
        if self.referenceImages:
            return "referenceImages"
        if self.inputs is not None and self.inputs.references and not self.inputs.referenceImages:
            return "inputs.references"
        return "inputs.referenceImages"

    def seed_image(self) -> tuple[str, str] | None:
        """(parameter, image) of the img2img/inpainting source, wherever the client put it."""
        for parameter, value in self.image_inputs("seedImage", ("seedImage", "image")):
            return parameter, value
        return None

    def mask_image(self) -> tuple[str, str] | None:
        for parameter, value in self.image_inputs("maskImage", ("mask",)):
            return parameter, value
        return None

    def image_inputs(self, top: str, nested: tuple[str, ...]) -> list[tuple[str, str]]:
        found = []
        value = getattr(self, top)
        if value is not None:
            found.append((top, value))
        if self.inputs is not None:
            for name in nested:
                item = getattr(self.inputs, name)
                if item is not None:
                    found.append((f"inputs.{name}", item))
        return found

    def output_types(self) -> tuple[str, ...]:
        if isinstance(self.outputType, str):
            return (self.outputType,)
        return tuple(self.outputType)

    def weighting(self) -> str | None:
        if self.promptWeighting is not None:
            return self.promptWeighting
        return "compel" if self.usePromptWeighting else None


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
    ImageInferenceIn
    | ImageUploadIn
    | GetResponseIn
    | ModelSearchIn
    | PingIn
    | AuthenticationIn
    | MediaStorageIn
    | ImageControlNetPreProcessIn
    | ControlNetPreprocessIn
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
