"""docs/configuration.md is the reference rendered from Settings: it fails here when a setting
is added, removed, renamed, re-described or given another default without refreshing it."""

from __future__ import annotations

from pathlib import Path

from impasto.settings import Settings
from impasto.settings_reference import render

DOC = Path(__file__).parents[2] / "docs" / "configuration.md"


def test_the_configuration_reference_matches_the_settings() -> None:
    assert DOC.read_text() == render(), (
        "docs/configuration.md is out of date: run "
        "`.venv/bin/impasto config-reference > docs/configuration.md`"
    )


def test_every_setting_is_described_and_listed_by_its_variable() -> None:
    undescribed = [n for n, f in Settings.model_fields.items() if not f.description]
    assert undescribed == []
    text = render()
    for name in Settings.model_fields:
        if name not in ("runway_api_secret", "runway_base_url"):
            assert f"`IMPASTO_{name.upper()}`" in text
    assert "`RUNWAYML_API_SECRET`" in text
    assert "| `IMPASTO_PORT` | int | `8080` |" in text
    assert "| `IMPASTO_DATA_DIR` | Path | `~/.local/share/impasto` |" in text
