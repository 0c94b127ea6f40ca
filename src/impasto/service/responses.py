"""getResponse: the cumulative state of every generation of a task, echoing its own taskType."""

from __future__ import annotations

from typing import Any

from impasto.protocol.errors import TaskNotFound
from impasto.protocol.results import error_status_item, processing_item
from impasto.protocol.tasks import GetResponseIn
from impasto.service.inference import upload_errors
from impasto.state.base import StateStore


class ResponseService:
    """Reads a task's results and progress from the state store."""

    def __init__(self, state: StateStore) -> None:
        self._state = state

    async def items(self, request: GetResponseIn) -> list[dict[str, Any]]:
        task = await self._state.get_task(request.taskUUID)
        if task is None:
            raise TaskNotFound(
                f"No task with taskUUID {request.taskUUID} (unknown, or its results expired).",
                parameter="taskUUID",
            )
        results = {r.index: r for r in await self._state.results(task.task_uuid)}
        progress = await self._state.progress(task.task_uuid)
        items: list[dict[str, Any]] = []
        for index in range(task.expected):
            result = results.get(index)
            if result is None:
                if task.status == "processing":
                    items.append(
                        processing_item(task.task_type, task.task_uuid, progress.get(index, 0))
                    )
                elif task.error is not None:
                    items.append(error_status_item(task.task_type, task.task_uuid, task.error))
            elif result.status == "success":
                items.append({**result.item, "status": "success"})
            else:
                items.append(error_status_item(task.task_type, task.task_uuid, result.item))
        uploads = [d for d in await self._state.deliveries(task.task_uuid) if d.kind == "upload"]
        for error in upload_errors(list(results.values()), uploads):
            items.append(error_status_item(task.task_type, task.task_uuid, error.to_item()))
        return items
