"""`acceleratorOptions`: Runware's switches for step caching, which reuses work of earlier
denoising steps instead of computing every step in full (faster, slightly different images).

Field names follow runware 0.5.24's `IAcceleratorOptions` and @runware/sdk-js 1.3.2's
`TAcceleratorOptions`:

- `fbcache` (First Block Cache) with `cacheDistance`, and `teaCache` with `teaCacheDistance`,
  for transformer (DiT) models such as FLUX and SD3;
- `deepCache` with `deepCacheInterval`, `deepCacheBranchId` and `deepCacheSkipMode`, for UNet
  models (SD 1.x/2.x, SDXL);
- for every method: `cacheStartStep` / `cacheStartStepPercentage` (steps before always run in
  full), `cacheStopStep` / `cacheEndStepPercentage` (steps from there on always run in full),
  `cacheMaxConsecutiveSteps` (at most that many cached steps in a row).

Runware does not publish defaults; ours are the methods' own recommendations: First Block Cache
0.08 (ParaAttention's FLUX setting), TeaCache 0.4 (TeaCache's 1.8x FLUX setting), DeepCache a
full step every 3 with branch 0 (DeepCache's Stable Diffusion setting).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from impasto.protocol.fields import INTEGRAL

FBCACHE_DISTANCE = 0.08
TEACACHE_DISTANCE = 0.4
DEEPCACHE_INTERVAL = 3
DEEPCACHE_BRANCH = 0

Step = Annotated[int, Field(ge=0, le=1000), INTEGRAL]
Percent = Annotated[int, Field(ge=0, le=100), INTEGRAL]
Distance = Annotated[float, Field(ge=0, le=10)]


class AcceleratorOptionsIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    fbcache: bool | None = None
    cacheDistance: Distance | None = None
    teaCache: bool | None = None
    teaCacheDistance: Distance | None = None
    cacheStartStep: Step | None = None
    cacheStopStep: Step | None = None
    cacheStartStepPercentage: Percent | None = None
    cacheEndStepPercentage: Percent | None = None
    cacheMaxConsecutiveSteps: Annotated[int, Field(ge=1, le=1000), INTEGRAL] | None = None
    deepCache: bool | None = None
    deepCacheInterval: Annotated[int, Field(ge=1, le=100), INTEGRAL] | None = None
    deepCacheBranchId: Annotated[int, Field(ge=0, le=10), INTEGRAL] | None = None
    deepCacheSkipMode: Literal["uniform", "non-uniform"] | None = None

    def methods(self) -> list[str]:
        """The caching methods switched on (at most one is allowed)."""
        return [
            name
            for name, on in (
                ("fbcache", self.fbcache),
                ("teaCache", self.teaCache),
                ("deepCache", self.deepCache),
            )
            if on
        ]


Problem = tuple[str, str, str]  # (parameter, code, message)
CODE = "invalidAcceleratorOptions"
# Which denoiser each method needs, and the architectures that have one.
_TRANSFORMER_ARCHITECTURES = ("flux", "sd3")


def denoiser_kind(architecture: str) -> Literal["transformer", "unet"]:
    return "transformer" if architecture.startswith(_TRANSFORMER_ARCHITECTURES) else "unet"


def accelerator_problems(options: AcceleratorOptionsIn, architecture: str) -> list[Problem]:
    """What the field types cannot say: one method, windows in order, and a method the
    model's denoiser has."""
    where = "acceleratorOptions"
    found: list[Problem] = []
    methods = options.methods()
    if len(methods) > 1:
        found.append((f"{where}.{methods[1]}", CODE, f"switch on one of {' or '.join(methods)}"))
    for a, b in (
        ("cacheStartStep", "cacheStartStepPercentage"),
        ("cacheStopStep", "cacheEndStepPercentage"),
    ):
        if getattr(options, a) is not None and getattr(options, b) is not None:
            found.append((f"{where}.{b}", CODE, f"give {a} or {b}, not both"))
    for low, high, name in (
        (options.cacheStartStep, options.cacheStopStep, "cacheStopStep"),
        (options.cacheStartStepPercentage, options.cacheEndStepPercentage, "cacheEndStep"),
    ):
        if low is not None and high is not None and low >= high:
            found.append((f"{where}.{name}", CODE, f"{name} must be above the start"))
    kind = denoiser_kind(architecture)
    for method in methods[:1]:
        needs = "unet" if method == "deepCache" else "transformer"
        if needs != kind:
            found.append(
                (
                    f"{where}.{method}",
                    "unsupportedParameter",
                    f"{method} needs a {'UNet' if needs == 'unet' else 'transformer (DiT)'} "
                    f"model; this one ({architecture}) has a "
                    f"{'UNet' if kind == 'unet' else 'transformer'}"
                    + ("; use fbcache or teaCache" if kind == "transformer" else "; use deepCache"),
                )
            )
    return found
