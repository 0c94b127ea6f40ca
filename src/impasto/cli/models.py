"""`impasto models`: the models this server offers, whether each can run now, readable in a
terminal of any width, in a pipe (plain columns) and in scripts (`--json`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from impasto.settings import Settings

COLUMNS = ("AIR", "name", "kind", "architecture", "backend", "modes", "alias of", "ready", "device")


def models(
    models_file: Annotated[
        Path | None, typer.Option("--models", help="models file [IMPASTO_MODELS]")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON array, for scripts")] = False,
) -> None:
    """List the models this server would offer, and whether each can run here now."""
    settings = Settings(models=models_file) if models_file else Settings()
    rows = model_rows(settings)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    elif sys.stdout.isatty():
        print_table(rows)
    else:
        typer.echo(plain_columns(rows), nl=False)


def model_rows(settings: Settings) -> list[dict[str, Any]]:
    """One dict per model: what `--json` prints and the tables show."""
    from impasto.backends.availability import availability, device_summary
    from impasto.backends.registry import ModelRegistry
    from impasto.protocol.rules import modes_of

    registry = ModelRegistry.load(settings.models)
    key = settings.runway_api_secret
    keys = {"runway": key.get_secret_value()} if key else {}
    local_device: str | None = None
    rows = []
    for entry in registry.entries():
        target = registry.resolve(entry.air).target
        runnable = not entry.is_asset and entry.type != "refiner"
        found = availability(
            registry,
            entry.air,
            models_dir=settings.models_dir,
            provider_keys=keys,
            offline=settings.offline,
        )
        if target.backend in ("tiny", "diffusers") or (
            target.utility_task is not None and target.backend != "openai-chat"
        ):
            local_device = local_device or device_summary(settings.devices)
            device = local_device
        else:
            device = f"{target.backend} API"
        width, height = entry.rules.sizes.default
        rows.append(
            {
                "air": entry.air,
                "name": entry.name,
                "category": entry.category,
                "type": entry.type,
                "architecture": entry.architecture,
                "backend": target.backend,
                "defaultSize": None if entry.is_asset else [width, height],
                "modes": list(modes_of(entry.rules)) if runnable else [],
                "aliasOf": registry.alias_of(entry.air),
                "ready": found.ready,
                "readiness": found.note,
                "device": device,
            }
        )
    return rows


def _cells(row: dict[str, Any]) -> list[str]:
    if row["defaultSize"] is None:
        kind = row["category"]
    else:
        kind = f"{row['type']} {row['defaultSize'][0]}x{row['defaultSize'][1]}"
    return [
        row["air"],
        row["name"],
        kind,
        row["architecture"],
        row["backend"],
        ", ".join(row["modes"]) or "-",
        row["aliasOf"] or "-",
        ("yes: " if row["ready"] else "no: ") + row["readiness"],
        row["device"],
    ]


def plain_columns(rows: list[dict[str, Any]]) -> str:
    """Space-aligned columns with every value whole (for `| cat`, `grep`, `cut`, files)."""
    table = [list(COLUMNS)] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in table
    ]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    """A rich table that never cuts an AIR id: its column is as wide as the longest one, and
    the other columns wrap instead."""
    longest = max((len(row["air"]) for row in rows), default=3)
    table = Table()
    table.add_column("AIR", no_wrap=True, min_width=longest)
    for name in COLUMNS[1:]:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*_cells(row))
    (console or Console()).print(table)
