"""Runware scheduler names mapped to diffusers scheduler classes (no torch import here)."""

from __future__ import annotations

from typing import Any

# name -> (diffusers class, extra config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler Karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "Heun Karras": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM++ 3M": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    "DPM++ 3M Karras": (
        "DPMSolverMultistepScheduler",
        {"solver_order": 3, "use_karras_sigmas": True},
    ),
    "DEIS": ("DEISMultistepScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "UniPC Karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    "LCM": ("LCMScheduler", {}),
    "FlowMatch Euler": ("FlowMatchEulerDiscreteScheduler", {}),
}

# Runware also accepts diffusers class names as they are.
_CLASS_NAMES = {cls for cls, _ in SCHEDULERS.values()}
_DEFAULT = {"Default", "default"}


def resolve_scheduler(name: str) -> tuple[str, dict[str, Any]] | None:
    """(class name, config overrides) for a scheduler name, None for the model's own default.

    Raises KeyError for a name we do not know.
    """
    if name in _DEFAULT:
        return None
    if name in SCHEDULERS:
        return SCHEDULERS[name]
    if name in _CLASS_NAMES:
        return name, {}
    raise KeyError(name)


def known_schedulers() -> list[str]:
    return sorted({*SCHEDULERS, *_CLASS_NAMES, "Default"})


def scheduler_problem(name: str, architecture: str) -> str | None:
    """Why scheduler `name` cannot run a model of `architecture`, or None if it can.

    Flow-matching models (FLUX, SD3) take only flow-matching schedulers, and the discrete
    (epsilon / v-prediction) families take none of those; a mismatch would fail inside the
    pipeline after the task was accepted. Unknown architectures are not second-guessed.
    """
    try:
        resolved = resolve_scheduler(name)
    except KeyError:
        return f"unknown scheduler {name!r}"
    if resolved is None:
        return None
    flow_scheduler = resolved[0].startswith("FlowMatch")
    if architecture.startswith(("flux", "sd3")):
        flow_model = True
    elif architecture.startswith(("sd1", "sd2", "sdxl")):
        flow_model = False
    else:
        return None
    if flow_scheduler == flow_model:
        return None
    family = "flow-matching" if flow_model else "discrete (non flow-matching)"
    return f"models of architecture {architecture} take only {family} schedulers"
