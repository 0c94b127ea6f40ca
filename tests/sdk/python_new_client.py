"""A client of impasto written with the official new Runware Python SDK, `runware-sdk` 1.8.0,
used unchanged. It imports as `runware` like the legacy SDK, so it runs in its own virtualenv:

    .venv-sdk/bin/python tests/sdk/python_new_client.py URL SCENARIO [ARGS_JSON]

URL picks the transport: ws://…/v1 is the SDK's WebSocket transport, http://…/v1 its REST one.
It prints one JSON object per line: `{"event": …}` as things happen (the test may act on them,
e.g. cut the connection after the first image), then `{"result": …}` or `{"error": …}`. With
`"wait_go": true` it prints `{"event": "ready"}` once connected and waits for a line on stdin.

Scenarios:
  generate         run() each task of ARGS["tasks"] in turn; result: the item lists
  upload_reference image_upload(ARGS["image"]), then run() ARGS["task"] with the uploaded
                   imageUUID as inputs.referenceImages; result: upload reply and items
  media_storage    media_storage() upload of ARGS["media"], run() ARGS["task"] with the
                   mediaUUID as inputs.referenceImages, run() a controlNetPreprocess (canny)
                   of it, then media_storage() delete of it; result: every reply
  get_response     run() ARGS["task"], then get_response() for its taskUUID
  expect_error     run() ARGS["task"], expecting a RunwareError; result: what the error carries
  drop             run() ARGS["task"] while the test cuts the connection; on a RunwareError the
                   result says what it carried, then polls get_response until the task is done
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
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
    common: dict[str, Any] = {
        "api_key": "k",
        # Reconnect and retry sooner than the 1 s default: the tests cut connections.
        "retry_delay": 200,
        "debug": True,
        "log_sink": wire,
    }
    if url.startswith("ws"):
        return Runware(transport="websocket", ws_base_url=url, **common)
    return Runware(transport="rest", http_base_url=url, **common)


def session_id(client: Runware) -> str | None:
    transport = getattr(client, "_ws_transport", None)
    return None if transport is None else transport.session_id


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
        on_result=lambda item: emit(event="result", imageUUID=item.get("imageUUID")),
        on_progress=lambda item: emit(event="progress", progress=item.get("progress")),
    )


def task(fields: dict[str, Any]) -> dict[str, Any]:
    base = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": MODEL,
        "positivePrompt": "a lighthouse at dusk",
        "width": 64,
        "height": 64,
    }
    return {**base, **fields}


async def poll_get_response(client: Runware, task_uuid: str, count: int) -> list[Any]:
    deadline = time.monotonic() + 120
    while True:
        items = await client.get_response({"taskUUID": task_uuid})
        if len(items) == count and all(i.get("status") == "success" for i in items):
            return items
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {task_uuid} did not finish: {items}")
        await asyncio.sleep(0.2)


async def scenario(url: str, name: str, args: dict[str, Any]) -> Any:
    wire = WireLog()
    async with make_client(url, wire) as client:
        emit(event="connected", session=session_id(client))
        if args.get("wait_go"):
            emit(event="ready")
            await asyncio.to_thread(sys.stdin.readline)
        if name == "generate":
            return [await client.run(task(fields), options()) for fields in args["tasks"]]
        if name == "upload_reference":
            upload = await client.image_upload({"image": args["image"]})
            fields = {**args["task"], "inputs": {"referenceImages": [upload[0]["imageUUID"]]}}
            return {"upload": upload, "items": await client.run(task(fields), options())}
        if name == "media_storage":
            upload = await client.media_storage({"operation": "upload", "media": args["media"]})
            media_uuid = upload[0]["mediaUUID"]
            fields = {**args["task"], "inputs": {"referenceImages": [media_uuid]}}
            items = await client.run(task(fields), options())
            guide = await client.run(
                {
                    "taskType": "controlNetPreprocess",
                    "model": "runware:controlnet-preprocess@canny",
                    "inputs": {"image": media_uuid},
                    "outputType": "base64Data",
                    "outputFormat": "PNG",
                }
            )
            # The SDK types the request as {operation, media}: the UUID goes in `media`.
            deleted = await client.media_storage({"operation": "delete", "media": media_uuid})
            return {"upload": upload, "items": items, "guide": guide, "deleted": deleted}
        if name == "get_response":
            request = task(args["task"])
            items = await client.run(request, options())
            polled = await client.get_response({"taskUUID": request["taskUUID"]})
            return {"items": items, "get_response": polled}
        if name == "account":
            request = task(args["task"])
            items = await client.run(request, options())
            details = await client.get_task_details({"taskUUID": request["taskUUID"]})
            account = await client.account_management({"operation": "getDetails"})
            return {"items": items, "task_details": details, "account": account}
        if name == "expect_error":
            try:
                items = await client.run(task(args["task"]))
            except RunwareError as error:
                return error_fields(error, wire)
            raise AssertionError(f"no error; items {items}")
        if name == "drop":
            request = task(args["task"])
            emit(event="submitted", taskUUID=request["taskUUID"])
            try:
                items = await client.run(request, options())
            except RunwareError as error:
                count = int(request.get("numberResults", 1))
                polled = await poll_get_response(client, request["taskUUID"], count)
                return {"error": error_fields(error, wire), "get_response": polled}
            return {
                "items": items,
                "sessions": [session_id(client)],
                "wire_codes": wire.error_codes,
                "taskUUID": request["taskUUID"],
            }
        raise SystemExit(f"unknown scenario {name!r}")


Scenario = Callable[[str, str, dict[str, Any]], Coroutine[Any, Any, Any]]


def main(run: Scenario = scenario) -> None:
    """URL SCENARIO [ARGS_JSON] from the command line; prints the result or the error."""
    url, name = sys.argv[1], sys.argv[2]
    args = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    try:
        result = asyncio.run(run(url, name, args))
    except RunwareError as error:
        emit(error=error_fields(error, WireLog()))
        raise SystemExit(1) from None
    emit(result=result)


if __name__ == "__main__":
    main()
