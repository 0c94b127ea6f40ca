"""The speed keys of a models-file entry's `settings` (parsed, with their defaults and the
problems of wrong values), and the report of what applying them did (speed.py applies them)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("impasto.backends.speed")

BOOL_KEYS = (
    "compile",
    "compile_regional",
    "compile_fullgraph",
    "fuse_qkv",
    "channels_last",
    "vae_slicing",
    "vae_tiling",
    "cuda_graphs",
)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
QUANTIZE_VALUES = ("fp8", "none")
DEFAULT_TILING_MIN_PIXELS = 1536 * 1536


@dataclass
class SpeedReport:
    """What apply_speed_settings did to one pipeline on one device."""

    applied: list[str] = field(default_factory=list)
    # setting -> why it was not applied
    skipped: dict[str, str] = field(default_factory=dict)
    # Filled by the caller after the first call (cold start, when torch.compile works).
    compile_seconds: float | None = None

    def skip(self, setting: str, reason: str) -> None:
        self.skipped[setting] = reason
        log.warning("speed option %s skipped: %s", setting, reason)

    def compile_failed(self, reason: str) -> None:
        """Compile was set up but failed, and with it the CUDA graphs that need it."""
        self.applied[:] = [label for label in self.applied if not label.startswith("compile=")]
        self.skip("compile", reason)
        if "cuda_graphs" in self.applied:
            self.applied.remove("cuda_graphs")
            self.skip("cuda_graphs", "compile failed")

    def record_cold_start(self, seconds: float) -> None:
        """The caller's first call took `seconds`; with compile on, that is its cold start."""
        self.compile_seconds = seconds
        compiled = any(label.startswith("compile=") for label in self.applied)
        log.info(
            "first call took %.1f s%s", seconds, " (torch.compile cold start)" if compiled else ""
        )


@dataclass(frozen=True)
class SpeedSettings:
    """The speed keys of a models-file entry's `settings`, with their defaults."""

    compile: bool = False
    compile_regional: bool = True
    compile_mode: str | None = None
    compile_fullgraph: bool | None = None
    attention_backend: str | None = None
    quantize: str | None = None
    fuse_qkv: bool = False
    # None: on for CUDA devices, off on the CPU (measured 7 % slower there, see docs/speed.md).
    channels_last: bool | None = None
    vae_slicing: bool = False
    vae_tiling: bool = False
    vae_tiling_min_pixels: int = DEFAULT_TILING_MIN_PIXELS
    cuda_graphs: bool = False
    batch_invariant: bool = False

    @classmethod
    def parse(cls, settings: Mapping[str, Any]) -> tuple[SpeedSettings, dict[str, str]]:
        """The settings, and a problem per key of the wrong type (that key keeps its default)."""
        values: dict[str, Any] = {}
        problems: dict[str, str] = {}
        for key in BOOL_KEYS:
            if key in settings:
                if isinstance(settings[key], bool):
                    values[key] = settings[key]
                else:
                    problems[key] = f"must be true or false, not {settings[key]!r}"
        if isinstance(settings.get("batch_invariant"), bool):
            values["batch_invariant"] = settings["batch_invariant"]
        for key, allowed in (("compile_mode", COMPILE_MODES), ("quantize", QUANTIZE_VALUES)):
            if key in settings:
                value = settings[key]
                if isinstance(value, str) and value in allowed:
                    values[key] = None if value == "none" else value
                else:
                    problems[key] = f"must be one of {', '.join(allowed)}, not {value!r}"
        if "attention_backend" in settings:
            name = settings["attention_backend"]
            if isinstance(name, str) and name:
                values["attention_backend"] = name.lower()
            else:
                problems["attention_backend"] = f"must be a backend name, not {name!r}"
        if "vae_tiling_min_pixels" in settings:
            pixels = settings["vae_tiling_min_pixels"]
            if isinstance(pixels, int) and not isinstance(pixels, bool) and pixels > 0:
                values["vae_tiling_min_pixels"] = pixels
            else:
                problems["vae_tiling_min_pixels"] = f"must be a positive integer, not {pixels!r}"
        return cls(**values), problems


def attention_backend_names() -> list[str]:
    """The names diffusers' `set_attention_backend` accepts."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [member.value for member in AttentionBackendName]


def check_speed_settings(settings: Mapping[str, Any]) -> list[str]:
    """Problems with the speed keys of a models-file entry's settings (wrong types, unknown
    attention backend names, unknown quantize value); other keys are ignored."""
    speed, problems = SpeedSettings.parse(settings)
    if speed.attention_backend is not None:
        names = attention_backend_names()
        if speed.attention_backend not in names:
            problems["attention_backend"] = (
                f"unknown backend {speed.attention_backend!r}; diffusers knows {', '.join(names)}"
            )
    return [f"settings.{key}: {problem}" for key, problem in problems.items()]
