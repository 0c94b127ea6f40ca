"""The tiny offline assets: each one is built once, reproducibly, in the on-disk format of its
kind, loads with the diffusers class a user would load a real one with, and really changes
what the model makes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from impasto.backends.tiny_assets import (
    TINY_ASSET_NAMES,
    TINY_EMBEDDING_TOKEN,
    TINY_EMBEDDING_WEIGHTS,
    TINY_LORA_WEIGHTS,
    ensure_tiny_asset,
    ensure_tiny_lora,
)

PROMPT = "a lighthouse at dusk"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipeline_dir(tiny_pipeline_dir: Path) -> Path:
    return tiny_pipeline_dir


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory, pipeline_dir: Path) -> dict[str, Path]:
    models = tmp_path_factory.mktemp("tiny-assets")
    return {name: ensure_tiny_asset(name, models, pipeline_dir) for name in TINY_ASSET_NAMES}


def quiet(pipeline: Any) -> Any:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def render(pipeline: Any, prompt: str = PROMPT, **kwargs: Any) -> np.ndarray:
    options: dict[str, Any] = {
        "width": 64,
        "height": 64,
        "num_inference_steps": 2,
        "guidance_scale": 2.0,
        "generator": torch.Generator().manual_seed(7),
    }
    image = pipeline(prompt, **{**options, **kwargs}).images[0]
    assert image.size == (64, 64)
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def base_pixels(pipeline_dir: Path) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    return render(quiet(StableDiffusionPipeline.from_pretrained(pipeline_dir)))


def noise_image(seed: int) -> Image.Image:
    values = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return Image.fromarray(values)


def test_each_asset_is_built_once_under_its_name_and_then_reused(
    assets: dict[str, Path], pipeline_dir: Path
) -> None:
    for name, directory in assets.items():
        assert directory.name == f"impasto-tiny-{name}"
        assert (directory / "impasto-tiny.json").is_file()
        assert not list(directory.parent.glob(".tiny-*")), "staging directories left behind"
    stamps = {name: (d / "impasto-tiny.json").stat().st_mtime_ns for name, d in assets.items()}
    models = assets["vae"].parent
    again = {name: ensure_tiny_asset(name, models, pipeline_dir) for name in TINY_ASSET_NAMES}
    assert again == assets
    assert {n: (d / "impasto-tiny.json").stat().st_mtime_ns for n, d in again.items()} == stamps


def test_unknown_asset_name_is_refused(tmp_path: Path, pipeline_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny asset"):
        ensure_tiny_asset("lora3", tmp_path, pipeline_dir)


def test_lora_is_reproducible_from_its_seed_and_leaves_the_global_rng_alone(
    assets: dict[str, Path], pipeline_dir: Path, tmp_path: Path
) -> None:
    state = torch.get_rng_state()
    rebuilt = ensure_tiny_lora(tmp_path / "again", pipeline_dir, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    first = load_file(str(assets["lora1"] / TINY_LORA_WEIGHTS))
    second = load_file(str(rebuilt / TINY_LORA_WEIGHTS))
    other = load_file(str(assets["lora2"] / TINY_LORA_WEIGHTS))
    assert first.keys() == second.keys() == other.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not any(torch.equal(first[key], other[key]) for key in first)
    # Both halves of the LoRA, in diffusers' file layout.
    assert {key.split(".")[0] for key in first} == {"unet", "text_encoder"}


def test_lora_loads_into_unet_and_text_encoder_and_changes_pixels(
    assets: dict[str, Path], pipeline_dir: Path, base_pixels: np.ndarray
) -> None:
    from diffusers import StableDiffusionPipeline

    pipeline = quiet(StableDiffusionPipeline.from_pretrained(pipeline_dir))
    pipeline.load_lora_weights(assets["lora1"], weight_name=TINY_LORA_WEIGHTS, adapter_name="tiny")
    assert pipeline.get_list_adapters() == {"unet": ["tiny"], "text_encoder": ["tiny"]}
    changed = render(pipeline)
    assert np.abs(changed - base_pixels).mean() > 1.0


def test_controlnet_changes_pixels_at_scale_one_and_none_at_scale_zero(
    assets: dict[str, Path], pipeline_dir: Path, base_pixels: np.ndarray
) -> None:
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
    )

    controlnet = ControlNetModel.from_pretrained(assets["controlnet"])
    plain = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    pipeline = quiet(StableDiffusionControlNetPipeline.from_pipe(plain, controlnet=controlnet))
    control = noise_image(3)
    guided = render(pipeline, image=control, controlnet_conditioning_scale=1.0)
    off = render(pipeline, image=control, controlnet_conditioning_scale=0.0)
    assert np.abs(guided - base_pixels).mean() > 1.0
    # At scale 0 the residuals are multiplied by zero and added: the plain UNet's result.
    assert np.array_equal(off, base_pixels)


def test_inpaint_pipeline_loads_with_auto_pipeline_and_runs_with_image_and_mask(
    assets: dict[str, Path], base_pixels: np.ndarray
) -> None:
    from diffusers import AutoPipelineForInpainting, StableDiffusionInpaintPipeline

    pipeline = quiet(AutoPipelineForInpainting.from_pretrained(assets["inpaint"]))
    assert isinstance(pipeline, StableDiffusionInpaintPipeline)
    assert pipeline.unet.config.in_channels == 9
    image = Image.fromarray(base_pixels.astype(np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    masked = render(pipeline, image=image, mask_image=mask, strength=1.0)
    other_mask = render(pipeline, image=image, mask_image=Image.new("L", (64, 64), 255))
    assert not np.array_equal(masked, other_mask)


def test_xl_base_loads_as_sdxl_and_generates(assets: dict[str, Path]) -> None:
    from diffusers import AutoPipelineForText2Image, StableDiffusionXLPipeline

    pipeline = quiet(AutoPipelineForText2Image.from_pretrained(assets["xl"]))
    assert isinstance(pipeline, StableDiffusionXLPipeline)
    assert type(pipeline.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipeline.unet.config.addition_embed_type == "text_time"
    first, second = render(pipeline), render(pipeline, prompt_2="a harbour")
    assert not np.array_equal(first, second), "the second text encoder makes no difference"


def test_xl_refiner_finishes_the_latents_of_the_base(assets: dict[str, Path]) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base = quiet(StableDiffusionXLPipeline.from_pretrained(assets["xl"]))
    refiner = quiet(StableDiffusionXLImg2ImgPipeline.from_pretrained(assets["xl-refiner"]))
    assert refiner.text_encoder is None
    assert refiner.config.requires_aesthetics_score
    latents = base(
        PROMPT,
        width=64,
        height=64,
        num_inference_steps=4,
        denoising_end=0.5,
        output_type="latent",
        generator=torch.Generator().manual_seed(7),
    ).images
    assert latents.shape == (1, 4, 4, 4)
    finish: dict[str, Any] = {"num_inference_steps": 4, "denoising_start": 0.5}
    refined = render(refiner, image=latents, **finish)
    scored = render(refiner, image=latents, aesthetic_score=2.0, **finish)
    assert not np.array_equal(refined, scored), "the aesthetic score makes no difference"


def test_vae_override_changes_pixels(
    assets: dict[str, Path], pipeline_dir: Path, base_pixels: np.ndarray
) -> None:
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    vae = AutoencoderKL.from_pretrained(assets["vae"])
    pipeline = quiet(StableDiffusionPipeline.from_pretrained(pipeline_dir, vae=vae))
    assert np.abs(render(pipeline) - base_pixels).mean() > 1.0


def test_embedding_token_loads_and_changes_the_text_embedding(
    assets: dict[str, Path], pipeline_dir: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    pipeline = quiet(StableDiffusionPipeline.from_pretrained(pipeline_dir))
    prompt = f"a {TINY_EMBEDDING_TOKEN} lighthouse"
    before = pipeline.encode_prompt(prompt, "cpu", 1, False)[0]
    pipeline.load_textual_inversion(assets["embedding"], token=TINY_EMBEDDING_TOKEN)
    token_id = pipeline.tokenizer.convert_tokens_to_ids(TINY_EMBEDDING_TOKEN)
    vector = load_file(str(assets["embedding"] / TINY_EMBEDDING_WEIGHTS))[TINY_EMBEDDING_TOKEN]
    assert vector.shape == (1, pipeline.text_encoder.config.hidden_size)
    embeddings = pipeline.text_encoder.get_input_embeddings().weight
    assert torch.equal(embeddings[token_id], vector[0])
    after = pipeline.encode_prompt(prompt, "cpu", 1, False)[0]
    assert not torch.equal(before, after)
    render(pipeline, prompt)  # and the pipeline generates with the new token


def test_builds_hold_the_process_wide_load_lock(tmp_path: Path) -> None:
    """diffusers builds models under accelerate's init_empty_weights, which patches torch for
    the whole process: a tiny build must never run while another thread loads (meta tensors)."""
    from impasto.backends.devices import LOAD_LOCK
    from impasto.backends.tiny import build_atomically

    held: list[bool] = []

    def build(directory: Path) -> None:
        held.append(LOAD_LOCK._is_owned())  # type: ignore[attr-defined]
        (directory / "x").write_text("built")

    build_atomically(tmp_path / "asset", build, {"version": 1})
    assert held == [True]
    assert not LOAD_LOCK._is_owned()  # type: ignore[attr-defined]
