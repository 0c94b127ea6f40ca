"""Content safety over real HTTP: a real impasto server on loopback, the tiny diffusers model,
and NudeNet's real detector (the `safety` extra) deciding on generated and drawn images."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import safety_images
from tests.conftest import LoopbackHTTP, RunningServer

ServerFactory = Callable[..., RunningServer]


def inference(**fields: Any) -> dict[str, Any]:
    task: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "impasto:tiny@1",
        "positivePrompt": "a lighthouse at dusk",
        "width": 128,
        "height": 128,
    }
    task.update(fields)
    return task


def errors_of(response: httpx.Response) -> list[dict[str, Any]]:
    assert "Traceback" not in response.text
    errors: list[dict[str, Any]] = response.json().get("errors", [])
    return errors


def stored_files(server: RunningServer) -> list[Path]:
    root = server.settings.images_dir
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def get_response(server: RunningServer, task_uuid: str) -> httpx.Response:
    return server.post([{"taskType": "getResponse", "taskUUID": task_uuid}])


def serve_png(http: LoopbackHTTP, path: str, image: Any) -> str:
    http.routes[path] = (200, "image/png", safety_images.png_bytes(image))
    return http.url(path)


# -- checkContent ----------------------------------------------------------------------------


def test_nsfw_content_is_present_exactly_when_asked(server: RunningServer) -> None:
    plain = inference()
    checked = inference(safety={"checkContent": True})
    legacy = inference(checkNSFW=True)
    legacy_lower = inference(checkNsfw=True)
    full = inference(safety={"checkContent": True, "mode": "full"}, width=448, height=448)
    off = inference(safety={"checkContent": True, "mode": "none"})
    tasks = [plain, checked, legacy, legacy_lower, full, off]

    response = server.post(tasks)

    assert response.status_code == 200, response.text
    items = {item["taskUUID"]: item for item in response.json()["data"]}
    assert set(items) == {t["taskUUID"] for t in tasks}
    for task in (checked, legacy, legacy_lower, full):
        # The tiny model's random weights paint noise: real checks, clean verdicts.
        assert items[task["taskUUID"]]["NSFWContent"] is False
    for task in (plain, off):
        assert "NSFWContent" not in items[task["taskUUID"]]


def test_unknown_safety_mode_is_an_error_item_at_submit(server: RunningServer) -> None:
    task = inference(safety={"checkContent": True, "mode": "thorough"})

    response = server.post([task])

    assert response.status_code == 400, response.text
    [error] = errors_of(response)
    assert error["code"] == "invalidSafety"
    assert error["parameter"] == "safety.mode"
    assert error["taskUUID"] == task["taskUUID"]
    assert get_response(server, task["taskUUID"]).status_code == 404


def test_flagged_outputs_are_marked_and_still_returned(server_factory: ServerFactory) -> None:
    server = server_factory(safety_threshold=0.0)

    response = server.post([inference(safety={"checkContent": True}, numberResults=2)])

    assert response.status_code == 200, response.text
    items = response.json()["data"]
    assert [item["NSFWContent"] for item in items] == [True, True]
    for item in items:
        assert httpx.get(item["imageURL"], timeout=30).status_code == 200


def test_withholding_turns_flagged_outputs_into_sensitive_content_errors(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(safety_threshold=0.0, safety_withhold_flagged=True)
    checked = inference(safety={"checkContent": True}, numberResults=2, includeCost=True)

    response = server.post([checked])

    assert "data" not in response.json()
    errors = errors_of(response)
    assert errors
    assert {e["code"] for e in errors} == {"sensitiveContentDetected"}
    assert stored_files(server) == []
    polled = get_response(server, checked["taskUUID"]).json()
    assert all("imageUUID" not in item for item in polled.get("data", []))
    # Withholding concerns checked outputs only.
    plain = server.post([inference()])
    assert plain.status_code == 200, plain.text
    assert "NSFWContent" not in plain.json()["data"][0]


# -- blockContent ----------------------------------------------------------------------------


def test_block_content_fails_a_flagged_reference_before_generation(
    server_factory: ServerFactory, loopback_http: LoopbackHTTP
) -> None:
    server = server_factory(safety_threshold=0.0)
    url = serve_png(loopback_http, "/landscape.png", safety_images.landscape(512))
    task = inference(
        safety={"blockContent": True}, referenceImages=[url], includeCost=True, numberResults=2
    )

    response = server.post([task])

    assert response.status_code == 400, response.text
    body = response.json()
    assert "data" not in body
    [error] = body["errors"]
    assert error["code"] == "sensitiveContentDetected"
    assert error["parameter"] == "referenceImages[0]"
    assert error["taskUUID"] == task["taskUUID"]
    assert "cost" not in error
    # Nothing was stored: no task to poll, no image.
    assert errors_of(get_response(server, task["taskUUID"]))[0]["code"] == "taskNotFound"
    assert stored_files(server) == []
    assert server.runtime().scheduler.queued() == 0


def test_block_content_fails_a_prompt_with_a_configured_term(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    terms = tmp_path / "terms.txt"
    terms.write_text("# house rules\nlighthouse\n")
    server = server_factory(safety_prompt_terms_file=terms)
    blocked = inference(safety={"blockContent": True}, includeCost=True)
    unscreened = inference(includeCost=True)

    response = server.post([blocked, unscreened])

    [error] = errors_of(response)
    assert error["code"] == "sensitiveContentDetected"
    assert error["parameter"] == "positivePrompt"
    assert error["taskUUID"] == blocked["taskUUID"]
    [item] = response.json()["data"]
    assert item["taskUUID"] == unscreened["taskUUID"]
    assert item["cost"] >= 0
    assert get_response(server, blocked["taskUUID"]).status_code == 404


def test_default_block_content_passes_clean_inputs_and_blocks_explicit_prompts(
    server: RunningServer, loopback_http: LoopbackHTTP
) -> None:
    references = [
        serve_png(loopback_http, "/gradient.png", safety_images.gradient(640)),
        serve_png(loopback_http, "/landscape.png", safety_images.landscape(640)),
        serve_png(loopback_http, "/white.png", safety_images.solid("white", 640)),
    ]
    clean = inference(
        safety={"blockContent": True, "checkContent": True},
        inputs={"referenceImages": references},
        negativePrompt="nsfw, nude",
    )
    explicit = inference(safety={"blockContent": True}, positivePrompt="a NUDE portrait")

    response = server.post([clean, explicit])

    [item] = response.json()["data"]
    assert item["taskUUID"] == clean["taskUUID"]
    assert item["NSFWContent"] is False
    [error] = errors_of(response)
    assert (error["taskUUID"], error["code"]) == (explicit["taskUUID"], "sensitiveContentDetected")


def test_the_real_detector_blocks_a_face_reference_when_faces_count(
    server_factory: ServerFactory, loopback_http: LoopbackHTTP
) -> None:
    # Faces stand in for explicit material: the same detector, the same decision path.
    server = server_factory(safety_labels="FACE_FEMALE,FACE_MALE", safety_threshold=0.5)
    face = serve_png(loopback_http, "/face.png", safety_images.face(320))
    landscape = serve_png(loopback_http, "/landscape.png", safety_images.landscape(320))
    with_face = inference(safety={"blockContent": True}, referenceImages=[landscape, face])
    without = inference(safety={"blockContent": True}, referenceImages=[landscape])

    response = server.post([with_face, without])

    [error] = errors_of(response)
    assert error["taskUUID"] == with_face["taskUUID"]
    assert error["code"] == "sensitiveContentDetected"
    assert error["parameter"] == "referenceImages[1]"
    [item] = response.json()["data"]
    assert item["taskUUID"] == without["taskUUID"]


# -- no checker ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("checker", "logged"),
    [
        ("none", "content checking is off"),
        ("hf:/no/such/classifier", "no model directory at /no/such/classifier"),
    ],
)
def test_a_missing_checker_warns_at_start_up_and_refuses_checks(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture, checker: str, logged: str
) -> None:
    with caplog.at_level(logging.WARNING, logger="impasto.safety"):
        server = server_factory(safety_checker=checker)
    warnings = [r for r in caplog.records if r.name == "impasto.safety"]
    assert any(logged in r.getMessage() and r.levelno == logging.WARNING for r in warnings)
    checked = inference(safety={"checkContent": True})
    blocked = inference(safety={"blockContent": True})
    plain = inference()

    response = server.post([checked, blocked, plain])

    errors = {e["taskUUID"]: e for e in errors_of(response)}
    assert errors[checked["taskUUID"]]["code"] == "unsupportedParameter"
    assert errors[checked["taskUUID"]]["parameter"] == "safety.checkContent"
    assert errors[blocked["taskUUID"]]["parameter"] == "safety.blockContent"
    for error in errors.values():
        assert "Content checking is not available on this server" in error["message"]
        assert "/no/such" not in error["message"]
    [item] = response.json()["data"]
    assert item["taskUUID"] == plain["taskUUID"]
