"""accountManagement getDetails and getTaskDetails on a real SQLite state, keys and ledger:
a key sees itself and its own usage, an operator every key; a task's details (request,
response, cost, timings) only for the key that made it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from impasto.protocol.account import AccountManagementIn, GetTaskDetailsIn
from impasto.protocol.errors import TaskNotFound
from impasto.service.account import AccountService
from impasto.state.records import ResultRecord, TaskRecord
from impasto.state.sqlite import SqliteStateStore
from impasto.tenancy.directory import principal_of
from impasto.tenancy.keys import ApiKey, Limits, UsageRecord, digest_of, operator_principal
from impasto.tenancy.sqlite_store import SqliteTenancyStore
from tests.fakes import FakeClock

NOW = 2_000_000_000.0


def key(name: str, **limits: Any) -> ApiKey:
    if name == "a" and not limits:
        limits = {"tasks_per_minute": 10, "models": ("impasto:tiny@1",)}
    return ApiKey(
        key_id=f"key_{name}",
        name=name,
        digest=digest_of(f"secret-{name}"),
        hint="imp_abcd",
        created_at=NOW - 100,
        limits=Limits(**limits),
    )


@asynccontextmanager
async def service(tmp_path: Path) -> AsyncIterator[tuple[AccountService, SqliteStateStore]]:
    state = SqliteStateStore(tmp_path / "s.db")
    await state.open()
    tenancy = SqliteTenancyStore(tmp_path / "s.db")
    await tenancy.open()
    try:
        await tenancy.create_key(key("a"))
        await tenancy.create_key(key("b"))
        await tenancy.record_usage(
            [
                UsageRecord("t1", 0, "key_a", "a", "impasto:tiny@1", 64, 64, 0.25, NOW - 10),
                UsageRecord("t1", 1, "key_a", "a", "impasto:tiny@1", 64, 64, 0.25, NOW - 10),
                UsageRecord("t0", 0, "key_a", "a", "runway:4@1", 1024, 1024, 1.0, NOW - 9e5),
                UsageRecord("t2", 0, "key_b", "b", "impasto:tiny@1", 64, 64, 0.5, NOW - 10),
            ]
        )
        yield AccountService(state, tenancy, tenancy, clock=FakeClock(NOW)), state
    finally:
        await tenancy.close()
        await state.close()


def details(task_uuid: str | None = None) -> AccountManagementIn:
    return AccountManagementIn(
        taskType="accountManagement",
        taskUUID=task_uuid or str(uuid.uuid4()),
        operation="getDetails",
    )


def test_a_key_sees_itself_its_limits_and_its_usage(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with service(tmp_path) as (account, _):
            item = await account.details(details(), principal_of(key("a")))
            assert [k["name"] for k in item["apiKeys"]] == ["a"]
            assert item["apiKeys"][0]["limits"]["tasksPerMinute"] == 10
            assert item["currentApiKey"]["limits"]["models"] == ["impasto:tiny@1"]
            usage = item["usage"]
            assert usage["total"] == {"images": 3, "cost": 1.5}
            assert usage["last24Hours"] == {"images": 2, "cost": 0.5}
            assert usage["last30Days"] == {"images": 3, "cost": 1.5}
            assert usage["models"] == [
                {"model": "impasto:tiny@1", "images": 2, "cost": 0.5},
                {"model": "runway:4@1", "images": 1, "cost": 1.0},
            ]

    asyncio.run(scenario())


def test_an_operator_sees_every_key_and_all_usage(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with service(tmp_path) as (account, _):
            item = await account.details(details(), operator_principal("op"))
            assert [k["name"] for k in item["apiKeys"]] == ["a", "b"]
            assert item["usage"]["total"] == {"images": 4, "cost": 2.0}
            assert item["currentApiKey"]["operator"] is True

    asyncio.run(scenario())


def test_task_details_are_the_owners_only(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with service(tmp_path) as (account, state):
            owner = key("a")
            request = {"taskType": "imageInference", "taskUUID": "t1", "positivePrompt": "x"}
            await state.create_task(
                TaskRecord(
                    "t1", "imageInference", request, 2, NOW - 10, extra={"owner": owner.digest}
                )
            )
            item = {"taskType": "imageInference", "taskUUID": "t1", "imageUUID": "i"}
            await state.add_result(ResultRecord("t1", 0, "success", item, NOW - 9.5))
            error = {"code": "inferenceError", "message": "boom"}
            await state.add_result(ResultRecord("t1", 1, "error", error, NOW - 9.0))
            await state.finish_task("t1", "error", error, NOW - 9.0)
            ask = GetTaskDetailsIn(taskType="getTaskDetails", taskUUID=str(uuid.uuid4()))
            ask = ask.model_copy(update={"taskUUID": "t1"})
            got = await account.task_details(ask, principal_of(owner))
            assert got["request"] == [request]
            assert got["response"] == {"data": [item], "errors": [error]}
            assert got["cost"] == 0.5
            assert got["status"] == "error"
            assert got["timings"]["totalMs"] == 1000
            assert [i["ms"] for i in got["timings"]["images"]] == [500, 1000]
            with pytest.raises(TaskNotFound):
                await account.task_details(ask, principal_of(key("b")))

    asyncio.run(scenario())
