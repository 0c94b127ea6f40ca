"""Wire types of the tasks a client sends (parsing.py turns a raw task into one of them, and
pydantic's validation errors into Runware error items).

Every field is bounded (numbers, string lengths, list lengths) and every float is finite, so an
accepted task can be stored, logged and computed with; the JSON schema of each type, which
`openapi.py` publishes, describes what the validators really take.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
)

from impasto.protocol.accelerators import AcceleratorOptionsIn
from impasto.protocol.fields import (
    INTEGRAL,
    MAX_SEARCH_OFFSET,
    MAX_SEED,
    MAX_TTL_S,
    NOT_BLANK_PATTERN,
    OUTPUT_FORMAT_PATTERN,
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

# Re-exported: callers import these from here, where they lived before the model checks moved.
from impasto.protocol.rules import RUNWAY_MAX_PROMPT_UNITS as RUNWAY_MAX_PROMPT_UNITS
from impasto.protocol.rules import RUNWAY_TAG as RUNWAY_TAG
from impasto.protocol.rules import check_against_rules as check_against_rules


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
    acceleratorOptions: AcceleratorOptionsIn | None = None
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
