"""getResponse: the cumulative state of every generation of a task, echoing its own taskType.

With API keys configured a task is visible only to the key that submitted it: to any other it
does not exist (taskNotFound, not a hint that it does)."""

from __future__ import annotations

from typing import Any

from impasto.protocol.errors import TaskNotFound
from impasto.protocol.tasks import GetResponseIn
from impasto.service.completion import status_items
from impasto.state.base import StateStore
from impasto.state.records import TaskRecord


async def owned_task(state: StateStore, task_uuid: str, owner: str | None) -> TaskRecord:
    """The task, if `owner` may see it; TaskNotFound otherwise (the same answer as for a task
    that never existed)."""
    task = await state.get_task(task_uuid)
    if task is None or not task.visible_to(owner):
        raise TaskNotFound(
            f"No task with taskUUID {task_uuid} (unknown, or its results expired).",
            parameter="taskUUID",
        )
    return task


class ResponseService:
    """Reads a task's results and progress from the state store."""

    def __init__(self, state: StateStore) -> None:
        self._state = state

    async def items(self, request: GetResponseIn, owner: str | None = None) -> list[dict[str, Any]]:
        task = await owned_task(self._state, request.taskUUID, owner)
        results = await self._state.results(task.task_uuid)
        progress = await self._state.progress(task.task_uuid)
        uploads = [d for d in await self._state.deliveries(task.task_uuid) if d.kind == "upload"]
        return status_items(task, results, progress, uploads)
