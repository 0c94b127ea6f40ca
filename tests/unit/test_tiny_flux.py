"""The tiny FLUX.1 pipeline: built reproducibly in code, loaded by diffusers' own FLUX loaders,
and served as `impasto:tiny-flux@1` through the normal backend path."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from impasto.backends.base import GeneratedImage, GenerationJob
from impasto.backends.devices import DevicePool, DeviceWorker
from impasto.backends.diffusers_backend import DiffusersBackend
from impasto.backends.factory import BackendContext, weights_source
from impasto.backends.registry import ModelRegistry
from impasto.backends.tiny_flux import ensure_tiny_flux

AIR = "impasto:tiny-flux@1"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models_dir(tiny_flux_dir: Path) -> Path:
    return tiny_flux_dir.parent


@pytest.fixture(scope="module")
def flux_dir(tiny_flux_dir: Path) -> Path:
    return tiny_flux_dir


@pytest.fixture
def worker() -> Iterator[DeviceWorker]:
    w = DeviceWorker("cpu")
    yield w
    w.shutdown()


def weights_digest(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*.safetensors"))
    }


def render(pipeline: Any, seed: int = 7) -> np.ndarray:
    image = pipeline(
        "a lighthouse at dusk",
        width=64,
        height=64,
        num_inference_steps=3,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]
    assert image.size == (64, 64)
    return np.asarray(image, dtype=np.int16)


def test_rebuilding_gives_the_same_weights_and_leaves_the_global_rng_alone(
    flux_dir: Path, tmp_path: Path
) -> None:
    state = torch.get_rng_state()
    again = ensure_tiny_flux(tmp_path / "again")
    assert torch.equal(torch.get_rng_state(), state)
    digest = weights_digest(flux_dir)
    assert set(digest) == {
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    }
    assert weights_digest(again) == digest
    assert not list(tmp_path.glob(".tiny-*")), "staging directory left behind"


def test_a_current_copy_is_reused_not_rebuilt(flux_dir: Path) -> None:
    marker = flux_dir / "impasto-tiny.json"
    stamp = marker.stat().st_mtime_ns
    assert ensure_tiny_flux(flux_dir) == flux_dir
    assert marker.stat().st_mtime_ns == stamp


def test_flux_loaders_load_it_and_the_same_seed_gives_the_same_pixels(flux_dir: Path) -> None:
    from diffusers import AutoPipelineForText2Image, FluxPipeline, FluxTransformer2DModel

    pipeline = AutoPipelineForText2Image.from_pretrained(flux_dir)
    assert isinstance(pipeline, FluxPipeline)
    assert isinstance(pipeline.transformer, FluxTransformer2DModel)
    assert pipeline.transformer.config.in_channels == 64
    assert pipeline.vae.config.latent_channels == 16
    pipeline.set_progress_bar_config(disable=True)

    first = render(pipeline)
    assert np.array_equal(render(pipeline), first)
    assert not np.array_equal(render(pipeline, seed=8), first)
    assert np.array_equal(render(FluxPipeline.from_pretrained(flux_dir).to("cpu")), first)


def test_the_entry_follows_the_flux_rules(flux_dir: Path) -> None:
    entry = ModelRegistry.load(None).resolve(AIR).target
    assert entry.architecture.startswith("flux")
    for parameter in ("negativePrompt", "clipSkip", "promptWeighting"):
        assert not entry.rules.accepts(parameter)
    assert entry.settings["guidance_scale"] == 0.0


def test_the_entry_generates_through_the_diffusers_backend(
    models_dir: Path, worker: DeviceWorker
) -> None:
    entry = ModelRegistry.load(None).resolve(AIR).target
    context = BackendContext(models_dir=models_dir, devices=DevicePool(["cpu"]), max_batch_size=2)
    source = weights_source(entry, context)
    assert source == models_dir / "impasto-tiny-flux"
    backend = DiffusersBackend(entry, source, [worker], max_batch_size=2)

    def job(index: int, seed: int, width: int = 64, height: int = 64) -> GenerationJob:
        return GenerationJob(
            task_uuid="t",
            index=index,
            model=AIR,
            prompt="a lighthouse",
            width=width,
            height=height,
            seed=seed,
        )

    async def generate(jobs: list[GenerationJob]) -> list[Any]:
        async def no_checkpoint(job: GenerationJob, data: Any) -> None:
            return None

        return await backend.generate(jobs, lambda jobs, percent: None, no_checkpoint)

    first, other = asyncio.run(generate([job(0, 1), job(1, 2)]))
    alone, again = (asyncio.run(generate([job(0, 1)]))[0] for _ in range(2))
    # 72x40 is no multiple of FLUX's 16: the call rounds up and the result is cropped back.
    odd = asyncio.run(generate([job(2, 1, 72, 40)]))[0]
    for outcome in (first, other, alone, again, odd):
        assert isinstance(outcome, GeneratedImage)
    assert first.image.size == (64, 64)
    assert odd.image.size == (72, 40)
    assert np.array_equal(np.asarray(alone.image), np.asarray(again.image))
    # A batch of two and a call of one sum in other orders: at most a level or two apart.
    batched = np.asarray(first.image, np.int16) - np.asarray(alone.image, np.int16)
    assert np.abs(batched).max() <= 2
    assert not np.array_equal(np.asarray(first.image), np.asarray(other.image))
