"""The dispatcher: one array of tasks in, data items and error items out, whatever the transport.

Tasks of one request run concurrently; a bad task fails alone. Authentication comes from the
transport (a Bearer header) or from a leading `authentication` task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from impasto.logcontext import current_task
from impasto.protocol.account import AccountManagementIn, GetTaskDetailsIn
from impasto.protocol.errors import (
    AuthError,
    ImpastoError,
    InvalidParameter,
    SyncTimeout,
    TooManyTasks,
    http_status_for,
)
from impasto.protocol.parsing import TASK_MODELS, TaskIn, parse_task, task_context
from impasto.protocol.results import ack_item
from impasto.protocol.tasks import (
    AuthenticationIn,
    GetResponseIn,
    ImageInferenceIn,
    ImageUploadIn,
    ModelSearchIn,
    PingIn,
)
from impasto.protocol.utility import (
    ControlNetPreprocessIn,
    ImageControlNetPreProcessIn,
    MediaStorageIn,
)
from impasto.protocol.utility_tasks import (
    CaptionFields,
    PromptEnhanceIn,
    RemoveBackgroundFields,
    UpscaleFields,
    UtilityTaskIn,
)
from impasto.service.account import AccountService
from impasto.service.inference import InferenceService
from impasto.service.metrics import Metrics
from impasto.service.models import ModelSearchService
from impasto.service.preprocess import PreprocessService
from impasto.service.responses import ResponseService
from impasto.service.uploads import UploadService
from impasto.service.utility_tasks import UtilityService
from impasto.state.base import EventBus
from impasto.tenancy.directory import KeyDirectory
from impasto.tenancy.keys import ANONYMOUS, Principal
from impasto.tenancy.quotas import QuotaGate

log = logging.getLogger("impasto.dispatcher")

# The tasks a sync reply waits for, result by result.
StreamedIn = (
    ImageInferenceIn | UpscaleFields | RemoveBackgroundFields | CaptionFields | PromptEnhanceIn
)


def after_acceptance(error: ImpastoError) -> ImpastoError:
    """An error of a task that was accepted: its outcome, not a failed request.

    compat: runware-sdk's REST transport retries 408, 429 and 5xx with the same taskUUID,
    which can only earn conflictTaskUUID once the task exists; its outcome goes in a 200
    reply so the SDK reports the real cause (the same reasoning as syncTimeout's 202)."""
    if error.http_status != SyncTimeout.http_status:
        error.http_status = 200
    return error


@dataclass
class Envelope:
    """What one request produced: data items and errors, in task order."""

    data: list[dict[str, Any]] = field(default_factory=list)
    errors: list[ImpastoError] = field(default_factory=list)

    def extend(self, other: Envelope) -> None:
        self.data.extend(other.data)
        self.errors.extend(other.errors)

    @property
    def http_status(self) -> int:
        if self.data:
            return 200
        return http_status_for(self.errors)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.data or not self.errors:
            body["data"] = self.data
        if self.errors:
            body["errors"] = [e.to_item() for e in self.errors]
        return body


class TaskDispatcher:
    """Routes parsed tasks to their services."""

    def __init__(
        self,
        *,
        auth: KeyDirectory,
        bus: EventBus,
        inference: InferenceService,
        uploads: UploadService,
        responses: ResponseService,
        models: ModelSearchService,
        sync_timeout_s: float,
        max_tasks: int = 100,
        metrics: Metrics | None = None,
        preprocess: PreprocessService | None = None,
        quotas: QuotaGate | None = None,
        account: AccountService | None = None,
        utility: UtilityService | None = None,
    ) -> None:
        self.auth = auth
        self._quotas = quotas
        self._account = account
        self._utility = utility
        self._bus = bus
        self._inference = inference
        self._uploads = uploads
        self._preprocess = preprocess
        self._responses = responses
        self._models = models
        self._metrics = metrics
        self._sync_timeout_s = sync_timeout_s
        self.max_tasks = max_tasks

    async def handle_request(
        self,
        raw_tasks: list[Any],
        bearer: str | None,
        client: str | None = None,
        principal: Principal | None = None,
    ) -> Envelope:
        """A whole REST request: authenticate (unless the transport already did, giving
        `principal`), then run every task."""
        tasks = list(raw_tasks)
        key = bearer
        if tasks and isinstance(tasks[0], dict) and tasks[0].get("taskType") == "authentication":
            first = tasks.pop(0)
            principal = None
            try:
                key = parse_task(first).apiKey  # type: ignore[union-attr]
            except ImpastoError as exc:
                # A malformed authentication task is an authentication failure (401).
                code = "missingApiKey" if exc.code.startswith("missing") else "invalidApiKey"
                return Envelope(
                    errors=[
                        AuthError(
                            exc.message, code=code, parameter="apiKey", task_type="authentication"
                        )
                    ]
                )
        if principal is None:
            try:
                principal = await self.auth.authenticate(key, client)
            except ImpastoError as exc:
                return Envelope(errors=[exc])
        if len(tasks) > self.max_tasks:
            return Envelope(errors=[too_many_tasks(len(tasks), self.max_tasks)])
        if len(tasks) == 1:
            results = [await self.handle_task(tasks[0], principal)]
        else:
            results = await asyncio.gather(*(self.handle_task(raw, principal) for raw in tasks))
        envelope = Envelope()
        for result in results:
            envelope.extend(result)
        return envelope

    async def handle_task(self, raw: Any, principal: Principal = ANONYMOUS) -> Envelope:
        """One task, already authenticated: everything it produced, in one envelope."""
        envelope = Envelope()
        async for part in self.stream_task(raw, principal):
            envelope.extend(part)
        return envelope

    async def stream_task(
        self, raw: Any, principal: Principal = ANONYMOUS
    ) -> AsyncIterator[Envelope]:
        """One task of an authenticated `principal`, as it happens: a sync imageInference
        yields each image (or distinct error) as soon as it is stored; other tasks yield
        once. A principal whose key was revoked since it authenticated (a WebSocket that
        authenticated earlier) gets an authentication error."""
        task_type, task_uuid = task_context(raw)
        # Each task runs in an asyncio task of its own: the variable is this task's alone.
        current_task.set(task_uuid)
        try:
            principal = self.auth.recheck(principal)
            task = parse_task(raw)
            if isinstance(task, StreamedIn) and task.deliveryMethod == "sync":
                outcome = "ok"
                async for part in self._stream(task, principal):
                    if part.errors and outcome == "ok":
                        outcome = part.errors[0].code
                    yield part
                self._count(task_type, outcome, principal)
                return
            envelope = await self._run(task, principal)
        except ImpastoError as exc:
            envelope = Envelope(errors=[exc.for_task(task_type, task_uuid)])
        except Exception:
            log.exception("task %s (%s) failed unexpectedly", task_uuid, task_type)
            error = ImpastoError("Internal error while handling the task.").for_task(
                task_type, task_uuid
            )
            envelope = Envelope(errors=[error])
        self._count(task_type, envelope.errors[0].code if envelope.errors else "ok", principal)
        yield envelope

    def _count(self, task_type: str | None, outcome: str, principal: Principal) -> None:
        if self._metrics is not None:
            known = task_type if task_type in TASK_MODELS else "unknown"
            self._metrics.tasks.labels(known, outcome).inc()
            key = self._metrics.key_label(principal.name)
            self._metrics.key_tasks.labels(key, outcome).inc()

    async def _submit(self, task: ImageInferenceIn, principal: Principal) -> None:
        """Accept an imageInference within the principal's quotas."""
        if self._quotas is None:
            await self._inference.submit(task, principal)
            return
        async with self._quotas.admitted_inference(
            principal, task.taskUUID, task.model, task.numberResults
        ):
            await self._inference.submit(task, principal)

    async def _submit_utility(self, task: UtilityTaskIn, principal: Principal) -> None:
        if self._utility is None:
            raise not_run_here(task.taskType)
        if self._quotas is not None:
            await self._quotas.admit_work(principal)
        await self._utility.submit(task, principal)

    async def _run(self, task: TaskIn, principal: Principal) -> Envelope:
        owner = principal.owner or None
        if isinstance(task, ImageInferenceIn):
            await self._submit(task, principal)
            return Envelope(data=[ack_item(task.taskType, task.taskUUID)])
        if isinstance(
            task, UpscaleFields | RemoveBackgroundFields | CaptionFields | PromptEnhanceIn
        ):
            await self._submit_utility(task, principal)
            return Envelope(data=[ack_item(task.taskType, task.taskUUID)])
        if isinstance(task, AccountManagementIn | GetTaskDetailsIn):
            if self._account is None:
                raise not_run_here(task.taskType)
            if isinstance(task, AccountManagementIn):
                return Envelope(data=[await self._account.details(task, principal)])
            return Envelope(data=[await self._account.task_details(task, principal)])
        if self._quotas is not None and isinstance(
            task,
            ImageUploadIn | MediaStorageIn | ImageControlNetPreProcessIn | ControlNetPreprocessIn,
        ):
            await self._quotas.admit_work(principal)
        if isinstance(task, ImageUploadIn):
            return Envelope(data=[await self._uploads.upload(task, owner)])
        if isinstance(task, MediaStorageIn):
            return Envelope(data=[await self._uploads.media_storage(task, owner)])
        if isinstance(task, ImageControlNetPreProcessIn | ControlNetPreprocessIn):
            if self._preprocess is None:
                raise not_run_here(task.taskType)
            return Envelope(data=[await self._preprocess.run(task, owner)])
        if isinstance(task, GetResponseIn):
            return Envelope(data=await self._responses.items(task, owner))
        if isinstance(task, ModelSearchIn):
            return Envelope(data=[self._models.search(task)])
        if isinstance(task, PingIn):
            return Envelope(data=[{"taskType": "ping", "pong": True}])
        if isinstance(task, AuthenticationIn):
            raise InvalidParameter(
                "authentication must be the first task of a request.",
                code="invalidTaskOrder",
                parameter="taskType",
            )
        raise AssertionError(f"unhandled task {type(task).__name__}")

    async def _stream(self, task: StreamedIn, principal: Principal) -> AsyncIterator[Envelope]:
        """A sync task: accept it, then yield each result as it is stored."""
        async with self._bus.subscribe(task.taskUUID) as subscription:
            if isinstance(task, ImageInferenceIn):
                await self._submit(task, principal)
            else:
                await self._submit_utility(task, principal)
            seen: set[tuple[str, str]] = set()
            try:
                async for result in self._inference.follow(
                    task.taskUUID, subscription, self._sync_timeout_s
                ):
                    if result.status == "success":
                        yield Envelope(data=[result.item])
                        continue
                    error = ImpastoError.from_item(result.item)
                    # One error item per distinct failure, not one per failed image.
                    if (error.code, error.message) not in seen:
                        seen.add((error.code, error.message))
                        yield Envelope(errors=[after_acceptance(error)])
                failures = (
                    await self._inference.upload_failures(task.taskUUID)
                    if getattr(task, "uploadEndpoint", None)
                    else []
                )
            except ImpastoError as exc:
                # SyncTimeout, or the state store went away while we waited: the task is
                # accepted and goes on; getResponse has its results.
                yield Envelope(
                    errors=[after_acceptance(exc.for_task(task.taskType, task.taskUUID))]
                )
                return
            if failures:
                yield Envelope(errors=[after_acceptance(e) for e in failures])


def not_run_here(task_type: str) -> InvalidParameter:
    return InvalidParameter(
        f"This server does not run {task_type} tasks.",
        code="unsupportedTaskType",
        parameter="taskType",
    )


def too_many_tasks(count: int, limit: int) -> ImpastoError:
    return TooManyTasks(
        f"The request has {count} tasks; at most {limit} are taken at once "
        "(IMPASTO_MAX_TASKS_PER_REQUEST)."
    )
