"""The impasto side of bench/server_overhead.py part A: a Backend with no model that hands back
a solid image of the job's size, so that what a request costs is impasto's own path (HTTP,
validation, scheduling, JPEG encoding, storage, the reply) and nothing else.

Registered in the benchmark's models file as

    [models."bench:solid@1"]
    backend = "bench.nomodel_backend:SolidBackend"
    [models."bench:solid@1".settings]
    batch_limit = 1

(the server runs with the repository root on PYTHONPATH, so `bench` imports).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from PIL import Image

from impasto.backends.base import (
    CheckpointCallback,
    GeneratedImage,
    GenerationJob,
    Outcome,
    ProgressCallback,
)

# The colour the Cog predictor paints too (bench/cog_predictor.py): same bytes to encode.
COLOUR = (181, 112, 64)


class SolidBackend:
    """No model: one solid RGB image per job, made once per size and handed back as it is
    (impasto converts and encodes a copy), as the Cog predictor reuses its image."""

    concurrency = 1

    def __init__(self, entry: Any, context: Any) -> None:
        self._batch_limit = max(1, int(entry.settings.get("batch_limit", 1)))
        self._images: dict[tuple[int, int], Image.Image] = {}

    def batch_key(self, job: GenerationJob) -> Hashable:
        return (job.width, job.height)

    def batch_limit(self, job: GenerationJob) -> int:
        return self._batch_limit

    async def generate(
        self,
        jobs: Sequence[GenerationJob],
        progress: ProgressCallback,
        checkpoint: CheckpointCallback,
    ) -> list[Outcome]:
        # Nothing to compute, hence nothing to move off the event loop.
        return [
            GeneratedImage(image=self._image(job.width, job.height), seed=job.seed) for job in jobs
        ]

    def _image(self, width: int, height: int) -> Image.Image:
        image = self._images.get((width, height))
        if image is None:
            image = self._images[(width, height)] = Image.new("RGB", (width, height), COLOUR)
        return image

    async def close(self) -> None:
        self._images.clear()
