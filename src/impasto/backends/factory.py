"""Builds the backend a model entry names: tiny, diffusers, runway, or an operator's own class
given by import path (`backend = "package.module:Class"`), constructed as Class(entry, context).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from impasto.backends.base import Backend
from impasto.backends.devices import DevicePool
from impasto.backends.registry import ModelEntry
from impasto.protocol.errors import ProviderNotConfigured


@dataclass(frozen=True)
class BackendContext:
    """What backends may use: where models live, the devices, limits, provider credentials."""

    models_dir: Path
    devices: DevicePool
    max_batch_size: int
    outbound: Any = None
    provider_keys: dict[str, str] | None = None
    provider_urls: dict[str, str] | None = None


def create_backend(entry: ModelEntry, context: BackendContext) -> Backend:
    kind = entry.backend
    if kind in ("tiny", "diffusers"):
        from impasto.backends.diffusers_backend import DiffusersBackend

        if kind == "tiny":
            from impasto.backends.tiny import ensure_tiny_pipeline

            source: str | Path = ensure_tiny_pipeline(context.models_dir / "impasto-tiny")
        else:
            source = entry.path or ""
        worker = context.devices.workers()[0]
        return DiffusersBackend(entry, source, worker, context.max_batch_size)
    if kind == "runway":
        raise ProviderNotConfigured(
            f"Model {entry.air} is served by Runway, and the Runway provider is not configured "
            "on this server.",
            parameter="model",
        )
    if ":" in kind:
        module_name, _, class_name = kind.partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        backend: Backend = cls(entry, context)
        return backend
    raise ValueError(f"model {entry.air}: unknown backend {kind!r}")
