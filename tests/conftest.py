"""Shared fixtures: a real impasto server on loopback (uvicorn in a thread), a loopback HTTP
server for reference images and receivers, and the tiny model built once per session."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from PIL import Image

from impasto.api.app import create_app
from impasto.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline, built once and shared by every server of the session."""
    from impasto.backends.tiny import ensure_tiny_pipeline

    root = tmp_path_factory.mktemp("models")
    ensure_tiny_pipeline(root / "impasto-tiny")
    return root


@pytest.fixture(scope="session")
def tiny_flux_dir(tiny_models_dir: Path) -> Path:
    """The tiny FLUX pipeline, built once into the shared models dir (servers find it there)."""
    from impasto.backends.tiny_flux import ensure_tiny_flux

    return ensure_tiny_flux(tiny_models_dir / "impasto-tiny-flux")


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tiny_models_dir: Path) -> Path:
    """The saved tiny pipeline itself (what the tiny assets are built for)."""
    return tiny_models_dir / "impasto-tiny"


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """For a module of tiny-tensor tests: one thread is as fast, and on a shared CPU it does
    not fight the other test processes for cores (oversubscribed, such tests ran 4x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_settings(data_dir: Path, models_cache: Path | None = None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "models_cache": models_cache,
        "host": "127.0.0.1",
        "port": free_port(),
        # The tests fetch from and deliver to their own loopback servers.
        "allow_private_networks": True,
        "sweep_interval_s": 3600.0,
        # The suite shares two cores between servers, clients and pytest itself.
        "torch_threads": 1,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class RunningServer:
    settings: Settings
    thread: threading.Thread
    server: uvicorn.Server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}/v1"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def post(self, tasks: Any, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url, json=tasks, timeout=120, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def runtime(self) -> Any:
        """The server's service.runtime.Runtime (for white-box checks)."""
        return self.server.config.app.state.runtime

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the server's own event loop and wait for its result."""
        loop = self.server.servers[0].get_loop()
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=timeout)


def start_server(settings: Settings) -> RunningServer:
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.started:
            return RunningServer(settings, thread, server)
        if not thread.is_alive():
            raise RuntimeError("server thread died during start-up")
        time.sleep(0.02)
    raise RuntimeError("server did not start within 60 s")


@pytest.fixture
def server_factory(tmp_path: Path, tiny_models_dir: Path) -> Iterator[Callable[..., RunningServer]]:
    """Start servers with setting overrides; all are stopped at the end of the test."""
    started: list[RunningServer] = []

    def factory(data_dir: Path | None = None, **overrides: Any) -> RunningServer:
        settings = make_settings(data_dir or tmp_path / "data", tiny_models_dir, **overrides)
        running = start_server(settings)
        started.append(running)
        return running

    yield factory
    for running in started:
        running.stop()


@pytest.fixture
def server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    return server_factory()


def tiny_task(**fields: Any) -> dict[str, Any]:
    """A small imageInference task for impasto:tiny@1 with a fresh taskUUID."""
    task: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "impasto:tiny@1",
        "positivePrompt": "a lighthouse at dusk",
        "width": 64,
        "height": 64,
    }
    task.update(fields)
    return task


def image_bytes(size: tuple[int, int] = (64, 48), fmt: str = "PNG", color: Any = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class LoopbackHTTP:
    """A loopback HTTP server whose routes are set per test; it records every request."""

    port: int
    routes: dict[str, tuple[int, str, bytes]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    handler: Callable[[Recorded], tuple[int, str, bytes] | None] | None = None
    received: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def loopback_http() -> Iterator[LoopbackHTTP]:
    state = LoopbackHTTP(port=0)

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            record = Recorded(self.command, self.path, dict(self.headers), body)
            state.requests.append(record)
            state.received.set()
            answer = state.handler(record) if state.handler else None
            if answer is None:
                answer = state.routes.get(self.path.split("?")[0], (404, "text/plain", b"nope"))
            status, content_type, payload = answer
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


pytest_plugins = ["tests.services"]
