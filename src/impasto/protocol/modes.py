"""Wire types of the image modes of imageInference beyond text-to-image: img2img and inpainting
inputs, outpainting, LoRA, ControlNet, IP-Adapters, the SDXL refiner, VAE and embedding
overrides. Field names and shapes follow Runware's docs and the official SDKs' request types
(runware 0.5.24 `types.py`, runware-sdk 1.8, @runware/sdk-js 1.3.2).

Checks across fields (startStep or startStepPercentage, ...) are in `mode_problems`, run with
the model rules: the published JSON schema describes each field, and a value it accepts parses.

compat: the legacy Python SDK sends `dataclasses.asdict` of its request objects, so every
optional member may arrive as an explicit `null`; null means "not given" throughout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from impasto.protocol.errors import InvalidParameter, code_name
from impasto.protocol.fields import INTEGRAL, ImageString, Name

if TYPE_CHECKING:
    from impasto.protocol.tasks import ImageInferenceIn

# How many of each a task may carry: far above what a pipeline can use, bounded so a task
# stays small to store and validate.
MAX_LORAS = 10
MAX_CONTROLNETS = 4
MAX_IP_ADAPTERS = 4
MAX_EMBEDDINGS = 10
# Runware: outpaint sides and the output sizes they give are multiples of 64 in its docs; we
# take multiples of 8 (the latent grid) so SD-sized images extend by any latent step.
OUTPAINT_MAX_SIDE = 2048
PREPROCESSORS_INLINE = ("canny",)


class ModeModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


AssetAIR = Annotated[Name, Field(min_length=1, max_length=200)]


def _stringify_model(value: Any) -> Any:
    # compat: runware 0.5.24 types `refiner.model` and `ipAdapters[].model` as int | str.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


ModelAIR = Annotated[AssetAIR, BeforeValidator(_stringify_model)]


class LoraIn(ModeModel):
    model: ModelAIR
    # None (or absent) is 1.
    weight: float | None = Field(default=None, ge=-4, le=4)


class EmbeddingIn(ModeModel):
    model: ModelAIR
    weight: float | None = Field(default=None, ge=-4, le=4)


class ControlNetIn(ModeModel):
    model: ModelAIR
    guideImage: ImageString
    weight: float | None = Field(default=None, ge=0, le=2)
    startStep: Annotated[int, Field(ge=0, le=100), INTEGRAL] | None = None
    endStep: Annotated[int, Field(ge=1, le=100), INTEGRAL] | None = None
    startStepPercentage: Annotated[int, Field(ge=0, le=99), INTEGRAL] | None = None
    endStepPercentage: Annotated[int, Field(ge=1, le=100), INTEGRAL] | None = None
    controlMode: Literal["balanced", "prompt", "controlnet"] | None = None
    # compat: runware 0.5.24's IControlNetCanny asks for the guide image to be preprocessed.
    preprocessor: Literal["canny"] | None = None
    lowThresholdCanny: Annotated[int, Field(ge=0, le=255), INTEGRAL] | None = None
    highThresholdCanny: Annotated[int, Field(ge=0, le=255), INTEGRAL] | None = None


class IpAdapterIn(ModeModel):
    model: ModelAIR
    guideImage: ImageString | None = None
    guideImages: list[ImageString] | None = Field(default=None, min_length=1, max_length=4)
    weight: float | None = Field(default=None, ge=0, le=2)

    def images(self) -> list[str]:
        return [self.guideImage] if self.guideImage is not None else list(self.guideImages or [])


class RefinerIn(ModeModel):
    model: ModelAIR
    startStep: Annotated[int, Field(ge=1, le=100), INTEGRAL] | None = None
    startStepPercentage: Annotated[int, Field(ge=1, le=99), INTEGRAL] | None = None


class OutpaintIn(ModeModel):
    top: Annotated[int, Field(ge=0, le=OUTPAINT_MAX_SIDE, multiple_of=8), INTEGRAL] | None = None
    right: Annotated[int, Field(ge=0, le=OUTPAINT_MAX_SIDE, multiple_of=8), INTEGRAL] | None = None
    bottom: Annotated[int, Field(ge=0, le=OUTPAINT_MAX_SIDE, multiple_of=8), INTEGRAL] | None = None
    left: Annotated[int, Field(ge=0, le=OUTPAINT_MAX_SIDE, multiple_of=8), INTEGRAL] | None = None
    blur: Annotated[int, Field(ge=0, le=32), INTEGRAL] | None = None

    def sides(self) -> tuple[int, int, int, int]:
        return (self.top or 0, self.right or 0, self.bottom or 0, self.left or 0)


Problem = tuple[str, str, str]  # (parameter, code, message)


def _either(
    parameter: str, code: str, a: str, b: str, given_a: object, given_b: object
) -> list[Problem]:
    if given_a is not None and given_b is not None:
        return [(f"{parameter}.{b}", code, f"give {a} or {b}, not both")]
    return []


def control_problems(i: int, control: ControlNetIn) -> list[Problem]:
    where = f"controlNet[{i}]"
    code = "invalidControlNet"
    found = _either(
        where,
        code,
        "startStep",
        "startStepPercentage",
        control.startStep,
        control.startStepPercentage,
    )
    found += _either(
        where, code, "endStep", "endStepPercentage", control.endStep, control.endStepPercentage
    )
    if control.controlMode == "prompt":
        # A1111's "my prompt is more important" scales the control per UNet layer, which
        # diffusers' pipelines cannot; "controlnet" is their guess mode.
        found.append(
            (
                f"{where}.controlMode",
                "unsupportedParameter",
                "controlMode 'prompt' is not supported by impasto; use 'balanced' or 'controlnet'",
            )
        )
    for low, high, a, b in (
        (
            control.startStepPercentage,
            control.endStepPercentage,
            "startStepPercentage",
            "endStepPercentage",
        ),
        (control.startStep, control.endStep, "startStep", "endStep"),
    ):
        if low is not None and high is not None and low >= high:
            found.append((f"{where}.{b}", code, f"{b} must be above {a}"))
    return found


def mode_problems(
    controls: list[ControlNetIn] | None,
    adapters: list[IpAdapterIn] | None,
    refiner: RefinerIn | None,
    outpaint: OutpaintIn | None,
) -> list[Problem]:
    """What the field types cannot say: choices between two fields, orders, non-empty."""
    found: list[Problem] = []
    for i, control in enumerate(controls or ()):
        found += control_problems(i, control)
    for i, adapter in enumerate(adapters or ()):
        if (adapter.guideImage is None) == (adapter.guideImages is None):
            found.append(
                (
                    f"ipAdapters[{i}].guideImage",
                    "invalidIpAdapters",
                    "give exactly one of guideImage or guideImages",
                )
            )
    if refiner is not None:
        found += _either(
            "refiner",
            "invalidRefiner",
            "startStep",
            "startStepPercentage",
            refiner.startStep,
            refiner.startStepPercentage,
        )
    if outpaint is not None and not any(outpaint.sides()):
        found.append(
            ("outpaint", "invalidOutpaint", "extend at least one side (top, right, bottom or left)")
        )
    return found


def check_mode_inputs(task: ImageInferenceIn) -> None:
    """Inputs that only make sense together, and one place for each."""
    seed = task.seed_image()
    mask = task.mask_image()
    for name, found in (
        ("seedImage", task.image_inputs("seedImage", ("seedImage", "image"))),
        ("maskImage", task.image_inputs("maskImage", ("mask",))),
    ):
        if len(found) > 1:
            raise InvalidParameter(
                f"Give the {name} once: {' and '.join(p for p, _ in found)} were both given.",
                code=f"invalid{code_name(name)}",
                parameter=found[1][0],
            )
    if seed is None:
        for needs, present in (
            ("maskImage", mask is not None),
            ("outpaint", task.outpaint is not None),
        ):
            if present:
                raise InvalidParameter(
                    f"{needs} needs a seedImage (the image to change).",
                    code="missingSeedImage",
                    parameter="seedImage",
                )
    if task.maskMargin is not None and mask is None:
        raise InvalidParameter(
            "maskMargin needs a maskImage (it is the context around the masked area).",
            code="missingMaskImage",
            parameter="maskImage",
        )
    if task.outpaint is not None and mask is not None:
        raise InvalidParameter(
            "Give outpaint or maskImage, not both: outpainting makes its own mask.",
            code="invalidOutpaint",
            parameter="outpaint",
        )
    for parameter, code, message in mode_problems(
        task.controlNet, task.ipAdapters, task.refiner, task.outpaint
    ):
        raise InvalidParameter(
            f"Invalid value for {parameter} parameter: {message}.", code=code, parameter=parameter
        )
    if task.usePromptWeighting and task.promptWeighting is not None:
        raise InvalidParameter(
            "Give promptWeighting or the legacy usePromptWeighting, not both.",
            code="invalidPromptWeighting",
            parameter="usePromptWeighting",
        )
