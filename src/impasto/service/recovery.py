"""Running an accepted task again: after a restart (the generations not stored yet), or on a
worker of a distributed deployment (the generations it took from the queue). Inputs come from
the image store, where acceptance put them; seeds and backend checkpoints from the task."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence

from impasto.backends.base import GenerationJob
from impasto.backends.registry import ResolvedModel
from impasto.protocol.errors import ImpastoError
from impasto.protocol.tasks import ImageInferenceIn
from impasto.service.completion import TaskCompletion
from impasto.service.images import ImageResolver
from impasto.service.jobs import LocalRunner, seeds_for
from impasto.service.outcomes import StoredCallback
from impasto.service.task_images import TaskImages, resolve_slots, slots_of, task_images
from impasto.state.base import QueuedJob, StateStore
from impasto.state.records import TaskRecord

log = logging.getLogger("impasto.recovery")

TASK_TYPE = "imageInference"

JobDone = Callable[[QueuedJob], Awaitable[None]]
Validate = Callable[[ImageInferenceIn], ResolvedModel]
# Runs an accepted task of another type (a utility task) to its end.
OtherTasks = Callable[[TaskRecord], Awaitable[None]]


class TaskRecovery:
    """Re-runs what an accepted task still lacks."""

    def __init__(
        self,
        *,
        state: StateStore,
        resolver: ImageResolver,
        completion: TaskCompletion,
        runner: LocalRunner,
        validate: Validate,
        others: OtherTasks | None = None,
    ) -> None:
        self._state = state
        self._resolver = resolver
        self._completion = completion
        self._runner = runner
        self._validate = validate
        self._others = others

    async def resume(self, record: TaskRecord) -> None:
        """After a restart: re-run the generations of an accepted task that were not stored."""
        await self.rerun(record, range(record.expected))

    async def execute(self, queued: Sequence[QueuedJob], done: JobDone) -> None:
        """Worker side of a JobQueue: run queued generations of one task; `done(job)` is
        awaited once each one's outcome is stored (or was already)."""
        task_uuid = queued[0].task_uuid
        record = await self._state.get_task(task_uuid)
        if record is None:
            # Swept or never stored: nothing to run, nothing to keep.
            for job in queued:
                await done(job)
            return
        if record.task_type != TASK_TYPE and self._others is not None:
            await self._others(record)
            for job in queued:
                await done(job)
            return
        by_index = {job.index: job for job in queued}

        async def stored(job: GenerationJob) -> None:
            await done(by_index[job.index])

        await self.rerun(record, sorted(by_index), stored)

    async def rerun(
        self, record: TaskRecord, indices: Iterable[int], after: StoredCallback | None = None
    ) -> None:
        """Run the generations `indices` of an accepted task that are not stored yet, with
        their original seeds and any backend checkpoint (e.g. a provider's task id)."""
        done = {r.index for r in await self._state.results(record.task_uuid)}
        wanted = list(indices)
        missing = [i for i in wanted if i not in done]
        if after is not None:
            for index in wanted:
                if index in done:
                    await after(_placeholder(record, index))
        try:
            task = ImageInferenceIn.model_validate(record.request)
            resolved = self._validate(task)
            images = await self._images(record, task) if missing else TaskImages()
        except ImpastoError as exc:
            await self._completion.fail_missing(
                record.task_uuid, missing, exc.for_task(TASK_TYPE, record.task_uuid)
            )
            if after is not None:
                for index in missing:
                    await after(_placeholder(record, index))
            return
        if not missing:
            await self._completion.maybe_finish(record.task_uuid)
            return
        seeds = list(record.extra.get("seeds") or seeds_for(task.seed, task.numberResults))
        resume = {
            i: record.extra[f"job{i}"]
            for i in missing
            if isinstance(record.extra.get(f"job{i}"), dict)
        }
        log.info("running task %s again: %d generation(s)", record.task_uuid, len(missing))
        await self._runner.run(task, resolved, images, seeds, missing, resume, after)

    async def _images(self, record: TaskRecord, task: ImageInferenceIn) -> TaskImages:
        """The task's input images, from the image store (stored at acceptance)."""
        slots = slots_of(task)
        inputs = await resolve_slots(self._resolver, slots)
        kept = record.extra.get("references") or []
        urls = [
            kept[i].get("sourceURL") if i < len(kept) and isinstance(kept[i], dict) else None
            for i in range(len(inputs))
        ]
        return task_images(task, slots, inputs, urls)


def _placeholder(record: TaskRecord, index: int) -> GenerationJob:
    """A job identity for callbacks about a generation that will not run here."""
    return GenerationJob(
        task_uuid=record.task_uuid,
        index=index,
        model=record.model or "",
        prompt="",
        width=0,
        height=0,
        seed=0,
    )
