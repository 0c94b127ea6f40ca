"""Step caches: skip part of the denoiser's work on some steps of one pipeline call, as
Runware's `acceleratorOptions` ask. This module holds the plan, the run that counts one call's
steps, and the per-call entry point that checks what applies where and installs the hooks.

The methods live beside it: First Block Cache (`fbcache`) and TeaCache (`teacache`) for
transformer (DiT) denoisers in `block_cache`, DeepCache (`deepcache`) for UNets in `deep_cache`;
the hook bookkeeping they share in `step_cache_hooks`.

Every method runs the first step in full, the steps before `start_step` and from `stop_step` on,
and the step after `max_consecutive` cached ones in a row. Outputs depend only on the call's
inputs and the plan. The hooks live for one pipeline call (`step_cache`); this module imports
neither torch nor diffusers until one is installed, so plans can be made anywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from impasto.backends.block_cache import first_block_problem, install_first_block_cache
from impasto.backends.deep_cache import (
    deepcache_full_steps,
    deepcache_problem,
    install_deepcache,
    is_unet,
)
from impasto.backends.step_cache_hooks import StepCacheHooks, has_step_cache_hooks

if TYPE_CHECKING:
    import torch

    from impasto.backends.base import CacheUse

__all__ = [
    "Method",
    "SkipMode",
    "StepCachePlan",
    "StepCacheRun",
    "StepCallback",
    "UnsupportedCache",
    "cache_problem",
    "deepcache_full_steps",
    "plan_of",
    "step_cache",
]

Method = Literal["fbcache", "teacache", "deepcache"]
SkipMode = Literal["uniform", "non-uniform"]
StepCallback = Callable[[Any, int, Any, dict[str, Any]], Any]

_METHOD_NAMES = {"fbcache": "fbcache", "teacache": "teaCache", "deepcache": "deepCache"}


@dataclass(frozen=True)
class StepCachePlan:
    """Which step cache one pipeline call uses, and its settings."""

    method: Method
    threshold: float = 0.1  # fbcache / teacache distance
    interval: int = 3  # deepcache: a full pass every `interval` steps
    branch: int = 0  # deepcache: how many shallow UNet levels stay fresh (0 = only the outermost)
    skip_mode: SkipMode = "uniform"
    start_step: int | None = None  # steps before this always run in full (0-based, absolute)
    stop_step: int | None = None  # steps from this on always run in full
    max_consecutive: int | None = None  # at most this many cached steps in a row


class UnsupportedCache(Exception):
    """A step cache plan that cannot apply to this denoiser; the message says why."""


class StepCacheRun:
    """One cached pipeline call: which step the next denoiser call belongs to, and counts.
    Without `step_end` calls every denoiser call belongs to step 0 and runs in full."""

    def __init__(self, plan: StepCachePlan, steps: int) -> None:
        self.plan = plan
        self.steps = steps
        self.step = 0
        self.full_passes = 0  # denoiser calls that ran all blocks
        self.cached_passes = 0  # denoiser calls that reused cached work

    def step_end(self, step: int) -> None:
        """The pipeline finished step `step` (call from `callback_on_step_end`)."""
        self.step = step + 1

    def chain(self, callback: StepCallback | None) -> StepCallback:
        """A `callback_on_step_end` that notes each finished step, then calls `callback`."""

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
            self.step_end(step)
            return tensors if callback is None else callback(pipe, step, timestep, tensors)

        return on_step_end

    def must_run_in_full(self, cached_in_a_row: int) -> bool:
        """Whether the current step runs in full whatever the method would say."""
        plan = self.plan
        return (
            self.step == 0
            or (plan.start_step is not None and self.step < plan.start_step)
            or (plan.stop_step is not None and self.step >= plan.stop_step)
            or (plan.max_consecutive is not None and cached_in_a_row >= plan.max_consecutive)
        )

    def count(self, *, full: bool) -> None:
        if full:
            self.full_passes += 1
        else:
            self.cached_passes += 1


def plan_of(use: CacheUse, steps: int) -> StepCachePlan:
    """The plan for a call of `steps` denoising steps from a job's `CacheUse`, its window (steps
    or percentages of the schedule) resolved to step indices."""
    if use.method not in _METHOD_NAMES or use.skip_mode not in ("uniform", "non-uniform"):
        raise UnsupportedCache(f"unknown step cache {use.method!r} ({use.skip_mode})")
    start, stop = use.window(steps)
    return StepCachePlan(
        method=cast(Method, use.method),
        threshold=use.threshold,
        interval=use.interval,
        branch=use.branch,
        skip_mode=cast(SkipMode, use.skip_mode),
        start_step=start,
        stop_step=stop,
        max_consecutive=use.max_consecutive,
    )


def cache_problem(denoiser: torch.nn.Module, plan: StepCachePlan) -> str | None:
    """Why this plan cannot apply to this denoiser, or None."""
    from diffusers.utils.torch_utils import is_compiled_module

    method = _METHOD_NAMES[plan.method]
    if is_compiled_module(denoiser):
        # Hooks installed per call would make torch.compile recompile on every call.
        return f"{method} does not combine with a compiled denoiser"
    if has_step_cache_hooks(denoiser):
        return "a step cache is already installed on this denoiser"
    if getattr(denoiser, "is_cache_enabled", False):
        return "this denoiser already has a diffusers cache enabled"
    if plan.method == "deepcache":
        return deepcache_problem(denoiser, plan)
    if is_unet(denoiser):
        return f"{method} needs a transformer (DiT) denoiser; this model has a UNet"
    return first_block_problem(denoiser, method)


@contextlib.contextmanager
def step_cache(
    denoiser: torch.nn.Module, plan: StepCachePlan, steps: int
) -> Iterator[StepCacheRun]:
    """Installs hooks for one pipeline call (steps = the number of denoising steps that call
    runs) and removes them on exit, leaving the module exactly as before (no hooks left, same
    outputs afterwards as never cached)."""
    problem = cache_problem(denoiser, plan)
    if problem is not None:
        raise UnsupportedCache(problem)
    run = StepCacheRun(plan, steps)
    hooks = StepCacheHooks(denoiser)
    try:
        if plan.method == "deepcache":
            install_deepcache(hooks, denoiser, run)
        else:
            install_first_block_cache(hooks, denoiser, run)
        hooks.done()
        yield run
    finally:
        hooks.remove()
