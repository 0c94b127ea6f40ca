"""First Block Cache and TeaCache for transformer (DiT) denoisers such as FLUX: whether one
applies to a denoiser, and the hooks that run it for one pipeline call.

- First Block Cache (`fbcache`): every step runs the first block; when its residual (output
  minus input) has changed little since the last full pass (mean absolute change relative to
  that pass's residual <= `threshold`), the other blocks are skipped and the residual they added
  on that pass is added again. diffusers' own hooks (`diffusers.hooks.first_block_cache`) do the
  work; the test that decides is ours, so that the step window and the cap on cached steps in a
  row apply. A threshold of 0 never skips.
- TeaCache (`teacache`; arXiv 2411.19108): the TeaCache rule on the same indicator. The relative
  change step over step is summed; steps are cached while the sum stays below `threshold`, and
  the step that takes it over runs in full and resets it. diffusers has no TeaCache hook, and
  TeaCache proper measures the first block's timestep-modulated input through a polynomial
  fitted per model; impasto has no such fits and measures the residual.

Importing this module imports neither torch nor diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from impasto.backends.step_cache_hooks import PlainHook, StepCacheHooks

if TYPE_CHECKING:
    from impasto.backends.step_caches import StepCacheRun


def first_block_problem(denoiser: Any, method: str) -> str | None:
    """Why `method` (its wire name) cannot apply to this non-UNet denoiser's blocks, or None."""
    blocks = _transformer_blocks(denoiser)
    if len(blocks) < 2:
        return (
            f"{method} needs a transformer (DiT) denoiser with at least two blocks; "
            f"{type(denoiser).__name__} has {len(blocks)}"
        )
    unknown = sorted({type(block).__name__ for block in blocks if not _known_block(block)})
    if unknown:
        return (
            f"{method} does not know the blocks of {type(denoiser).__name__} ({', '.join(unknown)})"
        )
    return None


def install_first_block_cache(hooks: StepCacheHooks, denoiser: Any, run: StepCacheRun) -> None:
    """Adds fbcache's or teacache's hooks (as `run.plan` says) to the denoiser's blocks."""
    from diffusers.hooks.first_block_cache import (
        FBCBlockHook,
        FBCHeadBlockHook,
        FBCSharedBlockState,
    )
    from diffusers.hooks.hooks import StateManager

    states = StateManager(FBCSharedBlockState, (), {})
    head, *rest = _transformer_blocks(denoiser)
    hooks.add(denoiser, _DefaultContext(states))
    head_hook = FBCHeadBlockHook(states, run.plan.threshold)
    # An instance attribute: our rule in place of diffusers' test, the rest of its hook as is.
    head_hook._should_compute_remaining_blocks = _FirstBlockGate(run, states)
    hooks.add(head, head_hook)
    for index, block in enumerate(rest):
        hooks.add(block, FBCBlockHook(states, is_tail=index == len(rest) - 1))


# -- what applies where -------------------------------------------------------------------------


def _transformer_blocks(denoiser: Any) -> list[Any]:
    """The denoiser's transformer blocks in the order they run, as diffusers' First Block Cache
    finds them (the children named like `transformer_blocks` that are module lists)."""
    import torch
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    blocks = []
    for name, child in denoiser.named_children():
        if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, torch.nn.ModuleList):
            blocks += list(child)
    return blocks


def _known_block(block: Any) -> bool:
    # diffusers' block hooks need to know where a block returns its hidden states.
    from diffusers.hooks._helpers import TransformerBlockRegistry

    try:
        TransformerBlockRegistry.get(type(block))
    except ValueError:
        return False
    return True


# -- hooks --------------------------------------------------------------------------------------


class _Streak:
    """Per cache context ("cond", "uncond"): what the gate remembers between steps."""

    def __init__(self) -> None:
        self.previous: Any = None  # teacache: the first block's residual one step ago
        self.accumulated = 0.0  # teacache: relative change summed since the last full pass
        self.cached_in_a_row = 0


class _FirstBlockGate:
    """Whether the blocks after the first run, from the first block's residual: replaces
    diffusers' threshold test in `FBCHeadBlockHook` with fbcache's or teacache's rule."""

    def __init__(self, run: StepCacheRun, states: Any) -> None:
        self._run = run
        self._states = states
        self._streaks: dict[str, _Streak] = {}

    def __call__(self, residual: Any) -> bool:
        plan = self._run.plan
        shared = self._states.get_state()
        streak = self._streaks.setdefault(self._states.context.name, _Streak())
        if plan.method == "teacache":
            reference, streak.previous = streak.previous, residual
        else:
            reference = shared.head_block_residual  # kept from the last full pass
        change = None if reference is None else _relative_change(residual, reference)
        if change is not None:
            streak.accumulated += change
        cached = (
            change is not None
            and shared.tail_block_residuals is not None
            and not self._run.must_run_in_full(streak.cached_in_a_row)
            and (
                streak.accumulated < plan.threshold
                if plan.method == "teacache"
                else plan.threshold > 0 and change <= plan.threshold
            )
        )
        if cached:
            streak.cached_in_a_row += 1
        else:
            streak.cached_in_a_row = 0
            streak.accumulated = 0.0
        self._run.count(full=not cached)
        return not cached


def _relative_change(current: Any, reference: Any) -> float:
    reference = reference.float()
    change = (current.float() - reference).abs().mean() / reference.abs().mean()
    return float(change.item())


class _DefaultContext(PlainHook):
    """Pipelines that enter no `cache_context` (FluxImg2ImgPipeline, SD3) share one state."""

    def __init__(self, states: Any) -> None:
        super().__init__()
        self._states = states
        self._set_here = False

    def pre_forward(self, module: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        from diffusers.hooks.hooks import CacheContext

        try:
            _ = self._states.context  # diffusers raises when no context is set
        except ValueError:
            self._states.set_context(CacheContext("impasto"))
            self._set_here = True
        return args, kwargs

    def post_forward(self, module: Any, output: Any) -> Any:
        if self._set_here:
            self._states.set_context(None)
            self._set_here = False
        return output
