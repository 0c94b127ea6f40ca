"""bench/gpu_throughput.py builds the real SDXL and FLUX.1-schnell architectures with random
weights: their parameter counts match the published checkpoints (counted on the meta device, so
no memory is used), toy versions of the same pipelines save, load and generate, and the models
file it writes is one the registry accepts."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from bench import gpu_throughput as bench

from impasto.backends.registry import TINY_AIR, ModelRegistry

# Parameter counts of the published checkpoints (stabilityai/stable-diffusion-xl-base-1.0,
# black-forest-labs/FLUX.1-schnell); schnell has no guidance embedder, hence 11.89 B, not the
# 11.90 B of FLUX.1-dev.
EXPECTED = {
    "sdxl": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
    "flux": {
        "transformer": 11_891_178_560,
        "vae": 83_819_683,
        "text_encoder": 123_060_480,
        "text_encoder_2": 4_762_310_656,
    },
}


@pytest.mark.parametrize("arch", ["sdxl", "flux"])
def test_random_architectures_have_the_parameter_counts_of_the_real_checkpoints(arch: str) -> None:
    with torch.device("meta"):
        modules = bench.build_modules(arch)
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}
    assert counts == EXPECTED[arch]
    assert all(p.is_meta for module in modules.values() for p in module.parameters())


def test_t5_tokenizer_is_built_offline_and_pads_like_flux_asks() -> None:
    tokenizer = bench.t5_tokenizer()
    ids = tokenizer(
        ["a lighthouse at dusk"], padding="max_length", max_length=512, truncation=True
    ).input_ids[0]
    assert len(ids) == 512
    assert ids[-1] == tokenizer.pad_token_id == 0
    assert tokenizer.eos_token_id == 1 in ids
    assert tokenizer.unk_token_id not in ids
    assert max(ids) < bench.t5_config(toy=True, vocab=256).vocab_size


@pytest.mark.parametrize(
    ("arch", "pipeline_class"), [("sdxl", "StableDiffusionXLPipeline"), ("flux", "FluxPipeline")]
)
def test_toy_pipelines_save_load_and_generate(
    arch: str, pipeline_class: str, tmp_path: Path
) -> None:
    from diffusers import AutoPipelineForText2Image

    directory = bench.ensure_random_pipeline(arch, tmp_path, "cpu", "bfloat16", toy=True)
    assert bench.ensure_random_pipeline(arch, tmp_path, "cpu", "bfloat16", toy=True) == directory
    pipeline = AutoPipelineForText2Image.from_pretrained(str(directory))
    assert type(pipeline).__name__ == pipeline_class
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        prompt=["a lighthouse", "a harbour"],
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=6.0 if arch == "sdxl" else 0.0,
        generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
    ).images
    assert [image.size for image in images] == [(64, 64), (64, 64)]


def _args(tmp_path: Path, **overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "dtype": "bfloat16",
        "max_batch_size": 8,
        "compile": False,
        "cache_dir": tmp_path,
    }
    values.update(overrides)
    return argparse.Namespace(**values)


def _workload(arch: str, source: Path, **fields: object) -> bench.Workload:
    values: dict[str, object] = {
        "arch": arch,
        "air": "bench:sdxl@1" if arch == "sdxl" else TINY_AIR,
        "pipeline_class": "StableDiffusionXLPipeline",
        "source": source,
        "weights": "random",
        "width": 1024,
        "height": 1024,
        "steps": 30,
        "guidance": 6.0,
    }
    values.update(fields)
    return bench.Workload(**values)  # type: ignore[arg-type]


def test_models_file_registers_the_benchmark_model(tmp_path: Path) -> None:
    source = tmp_path / 'with space and "quote"'
    path = tmp_path / "models.toml"
    work = _workload("sdxl", source, variant="fp16")
    path.write_text(bench.models_file(work, _args(tmp_path, compile=True)))

    target = ModelRegistry.load(path).resolve("bench:sdxl@1").target
    assert (target.backend, target.path) == ("diffusers", str(source))
    assert target.rules.sizes.default == (1024, 1024)
    assert {"seed", "steps", "CFGScale"} <= target.rules.parameters
    assert dict(target.settings) == {
        "dtype": "bfloat16",
        "steps": 30,
        "guidance_scale": 6.0,
        "pipeline_class": "StableDiffusionXLPipeline",
        "max_batch_size": 8,
        "max_batch_pixels": 8 * 1024 * 1024,
        "variant": "fp16",
        "compile": True,
    }


def test_models_file_only_tunes_the_builtin_tiny_model(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    work = _workload(
        "tiny", tmp_path, pipeline_class="StableDiffusionPipeline", width=256, height=256
    )
    path.write_text(bench.models_file(work, _args(tmp_path, max_batch_size=4)))

    target = ModelRegistry.load(path).resolve(TINY_AIR).target
    assert target.backend == "tiny"
    assert target.settings["max_batch_size"] == 4
    assert target.settings["max_batch_pixels"] == 4 * 256 * 256
