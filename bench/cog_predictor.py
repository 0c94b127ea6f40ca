"""The Cog side of bench/server_overhead.py: a predictor that makes one solid 1360x768 JPEG
(quality 95) per call and returns it as a `cog.Path`, as an image model on Cog would.

The benchmark copies it as predict.py into a model directory with a cog.yaml and starts Cog's
server there (COG_PREDICT_TYPE_STUB=predict.py:SolidPredictor) from the separate venv
bench/.venv-cog: it imports nothing of impasto.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path as LocalPath

# cog has no type information (no py.typed), and only bench/.venv-cog has it at all.
from cog import BaseRunner, Input, Path  # type: ignore[import-not-found, import-untyped, unused-ignore]
from PIL import Image

WIDTH, HEIGHT, QUALITY = 1360, 768, 95
# The colour the impasto backend paints too (bench/nomodel_backend.py).
COLOUR = (181, 112, 64)


class SolidPredictor(BaseRunner):  # type: ignore[misc]
    """No model: a solid image encoded to JPEG per prediction."""

    def setup(self) -> None:
        self.image = Image.new("RGB", (WIDTH, HEIGHT), COLOUR)
        # Under the TMPDIR the benchmark gives Cog: removed with the run.
        self.out_dir = LocalPath(tempfile.mkdtemp(prefix="cog-bench-"))
        self.numbers = itertools.count()

    def run(self, prompt: str = Input(default="", description="ignored")) -> Path:
        out = self.out_dir / f"{next(self.numbers)}.jpg"
        self.image.save(out, format="JPEG", quality=QUALITY)
        return Path(out)
