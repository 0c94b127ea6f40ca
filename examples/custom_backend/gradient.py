"""A custom backend served behind the Runware API: paints a gradient from the prompt and seed.

Register it in a models file (see models.toml beside this file):

    [models."acme:gradient@1"]
    backend = "examples.custom_backend.gradient:GradientBackend"

impasto constructs it as GradientBackend(entry, context) and drives it like any other backend:
validation, seeds, batching, encoding, URLs, webhooks, uploads and getResponse come for free.
"""

from __future__ import annotations

import asyncio
import hashlib
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


def _colour(text: str, seed: int) -> tuple[int, int, int]:
    digest = hashlib.sha256(f"{text}:{seed}".encode()).digest()
    return digest[0], digest[1], digest[2]


class GradientBackend:
    """The smallest useful Backend: no model, just the protocol."""

    concurrency = 2

    def __init__(self, entry: Any, context: Any) -> None:
        self.entry = entry

    def batch_key(self, job: GenerationJob) -> Hashable:
        return (job.width, job.height)

    def batch_limit(self, job: GenerationJob) -> int:
        return 8

    async def generate(
        self,
        jobs: Sequence[GenerationJob],
        progress: ProgressCallback,
        checkpoint: CheckpointCallback,
    ) -> list[Outcome]:
        # Real work would run in a thread (or a GPU worker); never block the event loop.
        images = await asyncio.to_thread(lambda: [self._paint(job) for job in jobs])
        progress(jobs, 100)
        return [
            GeneratedImage(image=image, seed=job.seed)
            for job, image in zip(jobs, images, strict=True)
        ]

    @staticmethod
    def _paint(job: GenerationJob) -> Image.Image:
        start = _colour(job.prompt, job.seed)
        end = _colour(job.prompt[::-1], job.seed)
        column = Image.linear_gradient("L").resize((job.width, job.height))
        return Image.composite(
            Image.new("RGB", column.size, end), Image.new("RGB", column.size, start), column
        )

    async def close(self) -> None:
        pass
