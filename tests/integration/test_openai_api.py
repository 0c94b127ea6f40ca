"""The OpenAI Images API on a real server, driven by the official `openai` Python SDK
unchanged (base_url pointed at impasto): generations and edits on the tiny pipeline, the
SDK's error classes for a bad size, an unknown model, a wrong key and a rate limit, and the
model list. The same task path as the Runware API: keys, quotas and usage apply."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image
from typer.testing import CliRunner

from impasto.cli import app
from tests.conftest import RunningServer, make_settings, start_server

FAST = {"num_inference_steps": 1}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[RunningServer]:
    running = start_server(
        make_settings(
            tmp_path_factory.mktemp("openai") / "data",
            tiny_models_dir,
            safety_checker="none",
            api_keys=["operator-key"],
            preload=["impasto:tiny@1"],
            runway_api_secret=None,
        )
    )
    yield running
    running.stop()


def client(server: RunningServer, key: str = "operator-key") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=key, max_retries=0, timeout=120)


def decoded(b64: str | None) -> Image.Image:
    assert b64
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def png(size: tuple[int, int], color: str = "red", mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, "PNG")
    return buffer.getvalue()


def test_generate_two_512_images_as_b64_json(server: RunningServer) -> None:
    reply = client(server).images.generate(
        model="impasto:tiny@1",
        prompt="a lighthouse at dusk",
        n=2,
        size="512x512",
        response_format="b64_json",
        extra_body=FAST,
    )
    assert reply.data is not None
    assert len(reply.data) == 2
    assert [decoded(d.b64_json).size for d in reply.data] == [(512, 512), (512, 512)]
    assert reply.output_format == "png"
    assert reply.size == "512x512"
    assert reply.created > 0


def test_urls_point_at_the_stored_images_and_output_format_is_kept(server: RunningServer) -> None:
    reply = client(server).images.generate(
        prompt="a harbour", size="128x128", output_format="jpeg", extra_body=FAST
    )
    assert reply.data is not None
    (image,) = reply.data
    assert image.url is not None
    fetched = httpx.get(image.url, timeout=30)
    assert fetched.status_code == 200
    assert fetched.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(fetched.content)).size == (128, 128)


def test_edit_a_png_by_img2img(server: RunningServer) -> None:
    reply = client(server).images.edit(
        model="impasto:tiny@1",
        image=("in.png", png((256, 256)), "image/png"),
        prompt="make it blue",
        response_format="b64_json",
        extra_body={"num_inference_steps": 2},
    )
    assert reply.data is not None
    assert decoded(reply.data[0].b64_json).size == (256, 256)


def test_edit_with_a_mask_inpaints_on_an_inpainting_model(server: RunningServer) -> None:
    mask = Image.new("RGBA", (128, 128), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (32, 32, 96, 96))
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    reply = client(server).images.edit(
        model="impasto:tiny-inpaint@1",
        image=("in.png", png((128, 128), "green"), "image/png"),
        mask=("mask.png", buffer.getvalue(), "image/png"),
        prompt="a window",
        response_format="b64_json",
        extra_body={"num_inference_steps": 2},
    )
    assert reply.data is not None
    assert decoded(reply.data[0].b64_json).size == (128, 128)
    assert not (reply.model_extra or {}).get("impasto_notes")


def test_a_bad_size_raises_bad_request_naming_size(server: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(server).images.generate(model="impasto:tiny@1", prompt="x", size="13x7")
    assert caught.value.status_code == 400
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["param"] == "size"
    assert body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as malformed:
        client(server).images.generate(prompt="x", size="big")
    assert isinstance(malformed.value.body, dict)
    assert malformed.value.body["param"] == "size"


def test_an_unknown_model_raises_not_found(server: RunningServer) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client(server).images.generate(model="dall-e-3", prompt="x")
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "model_not_found"
    assert caught.value.body["param"] == "model"


def test_a_wrong_key_raises_authentication_error(server: RunningServer) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        client(server, "wrong").images.generate(prompt="x", extra_body=FAST)
    assert caught.value.status_code == 401


def test_a_managed_keys_rate_limit_raises_rate_limit_error_and_usage_counts_it(
    server: RunningServer,
) -> None:
    env = {"IMPASTO_DATA_DIR": str(server.settings.data_dir)}
    made = CliRunner().invoke(
        app, ["keys", "create", "--name", "openai-team", "--rate", "1/min"], env=env
    )
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip().splitlines()[0]
    team = client(server, secret)
    first = team.images.generate(prompt="one", size="64x64", extra_body=FAST)
    assert first.data is not None
    assert len(first.data) == 1
    with pytest.raises(openai.RateLimitError) as caught:
        team.images.generate(prompt="two", size="64x64", extra_body=FAST)
    assert caught.value.status_code == 429
    assert int(caught.value.response.headers["retry-after"]) >= 1
    usage = CliRunner().invoke(app, ["usage", "--key", "openai-team", "--json"], env=env)
    assert '"images": 1' in usage.stdout


def test_the_model_list_and_one_model(server: RunningServer) -> None:
    models = client(server).models.list()
    ids = [m.id for m in models]
    assert "impasto:tiny@1" in ids
    # Runway's models need RUNWAYML_API_SECRET, which this server does not have.
    assert "runway:4@1" not in ids
    assert all(m.object == "model" for m in models)
    one = client(server).models.retrieve("impasto:tiny@1")
    assert one.id == "impasto:tiny@1"
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("nope:1@1")


def test_a_request_without_model_runs_the_first_preloaded_one(server: RunningServer) -> None:
    reply = client(server).images.generate(
        prompt="a default", size="64x64", response_format="b64_json", extra_body=FAST
    )
    assert reply.data is not None
    assert decoded(reply.data[0].b64_json).size == (64, 64)


def test_a_body_that_is_not_json_or_not_multipart_gets_an_openai_error(
    server: RunningServer,
) -> None:
    headers = {"Authorization": "Bearer operator-key"}
    not_json = httpx.post(f"{server.base}/v1/images/generations", content=b"{", headers=headers)
    assert not_json.status_code == 400
    assert not_json.json()["error"]["code"] == "invalid_json"
    not_form = httpx.post(
        f"{server.base}/v1/images/edits", json={"prompt": "x"}, headers=headers, timeout=30
    )
    assert not_form.status_code == 400
    assert not_form.json()["error"]["code"] == "invalid_request"
