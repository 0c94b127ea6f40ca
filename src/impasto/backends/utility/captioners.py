"""Image captioning for Runware's `caption` task: a transformers image-text-to-text model (BLIP,
Florence-2 or a small chat VLM) that describes an image in one text.

The three families take their input differently: BLIP captions an image alone or continues a
text prefix ("a picture of"), Florence-2 is told its task by a task token
(`<MORE_DETAILED_CAPTION>`), and a chat VLM (Qwen2.5-VL, SmolVLM) gets one user turn with the
image and an instruction through its chat template. `AutoModelForImageTextToText` loads all
three; the entry's `style` setting (or the model's config) says which input to build.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from impasto.backends.utility.base import CaptionRequest, UtilityRequest
from impasto.backends.utility.local import (
    LocalUtilityModel,
    check_dtype,
    other_task,
    to_device,
    weights_bytes,
)
from impasto.protocol.errors import InferenceError, UnsupportedParameter

log = logging.getLogger("impasto.backends.utility.captioners")

STYLES = ("blip", "florence2", "chat")
DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"
DEFAULT_CHAT_PROMPT = "Describe this image in one detailed sentence."
DEFAULT_FLORENCE_TASK = "<MORE_DETAILED_CAPTION>"
# Florence-2's captioning task tokens: the only prompts it was trained to follow.
FLORENCE_CAPTION_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
DEFAULT_MAX_NEW_TOKENS = 60
# Beam search makes BLIP's and Florence-2's captions markedly better; chat models decode greedily.
DEFAULT_BEAMS = {"blip": 3, "florence2": 3, "chat": 1}


@dataclass(frozen=True)
class _LoadedCaptioner:
    processor: Any
    model: Any
    style: str
    size_bytes: int


class Captioner(LocalUtilityModel[CaptionRequest, _LoadedCaptioner]):
    """A captioning model run on one device's worker thread, loaded on first use.

    Settings (the entry's `settings`):
      style           "blip" | "florence2" | "chat"; default: from the model's config
                      (model_type blip -> blip, florence2 -> florence2, anything else -> chat)
      prompt          the instruction: for chat models, default "Describe this image in one
                      detailed sentence."; for Florence-2 a caption task token, default
                      "<MORE_DETAILED_CAPTION>"; for BLIP an optional text prefix the caption
                      continues (default none). A request's prompt replaces it.
      max_new_tokens  the caption's length limit in tokens (default 60)
      min_new_tokens  at least this many tokens (default 1), so a caption is never empty
      num_beams       beam search width (default 3 for BLIP and Florence-2, 1 for chat models)
      dtype           "float32" | "float16" | "bfloat16" on a GPU (default float32; the CPU
                      always computes in float32)
    """

    key_prefix = "captioner:"
    action = "caption the image"
    memory_setting = "num_beams"

    def _configure(self, settings: Mapping[str, Any]) -> None:
        problems = check_settings(settings)
        if problems:
            raise ValueError(f"model {self.entry.air}: {'; '.join(problems)}")
        self._style: str | None = settings.get("style")
        self._prompt: str | None = settings.get("prompt")
        self._max_new_tokens = int(settings.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        self._min_new_tokens = int(settings.get("min_new_tokens", 1))
        beams = settings.get("num_beams")
        self._num_beams: int | None = int(beams) if beams is not None else None

    def _check(self, request: UtilityRequest) -> CaptionRequest:
        if not isinstance(request, CaptionRequest):
            raise other_task(self.entry.air, "a captioning model", "caption")
        return request

    # -- on the worker thread -----------------------------------------------------------------

    def _load(self, device: str) -> tuple[_LoadedCaptioner, int]:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(self.source, local_files_only=self.offline)
        model = AutoModelForImageTextToText.from_pretrained(
            self.source, local_files_only=self.offline, dtype=self._torch_dtype()
        )
        model.to(device)
        model.eval()
        style = self._style or guess_style(getattr(model.config, "model_type", None))
        log.info("captioner %s takes %s-style input", self.entry.air, style)
        loaded = _LoadedCaptioner(processor, model, style, weights_bytes(model))
        return loaded, loaded.size_bytes

    def _infer(self, loaded: _LoadedCaptioner, request: CaptionRequest) -> list[str]:
        """Caption `request.image`: a list of one text."""
        import torch

        image = request.image.convert("RGB")
        beams = self._num_beams or DEFAULT_BEAMS[loaded.style]
        options: dict[str, Any] = {
            "max_new_tokens": self._max_new_tokens,
            "min_new_tokens": min(self._min_new_tokens, self._max_new_tokens),
            "num_beams": beams,
            "do_sample": False,
        }
        inputs = self._inputs(loaded, image, request.prompt)
        inputs = to_device(inputs, self.worker.device, loaded.model.dtype)
        with torch.inference_mode():
            output = loaded.model.generate(**inputs, **options)
        if loaded.style == "chat":
            # A decoder-only model answers after its prompt: keep the new tokens only.
            output = output[:, inputs["input_ids"].shape[1] :]
        text = loaded.processor.batch_decode(output, skip_special_tokens=True)[0]
        caption = " ".join(str(text).split())
        if not caption:
            raise InferenceError("The captioning model produced no text.")
        return [caption]

    def _inputs(self, loaded: _LoadedCaptioner, image: Any, prompt: str | None) -> Any:
        """The processor's tensors for one image and the instruction of this style."""
        processor = loaded.processor
        instruction = prompt if prompt is not None and prompt.strip() else self._prompt
        if loaded.style == "blip":
            # BLIP continues a text prefix, or captions from nothing.
            text = instruction.strip() if instruction else None
            return processor(images=image, text=text, return_tensors="pt")
        if loaded.style == "florence2":
            task = (instruction or DEFAULT_FLORENCE_TASK).strip()
            if task not in FLORENCE_CAPTION_TASKS:
                raise UnsupportedParameter(
                    f"Model {self.entry.air} (Florence-2) takes no free-text prompt; its prompt "
                    f"may only be one of {', '.join(FLORENCE_CAPTION_TASKS)}.",
                    parameter="prompt",
                )
            return processor(text=task, images=image, return_tensors="pt")
        if getattr(processor, "chat_template", None) is None:
            raise InferenceError(
                f"Model {self.entry.air} has no chat template; its entry needs style blip or "
                "florence2."
            )
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": image},
                    {"type": "text", "text": instruction or DEFAULT_CHAT_PROMPT},
                ],
            }
        ]
        return processor.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )


def guess_style(model_type: str | None) -> str:
    """The input style of a model by its config's model_type."""
    if model_type == "blip":
        return "blip"
    if model_type == "florence2":
        return "florence2"
    return "chat"


def check_settings(settings: Mapping[str, Any]) -> list[str]:
    """What is wrong with a captioner entry's settings (empty: nothing)."""
    problems = []
    style = settings.get("style")
    if style is not None and style not in STYLES:
        problems.append(f"settings.style must be one of {', '.join(STYLES)}")
    prompt = settings.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        problems.append("settings.prompt must be a string")
    for key in ("max_new_tokens", "num_beams"):
        if not _is_int_at_least(settings.get(key, 1), 1):
            problems.append(f"settings.{key} must be an integer >= 1")
    if not _is_int_at_least(settings.get("min_new_tokens", 0), 0):
        problems.append("settings.min_new_tokens must be an integer >= 0")
    problems.extend(check_dtype(settings))
    return problems


def _is_int_at_least(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low
