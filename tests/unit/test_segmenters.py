"""BackgroundRemover on the tiny remote-code segmenter: loaded offline through
AutoModelForImageSegmentation(trust_remote_code=True), as BiRefNet is, on a real CPU worker."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from impasto.backends.devices import DeviceWorker
from impasto.backends.entries import ModelEntry, any_size
from impasto.backends.utility.base import BackgroundRequest, CaptionRequest
from impasto.backends.utility.segmenters import BackgroundRemover
from impasto.backends.utility.tiny_segmenter import (
    TINY_SEGMENTER_SETTINGS,
    ensure_tiny_segmenter,
)
from impasto.protocol.errors import InferenceError, InvalidParameter
from impasto.protocol.rules import ModelRules

AIR = "impasto:tiny-segmenter@1"
WIDTH, HEIGHT = 48, 32


@pytest.fixture(scope="module")
def tiny_segmenter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_segmenter(tmp_path_factory.mktemp("models") / "impasto-tiny-segmenter")


@pytest.fixture
def worker(one_torch_thread: None) -> Iterator[DeviceWorker]:
    w = DeviceWorker("cpu")
    yield w
    w.shutdown()


def entry(**settings: Any) -> ModelEntry:
    return ModelEntry(
        air=AIR,
        name="tiny segmenter",
        architecture="birefnet",
        backend="local",
        rules=ModelRules(air=AIR, sizes=any_size((64, 64))),
        settings={**TINY_SEGMENTER_SETTINGS, **settings},
        category="background-removal",
    )


def photo() -> Image.Image:
    image = Image.new("RGB", (WIDTH, HEIGHT), (30, 60, 90))
    ImageDraw.Draw(image).ellipse((10, 2, 38, 30), fill=(240, 220, 200))
    noise = np.random.default_rng(3).integers(-20, 20, (HEIGHT, WIDTH, 3))
    return Image.fromarray(
        np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    )


def remove(remover: BackgroundRemover, **options: Any) -> Image.Image:
    async def go() -> Image.Image:
        out = await remover.run(BackgroundRequest(image=photo(), **options))
        assert isinstance(out, Image.Image)
        return out

    return asyncio.run(go())


def test_the_tiny_segmenter_loads_offline_through_the_auto_class(tiny_segmenter: Path) -> None:
    import torch
    from transformers import AutoModelForImageSegmentation

    model = AutoModelForImageSegmentation.from_pretrained(
        tiny_segmenter, trust_remote_code=True, local_files_only=True
    )
    with torch.inference_mode():
        outputs = model(torch.zeros(1, 3, 40, 56))
    assert isinstance(outputs, list)
    assert outputs[-1].shape == (1, 1, 40, 56)


def test_cut_out_is_rgba_of_the_input_size_with_a_varied_alpha(
    tiny_segmenter: Path, worker: DeviceWorker
) -> None:
    remover = BackgroundRemover(entry(), tiny_segmenter, worker, offline=True)
    cut = remove(remover)
    assert cut.mode == "RGBA"
    assert cut.size == (WIDTH, HEIGHT)
    alpha = np.asarray(cut)[..., 3]
    assert len(np.unique(alpha)) > 10
    assert np.array_equal(np.asarray(cut)[..., :3], np.asarray(photo()))
    # Loaded once, on first use, and accounted to the worker's model cache.
    assert worker.models.resident() == [AIR]
    assert worker.models.used_bytes > 0
    asyncio.run(remover.close())
    assert worker.models.resident() == []


def test_return_only_mask_gives_an_rgb_mask_of_the_input_size(
    tiny_segmenter: Path, worker: DeviceWorker
) -> None:
    remover = BackgroundRemover(entry(), tiny_segmenter, worker, offline=True)
    mask = remove(remover, return_only_mask=True)
    cut = remove(remover)
    assert mask.mode == "RGB"
    assert mask.size == (WIDTH, HEIGHT)
    channels = np.asarray(mask)
    assert np.array_equal(channels[..., 0], channels[..., 1])
    # The same mask as the cut-out's alpha (the model is deterministic).
    assert np.array_equal(channels[..., 0], np.asarray(cut)[..., 3])


def test_background_colour_gives_an_opaque_composite(
    tiny_segmenter: Path, worker: DeviceWorker
) -> None:
    remover = BackgroundRemover(entry(), tiny_segmenter, worker, offline=True)
    out = remove(remover, background=(0, 255, 0, 255))
    assert out.mode == "RGBA"
    assert out.size == (WIDTH, HEIGHT)
    assert np.all(np.asarray(out)[..., 3] == 255)


def test_post_process_mask_binarises_and_alpha_matting_keeps_the_size(
    tiny_segmenter: Path, worker: DeviceWorker
) -> None:
    remover = BackgroundRemover(entry(), tiny_segmenter, worker, offline=True)
    cleaned = remove(remover, post_process_mask=True, return_only_mask=True)
    assert set(np.unique(np.asarray(cleaned))) <= {0, 255}
    matted = remove(
        remover,
        alpha_matting=True,
        foreground_threshold=200,
        background_threshold=60,
        erode_size=2,
    )
    assert matted.mode == "RGBA"
    assert matted.size == (WIDTH, HEIGHT)


def test_other_resolutions_and_a_rectangular_one_run(
    tiny_segmenter: Path, worker: DeviceWorker
) -> None:
    remover = BackgroundRemover(entry(resolution=[96, 48]), tiny_segmenter, worker, offline=True)
    assert remove(remover).size == (WIDTH, HEIGHT)


def test_out_of_range_matting_knobs_are_invalid_parameters(
    tiny_segmenter: Path, worker: DeviceWorker
) -> None:
    remover = BackgroundRemover(entry(), tiny_segmenter, worker, offline=True)
    with pytest.raises(InvalidParameter) as caught:
        remove(remover, alpha_matting=True, erode_size=300)
    assert caught.value.parameter == "alphaMattingErodeSize"


def test_other_requests_are_a_type_error(tiny_segmenter: Path, worker: DeviceWorker) -> None:
    remover = BackgroundRemover(entry(), tiny_segmenter, worker, offline=True)
    with pytest.raises(TypeError):
        asyncio.run(remover.run(CaptionRequest(image=photo())))


def test_bad_settings_are_rejected_at_construction(
    tiny_segmenter: Path, worker: DeviceWorker
) -> None:
    with pytest.raises(ValueError, match="resolution"):
        BackgroundRemover(entry(resolution="big"), tiny_segmenter, worker)
    with pytest.raises(ValueError, match="dtype"):
        BackgroundRemover(entry(dtype="int8"), tiny_segmenter, worker)


def test_close_before_any_run_is_fine(tiny_segmenter: Path, worker: DeviceWorker) -> None:
    remover = BackgroundRemover(entry(), tiny_segmenter, worker, offline=True)
    asyncio.run(remover.close())
    assert worker.models.resident() == []


def test_remote_code_that_never_calls_post_init_still_loads(
    tiny_segmenter: Path,
    worker: DeviceWorker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Remote code written for transformers 4 (BiRefNet-based repositories) may skip
    # post_init(), which transformers 5 depends on.
    legacy = tmp_path / "legacy-segmenter"
    shutil.copytree(tiny_segmenter, legacy)
    modeling = legacy / "modeling_tiny_segmenter.py"
    source = modeling.read_text()
    assert "        self.post_init()\n" in source
    modeling.write_text(source.replace("        self.post_init()\n", ""))
    original = BackgroundRemover(entry(), tiny_segmenter, worker, offline=True)
    remover = BackgroundRemover(entry(), legacy, worker, offline=True)
    with caplog.at_level(logging.WARNING):
        mask = remove(remover, return_only_mask=True)
    assert "post_init" in caplog.text
    # The saved weights were loaded, not fresh random ones.
    assert np.array_equal(np.asarray(mask), np.asarray(remove(original, return_only_mask=True)))
    asyncio.run(remover.close())
    asyncio.run(original.close())


def test_logits_are_found_in_lists_model_outputs_and_bare_tensors() -> None:
    import torch

    from impasto.backends.utility.segmenters import _logits

    full = torch.zeros(1, 1, 8, 8)
    assert _logits([torch.zeros(1, 1, 2, 2), full]) is full
    assert _logits(SimpleNamespace(logits=full)) is full
    assert _logits(torch.zeros(1, 8, 8)).shape == (1, 1, 8, 8)
    with pytest.raises(InferenceError):
        _logits(torch.zeros(1, 3, 8, 8))
    with pytest.raises(InferenceError):
        _logits({"masks": full})
