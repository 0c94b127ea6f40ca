"""The Backend seam and the job and image types that cross it."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from impasto.protocol.errors import ImpastoError


@dataclass(frozen=True)
class ReferenceImage:
    """A decoded reference image and its optional `@tag`."""

    image: Image.Image
    tag: str | None = None
    # The client's own https URL, for providers that can fetch it themselves.
    source_url: str | None = None


@dataclass(frozen=True)
class GenerationJob:
    """One image to make: generation `index` of task `task_uuid`."""

    task_uuid: str
    index: int
    model: str
    prompt: str
    width: int
    height: int
    seed: int
    negative_prompt: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    scheduler: str | None = None
    strength: float | None = None
    reference_images: tuple[ReferenceImage, ...] = ()
    provider_settings: Mapping[str, Any] = field(default_factory=dict)
    # Backend bookkeeping from an earlier run of this job (e.g. a provider's task id).
    resume: Mapping[str, Any] = field(default_factory=dict)

    @property
    def job_id(self) -> str:
        return f"{self.task_uuid}:{self.index}"


@dataclass(frozen=True)
class GeneratedImage:
    """A backend's output for one job. `cost` is set when the backend knows the real price."""

    image: Image.Image
    seed: int
    cost: float | None = None


Outcome = GeneratedImage | ImpastoError

# Thread-safe: backends may call it from their worker threads.
ProgressCallback = Callable[[Sequence[GenerationJob], int], None]
# Lets a backend persist bookkeeping (e.g. a provider task id) before it waits on it.
CheckpointCallback = Callable[[GenerationJob, Mapping[str, Any]], Any]


class Backend(Protocol):
    """Turns a batch of compatible jobs into images, one outcome per job in order."""

    @property
    def concurrency(self) -> int:
        """How many `generate` calls may run at once."""

    def batch_key(self, job: GenerationJob) -> Hashable:
        """Jobs with equal keys may be run in one `generate` call."""

    def batch_limit(self, job: GenerationJob) -> int:
        """At most how many jobs like this one may share a `generate` call."""

    async def generate(
        self,
        jobs: Sequence[GenerationJob],
        progress: ProgressCallback,
        checkpoint: CheckpointCallback,
    ) -> list[Outcome]:
        """Run the jobs; a raised ImpastoError fails the whole batch."""

    async def close(self) -> None:
        """Release models, clients and threads."""
