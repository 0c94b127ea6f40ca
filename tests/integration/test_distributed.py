"""Many nodes on Redis and S3: two stateless API nodes and workers in processes of their own,
a real redis-server and an S3-speaking server (moto) on loopback."""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from PIL import Image

from tests.conftest import LoopbackHTTP, Recorded, free_port
from tests.processes import ImpastoProcess, ServerProcess
from tests.services import RedisServer, S3Server

TINY = "impasto:tiny@1"


class Cluster:
    """API nodes and workers sharing one Redis prefix and one bucket."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.apis: list[ServerProcess] = []
        self.workers: list[ImpastoProcess] = []

    def api(self) -> ServerProcess:
        node = ServerProcess(free_port(), self.env, self.logs / f"api{len(self.apis)}.log")
        node.start()
        self.apis.append(node)
        return node

    def worker(self, *airs: str, **env: str) -> ImpastoProcess:
        args = ["worker"]
        for air in airs or (TINY,):
            args += ["--model", air]
        log = self.logs / f"worker{len(self.workers)}.log"
        node = ImpastoProcess(args, {**self.env, **env}, log)
        node.start()
        self.workers.append(node)
        return node

    def stop(self) -> None:
        for node in [*self.apis, *self.workers]:
            node.stop()


@pytest.fixture
def cluster(
    redis_server: RedisServer, s3_server: S3Server, tiny_models_dir: Path, tmp_path: Path
) -> Iterator[Cluster]:
    bucket = f"impasto-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    s3.create_bucket(Bucket=bucket)
    env = {
        "IMPASTO_STATE": redis_server.url,
        "IMPASTO_REDIS_PREFIX": f"t{uuid.uuid4().hex[:8]}",
        "IMPASTO_STORAGE": f"s3://{bucket}/images",
        "IMPASTO_S3_ENDPOINT_URL": s3_server.endpoint,
        "IMPASTO_S3_REGION": "us-east-1",
        "IMPASTO_S3_ACCESS_KEY_ID": "test",
        "IMPASTO_S3_SECRET_ACCESS_KEY": "test",
        "IMPASTO_DATA_DIR": str(tmp_path / "data"),
        "IMPASTO_MODELS_CACHE": str(tiny_models_dir),
        "IMPASTO_ALLOW_PRIVATE_NETWORKS": "true",
        "IMPASTO_TORCH_THREADS": "1",
        "IMPASTO_WORKER_LEASE_S": "3",
        "IMPASTO_DELIVERY_BASE_DELAY_S": "0.05",
        "IMPASTO_DELIVERY_MAX_DELAY_S": "0.2",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    running = Cluster(env, logs)
    yield running
    running.stop()


def task(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": TINY,
        "positivePrompt": "a lantern in the fog",
        "width": 256,
        "height": 192,
    }
    body.update(overrides)
    return body


def poll_until_done(node: ServerProcess, task_uuid: str, timeout: float = 120) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = node.poll(task_uuid)
        if items and all(item["status"] != "processing" for item in items):
            return items
        time.sleep(0.05)
    raise AssertionError(f"task {task_uuid} still processing")


def test_sync_task_on_an_api_node_is_run_by_a_worker_and_served_by_every_node(
    cluster: Cluster,
) -> None:
    first, second = cluster.api(), cluster.api()
    cluster.worker()
    body = task(numberResults=2)

    reply = first.post([body])

    assert "errors" not in reply, reply
    assert len(reply["data"]) == 2
    for item in reply["data"]:
        for node in (first, second):
            image_uuid = item["imageUUID"]
            served = httpx.get(f"http://127.0.0.1:{node.port}/image/{image_uuid}.jpg")
            assert served.status_code == 200
            assert Image.open(io.BytesIO(served.content)).size == (256, 192)
    # State is shared: the other node knows the task and refuses its UUID.
    assert [i["status"] for i in second.poll(body["taskUUID"])] == ["success", "success"]
    conflict = second.post([body])
    assert conflict["errors"][0]["code"] == "conflictTaskUUID"


def test_async_task_is_polled_on_another_api_node(cluster: Cluster) -> None:
    first, second = cluster.api(), cluster.api()
    cluster.worker()
    body = task(deliveryMethod="async", numberResults=3, seed=41)

    ack = first.post([body])
    items = poll_until_done(second, body["taskUUID"])

    assert ack["data"] == [{"taskType": "imageInference", "taskUUID": body["taskUUID"]}]
    assert sorted(item["seed"] for item in items) == [41, 42, 43]
    assert all(item["status"] == "success" for item in items)


def test_two_workers_share_the_queue(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker()
    cluster.worker()
    bodies = [task(deliveryMethod="async", numberResults=2) for _ in range(6)]

    api.post(bodies)

    for body in bodies:
        assert [i["status"] for i in poll_until_done(api, body["taskUUID"])] == ["success"] * 2


def test_a_worker_killed_mid_job_hands_its_jobs_to_another(cluster: Cluster) -> None:
    api = cluster.api()
    doomed = cluster.worker()
    # Slow enough to still be running when the worker dies.
    body = task(width=768, height=768, steps=25, numberResults=2, deliveryMethod="async")
    api.post([body])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(item.get("progress", 0) > 0 for item in api.poll(body["taskUUID"])):
            break
        time.sleep(0.02)
    doomed.kill()
    cluster.worker()

    items = poll_until_done(api, body["taskUUID"])

    assert [item["status"] for item in items] == ["success", "success"]
    assert len({item["imageUUID"] for item in items}) == 2


def test_webhook_sent_once_though_every_node_runs_an_outbox(
    cluster: Cluster, loopback_http: LoopbackHTTP
) -> None:
    calls: list[Recorded] = []

    def receiver(request: Recorded) -> tuple[int, str, bytes]:
        calls.append(request)
        return (200, "text/plain", b"ok")

    loopback_http.handler = receiver
    first, _second = cluster.api(), cluster.api()
    cluster.worker()
    body = task(numberResults=2, webhookURL=loopback_http.url("/hook"))

    reply = first.post([body])
    deadline = time.monotonic() + 30
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    # Give a duplicate a fair chance to show up before counting.
    time.sleep(1.5)

    delivered = sorted(json.loads(c.body)["data"][0]["imageUUID"] for c in calls)
    assert delivered == sorted(item["imageUUID"] for item in reply["data"])


def test_a_worker_reports_health_and_metrics_on_its_own_port(cluster: Cluster) -> None:
    api = cluster.api()
    port = free_port()
    cluster.worker(IMPASTO_WORKER_PORT=str(port))
    health = f"http://127.0.0.1:{port}/healthz"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(health).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)

    api.post([task(numberResults=2)])

    # The worker acknowledges a job just after the reply goes out: wait for its count.
    deadline = time.monotonic() + 30
    while httpx.get(health).json()["completed"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = httpx.get(health).json()
    assert stats["status"] == "ok"
    assert stats["models"] == [TINY]
    assert stats["completed"] == 2
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'impasto_batch_size_count{model="impasto:tiny@1"}' in metrics


def test_utility_tasks_are_queued_to_the_worker_that_serves_their_model(
    cluster: Cluster,
) -> None:
    """An API node holds no models: an upscale of a generated image and a prompt enhance go
    through the queue to the worker serving each model; the input is read from the bucket."""
    first, second = cluster.api(), cluster.api()
    cluster.worker(TINY, "impasto:tiny-upscaler@1", "impasto:tiny-enhancer@1")
    generated = first.post([task(width=64, height=64)])["data"][0]
    upscale = {
        "taskType": "upscale",
        "taskUUID": str(uuid.uuid4()),
        "model": "impasto:tiny-upscaler@1",
        "inputImage": generated["imageUUID"],
        "upscaleFactor": 2,
    }
    reply = second.post([upscale])
    assert "errors" not in reply, reply
    (item,) = reply["data"]
    served = httpx.get(f"http://127.0.0.1:{first.port}/image/{item['imageUUID']}.jpg")
    assert served.status_code == 200
    assert Image.open(io.BytesIO(served.content)).size == (128, 128)
    enhance = {
        "taskType": "promptEnhance",
        "taskUUID": str(uuid.uuid4()),
        "model": "impasto:tiny-enhancer@1",
        "prompt": "a lantern in the fog",
        "promptVersions": 2,
        "deliveryMethod": "async",
    }
    assert first.post([enhance])["data"] == [
        {"taskType": "promptEnhance", "taskUUID": enhance["taskUUID"]}
    ]
    items = poll_until_done(second, enhance["taskUUID"])
    assert [i["status"] for i in items] == ["success", "success"]
    assert all(i["text"].strip() for i in items)
