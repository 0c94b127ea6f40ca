"""Runway mapping: Runware task fields to Runway's text_to_image body, reference images to URIs
Runway accepts, tag rules checked at submit, and the error tables."""

from __future__ import annotations

import base64
import io
import os
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import runwayml
from PIL import Image

from impasto.backends.base import GenerationJob, ReferenceImage
from impasto.backends.devices import DevicePool
from impasto.backends.factory import BackendContext, create_backend, models_without_keys
from impasto.backends.registry import ModelRegistry
from impasto.backends.runway import (
    DATA_URI_LIMIT,
    ISSUE_PARAMETERS,
    RUNWAY_RATIOS,
    STATUS_ERRORS,
    TASK_FAILURES,
    create_arguments,
    data_uri,
    error_for_exception,
    error_for_failure,
    error_for_rejection,
    error_for_status,
    fit_output,
    never_sent,
    passes_through,
    ratio_for,
    runway_seed,
)
from impasto.protocol.errors import (
    ImpastoError,
    InvalidParameter,
    ProviderNotConfigured,
    status_of_code,
)
from impasto.protocol.rules import RUNWAY_SIZES
from impasto.protocol.tasks import ImageInferenceIn, check_against_rules
from impasto.settings import Settings

REGISTRY = ModelRegistry.load(None)


def _job(**fields: Any) -> GenerationJob:
    values: dict[str, Any] = {
        "task_uuid": str(uuid.uuid4()),
        "index": 0,
        "model": "runway:4@1",
        "prompt": "@eiffel painted in the style of @starry",
        "width": 1920,
        "height": 1080,
        "seed": 2**40 + 42,
    }
    values.update(fields)
    return GenerationJob(**values)


def _decoded(uri: str) -> Image.Image:
    header, _, payload = uri.partition(",")
    assert header.startswith("data:image/")
    assert header.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(payload)))


# -- request mapping ------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), RUNWAY_SIZES)
def test_each_runware_size_maps_to_its_runway_ratio(width: int, height: int) -> None:
    assert ratio_for(width, height) == f"{width}:{height}"


def test_runway_ratios_are_exactly_the_registry_sizes() -> None:
    assert {f"{w}:{h}" for w, h in RUNWAY_SIZES} == RUNWAY_RATIOS


def test_size_outside_the_ratio_enum_is_an_invalid_width() -> None:
    with pytest.raises(InvalidParameter) as raised:
        ratio_for(512, 512)
    assert raised.value.code == "invalidWidth"
    assert raised.value.parameter == "width"


def test_seeds_fold_into_runways_32_bit_range_and_stay_distinct() -> None:
    seeds = [runway_seed(s) for s in range(2**63 - 10, 2**63)]
    assert all(0 <= s <= 4294967295 for s in seeds)
    assert len(set(seeds)) == len(seeds)
    assert runway_seed(123) == 123


def test_job_maps_to_runway_create_arguments() -> None:
    eiffel = ReferenceImage(
        Image.new("RGB", (64, 48), "gray"),
        tag="eiffel",
        source_url="https://cdn.example.com/eiffel.jpg",
    )
    starry = ReferenceImage(Image.new("RGB", (32, 32), "blue"), tag="StarryNight")
    job = _job(
        reference_images=(eiffel, starry),
        provider_settings={"runway": {"contentModeration": {"publicFigureThreshold": "low"}}},
    )

    arguments = create_arguments(job, "gen4_image", runway_seed(job.seed))

    assert arguments["model"] == "gen4_image"
    assert arguments["prompt_text"] == "@eiffel painted in the style of @starry"
    assert arguments["ratio"] == "1920:1080"
    assert arguments["seed"] == 42
    assert arguments["content_moderation"] == {"public_figure_threshold": "low"}
    first, second = arguments["reference_images"]
    assert first == {"uri": "https://cdn.example.com/eiffel.jpg", "tag": "eiffel"}
    assert second["tag"] == "StarryNight"
    assert second["uri"].startswith("data:image/jpeg;base64,")
    assert _decoded(second["uri"]).size == (32, 32)


def test_job_without_references_or_provider_settings_sends_neither() -> None:
    arguments = create_arguments(_job(width=720, height=720), "gen4_image_turbo", 9)
    assert set(arguments) == {"model", "prompt_text", "ratio", "seed"}
    assert arguments["ratio"] == "720:720"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://assets.runware.ai/assets/inputs/a.jpg", True),
        ("http://assets.runware.ai/assets/inputs/a.jpg", False),
        ("https://93.184.216.34/a.jpg", False),
        ("https://[2001:db8::1]/a.jpg", False),
        ("https://example.com/" + "a" * 2048, False),
        (None, False),
    ],
)
def test_only_https_urls_runway_can_fetch_pass_through(url: str | None, expected: bool) -> None:
    assert passes_through(url) is expected


def test_reference_with_an_ip_host_goes_as_a_data_uri() -> None:
    reference = ReferenceImage(
        Image.new("RGB", (16, 16)), tag="cat", source_url="https://10.0.0.1/a.png"
    )
    arguments = create_arguments(_job(reference_images=(reference,)), "gen4_image", 1)
    assert arguments["reference_images"][0]["uri"].startswith("data:image/")


def test_transparent_reference_keeps_its_alpha_as_png() -> None:
    uri = data_uri(Image.new("RGBA", (40, 30), (255, 0, 0, 128)))
    assert uri.startswith("data:image/png;base64,")
    assert _decoded(uri).mode == "RGBA"


def test_large_noisy_image_fits_runways_5_mib_data_uri_limit() -> None:
    # Noise does not compress: this is ~14 MB as JPEG at quality 92.
    noise = Image.frombytes("RGB", (3000, 2200), os.urandom(3000 * 2200 * 3))

    uri = data_uri(noise)

    assert len(uri) <= DATA_URI_LIMIT == 5 * 1024 * 1024
    decoded = _decoded(uri)
    assert decoded.format == "JPEG"
    # Downscaled, with its aspect ratio kept, but not needlessly small.
    assert abs(decoded.width / decoded.height - 3000 / 2200) < 0.01
    assert decoded.width >= 1000


def test_data_uri_shrinks_to_any_limit() -> None:
    noise = Image.frombytes("RGB", (600, 400), os.urandom(600 * 400 * 3))
    uri = data_uri(noise, limit=60_000)
    assert len(uri) <= 60_000
    _decoded(uri).load()


def test_output_of_another_size_is_fitted_exactly() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (1000, 1000), "green").save(buffer, format="JPEG")
    image = fit_output(buffer.getvalue(), 1360, 768)
    assert image.size == (1360, 768)
    assert image.mode == "RGB"


# -- tags and prompt checked at submit ----------------------------------------------------------


def _task(model: str = "runway:4@1", **fields: Any) -> ImageInferenceIn:
    raw: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": model,
        "positivePrompt": "@eiffel at night",
    }
    raw.update(fields)
    return ImageInferenceIn.model_validate(raw)


@pytest.mark.parametrize("tag", ["eiffel", "EiffelTower", "abc", "a_1", "x" * 16, "Starry_2"])
def test_runway_tags_that_are_accepted(tag: str) -> None:
    task = _task(inputs={"referenceImages": [{"image": "https://e.com/a.png", "tag": tag}]})
    check_against_rules(task, REGISTRY.resolve("runway:4@1").rules)


@pytest.mark.parametrize("tag", ["ab", "1abc", "_abc", "a-b-c", "with space", "x" * 17, "été"])
def test_bad_runway_tag_is_refused_naming_the_reference(tag: str) -> None:
    task = _task(
        inputs={
            "referenceImages": [
                {"image": "https://e.com/a.png", "tag": "good"},
                {"image": "https://e.com/b.png", "tag": tag},
            ]
        }
    )
    with pytest.raises(InvalidParameter) as raised:
        check_against_rules(task, REGISTRY.resolve("runway:4@1").rules)
    assert raised.value.code == "invalidReferenceImages"
    assert raised.value.parameter == "inputs.referenceImages[1].tag"
    assert raised.value.http_status == 400


def test_bad_tag_at_top_level_names_the_top_level_parameter() -> None:
    task = _task(referenceImages=[{"image": "https://e.com/a.png", "tag": "no"}])
    with pytest.raises(InvalidParameter) as raised:
        check_against_rules(task, REGISTRY.resolve("runway:4@1").rules)
    assert raised.value.parameter == "referenceImages[0].tag"


def test_tag_rule_applies_only_to_runway_models() -> None:
    task = _task(
        model="impasto:tiny@1",
        inputs={"referenceImages": [{"image": "https://e.com/a.png", "tag": "no"}]},
    )
    check_against_rules(task, REGISTRY.resolve("impasto:tiny@1").rules)


def test_prompt_is_measured_in_utf16_units_for_runway() -> None:
    task = _task(positivePrompt="🎨" * 600)  # 600 characters, 1200 UTF-16 code units
    with pytest.raises(InvalidParameter) as raised:
        check_against_rules(task, REGISTRY.resolve("runway:4@1").rules)
    assert raised.value.code == "invalidPositivePrompt"
    assert raised.value.parameter == "positivePrompt"
    check_against_rules(_task(positivePrompt="🎨" * 500), REGISTRY.resolve("runway:4@1").rules)


# -- the error tables ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure_code", "code", "parameter"),
    [
        ("SAFETY.INPUT.TEXT", "invalidProviderContent", None),
        ("SAFETY.INPUT.IMAGE", "invalidProviderContent", None),
        ("SAFETY.OUTPUT.IMAGE", "invalidProviderContent", None),
        ("INPUT_PREPROCESSING.SAFETY.TEXT", "invalidProviderContent", None),
        ("ASSET.INVALID", "invalidReferenceImages", "inputs.referenceImages"),
        ("INTERNAL.BAD_OUTPUT.CODE01", "providerError", None),
        ("INPUT_PREPROCESSING.INTERNAL", "providerError", None),
        ("INTERNAL", "providerError", None),
        ("SOMETHING.NEW", "providerError", None),
        (None, "providerError", None),
    ],
)
def test_task_failure_codes_map_to_error_items(
    failure_code: str | None, code: str, parameter: str | None
) -> None:
    error = error_for_failure(failure_code)
    assert (error.code, error.parameter) == (code, parameter)


def test_every_task_failure_row_is_covered_above() -> None:
    prefixes = {prefix for prefix, _ in TASK_FAILURES}
    assert prefixes == {
        "SAFETY.INPUT",
        "SAFETY.OUTPUT",
        "INPUT_PREPROCESSING.SAFETY",
        "ASSET.INVALID",
        "INTERNAL.BAD_OUTPUT",
        "",
    }


@pytest.mark.parametrize(
    ("status", "code", "http_status"),
    [
        (401, "invalidProviderApiKey", 502),
        (403, "invalidProviderApiKey", 502),
        (404, "providerError", 502),
        (429, "providerRateLimitExceeded", 429),
        (500, "providerError", 502),
        (502, "providerError", 502),
        (503, "providerError", 502),
        (504, "providerError", 502),
        (418, "providerError", 502),
    ],
)
def test_http_statuses_map_to_error_items(status: int, code: str, http_status: int) -> None:
    error = error_for_status(status, {"error": "raw text"})
    assert error.code == code
    assert error.http_status == http_status
    assert status_of_code(code) == http_status
    assert "raw text" not in error.message


def test_status_rows_are_covered_above() -> None:
    assert set(STATUS_ERRORS) == {401, 403, 404, 429}


@pytest.mark.parametrize(
    ("path", "code", "parameter"),
    [
        (["promptText"], "invalidPositivePrompt", "positivePrompt"),
        (["ratio"], "invalidWidth", "width"),
        (["referenceImages"], "invalidReferenceImages", "inputs.referenceImages"),
        (["referenceImages", 1, "tag"], "invalidReferenceImages", "inputs.referenceImages[1].tag"),
        (
            ["contentModeration", "publicFigureThreshold"],
            "invalidProviderSettings",
            "providerSettings.runway.contentModeration.publicFigureThreshold",
        ),
        (["seed"], "invalidSeed", "seed"),
        (["model"], "invalidModel", "model"),
    ],
)
def test_validation_issues_name_our_parameter(path: list[Any], code: str, parameter: str) -> None:
    body = {"error": "Validation failed", "issues": [{"code": "too_big", "path": path}]}
    error = error_for_rejection(body)
    assert isinstance(error, InvalidParameter)
    assert (error.code, error.parameter, error.http_status) == (code, parameter, 400)


def test_issue_rows_are_covered_above() -> None:
    assert set(ISSUE_PARAMETERS) == {
        "promptText",
        "ratio",
        "referenceImages",
        "contentModeration",
        "seed",
        "model",
    }


def test_asset_rejection_without_issues_names_the_reference() -> None:
    error = error_for_rejection({"error": "Invalid asset in referenceImages[2]: fetch failed"})
    assert (error.code, error.parameter) == ("invalidReferenceImages", "inputs.referenceImages[2]")


def test_unknown_rejection_is_a_provider_error_without_runways_text() -> None:
    error = error_for_rejection({"error": "secret reason", "issues": [{"path": []}]})
    assert error.code == "providerError"
    assert "secret" not in error.message


def test_sdk_timeouts_and_connection_failures_map_to_error_items() -> None:
    request = httpx.Request("POST", "https://api.dev.runwayml.com/v1/text_to_image")
    assert error_for_exception(runwayml.APITimeoutError(request=request)).code == "timeoutProvider"
    failed = runwayml.APIConnectionError(request=request)
    assert error_for_exception(failed).code == "providerError"


def test_only_failures_to_connect_count_as_never_sent() -> None:
    request = httpx.Request("POST", "https://api.dev.runwayml.com/v1/text_to_image")
    for cause, expected in [
        (httpx.ConnectError("refused"), True),
        (httpx.ConnectTimeout("slow"), True),
        (httpx.ReadTimeout("slow"), False),
        (httpx.RemoteProtocolError("closed"), False),
    ]:
        error = runwayml.APIConnectionError(request=request)
        error.__cause__ = cause
        assert never_sent(error) is expected


# -- configuration ------------------------------------------------------------------------------


def test_settings_read_the_runwayml_sdk_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNWAYML_API_SECRET", "key_abc")
    monkeypatch.setenv("RUNWAYML_BASE_URL", "http://127.0.0.1:9")
    settings = Settings()
    assert settings.runway_api_secret is not None
    assert settings.runway_api_secret.get_secret_value() == "key_abc"
    assert "key_abc" not in repr(settings)
    assert settings.runway_base_url == "http://127.0.0.1:9"
    assert settings.runway_poll_interval_s == 5.0
    assert Settings(runway_api_secret=None).runway_api_secret is None


def _context(tmp_path: Path, keys: dict[str, str] | None = None) -> BackendContext:
    return BackendContext(
        models_dir=tmp_path, devices=DevicePool(["cpu"]), max_batch_size=1, provider_keys=keys
    )


def test_runway_model_without_a_key_is_not_configured(tmp_path: Path) -> None:
    context = _context(tmp_path)
    assert models_without_keys(REGISTRY, context) == ["runway:4@1", "runway:4@2"]
    with pytest.raises(ProviderNotConfigured) as raised:
        create_backend(REGISTRY.resolve("runway:4@1").target, context)
    error: ImpastoError = raised.value
    assert (error.code, error.parameter, error.http_status) == (
        "providerNotConfigured",
        "model",
        503,
    )


def test_a_key_in_the_models_file_entry_configures_that_model(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text('[models."runway:4@1".settings]\napi_key = "key_own"\n')
    registry = ModelRegistry.load(models)
    assert models_without_keys(registry, _context(tmp_path)) == ["runway:4@2"]
    assert models_without_keys(registry, _context(tmp_path, {"runway": "key_x"})) == []
