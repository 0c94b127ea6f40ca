"""The prompt enhancers: the real transformers generation path on a tiny random-weight model on
a real CPU worker, and the chat-endpoint client against httpx.MockTransport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from impasto.backends.devices import DeviceWorker
from impasto.backends.entries import ModelEntry
from impasto.backends.utility.base import CaptionRequest, EnhanceRequest
from impasto.backends.utility.enhancers import (
    SYSTEM_PROMPT,
    ChatEndpointEnhancer,
    TextGeneratorEnhancer,
    clean_prompt,
    cut_at_word,
)
from impasto.backends.utility.tiny_text import ensure_tiny_enhancer
from impasto.protocol.errors import (
    InvalidParameter,
    ProviderError,
    ProviderKeyRejected,
    ProviderRateLimited,
    ProviderTimeout,
)
from impasto.protocol.rules import ModelRules, SizeRule

T = TypeVar("T")


def run(awaitable: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(awaitable, 60)

    return asyncio.run(bounded())


def entry(backend: str = "text-generator", **settings: Any) -> ModelEntry:
    air = "impasto:tiny-enhancer@1"
    return ModelEntry(
        air=air,
        name=air,
        architecture="prompt-enhancer",
        backend=backend,
        rules=ModelRules(air=air, sizes=SizeRule(default=(64, 64))),
        settings=settings,
        category="prompt-enhancer",
    )


# -- cleaning answers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ('Prompt: "a red fox in the snow"', "a red fox in the snow"),
        ("Enhanced prompt:  a red   fox\nin the snow", "a red fox in the snow"),
        ("Here is an expanded prompt:\n\n**a red fox, snowy forest**", "a red fox, snowy forest"),
        ("\u201ca red fox\u201d", "a red fox"),
        ("   ", ""),
    ],
)
def test_answers_lose_labels_quotes_and_extra_space(answer: str, expected: str) -> None:
    assert clean_prompt(answer, 200) == expected


def test_long_answers_are_cut_at_a_word_boundary() -> None:
    assert cut_at_word("a red fox, in the snow", 12) == "a red fox"
    assert cut_at_word("a red fox in", 9) == "a red fox"
    assert cut_at_word("abcdefghijklmnop", 5) == "abcde"
    assert cut_at_word("short", 50) == "short"


# -- the local model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_enhancer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_enhancer(tmp_path_factory.mktemp("models") / "impasto-tiny-enhancer")


@pytest.fixture
def worker(one_torch_thread: None) -> Iterator[DeviceWorker]:
    worker = DeviceWorker("cpu")
    yield worker
    worker.shutdown()


def test_the_tiny_enhancer_gives_distinct_prompts_within_the_length(
    tiny_enhancer: Path, worker: DeviceWorker
) -> None:
    enhancer = TextGeneratorEnhancer(entry(), tiny_enhancer, worker, offline=True)
    request = EnhanceRequest(prompt="a fox in the snow", max_length=60, versions=3, seed=7)
    texts = run(enhancer.run(request))
    assert isinstance(texts, list)
    assert 1 <= len(texts) <= 3
    assert len(set(texts)) == len(texts)
    for text in texts:
        assert text
        assert len(text) <= 60
        assert text == " ".join(text.split())
    assert worker.models.resident() == ["prompt-enhancer:impasto:tiny-enhancer@1"]
    # Same seed, same texts; another seed, other texts.
    assert run(enhancer.run(request)) == texts
    other = run(enhancer.run(EnhanceRequest("a fox in the snow", 60, 3, seed=8)))
    assert other != texts
    run(enhancer.close())
    assert worker.models.resident() == []


def test_a_tokenizer_without_a_chat_template_gets_plain_text(
    tiny_enhancer: Path, worker: DeviceWorker
) -> None:
    enhancer = TextGeneratorEnhancer(entry(max_new_tokens=10), tiny_enhancer, worker, offline=True)
    tokenizer, _ = worker_call(worker, enhancer._ensure_loaded)
    tokenizer.chat_template = None
    [text] = run(enhancer.run(EnhanceRequest("a lighthouse", 300, 1, seed=1)))
    assert text
    run(enhancer.close())


def test_a_template_that_refuses_a_system_turn_gets_it_in_the_users(
    tiny_enhancer: Path, worker: DeviceWorker
) -> None:
    enhancer = TextGeneratorEnhancer(entry(max_new_tokens=10), tiny_enhancer, worker, offline=True)
    tokenizer, _ = worker_call(worker, enhancer._ensure_loaded)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n"
    )
    [text] = run(enhancer.run(EnhanceRequest("a lighthouse", 300, 1, seed=1)))
    assert text
    run(enhancer.close())


def worker_call(worker: DeviceWorker, fn: Callable[[], T]) -> T:
    return run(worker.run(fn))


def test_an_enhancer_refuses_other_tasks(tiny_enhancer: Path, worker: DeviceWorker) -> None:
    from PIL import Image

    enhancer = TextGeneratorEnhancer(entry(), tiny_enhancer, worker, offline=True)
    with pytest.raises(InvalidParameter, match="only serves promptEnhance"):
        run(enhancer.run(CaptionRequest(image=Image.new("RGB", (8, 8)))))


def test_bad_local_settings_are_refused(tiny_enhancer: Path, worker: DeviceWorker) -> None:
    with pytest.raises(ValueError, match=r"settings\.temperature"):
        TextGeneratorEnhancer(entry(temperature="hot"), tiny_enhancer, worker)
    with pytest.raises(ValueError, match=r"settings\.dtype"):
        TextGeneratorEnhancer(entry(dtype="fp8"), tiny_enhancer, worker)


# -- the chat endpoint ------------------------------------------------------------------------

URL = "http://engine.test:8000/v1"


def completion(text: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
    }


def chat_enhancer(
    handler: Callable[[httpx.Request], httpx.Response],
    api_key: str | None = "sk-test",
    **settings: Any,
) -> ChatEndpointEnhancer:
    values = {"url": URL, "model": "qwen-7b", "api_key_env": "CHAT_KEY", **settings}
    return ChatEndpointEnhancer(
        entry("openai-chat", **values), api_key=api_key, transport=httpx.MockTransport(handler)
    )


def enhance(enhancer: ChatEndpointEnhancer, request: EnhanceRequest) -> list[str]:
    async def go() -> list[str]:
        try:
            result = await enhancer.run(request)
        finally:
            await enhancer.close()
        assert isinstance(result, list)
        return result

    return run(go())


def test_the_endpoint_gets_one_call_per_version_with_its_own_seed() -> None:
    bodies: list[dict[str, Any]] = []
    headers: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.method == "POST"
        assert str(request.url) == f"{URL}/chat/completions"
        headers.append(request.headers.get("authorization", ""))
        body = json.loads(request.content)
        bodies.append(body)
        return httpx.Response(200, json=completion(f'Prompt: "a fox, version {body["seed"]}"'))

    texts = enhance(
        chat_enhancer(handler, temperature=0.5), EnhanceRequest("a fox", 100, 3, seed=41)
    )
    assert texts == ["a fox, version 41", "a fox, version 42", "a fox, version 43"]
    assert [b["seed"] for b in bodies] == [41, 42, 43]
    first = bodies[0]
    assert first["model"] == "qwen-7b"
    assert first["n"] == 1
    assert first["temperature"] == 0.5
    assert first["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert first["messages"][1]["role"] == "user"
    assert "a fox" in first["messages"][1]["content"]
    assert "100 characters" in first["messages"][1]["content"]
    assert headers == ["Bearer sk-test"] * 3


def test_the_endpoint_answer_is_cut_to_the_length_and_repeats_are_sampled_again() -> None:
    answers = iter(["a fox " * 40, "a fox " * 40, "a cat in a hat", "", "a cat in a hat"])
    seeds: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seeds.append(json.loads(request.content)["seed"])
        return httpx.Response(200, json=completion(next(answers)))

    texts = enhance(chat_enhancer(handler, api_key=None), EnhanceRequest("fox", 20, 2, seed=0))
    assert texts == ["a fox a fox a fox a", "a cat in a hat"]
    assert seeds == [0, 1, 2]


def test_an_endpoint_that_keeps_repeating_itself_gives_fewer_versions() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, json=completion("the same prompt"))

    texts = enhance(chat_enhancer(handler), EnhanceRequest("fox", 50, 2, seed=5))
    assert texts == ["the same prompt"]
    assert len(calls) == 6


def test_an_endpoint_that_answers_no_text_is_a_provider_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=completion(None))

    with pytest.raises(ProviderError, match="no prompt text"):
        enhance(chat_enhancer(handler), EnhanceRequest("fox", 50, 1, seed=5))


@pytest.mark.parametrize(
    ("status", "error", "message"),
    [
        (401, ProviderKeyRejected, "API key"),
        (403, ProviderKeyRejected, "API key"),
        (429, ProviderRateLimited, "rate limit"),
        (500, ProviderError, r"HTTP 500\): model exploded"),
        (404, ProviderError, r"HTTP 404\): no such model"),
    ],
)
def test_endpoint_statuses_map_to_provider_errors(
    status: int, error: type[ProviderError], message: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        said = "model exploded sk-test" if status == 500 else "no such model"
        return httpx.Response(status, json={"error": {"message": said}})

    with pytest.raises(error, match=message) as caught:
        enhance(chat_enhancer(handler), EnhanceRequest("fox", 50, 1, seed=5))
    assert type(caught.value) is error
    assert "sk-test" not in caught.value.message


def test_a_non_json_error_body_is_quoted_short() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>" + "bad gateway " * 100 + "</html>")

    with pytest.raises(ProviderError, match=r"HTTP 502\): <html>bad gateway") as caught:
        enhance(chat_enhancer(handler), EnhanceRequest("fox", 50, 1, seed=5))
    assert len(caught.value.message) < 300


@pytest.mark.parametrize(
    "content",
    [b"not json", b'{"choices": []}', b'{"choices": [{"message": {"content": 7}}]}', b"[]"],
)
def test_a_malformed_answer_is_a_provider_error(content: bytes) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=content)

    with pytest.raises(ProviderError):
        enhance(chat_enhancer(handler), EnhanceRequest("fox", 50, 1, seed=5))


def test_a_timeout_is_a_provider_timeout() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("too slow", request=request)

    with pytest.raises(ProviderTimeout):
        enhance(chat_enhancer(handler), EnhanceRequest("fox", 50, 1, seed=5))


def test_an_unreachable_endpoint_is_a_provider_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(ProviderError, match="could not be reached") as caught:
        enhance(chat_enhancer(handler), EnhanceRequest("fox", 50, 1, seed=5))
    assert type(caught.value) is ProviderError


def test_bad_endpoint_settings_are_refused() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("not called")

    with pytest.raises(ValueError, match=r"settings\.url"):
        chat_enhancer(handler, url="ftp://engine")
    with pytest.raises(ValueError, match=r"settings\.model"):
        chat_enhancer(handler, model="")
    with pytest.raises(ValueError, match=r"settings\.timeout_s"):
        chat_enhancer(handler, timeout_s=0)
