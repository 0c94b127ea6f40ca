"""Kill -9 the server in the middle of a batch of async tasks and start it again: nothing
accepted is lost or duplicated, and pending webhooks and uploads are delivered."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import LoopbackHTTP, Recorded, free_port


class ServerProcess:
    """`python -m impasto serve` in its own process, so that it can be killed for real."""

    def __init__(self, data_dir: Path, models_cache: Path, port: int) -> None:
        self.port = port
        self.env = {
            **os.environ,
            "IMPASTO_DATA_DIR": str(data_dir),
            "IMPASTO_MODELS_CACHE": str(models_cache),
            "IMPASTO_PORT": str(port),
            "IMPASTO_HOST": "127.0.0.1",
            "IMPASTO_ALLOW_PRIVATE_NETWORKS": "true",
            "IMPASTO_DELIVERY_BASE_DELAY_S": "0.05",
            "IMPASTO_DELIVERY_MAX_DELAY_S": "0.2",
            "IMPASTO_LOG_LEVEL": "warning",
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "impasto", "serve"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "server exited during start-up"
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("server did not become healthy")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def post(self, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        reply: dict[str, Any] = httpx.post(self.url, json=tasks, timeout=60).json()
        return reply

    def poll(self, task_uuid: str) -> list[dict[str, Any]]:
        reply = self.post([{"taskType": "getResponse", "taskUUID": task_uuid}])
        assert "errors" not in reply, reply
        items: list[dict[str, Any]] = reply["data"]
        return items


def test_kill_9_mid_batch_loses_and_duplicates_nothing(
    tmp_path: Path, tiny_models_dir: Path, loopback_http: LoopbackHTTP
) -> None:
    accepting = {"now": False}
    accepted: list[Recorded] = []

    def receiver(request: Recorded) -> tuple[int, str, bytes]:
        # Down until the restart: every delivery is still pending when the server dies.
        if not accepting["now"]:
            return (503, "text/plain", b"down")
        accepted.append(request)
        return (200, "text/plain", b"ok")

    loopback_http.handler = receiver
    server = ServerProcess(tmp_path / "data", tiny_models_dir, free_port())
    server.start()
    tasks = [
        {
            "taskType": "imageInference",
            "taskUUID": str(uuid.uuid4()),
            "model": "impasto:tiny@1",
            "positivePrompt": f"harbour at night, variation {i}",
            "width": 640,
            "height": 640,
            "steps": 12,
            "numberResults": 2,
            "deliveryMethod": "async",
            "webhookURL": loopback_http.url(f"/hook/{i}"),
            "uploadEndpoint": loopback_http.url(f"/bucket/{i}.jpg"),
        }
        for i in range(4)
    ]
    try:
        acks = server.post(tasks)
        assert len(acks["data"]) == 4
        before: dict[str, str] = {}
        deadline = time.monotonic() + 120
        while not before and time.monotonic() < deadline:
            for task in tasks:
                for item in server.poll(task["taskUUID"]):
                    if "imageUUID" in item:
                        before[item["imageUUID"]] = task["taskUUID"]
            time.sleep(0.02)
        assert before, "no image was stored before the kill"
        server.kill()
        finished_at_kill = len(before)
        assert finished_at_kill < 8, "everything finished before the kill; make the batch bigger"

        server.start()
        accepting["now"] = True
        final: dict[str, list[dict[str, Any]]] = {}
        deadline = time.monotonic() + 180
        while len(final) < len(tasks) and time.monotonic() < deadline:
            for task in tasks:
                items = server.poll(task["taskUUID"])
                if items and all(i["status"] != "processing" for i in items):
                    final[task["taskUUID"]] = items
            time.sleep(0.05)
        assert len(final) == len(tasks)

        after = {}
        for task_uuid, items in final.items():
            assert [i["status"] for i in items] == ["success", "success"], items
            uuids = [i["imageUUID"] for i in items]
            assert len(set(uuids)) == 2
            after.update(dict.fromkeys(uuids, task_uuid))
            for item in items:
                assert httpx.get(item["imageURL"]).status_code == 200
        # Nothing stored before the kill was lost or replaced.
        assert set(before) <= set(after)
        assert len(after) == 8

        def delivered() -> tuple[set[str], set[str]]:
            ok = list(accepted)
            hooks = {
                json.loads(r.body)["data"][0]["imageUUID"]
                for r in ok
                if r.method == "POST" and r.body.startswith(b'{"data"')
            }
            puts = {r.path for r in ok if r.method == "PUT"}
            return hooks, puts

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            hooks, puts = delivered()
            if hooks >= set(after) and len(puts) == 4:
                break
            time.sleep(0.05)
        hooks, puts = delivered()
        assert hooks >= set(after), "a webhook pending at the kill was never delivered"
        assert puts == {f"/bucket/{i}.jpg" for i in range(4)}
    finally:
        server.stop()
