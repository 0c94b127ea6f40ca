"""Log records carry the task being handled; JSON lines for collectors."""

from __future__ import annotations

import asyncio
import json
import logging

from impasto.logcontext import JsonFormatter, TaskContextFilter, current_task


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("impasto.test", logging.WARNING, __file__, 1, message, None, None)


def test_records_carry_the_task_of_their_own_asyncio_task() -> None:
    seen: dict[str, str] = {}
    log_filter = TaskContextFilter()

    async def handle(task_uuid: str) -> None:
        current_task.set(task_uuid)
        await asyncio.sleep(0)
        entry = record(f"handling {task_uuid}")
        log_filter.filter(entry)
        seen[task_uuid] = entry.task_uuid  # type: ignore[attr-defined]

    async def main() -> None:
        await asyncio.gather(handle("a"), handle("b"))

    asyncio.run(main())
    assert seen == {"a": "a", "b": "b"}
    outside = record("no task")
    log_filter.filter(outside)
    assert outside.task_uuid == "-"  # type: ignore[attr-defined]


def test_json_lines_hold_time_level_logger_task_and_message() -> None:
    token = current_task.set("f47ac10b-58cc-4372-a567-0e02b2c3d493")
    try:
        entry = record("webhook failed after 3 attempts")
        TaskContextFilter().filter(entry)
        line = json.loads(JsonFormatter().format(entry))
    finally:
        current_task.reset(token)
    assert line["level"] == "warning"
    assert line["logger"] == "impasto.test"
    assert line["task"] == "f47ac10b-58cc-4372-a567-0e02b2c3d493"
    assert line["message"] == "webhook failed after 3 attempts"
    assert line["time"].endswith("+00:00")


def test_json_lines_include_the_traceback_of_an_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        entry = logging.LogRecord(
            "impasto.test", logging.ERROR, __file__, 1, "failed", None, __import__("sys").exc_info()
        )
    TaskContextFilter().filter(entry)
    line = json.loads(JsonFormatter().format(entry))
    assert "ValueError: boom" in line["exception"]
