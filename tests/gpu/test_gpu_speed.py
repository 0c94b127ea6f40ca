"""The speed stack on a CUDA device, on the tiny pipelines (so it runs in seconds): the options
that only a GPU can take are applied (or skipped with the reason the device gives), the
lossless ones keep the pixels, and the step caches skip work on CUDA as they do on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from impasto.backends.speed import apply_speed_settings
from impasto.backends.step_caches import StepCachePlan, step_cache

pytestmark = pytest.mark.gpu

CUDA = "cuda:0"


def load(directory: Path, dtype: Any = torch.float16) -> Any:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(directory, torch_dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(CUDA)


def generate(pipeline: Any, steps: int = 4, **kwargs: Any) -> np.ndarray:
    image = pipeline(
        "a lighthouse at dusk",
        width=256,
        height=256,
        num_inference_steps=steps,
        guidance_scale=2.0,
        generator=torch.Generator(CUDA).manual_seed(7),
        **kwargs,
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def test_channels_last_is_on_by_default_on_cuda_and_lossless_options_keep_the_pixels(
    tiny_pipeline_dir: Path,
) -> None:
    baseline = generate(load(tiny_pipeline_dir))
    pipeline = load(tiny_pipeline_dir)
    report = apply_speed_settings(pipeline, {"fuse_qkv": True}, CUDA)
    assert "channels_last" in report.applied
    assert "fuse_qkv" in report.applied
    # Half precision sums in another order with the fused projection: a few levels at most.
    assert np.abs(generate(pipeline) - baseline).max() <= 4


def test_fp8_and_attention_backends_apply_or_say_why(tiny_pipeline_dir: Path) -> None:
    pipeline = load(tiny_pipeline_dir, torch.bfloat16)
    report = apply_speed_settings(
        pipeline, {"quantize": "fp8", "attention_backend": "_native_cudnn"}, CUDA
    )
    capability = torch.cuda.get_device_capability(0)
    try:
        import torchao  # noqa: F401

        has_torchao = True
    except ImportError:
        has_torchao = False
    if capability >= (8, 9) and has_torchao:
        assert "quantize=fp8" in report.applied, report.skipped
    else:
        assert "quantize" in report.skipped
    # A UNet's attention processors call SDPA themselves: only "native" applies to them.
    assert "attention_backend" in report.skipped
    assert generate(pipeline).shape == (256, 256, 3)


def test_regional_compile_runs_and_the_second_call_matches_the_first(
    tiny_pipeline_dir: Path, tmp_path: Path
) -> None:
    pipeline = load(tiny_pipeline_dir)
    report = apply_speed_settings(pipeline, {"compile": True}, CUDA, cache_dir=tmp_path)
    assert any(label.startswith("compile=") for label in report.applied), report.skipped
    first = generate(pipeline)
    assert np.array_equal(generate(pipeline), first)


def test_deepcache_skips_the_deep_blocks_on_cuda_and_is_deterministic(
    tiny_pipeline_dir: Path,
) -> None:
    pipeline = load(tiny_pipeline_dir)
    plan = StepCachePlan(method="deepcache", interval=3)
    runs = []
    images = []
    for _ in range(2):
        with step_cache(pipeline.unet, plan, 9) as run:
            images.append(generate(pipeline, steps=9, callback_on_step_end=run.chain(None)))
        runs.append(run)
    assert [r.full_passes for r in runs] == [3, 3]
    assert np.array_equal(images[0], images[1])
