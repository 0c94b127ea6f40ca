"""What bench/server_overhead.py and bench/gpu_throughput.py share: servers as subprocesses on
loopback (`ServerProcess`, and `impasto_serve` for impasto's own), an environment without the
operator's settings and offline, quiet diffusers and transformers, the prompt, the tables and
the log lines.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import httpx

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
PROMPT = "a lighthouse on a cliff at dusk, thick oil paint, impasto brush strokes"
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def logger(script: str) -> Callable[[str], None]:
    """A benchmark's progress lines on stderr, each marked with its script's name."""

    def log(message: str) -> None:
        print(f"[{script}] {message}", file=sys.stderr, flush=True)

    return log


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(*drop: str) -> dict[str, str]:
    """This environment without the operator's own settings under the `drop` prefixes
    (IMPASTO_*, ...), and offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(OFFLINE_ENV)
    return env


def quiet_libraries() -> None:
    """No progress bars or info chatter from diffusers and transformers on stderr."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def package_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def table_lines(table: list[list[str]]) -> list[str]:
    """A table's title row, a rule, then its rows, each column as wide as its widest cell."""
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True))
        for line in table
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


@dataclass
class ServerProcess:
    """A server in a subprocess, its output in a log file, up once `ready` says so of its
    health URL."""

    name: str
    command: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    port: int
    health_path: str
    ready: Callable[[httpx.Response], bool]
    # Its own process group, so that a stuck server is killed with its children (Cog runs its
    # predictor in a worker), or the caller's, so that a `timeout` around the caller reaches it.
    new_session: bool = True
    poll_s: float = 0.1
    stop_timeout_s: float = 30.0
    process: subprocess.Popen[bytes] | None = None
    reported: dict[str, Any] = field(default_factory=dict)  # what the health URL answered
    started_at: float = 0.0  # time.perf_counter() at Popen

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def launch(self) -> None:
        self.started_at = time.perf_counter()
        with self.log_path.open("wb") as sink:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.cwd,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=self.new_session,
            )

    def wait_ready(self, timeout_s: float) -> None:
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.process.returncode}")
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    response = client.get(self.base + self.health_path)
                    if self.ready(response):
                        with contextlib.suppress(ValueError):
                            self.reported = response.json()
                        return
                time.sleep(self.poll_s)
        raise RuntimeError(
            f"{self.name} did not answer {self.health_path} within {timeout_s:.0f} s"
        )

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)  # uvicorn and coglet both shut down on SIGINT
        try:
            process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            if self.new_session:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
            process.wait(timeout=30)

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def impasto_serve(
    root: Path,
    env: dict[str, str],
    name: str = "impasto",
    *,
    new_session: bool = True,
    poll_s: float = 0.1,
    stop_timeout_s: float = 30.0,
) -> ServerProcess:
    """`python -m impasto serve` on a free loopback port, with its data dir, models file
    (models.toml, written by the caller) and log under `root`: `env` (a clean environment and
    the benchmark's settings), no safety checker, and sync requests that may wait an hour."""
    port = free_port()
    environment = {
        **env,
        "IMPASTO_HOST": "127.0.0.1",
        "IMPASTO_PORT": str(port),
        "IMPASTO_DATA_DIR": str(root / "data"),
        "IMPASTO_MODELS": str(root / "models.toml"),
        "IMPASTO_SAFETY_CHECKER": "none",
        "IMPASTO_SYNC_TIMEOUT_S": "3600",
    }
    return ServerProcess(
        name=name,
        command=[sys.executable, "-m", "impasto", "serve"],
        env=environment,
        cwd=root,
        log_path=root / "server.log",
        port=port,
        health_path="/readyz",
        ready=lambda response: response.status_code == 200,
        new_session=new_session,
        poll_s=poll_s,
        stop_timeout_s=stop_timeout_s,
    )
