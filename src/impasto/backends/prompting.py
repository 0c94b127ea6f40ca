"""How Runware's `promptWeighting` and `clipSkip` reach a diffusers pipeline call.

Without weighting the prompts go to the pipeline as text and `clipSkip` as diffusers' own
`clip_skip` (for SD 1.x/2.x it is computed here: diffusers 0.42 looks for the final layer norm
where transformers 5 no longer keeps it). With weighting ("compel" or "sdEmbeds") the prompts
are parsed by `prompt_syntax` into compel's prompt objects, encoded here with the compel library
into `prompt_embeds` (and SDXL's pooled embeddings), and the pipeline skips its own text
encoding.

The embeddings agree with diffusers' own, so that a plain prompt gives the same images whether
weighting is asked for or not: SD 1.x/2.x take the text encoder's last hidden state, SDXL the
penultimate hidden states of its two encoders side by side and the pooled output of the second.
`clip_skip = k` leaves out the last k layers as diffusers does (SD: hidden state -(k + 1) through
the final layer norm; SDXL: hidden state -(k + 2)) and, as in diffusers, applies to the positive
prompts only. SDXL without negative prompts gets zero negative embeddings when the pipeline says
`force_zeros_for_empty_prompt`, as diffusers does.

Beyond diffusers: weighted prompts are not cut at 77 tokens but encoded in 77-token chunks, and
every prompt and negative of a call is padded with empty-prompt chunks to the same length.
SDXL's pooled embedding comes from the prompt's text without its weights.

The syntax's names (`PromptSyntaxError`, `check_prompt_syntax`, `parse_sd_embeds`, `MAX_NESTING`)
are re-exported from here for the modules that import them from `prompting`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from impasto.backends.prompt_syntax import MAX_NESTING as MAX_NESTING
from impasto.backends.prompt_syntax import PromptSyntaxError as PromptSyntaxError
from impasto.backends.prompt_syntax import _parse
from impasto.backends.prompt_syntax import check_prompt_syntax as check_prompt_syntax
from impasto.backends.prompt_syntax import parse_sd_embeds as parse_sd_embeds

WEIGHTINGS = ("compel", "sdEmbeds")


class UnsupportedPromptOption(ValueError):
    """The pipeline cannot honour `promptWeighting` or `clipSkip` (named by `parameter`)."""

    def __init__(self, message: str, parameter: str) -> None:
        super().__init__(message)
        self.parameter = parameter


# -- what a pipeline supports -------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """The CLIP text encoders of an SD or SDXL pipeline, as (tokenizer, encoder), in the order
    diffusers concatenates them; `pooled` for the SDXL family."""

    encoders: tuple[tuple[Any, Any], ...]
    pooled: bool


def _call_parameters(pipeline: Any) -> set[str]:
    return set(inspect.signature(pipeline.__call__).parameters)


def _layout(pipeline: Any) -> _Layout | str:
    """The pipeline's text encoders, or why its prompts cannot be weighted here."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    name = type(pipeline).__name__
    components: dict[str, Any] = dict(getattr(pipeline, "components", None) or {})
    # Keys with None values count: SD3 without its T5 still encodes prompts the SD3 way.
    extra = sorted(
        key
        for key in components
        if key.startswith("text_encoder") and key not in ("text_encoder", "text_encoder_2")
    )
    first, second = components.get("text_encoder"), components.get("text_encoder_2")
    present = [encoder for encoder in (first, second) if encoder is not None]
    kinds = ", ".join(
        type(components[key]).__name__
        for key in ("text_encoder", "text_encoder_2", *extra)
        if components.get(key) is not None
    )
    clip_only = (first is None or isinstance(first, CLIPTextModel)) and (
        second is None or isinstance(second, CLIPTextModelWithProjection)
    )
    if extra or not present or not clip_only:
        return (
            f"{name} encodes prompts with {kinds or 'no text encoder'}; prompt weighting works "
            "with the CLIP text encoders of Stable Diffusion 1.x, 2.x and SDXL only."
        )
    pooled = second is not None
    needed = ["prompt_embeds", "negative_prompt_embeds"]
    if pooled:
        needed += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    parameters = _call_parameters(pipeline)
    missing = [parameter for parameter in needed if parameter not in parameters]
    if missing or (not pooled and "pooled_prompt_embeds" in parameters):
        return f"{name} does not take prompt embeddings the way SD and SDXL pipelines do."
    encoders = []
    for suffix, encoder in (("", first), ("_2", second)):
        if encoder is None:
            continue
        tokenizer = components.get(f"tokenizer{suffix}")
        if tokenizer is None:
            return f"{name} has text_encoder{suffix} but no tokenizer{suffix}."
        encoders.append((tokenizer, encoder))
    return _Layout(encoders=tuple(encoders), pooled=pooled)


def prompt_weighting_problem(pipeline: Any) -> str | None:
    """Why `promptWeighting` cannot be used with this pipeline (a sentence for the client), or
    None when it can: SD 1.x/2.x and SDXL pipelines, whose text encoders are CLIP, can; FLUX,
    SD3 and others with a T5 or other encoder cannot."""
    layout = _layout(pipeline)
    return layout if isinstance(layout, str) else None


def clip_skip_supported(pipeline: Any) -> bool:
    """Whether the pipeline's call takes diffusers' `clip_skip` (SD, SDXL, SD3; not FLUX)."""
    return "clip_skip" in _call_parameters(pipeline)


# -- encoding -----------------------------------------------------------------------------------


def _final_layer_norm(encoder: Any) -> Any:
    # transformers 5's CLIPTextModel holds its final layer norm itself; before, and inside
    # CLIPTextModelWithProjection, it sits on `text_model`.
    norm = getattr(encoder, "final_layer_norm", None)
    return norm if norm is not None else encoder.text_model.final_layer_norm


class _SkippedLayers:
    """A text encoder without its last `skip` layers, as compel calls it: `last_hidden_state`
    is hidden state -(skip + 1) through the final layer norm (diffusers' SD clip_skip), and
    `hidden_states` ends `skip` layers early, so that compel's penultimate pick is hidden state
    -(skip + 2) (diffusers' SDXL clip_skip)."""

    def __init__(self, encoder: Any, skip: int) -> None:
        self._encoder = encoder
        self._skip = skip

    @property
    def device(self) -> Any:
        return self._encoder.device

    @property
    def dtype(self) -> Any:
        return self._encoder.dtype

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        output_hidden_states: bool | None = None,
        return_dict: bool = True,
    ) -> Any:
        from types import SimpleNamespace

        output = self._encoder(
            input_ids, attention_mask, output_hidden_states=True, return_dict=True
        )
        hidden = tuple(output.hidden_states)[: -self._skip]
        return SimpleNamespace(
            last_hidden_state=_final_layer_norm(self._encoder)(hidden[-1]),
            hidden_states=hidden,
        )


class _MultiVectorTokens:
    """Expands a multi-vector textual-inversion token (`<t>`, loaded as `<t>`, `<t>_1`, ...) into
    all of its tokens, as diffusers' `maybe_convert_prompt` does for text prompts; compel asks
    through its `textual_inversion_manager` hook."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._added: dict[str, int] = dict(getattr(tokenizer, "added_tokens_encoder", {}) or {})

    def expand_textual_inversion_token_ids_if_necessary(self, token_ids: list[int]) -> list[int]:
        if not self._added:
            return token_ids
        expanded: list[int] = []
        for token_id in token_ids:
            expanded.append(token_id)
            token = self._tokenizer.convert_ids_to_tokens(token_id)
            index = 1
            while f"{token}_{index}" in self._added:
                expanded.append(self._added[f"{token}_{index}"])
                index += 1
        return expanded


def _compel(tokenizer: Any, encoder: Any, *, pooled: bool) -> Any:
    from compel import Compel, ReturnedEmbeddingsType  # type: ignore[import-untyped]

    kind = (
        ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
        if pooled
        else ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED
    )
    return Compel(
        tokenizer=tokenizer,
        text_encoder=encoder,
        textual_inversion_manager=_MultiVectorTokens(tokenizer),
        truncate_long_prompts=False,
        returned_embeddings_type=kind,
    )


def _pad(conditioning: Any, length: int, empty: Any) -> Any:
    """`conditioning` ([1, tokens, dim]) made `length` tokens long with empty-prompt chunks, as
    compel's `pad_conditioning_tensors_to_same_length` does."""
    import torch

    chunks = (length - conditioning.shape[1]) // empty.shape[1]
    return torch.cat([conditioning, *([empty.to(conditioning.dtype)] * chunks)], dim=1)


def _pooled_sources(conjunction: Any) -> list[tuple[str, float]]:
    """The texts (and weights) whose pooled embeddings make a prompt's pooled embedding: a blend
    blends them, any other prompt is its text with the weights left out."""
    from compel.prompt_parser import Blend  # type: ignore[import-untyped]

    def text_of(prompt: Any) -> str:
        return " ".join(part.text.strip() for part in prompt.children if part.text.strip())

    parts = conjunction.prompts
    if len(parts) == 1 and isinstance(parts[0], Blend):
        blend = parts[0]
        weights = [float(weight) for weight in blend.weights]
        total = sum(weights) if blend.normalize_weights else 1.0
        return [
            (text_of(prompt), weight / total)
            for prompt, weight in zip(blend.prompts, weights, strict=True)
        ]
    return [(" ".join(text for text in map(text_of, parts) if text), 1.0)]


def _pooled(tokenizer: Any, encoder: Any, conjunctions: Sequence[Any]) -> Any:
    """SDXL's pooled embeddings ([batch, dim]) from the last encoder, as diffusers makes them."""
    import torch

    sources = [_pooled_sources(conjunction) for conjunction in conjunctions]
    texts = [text for parts in sources for text, _ in parts]
    ids = tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    every = encoder(ids.to(encoder.device), return_dict=True).text_embeds
    pooled, row = [], 0
    for parts in sources:
        rows = every[row : row + len(parts)]
        weights = torch.tensor([weight for _, weight in parts], dtype=rows.dtype)
        pooled.append((rows * weights.to(rows.device)[:, None]).sum(dim=0))
        row += len(parts)
    return torch.stack(pooled)


@dataclass(frozen=True)
class _Encoded:
    """One encoder's conditioning for a list of prompts ([1, tokens, dim] each), with the
    empty-prompt chunk that pads them."""

    tensors: list[Any]
    empty: Any


def _encode(compel: Any, conjunctions: Sequence[Any]) -> _Encoded:
    tensors = [compel.build_conditioning_tensor_for_conjunction(c)[0] for c in conjunctions]
    return _Encoded(tensors=tensors, empty=compel.conditioning_provider.empty_z)


def _join(sides: list[_Encoded], length: int) -> Any:
    """The batch ([prompts, length, dims of all encoders]): padded, then side by side."""
    import torch

    return torch.cat(
        [
            torch.cat([_pad(tensor, length, side.empty) for tensor in side.tensors], dim=0)
            for side in sides
        ],
        dim=-1,
    )


def _weighted_arguments(
    pipeline: Any,
    layout: _Layout,
    prompts: Sequence[str],
    negatives: Sequence[str] | None,
    weighting: str,
    skip: int,
) -> dict[str, Any]:
    import torch

    positive = [_parse(text, weighting, "positivePrompt") for text in prompts]
    negative = [_parse(text, weighting, "negativePrompt") for text in negatives or []]
    config = getattr(pipeline, "config", None)
    if negatives is None and not (
        layout.pooled and getattr(config, "force_zeros_for_empty_prompt", False)
    ):
        # diffusers encodes an empty negative prompt then; SDXL mostly takes zeros instead.
        negative = [_parse("", weighting, "negativePrompt")] * len(prompts)
    with torch.no_grad():
        positive_sides, negative_sides = [], []
        for tokenizer, encoder in layout.encoders:
            plain = _compel(tokenizer, encoder, pooled=layout.pooled)
            skipped = (
                _compel(tokenizer, _SkippedLayers(encoder, skip), pooled=layout.pooled)
                if skip
                else plain
            )
            positive_sides.append(_encode(skipped, positive))
            if negative:
                negative_sides.append(_encode(plain, negative))
        length = max(
            tensor.shape[1] for side in positive_sides + negative_sides for tensor in side.tensors
        )
        prompt_embeds = _join(positive_sides, length)
        arguments: dict[str, Any] = {
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": (
                _join(negative_sides, length) if negative else torch.zeros_like(prompt_embeds)
            ),
        }
        if layout.pooled:
            tokenizer, encoder = layout.encoders[-1]
            pooled = _pooled(tokenizer, encoder, positive)
            arguments["pooled_prompt_embeds"] = pooled
            arguments["negative_pooled_prompt_embeds"] = (
                _pooled(tokenizer, encoder, negative) if negative else torch.zeros_like(pooled)
            )
    return arguments


def _clip_skipped_arguments(
    pipeline: Any,
    layout: _Layout,
    prompts: Sequence[str],
    negatives: Sequence[str] | None,
    skip: int,
) -> dict[str, Any]:
    """Plain SD prompts with `skip` CLIP layers left out, encoded as diffusers' encode_prompt
    encodes them for `clip_skip` (tokens cut at 77; negatives in full)."""
    import torch

    tokenizer, encoder = layout.encoders[0]
    config = getattr(encoder, "config", None)
    use_mask = bool(getattr(config, "use_attention_mask", False))

    def encode(texts: Sequence[str], layers_left_out: int) -> Any:
        if hasattr(pipeline, "maybe_convert_prompt"):
            texts = pipeline.maybe_convert_prompt(list(texts), tokenizer)
        tokens = tokenizer(
            list(texts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(encoder.device) if use_mask else None
        output = encoder(
            tokens.input_ids.to(encoder.device), attention_mask=mask, output_hidden_states=True
        )
        if not layers_left_out:
            return output.last_hidden_state
        return _final_layer_norm(encoder)(output.hidden_states[-(layers_left_out + 1)])

    with torch.no_grad():
        return {
            "prompt_embeds": encode(prompts, skip),
            "negative_prompt_embeds": encode(
                negatives if negatives is not None else [""] * len(prompts), 0
            ),
        }


def prompt_arguments(
    pipeline: Any,
    prompts: Sequence[str],
    negatives: Sequence[str] | None,
    *,
    weighting: str | None,
    clip_skip: int | None,
) -> dict[str, Any]:
    """The keyword arguments that carry the prompts into a call of `pipeline`.

    Without `weighting`: `prompt`, `negative_prompt` (when `negatives` is given) and diffusers'
    `clip_skip`, except that SD 1.x/2.x pipelines get their clip-skipped `prompt_embeds` and
    `negative_prompt_embeds` from here (diffusers' own raises with transformers 5). With
    `weighting` ("compel" or "sdEmbeds"): `prompt_embeds` and `negative_prompt_embeds`, and for
    SDXL `pooled_prompt_embeds` and `negative_pooled_prompt_embeds`, all padded to one length.
    `negatives`, when given, has one entry per prompt; None means no negative prompt was given.
    `clip_skip` 0 or None skips no layer. Raises PromptSyntaxError for malformed weighting
    syntax and UnsupportedPromptOption when the pipeline cannot weight prompts or skip CLIP
    layers.
    """
    if weighting is not None and weighting not in WEIGHTINGS:
        raise ValueError(f"unknown prompt weighting {weighting!r}; known: {', '.join(WEIGHTINGS)}")
    if clip_skip is not None and clip_skip < 0:
        raise ValueError(f"clip_skip must not be negative, not {clip_skip}")
    if negatives is not None and len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    skip = clip_skip or 0
    if skip and not clip_skip_supported(pipeline):
        raise UnsupportedPromptOption(
            f"{type(pipeline).__name__} cannot skip CLIP layers.", "clipSkip"
        )
    layout = _layout(pipeline)
    if weighting is None:
        if skip and isinstance(layout, _Layout) and not layout.pooled:
            # diffusers 0.42's SD encode_prompt reaches the final layer norm through
            # `text_encoder.text_model`, which transformers 5's CLIPTextModel no longer has:
            # its own clip_skip raises AttributeError, so the same encoding is done here.
            return _clip_skipped_arguments(pipeline, layout, prompts, negatives, skip)
        arguments: dict[str, Any] = {"prompt": list(prompts)}
        if negatives is not None:
            arguments["negative_prompt"] = list(negatives)
        if skip:
            arguments["clip_skip"] = skip
        return arguments
    if isinstance(layout, str):
        raise UnsupportedPromptOption(layout, "promptWeighting")
    return _weighted_arguments(pipeline, layout, prompts, negatives, weighting, skip)
