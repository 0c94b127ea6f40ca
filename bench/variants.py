"""How bench/gpu_throughput.py's server runs a workload: a `Variant` is speed settings on the
model's entry in the models file (docs/speed.md) and/or acceleratorOptions on every task, parsed
from the `--variants` names, and applies only to the architectures it can.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.architectures import ARCHITECTURES

# Each step cache's default: its method's own recommendation, as in protocol/accelerators.py.
CACHE_DEFAULTS = {"fbcache": 0.08, "teacache": 0.4, "deepcache": 3}
# The variants that are models-file settings without a value (docs/speed.md).
_SETTING_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "compile": {"compile": True},
    "fuse_qkv": {"fuse_qkv": True},
    "fp8": {"quantize": "fp8"},
}


@dataclass(frozen=True)
class Variant:
    """One way to run the server: speed settings on the model's entry in the models file
    and/or acceleratorOptions on every task."""

    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    accelerator: dict[str, Any] = field(default_factory=dict)
    lossy: bool = False
    cache: str | None = None  # fbcache | teacache | deepcache: a step cache on every task

    @property
    def denoiser(self) -> str | None:
        """The only denoiser kind the variant works on (a step cache's), or None for any."""
        if self.cache is None:
            return None
        return "unet" if self.cache == "deepcache" else "transformer"

    @property
    def requested(self) -> list[str]:
        """What the server is asked for, by the names its log reports them under."""
        return [*self.settings, *([self.cache] if self.cache else [])]


def _number(text: str, kind: type[float] | type[int], low: float, high: float, what: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{what} takes a number, not {text!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{what} must be between {low:g} and {high:g}, not {text}")
    return value


def parse_variant(text: str) -> Variant:
    """`default`, `compile`, `fuse_qkv`, `attention=NAME`, `fp8`, `fbcache[=D]`,
    `teacache[=D]`, `deepcache[=N]`, or several of them joined with `+`."""
    settings: dict[str, Any] = {}
    accelerator: dict[str, Any] = {}
    lossy, cache, names = False, None, []
    parts = [part.strip() for part in text.split("+") if part.strip()]
    if not parts:
        raise ValueError("an empty variant")
    for part in parts:
        key, has_value, value = (s.strip() for s in part.partition("="))
        key = key.lower()
        if key in _SETTING_VARIANTS:
            if has_value:
                raise ValueError(f"{key} takes no value ({part!r})")
            settings.update(_SETTING_VARIANTS[key])
            lossy = lossy or key == "fp8"
            if key != "default":
                names.append(key)
        elif key in ("attention", "attention_backend"):
            if not value:
                raise ValueError("attention needs a backend name: attention=_flash_3")
            settings["attention_backend"] = value
            # sage and the *_int8/_fp8 kernels quantize q/k/v; flash and cuDNN round only.
            lossy = lossy or value.startswith("sage") or "int8" in value or "fp8" in value
            names.append(f"attention={value}")
        elif key in CACHE_DEFAULTS:
            if cache is not None:
                raise ValueError(f"one step cache per variant, not {text!r}")
            cache = key
            if key == "deepcache":
                number = _number(value, int, 1, 100, key) if has_value else CACHE_DEFAULTS[key]
                accelerator = {"deepCache": True, "deepCacheInterval": number}
            else:
                number = _number(value, float, 0, 10, key) if has_value else CACHE_DEFAULTS[key]
                if key == "fbcache":
                    accelerator = {"fbcache": True, "cacheDistance": number}
                else:
                    accelerator = {"teaCache": True, "teaCacheDistance": number}
            lossy = True
            names.append(f"{key}={number:g}")
        else:
            raise ValueError(
                f"unknown variant {part!r}: choose from default, compile, fuse_qkv, "
                "attention=NAME, fp8, fbcache[=D], teacache[=D], deepcache[=N]"
            )
    return Variant("+".join(names) or "default", settings, accelerator, lossy, cache)


def parse_variants(text: str) -> list[Variant]:
    """A comma-separated list of variants, each once, in the order given."""
    variants: dict[str, Variant] = {}
    for item in text.split(","):
        if item.strip():
            variant = parse_variant(item)
            variants.setdefault(variant.name, variant)
    if not variants:
        raise ValueError("no variant given")
    return list(variants.values())


def with_compile(variant: Variant) -> Variant:
    """The variant with compile = true too (--compile)."""
    if variant.settings.get("compile"):
        return variant
    name = "compile" if variant.name == "default" else f"{variant.name}+compile"
    settings = {**variant.settings, "compile": True}
    return Variant(name, settings, variant.accelerator, variant.lossy, variant.cache)


def variant_skip_reason(variant: Variant, arch: str) -> str | None:
    """Why `variant` does not apply to `arch`, or None when it does."""
    spec = ARCHITECTURES[arch]
    kinds = {"unet": "a UNet", "transformer": "a transformer (DiT)"}
    needs = variant.denoiser
    if needs is not None and needs != spec.denoiser:
        return f"{variant.cache} needs {kinds[needs]}; {spec.title} has {kinds[spec.denoiser]}"
    attention = variant.settings.get("attention_backend")
    if attention not in (None, "native") and spec.denoiser == "unet":
        return (
            f"{spec.title}'s UNet calls torch SDPA directly, not diffusers' attention dispatch: "
            f"attention={attention} does not apply"
        )
    return None
