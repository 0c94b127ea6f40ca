"""LoraAdapters on the tiny pipeline and its two tiny LoRAs: weights, composition, switching
without reloading, deactivation back to the exact base pixels, LRU eviction, memory accounting
and clear errors for LoRAs that do not fit."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from impasto.backends.loras import (
    DEFAULT_WEIGHT_NAME,
    LoraAdapters,
    LoraLoadError,
    LoraRequest,
    adapter_name,
)
from impasto.backends.tiny_assets import ensure_tiny_asset
from impasto.protocol.errors import InvalidParameter

ONE = "impasto:tiny-lora@1"
TWO = "impasto:tiny-lora@2"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipeline_dir(tiny_pipeline_dir: Path) -> Path:
    return tiny_pipeline_dir


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory, pipeline_dir: Path) -> dict[str, Path]:
    models = tmp_path_factory.mktemp("tiny-loras")
    return {
        ONE: ensure_tiny_asset("lora1", models, pipeline_dir),
        TWO: ensure_tiny_asset("lora2", models, pipeline_dir),
    }


def load_pipeline(pipeline_dir: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def render(pipeline: Any) -> np.ndarray:
    image = pipeline(
        "a lighthouse at dusk",
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(11),
    ).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def never_lora(pipeline_dir: Path) -> np.ndarray:
    """Pixels of a pipeline that never had a LoRA loaded."""
    return render(load_pipeline(pipeline_dir))


@pytest.fixture
def pipeline(pipeline_dir: Path) -> Any:
    return load_pipeline(pipeline_dir)


def differs(a: np.ndarray, b: np.ndarray) -> bool:
    # Clearly, not by a rounding: on average more than one 8-bit level per channel.
    return bool(np.abs(a - b).mean() > 1.0)


def test_weight_zero_gives_the_pixels_of_no_lora(
    pipeline: Any, loras: dict[str, Path], never_lora: np.ndarray
) -> None:
    LoraAdapters().activate(pipeline, [(ONE, loras[ONE], 0.0)])
    assert np.array_equal(render(pipeline), never_lora)


def test_weight_one_changes_pixels_and_weight_scales_the_change(
    pipeline: Any, loras: dict[str, Path], never_lora: np.ndarray
) -> None:
    adapters = LoraAdapters()
    adapters.activate(pipeline, [(ONE, loras[ONE], 1.0)])
    full = render(pipeline)
    adapters.activate(pipeline, [(ONE, loras[ONE], 0.5)])
    half = render(pipeline)
    assert differs(full, never_lora)
    assert differs(half, never_lora)
    assert differs(half, full)
    assert adapters.active == ((ONE, 0.5),)


def test_two_loras_at_once_differ_from_each_alone(pipeline: Any, loras: dict[str, Path]) -> None:
    adapters = LoraAdapters()
    adapters.activate(pipeline, [(ONE, loras[ONE], 1.0)])
    one = render(pipeline)
    adapters.activate(pipeline, [(TWO, loras[TWO], 1.0)])
    two = render(pipeline)
    adapters.activate(pipeline, [(ONE, loras[ONE], 1.0), (TWO, loras[TWO], 1.0)])
    both = render(pipeline)
    assert differs(one, two)
    assert differs(both, one)
    assert differs(both, two)


def test_switching_between_loaded_sets_does_not_reload_and_repeats_the_pixels(
    pipeline: Any, loras: dict[str, Path]
) -> None:
    adapters = LoraAdapters()
    sets = {
        "one": [(ONE, loras[ONE], 1.0)],
        "two": [(TWO, loras[TWO], 0.8)],
        "both": [(ONE, loras[ONE], 0.6), (TWO, loras[TWO], 0.6)],
    }
    first: dict[str, np.ndarray] = {}
    for name, wanted in sets.items():
        adapters.activate(pipeline, wanted)
        first[name] = render(pipeline)
    assert adapters.loads == 2
    for name in ["two", "one", "both", "one", "two"]:
        adapters.activate(pipeline, sets[name])
        assert np.array_equal(render(pipeline), first[name]), name
    assert adapters.loads == 2


def test_deactivating_gives_the_pixels_of_a_pipeline_that_never_saw_a_lora(
    pipeline: Any, loras: dict[str, Path], never_lora: np.ndarray, pipeline_dir: Path
) -> None:
    plain = load_pipeline(pipeline_dir)
    adapters = LoraAdapters()
    adapters.activate(pipeline, [(ONE, loras[ONE], 1.0), (TWO, loras[TWO], 1.0)])
    assert differs(render(pipeline), never_lora)
    adapters.activate(pipeline, [])
    assert adapters.active == ()
    assert np.array_equal(render(pipeline), never_lora)
    prompt = ("a lighthouse", "cpu", 1, False)
    assert torch.equal(pipeline.encode_prompt(*prompt)[0], plain.encode_prompt(*prompt)[0])
    # And back on: the adapters were only switched off, not lost.
    adapters.activate(pipeline, [(ONE, loras[ONE], 1.0)])
    assert differs(render(pipeline), never_lora)
    assert adapters.loads == 2


def test_listing_a_lora_twice_is_one_at_the_summed_weight(
    pipeline: Any, loras: dict[str, Path]
) -> None:
    adapters = LoraAdapters()
    adapters.activate(pipeline, [(ONE, loras[ONE], 0.5), (ONE, loras[ONE], 0.5)])
    twice = render(pipeline)
    adapters.activate(pipeline, [(ONE, loras[ONE], 1.0)])
    assert np.array_equal(twice, render(pipeline))
    assert adapters.loads == 1


def test_least_recently_used_adapter_is_deleted_past_the_limit(
    pipeline: Any, loras: dict[str, Path], never_lora: np.ndarray
) -> None:
    adapters = LoraAdapters(max_resident=1)
    adapters.activate(pipeline, [(ONE, loras[ONE], 1.0)])
    one = render(pipeline)
    adapters.activate(pipeline, [(TWO, loras[TWO], 1.0)])
    assert adapters.resident == (TWO,)
    assert pipeline.get_list_adapters() == {
        "unet": [adapter_name(TWO)],
        "text_encoder": [adapter_name(TWO)],
    }
    adapters.activate(pipeline, [(ONE, loras[ONE], 1.0)])
    assert adapters.loads == 3
    assert np.array_equal(render(pipeline), one)
    # A call that wants more than the limit still gets all it wants.
    adapters.activate(pipeline, [(ONE, loras[ONE], 1.0), (TWO, loras[TWO], 1.0)])
    assert set(adapters.resident) == {ONE, TWO}
    adapters.clear(pipeline)
    assert not adapters.resident
    assert adapters.resident_bytes == 0
    assert np.array_equal(render(pipeline), never_lora)


def test_resident_bytes_are_the_parameter_bytes_of_the_resident_adapters(
    pipeline: Any, loras: dict[str, Path]
) -> None:
    tensors = load_file(str(loras[ONE] / DEFAULT_WEIGHT_NAME))
    one_lora = sum(t.numel() * t.element_size() for t in tensors.values())
    adapters = LoraAdapters(max_resident=2)
    assert adapters.resident_bytes == 0
    adapters.activate(pipeline, [(ONE, loras[ONE], 1.0)])
    assert adapters.resident_bytes == one_lora
    adapters.activate(pipeline, [(TWO, loras[TWO], 1.0)])
    assert adapters.resident_bytes == 2 * one_lora  # both are resident, one is active
    adapters.activate(pipeline, [])
    assert adapters.resident_bytes == 2 * one_lora


def test_unet_only_lora_composes_with_a_full_one(
    pipeline: Any, loras: dict[str, Path], tmp_path: Path
) -> None:
    tensors = load_file(str(loras[TWO] / DEFAULT_WEIGHT_NAME))
    save_file(
        {k: v for k, v in tensors.items() if k.startswith("unet.")},
        str(tmp_path / "unet_only.safetensors"),
    )
    adapters = LoraAdapters()
    adapters.activate(pipeline, [(ONE, loras[ONE], 1.0)])
    one = render(pipeline)
    adapters.activate(pipeline, [(ONE, loras[ONE], 1.0), ("example:unet-only@1", tmp_path, 1.0)])
    assert differs(render(pipeline), one)
    assert pipeline.get_list_adapters()["text_encoder"] == [adapter_name(ONE)]


def test_weights_file_is_found_by_name_or_as_the_only_one(
    pipeline: Any, loras: dict[str, Path], tmp_path: Path
) -> None:
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    shutil.copy(loras[ONE] / DEFAULT_WEIGHT_NAME, renamed / "style.safetensors")
    adapters = LoraAdapters()
    adapters.activate(pipeline, [("example:only-file@1", renamed, 1.0)])
    only_file = render(pipeline)
    adapters.activate(pipeline, [("example:file@1", renamed / "style.safetensors", 1.0)])
    assert np.array_equal(render(pipeline), only_file)
    shutil.copy(loras[TWO] / DEFAULT_WEIGHT_NAME, renamed / "other.safetensors")
    with pytest.raises(LoraLoadError, match="several weights files"):
        adapters.activate(pipeline, [("example:ambiguous@1", renamed, 1.0)])
    adapters.activate(
        pipeline, [LoraRequest("example:named@1", renamed, 1.0, weight_name="style.safetensors")]
    )
    assert np.array_equal(render(pipeline), only_file)


def test_unreadable_file_raises_lora_load_error_and_leaves_the_base_model(
    pipeline: Any, loras: dict[str, Path], never_lora: np.ndarray, tmp_path: Path
) -> None:
    (tmp_path / DEFAULT_WEIGHT_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    adapters = LoraAdapters()
    adapters.activate(pipeline, [(ONE, loras[ONE], 1.0)])
    with pytest.raises(LoraLoadError) as caught:
        adapters.activate(pipeline, [("example:broken@1", tmp_path, 1.0)])
    error = caught.value
    assert isinstance(error, InvalidParameter)
    assert (error.air, error.parameter, error.code) == ("example:broken@1", "lora", "invalidLora")
    assert "damaged" in error.reason
    assert str(tmp_path) not in error.message
    assert adapters.active == ()
    assert adapters.resident == (ONE,)
    assert np.array_equal(render(pipeline), never_lora)


def test_lora_for_another_architecture_raises_lora_load_error_without_leftovers(
    pipeline: Any, loras: dict[str, Path], tmp_path: Path
) -> None:
    tensors = load_file(str(loras[ONE] / DEFAULT_WEIGHT_NAME))
    # The text encoder half made for a wider encoder (hidden size 64, not 32), as a LoRA of
    # another model family would be; the UNet half loads first and must not stay behind.
    wider = {
        key: torch.randn(value.shape[0], 64) if "text_encoder" in key and ".down." in key else value
        for key, value in tensors.items()
    }
    save_file(wider, str(tmp_path / DEFAULT_WEIGHT_NAME))
    adapters = LoraAdapters()
    with pytest.raises(LoraLoadError, match="other shapes"):
        adapters.activate(pipeline, [("example:wider@1", tmp_path, 1.0)])
    assert not any(pipeline.get_list_adapters().values())
    assert adapters.loads == 0
    adapters.activate(pipeline, [(ONE, loras[ONE], 1.0)])  # the pipeline still takes LoRAs
    assert adapters.loads == 1


def test_lora_without_a_matching_layer_raises_lora_load_error(
    pipeline: Any, loras: dict[str, Path], tmp_path: Path
) -> None:
    tensors = load_file(str(loras[ONE] / DEFAULT_WEIGHT_NAME))
    # Keys of a transformer-based model (FLUX-like): nothing for a UNet or a CLIP encoder.
    foreign = {"transformer." + key.partition(".")[2]: value for key, value in tensors.items()}
    save_file(foreign, str(tmp_path / DEFAULT_WEIGHT_NAME))
    with pytest.raises(LoraLoadError, match="none of its layers match"):
        LoraAdapters().activate(pipeline, [("example:flux@1", tmp_path, 1.0)])
    assert not any(pipeline.get_list_adapters().values())


def test_hub_lora_missing_from_the_local_cache_raises_lora_load_error_offline(
    pipeline: Any, tmp_path: Path
) -> None:
    adapters = LoraAdapters(local_files_only=True)
    with pytest.raises(LoraLoadError, match="offline"):
        adapters.activate(pipeline, [("example:hub@1", "example/no-such-lora", 1.0)])
    named = LoraRequest("example:hub@1", "example/no-such-lora", 1.0, "lora.safetensors")
    with pytest.raises(LoraLoadError, match="could not be found"):
        adapters.activate(pipeline, [named])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LoraLoadError, match=r"no \.safetensors weights file"):
        adapters.activate(pipeline, [("example:empty@1", empty, 1.0)])
    assert adapters.loads == 0


def test_adapter_names_are_peft_safe_and_distinct() -> None:
    names = {adapter_name(air) for air in ["a:b@1", "a_b@1", "a:b@2", "civitai:101055@128078"]}
    assert len(names) == 4
    assert not any(set(name) & set(".:@_") for name in names)
    assert "lora_" not in adapter_name("my_lora_v2:1@1")
    assert adapter_name("a:b@1") == adapter_name("a:b@1")
