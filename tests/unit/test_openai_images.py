"""The OpenAI Images API mapped onto impasto's tasks: request fields to a sync imageInference
task, image items to OpenAI's data, errors to OpenAI's envelope, and OpenAI masks
(transparent = change) to Runware masks (white = change)."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image

from impasto.protocol.errors import (
    AuthError,
    ImpastoError,
    InvalidParameter,
    ModelNotFound,
    RateLimited,
)
from impasto.protocol.openai_images import (
    edit_task,
    images_request,
    images_response,
    openai_error,
    openai_mask,
    parse_size,
)

UUID = "f47ac10b-58cc-4372-a567-0e02b2c3d493"


def request(**fields: Any) -> Any:
    return images_request(
        {"prompt": "a lighthouse", **fields}, default_model="impasto:tiny@1", task_uuid=UUID
    )


def refused(**fields: Any) -> InvalidParameter:
    with pytest.raises(InvalidParameter) as caught:
        request(**fields)
    return caught.value


def test_a_generation_becomes_one_sync_image_inference_task() -> None:
    made = request(
        model="runware:100@1", n=3, size="768x512", response_format="b64_json",
        output_format="webp", output_compression=10, seed=7, negative_prompt="fog",
        num_inference_steps=4, guidance_scale="3.5", user="alice",
    )  # fmt: skip
    assert made.task == {
        "taskType": "imageInference",
        "taskUUID": UUID,
        "model": "runware:100@1",
        "positivePrompt": "a lighthouse",
        "numberResults": 3,
        "outputType": "base64Data",
        "outputFormat": "WEBP",
        "includeCost": True,
        "deliveryMethod": "sync",
        "width": 768,
        "height": 512,
        "outputQuality": 20,
        "seed": 7,
        "negativePrompt": "fog",
        "steps": 4,
        "CFGScale": 3.5,
    }
    assert made.notes == []


def test_defaults_are_openais_url_png_one_image_and_the_models_own_size() -> None:
    made = request(size="auto")
    assert made.task["model"] == "impasto:tiny@1"
    assert made.task["numberResults"] == 1
    assert made.task["outputType"] == "URL"
    assert made.task["outputFormat"] == "PNG"
    assert "width" not in made.task
    assert made.response_format == "url"


def test_form_fields_arrive_as_strings_and_are_read_as_numbers() -> None:
    made = request(n="2", output_compression="95", seed="11", stream="false")
    assert (made.task["numberResults"], made.task["outputQuality"], made.task["seed"]) == (
        2,
        95,
        11,
    )


def test_fields_a_model_cannot_honour_are_taken_with_a_note() -> None:
    made = request(quality="high", background="transparent", style="vivid", moderation="low")
    assert len(made.notes) == 4
    assert "quality=high" in made.notes[0]
    assert request(quality="auto", background="opaque").notes == []


@pytest.mark.parametrize(
    ("fields", "parameter"),
    [
        ({"size": "13"}, "size"),
        ({"size": "axb"}, "size"),
        ({"size": 512}, "size"),
        ({"n": 0}, "n"),
        ({"n": 11}, "n"),
        ({"n": True}, "n"),
        ({"n": "two"}, "n"),
        ({"response_format": "jpeg"}, "response_format"),
        ({"output_format": "gif"}, "output_format"),
        ({"output_compression": 101}, "output_compression"),
        ({"stream": True}, "stream"),
        ({"partial_images": 2}, "partial_images"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"model": 5}, "model"),
        ({"guidance_scale": "lots"}, "guidance_scale"),
        ({"frame_count": 3}, "frame_count"),
    ],
)
def test_bad_fields_are_refused_naming_the_field(fields: dict[str, Any], parameter: str) -> None:
    error = refused(**fields)
    assert error.parameter == parameter
    status, body = openai_error(error)
    assert status == 400
    assert body["error"]["param"] == parameter
    assert body["error"]["type"] == "invalid_request_error"


def test_sizes() -> None:
    assert parse_size("1024x1536") == (1024, 1536)
    assert parse_size("512X512") == (512, 512)
    assert parse_size(None) is None
    assert parse_size("auto") is None


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def decoded(data_uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1])))


def test_an_openai_mask_becomes_white_where_the_image_changes() -> None:
    mask = Image.new("RGBA", (4, 2), (0, 0, 0, 255))
    mask.putpixel((0, 0), (0, 0, 0, 0))
    mask.putpixel((3, 1), (10, 10, 10, 0))
    converted = decoded(openai_mask(png(mask)))
    assert converted.mode == "L"
    assert converted.getpixel((0, 0)) == 255
    assert converted.getpixel((3, 1)) == 255
    assert converted.getpixel((1, 0)) == 0


def test_a_mask_without_transparency_is_taken_as_runwares_white_changes() -> None:
    mask = Image.new("L", (2, 1), 0)
    mask.putpixel((1, 0), 255)
    converted = decoded(openai_mask(png(mask)))
    assert [converted.getpixel((x, 0)) for x in range(2)] == [0, 255]
    with pytest.raises(InvalidParameter, match="mask"):
        openai_mask(b"not an image")


def test_an_edit_is_inpainting_with_a_mask_or_img2img_without_one() -> None:
    image = png(Image.new("RGB", (8, 8), "red"))
    mask = png(Image.new("RGBA", (8, 8), (0, 0, 0, 0)))
    inpaint = request()
    edit_task(inpaint, [image, image], mask, inpainting=True)
    assert decoded(inpaint.task["seedImage"]).size == (8, 8)
    assert len(inpaint.task["referenceImages"]) == 1
    assert "maskImage" in inpaint.task
    whole = request()
    edit_task(whole, [image], mask, inpainting=False)
    assert "maskImage" not in whole.task
    assert "img2img" in whole.notes[0]
    with pytest.raises(InvalidParameter) as missing:
        edit_task(request(), [], None, inpainting=True)
    assert missing.value.parameter == "image"


def test_image_items_become_openai_data() -> None:
    items = [
        {
            "imageUUID": "a",
            "imageURL": "http://x/image/a.png",
            "imageBase64Data": "QQ==",
            "cost": 0.5,
        },
        {
            "imageUUID": "b",
            "imageURL": "http://x/image/b.png",
            "imageBase64Data": "Qg==",
            "cost": 0.25,
        },
    ]
    as_urls = images_response(request(size="64x64"), items)
    assert as_urls["data"] == [{"url": "http://x/image/a.png"}, {"url": "http://x/image/b.png"}]
    assert as_urls["size"] == "64x64"
    assert as_urls["output_format"] == "png"
    assert as_urls["impasto_cost"] == 0.75
    assert isinstance(as_urls["created"], int)
    as_b64 = images_response(request(response_format="b64_json", quality="high"), items)
    assert as_b64["data"] == [{"b64_json": "QQ=="}, {"b64_json": "Qg=="}]
    assert as_b64["impasto_notes"]


@pytest.mark.parametrize(
    ("error", "status", "kind", "param", "code"),
    [
        (
            ModelNotFound("no such model", parameter="model"),
            404,
            "invalid_request_error",
            "model",
            "model_not_found",
        ),
        (
            InvalidParameter("bad width", code="invalidWidth", parameter="width"),
            400,
            "invalid_request_error",
            "size",
            "invalidWidth",
        ),
        (
            AuthError("Invalid API key.", parameter="apiKey"),
            401,
            "authentication_error",
            "apiKey",
            "invalidApiKey",
        ),
        (
            RateLimited("slow down", retry_after_s=3),
            429,
            "rate_limit_error",
            None,
            "rateLimitExceeded",
        ),
        (ImpastoError("boom", code="inferenceError"), 500, "server_error", None, "inferenceError"),
    ],
)
def test_errors_take_openais_envelope_and_statuses(
    error: ImpastoError, status: int, kind: str, param: str | None, code: str
) -> None:
    got_status, body = openai_error(error)
    assert got_status == status
    assert body == {"error": {"message": error.message, "type": kind, "param": param, "code": code}}


def test_an_error_after_acceptance_fails_the_request_as_a_server_error() -> None:
    error = ImpastoError("The generated image could not be stored.", code="inferenceError")
    error.http_status = 200
    assert openai_error(error)[0] == 500
    timeout = ImpastoError("still running", code="syncTimeout")
    timeout.http_status = 202
    assert openai_error(timeout)[0] == 504
