"""Wire types of the model-backed utility tasks: upscale, remove background, caption and
prompt enhance, under the names the three official SDKs send.

- runware-sdk 1.8 and @runware/sdk-js 1.3.2 send the new names (`upscale`, `removeBackground`,
  `caption`, `promptEnhance`); runware 0.5.24 the legacy ones (`imageUpscale`,
  `imageBackgroundRemoval`, `imageCaption`) and `promptEnhance`. Each name is echoed in the
  task's result items.
- The image comes as `inputImage` (legacy, and @runware/sdk-js's `upscale`/`caption`) or
  `inputs.image` (runware-sdk 1.8's schema): either, not both.
- compat: runware 0.5.24's imageBackgroundRemoval spreads its `settings` over the task's top
  level (rgba, postProcessMask, returnOnlyMask, alphaMatting...); the new SDKs nest them in
  `settings`. Both are taken, not a mix.
- `model` is optional: the SDKs leave it out (@runware/sdk-js's enhancePrompt never sends
  one), and the server's default model for the task type runs (Settings).

Result items: image tasks answer like imageInference (imageUUID and the field `outputType`
names, cost), caption one item with `text`, promptEnhance `promptVersions` items with `text`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from impasto.protocol.fields import INTEGRAL, MAX_SEED, UUID4, HttpURL, ImageString, Name
from impasto.protocol.utility import (
    OutputFormatField,
    OutputTypeField,
    Quality,
    Ttl,
    UtilityModel,
)

UPSCALE_TYPES = ("upscale", "imageUpscale")
REMOVE_BACKGROUND_TYPES = ("removeBackground", "imageBackgroundRemoval")
CAPTION_TYPES = ("caption", "imageCaption")
PROMPT_ENHANCE_TYPES = ("promptEnhance",)
# taskType -> the canonical (new) name, which models-file categories and defaults are keyed by.
CANONICAL_TASK = {
    **dict.fromkeys(UPSCALE_TYPES, "upscale"),
    **dict.fromkeys(REMOVE_BACKGROUND_TYPES, "removeBackground"),
    **dict.fromkeys(CAPTION_TYPES, "caption"),
    **dict.fromkeys(PROMPT_ENHANCE_TYPES, "promptEnhance"),
}
UTILITY_TASK_TYPES = tuple(CANONICAL_TASK)

MIN_UPSCALE_FACTOR = 2
MAX_UPSCALE_FACTOR = 4
# Runware's promptEnhance bounds: 12-400 characters (380 by default), 1-5 versions.
MIN_PROMPT_LENGTH = 12
MAX_PROMPT_LENGTH = 400
DEFAULT_PROMPT_LENGTH = 380
MAX_PROMPT_VERSIONS = 5

Model = Annotated[Name, Field(min_length=1, max_length=200)]
Byte = Annotated[int, Field(ge=0, le=255), INTEGRAL]


def _first_text(value: Any) -> Any:
    # compat: runware 0.5.24 types imageCaption's prompt as a list of strings.
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


class ImageInputsIn(UtilityModel):
    image: ImageString


class DeliveryFields(UtilityModel):
    """Fields every utility task takes."""

    taskUUID: UUID4
    model: Model | None = None
    includeCost: bool = False
    deliveryMethod: Literal["sync", "async"] = "sync"
    webhookURL: HttpURL | None = Field(default=None, min_length=1, max_length=2048)


class ImageTaskFields(DeliveryFields):
    """Fields of the utility tasks that take an image and answer with one."""

    inputImage: ImageString | None = None
    inputs: ImageInputsIn | None = None
    outputType: OutputTypeField = "URL"
    outputFormat: OutputFormatField = "JPG"
    outputQuality: Quality = 95
    ttl: Ttl | None = None
    uploadEndpoint: HttpURL | None = Field(default=None, min_length=1, max_length=4096)

    def image(self) -> tuple[str, str] | None:
        """(parameter, value) of the input image, wherever the client put it."""
        if self.inputImage is not None:
            return "inputImage", self.inputImage
        if self.inputs is not None:
            return "inputs.image", self.inputs.image
        return None


class UpscaleSettingsIn(UtilityModel):
    """What diffusion upscalers take (runware 0.5.24's ISettings; Runware's 500-502 models)."""

    positivePrompt: str | None = Field(default=None, max_length=1000)
    negativePrompt: str | None = Field(default=None, max_length=1000)
    steps: Annotated[int, Field(ge=1, le=100), INTEGRAL] | None = None
    CFGScale: float | None = Field(default=None, ge=0, le=50)
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), INTEGRAL] | None = None


class UpscaleFields(ImageTaskFields):
    """upscale and imageUpscale (each its own model below, for the published schema)."""

    taskType: str
    upscaleFactor: (
        Annotated[int, Field(ge=MIN_UPSCALE_FACTOR, le=MAX_UPSCALE_FACTOR), INTEGRAL] | None
    ) = None
    # compat: runware 0.5.24's alternative to upscaleFactor: the output's size in megapixels.
    targetMegapixels: float | None = Field(default=None, gt=0, le=64)
    settings: UpscaleSettingsIn | None = None


class BackgroundSettingsIn(UtilityModel):
    rgba: list[Byte] | None = Field(default=None, min_length=4, max_length=4)
    postProcessMask: bool | None = None
    returnOnlyMask: bool | None = None
    alphaMatting: bool | None = None
    alphaMattingForegroundThreshold: Byte | None = None
    alphaMattingBackgroundThreshold: Byte | None = None
    alphaMattingErodeSize: Annotated[int, Field(ge=0, le=255), INTEGRAL] | None = None


BACKGROUND_SETTINGS = tuple(BackgroundSettingsIn.model_fields)


class RemoveBackgroundFields(ImageTaskFields):
    taskType: str
    # A cut-out keeps its transparency only in PNG or WEBP, so PNG is the default here.
    outputFormat: OutputFormatField = "PNG"
    settings: BackgroundSettingsIn | None = None
    # compat: runware 0.5.24 sends the settings' fields at the top level.
    rgba: list[Byte] | None = Field(default=None, min_length=4, max_length=4)
    postProcessMask: bool | None = None
    returnOnlyMask: bool | None = None
    alphaMatting: bool | None = None
    alphaMattingForegroundThreshold: Byte | None = None
    alphaMattingBackgroundThreshold: Byte | None = None
    alphaMattingErodeSize: Annotated[int, Field(ge=0, le=255), INTEGRAL] | None = None

    def flat_settings(self) -> list[str]:
        return [name for name in BACKGROUND_SETTINGS if getattr(self, name) is not None]


class CaptionFields(DeliveryFields):
    taskType: str
    inputImage: ImageString | None = None
    # compat: runware 0.5.24 sends `inputImages` when given more than one image.
    inputImages: list[ImageString] | None = Field(default=None, min_length=1, max_length=1)
    inputs: ImageInputsIn | None = None
    prompt: Annotated[str, BeforeValidator(_first_text)] | None = Field(
        default=None, min_length=1, max_length=1000
    )

    def image(self) -> tuple[str, str] | None:
        if self.inputImage is not None:
            return "inputImage", self.inputImage
        if self.inputImages:
            return "inputImages[0]", self.inputImages[0]
        if self.inputs is not None:
            return "inputs.image", self.inputs.image
        return None


class PromptEnhanceIn(DeliveryFields):
    taskType: Literal["promptEnhance"]
    prompt: str = Field(min_length=1, max_length=1000)
    promptMaxLength: Annotated[int, Field(ge=MIN_PROMPT_LENGTH, le=MAX_PROMPT_LENGTH), INTEGRAL] = (
        DEFAULT_PROMPT_LENGTH
    )
    promptVersions: Annotated[int, Field(ge=1, le=MAX_PROMPT_VERSIONS), INTEGRAL] = 1


class UpscaleIn(UpscaleFields):
    taskType: Literal["upscale"]


class ImageUpscaleIn(UpscaleFields):
    taskType: Literal["imageUpscale"]


class RemoveBackgroundIn(RemoveBackgroundFields):
    taskType: Literal["removeBackground"]


class ImageBackgroundRemovalIn(RemoveBackgroundFields):
    taskType: Literal["imageBackgroundRemoval"]


class CaptionIn(CaptionFields):
    taskType: Literal["caption"]


class ImageCaptionIn(CaptionFields):
    taskType: Literal["imageCaption"]


UtilityTaskIn = UpscaleFields | RemoveBackgroundFields | CaptionFields | PromptEnhanceIn

UTILITY_TASK_MODELS: dict[str, type[UtilityModel]] = {
    "upscale": UpscaleIn,
    "imageUpscale": ImageUpscaleIn,
    "removeBackground": RemoveBackgroundIn,
    "imageBackgroundRemoval": ImageBackgroundRemovalIn,
    "caption": CaptionIn,
    "imageCaption": ImageCaptionIn,
    "promptEnhance": PromptEnhanceIn,
}


def text_item(task_type: str, task_uuid: str, text: str, cost: float | None) -> dict[str, Any]:
    """A caption or an enhanced prompt."""
    item: dict[str, Any] = {"taskType": task_type, "taskUUID": task_uuid, "text": text}
    if cost is not None:
        item["cost"] = round(cost, 6)
    return item
