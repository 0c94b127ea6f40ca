"""The openai-images backend against httpx.MockTransport: what it sends, how it reads the
answer, how every failure becomes a Runware error item, and when it re-sends."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from impasto.backends import openai_images
from impasto.backends.base import GeneratedImage, GenerationJob, Outcome
from impasto.backends.devices import DevicePool
from impasto.backends.factory import BackendContext, create_backend, unavailable_models
from impasto.backends.openai_engine import check_settings, engine_text
from impasto.backends.openai_images import OpenAIImagesBackend
from impasto.backends.registry import ModelEntry, ModelRegistry, ModelsFileError
from impasto.protocol.errors import ImpastoError, ProviderNotConfigured
from impasto.protocol.rules import ModelRules, SizeRule

KEY = "sk-unit-" + "a1b2c3d4" * 4
KEY_ENV = "IMPASTO_TEST_ENGINE_KEY"
URL = "http://engine.internal:30000/v1"
AIR = "engine:sglang@1"
Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_images, "RETRY_BACKOFF_S", 0.0)
    monkeypatch.setenv(KEY_ENV, KEY)


def entry(**settings: Any) -> ModelEntry:
    values: dict[str, Any] = {"url": URL, "model": "Qwen/Qwen-Image", "api_key_env": KEY_ENV}
    values.update(settings)
    return ModelEntry(
        air=AIR,
        name=AIR,
        architecture="unknown",
        backend="openai-images",
        rules=ModelRules(air=AIR, sizes=SizeRule(default=(1024, 1024))),
        settings={k: v for k, v in values.items() if v is not None},
    )


def job(index: int = 0, **fields: Any) -> GenerationJob:
    values: dict[str, Any] = {
        "task_uuid": "task-1",
        "index": index,
        "model": AIR,
        "prompt": "a lighthouse at dusk",
        "width": 96,
        "height": 64,
        "seed": 42 + index,
    }
    values.update(fields)
    return GenerationJob(**values)


def png(size: tuple[int, int] = (96, 64), color: Any = (10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def b64_answer(size: tuple[int, int] = (96, 64), color: Any = (10, 200, 30)) -> httpx.Response:
    encoded = base64.b64encode(png(size, color)).decode()
    return httpx.Response(200, json={"created": 1, "data": [{"b64_json": encoded}]})


class Recorder:
    """A MockTransport handler: answers from `handler`, records every request."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


def run(
    handler: Handler,
    jobs: Sequence[GenerationJob] | None = None,
    *,
    context: BackendContext | None = None,
    **settings: Any,
) -> tuple[list[Outcome], Recorder, list[tuple[list[str], int]]]:
    recorder = Recorder(handler)
    backend = OpenAIImagesBackend(entry(**settings), context, transport=recorder.transport)
    reported: list[tuple[list[str], int]] = []

    def progress(batch: Sequence[GenerationJob], percent: int) -> None:
        reported.append(([j.job_id for j in batch], percent))

    async def go() -> list[Outcome]:
        try:
            return await backend.generate(jobs or [job()], progress, lambda j, d: None)
        finally:
            await backend.close()

    return asyncio.run(asyncio.wait_for(go(), 10)), recorder, reported


def only_error(outcomes: list[Outcome]) -> ImpastoError:
    (outcome,) = outcomes
    assert isinstance(outcome, ImpastoError), outcome
    return outcome


# -- the request ------------------------------------------------------------------------------


def test_request_shape_path_fields_and_bearer_key_from_the_env_var() -> None:
    outcomes, recorder, _ = run(lambda r: b64_answer())
    (request,) = recorder.requests
    assert request.method == "POST"
    assert str(request.url) == f"{URL}/images/generations"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == {
        "model": "Qwen/Qwen-Image",
        "prompt": "a lighthouse at dusk",
        "n": 1,
        "size": "96x64",
        "response_format": "b64_json",
        "seed": 42,
    }
    assert isinstance(outcomes[0], GeneratedImage)


def test_optional_fields_are_sent_when_the_job_has_them() -> None:
    sampled = job(negative_prompt="fog", steps=12, cfg_scale=4.5)
    _, recorder, _ = run(lambda r: b64_answer(), [sampled], url=URL + "/")
    body = json.loads(recorder.requests[0].content)
    assert body["negative_prompt"] == "fog"
    assert body["num_inference_steps"] == 12
    assert body["guidance_scale"] == 4.5
    assert str(recorder.requests[0].url) == f"{URL}/images/generations"


def test_no_key_no_authorization_header(monkeypatch: pytest.MonkeyPatch) -> None:
    _, recorder, _ = run(lambda r: b64_answer(), api_key_env=None)
    assert "authorization" not in recorder.requests[0].headers


def test_one_request_per_job_with_its_own_seed() -> None:
    jobs = [job(i) for i in range(3)]
    outcomes, recorder, _ = run(lambda r: b64_answer(), jobs)
    assert [json.loads(r.content)["seed"] for r in recorder.requests] == [42, 43, 44]
    assert all(json.loads(r.content)["n"] == 1 for r in recorder.requests)
    assert [o.seed for o in outcomes if isinstance(o, GeneratedImage)] == [42, 43, 44]
    backend = OpenAIImagesBackend(entry(concurrency=3))
    assert backend.batch_limit(jobs[0]) == 1
    assert backend.batch_key(jobs[0]) != backend.batch_key(jobs[1])
    assert backend.concurrency == 3
    assert KEY not in repr(backend)


# -- the answer -------------------------------------------------------------------------------


def test_b64_json_is_decoded_into_the_image_and_progress_goes_0_then_100() -> None:
    outcomes, _, reported = run(lambda r: b64_answer(color=(10, 200, 30)))
    (outcome,) = outcomes
    assert isinstance(outcome, GeneratedImage)
    assert outcome.image.size == (96, 64)
    assert outcome.image.getpixel((5, 5)) == (10, 200, 30)
    assert outcome.seed == 42
    assert reported == [(["task-1:0"], 0), (["task-1:0"], 100)]


def test_an_image_of_another_size_is_fitted_to_the_requested_one() -> None:
    outcomes, _, _ = run(lambda r: b64_answer(size=(128, 128)))
    assert isinstance(outcomes[0], GeneratedImage)
    assert outcomes[0].image.size == (96, 64)


def test_a_relative_url_is_fetched_from_the_engine_with_its_key() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, content=png(color=(1, 2, 3)))
        return httpx.Response(200, json={"data": [{"url": "/v1/images/abc/content"}]})

    outcomes, recorder, _ = run(handler, response_format="url")
    post, get = recorder.requests
    assert json.loads(post.content)["response_format"] == "url"
    assert str(get.url) == "http://engine.internal:30000/v1/images/abc/content"
    assert get.headers["authorization"] == f"Bearer {KEY}"
    assert isinstance(outcomes[0], GeneratedImage)
    assert outcomes[0].image.getpixel((0, 0)) == (1, 2, 3)


class FakeOutbound:
    def __init__(self, fail: Exception | None = None) -> None:
        self.fetched: list[str] = []
        self.fail = fail

    async def fetch(self, url: str, *, max_bytes: int, timeout: float) -> tuple[bytes, str]:
        self.fetched.append(url)
        if self.fail is not None:
            raise self.fail
        return png(color=(7, 8, 9)), "image/png"


def context(outbound: Any) -> BackendContext:
    return BackendContext(
        models_dir=Path("."), devices=DevicePool(["cpu"]), max_batch_size=1, outbound=outbound
    )


def test_a_url_elsewhere_goes_through_the_outbound_guard_without_the_key() -> None:
    outbound = FakeOutbound()
    answer = {"data": [{"url": "https://bucket.example.com/img.png"}]}
    outcomes, recorder, _ = run(
        lambda r: httpx.Response(200, json=answer), context=context(outbound)
    )
    assert outbound.fetched == ["https://bucket.example.com/img.png"]
    assert len(recorder.requests) == 1  # not through the engine's client
    assert isinstance(outcomes[0], GeneratedImage)
    assert outcomes[0].image.getpixel((0, 0)) == (7, 8, 9)


def test_a_url_the_guard_refuses_is_a_provider_error() -> None:
    outbound = FakeOutbound(fail=ValueError("host resolves to a private address"))
    answer = {"data": [{"url": "https://bucket.example.com/img.png"}]}
    error = only_error(
        run(lambda r: httpx.Response(200, json=answer), context=context(outbound))[0]
    )
    assert error.code == "providerError"
    assert "private" not in error.message


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, content=b"<html>not json</html>"),
        httpx.Response(200, json={"data": []}),
        httpx.Response(200, json={"data": [{"revised_prompt": "x"}]}),
        httpx.Response(200, json={"data": [{"b64_json": "!!!not base64!!!"}]}),
        httpx.Response(200, json={"data": [{"b64_json": base64.b64encode(b"nope").decode()}]}),
    ],
    ids=["not-json", "no-data", "no-image", "bad-base64", "not-an-image"],
)
def test_unusable_answers_are_provider_errors(answer: httpx.Response) -> None:
    error = only_error(run(lambda r: answer)[0])
    assert error.code == "providerError"
    assert AIR in error.message


# -- errors -----------------------------------------------------------------------------------


def envelope(message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }


@pytest.mark.parametrize(
    ("status", "body", "code", "parameter"),
    [
        (401, envelope("Incorrect API key provided."), "invalidProviderApiKey", None),
        (403, envelope("forbidden"), "invalidProviderApiKey", None),
        (429, envelope("Rate limit reached"), "providerRateLimitExceeded", None),
        (500, {"detail": "CUDA out of memory"}, "providerError", None),
        (502, None, "providerError", None),
        (503, envelope("overloaded"), "providerError", None),
        (504, None, "timeoutProvider", None),
        (400, envelope("Invalid size '96x64'", "size"), "invalidWidth", "width"),
        (400, envelope("prompt too long", "prompt"), "invalidPositivePrompt", "positivePrompt"),
        (400, envelope("bad steps", "num_inference_steps"), "invalidSteps", "steps"),
        (400, envelope("bad guidance", "guidance_scale"), "invalidCFGScale", "CFGScale"),
        (
            400,
            envelope("bad negative", "negative_prompt"),
            "invalidNegativePrompt",
            "negativePrompt",
        ),
        (400, envelope("unknown model", "model", "model_not_found"), "providerError", None),
        (400, envelope("unsafe", None, "content_policy_violation"), "invalidProviderContent", None),
        (400, {"detail": "response_format=x is not supported"}, "providerError", None),
        (404, {"detail": "Not Found"}, "providerError", None),
        # FastAPI's validation error, as SGLang-Diffusion answers a malformed body.
        (
            422,
            {
                "detail": [
                    {
                        "loc": ["body", "seed"],
                        "msg": "Input should be a valid integer",
                        "type": "int_parsing",
                    }
                ]
            },
            "invalidSeed",
            "seed",
        ),
        # vLLM's older top-level error shape.
        (
            400,
            {
                "object": "error",
                "message": "n must be 1",
                "type": "BadRequestError",
                "param": "n",
                "code": 400,
            },
            "invalidNumberResults",
            "numberResults",
        ),
    ],
)
def test_engine_errors_become_runware_error_items(
    status: int, body: Any, code: str, parameter: str | None
) -> None:
    answer = httpx.Response(status, json=body) if body is not None else httpx.Response(status)
    outcomes, recorder, reported = run(lambda r: answer)
    error = only_error(outcomes)
    assert error.code == code
    assert error.parameter == parameter
    assert AIR in error.message
    assert len(recorder.requests) == 1  # an answer is never re-sent
    assert reported == [(["task-1:0"], 0)]


def test_the_engine_message_is_included_sanitized_and_truncated() -> None:
    message = (
        f"Invalid size: the key {KEY} was used\nTraceback (most recent call last):\n  "
        'File "/srv/sglang/x.py", line 1'
    )
    answer = httpx.Response(400, json=envelope(message, "size"))
    error = only_error(run(lambda r: answer)[0])
    assert "Invalid size: the key *** was used" in error.message
    assert KEY not in error.message
    assert "Traceback" not in error.message
    assert "/srv/sglang" not in error.message
    assert "\n" not in error.message
    long = httpx.Response(400, json=envelope("x" * 5000, "size"))
    error = only_error(run(lambda r: long)[0])
    assert len(error.message) < 400
    assert error.message.endswith("…")
    assert engine_text("a\x00b\tc\n d") == "a b c d"


def test_the_key_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    run(lambda r: b64_answer())
    run(lambda r: httpx.Response(401, json=envelope(f"bad key {KEY}")))
    run(lambda r: httpx.Response(500, text=f"boom {KEY}"))
    assert caplog.records
    assert KEY not in caplog.text


# -- timeouts and retries ---------------------------------------------------------------------


def failing(*errors: type[httpx.HTTPError], then: Handler | None = None) -> Handler:
    """Raise these errors in turn (as a transport would), then answer with `then`."""
    pending = list(errors)

    def handler(request: httpx.Request) -> httpx.Response:
        if pending:
            raise pending.pop(0)("simulated", request=request)
        assert then is not None
        return then(request)

    return handler


@pytest.mark.parametrize(
    "error", [httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout], ids=lambda e: e.__name__
)
def test_a_request_that_never_left_is_retried(error: type[httpx.HTTPError]) -> None:
    outcomes, recorder, _ = run(failing(error, error, then=lambda r: b64_answer()))
    assert len(recorder.requests) == 3
    assert isinstance(outcomes[0], GeneratedImage)


def test_retries_stop_at_max_retries() -> None:
    errors = [httpx.ConnectError] * 10
    outcomes, recorder, _ = run(failing(*errors), max_retries=1)
    assert len(recorder.requests) == 2
    error = only_error(outcomes)
    assert error.code == "providerError"
    assert "could not be reached" in error.message
    outcomes, recorder, _ = run(failing(*errors), max_retries=0)
    assert len(recorder.requests) == 1
    outcomes, recorder, _ = run(failing(*[httpx.ConnectTimeout] * 3))
    assert only_error(outcomes).code == "timeoutProvider"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (httpx.ReadTimeout, "timeoutProvider"),
        (httpx.WriteTimeout, "timeoutProvider"),
        (httpx.RemoteProtocolError, "providerError"),
        (httpx.ReadError, "providerError"),
        (httpx.WriteError, "providerError"),
    ],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_no_retry_once_the_request_was_sent(error: type[httpx.HTTPError], code: str) -> None:
    outcomes, recorder, _ = run(failing(error, then=lambda r: b64_answer()))
    assert len(recorder.requests) == 1  # a generation may be running at the engine
    assert only_error(outcomes).code == code


def test_a_slow_engine_times_out_with_timeout_provider() -> None:
    """A real read timeout: a loopback server that accepts and never answers."""

    async def go() -> tuple[Outcome, float]:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(5)
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        backend = OpenAIImagesBackend(entry(url=f"http://127.0.0.1:{port}/v1", timeout_s=0.2))
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            (outcome,) = await backend.generate([job()], lambda b, p: None, lambda j, d: None)
        finally:
            await backend.close()
            server.close()
        return outcome, loop.time() - started

    outcome, elapsed = asyncio.run(asyncio.wait_for(go(), 10))
    assert isinstance(outcome, ImpastoError)
    assert outcome.code == "timeoutProvider"
    assert elapsed < 2


def test_connection_refused_is_retried_then_unreachable() -> None:
    async def go() -> Outcome:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        backend = OpenAIImagesBackend(entry(url=f"http://127.0.0.1:{port}/v1"))
        try:
            (outcome,) = await backend.generate([job()], lambda b, p: None, lambda j, d: None)
        finally:
            await backend.close()
        return outcome

    outcome = asyncio.run(asyncio.wait_for(go(), 10))
    assert isinstance(outcome, ImpastoError)
    assert outcome.code == "providerError"
    assert "could not be reached" in outcome.message


# -- settings, registry and factory -----------------------------------------------------------


def test_check_settings_names_each_problem() -> None:
    assert check_settings({"url": URL, "model": "m"}) == []
    problems = " ".join(
        check_settings(
            {
                "url": "ftp://x",
                "timeout_s": 0,
                "max_retries": -1,
                "concurrency": True,
                "response_format": "png",
                "api_key_env": "",
                "api_key": "sk-inline",
            }
        )
    )
    for key in (
        "url",
        "model",
        "timeout_s",
        "max_retries",
        "concurrency",
        "response_format",
        "api_key_env",
    ):
        assert f"settings.{key}" in problems
    assert "api_key is not read" in problems
    assert check_settings({"url": "http://h/v1?x=1", "model": "m"})


def models_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


ENGINE_ENTRY = f"""
[models."{AIR}"]
backend = "openai-images"
[models."{AIR}".settings]
url = "{URL}"
model = "Qwen/Qwen-Image"
api_key_env = "{KEY_ENV}"
"""


def test_registry_loads_an_engine_entry_with_the_forwarded_parameters(tmp_path: Path) -> None:
    registry = ModelRegistry.load(models_file(tmp_path, ENGINE_ENTRY))
    loaded = registry.resolve(AIR).target
    assert loaded.backend == "openai-images"
    assert loaded.rules.parameters == {"negativePrompt", "seed", "steps", "CFGScale"}
    limited = ENGINE_ENTRY.replace(
        'backend = "openai-images"', 'backend = "openai-images"\nparameters = ["seed"]'
    )
    assert ModelRegistry.load(models_file(tmp_path, limited)).resolve(AIR).rules.parameters == {
        "seed"
    }


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (('url = "http://engine.internal:30000/v1"', ""), "settings.url"),
        (('model = "Qwen/Qwen-Image"', ""), "settings.model"),
        (('model = "Qwen/Qwen-Image"', 'model = "m"\ntimeout_s = -1'), "settings.timeout_s"),
        (
            ('backend = "openai-images"', 'backend = "openai-images"\nparameters = ["scheduler"]'),
            "not forwarded",
        ),
        (
            ('backend = "openai-images"', 'backend = "openai-images"\nmax_reference_images = 2'),
            "reference images",
        ),
    ],
)
def test_registry_refuses_bad_engine_entries(
    tmp_path: Path, change: tuple[str, str], problem: str
) -> None:
    text = ENGINE_ENTRY.replace(*change)
    with pytest.raises(ModelsFileError, match=problem):
        ModelRegistry.load(models_file(tmp_path, text))


def test_factory_builds_the_backend_and_flags_a_missing_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = ModelRegistry.load(models_file(tmp_path, ENGINE_ENTRY))
    ctx = context(None)
    backend = create_backend(registry.resolve(AIR).target, ctx)
    assert isinstance(backend, OpenAIImagesBackend)
    asyncio.run(backend.close())
    assert AIR not in unavailable_models(registry, ctx)
    monkeypatch.delenv(KEY_ENV)
    error = unavailable_models(registry, ctx)[AIR]
    assert isinstance(error, ProviderNotConfigured)
    assert error.code == "providerNotConfigured"
    with pytest.raises(ProviderNotConfigured):
        create_backend(registry.resolve(AIR).target, ctx)
