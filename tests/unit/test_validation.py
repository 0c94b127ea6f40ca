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
from impasto.protocol.fields import MAX_RANDOM_SEED, MAX_SEED
from impasto.protocol.parsing import TaskIn, parse_task, task_context
from impasto.protocol.rules import RUNWAY_SIZES
from impasto.protocol.tasks import ImageInferenceIn, check_against_rules
from impasto.service.assets import check_accelerators, check_assets, check_model_kind

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
SEARCH: dict[str, Any] = {"taskType": "modelSearch", "taskUUID": TASK_UUID}
PING: dict[str, Any] = {"taskType": "ping", "ping": True}
HOOK = "https://example.com/hook"


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
            resolved = REGISTRY.resolve(task.model)
            check_model_kind(resolved)
            check_against_rules(task, resolved.rules)
            check_assets(task, REGISTRY, resolved)
            check_accelerators(task, resolved)
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


FLUX: dict[str, Any] = {**TINY, "model": "runware:100@1", "width": 1024, "height": 1024}
XL: dict[str, Any] = {**TINY, "model": "impasto:tiny-xl@1"}
LORA = "impasto:tiny-lora@1"
CONTROLNET = "impasto:tiny-controlnet@1"


def control(**changes: Any) -> list[dict[str, Any]]:
    return [mutated({"model": CONTROLNET, "guideImage": IMAGE_UUID}, **changes)]


def seeded(**changes: Any) -> dict[str, Any]:
    return mutated(TINY, seedImage=IMAGE_UUID, **changes)


MODE_ROWS: list[Rejected] = [
    # -- lora --
    Rejected(
        "lora-weight-5",
        mutated(TINY, lora=[{"model": LORA, "weight": 5}]),
        "invalidLora",
        "lora[0].weight",
    ),
    Rejected(
        "lora-weight-a-string",
        mutated(TINY, lora=[{"model": LORA, "weight": "1"}]),
        "invalidLora",
        "lora[0].weight",
    ),
    Rejected(
        "lora-model-missing", mutated(TINY, lora=[{"weight": 1}]), "invalidLora", "lora[0].model"
    ),
    Rejected(
        "lora-unknown-air",
        mutated(TINY, lora=[{"model": "civitai:1@1"}]),
        "invalidLora",
        "lora[0].model",
    ),
    Rejected(
        "lora-is-a-controlnet",
        mutated(TINY, lora=[{"model": CONTROLNET}]),
        "invalidLora",
        "lora[0].model",
    ),
    Rejected(
        "lora-for-another-architecture",
        mutated(XL, lora=[{"model": LORA}]),
        "invalidLora",
        "lora[0].model",
    ),
    Rejected(
        "lora-twice",
        mutated(TINY, lora=[{"model": LORA}, {"model": LORA, "weight": 0.5}]),
        "invalidLora",
        "lora[1].model",
    ),
    Rejected("lora-eleven", mutated(TINY, lora=[{"model": LORA}] * 11), "invalidLora", "lora"),
    Rejected("lora-not-a-list", mutated(TINY, lora={"model": LORA}), "invalidLora", "lora"),
    # -- controlNet --
    Rejected(
        "controlNet-guideImage-missing",
        mutated(TINY, controlNet=control(guideImage=DROP)),
        "invalidControlNet",
        "controlNet[0].guideImage",
    ),
    Rejected(
        "controlNet-guideImage-bad-url",
        mutated(TINY, controlNet=control(guideImage="https://example.com:99999/a.png")),
        "invalidControlNet",
        "controlNet[0].guideImage",
    ),
    Rejected(
        "controlNet-weight-3",
        mutated(TINY, controlNet=control(weight=3)),
        "invalidControlNet",
        "controlNet[0].weight",
    ),
    Rejected(
        "controlNet-unknown-air",
        mutated(TINY, controlNet=control(model="civitai:2@1")),
        "invalidControlNet",
        "controlNet[0].model",
    ),
    Rejected(
        "controlNet-is-a-lora",
        mutated(TINY, controlNet=control(model=LORA)),
        "invalidControlNet",
        "controlNet[0].model",
    ),
    Rejected(
        "controlNet-start-two-ways",
        mutated(TINY, controlNet=control(startStep=1, startStepPercentage=10)),
        "invalidControlNet",
        "controlNet[0].startStepPercentage",
    ),
    Rejected(
        "controlNet-end-before-start",
        mutated(TINY, controlNet=control(startStepPercentage=60, endStepPercentage=20)),
        "invalidControlNet",
        "controlNet[0].endStepPercentage",
    ),
    Rejected(
        "controlNet-end-percentage-0",
        mutated(TINY, controlNet=control(endStepPercentage=0)),
        "invalidControlNet",
        "controlNet[0].endStepPercentage",
    ),
    Rejected(
        "controlNet-controlMode-unknown",
        mutated(TINY, controlNet=control(controlMode="loud")),
        "invalidControlNet",
        "controlNet[0].controlMode",
    ),
    Rejected(
        "controlNet-preprocessor-unknown",
        mutated(TINY, controlNet=control(preprocessor="openpose_full")),
        "invalidControlNet",
        "controlNet[0].preprocessor",
    ),
    # -- ipAdapters --
    Rejected(
        "ipAdapters-no-image",
        mutated(TINY, ipAdapters=[{"model": "impasto:tiny-ip-adapter@1"}]),
        "invalidIpAdapters",
        "ipAdapters[0].guideImage",
    ),
    Rejected(
        "ipAdapters-unknown-air",
        mutated(TINY, ipAdapters=[{"model": "civitai:9@9", "guideImage": IMAGE_UUID}]),
        "invalidIpAdapters",
        "ipAdapters[0].model",
    ),
    Rejected(
        "ipAdapters-weight-negative",
        mutated(
            TINY,
            ipAdapters=[
                {"model": "impasto:tiny-ip-adapter@1", "guideImage": IMAGE_UUID, "weight": -1}
            ],
        ),
        "invalidIpAdapters",
        "ipAdapters[0].weight",
    ),
    # -- prompt, vae, embeddings --
    Rejected("clipSkip-3", mutated(TINY, clipSkip=3), "invalidClipSkip", "clipSkip"),
    Rejected(
        "promptWeighting-unknown",
        mutated(TINY, promptWeighting="bold"),
        "invalidPromptWeighting",
        "promptWeighting",
    ),
    Rejected(
        "promptWeighting-two-ways",
        mutated(TINY, promptWeighting="compel", usePromptWeighting=True),
        "invalidPromptWeighting",
        "usePromptWeighting",
    ),
    Rejected("vae-unknown-air", mutated(TINY, vae="civitai:3@1"), "invalidVae", "vae"),
    Rejected("vae-is-a-lora", mutated(TINY, vae=LORA), "invalidVae", "vae"),
    Rejected(
        "embeddings-unknown-air",
        mutated(TINY, embeddings=[{"model": "civitai:4@1"}]),
        "invalidEmbeddings",
        "embeddings[0].model",
    ),
    # -- refiner --
    Rejected(
        "refiner-unknown-air",
        mutated(XL, refiner={"model": "civitai:5@1"}),
        "invalidRefiner",
        "refiner.model",
    ),
    Rejected(
        "refiner-other-architecture",
        mutated(XL, refiner={"model": "impasto:tiny@1"}),
        "invalidRefiner",
        "refiner.model",
    ),
    Rejected(
        "refiner-start-two-ways",
        mutated(
            XL,
            refiner={
                "model": "impasto:tiny-xl-refiner@1",
                "startStep": 1,
                "startStepPercentage": 50,
            },
        ),
        "invalidRefiner",
        "refiner.startStepPercentage",
    ),
    Rejected(
        "refiner-start-100",
        mutated(XL, refiner={"model": "impasto:tiny-xl-refiner@1", "startStepPercentage": 100}),
        "invalidRefiner",
        "refiner.startStepPercentage",
    ),
    # -- img2img, inpainting, outpainting --
    Rejected(
        "seedImage-twice",
        seeded(inputs={"seedImage": IMAGE_UUID}),
        "invalidSeedImage",
        "inputs.seedImage",
    ),
    Rejected("seedImage-empty", mutated(TINY, seedImage=""), "invalidSeedImage", "seedImage"),
    Rejected(
        "maskImage-without-seedImage",
        mutated(TINY, maskImage=IMAGE_UUID),
        "missingSeedImage",
        "seedImage",
    ),
    Rejected(
        "inputs-mask-without-seedImage",
        mutated(TINY, inputs={"mask": IMAGE_UUID}),
        "missingSeedImage",
        "seedImage",
    ),
    Rejected("maskMargin-without-mask", seeded(maskMargin=64), "missingMaskImage", "maskImage"),
    Rejected(
        "maskMargin-10",
        seeded(maskImage=IMAGE_UUID, maskMargin=10),
        "invalidMaskMargin",
        "maskMargin",
    ),
    Rejected(
        "outpaint-without-seedImage",
        mutated(TINY, outpaint={"top": 64}),
        "missingSeedImage",
        "seedImage",
    ),
    Rejected("outpaint-nothing", seeded(outpaint={"top": 0}), "invalidOutpaint", "outpaint"),
    Rejected(
        "outpaint-side-not-a-multiple-of-8",
        seeded(outpaint={"top": 13}),
        "invalidOutpaint",
        "outpaint.top",
    ),
    Rejected(
        "outpaint-blur-33",
        seeded(outpaint={"top": 64, "blur": 33}),
        "invalidOutpaint",
        "outpaint.blur",
    ),
    Rejected(
        "outpaint-and-mask",
        seeded(outpaint={"top": 64}, maskImage=IMAGE_UUID),
        "invalidOutpaint",
        "outpaint",
    ),
    Rejected(
        "inpaint-model-without-mask",
        seeded(model="impasto:tiny-inpaint@1"),
        "missingMaskImage",
        "maskImage",
    ),
    Rejected(
        "inpaint-model-without-seed",
        mutated(TINY, model="impasto:tiny-inpaint@1"),
        "missingSeedImage",
        "seedImage",
    ),
    Rejected("model-is-a-lora", mutated(TINY, model=LORA), "invalidModel", "model"),
    Rejected(
        "model-is-a-refiner",
        mutated(TINY, model="impasto:tiny-xl-refiner@1"),
        "invalidModel",
        "model",
    ),
]

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
    Rejected("width-a-fraction", mutated(TINY, width=512.5), "invalidWidth", "width"),
    Rejected("width-a-bool", mutated(TINY, width=True), "invalidWidth", "width"),
    Rejected("width-1e300", mutated(TINY, width=1e300), "invalidWidth", "width"),
    Rejected("width-nan", mutated(TINY, width=float("nan")), "invalidWidth", "width"),
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
        "outputType-list-with-a-type-twice",
        mutated(RUNWAY, outputType=["URL", "URL"]),
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
    # -- acceleratorOptions --
    Rejected(
        "runway-acceleratorOptions",
        mutated(RUNWAY, acceleratorOptions={"teaCache": True}),
        "unsupportedParameter",
        "acceleratorOptions",
    ),
    Rejected(
        "accelerator-deepCache-on-a-transformer",
        mutated(FLUX, acceleratorOptions={"deepCache": True}),
        "unsupportedParameter",
        "acceleratorOptions.deepCache",
    ),
    Rejected(
        "accelerator-fbcache-on-a-unet",
        mutated(TINY, acceleratorOptions={"fbcache": True, "cacheDistance": 0.1}),
        "unsupportedParameter",
        "acceleratorOptions.fbcache",
    ),
    Rejected(
        "accelerator-two-methods",
        mutated(FLUX, acceleratorOptions={"fbcache": True, "teaCache": True}),
        "invalidAcceleratorOptions",
        "acceleratorOptions.teaCache",
    ),
    Rejected(
        "accelerator-start-step-twice",
        mutated(
            TINY,
            acceleratorOptions={
                "deepCache": True,
                "cacheStartStep": 2,
                "cacheStartStepPercentage": 10,
            },
        ),
        "invalidAcceleratorOptions",
        "acceleratorOptions.cacheStartStepPercentage",
    ),
    Rejected(
        "accelerator-stop-before-start",
        mutated(
            TINY, acceleratorOptions={"deepCache": True, "cacheStartStep": 5, "cacheStopStep": 5}
        ),
        "invalidAcceleratorOptions",
        "acceleratorOptions.cacheStopStep",
    ),
    Rejected(
        "accelerator-interval-zero",
        mutated(TINY, acceleratorOptions={"deepCache": True, "deepCacheInterval": 0}),
        "invalidAcceleratorOptions",
        "acceleratorOptions.deepCacheInterval",
    ),
    Rejected(
        "accelerator-distance-negative",
        mutated(FLUX, acceleratorOptions={"teaCache": True, "teaCacheDistance": -1}),
        "invalidAcceleratorOptions",
        "acceleratorOptions.teaCacheDistance",
    ),
    Rejected(
        "accelerator-unknown-skip-mode",
        mutated(TINY, acceleratorOptions={"deepCache": True, "deepCacheSkipMode": "sometimes"}),
        "invalidAcceleratorOptions",
        "acceleratorOptions.deepCacheSkipMode",
    ),
    Rejected(
        "accelerator-unknown-member",
        mutated(TINY, acceleratorOptions={"deepCache": True, "turbo": True}),
        "unknownParameter",
        "acceleratorOptions.turbo",
    ),
    # -- image modes a model does not take --
    *(
        Rejected(f"runway-{name}", mutated(RUNWAY, **{name: value}), "unsupportedParameter", name)
        for name, value in (
            ("lora", [{"model": "impasto:tiny-lora@1", "weight": 1.0}]),
            ("controlNet", [{"model": "impasto:tiny-controlnet@1", "guideImage": IMAGE_UUID}]),
            ("clipSkip", 1),
            ("vae", "impasto:tiny-vae@1"),
            ("seedImage", IMAGE_UUID),
            ("promptWeighting", "compel"),
        )
    ),
    *(
        Rejected(
            f"runway-inputs-{name}",
            mutated(RUNWAY, inputs={name: IMAGE_UUID}),
            "unsupportedParameter",
            f"inputs.{name}",
        )
        for name in ("image", "seedImage")
    ),
    Rejected(
        "runway-inputs-mask",
        mutated(RUNWAY, inputs={"seedImage": IMAGE_UUID, "mask": IMAGE_UUID}),
        "unsupportedParameter",
        "inputs.mask",
    ),
    Rejected("flux-clipSkip", mutated(FLUX, clipSkip=1), "unsupportedParameter", "clipSkip"),
    Rejected(
        "flux-embeddings",
        mutated(FLUX, embeddings=[{"model": "impasto:tiny-embedding@1"}]),
        "unsupportedParameter",
        "embeddings",
    ),
    Rejected(
        "tiny-refiner-is-sdxl-only",
        mutated(TINY, refiner={"model": "impasto:tiny-xl-refiner@1"}),
        "unsupportedParameter",
        "refiner",
    ),
    Rejected(
        "protocol-parameter-no-model-takes",
        mutated(TINY, lycoris=[{"model": "civitai:1@1", "weight": 1.0}]),
        "unsupportedParameter",
        "lycoris",
    ),
    *MODE_ROWS,
    # -- keys that are not parameters at all --
    Rejected("made-up-key", mutated(RUNWAY, fooBar=1), "unknownParameter", "fooBar"),
    Rejected("made-up-key-on-tiny", mutated(TINY, colour="red"), "unknownParameter", "colour"),
    Rejected("made-up-key-empty", mutated(TINY, **{"": 1}), "unknownParameter", "''"),
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
    # -- URLs: a syntax check at parse time, before anything is fetched or delivered --
    *(
        Rejected(
            f"webhookURL-{case}", mutated(RUNWAY, webhookURL=url), "invalidWebhookURL", "webhookURL"
        )
        for case, url in (
            ("not-a-url", "hook"),
            ("ftp-scheme", "ftp://example.com/hook"),
            ("javascript-scheme", "javascript:alert(1)"),
            ("unbalanced-bracket", "http://[::1"),
            ("lone-closing-bracket", "http://]/"),
            ("bracketed-non-ipv6", "http://[example.com]/hook"),
            ("bad-ipv6", "http://[::g]/hook"),
            ("bad-ipv4", "http://999.0.0.1/hook"),
            ("without-host", "https:///hook"),
            ("only-a-port", "https://:8080/hook"),
            ("port-99999", "https://example.com:99999/hook"),
            ("port-0", "https://example.com:0/hook"),
            ("port-not-a-number", "https://example.com:https/hook"),
            ("port-with-sign", "https://example.com:+443/hook"),
            ("userinfo", "https://user:secret@example.com/hook"),
            ("user-only", "https://user@example.com/hook"),
            ("crlf", HOOK + "\r\nX-Injected: 1"),
            ("lf-in-host", "https://exam\nple.com/hook"),
            ("space", "https://example.com/a hook"),
            ("tab", "https://example.com/\thook"),
            ("nul", "https://example.com/\x00hook"),
            ("bidi-override", "https://example.com/\u202ehook"),
            ("host-invalid-chars", "https://exa<mple>.com/hook"),
            ("host-empty-label", "https://example..com/hook"),
            ("host-percent-escaped", "https://ex%41mple.com/hook"),
            ("host-ascii-label-too-long", "https://" + "a" * 64 + ".com/hook"),
            ("ipv6-zone-id", "http://[fe80::1%25eth0]/hook"),
            ("junk-after-ipv6", "http://[::1]x/hook"),
            ("host-not-idna", "https://\u2603.net/hook"),
            ("host-label-too-long", "https://" + "\u00e9" * 64 + ".com/hook"),
            ("lone-surrogate", "https://example.com/\ud800"),
            ("2049-chars", HOOK + "/" + "x" * (2048 - len(HOOK))),
        )
    ),
    *(
        Rejected(
            f"uploadEndpoint-{case}",
            mutated(RUNWAY, uploadEndpoint=url),
            "invalidUploadEndpoint",
            "uploadEndpoint",
        )
        for case, url in (
            ("s3-scheme", "s3://bucket/key"),
            ("unbalanced-bracket", "https://[2001:db8::1/key"),
            ("userinfo", "https://key:secret@bucket.example.com/key"),
            ("crlf", "https://bucket.example.com/key\r\nHost: evil"),
            ("port-65536", "https://bucket.example.com:65536/key"),
        )
    ),
    Rejected(
        "referenceImages-url-with-newline",
        mutated(RUNWAY, referenceImages=[REF_URL, REF_URL + "\n"]),
        "invalidReferenceImages",
        "referenceImages[1].image",
    ),
    Rejected(
        "referenceImages-url-unbalanced-bracket",
        mutated(RUNWAY, referenceImages=[REF_URL, "http://[::1/ref.jpg"]),
        "invalidReferenceImages",
        "referenceImages[1].image",
    ),
    Rejected(
        "referenceImages-object-url-with-userinfo",
        mutated(
            RUNWAY, referenceImages=[{"image": "https://u:p@example.com/a.jpg", "tag": "hero"}]
        ),
        "invalidReferenceImages",
        "referenceImages[0].image",
    ),
    Rejected(
        "referenceImages-upper-case-url-bad-port",
        mutated(RUNWAY, referenceImages=["HTTPS://example.com:70000/a.jpg"]),
        "invalidReferenceImages",
        "referenceImages[0].image",
    ),
    Rejected(
        "inputs-referenceImages-url-bad-port",
        mutated(TURBO, inputs={"referenceImages": ["https://example.com:99999/a.jpg"]}),
        "invalidReferenceImages",
        "inputs.referenceImages[0].image",
    ),
    Rejected(
        "imageUpload-url-unbalanced-bracket",
        mutated(UPLOAD, image="http://[::1"),
        "invalidImage",
        "image",
    ),
    Rejected(
        "imageUpload-url-with-space", mutated(UPLOAD, image=REF_URL + " x"), "invalidImage", "image"
    ),
    # -- every number has an upper bound and is finite --
    Rejected("ttl-over-30-days", mutated(RUNWAY, ttl=2_592_001), "invalidTtl", "ttl"),
    Rejected("ttl-400-digits", mutated(RUNWAY, ttl=10**400), "invalidTtl", "ttl"),
    Rejected("ttl-1e300", mutated(RUNWAY, ttl=1e300), "invalidTtl", "ttl"),
    Rejected("ttl-infinity", mutated(RUNWAY, ttl=float("inf")), "invalidTtl", "ttl"),
    Rejected("ttl-a-fraction", mutated(RUNWAY, ttl=3600.5), "invalidTtl", "ttl"),
    Rejected("tiny-seed-400-digits", mutated(TINY, seed=10**400), "invalidSeed", "seed"),
    Rejected("tiny-seed-1e19", mutated(TINY, seed=1e19), "invalidSeed", "seed"),
    Rejected("tiny-seed-a-fraction", mutated(TINY, seed=1.5), "invalidSeed", "seed"),
    Rejected(
        "tiny-CFGScale-nan", mutated(TINY, CFGScale=float("nan")), "invalidCFGScale", "CFGScale"
    ),
    Rejected(
        "tiny-CFGScale-infinity",
        mutated(TINY, CFGScale=float("inf")),
        "invalidCFGScale",
        "CFGScale",
    ),
    Rejected(
        "tiny-CFGScale-400-digits", mutated(TINY, CFGScale=10**400), "invalidCFGScale", "CFGScale"
    ),
    Rejected(
        "tiny-strength-nan", mutated(TINY, strength=float("nan")), "invalidStrength", "strength"
    ),
    Rejected(
        "numberResults-400-digits",
        mutated(RUNWAY, numberResults=10**400),
        "invalidNumberResults",
        "numberResults",
    ),
    Rejected(
        "modelSearch-offset-over", mutated(SEARCH, offset=1_000_001), "invalidOffset", "offset"
    ),
    Rejected(
        "modelSearch-offset-400-digits", mutated(SEARCH, offset=10**400), "invalidOffset", "offset"
    ),
    Rejected("modelSearch-offset-negative", mutated(SEARCH, offset=-1), "invalidOffset", "offset"),
    Rejected("modelSearch-limit-101", mutated(SEARCH, limit=101), "invalidLimit", "limit"),
    Rejected("modelSearch-limit-nan", mutated(SEARCH, limit=float("nan")), "invalidLimit", "limit"),
    # -- every string and list has a length bound; names carry no control characters --
    Rejected("modelSearch-51-tags", mutated(SEARCH, tags=["t"] * 51), "invalidTags", "tags"),
    Rejected(
        "modelSearch-tag-101-chars", mutated(SEARCH, tags=["t" * 101]), "invalidTags", "tags[0]"
    ),
    Rejected(
        "modelSearch-tag-with-newline",
        mutated(SEARCH, tags=["a", "b\nc"]),
        "invalidTags",
        "tags[1]",
    ),
    Rejected(
        "modelSearch-search-201-chars", mutated(SEARCH, search="s" * 201), "invalidSearch", "search"
    ),
    *(
        Rejected(
            f"modelSearch-{name}-101-chars",
            mutated(SEARCH, **{name: "c" * 101}),
            f"invalid{name.title()}",
            name,
        )
        for name in ("category", "type", "architecture", "conditioning")
    ),
    Rejected(
        "modelSearch-category-with-cr",
        mutated(SEARCH, category="lora\r"),
        "invalidCategory",
        "category",
    ),
    Rejected(
        "referenceImages-tag-65-chars",
        mutated(RUNWAY, referenceImages=[{"image": IMAGE_UUID, "tag": "t" * 65}]),
        "invalidReferenceImages",
        "referenceImages[0].tag",
    ),
    Rejected(
        "referenceImages-tag-with-newline",
        mutated(TINY, referenceImages=[{"image": IMAGE_UUID, "tag": "hero\nINFO forged"}]),
        "invalidReferenceImages",
        "referenceImages[0].tag",
    ),
    Rejected(
        "safety-mode-51-chars",
        mutated(RUNWAY, safety={"mode": "m" * 51}),
        "invalidSafety",
        "safety.mode",
    ),
    Rejected("model-with-newline", mutated(RUNWAY, model="runway:4@1\n"), "invalidModel", "model"),
    Rejected("model-201-chars", mutated(RUNWAY, model="m" * 201), "invalidModel", "model"),
    Rejected(
        "tiny-scheduler-with-nul",
        mutated(TINY, scheduler="Euler\x00"),
        "invalidScheduler",
        "scheduler",
    ),
    Rejected(
        "ping-taskUUID-101-chars", mutated(PING, taskUUID="p" * 101), "invalidTaskUUID", "taskUUID"
    ),
    Rejected(
        "authentication-connectionSessionUUID-101-chars",
        mutated(AUTHENTICATION, connectionSessionUUID="c" * 101),
        "invalidConnectionSessionUUID",
        "connectionSessionUUID",
    ),
    Rejected(
        "authentication-apiKey-513-chars",
        mutated(AUTHENTICATION, apiKey="k" * 513),
        "invalidApiKey",
        "apiKey",
    ),
    # -- text a JSON parser lets through but UTF-8, logs and replies do not --
    Rejected(
        "positivePrompt-lone-surrogate",
        mutated(RUNWAY, positivePrompt="a cat \ud83d"),
        "invalidPositivePrompt",
        "positivePrompt",
    ),
    Rejected(
        "tiny-negativePrompt-lone-surrogate",
        mutated(TINY, negativePrompt="\udc00"),
        "invalidNegativePrompt",
        "negativePrompt",
    ),
    Rejected(
        "referenceImages-tag-lone-surrogate",
        mutated(TINY, referenceImages=[{"image": IMAGE_UUID, "tag": "hero\ud800"}]),
        "invalidReferenceImages",
        "referenceImages[0].tag",
    ),
    Rejected(
        "imageUpload-image-lone-surrogate",
        mutated(UPLOAD, image="iVBORw0KGgo\udfff"),
        "invalidImage",
        "image",
    ),
    Rejected(
        "authentication-apiKey-lone-surrogate",
        mutated(AUTHENTICATION, apiKey="key\ud800"),
        "invalidApiKey",
        "apiKey",
    ),
    # -- what is echoed back is the client's text made safe --
    Rejected(
        "made-up-key-with-newline",
        mutated(RUNWAY, **{"foo\nINFO forged": 1}),
        "unknownParameter",
        "'foo\\nINFO forged'",
    ),
    Rejected(
        "made-up-key-very-long",
        mutated(RUNWAY, **{"k" * 10_000: 1}),
        "unknownParameter",
        repr("k" * 64),
    ),
    Rejected(
        "taskType-a-huge-number",
        mutated(RUNWAY, taskType=10**5000),
        "unsupportedTaskType",
        "taskType",
    ),
    Rejected(
        "taskType-very-long",
        mutated(RUNWAY, taskType="t" * 100_000),
        "unsupportedTaskType",
        "taskType",
    ),
    Rejected(
        "taskUUID-with-newline",
        mutated(RUNWAY, taskUUID=TASK_UUID + "\nINFO forged"),
        "invalidTaskUUID",
        "taskUUID",
    ),
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
        mutated(RUNWAY, lora=[{"weight": 1}]),
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
    ("outputType-two-types", mutated(RUNWAY, outputType=["URL", "base64Data"])),
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
    ("webhookURL-ipv6-literal-and-port", mutated(RUNWAY, webhookURL="http://[::1]:8080/hook")),
    (
        "webhookURL-internationalised-host",
        mutated(RUNWAY, webhookURL="https://b\u00fccher.example/h"),
    ),
    ("webhookURL-punycode-host", mutated(RUNWAY, webhookURL="https://xn--bcher-kva.example/h")),
    ("webhookURL-upper-case", mutated(RUNWAY, webhookURL="HTTPS://EXAMPLE.COM/HOOK")),
    ("webhookURL-query-and-fragment", mutated(RUNWAY, webhookURL=HOOK + "?a=1&b=%20#frag")),
    ("webhookURL-empty-port", mutated(RUNWAY, webhookURL="https://example.com:/hook")),
    ("webhookURL-2048-chars", mutated(RUNWAY, webhookURL=HOOK + "/" + "x" * (2047 - len(HOOK)))),
    (
        "uploadEndpoint-presigned",
        mutated(
            RUNWAY,
            uploadEndpoint="https://bucket.s3.example.com/k.jpg?X-Amz-Expires=60&X-Amz-Signature=ab",
        ),
    ),
    ("referenceImages-base64-not-url-checked", mutated(RUNWAY, referenceImages=["iVBORw0KGgo="])),
    (
        "referenceImages-data-uri",
        mutated(RUNWAY, referenceImages=["data:image/png;base64,iVBORw0KGgo="]),
    ),
    ("referenceImages-url-non-ascii-path", mutated(RUNWAY, referenceImages=[REF_URL + "/\u00e9"])),
    ("imageUpload-url-ipv4", mutated(UPLOAD, image="http://127.0.0.1:8000/a.png")),
    ("ttl-30-days", mutated(RUNWAY, ttl=2_592_000)),
    ("integral-floats-are-integers", mutated(TINY, width=512.0, height=512.0, seed=7.0)),
    ("tiny-seed-above-random-range", mutated(TINY, seed=MAX_RANDOM_SEED + 1)),
    ("tiny-CFGScale-an-int", mutated(TINY, CFGScale=7)),
    ("modelSearch", SEARCH),
    (
        "modelSearch-all-bounds",
        mutated(
            SEARCH,
            search="s" * 200,
            tags=["t" * 100] * 50,
            category="c" * 100,
            limit=100,
            offset=1_000_000,
        ),
    ),
    ("ping-taskUUID-100-chars", mutated(PING, taskUUID="p" * 100)),
    ("positivePrompt-emoji-pair", mutated(TINY, positivePrompt="a \U0001f431 cat")),
    (
        "accelerator-deepCache-sdk-js-shape",
        mutated(
            TINY,
            acceleratorOptions={"deepCache": True, "deepCacheInterval": 3, "deepCacheBranchId": 0},
        ),
    ),
    (
        "accelerator-teaCache-on-flux",
        mutated(FLUX, acceleratorOptions={"teaCache": True, "teaCacheDistance": 0.4}),
    ),
    (
        "accelerator-legacy-sdk-nulls",
        mutated(
            FLUX,
            acceleratorOptions={
                "fbcache": True,
                "cacheDistance": 0.1,
                "teaCache": None,
                "cacheStartStepPercentage": 10,
                "cacheEndStepPercentage": 90,
                "cacheMaxConsecutiveSteps": 2,
                "deepCache": None,
                "deepCacheSkipMode": None,
            },
        ),
    ),
    ("accelerator-all-off", mutated(TINY, acceleratorOptions={"teaCache": False})),
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


def test_random_seed_bound_is_exact_in_a_javascript_number() -> None:
    # @runware/sdk-js reads the seed as a double: every seed we draw must survive that trip.
    assert int(float(MAX_RANDOM_SEED)) == MAX_RANDOM_SEED
    assert int(float(MAX_RANDOM_SEED - 1)) == MAX_RANDOM_SEED - 1
    assert int(float(MAX_RANDOM_SEED + 2)) != MAX_RANDOM_SEED + 2
    assert MAX_RANDOM_SEED < MAX_SEED == 2**63 - 1


def test_integral_float_is_taken_as_the_integer() -> None:
    task = validate_inference(mutated(TINY, width=512.0, height=768.0, seed=7.0))
    assert (task.width, task.height, task.seed) == (512, 768, 7)
    assert all(type(v) is int for v in (task.width, task.height, task.seed))


def test_url_errors_say_what_is_wrong_without_echoing_the_url() -> None:
    with pytest.raises(ImpastoError) as caught:
        parse_task(mutated(RUNWAY, webhookURL=HOOK + "\r\nX-Injected: 1"))
    message = caught.value.to_item()["message"]
    assert "control characters" in message
    assert "\r" not in message
    assert "\n" not in message
