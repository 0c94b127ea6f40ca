"""Usage metering with a real SQLite state and ledger: every stored image is recorded once
with its task's key, model, size and cost (also without includeCost); a re-run of the same
generation records nothing more; a ledger that is away is retried, then given up on without
failing the image. Per-key metrics keep a bounded number of label values."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from PIL import Image

from impasto.backends.base import GeneratedImage, GenerationJob
from impasto.backends.registry import ModelRegistry
from impasto.protocol.errors import ServiceUnavailable
from impasto.protocol.parsing import parse_task
from impasto.protocol.tasks import ImageInferenceIn
from impasto.service.completion import TaskCompletion
from impasto.service.metrics import OTHER_KEYS, Metrics
from impasto.service.outcomes import OutcomeRecorder
from impasto.service.safety import UnavailableSafety
from impasto.service.usage import UsageMeter
from impasto.state.records import TaskRecord
from impasto.state.sqlite import SqliteStateStore
from impasto.tenancy.keys import UsageRecord, UsageTotals
from impasto.tenancy.sqlite_store import SqliteTenancyStore
from tests.fakes import FakeEventBus, FakeImageStore, RecordingSleep

MODEL = "impasto:tiny@1"


@dataclass
class Rig:
    state: SqliteStateStore
    ledger: SqliteTenancyStore
    recorder: OutcomeRecorder
    metrics: Metrics
    registry: ModelRegistry

    async def accept(self, extra: dict[str, Any], **fields: Any) -> ImageInferenceIn:
        raw = {
            "taskType": "imageInference",
            "taskUUID": str(uuid.uuid4()),
            "model": MODEL,
            "positivePrompt": "a lighthouse at dusk",
            "width": 64,
            "height": 64,
            **fields,
        }
        task = cast(ImageInferenceIn, parse_task(raw))
        await self.state.create_task(
            TaskRecord(task.taskUUID, "imageInference", raw, task.numberResults, 0.0, extra=extra)
        )
        return task

    async def store(self, task: ImageInferenceIn, index: int = 0) -> None:
        job = GenerationJob(task.taskUUID, index, MODEL, task.positivePrompt, 64, 64, seed=7)
        image = GeneratedImage(Image.new("RGB", (64, 64), "teal"), seed=7)
        await self.recorder.record(task, self.registry.resolve(MODEL), job, image)


@asynccontextmanager
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    state = SqliteStateStore(tmp_path / "state.db")
    await state.open()
    ledger = SqliteTenancyStore(tmp_path / "state.db")
    await ledger.open()
    metrics = Metrics(max_key_labels=2)
    try:
        with ThreadPoolExecutor(1) as pool:
            recorder = OutcomeRecorder(
                state=state,
                images=FakeImageStore(),
                completion=TaskCompletion(state, FakeEventBus(), lambda: None),
                safety=UnavailableSafety(),
                encode_pool=pool,
                image_base_url="http://127.0.0.1:1",
                output_retention_s=3600,
                wake_outbox=lambda: None,
                meter=UsageMeter(state, ledger, metrics),
            )
            yield Rig(state, ledger, recorder, metrics, ModelRegistry.load(None))
    finally:
        await ledger.close()
        await state.close()


KEY_A = {"owner": "a" * 64, "keyId": "key_a", "keyName": "team-a"}


def test_each_stored_image_is_metered_once_with_its_key_model_size_and_cost(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with rig(tmp_path) as r:
            task = await r.accept(KEY_A, numberResults=2)
            await r.store(task, 0)
            await r.store(task, 1)
            # A re-run of generation 0 (a worker that took a lapsed job) stores nothing new.
            await r.store(task, 0)
            records = await r.ledger.task_usage(task.taskUUID)
            price = r.registry.resolve(MODEL).rules.price.cost((64, 64))
            assert [(u.index, u.key_id, u.key_name, u.model) for u in records] == [
                (0, "key_a", "team-a", MODEL),
                (1, "key_a", "team-a", MODEL),
            ]
            assert {(u.width, u.height) for u in records} == {(64, 64)}
            # Metered although the task did not ask for includeCost.
            assert [u.cost for u in records] == [price, price]
            (totals,) = await r.ledger.usage_totals()
            assert (totals.images, totals.cost) == (2, pytest.approx(2 * price))
            assert r.metrics.key_images.labels("team-a")._value.get() == 2

    asyncio.run(scenario())


def test_a_task_of_an_open_server_is_metered_to_nobody(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with rig(tmp_path) as r:
            task = await r.accept({})
            await r.store(task)
            (record,) = await r.ledger.task_usage(task.taskUUID)
            assert (record.key_id, record.key_name) == ("", "(open)")

    asyncio.run(scenario())


class AwayLedger:
    """A ledger that is unavailable `failures` times, then records."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.recorded: list[UsageRecord] = []

    async def record_usage(self, records: Sequence[UsageRecord]) -> None:
        if self.failures:
            self.failures -= 1
            raise ServiceUnavailable("the usage ledger is away")
        self.recorded.extend(records)

    async def usage_totals(
        self, *, key_ids: Sequence[str] = (), since: float | None = None
    ) -> list[UsageTotals]:
        return []

    async def task_usage(self, task_uuid: str) -> list[UsageRecord]:
        return []


class NoTasks:
    async def get_task(self, task_uuid: str) -> None:
        return None


def test_a_ledger_away_for_a_while_is_retried_then_given_up_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        sleep = RecordingSleep()
        ledger = AwayLedger(failures=2)
        meter = UsageMeter(NoTasks(), ledger, attempts=3, sleep=sleep)  # type: ignore[arg-type]
        await meter.image_stored("t", 0, MODEL, 64, 64, 0.1)
        assert len(ledger.recorded) == 1
        assert sleep.delays == [0.5, 1.0]
        ledger.failures = 10
        await meter.image_stored("t", 1, MODEL, 64, 64, 0.1)
        assert len(ledger.recorded) == 1
        assert "usage of image 1 of task t not recorded" in caplog.text

    asyncio.run(scenario())


def test_per_key_metric_labels_are_bounded() -> None:
    metrics = Metrics(max_key_labels=2)
    assert [metrics.key_label(n) for n in ("a", "b", "c", "a", "d")] == [
        "a",
        "b",
        OTHER_KEYS,
        "a",
        OTHER_KEYS,
    ]
    for name in ("a", "b", "c", "d"):
        metrics.observe_image(name, 0.5)
    text = metrics.render().decode()
    assert 'impasto_key_images_total{key="(other)"} 2.0' in text
    assert 'impasto_key_cost_total{key="a"} 0.5' in text
