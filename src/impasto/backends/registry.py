"""The model registry: AIR ids mapped to request rules and a backend, from built-in entries and
the operator's models file (TOML).

    [models."my:sdxl@1"]
    name = "My SDXL"
    backend = "diffusers"              # tiny | diffusers | runway | openai-images | "pkg.mod:Class"
    path = "stabilityai/stable-diffusion-xl-base-1.0"
    architecture = "sdxl"
    default_width = 1024
    default_height = 1024
    price_usd = 0.002
    [models."my:sdxl@1".settings]      # passed to the backend as they are
    dtype = "float16"

    [aliases]
    "runway:4@1" = "impasto:tiny@1"    # run runway:4@1 requests on the tiny model

`backend = "openai-images"` forwards to an OpenAI-compatible image engine; its settings (url,
model, api_key_env, ...) are checked here, see backends/openai_engine.py.

An alias changes what runs a model and keeps the aliased AIR's own rules (sizes, parameters,
price), so clients see the same validation whichever backend serves it.

LoRAs, ControlNets, VAEs, embeddings and IP-Adapters are entries too (`type = "lora"`, ...),
named by tasks that use them; entries.py holds the entry type, builtins.py the built-ins.

Utility models are entries with a utility category (`type = "upscaler"`, "background-removal",
"captioner" or "prompt-enhancer") and a utility backend (swin2sr, sd-upscaler, segmenter,
captioner, text-generator, openai-chat): see backends/utility/catalog.py.

    [models."my:upscaler@1"]
    type = "upscaler"
    backend = "swin2sr"
    path = "caidas/swin2SR-realworld-sr-x4-64-bsrgan-psnr"
"""

from __future__ import annotations

import logging
import re
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from impasto.backends import openai_engine
from impasto.backends.builtins import builtin_entries
from impasto.backends.entries import (
    ASSET_CATEGORIES,
    CHECKPOINT_TYPES,
    TINY_AIR,
    ModelEntry,
    ResolvedModel,
    any_size,
)
from impasto.backends.speed_settings import check_speed_settings
from impasto.backends.utility.base import UTILITY_CATEGORIES
from impasto.backends.utility.catalog import BACKENDS_OF_CATEGORY, UTILITY_BACKENDS
from impasto.protocol.errors import ModelNotFound
from impasto.protocol.rules import GENERATION_PARAMETERS, ModelRules, PriceTable

log = logging.getLogger("impasto.registry")

# Re-exported: the registry is where callers have always found these.
__all__ = [
    "ASSET_CATEGORIES",
    "CHECKPOINT_TYPES",
    "TINY_AIR",
    "ModelEntry",
    "ModelRegistry",
    "ModelsFileError",
    "ResolvedModel",
]

AIR_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*:[A-Za-z0-9._-]+@[A-Za-z0-9._-]+$")


class ModelsFileError(ValueError):
    """The models file is malformed; the message names the entry and the key."""


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
        backend = str(table["backend"])
        base = ModelEntry(
            air=air,
            name=air,
            architecture="unknown",
            backend=backend,
            rules=ModelRules(
                air=air,
                sizes=any_size((1024, 1024)),
                # An engine entry takes what the backend forwards unless `parameters` says less.
                parameters=openai_engine.SUPPORTED_PARAMETERS
                if backend == openai_engine.BACKEND_NAME
                else frozenset(),
            ),
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
        settings = {**base.settings, **dict(table.get("settings", {}))}
        problems = check_speed_settings(settings)
        backend = str(table.get("backend", base.backend))
        problems += _utility_problems(category, backend)
        if backend == openai_engine.BACKEND_NAME:
            problems += _engine_problems(settings, rules)
        if problems:
            raise ModelsFileError(f"{where}: {'; '.join(problems)}")
        if settings.get("fuse_qkv") is True and "lora" in rules.parameters:
            # diffusers' fused attention reads only the fused projection: LoRA layers on
            # to_q/to_k/to_v would be silently ignored, so LoRA tasks are refused instead.
            log.warning("%s: fuse_qkv is on, so this model takes no lora", air)
            rules = replace(rules, parameters=rules.parameters - {"lora"})
        return replace(
            base,
            air=air,
            name=str(table.get("name", base.name)),
            architecture=str(table.get("architecture", base.architecture)),
            backend=backend,
            path=table.get("path", base.path),
            category=category,
            type=kind,
            settings=settings,
            rules=rules,
        )
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ModelsFileError):
            raise
        raise ModelsFileError(f"{where}: {exc}") from None


def _engine_problems(settings: Mapping[str, Any], rules: ModelRules) -> list[str]:
    """An openai-images entry's settings, and rules that ask for what it cannot forward."""
    problems = openai_engine.check_settings(settings)
    unknown = set(settings) - openai_engine.SETTING_KEYS
    if unknown:
        log.warning("backend openai-images ignores settings %s", sorted(unknown))
    extra = rules.parameters - openai_engine.SUPPORTED_PARAMETERS
    if extra:
        problems.append(
            f"parameters {sorted(extra)} are not forwarded by backend openai-images; it takes "
            f"{sorted(openai_engine.SUPPORTED_PARAMETERS)}"
        )
    if rules.max_reference_images:
        problems.append(
            "backend openai-images takes no reference images; set max_reference_images = 0"
        )
    return problems


def _utility_problems(category: str, backend: str) -> list[str]:
    """A utility model needs a backend of its kind, and a utility backend a utility category."""
    allowed = BACKENDS_OF_CATEGORY.get(category)
    if allowed is not None and backend not in allowed:
        return [f"a {category} model takes backend {' or '.join(allowed)}, not {backend!r}"]
    if allowed is None and backend in UTILITY_BACKENDS:
        return [
            f"backend {backend!r} runs utility models: give the entry a type such as "
            f"{', '.join(repr(c) for c, b in BACKENDS_OF_CATEGORY.items() if backend in b)}"
        ]
    return []


def _kind(table: Mapping[str, Any], base: ModelEntry, where: str) -> tuple[str, str]:
    """(category, type): `type = "lora"` (or controlnet, vae, embeddings, ipadapter) makes an
    asset; `type = "inpainting"` (or base, refiner) a checkpoint of that kind."""
    category = str(table.get("category", base.category))
    kind = str(table.get("type", base.type))
    if kind in ASSET_CATEGORIES or kind in UTILITY_CATEGORIES:
        category, kind = kind, "base"
    elif kind not in CHECKPOINT_TYPES:
        kinds = CHECKPOINT_TYPES + ASSET_CATEGORIES + UTILITY_CATEGORIES
        raise ModelsFileError(f"{where}: type {kind!r} is not one of {', '.join(kinds)}")
    if category != "checkpoint" and category not in ASSET_CATEGORIES + UTILITY_CATEGORIES:
        raise ModelsFileError(
            f"{where}: category {category!r} is not checkpoint or one of "
            f"{', '.join(ASSET_CATEGORIES + UTILITY_CATEGORIES)}"
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
        entries = {entry.air: entry for entry in builtin_entries()}
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
