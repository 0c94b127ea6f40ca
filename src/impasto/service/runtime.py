"""The Runtime: every long-lived component of a server process, built from Settings and torn
down in reverse order. The API's lifespan owns one."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from impasto.backends.base import Backend
from impasto.backends.devices import DevicePool
from impasto.backends.factory import BackendContext, create_backend
from impasto.backends.registry import ModelRegistry
from impasto.delivery.outbound import OutboundClient, OutboundGuard
from impasto.engine.scheduler import Scheduler
from impasto.protocol.errors import TaskInterrupted
from impasto.service.dispatcher import Authenticator, TaskDispatcher
from impasto.service.images import ImageResolver
from impasto.service.inference import InferenceService
from impasto.service.responses import ResponseService
from impasto.service.safety import UnavailableSafety
from impasto.service.uploads import UploadService
from impasto.settings import Settings
from impasto.state.base import EventBus, StateStore
from impasto.state.events import LocalEventBus
from impasto.state.records import ResultRecord
from impasto.state.sqlite import SqliteStateStore
from impasto.storage.base import ImageStore
from impasto.storage.local import LocalImageStore
from impasto.storage.sweeper import Sweeper

log = logging.getLogger("impasto.runtime")


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
    started_at: float

    @classmethod
    @asynccontextmanager
    async def start(cls, settings: Settings) -> AsyncIterator[Runtime]:
        registry = ModelRegistry.load(settings.models)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        state = SqliteStateStore(settings.state_path)
        await state.open()
        bus = LocalEventBus()
        images = LocalImageStore(settings.images_dir)
        outbound = OutboundClient.create(OutboundGuard(settings.allow_private_networks))
        devices = DevicePool(settings.devices)
        context = BackendContext(
            models_dir=settings.models_dir,
            devices=devices,
            max_batch_size=settings.max_batch_size,
            outbound=outbound,
        )

        async def load_backend(air: str) -> Backend:
            entry = registry.resolve(air).target
            return await asyncio.to_thread(create_backend, entry, context)

        scheduler = Scheduler(load_backend, batch_wait_s=settings.batch_wait_ms / 1000)
        encode_pool = ThreadPoolExecutor(settings.encode_threads, thread_name_prefix="impasto-enc")
        resolver = ImageResolver(
            state,
            images,
            outbound,
            max_bytes=settings.max_fetch_bytes,
            max_pixels=settings.max_image_pixels,
            fetch_timeout_s=settings.fetch_timeout_s,
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
            safety=UnavailableSafety(),
        )
        uploads = UploadService(
            state=state,
            images=images,
            resolver=resolver,
            image_base_url=settings.image_base_url,
            max_side=settings.upload_max_side,
            retention_s=settings.upload_retention_s,
        )
        dispatcher = TaskDispatcher(
            auth=Authenticator(settings.api_keys),
            bus=bus,
            inference=inference,
            uploads=uploads,
            responses=ResponseService(state),
            sync_timeout_s=settings.sync_timeout_s,
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
            started_at=time.time(),
        )
        await runtime._recover()
        sweep_task = asyncio.create_task(sweeper.run(), name="sweeper")
        try:
            yield runtime
        finally:
            sweep_task.cancel()
            await asyncio.gather(sweep_task, return_exceptions=True)
            await scheduler.close()
            encode_pool.shutdown(wait=True)
            devices.shutdown()
            await outbound.aclose()
            await state.close()

    async def _recover(self) -> None:
        """Tasks left processing by a previous process end with a clear error."""
        for task in await self.state.unfinished_tasks():
            done = {r.index for r in await self.state.results(task.task_uuid)}
            error = TaskInterrupted(
                "The server stopped while this task was running; submit it again with a new "
                "taskUUID.",
                task_type=task.task_type,
                task_uuid=task.task_uuid,
            ).to_item()
            now = time.time()
            for index in range(task.expected):
                if index not in done:
                    await self.state.add_result(
                        ResultRecord(task.task_uuid, index, "error", error, now)
                    )
            await self.state.finish_task(task.task_uuid, "error", error, now)
            log.warning("task %s was interrupted by a restart", task.task_uuid)
