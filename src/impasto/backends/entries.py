"""A model entry: one AIR, what requests for it may contain, and what runs it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from impasto.backends.utility.base import TASK_OF_CATEGORY
from impasto.protocol.rules import ModelRules, SizeRule

ASSET_CATEGORIES = ("lora", "controlnet", "vae", "embeddings", "ipadapter")
CHECKPOINT_TYPES = ("base", "inpainting", "refiner")

TINY_AIR = "impasto:tiny@1"


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
    # embeddings | ipadapter; a checkpoint's type is base | inpainting | refiner. impasto adds
    # the utility models' categories: upscaler | background-removal | captioner |
    # prompt-enhancer (backends/utility/base.py).
    category: str = "checkpoint"
    type: str = "base"

    @property
    def is_asset(self) -> bool:
        """Not an imageInference model: a LoRA, ControlNet, VAE, embedding or IP-Adapter
        (used by a checkpoint, never run), or a utility model (run by its own task)."""
        return self.category != "checkpoint"

    @property
    def utility_task(self) -> str | None:
        """The task type a utility model serves (upscale, removeBackground, caption,
        promptEnhance), or None for checkpoints and assets."""
        return TASK_OF_CATEGORY.get(self.category)


@dataclass(frozen=True)
class ResolvedModel:
    """A requested AIR: its own rules, and the entry (maybe another, by alias) that runs it."""

    requested: ModelEntry
    target: ModelEntry

    @property
    def rules(self) -> ModelRules:
        return self.requested.rules


def any_size(default: tuple[int, int], max_side: int = 2048) -> SizeRule:
    return SizeRule(default=default, min_side=64, max_side=max_side)
