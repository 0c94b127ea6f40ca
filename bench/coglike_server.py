"""The fallback baseline of bench/server_overhead.py part A when Cog itself cannot be installed:
a minimal server with Cog's HTTP semantics and nothing else.

    POST /predictions {"input": {...}}  one prediction at a time, synchronously: the reply is
                                        {"status": "succeeded", "output": "data:image/jpeg;..."}
                                        (a solid 1360x768 JPEG, quality 95, encoded per call in
                                        a worker thread); 409 while another one runs, as Cog
                                        answers beyond its concurrency
    GET /health-check                   {"status": "READY"}

Plain Starlette on uvicorn in one process (Cog runs the predictor in a worker subprocess and
writes the output to a file before it base64-encodes it: this does less than Cog).

    .venv/bin/python bench/coglike_server.py --port 5000
"""

from __future__ import annotations

import argparse
import base64
import io
import uuid

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

WIDTH, HEIGHT, QUALITY = 1360, 768, 95
# The colour the other two servers paint too (bench/cog_predictor.py, bench/nomodel_backend.py).
COLOUR = (181, 112, 64)


class OnePrediction:
    """Cog's concurrency 1: a prediction runs alone, others are refused while it does."""

    def __init__(self) -> None:
        self.image = Image.new("RGB", (WIDTH, HEIGHT), COLOUR)
        self.busy = False

    def encode(self) -> str:
        buffer = io.BytesIO()
        self.image.save(buffer, format="JPEG", quality=QUALITY)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

    async def predict(self, request: Request) -> JSONResponse:
        if self.busy:
            return JSONResponse({"detail": "Already running a prediction"}, status_code=409)
        self.busy = True  # set before the first await: no other request slips in
        try:
            body = await request.json()
            output = await run_in_threadpool(self.encode)
        finally:
            self.busy = False
        return JSONResponse(
            {
                "id": uuid.uuid4().hex,
                "input": body.get("input", {}) if isinstance(body, dict) else {},
                "output": output,
                "status": "succeeded",
            }
        )


async def health_check(request: Request) -> JSONResponse:
    return JSONResponse({"status": "READY"})


def create_app() -> Starlette:
    prediction = OnePrediction()
    return Starlette(
        routes=[
            Route("/predictions", prediction.predict, methods=["POST"]),
            Route("/health-check", health_check, methods=["GET"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args()
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
