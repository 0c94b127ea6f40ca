"""The Runtime: every long-lived component of a process, built from Settings and torn down in
reverse order. The API's lifespan owns one; so does `impasto worker`.

Roles:
- one process (`impasto serve`, SQLite state): the API runs the models itself;
- API node (`impasto serve --state redis://…`): stateless, queues generation jobs;
- worker (`impasto worker --state redis://… --model AIR`): runs queued jobs, stores outcomes.
Every role sends the webhooks and uploads it finds due (leases keep them from doubling) and
sweeps expired images.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from impasto.backends.base import Backend
from impasto.backends.devices import DevicePool
from impasto.backends.factory import (
    BackendContext,
    RunwayOptions,
    create_backend,
    models_without_keys,
    unavailable_models,
)
from impasto.backends.registry import ModelRegistry
from impasto.backends.utility.base import UtilityModel
from impasto.backends.utility.factory import create_utility_model
from impasto.delivery.outbound import OutboundClient, OutboundGuard
from impasto.delivery.outbox import Outbox, RetryPolicy, SettledCallback
from impasto.engine.scheduler import Scheduler
from impasto.engine.utility import UtilityEngine
from impasto.protocol.errors import TaskInterrupted
from impasto.protocol.utility_tasks import UTILITY_TASK_TYPES
from impasto.service.account import AccountService
from impasto.service.completion import TaskCompletion
from impasto.service.dispatcher import TaskDispatcher
from impasto.service.images import ImageResolver
from impasto.service.inference import InferenceService
from impasto.service.metrics import Metrics
from impasto.service.models import ModelSearchService
from impasto.service.preload import Preloader
from impasto.service.preprocess import PreprocessService
from impasto.service.responses import ResponseService
from impasto.service.safety import load_content_safety
from impasto.service.sessions import SessionRegistry
from impasto.service.stores import SharedStores, shared_stores
from impasto.service.supervisor import Supervisor
from impasto.service.uploads import UploadService
from impasto.service.usage import UsageMeter
from impasto.service.utility_outcomes import UtilityOutcomes
from impasto.service.utility_tasks import UtilityDefaults, UtilityService
from impasto.service.worker import Worker
from impasto.settings import Settings
from impasto.state.base import EventBus, StateStore
from impasto.state.records import DeliveryRecord, ResultRecord
from impasto.storage.base import ImageStore
from impasto.storage.sweeper import Sweeper
from impasto.tenancy.directory import KeyDirectory
from impasto.tenancy.quotas import QuotaGate

log = logging.getLogger("impasto.runtime")


def _counted(settled: SettledCallback, metrics: Metrics) -> SettledCallback:
    async def callback(delivery: DeliveryRecord, ok: bool) -> None:
        metrics.deliveries.labels(delivery.kind, "done" if ok else "failed").inc()
        await settled(delivery, ok)

    return callback


Role = Literal["single", "api", "worker"]


@dataclass
class Runtime:
    """Handles to the components; built by `Runtime.start`."""

    settings: Settings
    registry: ModelRegistry
    state: StateStore
    bus: EventBus
    images: ImageStore
    outbound: OutboundClient
    scheduler: Scheduler
    dispatcher: TaskDispatcher
    inference: InferenceService
    sweeper: Sweeper
    sessions: SessionRegistry
    metrics: Metrics
    supervisor: Supervisor
    outbox: Outbox
    started_at: float
    preload: Preloader
    utility: UtilityService
    role: Role = "single"
    worker: Worker | None = None

    def liveness_problems(self) -> list[str]:
        """What a restart of this process would fix: a background loop that is down or stuck.
        Dependencies (the state store, the event bus) and loading models are readiness, not
        liveness: restarting does not bring Redis back."""
        found = self.supervisor.problems()
        # Running but stuck (a pass that never returns) is down too; before its first pass
        # the loop is starting, not stuck.
        if self.outbox.last_pass_at is not None and not self.outbox.alive():
            found.append("the outbox loop has stopped making progress")
        if self.worker is not None:
            found.extend(self.worker.problems())
        return found

    async def readiness(self) -> dict[str, list[str]]:
        """Each check of /readyz with its problems (empty: passing)."""
        checks: dict[str, list[str]] = {"loops": self.liveness_problems()}
        try:
            await self.state.ping()
            checks["state"] = []
        except Exception as exc:
            reason = getattr(exc, "message", type(exc).__name__)
            checks["state"] = [f"state store unavailable: {reason}"]
        checks["events"] = [] if self.bus.healthy else ["event bus is not connected"]
        checks["storage"] = self.inference.recorder.problems()
        checks["models"] = self.preload.problems()
        return checks

    async def problems(self) -> list[str]:
        """Why this process cannot do its job right now (every failing readiness check)."""
        return [line for lines in (await self.readiness()).values() for line in lines]

    @classmethod
    @asynccontextmanager
    async def start(cls, settings: Settings, role: Role | None = None) -> AsyncIterator[Runtime]:
        role = role or ("api" if settings.distributed else "single")
        registry = ModelRegistry.load(settings.models)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        async with (
            shared_stores(settings) as stores,
            cls._start(settings, role, registry, stores) as runtime,
        ):
            yield runtime

    @classmethod
    @asynccontextmanager
    async def _start(
        cls,
        settings: Settings,
        role: Role,
        registry: ModelRegistry,
        stores: SharedStores,
    ) -> AsyncIterator[Runtime]:
        state, bus, queue, images = stores.state, stores.bus, stores.queue, stores.images
        guard = OutboundGuard(settings.allow_private_networks)
        outbound = OutboundClient.create(guard)
        devices = DevicePool(settings.devices, settings.vram_budget_gb, settings.torch_threads)
        runway_key = settings.runway_api_secret
        context = BackendContext(
            models_dir=settings.models_dir,
            devices=devices,
            max_batch_size=settings.max_batch_size,
            outbound=outbound,
            offline=settings.offline,
            registry=registry,
            provider_keys={"runway": runway_key.get_secret_value()} if runway_key else {},
            provider_urls={"runway": settings.runway_base_url},
            runway=RunwayOptions(
                poll_interval_s=settings.runway_poll_interval_s,
                concurrency=settings.runway_concurrency,
                request_timeout_s=settings.runway_request_timeout_s,
                task_timeout_s=settings.runway_task_timeout_s,
            ),
        )
        unconfigured = models_without_keys(registry, context)
        if unconfigured:
            log.warning(
                "%s served by Runway, but no Runway API key is set (RUNWAYML_API_SECRET); "
                "tasks for them fail with providerNotConfigured",
                ", ".join(unconfigured),
            )

        async def load_backend(air: str) -> Backend:
            entry = registry.resolve(air).target
            return await asyncio.to_thread(create_backend, entry, context)

        metrics = Metrics(max_key_labels=settings.metrics_max_keys)
        scheduler = Scheduler(
            load_backend,
            batch_wait_s=settings.batch_wait_ms / 1000,
            observe=metrics.observe_batch,
        )
        encode_pool = ThreadPoolExecutor(settings.encode_threads, thread_name_prefix="impasto-enc")
        resolver = ImageResolver(
            state,
            images,
            outbound,
            max_bytes=settings.max_fetch_bytes,
            max_pixels=settings.max_image_pixels,
            fetch_timeout_s=settings.fetch_timeout_s,
            private=settings.private_images,
        )
        # The outbox's wake-up, made first: inference queues deliveries and wakes the outbox,
        # the outbox reports settled uploads back to inference.
        outbox_wakeup = asyncio.Event()
        meter = UsageMeter(state, stores.tenancy, metrics)
        unavailable = unavailable_models(registry, context)
        # Stored inputs outlive any re-run of their task.
        input_retention_s = settings.task_retention_s + settings.output_retention_s

        async def load_utility(air: str) -> UtilityModel:
            entry = registry.resolve(air).target
            return await asyncio.to_thread(create_utility_model, entry, context)

        utility_engine = UtilityEngine(load_utility)
        utility_completion = TaskCompletion(state, bus, outbox_wakeup.set)
        utility = UtilityService(
            registry=registry,
            state=state,
            images=images,
            resolver=resolver,
            engine=utility_engine,
            completion=utility_completion,
            outcomes=UtilityOutcomes(
                state=state,
                images=images,
                completion=utility_completion,
                image_base_url=settings.image_base_url,
                output_retention_s=settings.output_retention_s,
                wake_outbox=outbox_wakeup.set,
                meter=meter,
            ),
            guard=guard,
            defaults=UtilityDefaults(
                models={
                    "upscale": settings.upscale_model,
                    "removeBackground": settings.remove_background_model,
                    "caption": settings.caption_model,
                    "promptEnhance": settings.prompt_enhance_model,
                },
                upscale_max_side=settings.upscale_max_side,
            ),
            input_retention_s=input_retention_s,
            unavailable=unavailable,
            queue=queue if role == "api" else None,
        )
        inference = InferenceService(
            registry=registry,
            state=state,
            bus=bus,
            images=images,
            resolver=resolver,
            scheduler=scheduler,
            encode_pool=encode_pool,
            image_base_url=settings.image_base_url,
            output_retention_s=settings.output_retention_s,
            input_retention_s=input_retention_s,
            safety=await load_content_safety(settings),
            guard=guard,
            wake_outbox=outbox_wakeup.set,
            unavailable=unavailable,
            queue=queue if role == "api" else None,
            max_queued=settings.max_queued_images,
            meter=meter,
            others=utility.run,
        )
        outbox = Outbox(
            state,
            images,
            outbound,
            policy=RetryPolicy(
                max_attempts=settings.delivery_max_attempts,
                base_delay_s=settings.delivery_base_delay_s,
                max_delay_s=settings.delivery_max_delay_s,
                budget_s=settings.delivery_budget_s,
                connect_timeout_s=settings.delivery_connect_timeout_s,
                webhook_read_timeout_s=settings.webhook_read_timeout_s,
                upload_read_timeout_s=settings.upload_read_timeout_s,
            ),
            secret=settings.webhook_secret,
            on_settled=_counted(inference.on_delivery_settled, metrics),
            # Other processes queue deliveries too: look for due ones at least every second.
            poll_interval_s=1.0 if role != "single" else None,
            wakeup=outbox_wakeup,
        )
        uploads = UploadService(
            state=state,
            images=images,
            resolver=resolver,
            image_base_url=settings.image_base_url,
            max_side=settings.upload_max_side,
            retention_s=settings.upload_retention_s,
        )
        preprocess = PreprocessService(
            state=state,
            images=images,
            resolver=resolver,
            uploads=uploads,
            image_base_url=settings.image_base_url,
            output_retention_s=settings.output_retention_s,
        )
        directory = KeyDirectory(
            settings.api_keys,
            stores.tenancy,
            stores.limiter,
            failures_per_minute=settings.auth_failures_per_minute,
            refresh_s=settings.key_refresh_s,
        )
        await directory.refresh()
        dispatcher = TaskDispatcher(
            auth=directory,
            bus=bus,
            inference=inference,
            uploads=uploads,
            responses=ResponseService(state),
            models=ModelSearchService(registry),
            sync_timeout_s=settings.sync_timeout_s,
            max_tasks=settings.max_tasks_per_request,
            metrics=metrics,
            preprocess=preprocess,
            quotas=QuotaGate(stores.limiter, state),
            account=AccountService(state, stores.tenancy, stores.tenancy),
            utility=utility,
        )
        sweeper = Sweeper(
            state,
            images,
            interval_s=settings.sweep_interval_s,
            task_retention_s=settings.task_retention_s,
        )
        runtime = cls(
            settings=settings,
            registry=registry,
            state=state,
            bus=bus,
            images=images,
            outbound=outbound,
            scheduler=scheduler,
            dispatcher=dispatcher,
            inference=inference,
            sweeper=sweeper,
            sessions=SessionRegistry(
                ttl_s=settings.ws_session_ttl_s,
                max_buffered_bytes=settings.ws_session_buffer_bytes,
                max_sessions=settings.ws_max_sessions,
            ),
            metrics=metrics,
            supervisor=Supervisor(),
            outbox=outbox,
            preload=Preloader(
                scheduler, [registry.resolve(a).target.air for a in settings.preload]
            ),
            started_at=time.time(),
            utility=utility,
            role=role,
        )
        if role == "worker":
            assert queue is not None
            airs = sorted({registry.resolve(air).target.air for air in settings.worker_models})
            runtime.worker = Worker(
                queue,
                inference,
                state,
                airs,
                prefetch=settings.worker_prefetch,
                lease_s=settings.worker_lease_s,
                max_deliveries=settings.worker_max_deliveries,
            )
            log.info("worker serving %s", ", ".join(airs))
        metrics.track(scheduler.queued, lambda: len(runtime.sessions))
        directory.on_revoked(runtime.sessions.revoke)
        if role == "single":
            # Distributed jobs are not lost with a process: the queue's leases hand them on.
            await runtime._recover()
        runtime.supervisor.start("sweeper", sweeper.run)
        runtime.supervisor.start("outbox", outbox.run)
        runtime.supervisor.start("sessions", runtime.sessions.run)
        runtime.supervisor.start("keys", directory.run)
        # In the background: /healthz answers (and /readyz says what is loading) meanwhile,
        # and tasks for a model being loaded wait for it in its queue.
        preloading = asyncio.create_task(runtime.preload.run())
        try:
            yield runtime
        finally:
            preloading.cancel()
            await asyncio.gather(preloading, return_exceptions=True)
            await runtime.supervisor.close()
            runtime.sessions.close()
            await utility.close()
            await outbox.close()
            await scheduler.close()
            await utility_engine.close()
            encode_pool.shutdown(wait=True)
            devices.shutdown()
            await outbound.aclose()

    async def _recover(self) -> None:
        """Tasks a previous process left running: inference re-runs what was not stored;
        anything else ends with a clear error. Pending deliveries resume in the outbox."""
        for task in await self.state.unfinished_tasks():
            if task.task_type == "imageInference":
                await self.inference.resume(task)
                continue
            if task.task_type in UTILITY_TASK_TYPES:
                await self.utility.resume(task)
                continue
            error = TaskInterrupted(
                "The server stopped while this task was running; submit it again with a new "
                "taskUUID.",
                task_type=task.task_type,
                task_uuid=task.task_uuid,
            ).to_item()
            now = time.time()
            done = {r.index for r in await self.state.results(task.task_uuid)}
            for index in range(task.expected):
                if index not in done:
                    await self.state.add_result(
                        ResultRecord(task.task_uuid, index, "error", error, now)
                    )
            await self.state.finish_task(task.task_uuid, "error", error, now)
            log.warning("task %s was interrupted by a restart", task.task_uuid)
