"""Image captioning for Runware's `caption` task: a transformers image-text-to-text model (BLIP,
Florence-2 or a small chat VLM) that describes an image in one text.

The three families take their input differently: BLIP captions an image alone or continues a
text prefix ("a picture of"), Florence-2 is told its task by a task token
(`<MORE_DETAILED_CAPTION>`), and a chat VLM (Qwen2.5-VL, SmolVLM) gets one user turn with the
image and an instruction through its chat template. `AutoModelForImageTextToText` loads all
three; the entry's `style` setting (or the model's config) says which input to build.

The helpers at the bottom (dtype, weight size, moving inputs) are shared with the local prompt
enhancer (enhancers.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from impasto.backends.devices import LOAD_LOCK, DeviceWorker
from impasto.backends.entries import ModelEntry
from impasto.backends.utility.base import CaptionRequest, UtilityOutput, UtilityRequest
from impasto.protocol.errors import InferenceError, InvalidParameter, UnsupportedParameter

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
DTYPES = ("float32", "float16", "bfloat16")


class Captioner:
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

    def __init__(
        self,
        entry: ModelEntry,
        source: str | Path,
        worker: DeviceWorker,
        *,
        offline: bool = False,
    ) -> None:
        settings = entry.settings
        problems = check_settings(settings)
        if problems:
            raise ValueError(f"model {entry.air}: {'; '.join(problems)}")
        self.entry = entry
        self.source = source
        self.worker = worker
        self.offline = offline
        self._style: str | None = settings.get("style")
        self._prompt: str | None = settings.get("prompt")
        self._max_new_tokens = int(settings.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        self._min_new_tokens = int(settings.get("min_new_tokens", 1))
        beams = settings.get("num_beams")
        self._num_beams: int | None = int(beams) if beams is not None else None
        self._dtype_name: str | None = settings.get("dtype")
        self._key = f"captioner:{entry.air}"
        self._loaded: _LoadedCaptioner | None = None

    def __repr__(self) -> str:
        return f"Captioner({self.entry.air!r}, {str(self.source)!r}, {self.worker.device!r})"

    async def run(self, request: UtilityRequest) -> UtilityOutput:
        """Caption `request.image`: a list of one text."""
        if not isinstance(request, CaptionRequest):
            raise InvalidParameter(
                f"Model {self.entry.air} is a captioning model; it only serves caption tasks.",
                code="invalidModel",
                parameter="model",
            )
        return [await self.worker.run(self._caption, request)]

    async def close(self) -> None:
        await self.worker.run(self._forget)

    # -- on the worker thread -----------------------------------------------------------------

    def _load(self) -> _LoadedCaptioner:
        loaded = self._loaded
        if loaded is None:
            loaded = self._loaded = self._from_pretrained()
        self.worker.models.use(self._key, loaded.size_bytes, self._unload)
        return loaded

    def _from_pretrained(self) -> _LoadedCaptioner:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        dtype = torch_dtype(self._dtype_name, self.worker.device)
        try:
            with LOAD_LOCK:
                processor = AutoProcessor.from_pretrained(
                    self.source, local_files_only=self.offline
                )
                model = AutoModelForImageTextToText.from_pretrained(
                    self.source, local_files_only=self.offline, dtype=dtype
                )
                model.to(self.worker.device)
                model.eval()
        except (OSError, ValueError, KeyError) as exc:
            log.error("could not load captioner %s from %s: %s", self.entry.air, self.source, exc)
            raise InferenceError(f"Model {self.entry.air} could not be loaded.") from exc
        style = self._style or guess_style(getattr(model.config, "model_type", None))
        log.info("loaded captioner %s (%s style) on %s", self.entry.air, style, self.worker.device)
        return _LoadedCaptioner(processor, model, style, weights_bytes(model))

    def _unload(self) -> None:
        if self._loaded is not None:
            self._loaded = None
            release_memory(self.worker.device)

    def _forget(self) -> None:
        self.worker.models.forget(self._key)
        self._unload()

    def _caption(self, request: CaptionRequest) -> str:
        import torch

        loaded = self._load()
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
        try:
            with torch.inference_mode():
                output = loaded.model.generate(**inputs, **options)
        except (RuntimeError, ValueError, IndexError) as exc:
            log.exception("captioner %s failed", self.entry.air)
            release_memory(self.worker.device)
            raise InferenceError(f"Model {self.entry.air} failed to caption the image.") from exc
        if loaded.style == "chat":
            # A decoder-only model answers after its prompt: keep the new tokens only.
            output = output[:, inputs["input_ids"].shape[1] :]
        text = loaded.processor.batch_decode(output, skip_special_tokens=True)[0]
        caption = " ".join(str(text).split())
        if not caption:
            raise InferenceError("The captioning model produced no text.")
        return caption

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


@dataclass(frozen=True)
class _LoadedCaptioner:
    processor: Any
    model: Any
    style: str
    size_bytes: int


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


# -- shared with the local prompt enhancer ------------------------------------------------------


def _is_int_at_least(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_dtype(settings: Mapping[str, Any]) -> list[str]:
    dtype = settings.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        return [f"settings.dtype must be one of {', '.join(DTYPES)}"]
    return []


def torch_dtype(name: str | None, device: str) -> Any:
    """The torch dtype for a `dtype` setting on `device`."""
    import torch

    # Half precision on a CPU is slow or unsupported: CPUs compute in float32.
    if not device.startswith("cuda") or name in (None, "float32"):
        return torch.float32
    return torch.float16 if name == "float16" else torch.bfloat16


def weights_bytes(model: Any) -> int:
    """The memory a model's parameters and buffers take, for the device's budget."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(int(t.numel()) * int(t.element_size()) for t in tensors)


def to_device(inputs: Mapping[str, Any], device: str, dtype: Any) -> dict[str, Any]:
    """Move a processor's tensors to `device`; floating ones (pixels) take the model's dtype."""
    moved: dict[str, Any] = {}
    for name, value in inputs.items():
        if hasattr(value, "to") and hasattr(value, "is_floating_point"):
            value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        moved[name] = value
    return moved


def release_memory(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
