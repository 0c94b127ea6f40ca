"""imageInference outputs over REST: output types, formats, quality, sizes, cost, numberResults
and seeds, decoded and checked pixel by pixel."""

from __future__ import annotations

import base64
import io
import uuid
from typing import Any

import httpx
import pytest
from PIL import Image, ImageChops

from tests.conftest import RunningServer, tiny_task

PIL_FORMATS = {"JPG": "JPEG", "PNG": "PNG", "WEBP": "WEBP"}
CONTENT_TYPES = {"JPG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


def generate(server: RunningServer, **fields: Any) -> list[dict[str, Any]]:
    """Run one tiny task; its data items (asserting there are no errors)."""
    task = tiny_task(**fields)
    response = server.post([task])
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    items: list[dict[str, Any]] = body["data"]
    assert all(item["taskUUID"] == task["taskUUID"] for item in items)
    return items


def fetch(url: str) -> httpx.Response:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    return response


def output_bytes(item: dict[str, Any]) -> bytes:
    """The image bytes of an item, whatever its output type."""
    if "imageURL" in item:
        return fetch(item["imageURL"]).content
    if "imageBase64Data" in item:
        return base64.b64decode(item["imageBase64Data"], validate=True)
    header, _, payload = item["imageDataURI"].partition(",")
    assert header.endswith(";base64")
    return base64.b64decode(payload, validate=True)


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_output_type_url_serves_the_image(server: RunningServer) -> None:
    (item,) = generate(server, outputType="URL", width=96, height=64)

    assert set(item) == {"taskType", "taskUUID", "imageUUID", "imageURL", "seed"}
    assert item["taskType"] == "imageInference"
    uuid.UUID(item["imageUUID"])
    assert item["imageURL"].startswith(server.base + "/image/")
    assert item["imageUUID"] in item["imageURL"]
    image = open_image(fetch(item["imageURL"]).content)
    assert (image.format, image.size) == ("JPEG", (96, 64))


def test_output_type_base64_data_decodes_to_the_image(server: RunningServer) -> None:
    (item,) = generate(server, outputType="base64Data", outputFormat="PNG", width=64, height=128)

    assert "imageURL" not in item
    assert "imageDataURI" not in item
    image = open_image(base64.b64decode(item["imageBase64Data"], validate=True))
    assert (image.format, image.size) == ("PNG", (64, 128))


def test_output_type_data_uri_decodes_to_the_image(server: RunningServer) -> None:
    (item,) = generate(server, outputType="dataURI", outputFormat="WEBP", width=80, height=64)

    assert "imageURL" not in item
    assert "imageBase64Data" not in item
    assert item["imageDataURI"].startswith("data:image/webp;base64,")
    image = open_image(output_bytes(item))
    assert (image.format, image.size) == ("WEBP", (80, 64))


def test_legacy_list_output_type_is_accepted(server: RunningServer) -> None:
    (item,) = generate(server, outputType=["base64Data"])
    assert open_image(output_bytes(item)).size == (64, 64)


@pytest.mark.parametrize("output_format", ["JPG", "PNG", "WEBP"])
def test_output_format_sets_the_file_format_and_content_type(
    server: RunningServer, output_format: str
) -> None:
    (item,) = generate(server, outputFormat=output_format)

    served = fetch(item["imageURL"])
    assert served.headers["content-type"] == CONTENT_TYPES[output_format]
    assert item["imageURL"].endswith("." + output_format.lower())
    image = open_image(served.content)
    assert image.format == PIL_FORMATS[output_format]
    assert image.size == (64, 64)


def test_lowercase_output_format_is_accepted(server: RunningServer) -> None:
    (item,) = generate(server, outputFormat="png")
    assert fetch(item["imageURL"]).headers["content-type"] == "image/png"


def test_output_quality_changes_jpg_size(server: RunningServer) -> None:
    common = {"seed": 4242, "width": 256, "height": 256, "outputType": "base64Data"}
    (low,) = generate(server, outputQuality=20, **common)
    (high,) = generate(server, outputQuality=99, **common)

    low_bytes, high_bytes = output_bytes(low), output_bytes(high)
    assert open_image(low_bytes).format == open_image(high_bytes).format == "JPEG"
    assert len(low_bytes) < len(high_bytes)


@pytest.mark.parametrize(
    ("width", "height"), [(64, 64), (1000, 600), (1360, 768), (65, 127), (600, 1000)]
)
def test_every_output_has_exactly_the_requested_size(
    server: RunningServer, width: int, height: int
) -> None:
    items = generate(server, width=width, height=height, numberResults=2, outputFormat="PNG")

    assert len(items) == 2
    for item in items:
        assert open_image(output_bytes(item)).size == (width, height)


def test_include_cost_gives_a_float_cost_of_zero_for_the_tiny_model(server: RunningServer) -> None:
    items = generate(server, includeCost=True, numberResults=2)

    for item in items:
        assert isinstance(item["cost"], float)
        assert item["cost"] == 0.0


def test_without_include_cost_there_is_no_cost(server: RunningServer) -> None:
    (item,) = generate(server)
    assert "cost" not in item


def test_number_results_gives_that_many_distinct_images_and_seeds(server: RunningServer) -> None:
    items = generate(server, numberResults=3)

    assert len(items) == 3
    assert len({item["imageUUID"] for item in items}) == 3
    assert len({item["imageURL"] for item in items}) == 3
    seeds = [item["seed"] for item in items]
    assert all(isinstance(seed, int) for seed in seeds)
    assert len(set(seeds)) == 3
    for item in items:
        assert open_image(output_bytes(item)).size == (64, 64)


def test_given_seed_numbers_the_images_s_and_s_plus_one(server: RunningServer) -> None:
    seed = 9_202_427_981_074_766_178  # above 2**53: must survive JSON as an exact integer
    items = generate(server, seed=seed, numberResults=2)

    assert sorted(item["seed"] for item in items) == [seed, seed + 1]


def test_same_model_parameters_and_seed_give_identical_pixels(server: RunningServer) -> None:
    common = {
        "seed": 1234,
        "width": 96,
        "height": 64,
        "outputFormat": "PNG",
        "positivePrompt": "a red fox in snow",
    }
    (first,) = generate(server, **common)
    (second,) = generate(server, **common)
    (other_seed,) = generate(server, **{**common, "seed": 1235})

    assert first["imageUUID"] != second["imageUUID"]
    a = open_image(output_bytes(first)).convert("RGB")
    b = open_image(output_bytes(second)).convert("RGB")
    c = open_image(output_bytes(other_seed)).convert("RGB")
    assert a.size == b.size == (96, 64)
    assert ImageChops.difference(a, b).getbbox() is None
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def test_image_url_sends_cache_headers_within_the_ttl(server: RunningServer) -> None:
    (item,) = generate(server, ttl=600)

    served = fetch(item["imageURL"])
    cache = served.headers["cache-control"]
    assert cache.startswith("private, max-age=")
    assert 0 < int(cache.rsplit("=", 1)[1]) <= 600
