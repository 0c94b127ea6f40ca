"""Builds the backend a model entry names: tiny, diffusers, runway, openai-images (an
OpenAI-compatible image engine), or an operator's own class given by import path
(`backend = "package.module:Class"`), constructed as Class(entry, context).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from impasto.backends.base import Backend
from impasto.backends.devices import DevicePool
from impasto.backends.registry import ModelEntry, ModelRegistry
from impasto.protocol.errors import ImpastoError, ModelNotFound, ProviderNotConfigured

RUNWAY_DEFAULT_URL = "https://api.dev.runwayml.com"


@dataclass(frozen=True)
class RunwayOptions:
    """How impasto drives Runway's task API (from Settings)."""

    poll_interval_s: float = 5.0
    concurrency: int = 4
    request_timeout_s: float = 60.0
    task_timeout_s: float = 1800.0


@dataclass(frozen=True)
class BackendContext:
    """What backends may use: where models live, the devices, limits, provider credentials."""

    models_dir: Path
    devices: DevicePool
    max_batch_size: int
    outbound: Any = None
    # By provider name ("runway"); a model entry's own `api_key`/`base_url` settings win.
    provider_keys: dict[str, str] | None = None
    provider_urls: dict[str, str] | None = None
    runway: RunwayOptions = field(default_factory=RunwayOptions)
    # Never download model weights: only local paths and the local Hugging Face cache.
    offline: bool = False
    # For the LoRAs, ControlNets, VAEs, embeddings, IP-Adapters and refiners tasks name.
    registry: ModelRegistry | None = None


def weights_source(entry: ModelEntry, context: BackendContext) -> str | Path:
    """Where an entry's weights are: its path (hub id or directory), or for the built-in tiny
    models and assets the directory they are built into (once) under the models directory."""
    if entry.backend != "tiny":
        return entry.path or ""
    asset = entry.settings.get("asset")
    if asset == "flux":
        from impasto.backends.tiny_flux import ensure_tiny_flux

        return ensure_tiny_flux(context.models_dir / "impasto-tiny-flux")
    from impasto.backends.tiny import TINY_IP_ADAPTER, ensure_tiny_ip_adapter, ensure_tiny_pipeline

    pipeline_dir = ensure_tiny_pipeline(context.models_dir / "impasto-tiny")
    if asset is None:
        return pipeline_dir
    if asset == "ip-adapter":
        return ensure_tiny_ip_adapter(context.models_dir / TINY_IP_ADAPTER, pipeline_dir)
    from impasto.backends.tiny_assets import ensure_tiny_asset

    return ensure_tiny_asset(str(asset), context.models_dir, pipeline_dir)


def asset_locator(context: BackendContext) -> Any:
    """AIR -> (entry, weights source) for the assets a task names (checked at acceptance)."""
    registry = context.registry

    def locate(air: str) -> tuple[ModelEntry, str | Path]:
        entry = registry.get(air) if registry is not None else None
        if entry is None:
            raise ModelNotFound(f"{air} is not available on this server.", parameter="model")
        return entry, weights_source(entry, context)

    return locate


def provider_key(entry: ModelEntry, context: BackendContext, provider: str) -> str | None:
    """The API key for a provider-served entry: its own `api_key` setting, else the server's."""
    own = entry.settings.get("api_key")
    if own:
        return str(own)
    return (context.provider_keys or {}).get(provider) or None


def models_without_keys(registry: ModelRegistry, context: BackendContext) -> list[str]:
    """AIRs served by a provider (after aliasing) for which no API key is configured."""
    missing = []
    for entry in registry.entries():
        target = registry.resolve(entry.air).target
        if target.backend == "runway" and provider_key(target, context, "runway") is None:
            missing.append(entry.air)
    return missing


def unavailable_models(registry: ModelRegistry, context: BackendContext) -> dict[str, ImpastoError]:
    """AIR -> the error every task for it would end with (a provider with no key, or its SDK
    not installed): checked before a task is accepted, not after."""
    problems: dict[str, ImpastoError] = {}
    for entry in registry.entries():
        target = registry.resolve(entry.air).target
        if target.backend == "openai-images":
            from impasto.backends.openai_engine import missing_key

            problem = missing_key(target)
            if problem is not None:
                problems[entry.air] = problem
            continue
        if target.backend == "openai-chat":
            from impasto.backends.utility.factory import missing_chat_key

            chat_problem = missing_chat_key(target)
            if chat_problem is not None:
                problems[entry.air] = chat_problem
            continue
        if target.backend != "runway":
            continue
        if provider_key(target, context, "runway") is None:
            problems[entry.air] = ProviderNotConfigured(
                f"Model {entry.air} is served by Runway, and the Runway provider is not "
                "configured on this server (no API key).",
                parameter="model",
            )
        elif importlib.util.find_spec("runwayml") is None:
            problems[entry.air] = ProviderNotConfigured(
                f"Model {entry.air} is served by Runway, and the runwayml package is not "
                "installed on this server (pip install 'impasto[runway]').",
                parameter="model",
            )
    return problems


def create_backend(entry: ModelEntry, context: BackendContext) -> Backend:
    kind = entry.backend
    if kind in ("tiny", "diffusers"):
        from impasto.backends.diffusers_backend import DiffusersBackend

        source = weights_source(entry, context)
        if kind == "tiny":
            from impasto.backends.tiny import (
                TINY_IP_ADAPTER,
                ensure_tiny_ip_adapter,
                ensure_tiny_pipeline,
            )

            adapter = entry.settings.get("ip_adapter")
            if isinstance(adapter, dict) and adapter.get("path") == TINY_IP_ADAPTER:
                pipeline_dir = ensure_tiny_pipeline(context.models_dir / "impasto-tiny")
                built = ensure_tiny_ip_adapter(context.models_dir / TINY_IP_ADAPTER, pipeline_dir)
                entry = replace(
                    entry,
                    settings={**entry.settings, "ip_adapter": {**adapter, "path": str(built)}},
                )
        # One replica per device: the lane then runs one batch per device at a time.
        workers = context.devices.workers()
        return DiffusersBackend(
            entry,
            source,
            workers,
            context.max_batch_size,
            offline=context.offline,
            assets=asset_locator(context),
            compile_cache=context.models_dir / ".compile-cache",
        )
    if kind == "runway":
        key = provider_key(entry, context, "runway")
        if key is None:
            raise ProviderNotConfigured(
                f"Model {entry.air} is served by Runway, and the Runway provider is not "
                "configured on this server (no API key).",
                parameter="model",
            )
        try:
            from impasto.backends.runway import RunwayBackend
        except ModuleNotFoundError as exc:
            if (exc.name or "").partition(".")[0] != "runwayml":
                raise
            raise ProviderNotConfigured(
                f"Model {entry.air} is served by Runway, and the runwayml package is not "
                "installed on this server (pip install 'impasto[runway]').",
                parameter="model",
            ) from None
        base_url = str(
            entry.settings.get("base_url")
            or (context.provider_urls or {}).get("runway")
            or RUNWAY_DEFAULT_URL
        )
        return RunwayBackend(entry, api_key=key, base_url=base_url, options=context.runway)
    if kind == "openai-images":
        from impasto.backends.openai_images import OpenAIImagesBackend

        return OpenAIImagesBackend(entry, context)
    if ":" in kind:
        module_name, _, class_name = kind.partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        backend: Backend = cls(entry, context)
        return backend
    raise ValueError(f"model {entry.air}: unknown backend {kind!r}")
