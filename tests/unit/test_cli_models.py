"""`impasto models` output: a terminal table that never cuts an AIR id, plain columns."""

from __future__ import annotations

import io

from rich.console import Console

from impasto.cli.models import plain_columns, print_table

ROWS = [
    {
        "air": "civitai:101055@128078",
        "name": "Stable Diffusion XL 1.0 with a long name that has to wrap somewhere",
        "category": "checkpoint",
        "type": "base",
        "architecture": "sdxl",
        "backend": "diffusers",
        "defaultSize": [1024, 1024],
        "modes": ["text2img", "img2img", "inpainting"],
        "aliasOf": None,
        "ready": True,
        "readiness": "downloads stabilityai/stable-diffusion-xl-base-1.0 on first use",
        "device": "cuda:0, cuda:1",
    },
    {
        "air": "impasto:tiny-controlnet@1",
        "name": "tiny ControlNet",
        "category": "controlnet",
        "type": "base",
        "architecture": "sd1x",
        "backend": "tiny",
        "defaultSize": None,
        "modes": [],
        "aliasOf": None,
        "ready": False,
        "readiness": "needs the local extra",
        "device": "cpu",
    },
]


def test_a_narrow_terminal_table_keeps_every_air_whole() -> None:
    for width in (40, 80, 120):
        buffer = io.StringIO()
        print_table(ROWS, Console(file=buffer, width=width, force_terminal=True, color_system=None))
        text = buffer.getvalue()
        for row in ROWS:
            assert row["air"] in text, (width, text)
        assert "…" not in text.split("\n")[3]  # the first row's AIR cell is not cut


def test_plain_columns_are_aligned_and_whole() -> None:
    text = plain_columns(ROWS)
    lines = text.splitlines()
    assert lines[0].startswith("AIR ")
    assert lines[1].startswith("civitai:101055@128078  ")
    assert lines[2].startswith("impasto:tiny-controlnet@1  ")
    # Every column starts at the same offset on every line.
    offset = lines[0].index("name")
    assert all(line[offset - 2 : offset] == "  " for line in lines)
    assert "kind" in lines[0]
    assert "base 1024x1024" in lines[1]
    assert "controlnet" in lines[2]
    assert "yes: downloads stabilityai/stable-diffusion-xl-base-1.0 on first use" in lines[1]
    assert "no: needs the local extra" in lines[2]
