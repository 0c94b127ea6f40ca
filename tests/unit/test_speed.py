"""The speed options on the tiny pipeline on CPU: what is lossless stays within one level of
255, what this machine cannot take is skipped with the reason and the pipeline still runs."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from impasto.backends.speed import (
    MEGA_CACHE_FILE,
    apply_speed_settings,
    check_speed_settings,
    prepare_call,
    save_compile_cache,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EAGER = {"channels_last": False}


def load(directory: Path) -> Any:
    import diffusers

    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(str(directory))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipeline: Any) -> np.ndarray:
    import torch

    generator = torch.Generator("cpu").manual_seed(7)
    image = pipeline(
        "a red fox", width=64, height=64, num_inference_steps=2, generator=generator
    ).images[0]
    return np.asarray(image).astype(np.int16)


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


@pytest.fixture(scope="module")
def baseline(tiny_pipeline_dir: Path) -> np.ndarray:
    """The image of the pipeline as diffusers loads it, with no option applied."""
    return generate(load(tiny_pipeline_dir))


@pytest.fixture
def pipeline(tiny_pipeline_dir: Path) -> Any:
    return load(tiny_pipeline_dir)


def test_defaults_apply_nothing_on_the_cpu(pipeline: Any, baseline: np.ndarray) -> None:
    # channels_last is on by default for CUDA only: on this CPU it was 7 % slower.
    report = apply_speed_settings(pipeline, {}, "cpu")
    assert report.applied == []
    assert report.skipped == {}
    assert max_difference(generate(pipeline), baseline) == 0


def test_channels_last_is_within_one_level(pipeline: Any, baseline: np.ndarray) -> None:
    report = apply_speed_settings(pipeline, {"channels_last": True}, "cpu")
    assert report.applied == ["channels_last"]
    # Measured: 1 (a few pixels one level apart; convolutions sum in another order).
    assert max_difference(generate(pipeline), baseline) <= 1


def test_nothing_applied_is_bit_identical(pipeline: Any, baseline: np.ndarray) -> None:
    report = apply_speed_settings(pipeline, EAGER, "cpu")
    assert report.applied == []
    assert max_difference(generate(pipeline), baseline) == 0


def test_fuse_qkv_is_lossless(pipeline: Any, baseline: np.ndarray) -> None:
    report = apply_speed_settings(pipeline, {**EAGER, "fuse_qkv": True}, "cpu")
    assert report.applied == ["fuse_qkv"]
    processors = {type(p).__name__ for p in pipeline.unet.attn_processors.values()}
    assert processors == {"FusedAttnProcessor2_0"}
    # Measured: 0 (one matmul over the concatenated weights gives the same sums).
    assert max_difference(generate(pipeline), baseline) <= 1


def test_native_attention_backend_is_applied(pipeline: Any, baseline: np.ndarray) -> None:
    report = apply_speed_settings(pipeline, {**EAGER, "attention_backend": "native"}, "cpu")
    assert report.applied == ["attention_backend=native"]
    assert max_difference(generate(pipeline), baseline) == 0


@pytest.mark.parametrize(
    ("backend", "why"),
    [("flash", "flash-attn"), ("_flash_3", "Flash Attention 3"), ("_native_cudnn", "CUDA")],
)
def test_backend_this_machine_lacks_is_skipped_and_sdpa_kept(
    pipeline: Any, baseline: np.ndarray, backend: str, why: str
) -> None:
    report = apply_speed_settings(pipeline, {**EAGER, "attention_backend": backend}, "cpu")
    assert report.applied == []
    reason = report.skipped["attention_backend"]
    assert "needs a CUDA device" in reason
    assert why in reason
    assert "SDPA kept" in reason
    assert max_difference(generate(pipeline), baseline) == 0


def tiny_flux_transformer() -> Any:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
    )


def dispatching_processors(model: Any) -> list[Any]:
    return [p for p in model.attn_processors.values() if hasattr(p, "_attention_backend")]


def test_backend_is_set_on_a_dispatching_model_only() -> None:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    transformer = tiny_flux_transformer()
    before = _AttentionBackendRegistry.get_active_backend()[0]
    report = apply_speed_settings(
        SimpleNamespace(transformer=transformer),
        {**EAGER, "attention_backend": "_native_math"},
        "cpu",
    )
    assert report.applied == ["attention_backend=_native_math"]
    assert {str(p._attention_backend.value) for p in dispatching_processors(transformer)} == {
        "_native_math"
    }
    # The process-wide default, which other models use, is left as it was.
    assert _AttentionBackendRegistry.get_active_backend()[0] == before


def test_backend_failing_its_test_call_is_reverted(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers.models import attention_dispatch

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(attention_dispatch, "dispatch_attention_fn", unavailable)
    transformer = tiny_flux_transformer()
    report = apply_speed_settings(
        SimpleNamespace(transformer=transformer), {**EAGER, "attention_backend": "flex"}, "cpu"
    )
    assert "no kernel for this GPU" in report.skipped["attention_backend"]
    assert {p._attention_backend for p in dispatching_processors(transformer)} == {None}


def test_fp8_is_skipped_on_cpu(pipeline: Any, baseline: np.ndarray) -> None:
    report = apply_speed_settings(pipeline, {**EAGER, "quantize": "fp8"}, "cpu")
    assert report.applied == []
    assert "CUDA" in report.skipped["quantize"]
    if importlib.util.find_spec("torchao") is None:
        assert "torchao is not installed" in report.skipped["quantize"]
    assert max_difference(generate(pipeline), baseline) == 0


@pytest.mark.skipif(importlib.util.find_spec("torchao") is not None, reason="torchao installed")
@pytest.mark.parametrize(("capability", "why"), [((9, 0), ""), ((8, 6), "has 8.6")])
def test_fp8_on_a_gpu_needs_torchao_and_ada(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], why: str
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    stub = SimpleNamespace(unet=torch.nn.Linear(4, 4))
    report = apply_speed_settings(stub, {**EAGER, "quantize": "fp8"}, "cuda:0")
    assert "torchao is not installed" in report.skipped["quantize"]
    assert why in report.skipped["quantize"]


class CompileSpy:
    """Stands in for a compile method: records its keyword arguments, compiles nothing."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)


def spy_on_compile(monkeypatch: pytest.MonkeyPatch, module: Any) -> tuple[CompileSpy, CompileSpy]:
    regional, whole = CompileSpy(), CompileSpy()
    monkeypatch.setattr(module, "compile_repeated_blocks", regional, raising=False)
    monkeypatch.setattr(module, "compile", whole)
    return regional, whole


def test_regional_compile_uses_the_repeated_blocks(
    pipeline: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert type(pipeline.unet)._repeated_blocks  # UNet2DConditionModel declares them
    regional, whole = spy_on_compile(monkeypatch, pipeline.unet)
    report = apply_speed_settings(pipeline, {**EAGER, "compile": True}, "cpu")
    assert report.applied == ["compile=regional"]
    assert regional.calls == [{"mode": "default", "fullgraph": True}]
    assert whole.calls == []


def test_whole_module_compile_without_repeated_blocks(
    pipeline: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(type(pipeline.unet), "_repeated_blocks", [])
    regional, whole = spy_on_compile(monkeypatch, pipeline.unet)
    report = apply_speed_settings(
        pipeline, {**EAGER, "compile": True, "compile_mode": "max-autotune"}, "cpu"
    )
    assert report.applied == ["compile=module"]
    assert whole.calls == [{"mode": "max-autotune", "fullgraph": False}]
    assert regional.calls == []


def test_cuda_graphs_are_skipped_on_cpu(pipeline: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    regional, _ = spy_on_compile(monkeypatch, pipeline.unet)
    settings = {**EAGER, "compile": True, "cuda_graphs": True, "batch_invariant": True}
    report = apply_speed_settings(pipeline, settings, "cpu")
    assert "needs a CUDA device" in report.skipped["cuda_graphs"]
    assert report.applied == ["compile=regional"]
    assert regional.calls[0]["mode"] == "default"


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        ({"cuda_graphs": True, "batch_invariant": True}, "needs compile = true"),
        ({"cuda_graphs": True, "compile": True}, "needs batch_invariant = true"),
    ],
)
def test_cuda_graphs_need_compile_and_batch_invariance(
    monkeypatch: pytest.MonkeyPatch, settings: dict[str, Any], why: str
) -> None:
    import torch

    module = torch.nn.Linear(4, 4)
    regional, whole = spy_on_compile(monkeypatch, module)
    report = apply_speed_settings(SimpleNamespace(unet=module), {**EAGER, **settings}, "cuda:0")
    assert why in report.skipped["cuda_graphs"]
    assert [call["mode"] for call in regional.calls + whole.calls] == (
        ["max-autotune-no-cudagraphs"] if settings.get("compile") else []
    )


def test_cuda_graphs_compile_with_max_autotune(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    module = torch.nn.Linear(4, 4)
    _, whole = spy_on_compile(monkeypatch, module)
    settings = {**EAGER, "compile": True, "cuda_graphs": True, "batch_invariant": True}
    report = apply_speed_settings(SimpleNamespace(unet=module), settings, "cuda:0")
    assert report.applied == ["cuda_graphs", "compile=module"]
    assert whole.calls == [{"mode": "max-autotune", "fullgraph": False}]


def test_compile_raising_is_skipped_and_eager_runs(
    pipeline: Any, baseline: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    def no_compiler(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    report = apply_speed_settings(pipeline, {**EAGER, "compile": True}, "cpu")
    assert report.applied == []
    assert "no C++ compiler found" in report.skipped["compile"]
    assert "cuda_graphs" not in report.skipped  # not asked for
    assert all(m._compiled_call_impl is None for m in pipeline.unet.modules())
    assert max_difference(generate(pipeline), baseline) == 0


def test_compile_failing_at_the_first_call_falls_back_to_eager(
    pipeline: Any, baseline: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    real_compile = torch.compile

    def failing_backend(graph: Any, inputs: Any) -> Any:
        raise RuntimeError("no C++ compiler found")

    def compile_with_failing_backend(model: Any, **kwargs: Any) -> Any:
        return real_compile(model, backend=failing_backend, fullgraph=kwargs.get("fullgraph"))

    monkeypatch.setattr(torch, "compile", compile_with_failing_backend)
    try:
        report = apply_speed_settings(pipeline, {**EAGER, "compile": True}, "cpu")
        assert report.applied == ["compile=regional"]  # torch.compile is lazy
        image = generate(pipeline)  # dynamo traces one block (~3 s), its backend raises
    finally:
        torch._dynamo.reset()
    assert report.applied == []
    assert "no C++ compiler found" in report.skipped["compile"]
    assert all(m._compiled_call_impl is None for m in pipeline.unet.modules())
    assert max_difference(image, baseline) == 0


def test_cuda_graphs_go_with_a_failed_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    def no_compiler(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    settings = {**EAGER, "compile": True, "cuda_graphs": True, "batch_invariant": True}
    report = apply_speed_settings(SimpleNamespace(unet=torch.nn.Linear(4, 4)), settings, "cuda:0")
    assert report.applied == []
    assert report.skipped["cuda_graphs"] == "compile failed"


def test_compile_cache_dir_is_set_unless_the_operator_set_one(
    pipeline: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import torch._inductor.config as inductor_config

    spy_on_compile(monkeypatch, pipeline.unet)
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    ours = tmp_path / ".compile-cache"
    report = apply_speed_settings(pipeline, {**EAGER, "compile": True}, "cpu", cache_dir=ours)
    assert report.applied == [f"compile_cache={ours}", "compile=regional"]
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(ours)
    assert inductor_config.fx_graph_cache is True

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "operator"))
    apply_speed_settings(pipeline, {**EAGER, "compile": True}, "cpu", cache_dir=ours)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "operator")


def test_saved_compile_artifacts_are_loaded_at_the_next_start(
    pipeline: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import torch

    loaded: list[bytes] = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", loaded.append)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert save_compile_cache(tmp_path) == tmp_path / MEGA_CACHE_FILE
    spy_on_compile(monkeypatch, pipeline.unet)
    apply_speed_settings(pipeline, {**EAGER, "compile": True}, "cpu", cache_dir=tmp_path)
    assert loaded == [b"artifacts"]


def test_nothing_to_save_writes_no_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: None)
    assert save_compile_cache(tmp_path) is None
    assert not (tmp_path / MEGA_CACHE_FILE).exists()


def test_prepare_call_tiles_big_images_and_slices_batches(pipeline: Any) -> None:
    settings = {"vae_tiling": True, "vae_slicing": True}
    vae = pipeline.vae
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated diffusers API
        prepare_call(pipeline, settings, 2048, 2048, 1)
        assert (vae.use_tiling, vae.use_slicing) == (True, False)
        prepare_call(pipeline, settings, 512, 512, 2)
        assert (vae.use_tiling, vae.use_slicing) == (False, True)
        prepare_call(pipeline, {**settings, "vae_tiling_min_pixels": 512 * 512}, 512, 512, 1)
        assert (vae.use_tiling, vae.use_slicing) == (True, False)
        prepare_call(pipeline, {}, 2048, 2048, 4)
        assert (vae.use_tiling, vae.use_slicing) == (False, False)


def test_check_speed_settings_names_each_bad_key() -> None:
    problems = check_speed_settings(
        {
            "compile": "yes",
            "fuse_qkv": 1,
            "attention_backend": "flashy",
            "quantize": "int4",
            "compile_mode": "fast",
            "vae_tiling_min_pixels": True,
            "steps": "not a speed key",
        }
    )
    keys = sorted(problem.split(":")[0] for problem in problems)
    assert keys == [
        "settings.attention_backend",
        "settings.compile",
        "settings.compile_mode",
        "settings.fuse_qkv",
        "settings.quantize",
        "settings.vae_tiling_min_pixels",
    ]
    assert any("'flashy'" in problem and "_flash_3" in problem for problem in problems)


def test_check_speed_settings_accepts_good_ones() -> None:
    good = {
        "compile": True,
        "compile_mode": "max-autotune",
        "attention_backend": "_flash_3",
        "quantize": "fp8",
        "vae_tiling_min_pixels": 2048 * 2048,
        "cuda_graphs": False,
    }
    assert check_speed_settings(good) == []


def test_an_invalid_setting_is_skipped_at_load(pipeline: Any) -> None:
    report = apply_speed_settings(pipeline, {"fuse_qkv": "yes"}, "cpu")
    assert report.applied == []
    assert "must be true or false" in report.skipped["fuse_qkv"]
