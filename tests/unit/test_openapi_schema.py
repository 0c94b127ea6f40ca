"""The published schema of POST /v1: a valid OpenAPI 3.1 description of every task type, whose
`$ref`s resolve, which takes what the parser takes and whose valid data the parser accepts."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from impasto.protocol.errors import InvalidParameter, TooManyTasks
from impasto.protocol.openapi import (
    REF_TEMPLATE,
    add_components,
    tasks_request_schema,
    tasks_responses,
)
from impasto.protocol.parsing import TASK_MODELS, parse_task

REQUEST, COMPONENTS = tasks_request_schema()
TASK_UUID = "f47ac10b-58cc-4372-a567-0e02b2c3d493"
IMAGE_UUID = "c64351d5-4c59-42f7-95e1-eace013eddab"
INFERENCE: dict[str, Any] = {
    "taskType": "imageInference",
    "taskUUID": TASK_UUID,
    "model": "impasto:tiny@1",
    "positivePrompt": "a lighthouse at dusk",
}
# Tasks the parser takes, in the forms its BeforeValidators allow.
TAKEN: list[tuple[str, dict[str, Any]]] = [
    ("inference-minimal", INFERENCE),
    ("outputType-one-element-list", {**INFERENCE, "outputType": ["dataURI"]}),
    ("outputFormat-jpeg-lower-case", {**INFERENCE, "outputFormat": "jpeg"}),
    ("outputFormat-Webp", {**INFERENCE, "outputFormat": "Webp"}),
    ("width-integral-float", {**INFERENCE, "width": 512.0, "height": 512}),
    (
        "reference-strings-and-objects",
        {
            **INFERENCE,
            "referenceImages": [
                "https://example.com/a.jpg",
                IMAGE_UUID,
                {"image": "iVBORw0KGgo=", "tag": "hero"},
            ],
        },
    ),
    ("inputs-reference-string", {**INFERENCE, "inputs": {"referenceImages": [IMAGE_UUID]}}),
    ("webhook", {**INFERENCE, "webhookURL": "https://example.com:8443/hook?x=1"}),
    ("imageUpload", {"taskType": "imageUpload", "taskUUID": TASK_UUID, "image": IMAGE_UUID}),
    ("getResponse", {"taskType": "getResponse", "taskUUID": TASK_UUID.upper()}),
    ("modelSearch", {"taskType": "modelSearch", "taskUUID": TASK_UUID, "tags": ["flux"]}),
    ("ping", {"taskType": "ping", "ping": True}),
    ("authentication", {"taskType": "authentication", "apiKey": "k"}),
]
# Tasks the parser refuses that the schema can tell apart from valid ones.
REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("ttl-400-digits", {**INFERENCE, "ttl": 10**400}),
    ("offset-over", {"taskType": "modelSearch", "taskUUID": TASK_UUID, "offset": 10**7}),
    ("outputType-two-element-list", {**INFERENCE, "outputType": ["URL", "URL"]}),
    ("outputFormat-gif", {**INFERENCE, "outputFormat": "gif"}),
    ("four-references", {**INFERENCE, "referenceImages": [IMAGE_UUID] * 4}),
    ("unknown-key", {**INFERENCE, "fooBar": 1}),
    ("taskUUID-v1", {**INFERENCE, "taskUUID": "6ba7b831-9dad-11d1-80b4-00c04fd430c8"}),
    ("blank-prompt", {**INFERENCE, "positivePrompt": "   "}),
    ("prompt-of-separators", {**INFERENCE, "positivePrompt": "\x1c\x85\u3000"}),
    ("model-with-newline", {**INFERENCE, "model": "a\nb"}),
    ("webhook-ftp", {**INFERENCE, "webhookURL": "ftp://example.com/"}),
    ("unknown-task-type", {"taskType": "videoInference", "taskUUID": TASK_UUID}),
]


def refs_in(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs_in(item)


def keys_in(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "properties":
                yield key
            yield from keys_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from keys_in(item)


def document(request: dict[str, Any] = REQUEST) -> dict[str, Any]:
    """A whole OpenAPI document with POST /v1, as the app publishes it."""
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "impasto", "version": "test"},
        "paths": {
            "/v1": {
                "post": {
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": request}},
                    },
                    "responses": tasks_responses(),
                }
            }
        },
    }
    return add_components(doc, copy.deepcopy(COMPONENTS))


def validator(schema: dict[str, Any]) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    # The components sit beside the schema, so `#/components/schemas/...` resolves in place.
    return jsonschema.Draft202012Validator({**schema, "components": {"schemas": COMPONENTS}})


def test_every_ref_resolves_to_a_component() -> None:
    refs = set(refs_in([REQUEST, COMPONENTS, tasks_responses()]))
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in COMPONENTS, ref


def test_each_task_type_is_one_of_the_items_chosen_by_task_type() -> None:
    items = REQUEST["items"]
    assert REQUEST["type"] == "array"
    assert "maxItems" not in REQUEST
    mapping = items["discriminator"]["mapping"]
    assert items["discriminator"]["propertyName"] == "taskType"
    assert set(mapping) == set(TASK_MODELS)
    assert [one["$ref"] for one in items["oneOf"]] == list(mapping.values())
    for task_type, ref in mapping.items():
        model = COMPONENTS[ref.rsplit("/", 1)[1]]
        assert model["properties"]["taskType"]["const"] == task_type
        assert "taskType" in model["required"]


def test_schemas_use_json_schema_keywords_not_pydantic_ones() -> None:
    # Constraints put beside a validator in an optional field come out as `ge`/`le`, which no
    # JSON Schema tool reads: the bound would silently vanish from the published schema.
    assert not {"ge", "le", "gt", "lt"} & set(keys_in(COMPONENTS))


def test_numbers_in_the_schema_all_have_an_upper_bound() -> None:
    def numeric(node: Any) -> Iterator[dict[str, Any]]:
        if isinstance(node, dict):
            if node.get("type") in ("integer", "number"):
                yield node
            for value in node.values():
                yield from numeric(value)
        elif isinstance(node, list):
            for item in node:
                yield from numeric(item)

    found = list(numeric(COMPONENTS))
    assert found
    for node in found:
        assert "maximum" in node, node


def test_every_component_is_a_valid_json_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    for name, schema in COMPONENTS.items():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema.get("type") == "object", name


def test_the_document_is_valid_openapi_3_1() -> None:
    spec_validator = pytest.importorskip("openapi_spec_validator")
    spec_validator.validate(document())


@pytest.mark.parametrize("task", [t for _, t in TAKEN], ids=[i for i, _ in TAKEN])
def test_what_the_parser_takes_matches_the_schema(task: dict[str, Any]) -> None:
    parse_task(task)
    validator(REQUEST).validate([task])


@pytest.mark.parametrize("task", [t for _, t in REFUSED], ids=[i for i, _ in REFUSED])
def test_what_the_parser_refuses_does_not_match_the_schema(task: dict[str, Any]) -> None:
    with pytest.raises(InvalidParameter):
        parse_task(task)
    assert not validator(REQUEST).is_valid([task])


def test_the_reply_schema_describes_real_envelopes() -> None:
    reply = validator({"$ref": REF_TEMPLATE.format(model="TaskReply")})
    error = InvalidParameter("bad", code="invalidWidth", parameter="width", task_uuid=TASK_UUID)
    reply.validate({"data": [{"taskType": "ping", "pong": True}]})
    reply.validate({"errors": [error.for_task("imageInference", TASK_UUID).to_item()]})
    reply.validate({"data": [], "errors": [TooManyTasks("too many").to_item()]})
    assert not reply.is_valid({"errors": [{"message": "no code"}]})
    assert not reply.is_valid({})


def test_every_reply_status_names_the_envelope() -> None:
    responses = tasks_responses()
    assert {"200", "400", "401", "413", "429", "500", "503"} <= set(responses)
    for response in responses.values():
        schema = response["content"]["application/json"]["schema"]
        assert schema == {"$ref": REF_TEMPLATE.format(model="TaskReply")}


def test_add_components_keeps_the_schemas_already_there() -> None:
    doc: dict[str, Any] = {"components": {"schemas": {"HTTPValidationError": {}}}}
    add_components(doc, {"TaskReply": {"type": "object"}})
    assert set(doc["components"]["schemas"]) == {"HTTPValidationError", "TaskReply"}


@pytest.mark.parametrize("task_type", sorted(TASK_MODELS))
def test_data_a_schema_fuzzer_calls_valid_parses(task_type: str) -> None:
    """schemathesis (the fuzzer run against /openapi.json) draws tasks from each model's schema;
    every one must parse, or its positive tests would report our own 400s."""
    schemathesis = pytest.importorskip("schemathesis")
    ref = REF_TEMPLATE.format(model=TASK_MODELS[task_type].__name__)
    schema = schemathesis.openapi.from_dict(
        document({"type": "array", "minItems": 1, "maxItems": 2, "items": {"$ref": ref}})
    )
    strategy = schema["/v1"]["POST"].as_strategy()

    @settings(
        max_examples=60,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(st.data())
    def check(data: st.DataObject) -> None:
        case = data.draw(strategy)
        for task in case.body:
            assert parse_task(task).taskType == task_type

    check()
