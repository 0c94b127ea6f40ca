"""The upscalers: tiled blending against a fake model, then the real Swin2SR and Stable
Diffusion x4 upscaler code paths on tiny random-weight models on a real CPU worker."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from PIL import Image

from impasto.backends.devices import DeviceWorker
from impasto.backends.diffusers_loading import ModelUnavailable
from impasto.backends.entries import ModelEntry
from impasto.backends.utility.base import CaptionRequest, UpscaleRequest
from impasto.backends.utility.tiling import tile_grid, tile_starts, upscale_tiled
from impasto.backends.utility.tiny_upscalers import ensure_tiny_sd_upscaler, ensure_tiny_swin2sr
from impasto.backends.utility.upscalers import DiffusionUpscaler, Swin2SRUpscaler, model_passes
from impasto.protocol.errors import InvalidParameter
from impasto.protocol.rules import ModelRules, SizeRule

T = TypeVar("T")


def run(awaitable: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(awaitable, 60)

    return asyncio.run(bounded())


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def nearest(
    scale: int, calls: list[tuple[int, int]] | None = None
) -> Callable[[Image.Image], Image.Image]:
    def run_tile(tile: Image.Image) -> Image.Image:
        if calls is not None:
            calls.append(tile.size)
        return tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST)

    return run_tile


def entry(air: str, **settings: Any) -> ModelEntry:
    return ModelEntry(
        air=air,
        name=air,
        architecture="upscaler",
        backend="utility",
        rules=ModelRules(air=air, sizes=SizeRule(default=(64, 64))),
        settings=settings,
    )


# -- tiling -----------------------------------------------------------------------------------


def test_tile_starts_end_at_the_edge_with_the_last_tile_moved_back() -> None:
    assert tile_starts(100, 40, 8) == [0, 32, 60]
    assert tile_starts(40, 40, 8) == [0]
    assert tile_starts(41, 40, 8) == [0, 1]


def test_tile_grid_counts_tiles_per_axis() -> None:
    boxes = tile_grid(100, 30, 40, 8)
    assert len(boxes) == 3
    assert boxes[-1] == (60, 0, 100, 30)
    assert len(tile_grid(100, 100, 40, 8)) == 9


def test_overlap_must_be_smaller_than_the_tile() -> None:
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 16, 16)


@pytest.mark.parametrize(("width", "height"), [(53, 37), (64, 64), (17, 90)])
def test_tiled_upscale_equals_the_untiled_one(width: int, height: int) -> None:
    image = noise_image(width, height)
    calls: list[tuple[int, int]] = []
    tiled = upscale_tiled(image, 3, nearest(3, calls), tile=20, overlap=6)
    whole = nearest(3)(image)
    assert tiled.size == (width * 3, height * 3)
    assert tiled.mode == "RGB"
    assert len(calls) == len(tile_grid(width, height, 20, 6)) > 1
    assert np.abs(np.asarray(tiled, np.int16) - np.asarray(whole, np.int16)).max() <= 1


def test_an_image_within_one_tile_is_run_whole() -> None:
    calls: list[tuple[int, int]] = []
    result = upscale_tiled(noise_image(31, 20), 2, nearest(2, calls), tile=32, overlap=8)
    assert calls == [(31, 20)]
    assert result.size == (62, 40)


def test_overlapping_tiles_are_feathered_not_cut() -> None:
    # Each tile comes back a flat colour of its own; blended, the result ramps between them.
    colours = iter([0, 240])

    def flat(tile: Image.Image) -> Image.Image:
        return Image.new("RGB", (tile.width * 2, tile.height * 2), (next(colours),) * 3)

    row = np.asarray(upscale_tiled(noise_image(40, 8), 2, flat, tile=24, overlap=8))[0, :, 0]
    overlap = row[32:48]
    assert row[0] == 0
    assert row[-1] == 240
    assert np.all(np.diff(overlap.astype(int)) >= 0)
    assert np.abs(np.diff(row.astype(int))).max() < 30


def test_a_tile_of_the_wrong_size_is_an_error() -> None:
    with pytest.raises(ValueError, match="came back"):
        upscale_tiled(noise_image(10, 10), 2, nearest(3), tile=16, overlap=4)


def test_model_passes() -> None:
    assert model_passes(2, 2) == 1
    assert model_passes(2, 4) == 2
    assert model_passes(2, 8) == 3
    assert model_passes(4, 2) == 1
    assert model_passes(2, 3) == 1
    assert model_passes(4, 16) == 2


# -- the models -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("upscalers")
    ensure_tiny_swin2sr(root / "swin2sr-x2", 2)
    ensure_tiny_swin2sr(root / "swin2sr-x4", 4)
    ensure_tiny_sd_upscaler(root / "sd-x4")
    return root


@pytest.fixture
def worker() -> Iterator[DeviceWorker]:
    device = DeviceWorker("cpu")
    yield device
    device.shutdown()


def upscale(model: Swin2SRUpscaler | DiffusionUpscaler, request: UpscaleRequest) -> Image.Image:
    result = run(model.run(request))
    assert isinstance(result, Image.Image)
    return result


@pytest.mark.parametrize(
    ("native", "factor"),
    [(2, 2), (2, 4), (2, 3), (4, 4), (4, 2)],
    ids=["one-pass", "two-passes", "resized-up", "native-x4", "resized-down"],
)
def test_swin2sr_gives_exactly_factor_times_the_input(
    tiny_dir: Path, worker: DeviceWorker, native: int, factor: int
) -> None:
    model = Swin2SRUpscaler(
        entry(f"test:swin2sr-x{native}@1"), tiny_dir / f"swin2sr-x{native}", worker, offline=True
    )
    result = upscale(model, UpscaleRequest(image=noise_image(23, 17), factor=factor))
    assert result.size == (23 * factor, 17 * factor)
    assert result.mode == "RGB"
    assert worker.models.resident() == [f"test:swin2sr-x{native}@1"]
    run(model.close())
    assert worker.models.resident() == []


def test_swin2sr_tiles_a_large_input(tiny_dir: Path, worker: DeviceWorker) -> None:
    model = Swin2SRUpscaler(
        entry("test:swin2sr@1", tile=16, tile_overlap=4), tiny_dir / "swin2sr-x2", worker
    )
    result = upscale(model, UpscaleRequest(image=noise_image(37, 29), factor=2))
    assert result.size == (74, 58)
    # A second request reuses the loaded model; after close the next request loads again.
    assert upscale(model, UpscaleRequest(image=noise_image(8, 8), factor=2)).size == (16, 16)
    run(model.close())
    assert upscale(model, UpscaleRequest(image=noise_image(8, 8), factor=2)).size == (16, 16)
    run(model.close())


def test_upscalers_take_only_upscale_requests(tiny_dir: Path, worker: DeviceWorker) -> None:
    model = Swin2SRUpscaler(entry("test:swin2sr@1"), tiny_dir / "swin2sr-x2", worker)
    with pytest.raises(TypeError):
        run(model.run(CaptionRequest(image=noise_image(8, 8))))
    with pytest.raises(InvalidParameter) as caught:
        run(model.run(UpscaleRequest(image=noise_image(8, 8), factor=0)))
    assert caught.value.parameter == "upscaleFactor"


def test_diffusion_upscaler_sizes_and_repeatable_seed(tiny_dir: Path, worker: DeviceWorker) -> None:
    air = "test:sd-x4-upscaler@1"
    model = DiffusionUpscaler(
        entry(air, steps=2, tile=24, tile_overlap=4), tiny_dir / "sd-x4", worker, offline=True
    )
    image = noise_image(30, 21)
    request = UpscaleRequest(image=image, factor=4, prompt="a cat", seed=7, cfg_scale=3.0)
    first = upscale(model, request)
    assert first.size == (120, 84)
    assert first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(upscale(model, request)))
    other_seed = upscale(model, UpscaleRequest(image=image, factor=4, seed=8, steps=1))
    assert not np.array_equal(np.asarray(first), np.asarray(other_seed))
    halved = upscale(model, UpscaleRequest(image=image, factor=2, seed=7, negative_prompt="dog"))
    assert halved.size == (60, 42)
    assert worker.models.resident() == [air]
    run(model.close())
    assert worker.models.resident() == []


def test_diffusion_upscaler_rejects_zero_steps(tiny_dir: Path, worker: DeviceWorker) -> None:
    model = DiffusionUpscaler(entry("test:sd@1"), tiny_dir / "sd-x4", worker)
    with pytest.raises(InvalidParameter) as caught:
        run(model.run(UpscaleRequest(image=noise_image(8, 8), factor=4, steps=0)))
    assert caught.value.parameter == "steps"


def test_a_model_that_cannot_be_loaded_is_unavailable(tmp_path: Path, worker: DeviceWorker) -> None:
    model = Swin2SRUpscaler(entry("test:missing@1"), tmp_path / "missing", worker, offline=True)
    with pytest.raises(ModelUnavailable) as caught:
        run(model.run(UpscaleRequest(image=noise_image(8, 8), factor=2)))
    assert caught.value.parameter == "model"
    assert worker.models.resident() == []
