"""bench/random_weights.py builds the real SDXL, FLUX.1-schnell and FLUX.1-dev architectures
(bench/architectures.py) with random weights: their parameter counts match the published
checkpoints (counted on the meta device, so no memory is used), toy versions of the same
pipelines save, load and generate, and the models file bench/gpu_models.py writes is one the
registry accepts. bench/gpu_throughput.py's variants (bench/variants.py) parse into the speed
settings and acceleratorOptions they name, apply only where they can, and are run in an order a
time budget can cut; the server's log (bench/throughput_runs.py) says what it applied."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from bench import architectures, random_weights
from bench import gpu_models as models
from bench import gpu_throughput as bench
from bench import throughput_runs as runs
from bench import variants as bench_variants

from impasto.backends.registry import TINY_AIR, ModelRegistry

# Parameter counts of the published checkpoints (stabilityai/stable-diffusion-xl-base-1.0,
# black-forest-labs/FLUX.1-schnell and FLUX.1-dev): dev's transformer is schnell's plus a
# guidance embedder, 11.90 B instead of 11.89 B; the rest of the two FLUX pipelines is the same.
FLUX = {
    "transformer": 11_891_178_560,
    "vae": 83_819_683,
    "text_encoder": 123_060_480,
    "text_encoder_2": 4_762_310_656,
}
EXPECTED = {
    "sdxl": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
    "flux": FLUX,
    "flux-dev": {**FLUX, "transformer": 11_901_408_320},
}


@pytest.mark.parametrize("arch", ["sdxl", "flux", "flux-dev"])
def test_random_architectures_have_the_parameter_counts_of_the_real_checkpoints(arch: str) -> None:
    with torch.device("meta"):
        modules = random_weights.build_modules(arch)
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}
    assert counts == EXPECTED[arch]
    assert all(p.is_meta for module in modules.values() for p in module.parameters())


def test_flux_dev_is_schnell_with_guidance_at_28_steps_and_guidance_3_5() -> None:
    assert architectures.flux_transformer_config()["guidance_embeds"] is False
    dev_config = architectures.flux_transformer_config(guidance_embeds=True)
    assert dev_config == {**architectures.flux_transformer_config(), "guidance_embeds": True}
    dev, schnell = architectures.ARCHITECTURES["flux-dev"], architectures.ARCHITECTURES["flux"]
    assert (dev.steps, dev.guidance, dev.hub_id) == (28, 3.5, "black-forest-labs/FLUX.1-dev")
    assert (schnell.steps, schnell.guidance) == (4, 0.0)
    assert (dev.registry_architecture, schnell.registry_architecture) == ("flux1d", "flux1s")
    assert architectures.ARCHITECTURES["sdxl"].steps == 30
    assert architectures.GPU_ARCHES == ("sdxl", "flux", "flux-dev")


def test_t5_tokenizer_is_built_offline_and_pads_like_flux_asks() -> None:
    tokenizer = random_weights.t5_tokenizer()
    ids = tokenizer(
        ["a lighthouse at dusk"], padding="max_length", max_length=512, truncation=True
    ).input_ids[0]
    assert len(ids) == 512
    assert ids[-1] == tokenizer.pad_token_id == 0
    assert tokenizer.eos_token_id == 1 in ids
    assert tokenizer.unk_token_id not in ids
    assert max(ids) < architectures.t5_config(toy=True, vocab=256).vocab_size


@pytest.mark.parametrize(
    ("arch", "pipeline_class", "guidance"),
    [
        ("sdxl", "StableDiffusionXLPipeline", 6.0),
        ("flux", "FluxPipeline", 0.0),
        ("flux-dev", "FluxPipeline", 3.5),
    ],
)
def test_toy_pipelines_save_load_and_generate(
    arch: str, pipeline_class: str, guidance: float, tmp_path: Path
) -> None:
    from diffusers import AutoPipelineForText2Image

    directory = random_weights.ensure_random_pipeline(arch, tmp_path, "cpu", "bfloat16", toy=True)
    assert (
        random_weights.ensure_random_pipeline(arch, tmp_path, "cpu", "bfloat16", toy=True)
        == directory
    )
    pipeline = AutoPipelineForText2Image.from_pretrained(str(directory))
    assert type(pipeline).__name__ == pipeline_class
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        prompt=["a lighthouse", "a harbour"],
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
    ).images
    assert [image.size for image in images] == [(64, 64), (64, 64)]


def test_flux_dev_links_the_schnell_weights_and_adds_only_the_guidance_embedder(
    tmp_path: Path,
) -> None:
    from diffusers import FluxTransformer2DModel

    dev = random_weights.ensure_random_pipeline("flux-dev", tmp_path, "cpu", "bfloat16", toy=True)
    schnell = tmp_path / "flux-toy-random-float32"
    assert (dev / "text_encoder_2").is_symlink()
    assert (dev / "text_encoder_2").resolve() == (schnell / "text_encoder_2").resolve()
    index = json.loads((dev / "transformer" / random_weights.SHARD_INDEX).read_text())
    own = {k for k, shard in index["weight_map"].items() if shard == random_weights.GUIDANCE_SHARD}
    assert own == {
        f"time_text_embed.guidance_embedder.linear_{i}.{kind}"
        for i in (1, 2)
        for kind in ("weight", "bias")
    }
    dev_weights = FluxTransformer2DModel.from_pretrained(str(dev / "transformer")).state_dict()
    schnell_weights = FluxTransformer2DModel.from_pretrained(
        str(schnell / "transformer")
    ).state_dict()
    assert set(dev_weights) - set(schnell_weights) == own
    assert all(torch.equal(dev_weights[k], v) for k, v in schnell_weights.items())


def _args(tmp_path: Path, **overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "dtype": "bfloat16",
        "max_batch_size": 8,
        "compile": False,
        "cache_dir": tmp_path,
    }
    values.update(overrides)
    return argparse.Namespace(**values)


def _workload(arch: str, source: Path, **fields: object) -> models.Workload:
    spec = architectures.ARCHITECTURES[arch]
    values: dict[str, object] = {
        "arch": arch,
        "air": spec.air,
        "pipeline_class": spec.pipeline_class,
        "source": source,
        "weights": "random",
        "width": 1024,
        "height": 1024,
        "steps": spec.steps,
        "guidance": spec.guidance,
    }
    values.update(fields)
    return models.Workload(**values)  # type: ignore[arg-type]


def test_models_file_registers_the_benchmark_model(tmp_path: Path) -> None:
    source = tmp_path / 'with space and "quote"'
    path = tmp_path / "models.toml"
    work = _workload("sdxl", source, variant="fp16")
    path.write_text(models.models_file(work, _args(tmp_path, compile=True)))

    target = ModelRegistry.load(path).resolve("bench:sdxl@1").target
    assert (target.backend, target.path, target.architecture) == ("diffusers", str(source), "sdxl")
    assert target.rules.sizes.default == (1024, 1024)
    assert {"seed", "steps", "CFGScale"} <= target.rules.parameters
    assert "acceleratorOptions" not in target.rules.parameters
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


@pytest.mark.parametrize(
    ("text", "settings"),
    [
        ("compile+fuse_qkv+attention=_flash_3", {"compile": True, "fuse_qkv": True}),
        ("fp8", {"quantize": "fp8"}),
    ],
)
def test_models_file_carries_a_variants_speed_settings(
    text: str, settings: dict[str, object], tmp_path: Path
) -> None:
    path = tmp_path / "models.toml"
    variant = bench_variants.parse_variant(text)
    path.write_text(models.models_file(_workload("flux-dev", tmp_path), _args(tmp_path), variant))

    target = ModelRegistry.load(path).resolve("bench:flux-dev@1").target
    assert target.architecture == "flux1d"
    assert target.settings["guidance_scale"] == 3.5
    assert target.settings["steps"] == 28
    assert dict(target.settings).items() >= variant.settings.items() >= settings.items()


def test_a_cache_variant_lets_the_model_take_accelerator_options(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    variant = bench_variants.parse_variant("teacache=0.4")
    path.write_text(models.models_file(_workload("flux", tmp_path), _args(tmp_path), variant))

    target = ModelRegistry.load(path).resolve("bench:flux-schnell@1").target
    assert "acceleratorOptions" in target.rules.parameters
    task = models.inference_task(_workload("flux", tmp_path), 7, variant)[0]
    assert task["acceleratorOptions"] == {"teaCache": True, "teaCacheDistance": 0.4}
    assert "acceleratorOptions" not in models.inference_task(_workload("flux", tmp_path), 7)[0]


def test_models_file_only_tunes_the_builtin_tiny_model(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    work = _workload("tiny", tmp_path, width=256, height=256)
    variant = bench_variants.parse_variant("deepcache=3")
    path.write_text(models.models_file(work, _args(tmp_path, max_batch_size=4), variant))

    target = ModelRegistry.load(path).resolve(TINY_AIR).target
    assert target.backend == "tiny"
    assert target.rules.sizes.default == (256, 256)  # the warm-up runs at the benchmark's size
    assert "acceleratorOptions" in target.rules.parameters
    assert target.settings["max_batch_size"] == 4
    assert target.settings["max_batch_pixels"] == 4 * 256 * 256


# -- variants -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name", "settings", "accelerator", "lossy"),
    [
        ("default", "default", {}, {}, False),
        ("compile", "compile", {"compile": True}, {}, False),
        (" Fuse_QKV ", "fuse_qkv", {"fuse_qkv": True}, {}, False),
        ("fp8", "fp8", {"quantize": "fp8"}, {}, True),
        ("attention=_flash_3", "attention=_flash_3", {"attention_backend": "_flash_3"}, {}, False),
        ("attention=sage", "attention=sage", {"attention_backend": "sage"}, {}, True),
        ("fbcache", "fbcache=0.08", {}, {"fbcache": True, "cacheDistance": 0.08}, True),
        ("teacache=0.3", "teacache=0.3", {}, {"teaCache": True, "teaCacheDistance": 0.3}, True),
        ("deepcache=2", "deepcache=2", {}, {"deepCache": True, "deepCacheInterval": 2}, True),
        (
            "compile+fbcache=0.1",
            "compile+fbcache=0.1",
            {"compile": True},
            {"fbcache": True, "cacheDistance": 0.1},
            True,
        ),
        ("default+fuse_qkv", "fuse_qkv", {"fuse_qkv": True}, {}, False),
    ],
)
def test_variants_parse_into_speed_settings_and_accelerator_options(
    text: str,
    name: str,
    settings: dict[str, object],
    accelerator: dict[str, object],
    lossy: bool,
) -> None:
    variant = bench_variants.parse_variant(text)
    assert (variant.name, variant.settings, variant.accelerator) == (name, settings, accelerator)
    assert variant.lossy is lossy


@pytest.mark.parametrize(
    "text",
    ["warp", "fbcache+deepcache", "deepcache=0", "teacache=lots", "attention", "compile=1", "+"],
)
def test_a_bad_variant_is_refused_with_a_reason(text: str) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        bench_variants.parse_variant(text)


def test_variant_lists_keep_their_order_and_each_variant_once() -> None:
    variants = bench_variants.parse_variants("default, fbcache=0.08,compile,fbcache,, default")
    assert [v.name for v in variants] == ["default", "fbcache=0.08", "compile"]
    assert [v.requested for v in variants] == [[], ["fbcache"], ["compile"]]


def test_compile_flag_adds_compile_to_every_variant() -> None:
    names = [
        bench_variants.with_compile(bench_variants.parse_variant(t)).name
        for t in ("default", "fp8", "compile")
    ]
    assert names == ["compile", "fp8+compile", "compile"]


@pytest.mark.parametrize(
    ("text", "runs_on"),
    [
        ("default", {"sdxl", "flux", "flux-dev", "tiny"}),
        ("compile+fuse_qkv", {"sdxl", "flux", "flux-dev", "tiny"}),
        ("fp8", {"sdxl", "flux", "flux-dev", "tiny"}),
        ("fbcache=0.08", {"flux", "flux-dev"}),
        ("teacache=0.4", {"flux", "flux-dev"}),
        ("deepcache=3", {"sdxl", "tiny"}),
        ("attention=_flash_3", {"flux", "flux-dev"}),
        ("attention=native", {"sdxl", "flux", "flux-dev", "tiny"}),
    ],
)
def test_a_variant_runs_only_on_the_architectures_it_applies_to(
    text: str, runs_on: set[str]
) -> None:
    variant = bench_variants.parse_variant(text)
    reasons = {
        arch: bench_variants.variant_skip_reason(variant, arch)
        for arch in architectures.ARCHITECTURES
    }
    assert {arch for arch, reason in reasons.items() if reason is None} == runs_on
    assert all(reasons[arch] for arch in set(reasons) - runs_on)


def test_deepcache_on_flux_says_which_denoiser_it_needs() -> None:
    reason = bench_variants.variant_skip_reason(
        bench_variants.parse_variant("deepcache=3"), "flux-dev"
    )
    assert reason == "deepcache needs a UNet; FLUX.1-dev has a transformer (DiT)"


def test_runs_go_breadth_first_so_a_budget_cuts_the_last_variants() -> None:
    variants = bench_variants.parse_variants("default,compile,fp8")
    order = [(arch, v.name) for arch, v in bench.schedule(["sdxl", "flux"], variants)]
    assert order == [
        ("sdxl", "default"),
        ("flux", "default"),
        ("sdxl", "compile"),
        ("flux", "compile"),
        ("sdxl", "fp8"),
        ("flux", "fp8"),
    ]


def test_budget_refuses_a_step_once_spent_or_when_the_last_one_would_overrun() -> None:
    now = [100.0]
    budget = bench.Budget(60, clock=lambda: now[0])
    assert budget.refusal() is None
    now[0] = 130.0
    assert budget.refusal(estimate_s=20) is None
    assert "took 40 s" in (budget.refusal(estimate_s=40) or "")
    now[0] = 161.0
    assert "spent" in (budget.refusal() or "")
    assert bench.Budget(None).refusal(estimate_s=1e9) is None


# (level, logger, message) as impasto serve logs them (text format, IMPASTO_LOG_LEVEL=info).
SERVER_LINES = [
    ("INFO", "speed", "speed option applied: channels_last on cuda:0"),
    ("INFO", "speed", "speed option applied: fuse_qkv on cuda:0"),
    ("WARNING", "speed", "speed option quantize skipped: torchao is not installed (pip install)"),
    ("INFO", "speed", "speed option applied: compile=regional on cuda:0"),
    ("WARNING", "speed", "speed option compile skipped: TorchDynamoException: no C++ compiler"),
    ("INFO", "diffusers", "warmed up bench:f@1 in 27.3 s (speed options: channels_last, fuse_qkv)"),
    ("WARNING", "diffusers", "bench:f@1: running without teacache: the denoiser has no blocks"),
    ("WARNING", "diffusers", "bench:f@1: running without teacache: the denoiser has no blocks"),
]
SERVER_LOG = "\n".join(
    f"2026-12-02 02:54:12,937 {level} impasto.backends.{logger} [-] {message}"
    for level, logger, message in SERVER_LINES
)


def test_server_log_says_which_options_were_applied_and_why_others_were_skipped() -> None:
    report = runs.parse_server_log(SERVER_LOG)
    assert report.applied == ["channels_last", "fuse_qkv"]
    assert report.skipped == {
        "quantize": "torchao is not installed (pip install)",
        "compile": "TorchDynamoException: no C++ compiler",
        "teacache": "the denoiser has no blocks",
    }
    assert report.warmup_s == 27.3
    assert report.status("fuse_qkv") == "applied"
    assert report.status("compile") == "skipped: TorchDynamoException: no C++ compiler"
    assert report.status("attention_backend") == "not reported"
    assert runs.parse_server_log("").status("deepcache").startswith("asked on every task")
