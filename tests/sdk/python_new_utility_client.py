"""A client of impasto's utility tasks (upscale, removeBackground, caption, promptEnhance)
written with the official new Runware Python SDK, `runware-sdk` 1.8.0, used unchanged. Like
tests/sdk/python_new_client.py it runs in its own virtualenv:

    .venv-sdk/bin/python tests/sdk/python_new_utility_client.py URL SCENARIO [ARGS_JSON]

URL picks the transport: ws://…/v1 is the SDK's WebSocket transport, http://…/v1 its REST one.
It prints one JSON object per line: `{"event": …}` as things happen, then `{"result": …}` or
`{"error": …}` (the protocol tests/sdk/clients.py reads).

Scenarios:
  run           client.run() each task of ARGS["tasks"] in turn (the SDK's own call for every
                task type; it defaults to deliveryMethod "async": ACK, then getResponse polls);
                with ARGS["get_response"], client.get_response() of each task afterwards too.
                Result, per task: {"taskUUID", "items" (what run() returned), "wire" (the
                task's result items as the server sent them, from the SDK's own debug log;
                see WireLog.results_of), "get_response"?}
  chain         run() an imageInference of impasto:tiny@1 (ARGS["task"] on top), then run() an
                upscale of its imageUUID (ARGS["upscale"] on top); result: both item lists
  expect_error  run() ARGS["task"], expecting a RunwareError; result: what the error carries
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from typing import Any

from runware import Runware
from runware.errors import RunwareError
from runware.logger import LogEntry
from runware.types.sdk import RunOptions

MODEL = "impasto:tiny@1"


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


class WireLog:
    """The SDK's own debug log sink: keeps the error codes and the data frames it received."""

    def __init__(self) -> None:
        self.error_codes: list[str] = []
        self.frames: list[list[dict[str, Any]]] = []

    def __call__(self, entry: LogEntry) -> None:
        if entry.category != "receive":
            return
        try:
            frame = json.loads(entry.message)
        except ValueError:
            return
        if not isinstance(frame, dict):
            return
        for error in frame.get("errors") or []:
            if isinstance(error, dict) and isinstance(error.get("code"), str):
                self.error_codes.append(error["code"])
        data = frame.get("data")
        if isinstance(data, list):
            self.frames.append([item for item in data if isinstance(item, dict)])

    def results_of(self, task_uuid: str) -> list[dict[str, Any]]:
        """The finished items of one task as the server sent them: those of the last
        getResponse answer (each answers with the whole task so far, its items carry a
        status), else every item the task's frames streamed (a sync task's, one a frame over
        WebSocket, all in one REST reply)."""
        streamed: list[dict[str, Any]] = []
        polled: list[dict[str, Any]] | None = None
        for frame in self.frames:
            items = [
                item
                for item in frame
                if item.get("taskUUID") == task_uuid and ("text" in item or "imageUUID" in item)
            ]
            if any("status" in item for item in items):
                polled = [item for item in items if item.get("status") == "success"]
            else:
                streamed.extend(items)
        return streamed if polled is None else polled


def make_client(url: str, wire: WireLog) -> Runware:
    common: dict[str, Any] = {"api_key": "k", "retry_delay": 200, "debug": True, "log_sink": wire}
    if url.startswith("ws"):
        return Runware(transport="websocket", ws_base_url=url, **common)
    return Runware(transport="rest", http_base_url=url, **common)


def error_fields(error: RunwareError, wire: WireLog) -> dict[str, Any]:
    return {
        "type": type(error).__name__,
        "code": error.code,
        "parameter": error.parameter,
        "task_uuid": error.task_uuid,
        "status_code": error.status_code,
        "message": error.message,
        "wire_codes": wire.error_codes,
    }


def options() -> RunOptions:
    return RunOptions(
        on_result=lambda item: emit(event="result", taskType=item.get("taskType")),
        on_progress=lambda item: emit(event="progress", progress=item.get("progress")),
    )


async def scenario(url: str, name: str, args: dict[str, Any]) -> Any:
    wire = WireLog()
    async with make_client(url, wire) as client:
        emit(event="connected")
        if name == "run":
            results = []
            for fields in args["tasks"]:
                request = {"taskUUID": str(uuid.uuid4()), **fields}
                items = await client.run(request, options())
                result: dict[str, Any] = {"taskUUID": request["taskUUID"], "items": items}
                if args.get("get_response"):
                    polled = await client.get_response({"taskUUID": request["taskUUID"]})
                    result["get_response"] = polled
                result["wire"] = wire.results_of(request["taskUUID"])
                results.append(result)
            return results
        if name == "chain":
            generated = await client.run(
                {
                    "taskType": "imageInference",
                    "model": MODEL,
                    "positivePrompt": "a lighthouse at dusk",
                    "width": 64,
                    "height": 64,
                    **args.get("task", {}),
                },
                options(),
            )
            upscale = {
                "taskType": "upscale",
                "inputs": {"image": generated[0]["imageUUID"]},
                **args.get("upscale", {}),
            }
            return {"generated": generated, "upscaled": await client.run(upscale, options())}
        if name == "expect_error":
            try:
                items = await client.run(args["task"])
            except RunwareError as error:
                return error_fields(error, wire)
            raise AssertionError(f"no error; items {items}")
        raise SystemExit(f"unknown scenario {name!r}")


def main() -> None:
    url, name = sys.argv[1], sys.argv[2]
    args = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    try:
        result = asyncio.run(scenario(url, name, args))
    except RunwareError as error:
        emit(error=error_fields(error, WireLog()))
        raise SystemExit(1) from None
    emit(result=result)


if __name__ == "__main__":
    main()
