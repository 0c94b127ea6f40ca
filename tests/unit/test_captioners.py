"""The captioner: the real BLIP code path (AutoProcessor + AutoModelForImageTextToText) on a
tiny random-weight model on a real CPU worker."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from PIL import Image

from impasto.backends.devices import DeviceWorker
from impasto.backends.entries import ModelEntry
from impasto.backends.utility.base import CaptionRequest, EnhanceRequest
from impasto.backends.utility.captioners import Captioner, _LoadedCaptioner, guess_style
from impasto.backends.utility.tiny_text import ensure_tiny_captioner
from impasto.protocol.errors import InferenceError, InvalidParameter, UnsupportedParameter
from impasto.protocol.rules import ModelRules, SizeRule

T = TypeVar("T")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(awaitable: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(awaitable, 60)

    return asyncio.run(bounded())


def noise_image(width: int = 48, height: int = 32, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def entry(**settings: Any) -> ModelEntry:
    air = "impasto:tiny-captioner@1"
    return ModelEntry(
        air=air,
        name=air,
        architecture="captioner",
        backend="captioner",
        rules=ModelRules(air=air, sizes=SizeRule(default=(64, 64))),
        settings=settings,
        category="captioner",
    )


@pytest.fixture(scope="module")
def tiny_captioner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_captioner(tmp_path_factory.mktemp("models") / "impasto-tiny-captioner")


@pytest.fixture
def worker() -> Iterator[DeviceWorker]:
    worker = DeviceWorker("cpu")
    yield worker
    worker.shutdown()


def test_the_tiny_captioner_describes_an_image_in_words(
    tiny_captioner: Path, worker: DeviceWorker
) -> None:
    captioner = Captioner(entry(max_new_tokens=12), tiny_captioner, worker, offline=True)
    texts = run(captioner.run(CaptionRequest(image=noise_image())))
    assert isinstance(texts, list)
    assert len(texts) == 1
    caption = texts[0]
    assert caption
    assert caption == " ".join(caption.split())
    assert worker.models.resident() == ["captioner:impasto:tiny-captioner@1"]
    # The same image gives the same caption (beam search, no sampling).
    assert run(captioner.run(CaptionRequest(image=noise_image()))) == [caption]
    run(captioner.close())


def test_a_request_prompt_is_the_prefix_the_caption_continues(
    tiny_captioner: Path, worker: DeviceWorker
) -> None:
    captioner = Captioner(entry(max_new_tokens=6), tiny_captioner, worker, offline=True)
    [caption] = run(captioner.run(CaptionRequest(image=noise_image(), prompt="A picture of")))
    assert caption.startswith("a picture of ")
    assert len(caption) > len("a picture of ")
    run(captioner.close())


def test_close_unloads_the_weights_and_the_next_run_loads_them_again(
    tiny_captioner: Path, worker: DeviceWorker
) -> None:
    captioner = Captioner(entry(max_new_tokens=4), tiny_captioner, worker, offline=True)
    run(captioner.run(CaptionRequest(image=noise_image(20, 20))))
    run(captioner.close())
    assert worker.models.resident() == []
    assert captioner._loaded is None
    [caption] = run(captioner.run(CaptionRequest(image=noise_image(20, 20).convert("L"))))
    assert caption
    run(captioner.close())


def test_a_captioner_refuses_other_tasks(tiny_captioner: Path, worker: DeviceWorker) -> None:
    captioner = Captioner(entry(), tiny_captioner, worker, offline=True)
    request = EnhanceRequest(prompt="a cat", max_length=100, versions=1, seed=1)
    with pytest.raises(InvalidParameter, match="only serves caption"):
        run(captioner.run(request))


def test_bad_settings_are_refused_when_the_entry_is_made(
    tiny_captioner: Path, worker: DeviceWorker
) -> None:
    with pytest.raises(ValueError, match=r"settings\.style"):
        Captioner(entry(style="vqa"), tiny_captioner, worker)
    with pytest.raises(ValueError, match=r"settings\.dtype"):
        Captioner(entry(dtype="int8"), tiny_captioner, worker)
    with pytest.raises(ValueError, match=r"settings\.max_new_tokens"):
        Captioner(entry(max_new_tokens=0), tiny_captioner, worker)


def test_the_style_follows_the_model_type() -> None:
    assert guess_style("blip") == "blip"
    assert guess_style("florence2") == "florence2"
    assert guess_style("qwen2_5_vl") == "chat"
    assert guess_style(None) == "chat"


# -- the Florence-2 and chat inputs, against a stand-in processor and model --------------------

WORDS = ["", "a", "red", "fox", "<image>", "describe"]


class FakeProcessor:
    """Records what it is given; token ids index WORDS, 0 is a special token."""

    chat_template = "{{ messages }}"

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> dict[str, Any]:
        import torch

        self.calls.append(kwargs)
        return {"input_ids": torch.tensor([[4, 5]]), "pixel_values": torch.zeros(1, 3, 4, 4)}

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
        import torch

        self.calls.append({"messages": messages, **kwargs})
        return {"input_ids": torch.tensor([[4, 5, 5]]), "pixel_values": torch.zeros(1, 3, 4, 4)}

    def batch_decode(self, ids: Any, skip_special_tokens: bool = False) -> list[str]:
        return ["  ".join(WORDS[int(i)] for i in row) for row in ids]


class FakeModel:
    """Answers the prompt's ids followed by `answer` (a decoder-only model's output)."""

    def __init__(self, answer: list[int], echo: bool) -> None:
        import torch

        self.dtype = torch.float32
        self.answer = answer
        self.echo = echo
        self.options: dict[str, Any] = {}

    def generate(self, input_ids: Any, pixel_values: Any, **options: Any) -> Any:
        import torch

        self.options = options
        new = torch.tensor([self.answer])
        return torch.cat([input_ids, new], dim=1) if self.echo else new


def faked(worker: DeviceWorker, style: str, answer: list[int], **settings: Any) -> Captioner:
    captioner = Captioner(entry(**settings), "unused", worker)
    captioner._loaded = _LoadedCaptioner(
        FakeProcessor(), FakeModel(answer, echo=style == "chat"), style, 1
    )
    return captioner


def test_a_chat_model_gets_the_image_and_instruction_and_answers_after_its_prompt(
    worker: DeviceWorker,
) -> None:
    captioner = faked(worker, "chat", [1, 2, 3])
    image = noise_image()
    assert run(captioner.run(CaptionRequest(image=image))) == ["a red fox"]
    assert captioner._loaded is not None
    [call] = captioner._loaded.processor.calls
    [turn] = call["messages"]
    assert turn["role"] == "user"
    assert turn["content"][0]["type"] == "image"
    assert turn["content"][0]["image"].size == image.size
    assert turn["content"][1] == {
        "type": "text",
        "text": "Describe this image in one detailed sentence.",
    }
    assert call["add_generation_prompt"] is True
    assert captioner._loaded.model.options["num_beams"] == 1
    assert captioner._loaded.model.options["max_new_tokens"] == 60


def test_a_chat_models_instruction_comes_from_the_request_then_the_settings(
    worker: DeviceWorker,
) -> None:
    captioner = faked(worker, "chat", [3], prompt="Name the animal.")
    run(captioner.run(CaptionRequest(image=noise_image())))
    run(captioner.run(CaptionRequest(image=noise_image(), prompt="What colour is it?")))
    assert captioner._loaded is not None
    texts = [c["messages"][0]["content"][1]["text"] for c in captioner._loaded.processor.calls]
    assert texts == ["Name the animal.", "What colour is it?"]


def test_florence_gets_its_task_token_and_refuses_free_text(worker: DeviceWorker) -> None:
    captioner = faked(worker, "florence2", [1, 3, 0], num_beams=2)
    assert run(captioner.run(CaptionRequest(image=noise_image()))) == ["a fox"]
    run(captioner.run(CaptionRequest(image=noise_image(), prompt="<CAPTION>")))
    assert captioner._loaded is not None
    tasks = [c["text"] for c in captioner._loaded.processor.calls]
    assert tasks == ["<MORE_DETAILED_CAPTION>", "<CAPTION>"]
    assert captioner._loaded.model.options["num_beams"] == 2
    with pytest.raises(UnsupportedParameter, match="no free-text prompt") as caught:
        run(captioner.run(CaptionRequest(image=noise_image(), prompt="what is this?")))
    assert caught.value.parameter == "prompt"


def test_a_caption_of_nothing_but_special_tokens_is_an_inference_error(
    worker: DeviceWorker,
) -> None:
    captioner = faked(worker, "chat", [0, 0])
    with pytest.raises(InferenceError, match="produced no text"):
        run(captioner.run(CaptionRequest(image=noise_image())))
