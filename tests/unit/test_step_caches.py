"""Step caches on the real diffusers code path: First Block Cache and TeaCache on the tiny FLUX
transformer, DeepCache on the tiny SD UNet. Full passes are counted by torch forward hooks on
modules inside the blocks the caches skip, independently of the caches' own counters."""

from __future__ import annotations

import itertools
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from impasto.backends.step_caches import (
    StepCachePlan,
    StepCacheRun,
    UnsupportedCache,
    cache_problem,
    plan_of,
    step_cache,
)

PROMPT = "a lighthouse at dusk"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def flux(tiny_flux_dir: Path) -> Any:
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def sd(tiny_pipeline_dir: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@dataclass
class Denoised:
    images: np.ndarray
    run: StepCacheRun | None
    # The steps at which each watched module really ran, one entry per run.
    ran: dict[str, list[int]]


def denoise(
    pipeline: Any,
    plan: StepCachePlan | None,
    steps: int,
    watch: dict[str, torch.nn.Module],
    *,
    seed: int = 7,
    **kwargs: Any,
) -> Denoised:
    """One pipeline call at 64x64, under `plan` if given, noting the step of each real forward
    call of the `watch`ed modules."""
    denoiser = pipeline.transformer if hasattr(pipeline, "transformer") else pipeline.unet
    step = [0]
    ran: dict[str, list[int]] = {name: [] for name in watch}
    handles = [
        module.register_forward_hook(lambda *_, name=name: ran[name].append(step[0]))
        for name, module in watch.items()
    ]
    options: dict[str, Any] = {
        "width": 64,
        "height": 64,
        "num_inference_steps": steps,
        "guidance_scale": 0.0 if hasattr(pipeline, "transformer") else 2.0,
        "generator": torch.Generator().manual_seed(seed),
        "output_type": "np",
        **kwargs,
    }

    def track(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> Any:
        step[0] = index + 1
        return tensors

    try:
        if plan is None:
            images = pipeline(PROMPT, callback_on_step_end=track, **options).images
            return Denoised(images, None, ran)
        with step_cache(denoiser, plan, steps) as run:
            images = pipeline(PROMPT, callback_on_step_end=run.chain(track), **options).images
        return Denoised(images, run, ran)
    finally:
        for handle in handles:
            handle.remove()


def flux_tail(flux: Any) -> dict[str, torch.nn.Module]:
    # Inside the last block: it runs only when the block really runs, not when a hook
    # returns in its place.
    return {"tail": flux.transformer.single_transformer_blocks[-1].proj_out}


def unet_levels(sd: Any) -> dict[str, torch.nn.Module]:
    unet = sd.unet
    return {
        "mid": unet.mid_block.resnets[0],
        "down0": unet.down_blocks[0].resnets[0],
        "down1": unet.down_blocks[1].resnets[0],
        "up_last": unet.up_blocks[-1].resnets[0],
    }


def assert_untouched(module: torch.nn.Module) -> None:
    for name, child in module.named_modules():
        assert "forward" not in vars(child), f"{name or 'root'} keeps a patched forward"
        registry = getattr(child, "_diffusers_hook", None)
        assert registry is None or not registry.hooks, f"{name or 'root'} keeps hooks"


# -- First Block Cache and TeaCache -------------------------------------------------------------


@pytest.mark.parametrize("method", ["fbcache", "teacache"])
def test_a_generous_threshold_skips_blocks_and_stays_close_and_deterministic(
    flux: Any, method: Any
) -> None:
    plan = StepCachePlan(method, threshold=0.3)
    plain = denoise(flux, None, 8, flux_tail(flux))
    cached = denoise(flux, plan, 8, flux_tail(flux))
    denoise(flux, plan, 8, flux_tail(flux), seed=8)  # an unrelated call in between
    again = denoise(flux, plan, 8, flux_tail(flux))

    assert cached.run is not None
    assert len(cached.ran["tail"]) == cached.run.full_passes < 8
    assert cached.run.full_passes + cached.run.cached_passes == 8
    assert cached.ran["tail"][0] == 0, "the first step runs in full"
    assert cached.images.shape == plain.images.shape
    assert np.isfinite(cached.images).all()
    assert not np.array_equal(cached.images, plain.images)
    assert np.abs(cached.images - plain.images).mean() < 0.02
    assert np.array_equal(again.images, cached.images)


@pytest.mark.parametrize("method", ["fbcache", "teacache"])
def test_threshold_zero_gives_exactly_the_uncached_output(flux: Any, method: Any) -> None:
    plain = denoise(flux, None, 6, flux_tail(flux))
    cached = denoise(flux, StepCachePlan(method, threshold=0.0), 6, flux_tail(flux))

    assert cached.run is not None
    assert cached.run.full_passes == len(cached.ran["tail"]) == 6
    assert cached.run.cached_passes == 0
    assert np.array_equal(cached.images, plain.images)


def test_teacache_sums_the_change_so_it_runs_in_full_at_least_as_often(flux: Any) -> None:
    fb = denoise(flux, StepCachePlan("fbcache", threshold=0.3), 8, flux_tail(flux))
    tea = denoise(flux, StepCachePlan("teacache", threshold=0.3), 8, flux_tail(flux))

    assert fb.run is not None
    assert tea.run is not None
    assert tea.run.full_passes >= fb.run.full_passes
    assert tea.ran["tail"] != fb.ran["tail"]


def test_steps_outside_the_window_run_in_full(flux: Any) -> None:
    # Distance 1 would cache every step after the first; the window allows 3, 4 and 5 only.
    plan = StepCachePlan("fbcache", threshold=1.0, start_step=3, stop_step=6)
    cached = denoise(flux, plan, 8, flux_tail(flux))

    full = set(cached.ran["tail"])
    assert {0, 1, 2, 6, 7} <= full
    assert set(range(8)) - full, "some step in the window is cached"
    assert set(range(8)) - full <= {3, 4, 5}


@pytest.mark.parametrize("method", ["fbcache", "teacache"])
def test_max_consecutive_one_never_caches_two_steps_in_a_row(flux: Any, method: Any) -> None:
    plan = StepCachePlan(method, threshold=1.0, max_consecutive=1)
    cached = denoise(flux, plan, 8, flux_tail(flux))

    full = cached.ran["tail"]
    skipped = sorted(set(range(8)) - set(full))
    assert skipped, "something is cached"
    assert all(b - a > 1 for a, b in itertools.pairwise(skipped))
    assert cached.run is not None
    assert cached.run.full_passes == len(full)


def test_a_pipeline_without_cache_context_is_cached_too(flux: Any) -> None:
    from diffusers import FluxImg2ImgPipeline

    # FluxImg2ImgPipeline enters no `cache_context`: the cache keeps one state of its own.
    img2img = FluxImg2ImgPipeline.from_pipe(flux)
    pixels = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    plan = StepCachePlan("fbcache", threshold=0.3)
    options = {"image": Image.fromarray(pixels), "strength": 1.0}
    cached = denoise(img2img, plan, 8, flux_tail(flux), **options)
    again = denoise(img2img, plan, 8, flux_tail(flux), **options)

    assert cached.run is not None
    assert len(cached.ran["tail"]) == cached.run.full_passes < 8
    assert np.array_equal(again.images, cached.images)
    assert_untouched(flux.transformer)


def test_after_the_call_the_transformer_has_no_hooks_and_gives_the_same_output(
    flux: Any,
) -> None:
    before = denoise(flux, None, 4, {})
    denoise(flux, StepCachePlan("teacache", threshold=1.0), 4, {})
    assert_untouched(flux.transformer)
    assert np.array_equal(denoise(flux, None, 4, {}).images, before.images)

    with pytest.raises(RuntimeError), step_cache(flux.transformer, StepCachePlan("fbcache"), 4):
        raise RuntimeError("the call failed")
    assert_untouched(flux.transformer)
    assert np.array_equal(denoise(flux, None, 4, {}).images, before.images)


# -- DeepCache ----------------------------------------------------------------------------------


def test_the_tiny_unet_has_levels_enough_for_branch_zero(sd: Any) -> None:
    # Three levels: branch 0 keeps down_blocks[0] and up_blocks[-1] fresh and caches the rest.
    assert len(sd.unet.down_blocks) == len(sd.unet.up_blocks) == 3


def test_deepcache_interval_three_runs_the_deep_blocks_every_third_step(sd: Any) -> None:
    plain = denoise(sd, None, 9, unet_levels(sd))
    cached = denoise(sd, StepCachePlan("deepcache", interval=3), 9, unet_levels(sd))
    again = denoise(sd, StepCachePlan("deepcache", interval=3), 9, unet_levels(sd))

    assert cached.run is not None
    assert cached.run.full_passes == 3
    assert cached.run.cached_passes == 6
    assert cached.ran["mid"] == cached.ran["down1"] == [0, 3, 6]
    # The shallow level runs fresh on every step.
    assert cached.ran["down0"] == cached.ran["up_last"] == list(range(9))
    assert np.isfinite(cached.images).all()
    assert not np.array_equal(cached.images, plain.images)
    assert np.abs(cached.images - plain.images).mean() < 0.02
    assert np.array_equal(again.images, cached.images)


def test_deepcache_interval_one_is_the_uncached_output(sd: Any) -> None:
    plain = denoise(sd, None, 5, unet_levels(sd))
    cached = denoise(sd, StepCachePlan("deepcache", interval=1), 5, unet_levels(sd))

    assert cached.run is not None
    assert cached.run.full_passes == 5
    assert cached.ran["mid"] == list(range(5))
    assert np.array_equal(cached.images, plain.images)


def test_deepcache_non_uniform_puts_as_many_full_passes_earlier(sd: Any) -> None:
    plan = StepCachePlan("deepcache", interval=3, skip_mode="non-uniform")
    cached = denoise(sd, plan, 9, unet_levels(sd))

    full = cached.ran["mid"]
    assert cached.run is not None
    assert cached.run.full_passes == len(full) == 3
    assert full[0] == 0
    assert full != [0, 3, 6]
    gaps = [b - a for a, b in itertools.pairwise(full)]
    assert gaps == sorted(gaps), "denser early"


def test_deepcache_branch_one_keeps_two_levels_fresh(sd: Any) -> None:
    cached = denoise(sd, StepCachePlan("deepcache", interval=3, branch=1), 6, unet_levels(sd))

    assert cached.ran["mid"] == [0, 3]
    assert cached.ran["down1"] == list(range(6))


def test_deepcache_window_and_cap_force_full_passes(sd: Any) -> None:
    plan = StepCachePlan("deepcache", interval=4, stop_step=5, max_consecutive=2)
    cached = denoise(sd, plan, 8, unet_levels(sd))

    # 0 and 4 by the interval, 3 after two cached steps, 5 to 7 from the stop step on.
    assert cached.ran["mid"] == [0, 3, 4, 5, 6, 7]


def test_after_the_call_the_unet_has_no_hooks_and_gives_the_same_output(sd: Any) -> None:
    before = denoise(sd, None, 3, {})
    denoise(sd, StepCachePlan("deepcache", interval=2), 3, {})
    assert_untouched(sd.unet)
    assert np.array_equal(denoise(sd, None, 3, {}).images, before.images)


# -- what applies where -------------------------------------------------------------------------


def test_cache_problem_says_why_a_plan_does_not_fit(flux: Any, sd: Any) -> None:
    unet, transformer = sd.unet, flux.transformer
    assert "UNet" in (cache_problem(unet, StepCachePlan("fbcache")) or "")
    assert "UNet" in (cache_problem(unet, StepCachePlan("teacache")) or "")
    assert "transformer" in (cache_problem(transformer, StepCachePlan("deepcache")) or "")
    assert "branch" in (cache_problem(unet, StepCachePlan("deepcache", branch=2)) or "")
    assert "interval" in (cache_problem(unet, StepCachePlan("deepcache", interval=0)) or "")
    assert cache_problem(unet, StepCachePlan("deepcache", branch=1)) is None
    assert cache_problem(transformer, StepCachePlan("fbcache")) is None
    assert cache_problem(transformer, StepCachePlan("teacache")) is None

    with (
        pytest.raises(UnsupportedCache, match="needs a transformer"),
        step_cache(unet, StepCachePlan("fbcache"), 4),
    ):
        pass
    assert_untouched(unet)


def test_a_second_cache_on_the_same_denoiser_is_refused(flux: Any) -> None:
    with step_cache(flux.transformer, StepCachePlan("fbcache"), 4):
        assert "already" in (cache_problem(flux.transformer, StepCachePlan("teacache")) or "")
    assert_untouched(flux.transformer)


def test_importing_the_module_loads_neither_torch_nor_diffusers() -> None:
    code = (
        "import sys, impasto.backends.step_caches\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_jobs_cache_use_becomes_a_plan_with_its_window_in_steps() -> None:
    from impasto.backends.base import CacheUse

    use = CacheUse("teacache", threshold=0.4, start_percent=25, end_percent=75, max_consecutive=2)
    assert plan_of(use, 8) == StepCachePlan(
        "teacache", threshold=0.4, start_step=2, stop_step=6, max_consecutive=2
    )
    deep = CacheUse("deepcache", interval=4, branch=1, skip_mode="non-uniform", stop_step=9)
    assert plan_of(deep, 10) == StepCachePlan(
        "deepcache", threshold=0.0, interval=4, branch=1, skip_mode="non-uniform", stop_step=9
    )
    with pytest.raises(UnsupportedCache, match="unknown"):
        plan_of(CacheUse("magcache"), 8)
