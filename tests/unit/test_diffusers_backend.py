"""DiffusersBackend on the tiny pipeline: OOM splitting, batch limits, eviction, schedulers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from impasto.backends.base import GeneratedImage, GenerationJob
from impasto.backends.devices import DeviceWorker
from impasto.backends.diffusers_backend import DiffusersBackend
from impasto.backends.registry import TINY_AIR, ModelRegistry
from impasto.backends.schedulers import SCHEDULERS, known_schedulers, resolve_scheduler
from impasto.protocol.errors import ImpastoError, InferenceError


def job(index: int, seed: int, width: int = 128, height: int = 96, **kw: Any) -> GenerationJob:
    return GenerationJob(
        task_uuid="t",
        index=index,
        model=TINY_AIR,
        prompt=f"prompt {index}",
        width=width,
        height=height,
        seed=seed,
        **kw,
    )


def backend(tiny: Path, worker: DeviceWorker, **settings: Any) -> DiffusersBackend:
    entry = ModelRegistry.load(None).resolve(TINY_AIR).target
    entry = type(entry)(**{**entry.__dict__, "settings": {**entry.settings, **settings}})
    return DiffusersBackend(entry, tiny / "impasto-tiny", [worker], max_batch_size=4)


def generate(b: DiffusersBackend, jobs: Sequence[GenerationJob]) -> list[Any]:
    async def run() -> list[Any]:
        return await b.generate(jobs, lambda jobs, percent: None, _no_checkpoint)

    return asyncio.run(run())


async def _no_checkpoint(job: GenerationJob, data: Any) -> None:
    return None


def pixels(outcome: Any) -> np.ndarray:
    assert isinstance(outcome, GeneratedImage)
    return np.asarray(outcome.image, dtype=np.int16)


@pytest.fixture
def worker() -> Any:
    w = DeviceWorker("cpu")
    yield w
    w.shutdown()


def test_out_of_memory_splits_the_batch_and_remembers_the_size(
    tiny_models_dir: Path, worker: DeviceWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = backend(tiny_models_dir, worker)
    calls: list[int] = []
    original = DiffusersBackend._generate

    def fake_oom(self: DiffusersBackend, w: DeviceWorker, jobs: list[GenerationJob], p: Any) -> Any:
        calls.append(len(jobs))
        if len(jobs) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, w, jobs, p)

    monkeypatch.setattr(DiffusersBackend, "_generate", fake_oom)
    jobs = [job(i, seed=10 + i) for i in range(4)]

    outcomes = generate(b, jobs)

    assert calls == [4, 2, 1, 1, 2, 1, 1]
    assert all(isinstance(o, GeneratedImage) for o in outcomes)
    assert [o.seed for o in outcomes] == [10, 11, 12, 13]
    assert b.batch_limit(jobs[0]) == 1


def test_out_of_memory_on_a_single_image_is_an_error_not_a_crash(
    tiny_models_dir: Path, worker: DeviceWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = backend(tiny_models_dir, worker)

    def always_oom(*args: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(DiffusersBackend, "_generate", always_oom)
    with pytest.raises(InferenceError, match="out of GPU memory"):
        generate(b, [job(0, seed=1)])
    # The worker thread survives and serves the next call.
    monkeypatch.undo()
    assert isinstance(generate(b, [job(0, seed=1)])[0], GeneratedImage)


def test_batch_limit_shrinks_with_image_size(tiny_models_dir: Path, worker: DeviceWorker) -> None:
    b = backend(tiny_models_dir, worker, max_batch_size=8, max_batch_pixels=1024 * 1024 * 2)
    assert b.batch_limit(job(0, 1, 256, 256)) == 8
    assert b.batch_limit(job(0, 1, 1024, 1024)) == 2
    assert b.batch_limit(job(0, 1, 2048, 2048)) == 1


def test_batched_images_keep_their_seeds_and_match_solo_runs(
    tiny_models_dir: Path, worker: DeviceWorker
) -> None:
    b = backend(tiny_models_dir, worker)
    jobs = [job(i, seed=100 + i) for i in range(3)]
    batched = generate(b, jobs)
    alone = [generate(b, [j])[0] for j in jobs]
    for together, solo in zip(batched, alone, strict=True):
        # Kernels reassociate sums differently per batch size: at most a level or two apart.
        assert np.abs(pixels(together) - pixels(solo)).max() <= 2
    assert np.abs(pixels(batched[0]) - pixels(batched[1])).mean() > 5


def test_batch_invariant_models_give_identical_pixels_batched_or_alone(
    tiny_models_dir: Path, worker: DeviceWorker
) -> None:
    b = backend(tiny_models_dir, worker, batch_invariant=True)
    jobs = [job(i, seed=200 + i) for i in range(3)]
    batched = generate(b, jobs)
    alone = [generate(b, [j])[0] for j in reversed(jobs)][::-1]
    for together, solo in zip(batched, alone, strict=True):
        assert np.array_equal(pixels(together), pixels(solo))


def test_loading_a_second_model_past_the_budget_unloads_the_first(tiny_models_dir: Path) -> None:
    worker = DeviceWorker("cpu", budget_bytes=1)
    try:
        first = backend(tiny_models_dir, worker)
        registry = ModelRegistry.load(None)
        entry = registry.resolve(TINY_AIR).target
        second_entry = type(entry)(**{**entry.__dict__, "air": "test:second@1"})
        second = DiffusersBackend(second_entry, tiny_models_dir / "impasto-tiny", [worker], 4)
        generate(first, [job(0, 1)])
        assert worker.models.resident() == [TINY_AIR]
        generate(second, [job(0, 1)])
        assert worker.models.resident() == ["test:second@1"]
        assert first._replicas == {}
        # Using the first again reloads it and evicts the second.
        assert isinstance(generate(first, [job(0, 1)])[0], GeneratedImage)
        assert worker.models.resident() == [TINY_AIR]
    finally:
        worker.shutdown()


@pytest.mark.parametrize(
    ("name", "cls", "config"),
    [
        ("Euler", "EulerDiscreteScheduler", {}),
        ("Euler a", "EulerAncestralDiscreteScheduler", {}),
        ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
        ("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
        ("UniPC", "UniPCMultistepScheduler", {}),
        ("LCM", "LCMScheduler", {}),
        ("DDIM", "DDIMScheduler", {}),
        ("UniPCMultistepScheduler", "UniPCMultistepScheduler", {}),
    ],
)
def test_runware_scheduler_names_map_to_diffusers_schedulers(
    name: str, cls: str, config: dict[str, Any], tiny_models_dir: Path, worker: DeviceWorker
) -> None:
    assert resolve_scheduler(name) == (cls, config)
    b = backend(tiny_models_dir, worker)
    outcome = generate(b, [job(0, seed=5, scheduler=name)])[0]
    assert isinstance(outcome, GeneratedImage)
    replica = next(iter(b._replicas.values()))
    used = replica.schedulers[name]
    assert type(used).__name__ == cls
    for key, value in config.items():
        assert used.config[key] == value


def test_default_scheduler_and_unknown_names() -> None:
    assert resolve_scheduler("Default") is None
    with pytest.raises(KeyError):
        resolve_scheduler("Warp Drive")
    assert set(SCHEDULERS) <= set(known_schedulers())


def test_a_scheduler_the_model_cannot_use_fails_the_job_with_invalid_scheduler(
    tiny_models_dir: Path, worker: DeviceWorker
) -> None:
    b = backend(tiny_models_dir, worker)
    with pytest.raises(ImpastoError) as caught:
        generate(b, [job(0, seed=5, scheduler="FlowMatch Euler")])
    assert caught.value.code == "invalidScheduler"


def test_a_new_models_download_does_not_stall_another_model_on_the_same_device(
    tiny_models_dir: Path, worker: DeviceWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first use of a hub model downloads its weights in a thread of its own, not on the
    device thread: a model already there keeps generating meanwhile, and the download is
    awaited once however many calls wait for it."""
    import threading

    import diffusers

    downloading = threading.Event()
    release = threading.Event()
    downloads: list[str] = []

    def slow_download(name: str, **kwargs: Any) -> str:
        downloads.append(name)
        downloading.set()
        assert release.wait(30), "the test never released the download"
        return str(tiny_models_dir / "impasto-tiny")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "download", slow_download)
    served = backend(tiny_models_dir, worker)
    entry = ModelRegistry.load(None).resolve(TINY_AIR).target
    hub = DiffusersBackend(entry, "example/not-yet-downloaded", [worker], max_batch_size=4)

    async def run() -> None:
        def nothing(jobs: Any, percent: int) -> None:
            return None

        first = asyncio.create_task(hub.generate([job(0, seed=1)], nothing, _no_checkpoint))
        second = asyncio.create_task(hub.generate([job(1, seed=2)], nothing, _no_checkpoint))
        assert await asyncio.to_thread(downloading.wait, 30)
        # The device thread is free: the model it has generates while the download runs.
        (outcome,) = await served.generate([job(2, seed=3)], nothing, _no_checkpoint)
        assert isinstance(outcome, GeneratedImage)
        assert not first.done()
        assert not second.done()
        release.set()
        for outcome in (*(await first), *(await second)):
            assert isinstance(outcome, GeneratedImage)

    try:
        asyncio.run(run())
    finally:
        release.set()
    assert downloads == ["example/not-yet-downloaded"]
