"""Every validation rule of the task types, one table row each: the task, the Runware error
`code` and the `parameter` a client sees. Errors are taken the way the dispatcher takes them:
`parse_task`, then the model's rules from the registry, then the task context."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from impasto.backends.registry import ModelRegistry
from impasto.protocol.errors import ImpastoError
from impasto.protocol.rules import RUNWAY_SIZES
from impasto.protocol.tasks import (
    ImageInferenceIn,
    TaskIn,
    check_against_rules,
    parse_task,
    task_context,
)

REGISTRY = ModelRegistry.load(None)
SEED_TASKS = json.loads((Path(__file__).parents[1] / "data" / "seed-tasks.json").read_text())

TASK_UUID = "f47ac10b-58cc-4372-a567-0e02b2c3d493"
IMAGE_UUID = "c64351d5-4c59-42f7-95e1-eace013eddab"
V1_UUID = "6ba7b831-9dad-11d1-80b4-00c04fd430c8"
REF_URL = "https://example.com/reference.jpg"

DROP: Any = object()

RUNWAY: dict[str, Any] = {
    "taskType": "imageInference",
    "taskUUID": TASK_UUID,
    "model": "runway:4@1",
    "positivePrompt": "a lighthouse on a cliff at dusk",
    "width": 1920,
    "height": 1080,
}
TURBO: dict[str, Any] = {
    **RUNWAY,
    "model": "runway:4@2",
    "inputs": {"referenceImages": [{"image": IMAGE_UUID, "tag": "scene"}]},
}
TINY: dict[str, Any] = {**RUNWAY, "model": "impasto:tiny@1", "width": 512, "height": 512}
UPLOAD: dict[str, Any] = {"taskType": "imageUpload", "taskUUID": TASK_UUID, "image": REF_URL}
GET_RESPONSE: dict[str, Any] = {"taskType": "getResponse", "taskUUID": TASK_UUID}
AUTHENTICATION: dict[str, Any] = {"taskType": "authentication", "apiKey": "secret-key"}


def mutated(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of `base` with keys set, or removed where the value is DROP."""
    task = dict(base)
    for key, value in changes.items():
        if value is DROP:
            task.pop(key, None)
        else:
            task[key] = value
    return task


def refs(count: int) -> list[str]:
    return [f"https://example.com/ref-{i}.jpg" for i in range(count)]


def validate(raw: Any) -> TaskIn:
    """What the service does before accepting a task; raises the error item it would send."""
    task = parse_task(raw)
    if isinstance(task, ImageInferenceIn):
        try:
            check_against_rules(task, REGISTRY.resolve(task.model).rules)
        except ImpastoError as exc:
            raise exc.for_task(task.taskType, task.taskUUID) from None
    return task


def validate_inference(raw: Any) -> ImageInferenceIn:
    task = validate(raw)
    assert isinstance(task, ImageInferenceIn)
    return task


class Rejected(NamedTuple):
    id: str
    task: Any
    code: str
    parameter: str | None


REJECTED: list[Rejected] = [
    # -- the request element itself --
    Rejected("task-is-a-list", [RUNWAY], "invalidRequestBody", None),
    Rejected("task-is-a-string", "imageInference", "invalidRequestBody", None),
    Rejected("task-is-null", None, "invalidRequestBody", None),
    Rejected("task-is-a-number", 7, "invalidRequestBody", None),
    Rejected("taskType-missing", mutated(RUNWAY, taskType=DROP), "missingTaskType", "taskType"),
    Rejected(
        "taskType-unknown",
        mutated(RUNWAY, taskType="videoInference"),
        "unsupportedTaskType",
        "taskType",
    ),
    Rejected(
        "taskType-not-a-string", mutated(RUNWAY, taskType=5), "unsupportedTaskType", "taskType"
    ),
    # -- taskUUID --
    Rejected("taskUUID-missing", mutated(RUNWAY, taskUUID=DROP), "missingTaskUUID", "taskUUID"),
    Rejected("taskUUID-not-a-uuid", mutated(RUNWAY, taskUUID="abc"), "invalidTaskUUID", "taskUUID"),
    Rejected("taskUUID-empty", mutated(RUNWAY, taskUUID=""), "invalidTaskUUID", "taskUUID"),
    Rejected(
        "taskUUID-version-1", mutated(RUNWAY, taskUUID=V1_UUID), "invalidTaskUUID", "taskUUID"
    ),
    Rejected(
        "taskUUID-without-dashes",
        mutated(RUNWAY, taskUUID=TASK_UUID.replace("-", "")),
        "invalidTaskUUID",
        "taskUUID",
    ),
    Rejected("taskUUID-a-number", mutated(RUNWAY, taskUUID=123), "invalidTaskUUID", "taskUUID"),
    # -- positivePrompt --
    Rejected(
        "positivePrompt-missing",
        mutated(RUNWAY, positivePrompt=DROP),
        "missingPositivePrompt",
        "positivePrompt",
    ),
    Rejected(
        "positivePrompt-empty",
        mutated(RUNWAY, positivePrompt=""),
        "invalidPositivePrompt",
        "positivePrompt",
    ),
    Rejected(
        "positivePrompt-blank",
        mutated(RUNWAY, positivePrompt="  \n\t "),
        "invalidPositivePrompt",
        "positivePrompt",
    ),
    Rejected(
        "positivePrompt-1001-chars",
        mutated(RUNWAY, positivePrompt="x" * 1001),
        "invalidPositivePrompt",
        "positivePrompt",
    ),
    Rejected(
        "positivePrompt-a-number",
        mutated(RUNWAY, positivePrompt=42),
        "invalidPositivePrompt",
        "positivePrompt",
    ),
    Rejected(
        "positivePrompt-null",
        mutated(RUNWAY, positivePrompt=None),
        "invalidPositivePrompt",
        "positivePrompt",
    ),
    Rejected(
        "positivePrompt-a-list",
        mutated(RUNWAY, positivePrompt=["a cat"]),
        "invalidPositivePrompt",
        "positivePrompt",
    ),
    # -- model --
    Rejected("model-missing", mutated(RUNWAY, model=DROP), "missingModel", "model"),
    Rejected("model-unknown", mutated(RUNWAY, model="nobody:1@1"), "invalidModel", "model"),
    Rejected("model-empty", mutated(RUNWAY, model=""), "invalidModel", "model"),
    Rejected("model-a-number", mutated(RUNWAY, model=101), "invalidModel", "model"),
    # -- width and height --
    Rejected("height-without-width", mutated(RUNWAY, width=DROP), "missingWidth", "width"),
    Rejected("width-without-height", mutated(RUNWAY, height=DROP), "missingHeight", "height"),
    Rejected("tiny-height-without-width", mutated(TINY, width=DROP), "missingWidth", "width"),
    Rejected(
        "runway-width-not-in-any-pair",
        mutated(RUNWAY, width=1000, height=1080),
        "invalidWidth",
        "width",
    ),
    Rejected(
        "runway-swapped-pair-with-unknown-width",
        mutated(RUNWAY, width=768, height=1360),
        "invalidWidth",
        "width",
    ),
    Rejected(
        "runway-allowed-width-bad-pair",
        mutated(RUNWAY, width=1920, height=1920),
        "invalidHeight",
        "height",
    ),
    Rejected(
        "runway-allowed-width-height-off-by-one",
        mutated(RUNWAY, width=1080, height=1081),
        "invalidHeight",
        "height",
    ),
    Rejected(
        "runway-both-sides-allowed-but-not-as-a-pair",
        mutated(RUNWAY, width=720, height=1080),
        "invalidHeight",
        "height",
    ),
    Rejected(
        "turbo-width-not-in-any-pair",
        mutated(TURBO, width=512, height=512),
        "invalidWidth",
        "width",
    ),
    Rejected(
        "turbo-allowed-width-bad-pair",
        mutated(TURBO, width=1024, height=768),
        "invalidHeight",
        "height",
    ),
    Rejected("tiny-width-63", mutated(TINY, width=63), "invalidWidth", "width"),
    Rejected("tiny-width-2049", mutated(TINY, width=2049), "invalidWidth", "width"),
    Rejected("tiny-height-63", mutated(TINY, height=63), "invalidHeight", "height"),
    Rejected("tiny-height-2049", mutated(TINY, height=2049), "invalidHeight", "height"),
    Rejected("width-zero", mutated(TINY, width=0), "invalidWidth", "width"),
    Rejected("width-negative", mutated(TINY, width=-512), "invalidWidth", "width"),
    Rejected("width-a-string", mutated(TINY, width="512"), "invalidWidth", "width"),
    Rejected("width-a-float", mutated(TINY, width=512.0), "invalidWidth", "width"),
    Rejected("height-a-string", mutated(TINY, height="512"), "invalidHeight", "height"),
    # -- numberResults --
    Rejected(
        "numberResults-zero",
        mutated(RUNWAY, numberResults=0),
        "invalidNumberResults",
        "numberResults",
    ),
    Rejected(
        "numberResults-21",
        mutated(RUNWAY, numberResults=21),
        "invalidNumberResults",
        "numberResults",
    ),
    Rejected(
        "numberResults-a-string",
        mutated(RUNWAY, numberResults="2"),
        "invalidNumberResults",
        "numberResults",
    ),
    Rejected(
        "numberResults-a-float",
        mutated(RUNWAY, numberResults=2.5),
        "invalidNumberResults",
        "numberResults",
    ),
    # -- output options --
    Rejected(
        "outputType-unknown", mutated(RUNWAY, outputType="file"), "invalidOutputType", "outputType"
    ),
    Rejected(
        "outputType-wrong-case",
        mutated(RUNWAY, outputType="url"),
        "invalidOutputType",
        "outputType",
    ),
    Rejected(
        "outputType-two-element-list",
        mutated(RUNWAY, outputType=["URL", "dataURI"]),
        "invalidOutputType",
        "outputType",
    ),
    Rejected(
        "outputType-empty-list", mutated(RUNWAY, outputType=[]), "invalidOutputType", "outputType"
    ),
    Rejected(
        "outputFormat-GIF",
        mutated(RUNWAY, outputFormat="GIF"),
        "invalidOutputFormat",
        "outputFormat",
    ),
    Rejected(
        "outputFormat-SVG",
        mutated(RUNWAY, outputFormat="svg"),
        "invalidOutputFormat",
        "outputFormat",
    ),
    Rejected(
        "outputFormat-a-number",
        mutated(RUNWAY, outputFormat=1),
        "invalidOutputFormat",
        "outputFormat",
    ),
    Rejected(
        "outputQuality-19",
        mutated(RUNWAY, outputQuality=19),
        "invalidOutputQuality",
        "outputQuality",
    ),
    Rejected(
        "outputQuality-100",
        mutated(RUNWAY, outputQuality=100),
        "invalidOutputQuality",
        "outputQuality",
    ),
    Rejected(
        "outputQuality-a-string",
        mutated(RUNWAY, outputQuality="95"),
        "invalidOutputQuality",
        "outputQuality",
    ),
    Rejected("ttl-59", mutated(RUNWAY, ttl=59), "invalidTtl", "ttl"),
    Rejected("ttl-zero", mutated(RUNWAY, ttl=0), "invalidTtl", "ttl"),
    Rejected("ttl-a-string", mutated(RUNWAY, ttl="3600"), "invalidTtl", "ttl"),
    Rejected(
        "includeCost-string-true",
        mutated(RUNWAY, includeCost="true"),
        "invalidIncludeCost",
        "includeCost",
    ),
    Rejected(
        "includeCost-one", mutated(RUNWAY, includeCost=1), "invalidIncludeCost", "includeCost"
    ),
    Rejected(
        "includeCost-zero", mutated(RUNWAY, includeCost=0), "invalidIncludeCost", "includeCost"
    ),
    Rejected(
        "deliveryMethod-stream",
        mutated(RUNWAY, deliveryMethod="stream"),
        "invalidDeliveryMethod",
        "deliveryMethod",
    ),
    Rejected(
        "deliveryMethod-webhook",
        mutated(RUNWAY, deliveryMethod="webhook"),
        "invalidDeliveryMethod",
        "deliveryMethod",
    ),
    Rejected(
        "deliveryMethod-a-bool",
        mutated(RUNWAY, deliveryMethod=True),
        "invalidDeliveryMethod",
        "deliveryMethod",
    ),
    Rejected("webhookURL-empty", mutated(RUNWAY, webhookURL=""), "invalidWebhookURL", "webhookURL"),
    Rejected(
        "safety-checkContent-a-string",
        mutated(RUNWAY, safety={"checkContent": "yes"}),
        "invalidSafety",
        "safety.checkContent",
    ),
    # -- reference images --
    Rejected(
        "referenceImages-empty",
        mutated(RUNWAY, referenceImages=[]),
        "invalidReferenceImages",
        "referenceImages",
    ),
    Rejected(
        "referenceImages-four",
        mutated(RUNWAY, referenceImages=refs(4)),
        "invalidReferenceImages",
        "referenceImages",
    ),
    Rejected(
        "referenceImages-not-a-list",
        mutated(RUNWAY, referenceImages=REF_URL),
        "invalidReferenceImages",
        "referenceImages",
    ),
    Rejected(
        "referenceImages-item-a-number",
        mutated(RUNWAY, referenceImages=[7]),
        "invalidReferenceImages",
        "referenceImages[0]",
    ),
    Rejected(
        "referenceImages-item-without-image",
        mutated(RUNWAY, referenceImages=[REF_URL, {"tag": "style"}]),
        "invalidReferenceImages",
        "referenceImages[1].image",
    ),
    Rejected(
        "referenceImages-item-empty-string",
        mutated(RUNWAY, referenceImages=[""]),
        "invalidReferenceImages",
        "referenceImages[0].image",
    ),
    Rejected(
        "inputs-referenceImages-empty",
        mutated(RUNWAY, inputs={"referenceImages": []}),
        "invalidReferenceImages",
        "inputs.referenceImages",
    ),
    Rejected(
        "inputs-referenceImages-four",
        mutated(RUNWAY, inputs={"referenceImages": refs(4)}),
        "invalidReferenceImages",
        "inputs.referenceImages",
    ),
    Rejected(
        "inputs-referenceImages-item-a-list",
        mutated(RUNWAY, inputs={"referenceImages": [[REF_URL]]}),
        "invalidReferenceImages",
        "inputs.referenceImages[0]",
    ),
    Rejected(
        "referenceImages-at-top-level-and-under-inputs",
        mutated(RUNWAY, referenceImages=refs(1), inputs={"referenceImages": refs(1)}),
        "invalidReferenceImages",
        "referenceImages",
    ),
    Rejected(
        "turbo-without-reference",
        mutated(TURBO, inputs=DROP),
        "missingReferenceImages",
        "inputs.referenceImages",
    ),
    Rejected(
        "turbo-with-empty-inputs",
        mutated(TURBO, inputs={}),
        "missingReferenceImages",
        "inputs.referenceImages",
    ),
    Rejected(
        "turbo-four-references",
        mutated(TURBO, inputs={"referenceImages": refs(4)}),
        "invalidReferenceImages",
        "inputs.referenceImages",
    ),
    # -- providerSettings --
    Rejected(
        "publicFigureThreshold-high",
        mutated(
            RUNWAY,
            providerSettings={"runway": {"contentModeration": {"publicFigureThreshold": "high"}}},
        ),
        "invalidProviderSettings",
        "providerSettings.runway.contentModeration.publicFigureThreshold",
    ),
    Rejected(
        "publicFigureThreshold-wrong-case",
        mutated(
            RUNWAY,
            providerSettings={"runway": {"contentModeration": {"publicFigureThreshold": "LOW"}}},
        ),
        "invalidProviderSettings",
        "providerSettings.runway.contentModeration.publicFigureThreshold",
    ),
    Rejected(
        "providerSettings-unknown-provider",
        mutated(RUNWAY, providerSettings={"openai": {"quality": "hd"}}),
        "unknownProviderSettingsProvider",
        "providerSettings.openai",
    ),
    Rejected(
        "providerSettings-runway-on-tiny",
        mutated(
            TINY,
            providerSettings={"runway": {"contentModeration": {"publicFigureThreshold": "low"}}},
        ),
        "mismatchProviderSettingsProvider",
        "providerSettings.runway",
    ),
    Rejected(
        "providerSettings-runway-on-flux",
        mutated(TINY, model="runware:101@1", providerSettings={"runway": {}}),
        "mismatchProviderSettingsProvider",
        "providerSettings.runway",
    ),
    Rejected(
        "providerSettings-runway-made-up-setting",
        mutated(RUNWAY, providerSettings={"runway": {"contentModeration": {"strictness": 3}}}),
        "unknownParameter",
        "providerSettings.runway.contentModeration.strictness",
    ),
    # -- generation parameters the Runway models do not take --
    *(
        Rejected(f"runway-{name}", mutated(RUNWAY, **{name: value}), "unsupportedParameter", name)
        for name, value in (
            ("seed", 42),
            ("negativePrompt", "blurry"),
            ("steps", 20),
            ("CFGScale", 7.0),
            ("scheduler", "Euler"),
            ("strength", 0.5),
        )
    ),
    Rejected("turbo-seed", mutated(TURBO, seed=42), "unsupportedParameter", "seed"),
    # -- protocol parameters that no impasto model takes --
    *(
        Rejected(f"{base_id}-{name}", mutated(base, **{name: value}), "unsupportedParameter", name)
        for base_id, base in (("runway", RUNWAY), ("tiny", TINY))
        for name, value in (
            ("lora", [{"model": "civitai:1@1", "weight": 1.0}]),
            ("controlNet", [{"model": "civitai:2@1", "guideImage": IMAGE_UUID}]),
            ("clipSkip", 1),
            ("vae", "civitai:3@1"),
            ("seedImage", IMAGE_UUID),
        )
    ),
    *(
        Rejected(
            f"inputs-{name}",
            mutated(TINY, inputs={name: IMAGE_UUID}),
            "unsupportedParameter",
            f"inputs.{name}",
        )
        for name in ("image", "seedImage", "mask")
    ),
    # -- keys that are not parameters at all --
    Rejected("made-up-key", mutated(RUNWAY, fooBar=1), "unknownParameter", "fooBar"),
    Rejected("made-up-key-on-tiny", mutated(TINY, colour="red"), "unknownParameter", "colour"),
    Rejected(
        "made-up-key-under-inputs",
        mutated(TINY, inputs={"colour": "red"}),
        "unknownParameter",
        "inputs.colour",
    ),
    Rejected(
        "input-name-at-top-level-is-unknown",
        mutated(TINY, mask=IMAGE_UUID),
        "unknownParameter",
        "mask",
    ),
    # -- generation parameter ranges on a model that takes them --
    Rejected("tiny-seed-negative", mutated(TINY, seed=-1), "invalidSeed", "seed"),
    Rejected("tiny-seed-2**63", mutated(TINY, seed=2**63), "invalidSeed", "seed"),
    Rejected("tiny-seed-a-string", mutated(TINY, seed="42"), "invalidSeed", "seed"),
    Rejected("tiny-steps-zero", mutated(TINY, steps=0), "invalidSteps", "steps"),
    Rejected("tiny-steps-101", mutated(TINY, steps=101), "invalidSteps", "steps"),
    Rejected("tiny-CFGScale-negative", mutated(TINY, CFGScale=-1.0), "invalidCFGScale", "CFGScale"),
    Rejected("tiny-strength-1.5", mutated(TINY, strength=1.5), "invalidStrength", "strength"),
    Rejected(
        "tiny-negativePrompt-1001-chars",
        mutated(TINY, negativePrompt="x" * 1001),
        "invalidNegativePrompt",
        "negativePrompt",
    ),
    # -- the other task types --
    Rejected("imageUpload-image-missing", mutated(UPLOAD, image=DROP), "missingImage", "image"),
    Rejected("imageUpload-image-empty", mutated(UPLOAD, image=""), "invalidImage", "image"),
    Rejected("imageUpload-image-a-number", mutated(UPLOAD, image=5), "invalidImage", "image"),
    Rejected(
        "imageUpload-taskUUID-missing",
        mutated(UPLOAD, taskUUID=DROP),
        "missingTaskUUID",
        "taskUUID",
    ),
    Rejected(
        "imageUpload-taskUUID-version-1",
        mutated(UPLOAD, taskUUID=V1_UUID),
        "invalidTaskUUID",
        "taskUUID",
    ),
    Rejected("imageUpload-made-up-key", mutated(UPLOAD, tag="x"), "unknownParameter", "tag"),
    Rejected(
        "getResponse-taskUUID-missing",
        mutated(GET_RESPONSE, taskUUID=DROP),
        "missingTaskUUID",
        "taskUUID",
    ),
    Rejected(
        "getResponse-taskUUID-not-a-uuid",
        mutated(GET_RESPONSE, taskUUID="task-1"),
        "invalidTaskUUID",
        "taskUUID",
    ),
    Rejected(
        "getResponse-made-up-key",
        mutated(GET_RESPONSE, wait=True),
        "unknownParameter",
        "wait",
    ),
    Rejected(
        "authentication-apiKey-missing",
        mutated(AUTHENTICATION, apiKey=DROP),
        "missingApiKey",
        "apiKey",
    ),
    Rejected(
        "authentication-apiKey-a-number",
        mutated(AUTHENTICATION, apiKey=12345),
        "invalidApiKey",
        "apiKey",
    ),
    Rejected("ping-ping-a-string", {"taskType": "ping", "ping": "yes"}, "invalidPing", "ping"),
]


@pytest.mark.parametrize(
    ("task", "code", "parameter"), [r[1:] for r in REJECTED], ids=[r.id for r in REJECTED]
)
def test_rejected_task_gives_error_code_and_parameter(
    task: Any, code: str, parameter: str | None
) -> None:
    with pytest.raises(ImpastoError) as caught:
        validate(task)
    error = caught.value
    assert (error.code, error.parameter) == (code, parameter), error.message
    assert 400 <= error.http_status < 500
    item = error.to_item()
    assert item["code"] == code
    assert item["message"]
    assert "Traceback" not in item["message"]
    assert item.get("parameter") == parameter
    task_type, task_uuid = task_context(task)
    assert item.get("taskType") == task_type
    assert item.get("taskUUID") == task_uuid


def test_rejection_table_ids_are_unique() -> None:
    ids = [row.id for row in REJECTED]
    assert len(ids) == len(set(ids))


def test_parse_errors_carry_the_task_context_without_help() -> None:
    """parse_task itself names the task in its errors; the dispatcher need not add it."""
    for raw in (
        mutated(RUNWAY, width="wide"),
        mutated(RUNWAY, lora=[]),
        mutated(RUNWAY, taskType="videoInference"),
        mutated(UPLOAD, image=DROP),
    ):
        with pytest.raises(ImpastoError) as caught:
            parse_task(raw)
        item = caught.value.to_item()
        assert item["taskType"] == raw["taskType"]
        assert item["taskUUID"] == TASK_UUID


def test_missing_task_type_error_keeps_the_task_uuid() -> None:
    with pytest.raises(ImpastoError) as caught:
        parse_task(mutated(RUNWAY, taskType=DROP))
    assert caught.value.to_item()["taskUUID"] == TASK_UUID
    assert "taskType" not in caught.value.to_item()


ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    *((f"runway-{w}x{h}", mutated(RUNWAY, width=w, height=h)) for w, h in RUNWAY_SIZES),
    *((f"turbo-{w}x{h}", mutated(TURBO, width=w, height=h)) for w, h in RUNWAY_SIZES),
    ("runway-without-size", mutated(RUNWAY, width=DROP, height=DROP)),
    ("taskUUID-upper-case", mutated(RUNWAY, taskUUID=TASK_UUID.upper())),
    ("positivePrompt-1-char", mutated(RUNWAY, positivePrompt="x")),
    ("positivePrompt-1000-chars", mutated(RUNWAY, positivePrompt="x" * 1000)),
    ("tiny-64x64", mutated(TINY, width=64, height=64)),
    ("tiny-2048x2048", mutated(TINY, width=2048, height=2048)),
    ("tiny-64x2048", mutated(TINY, width=64, height=2048)),
    ("numberResults-1", mutated(RUNWAY, numberResults=1)),
    ("numberResults-20", mutated(RUNWAY, numberResults=20)),
    ("outputType-URL", mutated(RUNWAY, outputType="URL")),
    ("outputType-base64Data", mutated(RUNWAY, outputType="base64Data")),
    ("outputType-dataURI", mutated(RUNWAY, outputType="dataURI")),
    ("outputType-one-element-list", mutated(RUNWAY, outputType=["URL"])),
    ("outputFormat-JPG", mutated(RUNWAY, outputFormat="JPG")),
    ("outputFormat-png", mutated(RUNWAY, outputFormat="png")),
    ("outputFormat-Webp", mutated(RUNWAY, outputFormat="Webp")),
    ("outputFormat-jpeg", mutated(RUNWAY, outputFormat="jpeg")),
    ("outputQuality-20", mutated(RUNWAY, outputQuality=20)),
    ("outputQuality-99", mutated(RUNWAY, outputQuality=99)),
    ("ttl-60", mutated(RUNWAY, ttl=60)),
    ("includeCost-true", mutated(RUNWAY, includeCost=True)),
    ("includeCost-false", mutated(RUNWAY, includeCost=False)),
    ("deliveryMethod-sync", mutated(RUNWAY, deliveryMethod="sync")),
    ("deliveryMethod-async", mutated(RUNWAY, deliveryMethod="async")),
    ("referenceImages-one-string", mutated(RUNWAY, referenceImages=refs(1))),
    ("referenceImages-three-strings", mutated(RUNWAY, referenceImages=refs(3))),
    (
        "referenceImages-image-and-tag",
        mutated(RUNWAY, referenceImages=[{"image": IMAGE_UUID, "tag": "hero"}, REF_URL]),
    ),
    ("inputs-referenceImages-three", mutated(RUNWAY, inputs={"referenceImages": refs(3)})),
    (
        "inputs-referenceImages-image-and-tag",
        mutated(RUNWAY, inputs={"referenceImages": [{"image": IMAGE_UUID, "tag": "hero"}]}),
    ),
    ("turbo-top-level-reference", mutated(TURBO, inputs=DROP, referenceImages=refs(1))),
    (
        "publicFigureThreshold-low",
        mutated(
            RUNWAY,
            providerSettings={"runway": {"contentModeration": {"publicFigureThreshold": "low"}}},
        ),
    ),
    (
        "publicFigureThreshold-auto",
        mutated(
            RUNWAY,
            providerSettings={"runway": {"contentModeration": {"publicFigureThreshold": "auto"}}},
        ),
    ),
    ("providerSettings-empty", mutated(RUNWAY, providerSettings={})),
    (
        "tiny-generation-parameters",
        mutated(
            TINY,
            seed=2**63 - 1,
            negativePrompt="blurry",
            steps=4,
            CFGScale=7.5,
            scheduler="Euler",
            strength=0.5,
        ),
    ),
    ("tiny-seed-zero", mutated(TINY, seed=0)),
    (
        "safety-and-webhook",
        mutated(
            RUNWAY,
            safety={"checkContent": True, "blockContent": False},
            webhookURL="https://example.com/hook",
            uploadEndpoint="https://example.com/put",
        ),
    ),
    ("checkNSFW-legacy", mutated(RUNWAY, checkNSFW=True)),
    ("flux-dev-with-seed", mutated(TINY, model="runware:101@1", seed=7, width=1024, height=768)),
    ("imageUpload", UPLOAD),
    ("getResponse", GET_RESPONSE),
    ("authentication", AUTHENTICATION),
    ("ping", {"taskType": "ping", "ping": True}),
    ("ping-with-extra-keys", {"taskType": "ping", "ping": True, "anything": 1}),
]


@pytest.mark.parametrize(("task"), [t for _, t in ACCEPTED], ids=[i for i, _ in ACCEPTED])
def test_valid_task_is_accepted(task: dict[str, Any]) -> None:
    parsed = validate(task)
    assert parsed.taskType == task["taskType"]


@pytest.mark.parametrize(
    "example", SEED_TASKS, ids=[str(example["name"]) for example in SEED_TASKS]
)
def test_seed_example_request_passes_runway_rules(example: dict[str, Any]) -> None:
    task = parse_task(example["request"])
    assert isinstance(task, ImageInferenceIn)
    assert task.model == "runway:4@1"
    check_against_rules(task, REGISTRY.resolve("runway:4@1").rules)


@pytest.mark.parametrize(
    ("given", "normalised"), [("jpeg", "JPG"), ("JPEG", "JPG"), ("jpg", "JPG"), ("webp", "WEBP")]
)
def test_output_format_is_normalised_to_upper_case_jpg_png_webp(
    given: str, normalised: str
) -> None:
    task = validate_inference(mutated(RUNWAY, outputFormat=given))
    assert task.outputFormat == normalised


def test_output_type_list_of_one_becomes_that_type() -> None:
    task = validate_inference(mutated(RUNWAY, outputType=["dataURI"]))
    assert task.outputType == "dataURI"


def test_defaults_of_an_image_inference_task() -> None:
    task = validate_inference(RUNWAY)
    assert (task.outputType, task.outputFormat, task.outputQuality) == ("URL", "JPG", 95)
    assert (task.numberResults, task.includeCost, task.deliveryMethod) == (1, False, "sync")
    assert task.reference_images() == ()


def test_reference_images_are_read_from_either_place_as_image_and_tag() -> None:
    top = validate_inference(
        mutated(RUNWAY, referenceImages=[REF_URL, {"image": IMAGE_UUID, "tag": "style"}])
    )
    nested = validate_inference(mutated(RUNWAY, inputs={"referenceImages": [REF_URL]}))
    assert [(r.image, r.tag) for r in top.reference_images()] == [
        (REF_URL, None),
        (IMAGE_UUID, "style"),
    ]
    assert [(r.image, r.tag) for r in nested.reference_images()] == [(REF_URL, None)]
