"""Per-model request rules: which sizes, parameters and reference images a model takes, and
what an image costs. The registry builds these from the models file; validation reads them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

Size = tuple[int, int]

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
GENERATION_PARAMETERS = frozenset(
    {"negativePrompt", "seed", "steps", "CFGScale", "scheduler", "strength"}
)

# Parameters of the Runware protocol that no impasto model takes yet: asking for them is an
# `unsupportedParameter`, not an `unknownParameter`.
KNOWN_UNSUPPORTED_PARAMETERS = frozenset(
    {
        "clipSkip",
        "promptWeighting",
        "usePromptWeighting",
        "maskMargin",
        "outpaint",
        "hiresFix",
        "refiner",
        "vae",
        "lora",
        "lycoris",
        "embeddings",
        "controlNet",
        "ipAdapters",
        "photoMaker",
        "acceleratorOptions",
        "acceleration",
        "advancedFeatures",
        "ultralytics",
        "puLID",
        "acePlusPlus",
        "instantID",
        "settings",
        "resolution",
        "useCache",
        "seedImage",
        "maskImage",
    }
)

# Members of `inputs` in the Runware protocol that no impasto model takes yet (besides
# `referenceImages`); like the parameters above they are unsupported, not unknown.
KNOWN_UNSUPPORTED_INPUTS = frozenset(
    {"image", "images", "seedImage", "mask", "fonts", "superResolutionReferences", "references"}
)

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

    def accepts(self, parameter: str) -> bool:
        return parameter in PLATFORM_PARAMETERS or parameter in self.parameters
