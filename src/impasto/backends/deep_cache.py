"""DeepCache for UNet denoisers (SD 1.x, SDXL; arXiv 2312.00858): its schedule of full passes,
whether it applies to a denoiser, and the hooks that run it for one pipeline call.

A full pass keeps the outputs of the deep blocks (down_blocks[branch+1:], mid_block,
up_blocks[:-(branch+1)]); on the steps between full passes the shallow blocks, conv_in/out and
the time embedding run fresh and the deep blocks return what was kept, without running. The
UNet's own forward runs unchanged: the up blocks take skip connections from the end of the list,
so the fresh shallow ones still get the fresh shallow down blocks' samples. Full passes:
`uniform` at steps 0, interval, 2*interval, ...; `non-uniform` the same number of them at
(k/n)^2 of the schedule, denser early, where the noisy latents change the features most
(DeepCache's `sample_from_quad`, with power 2).

Importing this module imports neither torch nor diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from impasto.backends.step_cache_hooks import PlainHook, StepCacheHooks

if TYPE_CHECKING:
    from impasto.backends.step_caches import StepCachePlan, StepCacheRun


def deepcache_full_steps(plan: StepCachePlan, steps: int) -> frozenset[int]:
    """The steps of a `steps`-step call that DeepCache runs in full by its schedule alone."""
    if plan.skip_mode == "uniform":
        return frozenset(range(0, steps, plan.interval))
    count = -(-steps // plan.interval)
    positions: list[int] = []
    for k in range(count):
        position = int((k / count) ** 2 * steps)
        positions.append(max(position, positions[-1] + 1) if positions else position)
    return frozenset(positions)


def is_unet(denoiser: Any) -> bool:
    """Whether the denoiser is a UNet: down, mid and up blocks."""
    import torch

    return (
        isinstance(getattr(denoiser, "down_blocks", None), torch.nn.ModuleList)
        and isinstance(getattr(denoiser, "up_blocks", None), torch.nn.ModuleList)
        and getattr(denoiser, "mid_block", None) is not None
    )


def deepcache_problem(denoiser: Any, plan: StepCachePlan) -> str | None:
    """Why DeepCache with this plan cannot apply to this denoiser, or None."""
    if not is_unet(denoiser):
        return (
            "deepCache needs a UNet denoiser (down, mid and up blocks, as SD 1.x and SDXL "
            f"have); this model has {type(denoiser).__name__}, a transformer (DiT)"
        )
    levels = len(denoiser.down_blocks)
    if len(denoiser.up_blocks) != levels:
        return "deepCache needs a UNet with as many up blocks as down blocks"
    if plan.interval < 1:
        return f"the deepCache interval must be 1 or more, not {plan.interval}"
    if not 0 <= plan.branch < levels - 1:
        return (
            f"deepCache branch {plan.branch} does not fit this UNet of {levels} levels: "
            f"the branch must be from 0 to {levels - 2}, leaving deeper levels to cache"
        )
    return None


def install_deepcache(hooks: StepCacheHooks, unet: Any, run: StepCacheRun) -> None:
    """Adds DeepCache's hooks to the UNet and its deep blocks."""
    fresh = run.plan.branch + 1
    deep = [*unet.down_blocks[fresh:], unet.mid_block, *unet.up_blocks[:-fresh]]
    root = _DeepCacheRoot(run)
    hooks.add(unet, root)
    for key, block in enumerate(deep):
        hooks.add(block, _DeepBlock(root, key))


class _DeepCacheRoot(PlainHook):
    """On the UNet: decides per call whether the deep blocks run, and holds what they kept on
    the last full pass."""

    def __init__(self, run: StepCacheRun) -> None:
        super().__init__()
        self.run = run
        self.full_steps = deepcache_full_steps(run.plan, run.steps)
        self.outputs: dict[int, Any] = {}
        self.reuse = False
        self.cached_in_a_row = 0
        self._kept_for: tuple[int, ...] | None = None  # the sample shape of the kept pass
        self._shape: tuple[int, ...] = ()

    def pre_forward(self, module: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        sample = args[0] if args else kwargs["sample"]
        self._shape = tuple(sample.shape)
        self.reuse = (
            self._kept_for == self._shape
            and self.run.step not in self.full_steps
            and not self.run.must_run_in_full(self.cached_in_a_row)
        )
        if self.reuse:
            self.cached_in_a_row += 1
        else:
            self.reset_state(module)
            self.cached_in_a_row = 0
        self.run.count(full=not self.reuse)
        return args, kwargs

    def post_forward(self, module: Any, output: Any) -> Any:
        if not self.reuse:
            self._kept_for = self._shape
        return output

    def reset_state(self, module: Any) -> Any:
        self.outputs.clear()
        self._kept_for = None
        return module


class _DeepBlock(PlainHook):
    """On a deep block: runs and keeps its output on a full pass, returns it on a cached one."""

    def __init__(self, root: _DeepCacheRoot, key: int) -> None:
        super().__init__()
        self._root = root
        self._key = key

    def new_forward(self, module: Any, *args: Any, **kwargs: Any) -> Any:
        # Copies both ways: the UNet adds T2I-adapter residuals to block outputs in place.
        if self._root.reuse:
            return _copy(self._root.outputs[self._key])
        output = self.fn_ref.original_forward(*args, **kwargs)
        self._root.outputs[self._key] = _copy(output)
        return output


def _copy(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return type(value)(_copy(item) for item in value)
    return value.clone() if hasattr(value, "clone") else value
