"""The image modes of the diffusers backend, behaviourally, on the tiny assets: LoRA weights and
composition, inpainting that keeps the unmasked pixels, outpaint sizes, ControlNet at weight
0, reproducibility, and batch keys that keep modes and LoRA sets apart."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from PIL import Image

from impasto.backends.base import (
    AdapterUse,
    ControlUse,
    GeneratedImage,
    GenerationJob,
    LoraUse,
    Outpaint,
    RefinerUse,
)
from impasto.backends.canvas import fit_image
from impasto.backends.devices import DevicePool
from impasto.backends.diffusers_backend import DiffusersBackend
from impasto.backends.factory import BackendContext, create_backend
from impasto.backends.registry import TINY_AIR, ModelRegistry
from impasto.protocol.errors import ImpastoError

REGISTRY = ModelRegistry.load(None)
LORA1 = LoraUse("impasto:tiny-lora@1", 1.0)
LORA2 = LoraUse("impasto:tiny-lora@2", 1.0)
CONTROLNET = "impasto:tiny-controlnet@1"


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


SEED_IMAGE = _image(80, 96, 1)
MASK = Image.new("L", (80, 96), 0)
MASK.paste(255, (24, 24, 56, 72))


def job(model: str = TINY_AIR, index: int = 0, seed: int = 7, **kw: Any) -> GenerationJob:
    fields: dict[str, Any] = {"width": 64, "height": 64, **kw}
    return GenerationJob(
        task_uuid="t", index=index, model=model, prompt="a cat", seed=seed, **fields
    )


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> BackendContext:
    return BackendContext(
        models_dir=tmp_path_factory.mktemp("models"),
        devices=DevicePool(["cpu"], None, 1),
        max_batch_size=4,
        registry=REGISTRY,
    )


@pytest.fixture(scope="module")
def tiny(context: BackendContext) -> Iterator[DiffusersBackend]:
    backend = create_backend(REGISTRY.resolve(TINY_AIR).target, context)
    assert isinstance(backend, DiffusersBackend)
    yield backend
    asyncio.run(backend.close())


def run(backend: Any, jobs: Sequence[GenerationJob]) -> list[np.ndarray]:
    async def go() -> list[Any]:
        return await backend.generate(jobs, lambda jobs, percent: None, _checkpoint)

    outcomes = asyncio.run(go())
    for outcome in outcomes:
        assert isinstance(outcome, GeneratedImage), outcome
    return [np.asarray(o.image, dtype=np.int16) for o in outcomes]


async def _checkpoint(job: GenerationJob, data: Any) -> None:
    return None


def one(backend: Any, **kw: Any) -> np.ndarray:
    return run(backend, [job(**kw)])[0]


def test_lora_at_weight_zero_is_no_lora_and_at_weight_one_is_not(tiny: DiffusersBackend) -> None:
    plain = one(tiny)
    assert np.array_equal(one(tiny, loras=(LoraUse(LORA1.air, 0.0),)), plain)
    with_lora = one(tiny, loras=(LORA1,))
    assert np.abs(with_lora - plain).mean() > 1
    # Switching it off again gives the base model's pixels.
    assert np.array_equal(one(tiny), plain)


def test_two_loras_compose(tiny: DiffusersBackend) -> None:
    first, second = one(tiny, loras=(LORA1,)), one(tiny, loras=(LORA2,))
    both = one(tiny, loras=(LORA1, LORA2))
    assert not np.array_equal(both, first)
    assert not np.array_equal(both, second)
    # A set already loaded is applied without loading again.
    replica = next(iter(tiny._replicas.values()))
    loads = replica.loras.loads
    one(tiny, loras=(LORA2, LoraUse(LORA1.air, 0.5)))
    assert replica.loras.loads == loads


def test_same_seed_and_inputs_reproduce(tiny: DiffusersBackend) -> None:
    kw = {"seed_image": SEED_IMAGE, "strength": 0.6, "loras": (LORA1,)}
    assert np.array_equal(one(tiny, **kw), one(tiny, **kw))
    assert not np.array_equal(one(tiny, **kw), one(tiny, seed=8, **kw))


def test_img2img_output_has_the_requested_size_and_follows_the_seed_image(
    tiny: DiffusersBackend,
) -> None:
    out = one(tiny, seed_image=SEED_IMAGE, strength=0.3, width=96, height=64)
    assert out.shape == (64, 96, 3)
    other = one(tiny, seed_image=_image(80, 96, 2), strength=0.3, width=96, height=64)
    assert not np.array_equal(out, other)


@pytest.mark.parametrize("margin", [None, 32])
def test_inpainting_keeps_the_pixels_outside_the_mask(
    tiny: DiffusersBackend, margin: int | None
) -> None:
    out = one(tiny, seed_image=SEED_IMAGE, mask_image=MASK, mask_margin=margin, width=80, height=96)
    source = np.asarray(fit_image(SEED_IMAGE, 80, 96), dtype=np.int16)
    keep = np.asarray(MASK) == 0
    assert np.array_equal(out[keep], source[keep])
    repaint = np.asarray(MASK) == 255
    assert np.abs(out[repaint] - source[repaint]).mean() > 5


def test_inpainting_checkpoint_with_nine_channels(context: BackendContext) -> None:
    backend = create_backend(REGISTRY.resolve("impasto:tiny-inpaint@1").target, context)
    try:
        out = one(backend, seed_image=SEED_IMAGE, mask_image=MASK, width=80, height=96)
    finally:
        asyncio.run(backend.close())
    keep = np.asarray(MASK) == 0
    assert np.array_equal(out[keep], np.asarray(SEED_IMAGE, dtype=np.int16)[keep])


def test_outpaint_output_is_the_extended_size_with_the_seed_image_inside(
    tiny: DiffusersBackend,
) -> None:
    sides = Outpaint(top=16, right=0, bottom=8, left=24, blur=0)
    out = one(tiny, seed_image=SEED_IMAGE, outpaint=sides, width=104, height=120)
    assert out.shape == (120, 104, 3)
    inner = out[16 : 16 + 96, 24 : 24 + 80]
    assert np.array_equal(inner, np.asarray(SEED_IMAGE, dtype=np.int16))


def test_controlnet_at_weight_zero_is_no_controlnet(tiny: DiffusersBackend) -> None:
    guide = _image(64, 64, 3)
    plain = one(tiny)
    off = one(tiny, controlnets=(ControlUse(CONTROLNET, guide, weight=0.0),))
    assert np.abs(off - plain).max() <= 1
    on = one(tiny, controlnets=(ControlUse(CONTROLNET, guide, weight=1.0),))
    assert np.abs(on - plain).mean() > 1


def test_refiner_finishes_an_sdxl_image(context: BackendContext) -> None:
    backend = create_backend(REGISTRY.resolve("impasto:tiny-xl@1").target, context)
    try:
        plain = one(backend, model="impasto:tiny-xl@1")
        refined = one(
            backend,
            model="impasto:tiny-xl@1",
            refiner=RefinerUse("impasto:tiny-xl-refiner@1", start_percent=50),
        )
    finally:
        asyncio.run(backend.close())
    assert refined.shape == plain.shape
    assert not np.array_equal(refined, plain)


def test_refiner_after_img2img_and_inpainting(context: BackendContext) -> None:
    backend = create_backend(REGISTRY.resolve("impasto:tiny-xl@1").target, context)
    refiner = RefinerUse("impasto:tiny-xl-refiner@1", start_percent=50)
    try:
        img2img = one(backend, model="impasto:tiny-xl@1", seed_image=SEED_IMAGE, refiner=refiner)
        inpainted = one(
            backend,
            model="impasto:tiny-xl@1",
            seed_image=SEED_IMAGE,
            mask_image=MASK,
            refiner=refiner,
            width=80,
            height=96,
        )
    finally:
        asyncio.run(backend.close())
    assert img2img.shape == (64, 64, 3)
    keep = np.asarray(MASK) == 0
    assert np.array_equal(inpainted[keep], np.asarray(SEED_IMAGE, dtype=np.int16)[keep])


def test_several_ip_adapters_and_images_at_once(tiny: DiffusersBackend) -> None:
    adapter = "impasto:tiny-ip-adapter@1"
    other = _image(64, 64, 4)
    plain = one(tiny)
    one_image = one(tiny, ip_adapters=(AdapterUse(adapter, (SEED_IMAGE,), 0.8),))
    two_images = one(tiny, ip_adapters=(AdapterUse(adapter, (SEED_IMAGE, other), 0.8),))
    two_adapters = one(
        tiny,
        ip_adapters=(AdapterUse(adapter, (SEED_IMAGE,), 0.5), AdapterUse(adapter, (other,), 0.5)),
    )
    assert not np.array_equal(one_image, two_images)
    assert not np.array_equal(one_image, two_adapters)
    # Unloaded again when a call wants none: the plain model's pixels.
    assert np.array_equal(one(tiny), plain)


def test_jobs_of_other_modes_or_lora_sets_never_share_a_call(tiny: DiffusersBackend) -> None:
    key = tiny.batch_key
    base = job()
    assert key(job(index=1, seed=9)) == key(base)
    assert key(job(loras=(LORA1,))) == key(job(index=3, loras=(LORA1,)))
    others = [
        job(loras=(LORA1,)),
        job(loras=(LoraUse(LORA1.air, 0.5),)),
        job(loras=(LORA1, LORA2)),
        job(seed_image=SEED_IMAGE),
        job(seed_image=SEED_IMAGE, mask_image=MASK),
        job(controlnets=(ControlUse(CONTROLNET, SEED_IMAGE),)),
        job(vae="impasto:tiny-vae@1"),
        job(clip_skip=1),
        job(prompt_weighting="compel"),
    ]
    keys = [key(other) for other in others]
    assert key(base) not in keys
    assert len(set(keys)) == len(keys)


def test_a_lora_that_does_not_fit_the_model_is_a_clear_error(
    context: BackendContext,
) -> None:
    """Past validation (e.g. a models-file entry with the wrong architecture), loading fails
    with invalidLora rather than a stack trace."""
    backend = create_backend(REGISTRY.resolve("impasto:tiny-xl@1").target, context)
    try:
        with pytest.raises(ImpastoError) as caught:
            run(backend, [job(model="impasto:tiny-xl@1", loras=(LORA1,))])
    finally:
        asyncio.run(backend.close())
    assert caught.value.code == "invalidLora"
