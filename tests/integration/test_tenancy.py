"""Many teams on one server: managed API keys, their limits, isolation, revocation and usage,
against real servers on loopback, on both state stores.

"sqlite" is the embedded server (one process owns the state file); "redis" is an API node on a
real redis-server (its own key prefix) whose generations a worker runs (an in-process
`impasto worker`: the same Runtime in a thread of its own). Keys are made and revoked with the
real `impasto keys` CLI on the server's store, as an operator would. Servers reload keys every
0.2 s; every wait for that is a bounded poll, never a sleep of a guessed length.

The module's servers (one per store) serve impasto:tiny@1 behind a gate (tests/gated_backend)
at a price, so "the task is still running" is a fact where a test needs it, and costs are not
zero. Failed authentications are not throttled there (every client is 127.0.0.1). The tests
of throttling, of public image URLs, of limits across API nodes and of a server without
operator keys start servers of their own.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner, Result
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from impasto.cli import app
from impasto.service.runtime import Runtime
from impasto.settings import Settings
from impasto.tenancy.keys import ApiKey, digest_of, new_secret
from impasto.tenancy.redis_store import RedisTenancyStore
from impasto.tenancy.sqlite_store import SqliteTenancyStore
from tests.conftest import (
    RunningServer,
    free_port,
    image_bytes,
    make_settings,
    start_server,
    tiny_task,
)
from tests.gated_backend import Gate
from tests.live import session_buffered, task_status, wait_detached, wait_until

TINY = "impasto:tiny@1"
OPERATOR = "operator-secret-of-the-tenancy-tests"
PRICE = 0.0025
STORES = ["sqlite", "redis"]
WAIT_S = 60.0

# What every server of this module runs with.
COMMON: dict[str, Any] = {
    "api_keys": [OPERATOR],
    "key_refresh_s": 0.2,
    "safety_checker": "none",
    "metrics_max_keys": 1000,
    # Every client here is 127.0.0.1: only the test of throttling throttles.
    "auth_failures_per_minute": 0,
}


# -- stores, servers, the CLI ----------------------------------------------------------------


@dataclass(frozen=True)
class StoreConfig:
    """Where one deployment keeps its state: server settings and the CLI's view of them."""

    name: str
    data_dir: Path
    settings: dict[str, Any]
    cli_env: dict[str, str | None]
    cli_args: tuple[str, ...]

    @property
    def redis(self) -> bool:
        return self.name == "redis"


def store_config(request: pytest.FixtureRequest, name: str, data_dir: Path) -> StoreConfig:
    if name == "sqlite":
        return StoreConfig(
            name,
            data_dir,
            {},
            {"IMPASTO_DATA_DIR": str(data_dir), "IMPASTO_STATE": None},
            (),
        )
    redis_server = request.getfixturevalue("redis_server")
    prefix = f"tenancy-{uuid.uuid4().hex[:10]}"
    return StoreConfig(
        name,
        data_dir,
        {"state": redis_server.url, "redis_prefix": prefix},
        {"IMPASTO_REDIS_PREFIX": prefix, "IMPASTO_STATE": None, "IMPASTO_DATA_DIR": None},
        ("--state", redis_server.url),
    )


@dataclass(frozen=True)
class Key:
    name: str
    key_id: str
    secret: str


def run_cli(store: StoreConfig, *args: str, check: bool = True) -> Result:
    """`impasto <args>` in this process, on the store's state (as an operator runs it)."""
    result = CliRunner().invoke(app, [*args, *store.cli_args], env=store.cli_env)
    if check:
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def create_key(store: StoreConfig, *options: str, name: str | None = None) -> Key:
    name = name or f"team-{uuid.uuid4().hex[:8]}"
    result = run_cli(store, "keys", "create", "--name", name, *options, "--json")
    row = json.loads(result.stdout)
    return Key(row["name"], row["id"], row["apiKey"])


async def _with_store(store: StoreConfig, work: Callable[[Any], Any]) -> Any:
    opened: SqliteTenancyStore | RedisTenancyStore
    if store.redis:
        settings = store.settings
        opened = RedisTenancyStore(settings["state"], prefix=settings["redis_prefix"])
    else:
        opened = SqliteTenancyStore(store.data_dir / "impasto.sqlite3")
    await opened.open()
    try:
        return await work(opened)
    finally:
        await opened.close()


def stop_server(server: RunningServer) -> None:
    server.stop()
    # Supervisor.close cancels again a loop that dropped its cancellation (Python 3.11's
    # asyncio.wait_for inside redis-py), so a Redis-backed server ends in bounded time.
    assert not server.thread.is_alive(), "the server did not shut down"


class InProcessWorker:
    """`impasto worker` (Runtime role "worker" and its worker loop) on an event loop of its
    own thread: the jobs an API node on the same Redis prefix queues get run."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runtime: Runtime | None = None
        self._stop: asyncio.Event | None = None
        self._main: concurrent.futures.Future[None] | None = None

    def start(self) -> None:
        self.thread.start()
        ready = threading.Event()

        async def main() -> None:
            self._stop = asyncio.Event()
            async with Runtime.start(self.settings, role="worker") as runtime:
                assert runtime.worker is not None
                runtime.supervisor.start("worker", runtime.worker.run)
                self.runtime = runtime
                ready.set()
                await self._stop.wait()
                await runtime.supervisor.close()

        self._main = asyncio.run_coroutine_threadsafe(main(), self.loop)
        wait_until(lambda: ready.is_set() or self._main is None or self._main.done(), WAIT_S)
        if not ready.is_set():
            self._main.result(timeout=1)
            raise AssertionError("the worker ended during start-up")

    def stop(self) -> None:
        if self._main is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
            self._main.result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()

    def metrics(self) -> str:
        assert self.runtime is not None
        return self.runtime.metrics.render().decode()


@dataclass
class Deployment:
    """The module's server of one store (private image URLs), and its worker on Redis."""

    store: StoreConfig
    server: RunningServer
    gate: Gate
    worker: InProcessWorker | None = None
    extra_nodes: list[RunningServer] = field(default_factory=list)

    def nodes(self) -> list[RunningServer]:
        """The server and, on Redis, a second API node on the same prefix (started once)."""
        if self.store.redis and not self.extra_nodes:
            settings = self.server.settings.model_copy(update={"port": free_port()})
            self.extra_nodes.append(start_server(settings))
        return [self.server, *self.extra_nodes]

    def key(self, *options: str) -> Key:
        return create_key(self.store, *options)

    def post(self, tasks: list[dict[str, Any]], key: Key | str | None) -> httpx.Response:
        return self.server.post(tasks, headers=bearer(key))

    def metrics(self) -> str:
        """The Prometheus text of the process that records finished images."""
        if self.worker is not None:
            return self.worker.metrics()
        return httpx.get(f"{self.server.base}/metrics", timeout=30).text


def priced_models_file(directory: Path, gate: Gate) -> Path:
    """impasto:tiny@1 through `gate`, at PRICE an image."""
    path = directory / "tenancy-models.toml"
    path.write_text(
        '[models."impasto:tiny@1"]\n'
        'backend = "tests.gated_backend:GatedTinyBackend"\n'
        f"price_usd = {PRICE}\n"
        f'settings = {{ gate = "{gate.name}" }}\n'
    )
    return path


@pytest.fixture(scope="module")
def gate() -> Gate:
    return Gate()


@pytest.fixture(scope="module", params=STORES)
def deployment(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_models_dir: Path,
    gate: Gate,
) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp(f"tenancy-{request.param}")
    store = store_config(request, request.param, root / "data")
    models = priced_models_file(root, gate)
    settings = make_settings(
        store.data_dir,
        tiny_models_dir,
        models=models,
        private_images=True,
        **COMMON,
        **store.settings,
    )
    worker = None
    running: Deployment | None = None
    try:
        if store.redis:
            # Image URLs are made where images are stored: they name the API node.
            worker = InProcessWorker(
                make_settings(
                    store.data_dir,
                    tiny_models_dir,
                    models=models,
                    worker_models=[TINY],
                    public_url=settings.image_base_url,
                    **COMMON,
                    **store.settings,
                )
            )
            worker.start()
        running = Deployment(store, start_server(settings), gate, worker)
        yield running
    finally:
        gate.release()
        if running is not None:
            for node in [running.server, *running.extra_nodes]:
                stop_server(node)
        if worker is not None:
            worker.stop()


@pytest.fixture(params=STORES)
def fresh_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreConfig:
    """A store of its own for a test that starts its own servers."""
    return store_config(request, request.param, tmp_path / "data")


OwnServer = Callable[..., RunningServer]


@pytest.fixture
def own_server(tiny_models_dir: Path) -> Iterator[OwnServer]:
    """own_server(store, **overrides): a server of the test's own on `store`, with COMMON settings;
    all are stopped at the end of the test."""
    started: list[RunningServer] = []

    def factory(store: StoreConfig, **overrides: Any) -> RunningServer:
        values = {**COMMON, **store.settings, **overrides}
        server = start_server(make_settings(store.data_dir, tiny_models_dir, **values))
        started.append(server)
        return server

    yield factory
    for server in started:
        stop_server(server)


# -- tasks and replies ------------------------------------------------------------------------


def bearer(key: Key | str | None) -> dict[str, str]:
    if key is None:
        return {}
    secret = key.secret if isinstance(key, Key) else key
    return {"Authorization": f"Bearer {secret}"}


def job(**fields: Any) -> dict[str, Any]:
    """An async imageInference: accepted at once, generated in the background."""
    return tiny_task(deliveryMethod="async", **fields)


def upload(size: tuple[int, int] = (64, 48)) -> dict[str, Any]:
    data = "data:image/png;base64," + base64.b64encode(image_bytes(size)).decode()
    return {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": data}


def get_response(task_uuid: str) -> dict[str, Any]:
    return {"taskType": "getResponse", "taskUUID": task_uuid}


def task_details(task_uuid: str) -> dict[str, Any]:
    return {"taskType": "getTaskDetails", "taskUUID": task_uuid}


def delete_media(media_uuid: str) -> dict[str, Any]:
    return {
        "taskType": "mediaStorage",
        "taskUUID": str(uuid.uuid4()),
        "operation": "delete",
        "mediaUUID": media_uuid,
    }


def account_details() -> dict[str, Any]:
    return {
        "taskType": "accountManagement",
        "taskUUID": str(uuid.uuid4()),
        "operation": "getDetails",
    }


def only_error(reply: httpx.Response) -> dict[str, Any]:
    body = reply.json()
    assert "data" not in body, body
    [error] = body["errors"]
    assert isinstance(error, dict)
    return error


def only_item(reply: httpx.Response) -> dict[str, Any]:
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert "errors" not in body, body
    [item] = body["data"]
    assert isinstance(item, dict)
    return item


def accepted(deployment: Deployment, task: dict[str, Any], key: Key | str) -> dict[str, Any]:
    item = only_item(deployment.post([task], key))
    assert item["taskUUID"] == task["taskUUID"]
    return item


def assert_rate_limited(reply: httpx.Response, task: dict[str, Any]) -> None:
    assert reply.status_code == 429, reply.text
    retry_after = reply.headers["Retry-After"]
    assert retry_after.isdigit(), retry_after
    assert int(retry_after) >= 1
    error = only_error(reply)
    assert error["code"] == "rateLimitExceeded"
    assert error["taskUUID"] == task["taskUUID"]
    assert error["taskType"] == task["taskType"]


def poll_until_done(deployment: Deployment, task_uuid: str, key: Key) -> list[dict[str, Any]]:
    deadline = time.monotonic() + WAIT_S
    while True:
        reply = deployment.post([get_response(task_uuid)], key)
        assert reply.status_code == 200, reply.text
        items: list[dict[str, Any]] = reply.json()["data"]
        if items and all(item["status"] != "processing" for item in items):
            return items
        assert time.monotonic() < deadline, items
        time.sleep(0.05)


def eventually(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll a predicate that does a request (so not a hundred times a second)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# -- WebSocket --------------------------------------------------------------------------------


def ws_url(server: RunningServer) -> str:
    return f"ws://127.0.0.1:{server.settings.port}/v1"


def ws_send(ws: ClientConnection, *tasks: dict[str, Any]) -> None:
    ws.send(json.dumps(list(tasks)))


def ws_recv(ws: ClientConnection) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(ws.recv(timeout=WAIT_S))
    return frame


def ws_auth_frame(
    ws: ClientConnection, key: Key | str, resume: str | None = None
) -> dict[str, Any]:
    task: dict[str, Any] = {
        "taskType": "authentication",
        "apiKey": key.secret if isinstance(key, Key) else key,
    }
    if resume is not None:
        task["connectionSessionUUID"] = resume
    ws_send(ws, task)
    return ws_recv(ws)


def ws_authenticate(ws: ClientConnection, key: Key | str, resume: str | None = None) -> str:
    frame = ws_auth_frame(ws, key, resume)
    assert list(frame) == ["data"], frame
    session: str = frame["data"][0]["connectionSessionUUID"]
    return session


def wait_closed_by_server(ws: ClientConnection) -> int:
    """The close code the server ends the socket with (it sends nothing else first)."""
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=WAIT_S)
    assert closed.value.rcvd is not None, "the socket ended without a close frame"
    return closed.value.rcvd.code


# -- isolation --------------------------------------------------------------------------------


def test_a_key_sees_only_its_own_tasks_and_uploads(deployment: Deployment) -> None:
    a, b = deployment.key(), deployment.key()
    task = job()
    accepted(deployment, task, a)
    uploaded = accepted(deployment, (up := upload()), a)

    for other in (b, OPERATOR):
        for asked in (get_response(task["taskUUID"]), get_response(up["taskUUID"])):
            reply = deployment.post([asked], other)
            assert reply.status_code == 404, reply.text
            assert only_error(reply)["code"] == "taskNotFound"
        details = deployment.post([task_details(task["taskUUID"])], other)
        assert details.status_code == 404, details.text
        assert only_error(details)["code"] == "taskNotFound"
        # Tasks belong to the key that sent them; an operator key is no exception.
        refused = deployment.post([delete_media(uploaded["imageUUID"])], other)
        assert refused.status_code == 400, refused.text
        assert only_error(refused)["code"] == "invalidMediaUUID"

    # B's account shows B alone, and nothing spent.
    seen = only_item(deployment.post([account_details()], b))
    assert [k["apiKeyUUID"] for k in seen["apiKeys"]] == [b.key_id]
    assert seen["usage"]["total"] == {"images": 0, "cost": 0}

    # A sees its own, and may delete its own upload.
    items = poll_until_done(deployment, task["taskUUID"], a)
    assert [item["status"] for item in items] == ["success"]
    mine = only_item(deployment.post([get_response(up["taskUUID"])], a))
    assert mine["imageUUID"] == uploaded["imageUUID"]
    deleted = only_item(deployment.post([delete_media(uploaded["imageUUID"])], a))
    assert deleted["operation"] == "delete"


def test_a_websocket_session_resumes_only_with_the_key_that_opened_it(
    deployment: Deployment,
) -> None:
    a, b = deployment.key(), deployment.key()
    server = deployment.server
    task = tiny_task()
    with deployment.gate.hold(), connect(ws_url(server)) as ws:
        session = ws_authenticate(ws, a)
        ws_send(ws, task)
        wait_until(lambda: task_status(server, task["taskUUID"]) is not None, WAIT_S)
        # Gone the way a network goes: no close frame.
        ws.socket.shutdown(socket.SHUT_RDWR)
        wait_detached(server, session)
    wait_until(lambda: session_buffered(server, session) >= 1, WAIT_S, "A's image to be kept")

    with connect(ws_url(server)) as intruder:
        other = ws_authenticate(intruder, b, resume=session)
        assert other != session
        ws_send(intruder, {"taskType": "ping", "ping": True})
        assert ws_recv(intruder) == {"data": [{"taskType": "ping", "pong": True}]}
        # Nor can B read A's task on its own session.
        ws_send(intruder, get_response(task["taskUUID"]))
        frame = ws_recv(intruder)
        assert list(frame) == ["errors"], frame
        [error] = frame["errors"]
        assert (error["code"], error["taskUUID"]) == ("taskNotFound", task["taskUUID"])
    assert session_buffered(server, session) >= 1

    with connect(ws_url(server)) as owner:
        assert ws_authenticate(owner, a, resume=session) == session
        frame = ws_recv(owner)
        assert list(frame) == ["data"], frame
        [item] = frame["data"]
        assert item["taskUUID"] == task["taskUUID"]
        assert "imageURL" in item


# -- private image URLs -----------------------------------------------------------------------


def test_private_image_urls_need_the_key_that_made_the_image(deployment: Deployment) -> None:
    a, b = deployment.key(), deployment.key()
    item = only_item(deployment.post([tiny_task()], a))
    url = item["imageURL"]

    anonymous = httpx.get(url, timeout=30)
    assert anonymous.status_code == 401, anonymous.text
    assert only_error(anonymous)["code"] == "missingApiKey"
    for other in (b, OPERATOR):
        refused = httpx.get(url, headers=bearer(other), timeout=30)
        assert refused.status_code == 404, refused.text
        assert only_error(refused)["code"] == "imageNotFound"
    served = httpx.get(url, headers=bearer(a), timeout=30)
    assert served.status_code == 200
    assert Image.open(io.BytesIO(served.content)).size == (64, 64)


def test_private_image_uuids_are_inputs_only_for_the_key_that_made_them(
    deployment: Deployment,
) -> None:
    a, b = deployment.key(), deployment.key()
    uploaded = accepted(deployment, upload((64, 64)), a)["imageUUID"]
    generated = only_item(deployment.post([tiny_task()], a))["imageUUID"]

    for image_uuid in (uploaded, generated):
        for other in (b, OPERATOR):
            seeded = job(seedImage=image_uuid, strength=0.5)
            reply = deployment.post([seeded], other)
            assert reply.status_code == 400, reply.text
            error = only_error(reply)
            assert (error["parameter"], error["taskUUID"]) == ("seedImage", seeded["taskUUID"])
            assert image_uuid in error["message"]
            copy = {**upload(), "image": image_uuid}
            reply = deployment.post([copy], other)
            assert reply.status_code == 400, reply.text
            assert only_error(reply)["parameter"] == "image"
        accepted(deployment, job(seedImage=image_uuid, strength=0.5), a)
        accepted(deployment, {**upload(), "image": image_uuid}, a)


def test_without_private_images_an_image_url_works_without_a_key(
    fresh_store: StoreConfig, own_server: OwnServer
) -> None:
    server = own_server(fresh_store)
    reply = server.post([upload()], headers=bearer(OPERATOR))
    assert reply.status_code == 200, reply.text
    served = httpx.get(reply.json()["data"][0]["imageURL"], timeout=30)
    assert served.status_code == 200
    assert served.content == image_bytes()


# -- limits -----------------------------------------------------------------------------------


def test_a_key_over_its_task_rate_gets_429_and_nothing_of_the_task_is_kept(
    deployment: Deployment,
) -> None:
    key = deployment.key("--rate", "3/min")
    first = job()
    accepted(deployment, first, key)
    # Polling is not work: getResponse takes nothing from the rate.
    for _ in range(5):
        assert deployment.post([get_response(first["taskUUID"])], key).status_code == 200
    accepted(deployment, upload(), key)
    accepted(deployment, job(), key)

    rejected = job()
    assert_rate_limited(deployment.post([rejected], key), rejected)
    refused_upload = upload()
    assert_rate_limited(deployment.post([refused_upload], key), refused_upload)

    # Nothing was accepted: the task is unknown, and its UUID is free for a later send (here
    # by a key with room left, rather than after a minute).
    unknown = deployment.post([get_response(rejected["taskUUID"])], key)
    assert unknown.status_code == 404, unknown.text
    assert only_error(unknown)["code"] == "taskNotFound"
    accepted(deployment, rejected, deployment.key())


def test_a_key_over_its_images_rate_gets_429_and_a_task_larger_than_a_minute_400(
    deployment: Deployment,
) -> None:
    key = deployment.key("--images-rate", "4")
    accepted(deployment, job(numberResults=3), key)

    over = job(numberResults=2)
    assert_rate_limited(deployment.post([over], key), over)

    too_large = job(numberResults=5)
    reply = deployment.post([too_large], key)
    assert reply.status_code == 400, reply.text
    error = only_error(reply)
    assert error["code"] == "inferenceRateLimitRequestTooLarge"
    assert error["parameter"] == "numberResults"
    assert error["taskUUID"] == too_large["taskUUID"]

    # What is left of the minute is still there.
    accepted(deployment, job(numberResults=1), key)


def test_a_key_at_its_concurrency_limit_gets_429_until_its_task_finishes(
    deployment: Deployment,
) -> None:
    key = deployment.key("--max-concurrent", "1")
    first = job()
    with deployment.gate.hold():
        accepted(deployment, first, key)
        second = job()
        # On Redis, every API node counts the same slots.
        for node in deployment.nodes():
            refused = node.post([second], headers=bearer(key))
            assert_rate_limited(refused, second)
            assert refused.headers["Retry-After"] == "1"
        # Other keys are not held back by this one's limit.
        accepted(deployment, job(), deployment.key())
        assert task_status(deployment.server, first["taskUUID"]) == "processing"
    assert [item["status"] for item in poll_until_done(deployment, first["taskUUID"], key)] == [
        "success"
    ]
    accepted(deployment, second, key)


def test_a_key_limited_to_some_models_may_not_use_another(deployment: Deployment) -> None:
    key = deployment.key("--models", TINY)
    accepted(deployment, job(), key)
    other = job(model="impasto:tiny-xl@1")
    reply = deployment.post([other], key)
    assert reply.status_code == 403, reply.text
    error = only_error(reply)
    assert error["code"] == "insufficientPermissions"
    assert error["parameter"] == "model"
    assert error["taskUUID"] == other["taskUUID"]


def test_over_websocket_a_rate_limited_task_gets_an_errors_frame(deployment: Deployment) -> None:
    key = deployment.key("--rate", "1/min")
    first, second = upload(), upload()
    with connect(ws_url(deployment.server)) as ws:
        ws_authenticate(ws, key)
        ws_send(ws, first)
        frame = ws_recv(ws)
        assert list(frame) == ["data"], frame
        assert frame["data"][0]["taskUUID"] == first["taskUUID"]
        ws_send(ws, second)
        frame = ws_recv(ws)
        assert list(frame) == ["errors"], frame
        [error] = frame["errors"]
        assert error["code"] == "rateLimitExceeded"
        assert (error["taskType"], error["taskUUID"]) == ("imageUpload", second["taskUUID"])


def test_limits_hold_across_api_nodes_on_one_redis(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    own_server: OwnServer,
) -> None:
    store = store_config(request, "redis", tmp_path / "data")
    first, second = own_server(store), own_server(store)
    key = create_key(store, "--rate", "4/min")
    for node in (first, second, first, second):
        reply = node.post([upload()], headers=bearer(key))
        assert reply.status_code == 200, reply.text
    for node in (first, second):
        task = upload()
        assert_rate_limited(node.post([task], headers=bearer(key)), task)


# -- failed authentications -------------------------------------------------------------------


def test_failed_authentications_are_throttled_per_address(
    fresh_store: StoreConfig, own_server: OwnServer
) -> None:
    server = own_server(fresh_store, auth_failures_per_minute=3)
    managed = create_key(fresh_store)
    ping = {"taskType": "ping", "ping": True}
    # Successful authentications are not counted.
    for right in (OPERATOR, managed, OPERATOR, managed):
        assert server.post([ping], headers=bearer(right)).status_code == 200
    for attempt in range(3):
        wrong = server.post([ping], headers=bearer(f"imp_wrong-{attempt}"))
        assert wrong.status_code == 401, wrong.text
        assert only_error(wrong)["code"] == "invalidApiKey"

    # Past the limit, the right keys are refused too, until the bucket refills.
    for right in (OPERATOR, managed):
        reply = server.post([ping], headers=bearer(right))
        assert reply.status_code == 429, reply.text
        assert int(reply.headers["Retry-After"]) >= 1
        error = only_error(reply)
        assert error["code"] == "rateLimitExceeded"
        assert error["parameter"] == "apiKey"
    with connect(ws_url(server)) as ws:
        frame = ws_auth_frame(ws, OPERATOR)
        assert list(frame) == ["errors"], frame
        [error] = frame["errors"]
        assert error["code"] == "rateLimitExceeded"
        assert error["taskType"] == "authentication"
    if fresh_store.redis:
        # The failures are counted in Redis: another API node refuses the address too.
        other = own_server(fresh_store, auth_failures_per_minute=3)
        reply = other.post([ping], headers=bearer(OPERATOR))
        assert reply.status_code == 429, reply.text
        assert only_error(reply)["code"] == "rateLimitExceeded"


# -- revocation and expiry --------------------------------------------------------------------


def test_revoking_a_key_closes_its_websocket_and_refuses_it_everywhere(
    deployment: Deployment,
) -> None:
    key = deployment.key()
    kept = deployment.key()
    server = deployment.server
    with connect(ws_url(server)) as ws, connect(ws_url(server)) as other:
        ws_authenticate(ws, key)
        ws_authenticate(other, kept)
        result = run_cli(deployment.store, "keys", "revoke", key.name)
        assert key.key_id in result.stdout

        assert wait_closed_by_server(ws) == 1008
        # Another key's socket stays.
        ws_send(other, {"taskType": "ping", "ping": True})
        assert ws_recv(other)["data"][0]["pong"] is True

    with connect(ws_url(server)) as again:
        frame = ws_auth_frame(again, key)
        assert list(frame) == ["errors"], frame
        assert frame["errors"][0]["code"] == "invalidApiKey"
    reply = deployment.post([{"taskType": "ping", "ping": True}], key)
    assert reply.status_code == 401, reply.text
    assert only_error(reply)["code"] == "invalidApiKey"

    listed = json.loads(run_cli(deployment.store, "keys", "list", "--all", "--json").stdout)
    assert {row["id"]: row["status"] for row in listed}[key.key_id] == "revoked"
    assert key.key_id not in {
        row["id"] for row in json.loads(run_cli(deployment.store, "keys", "list", "--json").stdout)
    }


def test_revoking_the_last_managed_key_does_not_open_the_server(
    fresh_store: StoreConfig, own_server: OwnServer
) -> None:
    # No operator keys: managed keys alone close the server.
    server = own_server(fresh_store, api_keys=[])
    ping = {"taskType": "ping", "ping": True}
    assert server.post([ping]).status_code == 200
    key = create_key(fresh_store)
    eventually(lambda: server.post([ping]).status_code == 401, "the first key to close the server")
    with connect(ws_url(server)) as ws:
        ws_authenticate(ws, key)
        run_cli(fresh_store, "keys", "revoke", key.name)
        # The server has seen the revocation once it closes the key's socket.
        assert wait_closed_by_server(ws) == 1008

    revoked = server.post([ping], headers=bearer(key))
    assert revoked.status_code == 401, revoked.text
    assert only_error(revoked)["code"] == "invalidApiKey"
    anonymous = server.post([ping])
    assert anonymous.status_code == 401, anonymous.text


def test_a_key_cannot_be_made_already_expired(deployment: Deployment) -> None:
    result = run_cli(
        deployment.store, "keys", "create", "--name", "late", "--expires", "2020-01-01", check=False
    )
    assert result.exit_code != 0
    assert "past" in result.output


def test_an_expired_key_is_refused_and_its_websocket_closed(deployment: Deployment) -> None:
    secret = new_secret()
    now = time.time()
    key = ApiKey(
        key_id=f"key_{uuid.uuid4().hex[:12]}",
        name=f"brief-{uuid.uuid4().hex[:8]}",
        digest=digest_of(secret),
        hint=secret[:8],
        created_at=now,
        expires_at=now + 4.0,
    )

    async def make(store: Any) -> None:
        await store.create_key(key)

    asyncio.run(_with_store(deployment.store, make))
    ping = {"taskType": "ping", "ping": True}
    with connect(ws_url(deployment.server)) as ws:
        ws_authenticate(ws, secret)
        assert deployment.post([ping], secret).status_code == 200
        assert wait_closed_by_server(ws) == 1008
    reply = deployment.post([ping], secret)
    assert reply.status_code == 401, reply.text
    assert "expired" in only_error(reply)["message"]


# -- usage ------------------------------------------------------------------------------------


def metric(text: str, name: str, key: str) -> float:
    prefix = f'{name}{{key="{key}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def test_usage_is_metered_per_key_and_reported_everywhere(deployment: Deployment) -> None:
    a = deployment.key()
    priced = tiny_task(numberResults=2, includeCost=True)
    plain = tiny_task()
    priced_reply = deployment.post([priced], a)
    assert priced_reply.status_code == 200, priced_reply.text
    priced_items = priced_reply.json()["data"]
    assert len(priced_items) == 2
    costs = [item["cost"] for item in priced_items]
    plain_item = only_item(deployment.post([plain], a))
    assert "cost" not in plain_item
    # The same size of the same model: the same price, asked for or not.
    expected_cost = sum(costs) + costs[0]
    assert costs == [pytest.approx(PRICE)] * 2

    def totals() -> dict[str, Any]:
        details = only_item(deployment.post([account_details()], a))
        total: dict[str, Any] = details["usage"]["total"]
        return total

    eventually(lambda: totals()["images"] >= 3, "the images to be metered")
    details = only_item(deployment.post([account_details()], a))
    assert [k["apiKeyUUID"] for k in details["apiKeys"]] == [a.key_id]
    assert details["apiKeys"][0]["name"] == a.name
    assert details["currentApiKey"]["apiKeyUUID"] == a.key_id
    assert details["currentApiKey"]["operator"] is False
    for window in ("total", "last24Hours"):
        assert details["usage"][window]["images"] == 3
        assert details["usage"][window]["cost"] == pytest.approx(expected_cost)
    [per_model] = details["usage"]["models"]
    assert per_model["model"] == TINY
    assert per_model["images"] == 3

    usage = json.loads(run_cli(deployment.store, "usage", "--key", a.name, "--json").stdout)
    assert usage["total"]["images"] == 3
    assert usage["total"]["cost"] == pytest.approx(expected_cost)
    assert {row["keyId"] for row in usage["rows"]} == {a.key_id}

    # The operator sees every key.
    everyone = only_item(deployment.post([account_details()], OPERATOR))
    listed = json.loads(run_cli(deployment.store, "keys", "list", "--all", "--json").stdout)
    assert {k["apiKeyUUID"] for k in everyone["apiKeys"]} == {row["id"] for row in listed}
    assert everyone["currentApiKey"]["operator"] is True
    assert everyone["usage"]["total"]["images"] >= 3

    task = only_item(deployment.post([task_details(priced["taskUUID"])], a))
    assert task["request"] == [priced]
    assert task["status"] == "success"
    assert sorted(i["imageUUID"] for i in task["response"]["data"]) == sorted(
        i["imageUUID"] for i in priced_items
    )
    assert task["cost"] == pytest.approx(sum(costs))
    assert task["timings"]["totalMs"] >= 0
    assert [image["status"] for image in task["timings"]["images"]] == ["success"] * 2
    unasked = only_item(deployment.post([task_details(plain["taskUUID"])], a))
    assert unasked["cost"] == pytest.approx(costs[0])

    def metered() -> bool:
        text = deployment.metrics()
        return metric(text, "impasto_key_images_total", a.name) == 3

    eventually(metered, "the per-key metrics")
    text = deployment.metrics()
    assert metric(text, "impasto_key_cost_total", a.name) == pytest.approx(expected_cost)
