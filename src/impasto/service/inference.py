"""imageInference, assembled from its parts:

    acceptance   validate, store inputs, create the task, hand its generations on
    jobs         seeds and generation jobs; running them on the local scheduler
    outcomes     safety check, encode, store and record each finished generation
    completion   the task state machine: finish, follow, upload failures
    recovery     re-run what an accepted task lacks (after a restart, on a worker)

The dispatcher, the worker and the runtime talk to this facade only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Executor

from impasto.backends.registry import ModelRegistry, ResolvedModel
from impasto.delivery.outbound import OutboundGuard
from impasto.engine.scheduler import Scheduler
from impasto.protocol.errors import ImpastoError
from impasto.protocol.tasks import ImageInferenceIn
from impasto.service.acceptance import TaskAcceptance
from impasto.service.completion import TaskCompletion
from impasto.service.images import ImageResolver
from impasto.service.jobs import LocalRunner
from impasto.service.outcomes import OutcomeRecorder
from impasto.service.recovery import JobDone, OtherTasks, TaskRecovery
from impasto.service.safety import ContentSafety
from impasto.service.usage import UsageMeter
from impasto.state.base import EventBus, JobQueue, QueuedJob, StateStore, Subscription
from impasto.state.records import DeliveryRecord, ResultRecord, TaskRecord
from impasto.storage.base import ImageStore
from impasto.tenancy.keys import Principal


class InferenceService:
    """Accepts imageInference tasks and turns the engine's outcomes into stored result items."""

    def __init__(
        self,
        *,
        registry: ModelRegistry,
        state: StateStore,
        bus: EventBus,
        images: ImageStore,
        resolver: ImageResolver,
        scheduler: Scheduler,
        encode_pool: Executor,
        image_base_url: str,
        output_retention_s: int,
        input_retention_s: int,
        safety: ContentSafety,
        guard: OutboundGuard,
        wake_outbox: Callable[[], None],
        unavailable: Mapping[str, ImpastoError] | None = None,
        queue: JobQueue | None = None,
        max_queued: int | None = None,
        meter: UsageMeter | None = None,
        others: OtherTasks | None = None,
    ) -> None:
        self.completion = TaskCompletion(state, bus, wake_outbox)
        self.recorder = OutcomeRecorder(
            state=state,
            images=images,
            completion=self.completion,
            safety=safety,
            encode_pool=encode_pool,
            image_base_url=image_base_url,
            output_retention_s=output_retention_s,
            wake_outbox=wake_outbox,
            meter=meter,
        )
        runner = LocalRunner(scheduler, self.recorder, state)
        self.acceptance = TaskAcceptance(
            registry=registry,
            state=state,
            images=images,
            resolver=resolver,
            safety=safety,
            guard=guard,
            completion=self.completion,
            runner=runner,
            scheduler_depth=scheduler.queued,
            input_retention_s=input_retention_s,
            unavailable=unavailable,
            queue=queue,
            max_queued=max_queued,
        )
        self.recovery = TaskRecovery(
            state=state,
            resolver=resolver,
            completion=self.completion,
            runner=runner,
            validate=self.acceptance.validate,
            others=others,
        )

    def validate(self, task: ImageInferenceIn) -> ResolvedModel:
        return self.acceptance.validate(task)

    async def submit(self, task: ImageInferenceIn, principal: Principal | None = None) -> None:
        await self.acceptance.submit(task, principal)

    async def resume(self, record: TaskRecord) -> None:
        await self.recovery.resume(record)

    async def execute(self, queued: Sequence[QueuedJob], done: JobDone) -> None:
        await self.recovery.execute(queued, done)

    async def maybe_finish(self, task_uuid: str) -> None:
        await self.completion.maybe_finish(task_uuid)

    async def fail_missing(self, task_uuid: str, indices: list[int], error: ImpastoError) -> None:
        await self.completion.fail_missing(task_uuid, indices, error)

    async def upload_failures(self, task_uuid: str) -> list[ImpastoError]:
        return await self.completion.upload_failures(task_uuid)

    async def on_delivery_settled(self, delivery: DeliveryRecord, ok: bool) -> None:
        await self.completion.on_delivery_settled(delivery, ok)

    def follow(
        self, task_uuid: str, subscription: Subscription, timeout: float
    ) -> AsyncIterator[ResultRecord]:
        return self.completion.follow(task_uuid, subscription, timeout)
