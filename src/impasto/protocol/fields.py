"""The field types of the wire models: bounds, patterns, the validators that normalize what
clients send (integral floats, one-element outputType lists, JPEG spellings, bare reference
strings) and the JSON schema each one publishes, so that the schema describes what the
validators really take."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    GetJsonSchemaHandler,
    PlainValidator,
    WithJsonSchema,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from impasto.protocol.urls import looks_like_http_url, url_problem

# Runware documents seeds 1 ... 2**63 - 1; impasto also takes 0.
MAX_SEED = 2**63 - 1
# compat: @runware/sdk-js reads JSON numbers as doubles and rounds a seed above 2**53 - 1,
# so a drawn seed it is sent back could not reproduce the image. Seeds we draw stay below this;
# a client may still send any seed up to MAX_SEED.
MAX_RANDOM_SEED = 2**53 - 1
# 30 days: longer than any store keeps an image, and far from overflowing a timestamp.
MAX_TTL_S = 30 * 24 * 3600
MAX_SEARCH_OFFSET = 1_000_000
OUTPUT_FORMATS = ("JPG", "PNG", "WEBP")
OUTPUT_TYPES = ("URL", "base64Data", "dataURI")
SIZE_PARAMETERS = ("width", "height")

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
SURROGATE = re.compile("[\ud800-\udfff]")
# The JSON-schema side of the validators below, so that a schema-driven fuzzer's "valid" data
# is valid here too; each pattern accepts a subset of what the validator takes.
_NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"
_UUID4_PATTERN = (
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-4[0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}$"
)
_HTTP_URL_PATTERN = (
    r"^[hH][tT][tT][pP][sS]?://[A-Za-z][A-Za-z0-9-]{0,62}(\.[A-Za-z][A-Za-z0-9-]{0,62}){0,2}"
    r"(:[1-9][0-9]{0,3})?(/[!-~]*)?$"
)
# One character that is not whitespace to JavaScript's `\s` nor to Python's `str.strip`.
NOT_BLANK_PATTERN = r"[^\s\x1c-\x1f\x85]"
_HTTP_PREFIX_PATTERN = r"^[hH][tT][tT][pP][sS]?://"
OUTPUT_FORMAT_PATTERN = r"^([Jj][Pp][Ee]?[Gg]|[Pp][Nn][Gg]|[Ww][Ee][Bb][Pp])$"


@dataclass(frozen=True)
class JsonPattern:
    """Annotation that adds a `pattern` to a type's JSON schema (the validator does the check)."""

    pattern: str

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema["pattern"] = self.pattern
        return json_schema


def is_uuid4(value: str) -> bool:
    try:
        parsed = uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        return False
    return parsed.version == 4 and str(parsed) == value.lower()


def _check_uuid4(value: str) -> str:
    if not is_uuid4(value):
        raise ValueError("must be a UUID v4 string such as 'f47ac10b-58cc-4372-a567-0e02b2c3d493'")
    return value


def _check_printable(value: str) -> str:
    # Names and tags end up in logs and provider requests, where CR/LF would forge lines.
    if CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


def _check_url(value: str) -> str:
    problem = url_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _check_image_string(value: str) -> str:
    return _check_url(value) if looks_like_http_url(value) else value


def reference_item(value: Any) -> Any:
    # A reference image may be a bare string (UUID, URL, data URI, base64) or {image, tag}.
    return {"image": value} if isinstance(value, str) else value


def single_output_type(value: Any) -> Any:
    # compat: runware 0.5.24 types outputType as a list such as ["URL"].
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


def output_format(value: Any) -> Any:
    if isinstance(value, str):
        upper = value.upper()
        return "JPG" if upper == "JPEG" else upper
    return value


def _integral_float(value: Any) -> Any:
    # compat: JSON has one number type; `512.0` is the integer 512 to a JavaScript server such
    # as Runware's and to JSON Schema (so schemathesis sends it), though never 512.5 or `true`.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Constraints go inside the Annotated, before this, or the JSON schema of an optional field
# gets pydantic's `ge`/`le` instead of `minimum`/`maximum`.
INTEGRAL = BeforeValidator(_integral_float)
UUID4 = Annotated[str, AfterValidator(_check_uuid4), JsonPattern(_UUID4_PATTERN)]
Name = Annotated[str, AfterValidator(_check_printable), JsonPattern(_NO_CONTROL_PATTERN)]
HttpURL = Annotated[str, AfterValidator(_check_url), JsonPattern(_HTTP_URL_PATTERN)]
# Image strings carry no length bound of their own: a data URI may be as long as the body.
ImageString = Annotated[
    str,
    Field(min_length=1),
    AfterValidator(_check_image_string),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": _HTTP_URL_PATTERN, "maxLength": 2048},
                {"type": "string", "minLength": 1, "not": {"pattern": _HTTP_PREFIX_PATTERN}},
            ]
        }
    ),
]
OutputType = Literal["URL", "base64Data", "dataURI"]


def _output_types(value: Any) -> str | tuple[str, ...]:
    value = single_output_type(value)
    if isinstance(value, str) and value in OUTPUT_TYPES:
        return value
    if (
        isinstance(value, list)
        and 2 <= len(value) <= len(OUTPUT_TYPES)
        and all(isinstance(v, str) and v in OUTPUT_TYPES for v in value)
        and len(set(value)) == len(value)
    ):
        return tuple(value)
    raise ValueError("must be one of URL, base64Data, dataURI, or a list of them, each once")


# compat: runware 0.5.24 types outputType as one type or a list of them; a list asks for each
# (["URL", "base64Data"] gives imageURL and imageBase64Data in one item).
OutputTypes = Annotated[
    str | tuple[str, ...],
    PlainValidator(_output_types),
    WithJsonSchema(
        {
            "anyOf": [
                {"enum": list(OUTPUT_TYPES)},
                {
                    "type": "array",
                    "items": {"enum": list(OUTPUT_TYPES)},
                    "minItems": 1,
                    "maxItems": len(OUTPUT_TYPES),
                    "uniqueItems": True,
                },
            ],
            "default": "URL",
        }
    ),
]
