"""Tiny random-weight text models for the `caption` and `promptEnhance` tasks: a BLIP captioner
and a Llama-architecture instruction model, each with a tokenizer whose vocabulary of plain
English words is written here, saved with `save_pretrained` and loaded by the very classes
that load real models (Captioner, TextGeneratorEnhancer), so tests and an offline first run go
through the real transformers code path.

The weights are random, so the texts are strings of random words; what the builds guarantee is
that they are never empty: the captioner's output bias and the enhancer's generation config keep
special tokens (other than the end of text) from being generated, so decoding with
`skip_special_tokens` always leaves words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from impasto.backends.tiny import build_atomically
from impasto.backends.tiny_assets import _seeded

# Bump when an architecture, vocabulary or weights change, so old copies are rebuilt.
TINY_TEXT_VERSION = 1

# Plain words an image prompt or caption is made of; both tokenizers are built from them.
_WORDS = """
a an the of in on at with and or to from by over under near behind above below beside through
into across along around between for is are was very this that its their his her one two three
four many few some several small large big tiny huge tall short long wide narrow old young new
ancient modern bright dark light soft hard warm cold wet dry calm wild quiet loud empty busy
red orange yellow green blue purple pink brown black white gray grey golden silver pale deep
vivid colorful glowing shiny misty foggy cloudy sunny rainy snowy stormy dusty smoky hazy
man woman child boy girl person people family friends crowd face portrait smile eyes hair hand
dog cat bird horse cow sheep fish fox wolf bear lion tiger owl eagle butterfly dragon robot
tree trees forest flower flowers grass leaves garden field meadow hill hills mountain mountains
river lake sea ocean beach wave waves island desert sand rock rocks stone cave valley canyon
sky cloud clouds sun moon star stars night day morning evening sunset sunrise dawn dusk
city town village street road bridge tower castle house home room kitchen window door wall
roof building buildings skyline market cafe shop station train car bus boat ship plane bicycle
table chair bed lamp book books cup bottle plate food bread fruit apple cake coffee tea
painting photo photograph picture image illustration drawing sketch render scene view shot
style art artwork detailed intricate highly realistic photorealistic cinematic dramatic
dreamy surreal fantasy magical epic moody serene peaceful cozy elegant rustic futuristic
vintage retro minimal abstract lighting light shadow shadows reflection reflections glow
color colors texture textures background foreground composition depth focus bokeh lens
wide-angle closeup close-up aerial macro sharp blurry grain film oil watercolor ink pencil
digital concept matte studio natural golden-hour neon volumetric rim ambient highlights
standing sitting walking running flying swimming sleeping reading holding looking wearing
playing smiling covered filled surrounded lit painted carved made built floating falling
dress coat hat shirt jacket boots scarf glasses umbrella bag sword shield crown armor
wood wooden metal glass stone marble gold iron steel paper cloth silk leather velvet
high quality masterpiece award winning trending beautiful stunning lovely gorgeous rich
top side front back left right center middle edge corner distance horizon path trail
summer winter autumn spring season weather rain snow wind fog mist storm thunder fire smoke
water ice steam light-rays sunbeams candle lantern lights stained ornate grand tiny-details
system user assistant prompt image describe expand short vivid detailed answer only words
"""

_PUNCTUATION = [".", ",", "!", "?", ":", ";", "-", "'", '"', "(", ")"]


def _vocabulary() -> list[str]:
    """The words in first-seen order, without repeats."""
    return list(dict.fromkeys(_WORDS.split()))


# -- the captioner ----------------------------------------------------------------------------

_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# BLIP's decoder starts from this token (a real BLIP tokenizer adds it as its bos token).
_BLIP_BOS = "[DEC]"
_CAPTIONER_IMAGE_SIZE = 32
# Strongly below any random logit: these tokens are never generated.
_NEVER = -1.0e4


def _build_captioner(directory: Path) -> None:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    tokens = [*_BERT_SPECIALS, _BLIP_BOS, *_PUNCTUATION, *_vocabulary()]
    # transformers 5's BERT tokenizer takes its WordPiece vocabulary as a mapping (and saves it
    # in tokenizer.json); every entry is a whole word, so decoded text is words.
    tokenizer = BertTokenizer(
        vocab={token: index for index, token in enumerate(tokens)},
        do_lower_case=True,
        model_max_length=64,
    )
    tokenizer.add_special_tokens({"bos_token": _BLIP_BOS})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in [*_BERT_SPECIALS, _BLIP_BOS]}
    image_processor = BlipImageProcessor(
        size={"height": _CAPTIONER_IMAGE_SIZE, "width": _CAPTIONER_IMAGE_SIZE}
    )
    config = BlipConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "projection_dim": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": _CAPTIONER_IMAGE_SIZE,
            "patch_size": 8,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "encoder_hidden_size": 32,
            "intermediate_size": 64,
            "projection_dim": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 128,
            "bos_token_id": ids[_BLIP_BOS],
            "eos_token_id": ids["[SEP]"],
            "pad_token_id": ids["[PAD]"],
            "sep_token_id": ids["[SEP]"],
        },
        projection_dim=32,
        image_text_hidden_size=32,
    )
    import torch

    with _seeded(20261201):
        model = BlipForConditionalGeneration(config)
        model.eval()
        # Random weights would now and then pick [PAD], [CLS], ...: words only, so a decoded
        # caption is never empty.
        head = model.text_decoder.cls.predictions
        with torch.no_grad():
            for name in ("[PAD]", "[UNK]", "[CLS]", "[MASK]", _BLIP_BOS):
                head.decoder.bias[ids[name]] = _NEVER
                head.bias[ids[name]] = _NEVER
    model.save_pretrained(directory)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)


def ensure_tiny_captioner(directory: Path) -> Path:
    """Build and save the tiny BLIP captioner under `directory` unless a current copy is there."""
    return build_atomically(
        directory,
        _build_captioner,
        {"version": TINY_TEXT_VERSION, "asset": "captioner"},
        prefix=".tiny-captioner-",
    )


# -- the prompt enhancer ----------------------------------------------------------------------

_PAD, _UNK, _IM_START, _IM_END = "<|pad|>", "<|unk|>", "<|im_start|>", "<|im_end|>"
# ChatML, as Qwen's instruct models use it.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _enhancer_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tokens = [_PAD, _UNK, _IM_START, _IM_END, *_PUNCTUATION, *_vocabulary()]
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(WordLevel(vocab, unk_token=_UNK))
    backend.normalizer = normalizers.Lowercase()
    # Words, and each punctuation mark on its own; decoding joins words with spaces and tidies
    # the space before punctuation (WordPiece's decoder, with no subwords to merge).
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=_PAD,
        unk_token=_UNK,
        eos_token=_IM_END,
        bos_token=None,
        additional_special_tokens=[_IM_START],
        model_max_length=512,
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def _build_enhancer(directory: Path) -> None:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _enhancer_tokenizer()
    pad, unk, start, end = (
        tokenizer.convert_tokens_to_ids(t) for t in (_PAD, _UNK, _IM_START, _IM_END)
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=end,
        pad_token_id=pad,
    )
    with _seeded(20261202):
        model = LlamaForCausalLM(config)
    # Random weights would now and then pick <|pad|> or <|im_start|>: words only (and the end
    # of text), so a decoded prompt is never empty.
    model.generation_config = GenerationConfig(
        eos_token_id=end, pad_token_id=pad, suppress_tokens=[pad, unk, start]
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def ensure_tiny_enhancer(directory: Path) -> Path:
    """Build and save the tiny Llama-architecture prompt enhancer under `directory` unless a
    current copy is there."""
    return build_atomically(
        directory,
        _build_enhancer,
        {"version": TINY_TEXT_VERSION, "asset": "enhancer"},
        prefix=".tiny-enhancer-",
    )
