"""The official `openai` npm package (pinned in tests/sdk/js/package.json) on Node, used
unchanged, as a client of impasto's OpenAI Images API: `new OpenAI({baseURL: <server>/v1,
apiKey, maxRetries: 0})` and its images.generate(), images.edit() (multipart, `toFile`),
models.list() and models.retrieve().

It runs as `node tests/sdk/js/openai_client.mjs`, installed by ./scripts/install (npm ci). The
client measures every image itself (the PNG header of b64_json, or of what its url serves), and
reports an error as the SDK's own error class with the status, param and code it parsed out of
our `{"error": {...}}` envelope. Every generation asks for one or two inference steps of the
tiny model.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import RunningServer, make_settings, start_server
from tests.sdk.clients import INSTALL_HINT, JS_DIR, run_client

OPENAI_JS_VERSION = "7.59.0"
TINY = "impasto:tiny@1"
INPAINT = "impasto:tiny-inpaint@1"
FAST = {"num_inference_steps": 1}


def openai_js_command() -> list[str]:
    """The `openai` npm client command; fails (not skips) the test when it is missing."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node (Node.js 20) is not on PATH: install it, then {INSTALL_HINT}")
    package = JS_DIR / "node_modules" / "openai" / "package.json"
    if not package.is_file():
        pytest.fail(
            f"the openai npm package is not installed in {JS_DIR}/node_modules: {INSTALL_HINT}"
        )
    version = json.loads(package.read_text())["version"]
    if version != OPENAI_JS_VERSION:
        pytest.fail(
            f"openai {version} is installed in {JS_DIR}, the tests pin {OPENAI_JS_VERSION}: "
            f"{INSTALL_HINT}"
        )
    return [node, str(JS_DIR / "openai_client.mjs")]


@pytest.fixture(scope="module")
def sdk() -> list[str]:
    return openai_js_command()


@contextmanager
def serve(data_dir: Path, models_dir: Path, **overrides: Any) -> Iterator[RunningServer]:
    # No Runway key whatever the environment has: runway:4@1 answers providerNotConfigured.
    settings = make_settings(
        data_dir, models_dir, safety_checker="none", runway_api_secret=None, **overrides
    )
    running = start_server(settings)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[RunningServer]:
    with serve(tmp_path_factory.mktemp("openai-js"), tiny_models_dir) as running:
        yield running


@pytest.fixture(scope="module")
def keyed(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[RunningServer]:
    with serve(
        tmp_path_factory.mktemp("openai-js-keyed"), tiny_models_dir, api_keys=["k1"]
    ) as running:
        yield running


def calls(
    sdk: list[str],
    server: RunningServer,
    *specs: dict[str, Any],
    api_key: str = "any-key",
    max_retries: int = 0,
) -> list[dict[str, Any]]:
    """The outcome of each call, made in turn by one client process."""
    args = {"apiKey": api_key, "maxRetries": max_retries, "calls": list(specs)}
    result = run_client(sdk, server.url, "calls", args)
    outcomes: list[dict[str, Any]] = result["outcomes"]
    assert len(outcomes) == len(specs), outcomes
    return outcomes


def png_b64(size: tuple[int, int], color: Any = "teal", mode: str = "RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def openai_mask(size: tuple[int, int]) -> str:
    """OpenAI's mask convention: opaque where the image is kept, transparent (alpha 0) in the
    middle square, which is to change."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    width, height = size
    mask.paste((0, 0, 0, 0), (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def assert_pngs(outcome: dict[str, Any], count: int, size: tuple[int, int], source: str) -> None:
    assert "error" not in outcome, outcome
    images = outcome["images"]
    assert len(images) == count, outcome
    for image in images:
        assert image["source"] == source, image
        assert image["format"] == "png", image
        assert (image["width"], image["height"]) == size, image


def test_generate_two_b64_json_images_of_the_size_asked(
    server: RunningServer, sdk: list[str]
) -> None:
    [outcome] = calls(
        sdk,
        server,
        {
            "generate": {
                "model": TINY,
                "prompt": "a lighthouse at dusk",
                "n": 2,
                "size": "512x512",
                "response_format": "b64_json",
                **FAST,
            }
        },
    )
    assert_pngs(outcome, 2, (512, 512), "b64_json")
    assert len({image["sha256"] for image in outcome["images"]}) == 2, "two different images"
    response = outcome["response"]
    assert isinstance(response["created"], int)
    assert response["size"] == "512x512"
    assert response["output_format"] == "png"


def test_the_engine_extras_reach_the_model(server: RunningServer, sdk: list[str]) -> None:
    """seed, negative_prompt, guidance_scale and num_inference_steps beside OpenAI's fields:
    the same seed makes the same picture, another seed another one."""
    spec = {
        "model": TINY,
        "prompt": "a red kite",
        "size": "64x64",
        "response_format": "b64_json",
        "negative_prompt": "blur",
        "guidance_scale": 3.5,
        "num_inference_steps": 2,
    }
    first, again, other = calls(
        sdk,
        server,
        {"generate": {**spec, "seed": 7}},
        {"generate": {**spec, "seed": 7}},
        {"generate": {**spec, "seed": 8}},
    )
    for outcome in (first, again, other):
        assert_pngs(outcome, 1, (64, 64), "b64_json")
    assert first["images"][0]["sha256"] == again["images"][0]["sha256"]
    assert first["images"][0]["sha256"] != other["images"][0]["sha256"]


def test_url_images_are_served_to_the_sdk_and_to_anyone_with_the_url(
    server: RunningServer, sdk: list[str]
) -> None:
    [outcome] = calls(
        sdk,
        server,
        {
            "generate": {
                "model": TINY,
                "prompt": "a red kite",
                "size": "128x64",
                "response_format": "url",
                **FAST,
            }
        },
    )
    assert_pngs(outcome, 1, (128, 64), "url")
    [image] = outcome["images"]
    assert image["fetchStatus"] == 200
    assert image["contentType"] == "image/png"
    assert image["url"].startswith(server.base + "/")
    fetched = httpx.get(image["url"], timeout=30)
    assert fetched.status_code == 200
    served = Image.open(io.BytesIO(fetched.content))
    assert (served.format, served.size) == ("PNG", (128, 64))


def test_an_edit_of_an_uploaded_png_gives_an_image(server: RunningServer, sdk: list[str]) -> None:
    """Without a size the edit keeps the seed image's size; with several images (sent as
    image[]) the first is the seed image and the others reference images."""
    seed = png_b64((256, 256))
    edits = [
        {"edit": {"model": TINY, "prompt": "make it blue", "image": seed, **FAST}},
        {
            "edit": {
                "model": TINY,
                "prompt": "make it blue",
                "image": seed,
                "size": "128x128",
                "response_format": "b64_json",
                **FAST,
            }
        },
        {
            "edit": {
                "model": TINY,
                "prompt": "make it blue",
                "image": [seed, png_b64((64, 64), "red")],
                "n": 2,
                "response_format": "b64_json",
                **FAST,
            }
        },
    ]
    url, sized, several = calls(sdk, server, *edits)
    assert_pngs(url, 1, (256, 256), "url")
    assert url["images"][0]["fetchStatus"] == 200
    assert url["response"]["size"] == "256x256"
    assert_pngs(sized, 1, (128, 128), "b64_json")
    assert_pngs(several, 2, (256, 256), "b64_json")


@pytest.mark.parametrize("model", [INPAINT, TINY])
def test_an_edit_with_a_mask_inpaints(server: RunningServer, sdk: list[str], model: str) -> None:
    """OpenAI's mask (transparent where the image changes) becomes Runware's maskImage on a
    model that takes one: the inpainting checkpoint, and tiny@1 (masked img2img)."""
    [outcome] = calls(
        sdk,
        server,
        {
            "edit": {
                "model": model,
                "prompt": "a door",
                "image": png_b64((256, 256)),
                "mask": openai_mask((256, 256)),
                "size": "256x256",
                "response_format": "b64_json",
                **FAST,
            }
        },
    )
    assert_pngs(outcome, 1, (256, 256), "b64_json")
    assert "impasto_notes" not in outcome["response"], "the mask was used, not ignored"


def test_an_inpainting_model_needs_the_mask(server: RunningServer, sdk: list[str]) -> None:
    [outcome] = calls(
        sdk,
        server,
        {"edit": {"model": INPAINT, "prompt": "a door", "image": png_b64((256, 256)), **FAST}},
    )
    error = outcome["error"]
    assert (error["class"], error["status"], error["param"]) == ("BadRequestError", 400, "mask")


def test_errors_are_the_sdks_own_error_classes(server: RunningServer, sdk: list[str]) -> None:
    bad_size, unknown_model, unknown_field = calls(
        sdk,
        server,
        {"generate": {"model": TINY, "prompt": "x", "size": "13x7", **FAST}},
        {"generate": {"model": "impasto:no-such-model@9", "prompt": "x", **FAST}},
        {"generate": {"model": TINY, "prompt": "x", "temperature": 1}},
    )
    error = bad_size["error"]
    assert (error["class"], error["status"], error["param"]) == ("BadRequestError", 400, "size")
    assert error["type"] == "invalid_request_error"
    assert error["body"]["message"] == error["message"].removeprefix("400 ")
    error = unknown_model["error"]
    assert (error["class"], error["status"], error["code"]) == (
        "NotFoundError",
        404,
        "model_not_found",
    )
    error = unknown_field["error"]
    assert (error["class"], error["status"], error["param"], error["code"]) == (
        "BadRequestError",
        400,
        "temperature",
        "unknown_parameter",
    )


def test_an_error_a_retry_cannot_mend_is_not_retried_by_the_sdk(
    server: RunningServer, sdk: list[str]
) -> None:
    """The SDK retries 408, 409, 429 and 5xx unless the reply says `x-should-retry: false`
    (client.mjs shouldRetry). A model whose provider has no key is a 503 that stays a 503."""
    [outcome] = calls(
        sdk, server, {"generate": {"model": "runway:4@1", "prompt": "x"}}, max_retries=2
    )
    error = outcome["error"]
    assert (error["class"], error["status"], error["code"]) == (
        "InternalServerError",
        503,
        "providerNotConfigured",
    )
    assert outcome["requests"] == 1, "sent once, not retried"


def test_models_list_and_retrieve(server: RunningServer, sdk: list[str]) -> None:
    listed, one, missing = calls(
        sdk, server, {"models": True}, {"model": TINY}, {"model": "impasto:no-such-model@9"}
    )
    assert TINY in listed["models"]
    assert INPAINT in listed["models"]
    assert "impasto:tiny-lora@1" not in listed["models"], "assets are not models to run"
    assert one["model"]["id"] == TINY
    assert one["model"]["object"] == "model"
    assert (missing["error"]["class"], missing["error"]["status"]) == ("NotFoundError", 404)


def test_a_keyed_server_rejects_a_wrong_key_and_serves_the_right_one(
    keyed: RunningServer, sdk: list[str]
) -> None:
    spec = {"generate": {"model": TINY, "prompt": "x", "size": "64x64", **FAST}}
    [wrong_generate, wrong_models] = calls(sdk, keyed, spec, {"models": True}, api_key="k2")
    for wrong in (wrong_generate, wrong_models):
        error = wrong["error"]
        assert (error["class"], error["status"]) == ("AuthenticationError", 401), wrong
        assert error["type"] == "authentication_error"
    generated, listed = calls(sdk, keyed, spec, {"models": True}, api_key="k1")
    assert_pngs(generated, 1, (64, 64), "url")
    assert TINY in listed["models"]


def test_too_many_failed_keys_is_the_sdks_rate_limit_error(
    tmp_path: Path, tiny_models_dir: Path, sdk: list[str]
) -> None:
    """Failed authentications past the address's allowance are a 429: RateLimitError (which the
    SDK would retry after Retry-After, were retries on)."""
    with serve(tmp_path, tiny_models_dir, api_keys=["k1"], auth_failures_per_minute=1) as limited:
        first, second = calls(sdk, limited, {"models": True}, {"models": True}, api_key="nope")
        assert (first["error"]["class"], first["error"]["status"]) == ("AuthenticationError", 401)
        error = second["error"]
        assert (error["class"], error["status"]) == ("RateLimitError", 429), second
        assert error["type"] == "rate_limit_error"
