"""Client images over REST: imageUpload from a data URI, raw base64 and a URL; uploaded and
generated images reused as reference images; reference images from URLs, data URIs and
base64; and the refusals (not an image, unknown UUID, 404, too large, private address)."""

from __future__ import annotations

import base64
import io
import os
import threading
import uuid
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import LoopbackHTTP, Recorded, RunningServer, image_bytes, tiny_task


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def noise_png(size: tuple[int, int] = (64, 64)) -> bytes:
    """A PNG that does not compress: larger than its pixel count suggests."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(server: RunningServer, image: str) -> httpx.Response:
    task = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": image}
    return server.post([task])


def uploaded_item(server: RunningServer, image: str) -> dict[str, Any]:
    response = upload(server, image)
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    (item,) = body["data"]
    return dict(item)


def served_image(url: str) -> tuple[httpx.Response, Image.Image]:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return response, image


def assert_reference_error(response: httpx.Response, parameter: str) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    assert "Traceback" not in response.text
    body = response.json()
    assert "data" not in body
    (error,) = body["errors"]
    assert error["code"] == "invalidReferenceImages"
    assert error["parameter"] == parameter
    assert error["taskType"] == "imageInference"
    return dict(error)


# -- imageUpload ------------------------------------------------------------------------------


def test_upload_from_a_data_uri_returns_a_uuid_and_a_serving_url(server: RunningServer) -> None:
    original = image_bytes((64, 48), "PNG", "green")
    task = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": data_uri(original)}

    response = server.post([task])

    assert response.status_code == 200, response.text
    (item,) = response.json()["data"]
    assert set(item) == {"taskType", "taskUUID", "imageUUID", "imageURL"}
    assert item["taskType"] == "imageUpload"
    assert item["taskUUID"] == task["taskUUID"]
    uuid.UUID(item["imageUUID"])
    assert item["imageUUID"] in item["imageURL"]
    served, image = served_image(item["imageURL"])
    assert served.headers["content-type"] == "image/png"
    assert served.content == original
    assert image.size == (64, 48)


def test_upload_from_raw_base64_is_stored(server: RunningServer) -> None:
    original = image_bytes((40, 30), "JPEG", "blue")

    item = uploaded_item(server, base64.b64encode(original).decode())

    served, image = served_image(item["imageURL"])
    assert served.headers["content-type"] == "image/jpeg"
    assert (image.format, image.size) == ("JPEG", (40, 30))


def test_upload_from_a_url_fetches_and_stores_the_image(
    server: RunningServer, loopback_http: LoopbackHTTP
) -> None:
    loopback_http.routes["/photo.webp"] = (
        200,
        "image/webp",
        image_bytes((50, 70), "WEBP", "yellow"),
    )

    item = uploaded_item(server, loopback_http.url("/photo.webp"))

    assert [r.path for r in loopback_http.requests] == ["/photo.webp"]
    served, image = served_image(item["imageURL"])
    assert served.headers["content-type"] == "image/webp"
    assert image.size == (50, 70)


def test_get_response_after_upload_returns_the_upload_item(server: RunningServer) -> None:
    task_uuid = str(uuid.uuid4())
    task = {"taskType": "imageUpload", "taskUUID": task_uuid, "image": data_uri(image_bytes())}
    (item,) = server.post([task]).json()["data"]

    response = server.post([{"taskType": "getResponse", "taskUUID": task_uuid}])

    assert response.status_code == 200, response.text
    assert response.json()["data"] == [{**item, "status": "success"}]


def test_large_upload_is_stored_with_long_side_2048_and_the_same_aspect(
    server: RunningServer,
) -> None:
    item = uploaded_item(server, data_uri(image_bytes((3000, 1500), "PNG", "purple")))

    _, image = served_image(item["imageURL"])
    assert image.size == (2048, 1024)


def test_large_portrait_upload_keeps_its_aspect_ratio(server: RunningServer) -> None:
    item = uploaded_item(server, data_uri(image_bytes((900, 2700), "JPEG", "orange"), "image/jpeg"))

    _, image = served_image(item["imageURL"])
    assert image.height == 2048
    assert image.width == round(900 * 2048 / 2700)


def test_upload_over_max_image_pixels_is_invalid_image(server_factory: Any) -> None:
    server = server_factory(max_image_pixels=10_000)

    response = upload(server, data_uri(image_bytes((200, 200))))

    assert response.status_code == 400, response.text
    (error,) = response.json()["errors"]
    assert error["code"] == "invalidImage"
    assert error["parameter"] == "image"
    assert "10000" in error["message"]


def test_upload_of_a_transparent_png_keeps_its_alpha(server: RunningServer) -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(buffer, format="PNG")

    item = uploaded_item(server, data_uri(buffer.getvalue()))

    served, image = served_image(item["imageURL"])
    assert served.headers["content-type"] == "image/png"
    assert image.mode == "RGBA"
    assert image.getpixel((0, 0))[3] == 0


def test_upload_of_a_bmp_is_stored_in_a_web_format(server: RunningServer) -> None:
    item = uploaded_item(server, data_uri(image_bytes((30, 20), "BMP", "gray"), "image/bmp"))

    served, image = served_image(item["imageURL"])
    assert served.headers["content-type"] in {"image/jpeg", "image/png"}
    assert image.size == (30, 20)


@pytest.mark.parametrize(
    "value",
    [
        data_uri(b"this is not an image", "image/png"),
        base64.b64encode(b"GIF89a but not really").decode(),
        "not base64 at all!",
        data_uri(image_bytes()[:40]),
    ],
    ids=["data-uri-text", "base64-text", "garbage", "truncated-png"],
)
def test_upload_of_a_non_image_is_invalid_image(server: RunningServer, value: str) -> None:
    task_uuid = str(uuid.uuid4())
    task = {"taskType": "imageUpload", "taskUUID": task_uuid, "image": value}

    response = server.post([task])

    assert response.status_code == 400, response.text
    assert "Traceback" not in response.text
    (error,) = response.json()["errors"]
    assert error["code"] == "invalidImage"
    assert error["parameter"] == "image"
    assert error["taskType"] == "imageUpload"
    assert error["taskUUID"] == task_uuid


def test_upload_from_a_url_answering_404_is_invalid_image(
    server: RunningServer, loopback_http: LoopbackHTTP
) -> None:
    response = upload(server, loopback_http.url("/missing.png"))

    assert response.status_code == 400, response.text
    (error,) = response.json()["errors"]
    assert error["code"] == "invalidImage"
    assert error["parameter"] == "image"


# -- uploaded and generated images as references ----------------------------------------------


def test_uploaded_uuid_works_as_a_top_level_reference_image(server: RunningServer) -> None:
    reference = uploaded_item(server, data_uri(image_bytes((80, 80), "PNG", "cyan")))

    response = server.post([tiny_task(referenceImages=[reference["imageUUID"]])])

    assert response.status_code == 200, response.text
    (item,) = response.json()["data"]
    _, image = served_image(item["imageURL"])
    assert image.size == (64, 64)


def test_uploaded_uuid_works_as_a_tagged_input_reference_image(server: RunningServer) -> None:
    reference = uploaded_item(server, data_uri(image_bytes((80, 80), "PNG", "cyan")))
    inputs = {"referenceImages": [{"image": reference["imageUUID"], "tag": "style"}]}

    response = server.post([tiny_task(inputs=inputs, width=96, height=64)])

    assert response.status_code == 200, response.text
    (item,) = response.json()["data"]
    _, image = served_image(item["imageURL"])
    assert image.size == (96, 64)


def test_generated_image_uuid_works_as_a_reference_image(server: RunningServer) -> None:
    (first,) = server.post([tiny_task()]).json()["data"]

    response = server.post([tiny_task(referenceImages=[first["imageUUID"]])])

    assert response.status_code == 200, response.text
    assert "imageUUID" in response.json()["data"][0]


def test_unknown_uuid_as_reference_is_invalid_reference_images(server: RunningServer) -> None:
    response = server.post([tiny_task(referenceImages=[str(uuid.uuid4())])])
    assert_reference_error(response, "referenceImages[0]")


def test_unknown_uuid_as_second_input_reference_names_its_index(server: RunningServer) -> None:
    reference = uploaded_item(server, data_uri(image_bytes()))
    inputs = {"referenceImages": [reference["imageUUID"], {"image": str(uuid.uuid4())}]}

    response = server.post([tiny_task(inputs=inputs)])

    assert_reference_error(response, "inputs.referenceImages[1]")


# -- reference images by value ----------------------------------------------------------------


def test_reference_images_from_url_data_uri_and_base64_work(
    server: RunningServer, loopback_http: LoopbackHTTP
) -> None:
    loopback_http.routes["/ref.jpg"] = (200, "image/jpeg", image_bytes((64, 64), "JPEG", "blue"))
    references = [
        loopback_http.url("/ref.jpg"),
        data_uri(image_bytes((32, 32), "PNG", "red")),
        base64.b64encode(image_bytes((48, 48), "PNG", "white")).decode(),
    ]
    tasks = [tiny_task(referenceImages=[reference]) for reference in references]

    response = server.post(tasks)

    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    assert {item["taskUUID"] for item in body["data"]} == {t["taskUUID"] for t in tasks}
    assert [r.path for r in loopback_http.requests] == ["/ref.jpg"]


def test_reference_url_answering_404_is_invalid_reference_images(
    server: RunningServer, loopback_http: LoopbackHTTP
) -> None:
    response = server.post([tiny_task(referenceImages=[loopback_http.url("/gone.png")])])

    error = assert_reference_error(response, "referenceImages[0]")
    assert "404" in error["message"]
    assert [r.path for r in loopback_http.requests] == ["/gone.png"]


def test_reference_url_that_is_not_an_image_is_invalid_reference_images(
    server: RunningServer, loopback_http: LoopbackHTTP
) -> None:
    loopback_http.routes["/page.html"] = (200, "text/html", b"<html>hello</html>")

    response = server.post([tiny_task(referenceImages=[loopback_http.url("/page.html")])])

    assert_reference_error(response, "referenceImages[0]")


def test_reference_url_over_max_fetch_bytes_is_invalid_reference_images(
    server_factory: Any, loopback_http: LoopbackHTTP
) -> None:
    server = server_factory(max_fetch_bytes=1000)
    big = noise_png()
    assert len(big) > 1000
    loopback_http.routes["/big.png"] = (200, "image/png", big)

    response = server.post([tiny_task(referenceImages=[loopback_http.url("/big.png")])])

    assert_reference_error(response, "referenceImages[0]")


def test_reference_data_uri_over_max_fetch_bytes_is_invalid_reference_images(
    server_factory: Any,
) -> None:
    server = server_factory(max_fetch_bytes=1000)

    response = server.post([tiny_task(referenceImages=[data_uri(noise_png())])])

    assert_reference_error(response, "referenceImages[0]")


def test_reference_url_that_never_answers_is_invalid_reference_images(
    server_factory: Any, loopback_http: LoopbackHTTP
) -> None:
    server = server_factory(fetch_timeout_s=0.5)
    release = threading.Event()

    def stall(record: Recorded) -> tuple[int, str, bytes]:
        release.wait(timeout=30)
        return 200, "image/png", image_bytes()

    loopback_http.handler = stall
    try:
        response = server.post([tiny_task(referenceImages=[loopback_http.url("/slow.png")])])
    finally:
        release.set()

    error = assert_reference_error(response, "referenceImages[0]")
    assert "did not finish" in error["message"]


def test_reference_under_max_fetch_bytes_is_accepted(
    server_factory: Any, loopback_http: LoopbackHTTP
) -> None:
    server = server_factory(max_fetch_bytes=1000)
    small = image_bytes((16, 16), "PNG", "black")
    assert len(small) < 1000
    loopback_http.routes["/small.png"] = (200, "image/png", small)

    response = server.post([tiny_task(referenceImages=[loopback_http.url("/small.png")])])

    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "127.1", "2130706433", "0.0.0.0", "[::1]", "[::ffff:127.0.0.1]"],
)
def test_private_address_reference_is_refused_without_any_request(
    server_factory: Any, loopback_http: LoopbackHTTP, host: str
) -> None:
    server = server_factory(allow_private_networks=False)
    loopback_http.routes["/secret.png"] = (200, "image/png", image_bytes())
    url = f"http://{host}:{loopback_http.port}/secret.png"

    response = server.post([tiny_task(referenceImages=[url])])

    error = assert_reference_error(response, "referenceImages[0]")
    assert "private" in error["message"]
    assert loopback_http.requests == []


def test_private_address_upload_is_refused_without_any_request(
    server_factory: Any, loopback_http: LoopbackHTTP
) -> None:
    server = server_factory(allow_private_networks=False)
    loopback_http.routes["/secret.png"] = (200, "image/png", image_bytes())

    response = upload(server, loopback_http.url("/secret.png"))

    assert response.status_code == 400, response.text
    (error,) = response.json()["errors"]
    assert error["code"] == "invalidImage"
    assert error["parameter"] == "image"
    assert loopback_http.requests == []


def test_non_http_reference_scheme_is_invalid_reference_images(server: RunningServer) -> None:
    response = server.post([tiny_task(referenceImages=["file:///etc/passwd"])])
    assert_reference_error(response, "referenceImages[0]")
