"""The model registry: AIR ids mapped to request rules and a backend, from built-in entries and
the operator's models file (TOML).

    [models."my:sdxl@1"]
    name = "My SDXL"
    backend = "diffusers"              # tiny | diffusers | runway | "package.module:Class"
    path = "stabilityai/stable-diffusion-xl-base-1.0"
    architecture = "sdxl"
    default_width = 1024
    default_height = 1024
    price_usd = 0.002
    [models."my:sdxl@1".settings]      # passed to the backend as they are
    dtype = "float16"

    [aliases]
    "runway:4@1" = "impasto:tiny@1"    # run runway:4@1 requests on the tiny model

An alias changes what runs a model and keeps the aliased AIR's own rules (sizes, parameters,
price), so clients see the same validation whichever backend serves it.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from impasto.protocol.errors import ModelNotFound
from impasto.protocol.rules import (
    GENERATION_PARAMETERS,
    RUNWAY_720P_SIZES,
    RUNWAY_SIZES,
    ModelRules,
    PriceTable,
    SizeRule,
)

ASSET_CATEGORIES = ("lora", "controlnet", "vae", "embeddings", "ipadapter")
CHECKPOINT_TYPES = ("base", "inpainting", "refiner")

AIR_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*:[A-Za-z0-9._-]+@[A-Za-z0-9._-]+$")

TINY_AIR = "impasto:tiny@1"


class ModelsFileError(ValueError):
    """The models file is malformed; the message names the entry and the key."""


@dataclass(frozen=True)
class ModelEntry:
    """One AIR: what requests for it may contain, and what runs it."""

    air: str
    name: str
    architecture: str
    backend: str
    rules: ModelRules
    path: str | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    # Runware's modelSearch vocabulary: category checkpoint | lora | controlnet | vae |
    # embeddings | ipadapter; a checkpoint's type is base | inpainting | refiner.
    category: str = "checkpoint"
    type: str = "base"

    @property
    def is_asset(self) -> bool:
        """A LoRA, ControlNet, VAE, embedding or IP-Adapter: used by a checkpoint, never run."""
        return self.category != "checkpoint"


@dataclass(frozen=True)
class ResolvedModel:
    """A requested AIR: its own rules, and the entry (maybe another, by alias) that runs it."""

    requested: ModelEntry
    target: ModelEntry

    @property
    def rules(self) -> ModelRules:
        return self.requested.rules


def _any_size(default: tuple[int, int], max_side: int = 2048) -> SizeRule:
    return SizeRule(default=default, min_side=64, max_side=max_side)


def _builtin_entries() -> list[ModelEntry]:
    runway_sizes = SizeRule(default=(1024, 1024), allowed=frozenset(RUNWAY_SIZES))
    runway_prices = PriceTable(per_image=0.08, by_size=dict.fromkeys(RUNWAY_720P_SIZES, 0.05))
    local = frozenset(GENERATION_PARAMETERS) - {"refiner"}
    xl = frozenset(GENERATION_PARAMETERS)
    flux = frozenset(
        {"seed", "steps", "CFGScale", "scheduler", "strength", "seedImage", "maskImage"}
        | {"maskMargin", "outpaint", "lora"}
    )
    tiny = {"steps": 2, "guidance_scale": 2.0}
    return [
        *_tiny_assets(),
        ModelEntry(
            air="impasto:tiny-inpaint@1",
            name="impasto tiny inpainting checkpoint (9-channel UNet, random weights)",
            architecture="sd1x",
            backend="tiny",
            type="inpainting",
            rules=ModelRules(
                air="impasto:tiny-inpaint@1",
                sizes=_any_size((512, 512)),
                parameters=local,
                required=frozenset({"maskImage"}),
            ),
            settings={**tiny, "asset": "inpaint"},
        ),
        ModelEntry(
            air="impasto:tiny-xl@1",
            name="impasto tiny SDXL (two text encoders, random weights; refiner: tiny-xl-refiner)",
            architecture="sdxl",
            backend="tiny",
            rules=ModelRules(
                air="impasto:tiny-xl@1",
                sizes=_any_size((512, 512)),
                parameters=xl - {"controlNet", "ipAdapters", "embeddings"},
                max_reference_images=1,
            ),
            settings={**tiny, "asset": "xl"},
        ),
        ModelEntry(
            air=TINY_AIR,
            name="impasto tiny (random weights, for tests and offline first runs)",
            architecture="sd1x",
            backend="tiny",
            rules=ModelRules(
                air=TINY_AIR,
                sizes=_any_size((512, 512)),
                parameters=local,
                max_reference_images=3,
            ),
            settings={"steps": 2, "guidance_scale": 2.0},
        ),
        ModelEntry(
            air="impasto:tiny-ip@1",
            name="impasto tiny with a tiny IP-Adapter (reference images as image prompts)",
            architecture="sd1x",
            backend="tiny",
            rules=ModelRules(
                air="impasto:tiny-ip@1",
                sizes=_any_size((512, 512)),
                # Its configured adapter takes the reference image; no per-request ones.
                parameters=local - {"strength", "ipAdapters"},
                max_reference_images=1,
            ),
            settings={
                "steps": 2,
                "guidance_scale": 2.0,
                "ip_adapter": {
                    "path": "impasto-tiny-ip-adapter",
                    "subfolder": "models",
                    "weight_name": "ip-adapter_tiny.safetensors",
                    "scale": 0.6,
                },
            },
        ),
        ModelEntry(
            air="runway:4@1",
            name="Runway Gen-4 Image",
            architecture="runway-gen4-image",
            backend="runway",
            rules=ModelRules(
                air="runway:4@1",
                sizes=runway_sizes,
                max_reference_images=3,
                provider="runway",
                price=runway_prices,
            ),
            settings={"model": "gen4_image"},
        ),
        ModelEntry(
            air="runway:4@2",
            name="Runway Gen-4 Image Turbo",
            architecture="runway-gen4-image",
            backend="runway",
            rules=ModelRules(
                air="runway:4@2",
                sizes=runway_sizes,
                min_reference_images=1,
                max_reference_images=3,
                provider="runway",
                price=PriceTable(per_image=0.02),
            ),
            settings={"model": "gen4_image_turbo"},
        ),
        ModelEntry(
            air="runware:100@1",
            name="FLUX.1 [schnell]",
            architecture="flux1s",
            backend="diffusers",
            path="black-forest-labs/FLUX.1-schnell",
            rules=ModelRules(
                air="runware:100@1",
                sizes=_any_size((1024, 1024)),
                parameters=flux,
                max_reference_images=1,
            ),
            settings={"dtype": "bfloat16", "steps": 4, "guidance_scale": 0.0},
        ),
        ModelEntry(
            air="runware:101@1",
            name="FLUX.1 [dev]",
            architecture="flux1d",
            backend="diffusers",
            path="black-forest-labs/FLUX.1-dev",
            rules=ModelRules(
                air="runware:101@1",
                sizes=_any_size((1024, 1024)),
                parameters=flux,
                max_reference_images=1,
            ),
            settings={"dtype": "bfloat16", "steps": 28, "guidance_scale": 3.5},
        ),
        ModelEntry(
            air="civitai:101055@128078",
            name="Stable Diffusion XL 1.0",
            architecture="sdxl",
            backend="diffusers",
            path="stabilityai/stable-diffusion-xl-base-1.0",
            rules=ModelRules(
                air="civitai:101055@128078",
                sizes=_any_size((1024, 1024)),
                parameters=xl,
                max_reference_images=1,
            ),
            settings={"dtype": "float16", "variant": "fp16", "steps": 30, "guidance_scale": 7.0},
        ),
        ModelEntry(
            air="impasto:sd-turbo@1",
            name="SD-Turbo (runs acceptably on a CPU)",
            architecture="sd2x",
            backend="diffusers",
            path="stabilityai/sd-turbo",
            rules=ModelRules(
                air="impasto:sd-turbo@1",
                sizes=_any_size((512, 512), 1024),
                parameters=local,
                max_reference_images=1,
            ),
            settings={"steps": 1, "guidance_scale": 0.0},
        ),
    ]


def _tiny_assets() -> list[ModelEntry]:
    """The tiny model's LoRAs, ControlNet, VAE, embedding and IP-Adapter, built in code."""

    def asset(air: str, name: str, category: str, asset: str, **settings: Any) -> ModelEntry:
        return ModelEntry(
            air=air,
            name=name,
            architecture="sd1x",
            backend="tiny",
            category=category,
            rules=ModelRules(air=air, sizes=_any_size((512, 512))),
            settings={"asset": asset, **settings},
        )

    return [
        asset("impasto:tiny-lora@1", "impasto tiny LoRA one (random)", "lora", "lora1"),
        asset("impasto:tiny-lora@2", "impasto tiny LoRA two (random)", "lora", "lora2"),
        asset("impasto:tiny-controlnet@1", "impasto tiny ControlNet", "controlnet", "controlnet"),
        asset("impasto:tiny-vae@1", "impasto tiny VAE (other random weights)", "vae", "vae"),
        asset(
            "impasto:tiny-embedding@1",
            "impasto tiny textual inversion",
            "embeddings",
            "embedding",
            token="<impasto-tiny>",
        ),
        asset(
            "impasto:tiny-ip-adapter@1",
            "impasto tiny IP-Adapter",
            "ipadapter",
            "ip-adapter",
            subfolder="models",
            weight_name="ip-adapter_tiny.safetensors",
        ),
        ModelEntry(
            air="impasto:tiny-xl-refiner@1",
            name="impasto tiny SDXL refiner",
            architecture="sdxl",
            backend="tiny",
            type="refiner",
            rules=ModelRules(air="impasto:tiny-xl-refiner@1", sizes=_any_size((512, 512))),
            settings={"asset": "xl-refiner"},
        ),
    ]


_ENTRY_KEYS = {
    "name",
    "architecture",
    "backend",
    "path",
    "category",
    "type",
    "sizes",
    "min_side",
    "max_side",
    "default_width",
    "default_height",
    "parameters",
    "max_results",
    "min_reference_images",
    "max_reference_images",
    "provider",
    "price_usd",
    "size_prices",
    "settings",
}


def _parse_size(text: str, where: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise ModelsFileError(f"{where}: size {text!r} must look like 1024x768")
    return int(match.group(1)), int(match.group(2))


def _apply(base: ModelEntry | None, air: str, table: Mapping[str, Any]) -> ModelEntry:
    where = f"models.{air!r}"
    unknown = set(table) - _ENTRY_KEYS
    if unknown:
        raise ModelsFileError(f"{where}: unknown keys {sorted(unknown)}")
    if base is None:
        if "backend" not in table:
            raise ModelsFileError(f"{where}: a new model needs a backend")
        base = ModelEntry(
            air=air,
            name=air,
            architecture="unknown",
            backend=str(table["backend"]),
            rules=ModelRules(air=air, sizes=_any_size((1024, 1024))),
        )
    try:
        rules = base.rules
        sizes = rules.sizes
        if "sizes" in table:
            raw = table["sizes"]
            if raw == "any":
                sizes = replace(sizes, allowed=None)
            else:
                sizes = replace(sizes, allowed=frozenset((int(w), int(h)) for w, h in raw))
        default = (
            int(table.get("default_width", sizes.default[0])),
            int(table.get("default_height", sizes.default[1])),
        )
        sizes = replace(
            sizes,
            default=default,
            min_side=int(table.get("min_side", sizes.min_side)),
            max_side=int(table.get("max_side", sizes.max_side)),
        )
        # Tasks without width and height run at the default: it must pass the size rule too.
        problem = sizes.check(default)
        if problem is not None:
            raise ModelsFileError(
                f"{where}: default size {default[0]}x{default[1]} is not accepted by the "
                f"model's own sizes ({problem}); set default_width and default_height"
            )
        parameters = rules.parameters
        if "parameters" in table:
            parameters = frozenset(str(p) for p in table["parameters"])
            bad = parameters - GENERATION_PARAMETERS
            if bad:
                raise ModelsFileError(
                    f"{where}: parameters {sorted(bad)} are not generation parameters; "
                    f"choose from {sorted(GENERATION_PARAMETERS)}"
                )
        price = rules.price
        if "price_usd" in table or "size_prices" in table:
            by_size = dict(price.by_size)
            for text, usd in dict(table.get("size_prices", {})).items():
                by_size[_parse_size(str(text), where)] = float(usd)
            price = PriceTable(
                per_image=float(table.get("price_usd", price.per_image)), by_size=by_size
            )
        rules = replace(
            rules,
            air=air,
            sizes=sizes,
            parameters=parameters,
            max_results=int(table.get("max_results", rules.max_results)),
            min_reference_images=int(table.get("min_reference_images", rules.min_reference_images)),
            max_reference_images=int(table.get("max_reference_images", rules.max_reference_images)),
            provider=table.get("provider", rules.provider),
            price=price,
        )
        category, kind = _kind(table, base, where)
        if kind == "inpainting":
            rules = replace(rules, required=rules.required | {"maskImage"})
        return replace(
            base,
            air=air,
            name=str(table.get("name", base.name)),
            architecture=str(table.get("architecture", base.architecture)),
            backend=str(table.get("backend", base.backend)),
            path=table.get("path", base.path),
            category=category,
            type=kind,
            settings={**base.settings, **dict(table.get("settings", {}))},
            rules=rules,
        )
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ModelsFileError):
            raise
        raise ModelsFileError(f"{where}: {exc}") from None


def _kind(table: Mapping[str, Any], base: ModelEntry, where: str) -> tuple[str, str]:
    """(category, type): `type = "lora"` (or controlnet, vae, embeddings, ipadapter) makes an
    asset; `type = "inpainting"` (or base, refiner) a checkpoint of that kind."""
    category = str(table.get("category", base.category))
    kind = str(table.get("type", base.type))
    if kind in ASSET_CATEGORIES:
        category, kind = kind, "base"
    elif kind not in CHECKPOINT_TYPES:
        raise ModelsFileError(
            f"{where}: type {kind!r} is not one of {', '.join(CHECKPOINT_TYPES + ASSET_CATEGORIES)}"
        )
    if category != "checkpoint" and category not in ASSET_CATEGORIES:
        raise ModelsFileError(
            f"{where}: category {category!r} is not checkpoint or one of "
            f"{', '.join(ASSET_CATEGORIES)}"
        )
    return category, kind


class ModelRegistry:
    """All models this server knows, by AIR, with aliases."""

    def __init__(self, entries: Mapping[str, ModelEntry], aliases: Mapping[str, str]) -> None:
        for source, target in aliases.items():
            if target not in entries:
                raise ModelsFileError(f"aliases: {source!r} points to unknown model {target!r}")
            if target in aliases:
                raise ModelsFileError(f"aliases: {target!r} is itself an alias; alias the target")
        self._entries = dict(entries)
        self._aliases = dict(aliases)

    @classmethod
    def load(cls, path: Path | None) -> ModelRegistry:
        """Built-in entries, overridden and extended by the models file if one is given."""
        entries = {entry.air: entry for entry in _builtin_entries()}
        aliases: dict[str, str] = {}
        if path is not None:
            try:
                document = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ModelsFileError(f"cannot read models file {path}: {exc}") from None
            unknown = set(document) - {"models", "aliases"}
            if unknown:
                raise ModelsFileError(f"{path}: unknown top-level tables {sorted(unknown)}")
            for name in ("models", "aliases"):
                if not isinstance(document.get(name, {}), dict):
                    raise ModelsFileError(f"{path}: {name} must be a table")
            for air, table in dict(document.get("models", {})).items():
                if not AIR_PATTERN.match(air):
                    raise ModelsFileError(f"models: {air!r} is not an AIR id (source:id@version)")
                if not isinstance(table, dict):
                    raise ModelsFileError(f"models.{air!r} must be a table")
                entries[air] = _apply(entries.get(air), air, table)
            for source, target in dict(document.get("aliases", {})).items():
                if not AIR_PATTERN.match(source):
                    raise ModelsFileError(f"aliases: {source!r} is not an AIR id")
                aliases[source] = str(target)
        for source in aliases:
            if source not in entries:
                # An alias may introduce a new AIR; it then takes the target's rules.
                target = entries.get(aliases[source])
                if target is not None:
                    entries[source] = replace(
                        target, air=source, rules=replace(target.rules, air=source)
                    )
        return cls(entries, aliases)

    def resolve(self, air: str) -> ResolvedModel:
        requested = self._entries.get(air)
        if requested is None:
            raise ModelNotFound(
                f"Model {air!r} is not available on this server; list models with modelSearch "
                "or `impasto models`.",
                parameter="model",
            )
        target = self._entries[self._aliases.get(air, air)]
        return ResolvedModel(requested=requested, target=target)

    def get(self, air: str) -> ModelEntry | None:
        """The entry of an AIR as it is (no alias), or None."""
        return self._entries.get(air)

    def entries(self) -> list[ModelEntry]:
        return sorted(self._entries.values(), key=lambda entry: entry.air)

    def alias_of(self, air: str) -> str | None:
        return self._aliases.get(air)

    def backend_kinds(self) -> set[str]:
        return {self._entries[self._aliases.get(a, a)].backend for a in self._entries}
