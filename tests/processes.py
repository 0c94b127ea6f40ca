"""impasto in processes of its own (`python -m impasto serve | worker`), so tests can run
several nodes and kill them for real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx


class ImpastoProcess:
    """One `python -m impasto <command>` with IMPASTO_* settings from `env`."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path | None = None) -> None:
        self.command = command
        self.env = {**os.environ, "IMPASTO_LOG_LEVEL": "warning", **env}
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        output = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "impasto", *self.command],
            env=self.env,
            stdout=output,
            stderr=output,
        )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class ServerProcess(ImpastoProcess):
    """`impasto serve` on a port, waited for until /readyz answers 200."""

    def __init__(self, port: int, env: dict[str, str], log: Path | None = None) -> None:
        super().__init__(
            ["serve"], {**env, "IMPASTO_PORT": str(port), "IMPASTO_HOST": "127.0.0.1"}, log
        )
        self.port = port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        super().start()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.alive, f"server exited during start-up (log: {self.log})"
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("server did not become healthy")

    def post(self, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        reply: dict[str, Any] = httpx.post(self.url, json=tasks, timeout=120).json()
        return reply

    def poll(self, task_uuid: str) -> list[dict[str, Any]]:
        reply = self.post([{"taskType": "getResponse", "taskUUID": task_uuid}])
        assert "errors" not in reply, reply
        items: list[dict[str, Any]] = reply["data"]
        return items
