"""Properties of the task parser over arbitrary JSON: `parse_task` returns a bounded model or
raises an ImpastoError whose item is a serialisable Runware error, never anything else.

Bounded and reproducible for CI: at most 300 examples a test, derandomized, no database."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from impasto.protocol.errors import ImpastoError
from impasto.protocol.fields import MAX_SEED
from impasto.protocol.parsing import TASK_MODELS, TaskIn, parse_task
from impasto.protocol.rules import RUNWAY_SIZES, ModelRules, SizeRule, check_against_rules
from impasto.protocol.tasks import ImageInferenceIn
from impasto.protocol.urls import url_problem

PROPERTY = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TASK_UUID = "f47ac10b-58cc-4372-a567-0e02b2c3d493"
IMAGE_UUID = "c64351d5-4c59-42f7-95e1-eace013eddab"
VALID: dict[str, dict[str, Any]] = {
    "imageInference": {
        "taskType": "imageInference",
        "taskUUID": TASK_UUID,
        "model": "impasto:tiny@1",
        "positivePrompt": "a lighthouse on a cliff at dusk",
        "width": 512,
        "height": 512,
        "seed": 42,
        "ttl": 3600,
        "webhookURL": "https://example.com/hook",
        "referenceImages": ["https://example.com/ref.jpg", {"image": IMAGE_UUID, "tag": "hero"}],
        "safety": {"checkContent": True},
    },
    "imageUpload": {"taskType": "imageUpload", "taskUUID": TASK_UUID, "image": "iVBORw0KGgo="},
    "getResponse": {"taskType": "getResponse", "taskUUID": TASK_UUID},
    "modelSearch": {"taskType": "modelSearch", "taskUUID": TASK_UUID, "tags": ["flux"]},
    "ping": {"taskType": "ping", "ping": True},
    "authentication": {"taskType": "authentication", "apiKey": "secret-key"},
}
# Rules as strict as the registry's: fixed Runway sizes with references, and a size range.
RULES = (
    ModelRules(
        air="runway:4@1",
        sizes=SizeRule(default=(1920, 1080), allowed=frozenset(RUNWAY_SIZES)),
        max_reference_images=3,
        provider="runway",
    ),
    ModelRules(
        air="impasto:tiny@1",
        sizes=SizeRule(default=(512, 512)),
        parameters=frozenset({"seed", "steps", "CFGScale", "negativePrompt", "scheduler"}),
        max_reference_images=1,
    ),
)

# Text as a JSON parser hands it over: control characters, lone surrogates (`"\ud800"` is
# valid JSON) and strings that sit on the edge of a rule.
characters = (
    st.characters(exclude_categories=())
    | st.characters(categories=["Cs"])
    | st.sampled_from("\r\n\t\x00\x7f\u202e[]:@/%.")
)
tricky_strings = st.sampled_from(
    [
        "",
        " ",
        "URL",
        "jpeg",
        "imageInference",
        TASK_UUID,
        IMAGE_UUID,
        "http://[::1",
        "http://]/",
        "https://example.com:99999/x",
        "https://u:p@example.com/x",
        "https://example.com/x\r\nX-Injected: 1",
        "https://\u2603.net/",
        "data:image/png;base64,iVBORw0KGgo=",
        "x" * 5000,
    ]
)
# Joined from a list: st.text() merges the character strategies and drops the surrogates.
texts = st.lists(characters, max_size=40).map("".join) | tricky_strings
huge_ints = st.sampled_from([2**53, 2**53 + 1, 2**63, 2**64, -(2**63) - 1]) | st.sampled_from(
    [400, 4400]
).map(lambda digits: 10**digits)  # built, not listed: a 4400-digit literal has no repr
numbers = (
    st.integers()
    | st.integers(min_value=2**50, max_value=2**70)
    | huge_ints
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0.0, -0.0, 1.0, 512.0, 1e300, -1e300, 5e-324])
)
scalars = st.none() | st.booleans() | numbers | texts
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)
reference_items = json_values | st.fixed_dictionaries(
    {"image": texts | json_values}, optional={"tag": texts | json_values}
)
FIELD_NAMES = sorted(
    {name for model in TASK_MODELS.values() for name in model.model_fields}
    | {"image", "tag", "runway", "contentModeration", "publicFigureThreshold", "lora"}
)
keys = st.sampled_from(FIELD_NAMES) | texts


def _is_clean(text: str) -> bool:
    return not any(
        ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) < 0xE000 for c in text
    )


def _assert_bounded(value: Any, path: str) -> None:
    """Numbers an accepted task holds can be stored, added to a clock and sent to JavaScript
    clients as they are (seeds aside, which are documented up to 2**63 - 1)."""
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            _assert_bounded(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _assert_bounded(item, f"{path}[{i}]")
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        assert 0 <= value <= MAX_SEED, path
        assert math.isfinite(value * 1.0 + 1e9), path
    elif isinstance(value, float):
        assert math.isfinite(value), path
        assert abs(value) <= 1e6, path


def _assert_error_item(exc: ImpastoError) -> None:
    item = exc.to_item()
    assert isinstance(item["code"], str)
    assert item["code"]
    assert isinstance(item["message"], str)
    assert item["message"]
    assert 400 <= exc.http_status < 500, item
    # Both the ASCII envelope and a UTF-8 one (Starlette's default) can carry it.
    json.dumps(item, allow_nan=False)
    json.dumps(item, allow_nan=False, ensure_ascii=False).encode("utf-8")
    for key in ("parameter", "taskType", "taskUUID"):
        if key in item:
            assert isinstance(item[key], str), key
            assert len(item[key]) <= 200, key
            assert _is_clean(item[key]), key
    assert len(item["message"]) <= 2000
    assert _is_clean(item["message"])


def _rules_error(task: ImageInferenceIn, rules: ModelRules) -> ImpastoError | None:
    try:
        check_against_rules(task, rules)
    except ImpastoError as exc:
        return exc
    return None


def check_parse(raw: Any) -> TaskIn | None:
    """parse_task's contract on one input; returns the task when it was accepted."""
    error: ImpastoError | None = None
    try:
        task = parse_task(raw)
    except ImpastoError as exc:
        error = exc
    if error is not None:
        _assert_error_item(error)
        return None
    _assert_bounded(task, task.taskType)
    json.loads(task.model_dump_json())
    # Stored and logged as UTF-8: no lone surrogates anywhere in what was accepted.
    json.dumps(task.model_dump(), allow_nan=False, ensure_ascii=False).encode("utf-8")
    if isinstance(task, ImageInferenceIn):
        for rules in RULES:
            rules_error = _rules_error(task, rules)
            if rules_error is not None:
                _assert_error_item(rules_error)
    return task


@PROPERTY
@given(json_values)
def test_any_json_value_is_a_task_or_an_error_item(raw: Any) -> None:
    check_parse(raw)


@PROPERTY
@given(st.sampled_from(sorted(TASK_MODELS)), st.dictionaries(keys, json_values, max_size=6))
def test_any_fields_under_a_known_task_type_give_a_task_or_an_error_item(
    task_type: str, fields: dict[str, Any]
) -> None:
    check_parse({**fields, "taskType": task_type})


@PROPERTY
@given(keys, json_values)
def test_one_field_of_an_image_inference_task_set_to_anything(key: str, value: Any) -> None:
    check_parse({**VALID["imageInference"], key: value})


@PROPERTY
@given(
    st.sampled_from(["inputs", "providerSettings", "safety"]),
    st.dictionaries(keys, json_values, max_size=3),
)
def test_nested_objects_of_an_image_inference_task_set_to_anything(
    key: str, value: dict[str, Any]
) -> None:
    check_parse({**VALID["imageInference"], key: value})


@PROPERTY
@given(st.lists(reference_items, min_size=1, max_size=4), st.sampled_from(["top", "inputs"]))
def test_any_reference_images_give_a_task_or_an_error_item(refs: list[Any], where: str) -> None:
    base = {k: v for k, v in VALID["imageInference"].items() if k != "referenceImages"}
    check_parse(
        {**base, "referenceImages": refs}
        if where == "top"
        else {**base, "inputs": {"referenceImages": refs}}
    )


@PROPERTY
@given(st.sampled_from(sorted(VALID)), keys, json_values)
def test_one_field_of_any_task_type_set_to_anything(task_type: str, key: str, value: Any) -> None:
    check_parse({**VALID[task_type], key: value})


def _with_text(task_type: str, path: tuple[str | int, ...], text: str) -> dict[str, Any]:
    task = copy.deepcopy(VALID[task_type])
    node: Any = task
    for part in path[:-1]:
        if isinstance(part, str):
            node = node.setdefault(part, {} if part != "referenceImages" else [{}])
        else:
            node = node[part]
    node[path[-1]] = text
    return task


TEXT_FIELDS: list[tuple[str, tuple[str | int, ...]]] = [
    ("imageInference", ("positivePrompt",)),
    ("imageInference", ("negativePrompt",)),
    ("imageInference", ("model",)),
    ("imageInference", ("scheduler",)),
    ("imageInference", ("webhookURL",)),
    ("imageInference", ("uploadEndpoint",)),
    ("imageInference", ("referenceImages", 0)),
    ("imageInference", ("referenceImages", 1, "image")),
    ("imageInference", ("referenceImages", 1, "tag")),
    ("imageInference", ("safety", "mode")),
    ("imageUpload", ("image",)),
    ("modelSearch", ("tags", 0)),
    ("modelSearch", ("search",)),
    ("modelSearch", ("category",)),
    ("ping", ("taskUUID",)),
    ("authentication", ("apiKey",)),
    ("authentication", ("connectionSessionUUID",)),
]


@PROPERTY
@given(st.sampled_from(TEXT_FIELDS), st.lists(characters, min_size=1, max_size=20).map("".join))
def test_any_text_in_any_string_field_gives_a_task_or_an_error_item(
    field: tuple[str, tuple[str | int, ...]], text: str
) -> None:
    task_type, path = field
    check_parse(_with_text(task_type, path, text))


@pytest.mark.parametrize("task_type", sorted(VALID))
def test_the_valid_examples_are_accepted(task_type: str) -> None:
    assert check_parse(VALID[task_type]) is not None


@PROPERTY
@given(
    st.sampled_from(["http://", "https://", "HTTPS://"]),
    st.lists(characters | st.sampled_from(list("[]:@/%.?#-0123456789abcxn")), max_size=40).map(
        "".join
    ),
)
def test_a_url_that_passes_the_check_is_one_httpx_can_request(prefix: str, rest: str) -> None:
    url = prefix + rest
    if url_problem(url) is None:
        request = httpx.Request("POST", url)
        assert request.url.host
        assert request.url.scheme in ("http", "https")
