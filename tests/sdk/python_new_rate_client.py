"""A client of impasto under a rate-limited API key, written with the official new Runware
Python SDK, `runware-sdk` 1.8.0, used unchanged (tests/integration/test_sdk_rate_limits.py):

    .venv-sdk/bin/python tests/sdk/python_new_rate_client.py URL SCENARIO ARGS_JSON

URL picks the transport: ws://…/v1 is the SDK's WebSocket transport, http://…/v1 its REST one.
ARGS: "api_key" (the managed key), and optionally "max_retries" and "retry_delay" (ms) for the
SDK's config; without them the SDK's own defaults hold. It prints `{"result": …}` (or
`{"error": …}` if something other than the calls failed) as one JSON line.

Scenario:
  calls   make each call of ARGS["calls"] in turn, stopping at the first RunwareError:
          {"run": {imageInference fields}} is run(), {"upload": data URI} is image_upload().
          result: "outcomes" (per call made: {"items": …} or {"error": …}, with "seconds"),
          "config" (the retry settings the SDK ran with), "sends" (how many times the SDK sent
          each taskUUID as its own task type: the first send and every retry) and "retries"
          (the SDK's own retry log lines), all from the SDK's debug log sink.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections import Counter
from typing import Any

from runware import Runware
from runware.errors import RunwareError
from runware.logger import LogEntry

MODEL = "impasto:tiny@1"


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


class SdkLog:
    """The SDK's debug log sink: the tasks it sent, the error codes of the frames it received,
    and its retry lines."""

    def __init__(self) -> None:
        self.sends: Counter[str] = Counter()
        self.wire_codes: list[str] = []
        self.retries: list[str] = []

    def __call__(self, entry: LogEntry) -> None:
        if entry.category == "retry":
            self.retries.append(entry.message)
            return
        if entry.category not in ("send", "receive"):
            return
        try:
            frame = json.loads(entry.message)
        except ValueError:
            return
        if entry.category == "send":
            for task in frame if isinstance(frame, list) else []:
                if isinstance(task, dict) and task.get("taskType") != "getResponse":
                    self.sends[str(task.get("taskUUID"))] += 1
            return
        if isinstance(frame, dict):
            for error in frame.get("errors") or []:
                if isinstance(error, dict) and isinstance(error.get("code"), str):
                    self.wire_codes.append(error["code"])


def make_client(url: str, args: dict[str, Any], log: SdkLog) -> Runware:
    config: dict[str, Any] = {"api_key": args["api_key"], "debug": True, "log_sink": log}
    for name in ("max_retries", "retry_delay"):
        if name in args:
            config[name] = args[name]
    if url.startswith("ws"):
        return Runware(transport="websocket", ws_base_url=url, **config)
    return Runware(transport="rest", http_base_url=url, **config)


def error_fields(error: RunwareError, log: SdkLog) -> dict[str, Any]:
    return {
        "type": type(error).__name__,
        "code": error.code,
        "retryable": error.retryable,
        "status_code": error.status_code,
        "retry_after": error.retry_after,
        "task_uuid": error.task_uuid,
        "task_type": error.task_type,
        "message": error.message,
        "wire_codes": list(log.wire_codes),
    }


def inference(fields: dict[str, Any]) -> dict[str, Any]:
    base = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": MODEL,
        "positivePrompt": "a lighthouse at dusk",
        "width": 64,
        "height": 64,
    }
    return {**base, **fields}


async def call(client: Runware, spec: dict[str, Any]) -> list[Any]:
    if "run" in spec:
        return await client.run(inference(spec["run"]))
    if "upload" in spec:
        return await client.image_upload({"image": spec["upload"]})
    raise SystemExit(f"unknown call {spec!r}")


async def scenario(url: str, name: str, args: dict[str, Any]) -> Any:
    if name != "calls":
        raise SystemExit(f"unknown scenario {name!r}")
    log = SdkLog()
    async with make_client(url, args, log) as client:
        config = client._config  # what the SDK runs with, defaults included
        outcomes: list[dict[str, Any]] = []
        for spec in args["calls"]:
            started = time.monotonic()
            try:
                outcome: dict[str, Any] = {"items": await call(client, spec)}
            except RunwareError as error:
                outcome = {"error": error_fields(error, log)}
            outcome["seconds"] = time.monotonic() - started
            outcomes.append(outcome)
            if "error" in outcome:
                break
        return {
            "outcomes": outcomes,
            "config": {
                "max_retries": config.max_retries,
                "retry_delay": config.retry_delay,
                "retry_strategy": config.retry_strategy,
            },
            "sends": dict(log.sends),
            "retries": log.retries,
        }


def main() -> None:
    url, name = sys.argv[1], sys.argv[2]
    args = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    try:
        result = asyncio.run(scenario(url, name, args))
    except RunwareError as error:
        emit(error=error_fields(error, SdkLog()))
        raise SystemExit(1) from None
    emit(result=result)


if __name__ == "__main__":
    main()
