"""Builds the utility model a models-file entry names, on a device of the pool (or, for
`openai-chat`, a client of the operator's endpoint)."""

from __future__ import annotations

import os
from pathlib import Path

from impasto.backends.entries import ModelEntry
from impasto.backends.factory import BackendContext
from impasto.backends.utility.base import UtilityModel
from impasto.protocol.errors import ProviderNotConfigured

TINY_DIRS = {
    "swin2sr-x4": "impasto-tiny-swin2sr-x4",
    "swin2sr-x2": "impasto-tiny-swin2sr-x2",
    "sd-upscaler": "impasto-tiny-sd-upscaler",
    "segmenter": "impasto-tiny-segmenter",
    "captioner": "impasto-tiny-captioner",
    "enhancer": "impasto-tiny-enhancer",
}


def utility_source(entry: ModelEntry, models_dir: Path) -> str | Path:
    """Where an entry's weights are: its path (hub id or directory), or the directory a tiny
    model is built into (once) under the models directory."""
    tiny = entry.settings.get("tiny")
    if tiny is None:
        return entry.path or ""
    directory = models_dir / TINY_DIRS[str(tiny)]
    if tiny in ("swin2sr-x4", "swin2sr-x2"):
        from impasto.backends.utility.tiny_upscalers import ensure_tiny_swin2sr

        return ensure_tiny_swin2sr(directory, 4 if tiny == "swin2sr-x4" else 2)
    if tiny == "sd-upscaler":
        from impasto.backends.utility.tiny_upscalers import ensure_tiny_sd_upscaler

        return ensure_tiny_sd_upscaler(directory)
    if tiny == "segmenter":
        from impasto.backends.utility.tiny_segmenter import ensure_tiny_segmenter

        return ensure_tiny_segmenter(directory)
    from impasto.backends.utility.tiny_text import ensure_tiny_captioner, ensure_tiny_enhancer

    if tiny == "captioner":
        return ensure_tiny_captioner(directory)
    return ensure_tiny_enhancer(directory)


def chat_key(entry: ModelEntry) -> str | None:
    """The key of an openai-chat entry: the environment variable its api_key_env names."""
    name = entry.settings.get("api_key_env")
    return os.environ.get(str(name)) or None if name else None


def missing_chat_key(entry: ModelEntry) -> ProviderNotConfigured | None:
    """The error of an openai-chat entry whose api_key_env names an unset variable."""
    name = entry.settings.get("api_key_env")
    if name and chat_key(entry) is None:
        return ProviderNotConfigured(
            f"Model {entry.air} is served by an OpenAI-compatible chat endpoint whose key "
            f"variable {name} is not set on this server.",
            parameter="model",
        )
    return None


def create_utility_model(entry: ModelEntry, context: BackendContext) -> UtilityModel:
    """The model object for an entry (loaded lazily, on its first request)."""
    kind = entry.backend
    if kind == "openai-chat":
        from impasto.backends.utility.enhancers import ChatEndpointEnhancer

        return ChatEndpointEnhancer(entry, api_key=chat_key(entry))
    source = utility_source(entry, context.models_dir)
    worker = context.devices.assign()
    offline = context.offline
    if kind == "swin2sr":
        from impasto.backends.utility.upscalers import Swin2SRUpscaler

        return Swin2SRUpscaler(entry, source, worker, offline=offline)
    if kind == "sd-upscaler":
        from impasto.backends.utility.upscalers import DiffusionUpscaler

        return DiffusionUpscaler(entry, source, worker, offline=offline)
    if kind == "segmenter":
        from impasto.backends.utility.segmenters import BackgroundRemover

        return BackgroundRemover(entry, source, worker, offline=offline)
    if kind == "captioner":
        from impasto.backends.utility.captioners import Captioner

        return Captioner(entry, source, worker, offline=offline)
    if kind == "text-generator":
        from impasto.backends.utility.enhancers import TextGeneratorEnhancer

        return TextGeneratorEnhancer(entry, source, worker, offline=offline)
    raise ValueError(f"model {entry.air}: {kind!r} is not a utility backend")
