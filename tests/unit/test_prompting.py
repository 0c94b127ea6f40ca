"""promptWeighting and clipSkip on the real tiny pipelines (SD and SDXL): the A1111 syntax as
A1111 reads it, compel's weights, diffusers' clip_skip, SDXL's pooled embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from impasto.backends.prompting import (
    MAX_NESTING,
    PromptSyntaxError,
    UnsupportedPromptOption,
    clip_skip_supported,
    parse_sd_embeds,
    prompt_arguments,
    prompt_weighting_problem,
)

ROUND = 1.1
SQUARE = 1 / 1.1


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd(tiny_models_dir: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_models_dir / "impasto-tiny")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from impasto.backends.tiny_assets import ensure_tiny_xl

    return ensure_tiny_xl(tmp_path_factory.mktemp("xl") / "impasto-tiny-xl")


@pytest.fixture(scope="module")
def xl(xl_dir: Path) -> Any:
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(xl_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def images(pipeline: Any, **arguments: Any) -> np.ndarray:
    output = pipeline(
        **arguments,
        num_inference_steps=1,
        width=64,
        height=64,
        guidance_scale=7.0,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    )
    return np.asarray(output.images)


def sd_embeds(pipeline: Any, prompts: list[str], negatives: list[str] | None = None) -> Any:
    """diffusers' own encoding of plain prompts: (prompt_embeds, negative_prompt_embeds)."""
    with torch.no_grad():
        return pipeline.encode_prompt(prompts, "cpu", 1, True, negative_prompt=negatives)


def skipped_reference(pipeline: Any, prompts: list[str], skip: int) -> Any:
    """diffusers' definition of SD clip_skip, spelled out: hidden state -(skip + 1) through
    the final layer norm. (diffusers 0.42's own reaches the norm through `text_model`, which
    transformers 5's CLIPTextModel no longer has.)"""
    tokens = pipeline.tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    encoder = pipeline.text_encoder
    with torch.no_grad():
        hidden = encoder(tokens.input_ids, output_hidden_states=True).hidden_states
        return encoder.final_layer_norm(hidden[-(skip + 1)])


def close(a: Any, b: Any) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, atol=1e-5, rtol=1e-5))


# -- the A1111 syntax -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "chunks"),
    [
        ("a cat", [[("a cat", 1.0)]]),
        ("(cat)", [[("cat", ROUND)]]),
        ("[cat]", [[("cat", SQUARE)]]),
        ("(cat:1.5)", [[("cat", 1.5)]]),
        ("(cat: 0.5 )", [[("cat", 0.5)]]),
        ("a (cat) b", [[("a ", 1.0), ("cat", ROUND), (" b", 1.0)]]),
        ("((cat))", [[("cat", ROUND * ROUND)]]),
        ("((cat:1.5))", [[("cat", 1.5 * ROUND)]]),
        ("(a (b:2) c)", [[("a ", ROUND), ("b", 2 * ROUND), (" c", ROUND)]]),
        ("[(cat:1.5)]", [[("cat", 1.5 * SQUARE)]]),
        ("[[cat]] dog", [[("cat", SQUARE * SQUARE), (" dog", 1.0)]]),
        # A bracket left open weights everything after it; one that closes nothing is text.
        ("(cat", [[("cat", ROUND)]]),
        ("(cat:1.5", [[("cat:1.5", ROUND)]]),
        ("cat)", [[("cat)", 1.0)]]),
        ("cat] dog", [[("cat] dog", 1.0)]]),
        (r"\(cat\)", [[("(cat)", 1.0)]]),
        (r"(\(cat\))", [[("(cat)", ROUND)]]),
        (r"\[cat\]", [[("[cat]", 1.0)]]),
        (r"a\\b", [[("a\\b", 1.0)]]),
        ("a:b", [[("a:b", 1.0)]]),
        ("a BREAK b", [[("a", 1.0)], [("b", 1.0)]]),
        ("(a BREAK b)", [[("a", ROUND)], [("b", ROUND)]]),
        ("BREAK a", [[("a", 1.0)]]),
        ("BREAKFAST", [[("BREAKFAST", 1.0)]]),
        ("", [[]]),
    ],
)
def test_sd_embeds_syntax_reads_as_a1111(text: str, chunks: list[list[tuple[str, float]]]) -> None:
    parsed = parse_sd_embeds(text)
    assert [[run_text for run_text, _ in chunk] for chunk in parsed] == [
        [run_text for run_text, _ in chunk] for chunk in chunks
    ]
    assert [[weight for _, weight in chunk] for chunk in parsed] == [
        [pytest.approx(weight) for _, weight in chunk] for chunk in chunks
    ]


def test_sd_embeds_weight_that_is_not_a_number_is_a_syntax_error() -> None:
    with pytest.raises(PromptSyntaxError, match=r"1\.2\.3"):
        parse_sd_embeds("a (cat:1.2.3) b")


# -- SD 1.x/2.x ---------------------------------------------------------------------------------


def test_without_weighting_the_prompts_go_to_the_pipeline_as_text(sd: Any) -> None:
    arguments = prompt_arguments(sd, ["a cat"], ["a dog"], weighting=None, clip_skip=0)

    assert arguments == {"prompt": ["a cat"], "negative_prompt": ["a dog"]}
    np.testing.assert_array_equal(
        images(sd, **arguments), images(sd, prompt=["a cat"], negative_prompt=["a dog"])
    )


def test_compel_weight_one_gives_diffusers_embeddings_and_images(sd: Any) -> None:
    plain, plain_negative = sd_embeds(sd, ["cat on a mat"], ["ugly dog"])

    same = prompt_arguments(
        sd, ["(cat)1.0 on a mat"], ["ugly dog"], weighting="compel", clip_skip=None
    )
    heavier = prompt_arguments(
        sd, ["(cat)1.5 on a mat"], ["ugly dog"], weighting="compel", clip_skip=None
    )

    assert close(same["prompt_embeds"], plain)
    assert close(same["negative_prompt_embeds"], plain_negative)
    assert not close(heavier["prompt_embeds"], plain)
    np.testing.assert_allclose(
        images(sd, **same),
        images(sd, prompt=["cat on a mat"], negative_prompt=["ugly dog"]),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("sd_embeds_text", "compel_text"),
    [
        ("(cat:1.5) on a mat", "(cat)1.5 on a mat"),
        ("((cat)) on a mat", f"(cat){ROUND * ROUND!r} on a mat"),
        ("[cat] on a mat", f"(cat){SQUARE!r} on a mat"),
        ("(a (b:2) c) d", f"(a){ROUND!r} (b){2 * ROUND!r} (c){ROUND!r} d"),
        (r"\(cat\) (dog)", rf"\(cat\) (dog){ROUND!r}"),
        ("a cat BREAK a dog", '("a cat", "a dog").and()'),
    ],
)
def test_sd_embeds_weights_give_the_embeddings_of_the_same_compel_weights(
    sd: Any, sd_embeds_text: str, compel_text: str
) -> None:
    a1111 = prompt_arguments(sd, [sd_embeds_text], None, weighting="sdEmbeds", clip_skip=None)
    compel = prompt_arguments(sd, [compel_text], None, weighting="compel", clip_skip=None)

    assert close(a1111["prompt_embeds"], compel["prompt_embeds"])


def test_break_encodes_each_chunk_apart(sd: Any) -> None:
    arguments = prompt_arguments(
        sd, ["a cat BREAK a dog"], None, weighting="sdEmbeds", clip_skip=None
    )
    cat, empty = sd_embeds(sd, ["a cat"])
    dog, _ = sd_embeds(sd, ["a dog"])

    assert close(arguments["prompt_embeds"], torch.cat([cat, dog], dim=1))
    # The negative (none given: the empty prompt) is padded to the same length with itself.
    assert close(arguments["negative_prompt_embeds"], torch.cat([empty, empty], dim=1))


def test_long_weighted_prompts_are_not_cut_and_a_batch_shares_one_length(sd: Any) -> None:
    long = "a (red)1.2 cat, " * 12  # 96 tokens: the tiny tokenizer spends one on each byte
    arguments = prompt_arguments(sd, ["cat", long], ["dog", ""], weighting="compel", clip_skip=None)

    assert arguments["prompt_embeds"].shape == (2, 154, 32)
    assert arguments["negative_prompt_embeds"].shape == (2, 154, 32)
    cat, dog = sd_embeds(sd, ["cat"], ["dog"])
    empty, _ = sd_embeds(sd, [""])
    assert close(arguments["prompt_embeds"][:1], torch.cat([cat, empty], dim=1))
    assert close(arguments["negative_prompt_embeds"][:1], torch.cat([dog, empty], dim=1))
    assert images(sd, **arguments).shape == (2, 64, 64, 3)


def test_deeply_nested_weights_multiply(sd: Any) -> None:
    depth = 12  # without pyparsing's memoization compel takes ~40 s to parse this
    nested = "(" * depth + "cat" + ")1.1" * depth
    arguments = prompt_arguments(sd, [nested], None, weighting="compel", clip_skip=None)
    flat = prompt_arguments(
        sd, [f"(cat){ROUND**depth!r}"], None, weighting="compel", clip_skip=None
    )

    assert close(arguments["prompt_embeds"], flat["prompt_embeds"])


def test_escaped_parentheses_are_text(sd: Any) -> None:
    arguments = prompt_arguments(sd, [r"\(cat\)"], None, weighting="compel", clip_skip=None)

    assert close(arguments["prompt_embeds"], sd_embeds(sd, ["(cat)"])[0])


@pytest.mark.parametrize(
    ("weighting", "text"),
    [
        ("compel", "a (cat"),
        ("compel", "a cat)"),
        ("compel", '("a", "b").blend(0.5)'),
        ("compel", '("a", "b").blend(x, y)'),
        ("compel", "a cat.swap(dog)"),
        ("compel", "withLora(style, 0.5) a cat"),
        ("compel", "(" * (MAX_NESTING + 1) + "cat" + ")" * (MAX_NESTING + 1)),
        ("sdEmbeds", "a (cat:1.2.3)"),
    ],
)
def test_malformed_weighting_syntax_is_a_prompt_syntax_error(
    sd: Any, weighting: str, text: str
) -> None:
    with pytest.raises(PromptSyntaxError) as raised:
        prompt_arguments(sd, [text], None, weighting=weighting, clip_skip=None)
    assert raised.value.parameter == "positivePrompt"

    with pytest.raises(PromptSyntaxError) as raised:
        prompt_arguments(sd, ["cat"], [text], weighting=weighting, clip_skip=None)
    assert raised.value.parameter == "negativePrompt"


@pytest.mark.parametrize("skip", [1, 2])
def test_clip_skip_leaves_out_layers_of_the_positive_prompt_as_diffusers_does(
    sd: Any, skip: int
) -> None:
    plain = prompt_arguments(sd, ["a cat"], ["a dog"], weighting=None, clip_skip=skip)
    weighted = prompt_arguments(
        sd, ["(a cat:1.0)"], ["a dog"], weighting="sdEmbeds", clip_skip=skip
    )
    reference = skipped_reference(sd, ["a cat"], skip)
    _, negative = sd_embeds(sd, ["a cat"], ["a dog"])

    for arguments in (plain, weighted):
        assert close(arguments["prompt_embeds"], reference)
        # diffusers encodes negative prompts in full whatever clip_skip says.
        assert close(arguments["negative_prompt_embeds"], negative)
    assert not close(reference, sd_embeds(sd, ["a cat"])[0])


def test_clip_skip_changes_the_images_alike_with_and_without_weighting(sd: Any) -> None:
    none = images(sd, **prompt_arguments(sd, ["a cat"], None, weighting=None, clip_skip=None))
    skipped = images(sd, **prompt_arguments(sd, ["a cat"], None, weighting=None, clip_skip=1))
    weighted = images(
        sd, **prompt_arguments(sd, ["(a cat)1.0"], None, weighting="compel", clip_skip=1)
    )

    assert np.abs(none - skipped).max() > 1e-3
    np.testing.assert_allclose(weighted, skipped, atol=1e-6)


def test_multi_vector_textual_inversion_tokens_expand_as_in_diffusers(
    tiny_models_dir: Path,
) -> None:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_models_dir / "impasto-tiny")
    hidden = pipeline.text_encoder.config.hidden_size
    pipeline.load_textual_inversion({"<two>": torch.randn(2, hidden)}, token="<two>")
    weighted = prompt_arguments(pipeline, ["(<two>)1.0 cat"], None, weighting="compel", clip_skip=0)
    skipped = prompt_arguments(pipeline, ["<two> cat"], None, weighting=None, clip_skip=1)

    assert close(weighted["prompt_embeds"], sd_embeds(pipeline, ["<two> cat"])[0])
    expanded = pipeline.maybe_convert_prompt("<two> cat", pipeline.tokenizer)
    assert close(skipped["prompt_embeds"], skipped_reference(pipeline, [expanded], 1))


def test_text_encoder_loras_reach_the_weighted_embeddings(
    tiny_models_dir: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    from impasto.backends.tiny_assets import TINY_LORA_WEIGHTS, ensure_tiny_lora

    pipeline_dir = tiny_models_dir / "impasto-tiny"
    lora = ensure_tiny_lora(tmp_path / "lora", pipeline_dir)
    pipeline = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    without = sd_embeds(pipeline, ["cat"])[0]
    pipeline.load_lora_weights(str(lora), weight_name=TINY_LORA_WEIGHTS, adapter_name="style")
    pipeline.set_adapters(["style"], [0.7])
    weighted = prompt_arguments(pipeline, ["(cat)1.0"], None, weighting="compel", clip_skip=None)

    expected = sd_embeds(pipeline, ["cat"])[0]
    assert not close(expected, without)
    assert close(weighted["prompt_embeds"], expected)


# -- SDXL ---------------------------------------------------------------------------------------


def xl_embeds(
    pipeline: Any,
    prompts: list[str],
    negatives: list[str] | None = None,
    clip_skip: int | None = None,
) -> dict[str, Any]:
    with torch.no_grad():
        four = pipeline.encode_prompt(
            prompts,
            device="cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negatives,
            clip_skip=clip_skip,
        )
    names = (
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    )
    return dict(zip(names, four, strict=True))


def test_sdxl_weighting_gives_diffusers_embeddings_with_pooled_ones_and_runs(xl: Any) -> None:
    for negatives in (
        None,
        ["ugly dog"],
    ):  # none: zeros, as diffusers' force_zeros_for_empty_prompt
        arguments = prompt_arguments(
            xl, ["(cat)1.0 on a mat"], negatives, weighting="compel", clip_skip=None
        )
        expected = xl_embeds(xl, ["cat on a mat"], negatives)
        assert arguments.keys() == expected.keys()
        for name, tensor in expected.items():
            assert close(arguments[name], tensor), name

    heavier = prompt_arguments(
        xl, ["(cat)1.5 on a mat", "a dog"], None, weighting="compel", clip_skip=None
    )
    plain = xl_embeds(xl, ["cat on a mat", "a dog"])
    assert not close(heavier["prompt_embeds"][:1], plain["prompt_embeds"][:1])
    # The pooled embedding is the prompt's text without its weights.
    assert close(heavier["pooled_prompt_embeds"], plain["pooled_prompt_embeds"])
    assert images(xl, **heavier).shape == (2, 64, 64, 3)


def test_sdxl_clip_skip_with_weighting_matches_diffusers_clip_skip(xl: Any) -> None:
    arguments = prompt_arguments(xl, ["(a cat:1.0)"], ["a dog"], weighting="sdEmbeds", clip_skip=1)
    expected = xl_embeds(xl, ["a cat"], ["a dog"], clip_skip=1)

    for name, tensor in expected.items():
        assert close(arguments[name], tensor), name
    assert not close(expected["prompt_embeds"], xl_embeds(xl, ["a cat"])["prompt_embeds"])
    assert prompt_arguments(xl, ["a cat"], None, weighting=None, clip_skip=1) == {
        "prompt": ["a cat"],
        "clip_skip": 1,
    }


def test_sdxl_refiner_with_one_encoder_is_weighted_too(
    xl_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from impasto.backends.tiny_assets import ensure_tiny_xl_refiner

    directory = ensure_tiny_xl_refiner(tmp_path_factory.mktemp("refiner") / "refiner", xl_dir)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(directory)
    arguments = prompt_arguments(refiner, ["(cat)1.0"], ["dog"], weighting="compel", clip_skip=0)

    assert prompt_weighting_problem(refiner) is None
    for name, tensor in xl_embeds(refiner, ["cat"], ["dog"]).items():
        assert close(arguments[name], tensor), name


# -- pipelines that cannot ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def t5_pipelines(sd: Any) -> list[Any]:
    """A FLUX and an SD3 pipeline (real classes, tiny encoders, no denoiser): what the checks
    read is their components and call signature."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    tokenizer = sd.tokenizer
    vocab = len(tokenizer)
    clip = CLIPTextConfig(
        vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    t5 = T5Config(vocab_size=vocab, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    flux = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=CLIPTextModel(clip),
        tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(t5),
        tokenizer_2=tokenizer,
        transformer=None,
    )
    sd3 = StableDiffusion3Pipeline(
        transformer=None,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=CLIPTextModelWithProjection(clip),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip),
        tokenizer_2=tokenizer,
        text_encoder_3=None,  # SD3 without its T5 still encodes prompts the SD3 way
        tokenizer_3=None,
    )
    return [flux, sd3]


def test_sd_and_sdxl_pipelines_support_weighting_and_clip_skip(sd: Any, xl: Any) -> None:
    for pipeline in (sd, xl):
        assert prompt_weighting_problem(pipeline) is None
        assert clip_skip_supported(pipeline)


def test_flux_and_sd3_cannot_weight_prompts(t5_pipelines: list[Any]) -> None:
    flux, sd3 = t5_pipelines

    assert "T5EncoderModel" in (prompt_weighting_problem(flux) or "")
    assert "StableDiffusion3Pipeline" in (prompt_weighting_problem(sd3) or "")
    for pipeline in (flux, sd3):
        with pytest.raises(UnsupportedPromptOption) as raised:
            prompt_arguments(pipeline, ["cat"], None, weighting="compel", clip_skip=None)
        assert raised.value.parameter == "promptWeighting"
    # diffusers' SD3 applies clip_skip to its CLIP encoders; FLUX has no clip_skip.
    assert clip_skip_supported(sd3)
    assert not clip_skip_supported(flux)
    with pytest.raises(UnsupportedPromptOption) as raised:
        prompt_arguments(flux, ["cat"], None, weighting=None, clip_skip=1)
    assert raised.value.parameter == "clipSkip"
    assert prompt_arguments(flux, ["cat"], None, weighting=None, clip_skip=0) == {"prompt": ["cat"]}
