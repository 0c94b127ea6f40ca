"""The configuration reference (docs/configuration.md), rendered from the Settings object so
that it cannot drift: a test compares the file with `render()`. Refresh it with
`impasto config-reference > docs/configuration.md`."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, SecretStr
from pydantic.fields import FieldInfo

from impasto.settings import Settings

HEADER = """# Configuration reference

Every setting is an environment variable (`IMPASTO_<NAME>`; a few also read the provider's own
variable) and a field of `impasto.settings.Settings`; `impasto serve` and `impasto worker` take
the most used ones as options too. Lists are comma-separated (`IMPASTO_API_KEYS=key1,key2`).
Generated from the code by `impasto config-reference`; a test fails when this file drifts.

| variable | type | default | what it does |
|---|---|---|---|
"""


def env_names(name: str, info: FieldInfo) -> list[str]:
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    if isinstance(alias, str):
        return [alias]
    return [f"IMPASTO_{name.upper()}"]


def type_name(annotation: Any) -> str:
    """`int`, `list[str]`, `str | None`, `proxy | presigned | public` (Annotated unwrapped)."""
    if typing.get_origin(annotation) is typing.Annotated:
        return type_name(typing.get_args(annotation)[0])
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(str(value) for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(arg) for arg in typing.get_args(annotation))
    if origin is not None:
        inner = ", ".join(type_name(arg) for arg in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def default_text(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True)
    if value is None or isinstance(value, SecretStr):
        return "unset"
    if isinstance(value, Path):
        home = Path.home()
        text = f"~/{value.relative_to(home)}" if value.is_relative_to(home) else str(value)
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, list | tuple):
        if not value:
            return "empty"
        text = ",".join(str(item) for item in value)
    else:
        text = str(value)
    return f"`{text}`" if text else "empty"


def render() -> str:
    rows = []
    for name, info in Settings.model_fields.items():
        variables = "<br>".join(f"`{env}`" for env in env_names(name, info))
        description = (info.description or "").replace("|", "\\|")
        rows.append(
            f"| {variables} | {type_name(info.annotation)} | {default_text(info)} | {description} |"
        )
    return HEADER + "\n".join(rows) + "\n"
