"""The account tasks: `accountManagement` getDetails (the key's limits and usage) and
`getTaskDetails` (a past task: its request, response, cost and timings).

Shapes follow runware-sdk 1.8's AccountManagementResult and GetTaskDetailsResult: Runware
documents the top-level fields (organization, apiKeys, usage; request, response) and leaves
their insides open, so what impasto puts inside them is written down here:

- `apiKeys`: the asking key only, or every key for an operator key (IMPASTO_API_KEYS): name,
  apiKeyUUID (the key id), hint (its first characters), status, createdAt, expiresAt, limits.
- `usage`: images and cost in all, over the last 24 hours / 7 days / 30 days, and per model.
- getTaskDetails adds `cost` (the sum of its images' costs, also when the task did not ask for
  includeCost) and `timings` (accepted, finished, milliseconds per image from acceptance).

A task is visible to the key that made it only, as with getResponse.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from impasto.protocol.account import AccountManagementIn, GetTaskDetailsIn
from impasto.service.responses import owned_task
from impasto.state.base import StateStore
from impasto.tenancy.keys import ApiKey, KeyStore, Limits, Principal, UsageLedger, UsageTotals

Clock = Callable[[], float]

WINDOWS = (("last24Hours", 86_400), ("last7Days", 7 * 86_400), ("last30Days", 30 * 86_400))


def iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


def limits_item(limits: Limits) -> dict[str, Any]:
    return {
        "tasksPerMinute": limits.tasks_per_minute,
        "imagesPerMinute": limits.images_per_minute,
        "maxConcurrentTasks": limits.max_concurrent,
        "models": list(limits.models),
    }


def key_item(key: ApiKey, now: float) -> dict[str, Any]:
    return {
        "apiKeyUUID": key.key_id,
        "name": key.name,
        "hint": key.hint,
        "status": key.status(now),
        "createdAt": iso(key.created_at),
        "expiresAt": iso(key.expires_at),
        "revokedAt": iso(key.revoked_at),
        "limits": limits_item(key.limits),
    }


def summed(totals: Sequence[UsageTotals]) -> dict[str, Any]:
    return {
        "images": sum(t.images for t in totals),
        "cost": round(sum(t.cost for t in totals), 10),
    }


class AccountService:
    """Answers accountManagement and getTaskDetails from the key store and usage ledger."""

    def __init__(
        self,
        state: StateStore,
        keys: KeyStore,
        ledger: UsageLedger,
        *,
        organization: str = "impasto",
        clock: Clock = time.time,
    ) -> None:
        self._state = state
        self._keys = keys
        self._ledger = ledger
        self._organization = organization
        self._clock = clock

    async def details(self, task: AccountManagementIn, principal: Principal) -> dict[str, Any]:
        now = self._clock()
        if principal.operator or principal.anonymous:
            keys = [key_item(k, now) for k in await self._keys.list_keys()]
            scope: Sequence[str] = ()
        else:
            key = await self._keys.key_by_digest(principal.owner)
            keys = [key_item(key, now)] if key is not None else []
            scope = (principal.key_id,)
        totals = await self._ledger.usage_totals(key_ids=scope)
        usage: dict[str, Any] = {"total": summed(totals)}
        for name, seconds in WINDOWS:
            usage[name] = summed(
                await self._ledger.usage_totals(key_ids=scope, since=now - seconds)
            )
        by_model: dict[str, list[UsageTotals]] = {}
        for row in totals:
            by_model.setdefault(row.model, []).append(row)
        usage["models"] = [{"model": m, **summed(rows)} for m, rows in sorted(by_model.items())]
        return {
            "taskType": task.taskType,
            "taskUUID": task.taskUUID,
            "operation": task.operation,
            "organizationName": self._organization,
            "apiKeys": keys,
            "currentApiKey": {
                "apiKeyUUID": principal.key_id or None,
                "name": principal.name,
                "operator": principal.operator,
                "limits": limits_item(principal.limits),
            },
            "usage": usage,
        }

    async def task_details(self, task: GetTaskDetailsIn, principal: Principal) -> dict[str, Any]:
        record = await owned_task(self._state, task.taskUUID, principal.owner or None)
        results = await self._state.results(record.task_uuid)
        data = [r.item for r in results if r.status == "success"]
        errors = [r.item for r in results if r.status == "error"]
        if record.error is not None and not errors:
            errors = [record.error]
        response: dict[str, Any] = {"data": data}
        if errors:
            response["errors"] = errors
        usage = await self._ledger.task_usage(record.task_uuid)
        cost = round(sum(u.cost for u in usage), 10)
        return {
            "taskType": task.taskType,
            "taskUUID": task.taskUUID,
            "request": [record.request],
            "response": response,
            "status": record.status,
            "cost": cost,
            "timings": {
                "acceptedAt": iso(record.created_at),
                "finishedAt": iso(record.finished_at),
                "totalMs": _ms(record.created_at, record.finished_at),
                "images": [
                    {
                        "index": r.index,
                        "status": r.status,
                        "ms": _ms(record.created_at, r.created_at),
                    }
                    for r in results
                ],
            },
        }


def _ms(start: float, end: float | None) -> int | None:
    return None if end is None else max(0, round((end - start) * 1000))
