"""Kill -9 the server in the middle of a batch of async tasks and start it again: nothing
accepted is lost or duplicated, and pending webhooks and uploads are delivered."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import LoopbackHTTP, Recorded, free_port
from tests.processes import ServerProcess


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
    server = ServerProcess(
        free_port(),
        {
            "IMPASTO_DATA_DIR": str(tmp_path / "data"),
            "IMPASTO_MODELS_CACHE": str(tiny_models_dir),
            "IMPASTO_ALLOW_PRIVATE_NETWORKS": "true",
            "IMPASTO_DELIVERY_BASE_DELAY_S": "0.05",
            "IMPASTO_DELIVERY_MAX_DELAY_S": "0.2",
        },
    )
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
