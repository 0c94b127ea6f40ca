"""Faults while tasks flow, on real processes and real file systems: a redis-server stopped
(SIGTERM) and started again on the same port and data directory under an API node and a worker
(`impasto serve` / `impasto worker` processes), and a server whose disk fills up.

What must hold: no 500 and no dropped connection; the outage or the full disk is reported
(503 with a code and Retry-After, /readyz 503 with its problems); every accepted task ends
(success or an error item with a code) within a bounded time without restarting anything; the
outbox survives the outage; nothing half-written is left behind."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LoopbackHTTP, Recorded, RunningServer
from tests.faults import (
    FullDiskFile,
    RestartableRedis,
    eventually,
    fill_disk,
    free_port,
    health,
    healthy,
    small_tmpfs,
    temp_files,
)
from tests.processes import ImpastoProcess, ServerProcess

TINY = "impasto:tiny@1"
OUTAGE_S = 5.0
# Tasks accepted before a fault end within this much once it is over.
RECOVERY_S = 60.0
# Codes an accepted task may end with after a fault: each says what went wrong.
FAULT_CODES = {"serviceUnavailable", "storageFull", "inferenceError", "taskInterrupted"}


def task(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": TINY,
        "positivePrompt": "a lantern in the fog",
        "width": 128,
        "height": 128,
        "deliveryMethod": "async",
    }
    body.update(fields)
    return body


def post(base: str, tasks: list[dict[str, Any]]) -> httpx.Response:
    """A REST call that must be answered: a dropped connection fails the test here."""
    return httpx.post(f"{base}/v1", json=tasks, timeout=60)


def results(base: str, task_uuid: str) -> list[dict[str, Any]] | None:
    """getResponse items; None when the server says to retry later (503 + Retry-After), as it
    may while its state store is away or just back."""
    reply = post(base, [{"taskType": "getResponse", "taskUUID": task_uuid}])
    body = reply.json()
    if reply.status_code == 503:
        assert [e["code"] for e in body["errors"]] == ["serviceUnavailable"], body
        assert int(reply.headers["Retry-After"]) > 0
        return None
    assert reply.status_code == 200, reply.text
    assert "errors" not in body, body
    items: list[dict[str, Any]] = body["data"]
    return items


def ended(base: str, task_uuid: str) -> list[dict[str, Any]] | None:
    """The task's items once none is processing, else None."""
    items = results(base, task_uuid)
    return items if items and all(i["status"] != "processing" for i in items) else None


def assert_ended_clearly(items: list[dict[str, Any]], codes: set[str] = FAULT_CODES) -> None:
    for item in items:
        assert item["status"] in ("success", "error"), item
        if item["status"] == "error":
            assert item["error"]["code"] in codes, item


# --- Redis restarted under an API node and a worker -----------------------------------------


class Deployment:
    """One API node and one worker process on a restartable redis-server; images in a data
    directory both share."""

    def __init__(self, redis: RestartableRedis, prefix: str, api_port: int, worker_port: int):
        self.redis = redis
        self.prefix = prefix
        self.base = f"http://127.0.0.1:{api_port}"
        self.worker_health = f"http://127.0.0.1:{worker_port}/readyz"

    def outage_begins(self) -> float:
        self.redis.stop()
        return time.monotonic()


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("faults")
    redis = RestartableRedis(root / "redis")
    redis.start()
    prefix = f"f{uuid.uuid4().hex[:8]}"
    env = {
        "IMPASTO_STATE": redis.url,
        "IMPASTO_REDIS_PREFIX": prefix,
        "IMPASTO_DATA_DIR": str(root / "data"),
        "IMPASTO_MODELS_CACHE": str(tiny_models_dir),
        "IMPASTO_SAFETY_CHECKER": "none",
        "IMPASTO_ALLOW_PRIVATE_NETWORKS": "true",
        "IMPASTO_TORCH_THREADS": "1",
        "IMPASTO_WORKER_LEASE_S": "3",
        # A refused webhook is retried 2 to 4 s later: long enough to stop Redis in between.
        "IMPASTO_DELIVERY_BASE_DELAY_S": "4",
        "IMPASTO_DELIVERY_MAX_DELAY_S": "4",
    }
    api = ServerProcess(free_port(), env, root / "api.log")
    worker_port = free_port()
    # Loaded before its /readyz answers, while the API node starts.
    worker_env = {**env, "IMPASTO_WORKER_PORT": str(worker_port), "IMPASTO_PRELOAD": TINY}
    worker = ImpastoProcess(["worker", "--model", TINY], worker_env, root / "worker.log")
    try:
        worker.start()  # starts up while the API node does
        api.start()
        running = Deployment(redis, prefix, api.port, worker_port)
        eventually(lambda: healthy(running.worker_health), 90, "the worker ready (/readyz)")
        yield running
    finally:
        worker.stop()
        api.stop()
        redis.stop()


def test_tasks_in_flight_through_a_redis_restart_all_end_and_health_recovers(
    deployment: Deployment,
) -> None:
    base = deployment.base
    # Enough steps that twelve images take a few seconds, however fast the machine: Redis
    # must stop while some still run.
    bodies = [task(numberResults=2, width=64, height=64, steps=30) for _ in range(6)]
    ack = post(base, bodies)
    assert ack.status_code == 200, ack.text

    def first_image() -> list[dict[str, Any]] | None:
        items = [i for b in bodies for i in results(base, b["taskUUID"]) or []]
        return items if any(i["status"] == "success" for i in items) else None

    # Stop Redis once the first image is stored, with the rest still to run.
    before = eventually(first_image, 60, "a first image")
    down_at = deployment.outage_begins()
    try:
        assert any(i["status"] == "processing" for i in before), "all done before Redis stopped"
        # The API node says what is wrong, fast, and keeps answering.
        reply = eventually(
            lambda: (r := health(f"{base}/readyz")) is not None and r.status_code == 503 and r,
            20,
            "the API node reporting the outage",
        )
        problems = reply.json()["problems"]
        assert isinstance(problems, list), reply.json()
        assert any("state store" in p for p in problems), problems
        eventually(
            lambda: (r := health(deployment.worker_health)) is not None and r.status_code == 503,
            20,
            "the worker reporting the outage",
        )
        refused_body = task()
        refused = post(base, [refused_body])
        assert refused.status_code == 503, refused.text
        assert [e["code"] for e in refused.json()["errors"]] == ["serviceUnavailable"]
        assert int(refused.headers["Retry-After"]) > 0
        # Keep it down a while, asking for health meanwhile: every answer is a 503 with problems.
        while time.monotonic() - down_at < OUTAGE_S:
            answer = health(f"{base}/readyz")
            assert answer is not None, "the API node dropped a health check"
            assert answer.status_code == 503, answer.text
            assert answer.json()["problems"]
            time.sleep(0.25)
    finally:
        deployment.redis.start()

    for body in bodies:
        items = eventually(lambda b=body: ended(base, b["taskUUID"]), RECOVERY_S, "the task ending")
        assert len(items) == 2, items
        assert_ended_clearly(items)
    eventually(lambda: healthy(f"{base}/readyz"), 30, "the API node healthy again")
    eventually(lambda: healthy(deployment.worker_health), 30, "the worker healthy again")
    # The refused task was never accepted: its taskUUID is still free. A client that retries
    # as told (503 + Retry-After) gets it accepted, and it runs.
    resubmitted = eventually(
        lambda: accepted_or_told_to_retry(base, refused_body), 30, "the resubmission accepted"
    )
    assert resubmitted.json()["data"][0]["taskUUID"] == refused_body["taskUUID"]
    final = eventually(lambda: ended(base, refused_body["taskUUID"]), RECOVERY_S, "the task")
    assert [i["status"] for i in final] == ["success"]


def accepted_or_told_to_retry(base: str, body: dict[str, Any]) -> httpx.Response | None:
    """The reply once the task is accepted; None after a 503 that says when to retry."""
    reply = post(base, [body])
    if reply.status_code == 503:
        assert int(reply.headers["Retry-After"]) > 0, reply.headers
        assert reply.json()["errors"][0]["code"] == "serviceUnavailable", reply.text
        return None
    assert reply.status_code == 200, reply.text
    return reply


def test_a_webhook_pending_when_redis_stops_is_delivered_once_it_is_back(
    deployment: Deployment, loopback_http: LoopbackHTTP
) -> None:
    base = deployment.base
    receiver_up = threading.Event()
    refused_once = threading.Event()
    delivered: list[Recorded] = []

    def receiver(request: Recorded) -> tuple[int, str, bytes]:
        if receiver_up.is_set():
            delivered.append(request)
            return (200, "text/plain", b"ok")
        refused_once.set()
        return (503, "text/plain", b"down for maintenance")

    loopback_http.handler = receiver
    body = task(webhookURL=loopback_http.url("/hook"))
    assert post(base, [body]).status_code == 200
    assert refused_once.wait(60), "the webhook was never attempted"
    # Redis stops once the refusal is recorded (the delivery pending, its retry 2 to 4 s away).
    eventually(
        lambda: deployment.redis.pending_attempts(deployment.prefix, body["taskUUID"]),
        10,
        "the attempt recorded",
    )
    down_at = deployment.outage_begins()
    try:
        eventually(
            lambda: (r := health(f"{base}/readyz")) is not None and r.status_code == 503,
            20,
            "the API node reporting the outage",
        )
        while time.monotonic() - down_at < OUTAGE_S / 2:
            time.sleep(0.25)
    finally:
        receiver_up.set()
        deployment.redis.start()

    eventually(lambda: delivered, 40, "the webhook delivered after the restart")
    payload = delivered[0].body.decode()
    assert body["taskUUID"] in payload, payload
    assert '"imageUUID"' in payload, payload
    final = eventually(lambda: ended(base, body["taskUUID"]), 30, "the task's results")
    assert [i["status"] for i in final] == ["success"]
    eventually(lambda: healthy(f"{base}/readyz"), 30, "the API node healthy again")


def test_the_first_calls_after_a_redis_restart_succeed(tmp_path: Path) -> None:
    import asyncio

    from impasto.state.redis_queue import RedisJobQueue
    from impasto.state.redis_store import RedisStateStore

    redis = RestartableRedis(tmp_path / "redis")
    redis.start()

    async def scenario() -> None:
        # Built as the runtime builds them (no retry given).
        state = RedisStateStore(redis.url, prefix="stale")
        queue = RedisJobQueue(redis.url, prefix="stale")
        await state.open()
        try:
            assert await state.get_task(str(uuid.uuid4())) is None
            assert await queue.depth(TINY) == 0
            redis.stop()
            redis.start()
            assert await state.get_task(str(uuid.uuid4())) is None
            assert await queue.depth(TINY) == 0
        finally:
            await queue.close()
            await state.close()

    try:
        asyncio.run(scenario())
    finally:
        redis.stop()


# --- A full disk under a server in one process ----------------------------------------------


class DiskFault:
    """A server whose image storage (and, with `state_too`, its SQLite file) can be filled."""

    def __init__(self, server: RunningServer, images_dir: Path, state_too: bool) -> None:
        self.server = server
        self.images_dir = images_dir
        self.state_too = state_too
        self.fill: Callable[[], object] = lambda: None
        self.free: Callable[[], object] = lambda: None


@pytest.fixture(params=["images-on-tmpfs", "data-dir-on-tmpfs", "images-store-double"])
def disk_fault(
    request: pytest.FixtureRequest,
    server_factory: Callable[..., RunningServer],
    tmp_path: Path,
) -> Iterator[DiskFault]:
    variant: str = request.param
    if variant == "images-store-double":
        # Needs no mount, so it runs where a tmpfs cannot be mounted. The runtime takes no
        # other store, so the running server's LocalImageStore gets a failing temp-file opener
        # (its private `_opener`, the seam its constructor offers).
        server = server_factory(safety_checker="none")
        store = server.runtime().images
        fault = DiskFault(server, server.settings.images_dir, state_too=False)
        own_opener = store._opener

        def fill() -> None:
            store._opener = lambda path: FullDiskFile(path, "x")

        def free() -> None:
            store._opener = own_opener

        fault.fill, fault.free = fill, free
        yield fault
        return
    small = tmp_path / "small"
    with small_tmpfs(small, size="4m") as refused:
        if refused is not None:
            pytest.skip(f"{variant}: {refused}; images-store-double covers this instead")
        if variant == "data-dir-on-tmpfs":
            server = server_factory(data_dir=small, safety_checker="none")
        else:
            server = server_factory(storage=str(small / "images"), safety_checker="none")
        fault = DiskFault(server, small / "images", state_too=variant == "data-dir-on-tmpfs")
        ballast = small / "ballast"
        fault.fill = lambda: fill_disk(ballast)
        fault.free = ballast.unlink
        try:
            yield fault
        finally:
            server.stop()  # before the file system goes


def test_a_full_disk_fails_tasks_with_storage_full_and_recovers_without_restart(
    disk_fault: DiskFault, caplog: pytest.LogCaptureFixture
) -> None:
    base = disk_fault.server.base
    flowing = [task(numberResults=2, width=64, height=64) for _ in range(3)]
    assert post(base, flowing).status_code == 200
    disk_fault.fill()
    accepted = list(flowing)
    during = [task(numberResults=2, width=64, height=64) for _ in range(3)]
    for body in during:
        reply = post(base, [body])
        if reply.status_code == 503:
            # Refused before acceptance: the state store had no room for the task.
            assert [e["code"] for e in reply.json()["errors"]] == ["storageFull"], reply.text
            assert int(reply.headers["Retry-After"]) > 0
        else:
            assert reply.status_code == 200, reply.text
            accepted.append(body)

    if disk_fault.state_too:
        # Errors cannot be stored either: the recorder retries them until there is room (and
        # the engine waits meanwhile). Free it once that has happened, or all has ended.
        eventually(
            lambda: (
                any("until storage is back" in r.getMessage() for r in caplog.records)
                or all(ended(base, b["taskUUID"]) for b in accepted)
            ),
            30,
            "a generation meeting the full disk",
        )
    else:
        # The SQLite file has room: every task accepted on the full disk ends with storageFull.
        for body in accepted:
            items = eventually(lambda b=body: ended(base, b["taskUUID"]), 30, "the task ending")
            assert_ended_clearly(items, {"storageFull"})
            if body in during:
                assert {i["status"] for i in items} == {"error"}, items
    disk_fault.free()

    for body in accepted:
        items = eventually(lambda b=body: ended(base, b["taskUUID"]), 30, "the task ending")
        assert len(items) == 2, items
        assert_ended_clearly(items, {"storageFull"})
    again = post(base, [task(numberResults=2, width=64, height=64, deliveryMethod="sync")])
    assert again.status_code == 200, again.text
    assert len({i["imageUUID"] for i in again.json()["data"]}) == 2, again.text
    assert temp_files(disk_fault.images_dir) == []
    assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
