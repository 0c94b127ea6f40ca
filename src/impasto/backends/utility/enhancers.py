"""Prompt enhancement for Runware's `promptEnhance` task: a short prompt rewritten into
`versions` richer text-to-image prompts of at most `max_length` characters each.

Two models answer it: a local instruction-tuned language model (TextGeneratorEnhancer, run on a
device's worker thread) and an OpenAI-compatible chat endpoint the operator runs or rents
(ChatEndpointEnhancer: vLLM, llama.cpp's server, Ollama, a hosted API). Both send the same
instruction and clean the answers the same way (`clean_prompt`): models like to add a
"Prompt:" label, wrap the answer in quotes or run over the length asked for.

Each version is sampled with its own seed (request.seed + i), so the same request gives the same
texts again (on the same model and device). A version that repeats an earlier one, or is empty
once cleaned, is sampled again with the next seed, at most versions x 3 samples in all.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from impasto.backends.entries import ModelEntry
from impasto.backends.openai_engine import engine_text, parse_error
from impasto.backends.utility.base import EnhanceRequest, UtilityOutput, UtilityRequest
from impasto.backends.utility.local import (
    LocalUtilityModel,
    other_task,
    to_device,
    weights_bytes,
)
from impasto.protocol.errors import (
    InferenceError,
    ProviderError,
    ProviderKeyRejected,
    ProviderRateLimited,
    ProviderTimeout,
)

log = logging.getLogger("impasto.backends.utility.enhancers")

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
SYSTEM_PROMPT = (
    "You expand short prompts for text-to-image models into one vivid, detailed prompt: the "
    "subject, its setting, the lighting, colours, mood, composition and art style, as a "
    "comma-separated description. Keep what the user asked for and add nothing that "
    "contradicts it. Answer with the prompt only."
)
DEFAULT_TEMPERATURE = 0.9
DEFAULT_TOP_P = 0.95
DEFAULT_MAX_NEW_TOKENS = 120
DEFAULT_MIN_NEW_TOKENS = 8
DEFAULT_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 10.0
# A chat completion with one short prompt; anything far larger is not one.
MAX_RESPONSE_BYTES = 1024 * 1024
# Samples per version asked for, at most, while looking for distinct texts.
TRIES_PER_VERSION = 3
# Seeds wrap into the range every sampler takes (torch, vLLM, llama.cpp: a signed 64-bit int).
_SEED_RANGE = 2**63

_LABEL = re.compile(
    r"^(?:here(?:'s| is)\b[^:]{0,60}:|(?:(?:enhanced|expanded|improved|rewritten|final|new|"
    r"detailed)\s+)?(?:image\s+)?prompt\s*:)\s*",
    re.IGNORECASE,
)
# Quotes (straight, curly, guillemets), backticks and markdown emphasis around an answer.
_WRAPPERS = "\"'`*\u201c\u201d\u2018\u2019\u00ab\u00bb "


# -- shared by both enhancers -------------------------------------------------------------------


def user_message(prompt: str, max_length: int) -> str:
    """The user's turn: their prompt and the length limit."""
    return f"Short prompt: {prompt}\nAnswer in at most {max_length} characters."


def plain_instruction(prompt: str, max_length: int, system: str = SYSTEM_PROMPT) -> str:
    """The same request as one text, for a model without a chat template: it goes on after
    the closing "Prompt:"."""
    return (
        f"Instruction: {system} Answer in at most {max_length} characters.\n"
        f"Short prompt: {prompt}\nPrompt:"
    )


def chat_messages(
    prompt: str, max_length: int, system: str = SYSTEM_PROMPT
) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": user_message(prompt, max_length)},
    ]


def token_budget(max_length: int, max_new_tokens: int) -> int:
    """New tokens to allow for `max_length` characters: English runs about four characters a
    token, so a third of the limit (plus a little) lets the model finish before the cut."""
    return max(1, min(max_new_tokens, math.ceil(max_length / 3) + 8))


def clean_prompt(text: str, max_length: int) -> str:
    """A model's answer as one prompt: no label ("Prompt:", "Here is ...:"), no wrapping
    quotes, single spaces, at most `max_length` characters, cut at a word boundary."""
    for paragraph in re.split(r"\n\s*\n", text):
        cleaned = " ".join(paragraph.split())
        # Labels and quotes nest ("Prompt: \"...\""): peel until nothing changes.
        previous = None
        while cleaned != previous:
            previous = cleaned
            cleaned = _LABEL.sub("", cleaned).strip(_WRAPPERS)
        if cleaned:
            return cut_at_word(cleaned, max_length)
    return ""


def cut_at_word(text: str, max_length: int) -> str:
    """`text` shortened to `max_length` characters, at the last space that fits when there is
    one, without trailing separators."""
    if len(text) <= max_length:
        return text
    head = text[:max_length]
    if not text[max_length].isspace():
        space = head.rfind(" ")
        if space > 0:
            head = head[:space]
    return head.rstrip(" ,;:-\u2013\u2014")


def version_seed(seed: int, attempt: int) -> int:
    return (seed + attempt) % _SEED_RANGE


class _Versions:
    """The distinct cleaned texts found so far."""

    def __init__(self, request: EnhanceRequest) -> None:
        self.wanted = request.versions
        self.max_length = request.max_length
        self.texts: list[str] = []
        self._seen: set[str] = set()

    @property
    def attempts(self) -> range:
        return range(self.wanted * TRIES_PER_VERSION)

    @property
    def done(self) -> bool:
        return len(self.texts) >= self.wanted

    def add(self, answer: str) -> None:
        text = clean_prompt(answer, self.max_length)
        key = text.casefold()
        if text and key not in self._seen:
            self._seen.add(key)
            self.texts.append(text)


def _check_request(request: UtilityRequest, air: str) -> EnhanceRequest:
    if not isinstance(request, EnhanceRequest):
        raise other_task(air, "a prompt enhancer", "promptEnhance")
    return request


def _number(
    settings: Mapping[str, Any], key: str, default: float, low: float, high: float = math.inf
) -> float:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        bounds = f"between {low} and {high}" if high < math.inf else f">= {low}"
        raise ValueError(f"settings.{key} must be a number {bounds}")
    return float(value)


def _integer(settings: Mapping[str, Any], key: str, default: int, low: int) -> int:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"settings.{key} must be an integer >= {low}")
    return value


# -- a local language model -------------------------------------------------------------------


class TextGeneratorEnhancer(LocalUtilityModel[EnhanceRequest, tuple[Any, Any]]):
    """An instruction-tuned causal language model (default Qwen/Qwen2.5-0.5B-Instruct) run on
    one device's worker thread, loaded on first use.

    Settings (the entry's `settings`):
      temperature     sampling temperature (default 0.9)
      top_p           nucleus sampling mass (default 0.95)
      max_new_tokens  the most tokens per version (default 120; fewer for a short max_length)
      min_new_tokens  the fewest tokens per version (default 8), so an answer is never empty
      system_prompt   the instruction (default: SYSTEM_PROMPT)
      dtype           "float32" | "float16" | "bfloat16" on a GPU (default float32; the CPU
                      always computes in float32)

    A tokenizer without a chat template gets a plain "Instruction: ...\\nPrompt:" text.
    """

    key_prefix = "prompt-enhancer:"
    action = "enhance the prompt"

    def _configure(self, settings: Mapping[str, Any]) -> None:
        try:
            self._temperature = _number(settings, "temperature", DEFAULT_TEMPERATURE, 0.01)
            self._top_p = _number(settings, "top_p", DEFAULT_TOP_P, 0.01, 1.0)
            self._max_new_tokens = _integer(settings, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS, 1)
            self._min_new_tokens = _integer(settings, "min_new_tokens", DEFAULT_MIN_NEW_TOKENS, 0)
        except ValueError as exc:
            raise ValueError(f"model {self.entry.air}: {exc}") from None
        system = settings.get("system_prompt", SYSTEM_PROMPT)
        self._system = str(system) if system else SYSTEM_PROMPT

    def _check(self, request: UtilityRequest) -> EnhanceRequest:
        return _check_request(request, self.entry.air)

    # -- on the worker thread -----------------------------------------------------------------

    def _load(self, device: str) -> tuple[tuple[Any, Any], int]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.source, local_files_only=self.offline)
        model = AutoModelForCausalLM.from_pretrained(
            self.source, local_files_only=self.offline, dtype=self._torch_dtype()
        )
        model.to(device)
        model.eval()
        return (tokenizer, model), weights_bytes(model)

    def _infer(self, loaded: tuple[Any, Any], request: EnhanceRequest) -> list[str]:
        """`request.versions` distinct prompts (fewer if the model keeps repeating itself)."""
        tokenizer, model = loaded
        inputs = to_device(self._prompt_inputs(tokenizer, request), self.worker.device, model.dtype)
        max_new = token_budget(request.max_length, self._max_new_tokens)
        options: dict[str, Any] = {
            "do_sample": True,
            "temperature": self._temperature,
            "top_p": self._top_p,
            "max_new_tokens": max_new,
            "min_new_tokens": min(self._min_new_tokens, max_new),
        }
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            options["pad_token_id"] = tokenizer.eos_token_id
        versions = _Versions(request)
        start = inputs["input_ids"].shape[1]
        for attempt in versions.attempts:
            if versions.done:
                break
            output = self._sample(model, inputs, options, version_seed(request.seed, attempt))
            versions.add(str(tokenizer.decode(output[0, start:], skip_special_tokens=True)))
        if not versions.texts:
            raise InferenceError("The prompt enhancer produced no text.")
        if not versions.done:
            log.info(
                "prompt enhancer %s gave %d distinct prompts of %d asked for",
                self.entry.air,
                len(versions.texts),
                versions.wanted,
            )
        return versions.texts

    def _prompt_inputs(self, tokenizer: Any, request: EnhanceRequest) -> Mapping[str, Any]:
        if not getattr(tokenizer, "chat_template", None):
            text = plain_instruction(request.prompt, request.max_length, self._system)
            return dict(tokenizer(text, return_tensors="pt"))
        from jinja2 import TemplateError

        messages = chat_messages(request.prompt, request.max_length, self._system)
        try:
            return dict(self._chat_inputs(tokenizer, messages))
        except TemplateError:
            # Some templates (Gemma's) refuse a system turn: fold it into the user's.
            system, user = messages[0]["content"], messages[1]["content"]
            merged = [{"role": "user", "content": f"{system}\n\n{user}"}]
            return dict(self._chat_inputs(tokenizer, merged))

    @staticmethod
    def _chat_inputs(tokenizer: Any, messages: list[dict[str, str]]) -> Any:
        return tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )

    def _sample(
        self, model: Any, inputs: Mapping[str, Any], options: dict[str, Any], seed: int
    ) -> Any:
        import torch

        # The seed goes into a forked RNG state, so the sampling is repeatable and the rest of
        # the process keeps its own random stream.
        devices = (
            [torch.device(self.worker.device).index or 0]
            if self.worker.device.startswith("cuda")
            else []
        )
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            return model.generate(**inputs, **options)


# -- an OpenAI-compatible chat endpoint --------------------------------------------------------


class ChatEndpointEnhancer:
    """A prompt enhancer served by an OpenAI-compatible chat endpoint: one
    `POST {url}/chat/completions` with n=1 and its own seed per version.

    Settings (the entry's `settings`):
      url          the endpoint's base URL, e.g. http://host:8000/v1
      model        the model name sent
      api_key_env  the environment variable holding its key (the caller reads it and passes
                   `api_key`)
      timeout_s    seconds to wait for one answer (default 60)
      temperature  sampling temperature (default 0.9)
      top_p        nucleus sampling mass (default 0.95)
      max_tokens   the most tokens per version (default 120; fewer for a short max_length)
      system_prompt the instruction (default: SYSTEM_PROMPT)

    Which addresses may be called is the caller's policy; this class calls the one it is given.
    """

    def __init__(
        self,
        entry: ModelEntry,
        *,
        api_key: str | None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        settings = entry.settings
        try:
            url = settings.get("url")
            parts = urlsplit(url) if isinstance(url, str) else None
            if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    "settings.url must be the endpoint's http(s) base URL, e.g. http://host:8000/v1"
                )
            model = settings.get("model")
            if not isinstance(model, str) or not model:
                raise ValueError("settings.model must be the endpoint's model name (a string)")
            self.timeout_s = _number(settings, "timeout_s", DEFAULT_TIMEOUT_S, 0.001)
            self._temperature = _number(settings, "temperature", DEFAULT_TEMPERATURE, 0.01)
            self._top_p = _number(settings, "top_p", DEFAULT_TOP_P, 0.01, 1.0)
            self._max_tokens = _integer(settings, "max_tokens", DEFAULT_MAX_NEW_TOKENS, 1)
        except ValueError as exc:
            raise ValueError(f"model {entry.air}: {exc}") from None
        system = settings.get("system_prompt", SYSTEM_PROMPT)
        self._system = str(system) if system else SYSTEM_PROMPT
        self.entry = entry
        self.model = model
        self.endpoint = f"{str(url).rstrip('/')}/chat/completions"
        self._key = api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            transport=transport,
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s, connect=min(CONNECT_TIMEOUT_S, self.timeout_s)),
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"ChatEndpointEnhancer({self.entry.air!r}, {self.endpoint!r})"

    async def run(self, request: UtilityRequest) -> UtilityOutput:
        """`request.versions` distinct prompts (fewer if the endpoint keeps repeating itself)."""
        enhance = _check_request(request, self.entry.air)
        versions = _Versions(enhance)
        messages = chat_messages(enhance.prompt, enhance.max_length, self._system)
        for attempt in versions.attempts:
            if versions.done:
                break
            body = {
                "model": self.model,
                "messages": messages,
                "n": 1,
                "seed": version_seed(enhance.seed, attempt),
                "temperature": self._temperature,
                "top_p": self._top_p,
                "max_tokens": token_budget(enhance.max_length, self._max_tokens),
                "stream": False,
            }
            versions.add(await self._complete(body))
        if not versions.texts:
            raise ProviderError(f"The engine serving {self.entry.air} answered no prompt text.")
        return versions.texts

    async def close(self) -> None:
        await self._client.aclose()

    async def _complete(self, body: dict[str, Any]) -> str:
        """The text of one chat completion."""
        try:
            async with self._client.stream("POST", self.endpoint, json=body) as response:
                content = await _read_capped(response, MAX_RESPONSE_BYTES)
        except httpx.TimeoutException:
            log.warning("%s did not answer in %.0f s", self.endpoint, self.timeout_s)
            raise ProviderTimeout(
                f"The engine serving {self.entry.air} did not answer in time."
            ) from None
        except httpx.HTTPError as exc:
            log.warning("request to %s failed: %s", self.endpoint, type(exc).__name__)
            raise ProviderError(
                f"The engine serving {self.entry.air} could not be reached."
            ) from None
        if content is None:
            log.warning("%s answered more than %d bytes", self.endpoint, MAX_RESPONSE_BYTES)
            raise ProviderError(f"The engine serving {self.entry.air} answered too much.")
        status = response.status_code
        if not 200 <= status < 300:
            raise self._status_error(status, content)
        return self._answer_text(content)

    def _status_error(self, status: int, content: bytes) -> ProviderError:
        engine = f"The engine serving {self.entry.air}"
        try:
            document: Any = json.loads(content)
        except ValueError:
            document = None
        message = parse_error(document)[0] or content.decode("utf-8", "replace")
        said = engine_text(message, self._key)
        log.warning("%s answered HTTP %d: %s", self.endpoint, status, said)
        said = f": {said}" if said else "."
        if status in (401, 403):
            return ProviderKeyRejected(
                f"{engine} refused this server's API key (HTTP {status}); the operator must "
                "check the key named by the model's api_key_env."
            )
        if status == 429:
            return ProviderRateLimited(f"{engine} is over its rate limit, try again later{said}")
        return ProviderError(f"{engine} failed (HTTP {status}){said}")

    def _answer_text(self, content: bytes) -> str:
        try:
            document = json.loads(content)
            text = document["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            log.warning("%s answered something that is not a chat completion", self.endpoint)
            raise ProviderError(
                f"The engine serving {self.entry.air} answered something that is not a chat "
                "completion."
            ) from None
        if text is None:
            return ""
        if not isinstance(text, str):
            raise ProviderError(
                f"The engine serving {self.entry.air} answered a message without text."
            )
        return text


async def _read_capped(response: httpx.Response, limit: int) -> bytes | None:
    """The body, or None when it runs over `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
