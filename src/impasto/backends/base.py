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
class LoraUse:
    """A LoRA (by AIR) applied at a weight."""

    air: str
    weight: float = 1.0


@dataclass(frozen=True)
class EmbeddingUse:
    """A textual-inversion embedding (by AIR); weight scales its vectors."""

    air: str
    weight: float = 1.0


@dataclass(frozen=True)
class ControlUse:
    """A ControlNet (by AIR) with its guide image and when in the schedule it acts."""

    air: str
    image: Image.Image
    weight: float = 1.0
    start_step: int | None = None
    end_step: int | None = None
    start_percent: int | None = None
    end_percent: int | None = None
    mode: str = "balanced"

    def window(self, steps: int) -> tuple[float, float]:
        """(start, end) as fractions of the schedule, as diffusers' control_guidance_* take."""
        start = 0.0
        end = 1.0
        if self.start_percent is not None:
            start = self.start_percent / 100
        elif self.start_step is not None:
            start = min(1.0, self.start_step / max(1, steps))
        if self.end_percent is not None:
            end = self.end_percent / 100
        elif self.end_step is not None:
            end = min(1.0, self.end_step / max(1, steps))
        return start, max(end, start)


@dataclass(frozen=True)
class AdapterUse:
    """An IP-Adapter (by AIR) with its image prompt(s)."""

    air: str
    images: tuple[Image.Image, ...]
    weight: float = 1.0


@dataclass(frozen=True)
class RefinerUse:
    """An SDXL refiner (by AIR) that takes over for the end of the schedule."""

    air: str
    start_step: int | None = None
    start_percent: int | None = None

    def start(self, steps: int) -> float:
        if self.start_percent is not None:
            return self.start_percent / 100
        if self.start_step is not None:
            return min(0.99, self.start_step / max(1, steps))
        return 0.8


@dataclass(frozen=True)
class Outpaint:
    """Pixels to add on each side of the seed image, and the seam's feather."""

    top: int = 0
    right: int = 0
    bottom: int = 0
    left: int = 0
    blur: int = 0


@dataclass(frozen=True)
class CacheUse:
    """Step caching asked for with acceleratorOptions: the method and its knobs, the window as
    the client gave it (steps or percentages; resolved against the call's steps)."""

    method: str  # fbcache | teacache | deepcache
    threshold: float = 0.0
    interval: int = 3
    branch: int = 0
    skip_mode: str = "uniform"
    start_step: int | None = None
    stop_step: int | None = None
    start_percent: int | None = None
    end_percent: int | None = None
    max_consecutive: int | None = None

    def window(self, steps: int) -> tuple[int | None, int | None]:
        """(start, stop) as step indices of a schedule of `steps` steps."""
        start = self.start_step
        if self.start_percent is not None:
            start = steps * self.start_percent // 100
        stop = self.stop_step
        if self.end_percent is not None:
            stop = -(-steps * self.end_percent // 100)
        return start, stop


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
    # Image modes (diffusers): img2img / inpainting / outpainting inputs and add-ons.
    seed_image: Image.Image | None = None
    mask_image: Image.Image | None = None
    mask_margin: int | None = None
    outpaint: Outpaint | None = None
    loras: tuple[LoraUse, ...] = ()
    controlnets: tuple[ControlUse, ...] = ()
    ip_adapters: tuple[AdapterUse, ...] = ()
    refiner: RefinerUse | None = None
    vae: str | None = None
    embeddings: tuple[EmbeddingUse, ...] = ()
    clip_skip: int | None = None
    prompt_weighting: str | None = None
    cache: CacheUse | None = None
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


class OneJobPerCall:
    """Base of the backends that make one image per request to a provider or an engine
    (Runway, an OpenAI-compatible server): jobs are never batched together, and a job's
    failure is its own outcome while the other jobs of the call go on."""

    def batch_key(self, job: GenerationJob) -> Hashable:
        return job.job_id

    def batch_limit(self, job: GenerationJob) -> int:
        return 1

    async def generate(
        self,
        jobs: Sequence[GenerationJob],
        progress: ProgressCallback,
        checkpoint: CheckpointCallback,
    ) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for job in jobs:
            try:
                outcomes.append(await self.generate_one(job, progress, checkpoint))
            except ImpastoError as exc:
                outcomes.append(exc)
            except Exception as exc:
                failure = self.failure_of(job, exc)
                if failure is None:
                    raise
                outcomes.append(failure)
        return outcomes

    async def generate_one(
        self, job: GenerationJob, progress: ProgressCallback, checkpoint: CheckpointCallback
    ) -> GeneratedImage:
        raise NotImplementedError

    def failure_of(self, job: GenerationJob, exc: Exception) -> ImpastoError | None:
        """The outcome for a client library's own error (None: not ours to answer)."""
        return None
