"""Per-model request rules: which sizes, parameters and reference images a model takes, and
what an image costs. The registry builds these from the models file; `check_against_rules`
applies them to a parsed task."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from impasto.protocol.errors import InvalidParameter, UnsupportedParameter
from impasto.protocol.errors import code_name as code_name
from impasto.protocol.modes import check_mode_inputs

if TYPE_CHECKING:
    from impasto.protocol.tasks import ImageInferenceIn

Size = tuple[int, int]

# Runway's reference tag rule: 3-16 characters, a letter first, then letters, digits or `_`.
# Its spec regex is lowercase-only while its own examples use `EiffelTower`; impasto accepts
# either case and passes the tag on as given, so the prompt's `@Tag` still matches it.
RUNWAY_TAG = re.compile(r"[A-Za-z][A-Za-z0-9_]{2,15}")
RUNWAY_MAX_PROMPT_UNITS = 1000

# Parameters every imageInference task may carry, whatever the model.
PLATFORM_PARAMETERS = frozenset(
    {
        "taskType",
        "taskUUID",
        "model",
        "positivePrompt",
        "width",
        "height",
        "numberResults",
        "outputType",
        "outputFormat",
        "outputQuality",
        "ttl",
        "includeCost",
        "deliveryMethod",
        "webhookURL",
        "uploadEndpoint",
        "safety",
        "checkNSFW",
        "checkNsfw",
        "providerSettings",
        "referenceImages",
        "inputs",
    }
)

# Generation parameters that some models take (the model's rules list which).
SAMPLING_PARAMETERS = frozenset(
    {"negativePrompt", "seed", "steps", "CFGScale", "scheduler", "strength"}
)
# The image modes beyond text-to-image; `modelSearch` lists the ones a model supports.
MODE_PARAMETERS = frozenset(
    {
        "seedImage",
        "maskImage",
        "maskMargin",
        "outpaint",
        "lora",
        "controlNet",
        "ipAdapters",
        "refiner",
        "vae",
        "embeddings",
        "clipSkip",
        "promptWeighting",
        "acceleratorOptions",
    }
)
GENERATION_PARAMETERS = SAMPLING_PARAMETERS | MODE_PARAMETERS
# Where the same mode is asked for under another name.
_MODE_ALIASES = {
    "usePromptWeighting": "promptWeighting",
    "inputs.seedImage": "seedImage",
    "inputs.image": "seedImage",
    "inputs.mask": "maskImage",
}

# Parameters of the Runware protocol that no impasto model takes yet: asking for them is an
# `unsupportedParameter`, not an `unknownParameter`.
KNOWN_UNSUPPORTED_PARAMETERS = frozenset(
    {
        "hiresFix",
        "lycoris",
        "photoMaker",
        "acceleration",
        "advancedFeatures",
        "ultralytics",
        "puLID",
        "acePlusPlus",
        "instantID",
        "settings",
        "resolution",
        "useCache",
    }
)

# Members of `inputs` in the Runware protocol that no impasto model takes yet (besides
# `referenceImages`); like the parameters above they are unsupported, not unknown.
KNOWN_UNSUPPORTED_INPUTS = frozenset({"images", "fonts", "superResolutionReferences"})

# Runway's 16 Gen-4 Image sizes, and the ones Runware prices as 720p.
RUNWAY_SIZES: tuple[Size, ...] = (
    (1920, 1080),
    (1080, 1920),
    (1024, 1024),
    (1360, 768),
    (1080, 1080),
    (1168, 880),
    (1440, 1080),
    (1080, 1440),
    (1808, 768),
    (2112, 912),
    (1280, 720),
    (720, 1280),
    (720, 720),
    (960, 720),
    (720, 960),
    (1680, 720),
)
RUNWAY_720P_SIZES: tuple[Size, ...] = RUNWAY_SIZES[10:]


@dataclass(frozen=True)
class SizeRule:
    """Either an explicit list of (width, height) pairs, or a range of sides."""

    default: Size
    allowed: frozenset[Size] | None = None
    min_side: int = 64
    max_side: int = 2048

    def check(self, size: Size) -> str | None:
        """None when the size is acceptable, else why not."""
        if self.allowed is not None:
            if size in self.allowed:
                return None
            pairs = ", ".join(f"{w}x{h}" for w, h in sorted(self.allowed))
            return f"{size[0]}x{size[1]} is not an allowed size; allowed: {pairs}"
        for side in size:
            if not self.min_side <= side <= self.max_side:
                return f"width and height must be between {self.min_side} and {self.max_side}"
        return None


@dataclass(frozen=True)
class PriceTable:
    """USD per image, optionally by size."""

    per_image: float = 0.0
    by_size: Mapping[Size, float] = field(default_factory=dict)

    def cost(self, size: Size) -> float:
        return float(self.by_size.get(size, self.per_image))


@dataclass(frozen=True)
class ModelRules:
    """What a request for one AIR may ask for. Kept when the AIR is aliased to another backend."""

    air: str
    sizes: SizeRule
    parameters: frozenset[str] = frozenset()
    max_results: int = 20
    min_reference_images: int = 0
    max_reference_images: int = 0
    provider: str | None = None
    price: PriceTable = field(default_factory=PriceTable)
    # Inputs every task for this model needs (an inpainting checkpoint needs a seedImage).
    required: frozenset[str] = frozenset()

    def accepts(self, parameter: str) -> bool:
        return parameter in PLATFORM_PARAMETERS or parameter in self.parameters


# What modelSearch and `impasto models` call each mode, by the parameter that asks for it.
MODE_NAMES = {
    "seedImage": "img2img",
    "maskImage": "inpainting",
    "outpaint": "outpainting",
    "lora": "lora",
    "controlNet": "controlNet",
    "ipAdapters": "ipAdapters",
    "refiner": "refiner",
    "vae": "vae",
    "embeddings": "embeddings",
    "clipSkip": "clipSkip",
    "promptWeighting": "promptWeighting",
}


def modes_of(rules: ModelRules) -> list[str]:
    """The image modes a model supports, text-to-image first (unless it needs an input)."""
    modes = [] if rules.required else ["text2img"]
    if rules.max_reference_images:
        modes.append("referenceImages")
    return modes + [name for parameter, name in MODE_NAMES.items() if rules.accepts(parameter)]


def check_against_rules(task: ImageInferenceIn, rules: ModelRules) -> None:
    """Model-specific rules: sizes, parameters the model takes, result and reference counts."""
    for name, parameter in requested_parameters(task):
        if not rules.accepts(name):
            raise UnsupportedParameter(
                f"Parameter {parameter} is not supported by model {rules.air}.",
                parameter=parameter,
            )
    check_mode_inputs(task)
    if "maskImage" in rules.required:
        missing = (
            "seedImage"
            if task.seed_image() is None
            else "maskImage"
            if task.mask_image() is None and task.outpaint is None
            else None
        )
        if missing is not None:
            raise InvalidParameter(
                f"Model {rules.air} is an inpainting model: it needs a seedImage and a "
                "maskImage (or outpaint).",
                code=f"missing{code_name(missing)}",
                parameter=missing,
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


def requested_parameters(task: ImageInferenceIn) -> list[tuple[str, str]]:
    """(generation parameter, the name the client used) for each one the task asks for; an
    empty list (`lora: []`) asks for nothing."""
    given = [
        name
        for name in sorted(task.model_fields_set)
        if name in GENERATION_PARAMETERS or name in _MODE_ALIASES
    ]
    if task.inputs is not None:
        given += [
            f"inputs.{name}"
            for name in sorted(task.inputs.model_fields_set)
            if name != "references"
        ]
    found = []
    for parameter in given:
        value = _value_at(task, parameter)
        if value is None or value == [] or value is False:
            continue
        name = _MODE_ALIASES.get(parameter, parameter)
        if name in GENERATION_PARAMETERS:
            found.append((name, parameter))
    return found


def _value_at(task: ImageInferenceIn, parameter: str) -> object:
    holder: object = task
    for part in parameter.split("."):
        holder = getattr(holder, part, None)
    return holder


def _check_size(task: ImageInferenceIn, rules: ModelRules) -> None:
    if (task.width is None) != (task.height is None):
        missing = "height" if task.height is None else "width"
        raise InvalidParameter(
            "width and height must be given together.",
            code=f"missing{code_name(missing)}",
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
        code=f"invalid{code_name(parameter)}",
        parameter=parameter,
    )


def _check_reference_images(task: ImageInferenceIn, rules: ModelRules) -> None:
    given = [
        name
        for name, value in (
            ("referenceImages", task.referenceImages),
            ("inputs.referenceImages", task.inputs.referenceImages if task.inputs else None),
            ("inputs.references", task.inputs.references if task.inputs else None),
        )
        if value
    ]
    if len(given) > 1:
        raise InvalidParameter(
            f"Give reference images once: {' and '.join(given)} were both given.",
            code="invalidReferenceImages",
            parameter=given[0],
        )
    parameter = task.reference_parameter()
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
    base = task.reference_parameter()
    for i, ref in enumerate(task.reference_images()):
        if ref.tag is not None and not RUNWAY_TAG.fullmatch(ref.tag):
            raise InvalidParameter(
                f"Invalid value for {base}[{i}].tag parameter: a tag is 3-16 characters, starts "
                "with a letter and has only letters, digits and underscores.",
                code="invalidReferenceImages",
                parameter=f"{base}[{i}].tag",
            )
