"""A backend whose every generation fails after the task was accepted, as a model that runs
out of memory or a provider that refuses would: the tiny model's rules, an inferenceError
outcome. Loaded by the operator's `backend = "package.module:Class"` hook."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from impasto.backends.base import CheckpointCallback, GenerationJob, Outcome, ProgressCallback
from impasto.backends.factory import BackendContext
from impasto.backends.registry import ModelEntry
from impasto.protocol.errors import InferenceError

FAILING_MODELS = '[models."impasto:tiny@1"]\nbackend = "tests.failing_backend:FailingBackend"\n'


class FailingBackend:
    def __init__(self, entry: ModelEntry, context: BackendContext) -> None:
        self.entry = entry

    @property
    def concurrency(self) -> int:
        return 1

    def batch_key(self, job: GenerationJob) -> Hashable:
        return None

    def batch_limit(self, job: GenerationJob) -> int:
        return 1

    async def generate(
        self,
        jobs: Sequence[GenerationJob],
        progress: ProgressCallback,
        checkpoint: CheckpointCallback,
    ) -> list[Outcome]:
        return [
            InferenceError("The backend failed on purpose (tests.failing_backend).") for _ in jobs
        ]

    async def close(self) -> None:
        pass


def failing_models_file(directory: Any) -> Any:
    path = directory / "failing-models.toml"
    path.write_text(FAILING_MODELS)
    return path
