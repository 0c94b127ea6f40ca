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

import uuid
from typing import Any

from python_new_client import WireLog, emit, error_fields, main, make_client
from runware.errors import RunwareError
from runware.types.sdk import RunOptions

MODEL = "impasto:tiny@1"


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


if __name__ == "__main__":
    main(scenario)
