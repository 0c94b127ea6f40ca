"""Faults for the fault tests, made with real things: a redis-server that a test stops and
starts again on the same port and data directory, a small tmpfs that a test fills, and a temp
file whose disk fills up mid-write; with the bounded polling those tests wait with."""

from __future__ import annotations

import errno
import io
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import httpx

T = TypeVar("T")

# Every wait on a service ends as soon as it is up; this only bounds a broken run.
START_DEADLINE_S = 30.0
POLL_S = 0.05


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def eventually(condition: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        time.sleep(POLL_S)


class RestartableRedis:
    """A redis-server in a directory of its own that a test stops (SIGTERM) and starts again
    on the same port. Persistent (fsynced append-only file), like a production one, it loses
    nothing that was acknowledged; not persistent, like a cache, it loses everything, the
    harshest restart for the queue (its consumer groups are gone too)."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        persistent: bool = True,
        password: str | None = None,
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.persistent = persistent
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not installed: run ./scripts/install"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                binary,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--dir", str(self.directory), "--save", ""),
                *(
                    ("--appendonly", "yes", "--appendfsync", "always")
                    if self.persistent
                    else ("--appendonly", "no")
                ),
                *(("--requirepass", self.password) if self.password else ()),
                *("--protected-mode", "no"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "redis-server exited during start-up"
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(POLL_S)
        raise AssertionError(f"redis-server did not listen on port {self.port}")

    def pending_attempts(self, prefix: str, task_uuid: str) -> int:
        """Attempts recorded on a task's pending delivery (impasto's keys under `prefix`)."""
        import redis

        with redis.Redis(port=self.port, decode_responses=True) as client:
            for delivery_id in client.zrange(f"{prefix}:deliveries:pending", 0, -1):
                fields = client.hgetall(f"{prefix}:delivery:{delivery_id}")
                if fields.get("task_uuid") == task_uuid:
                    return int(fields.get("attempts") or 0)
        return 0

    def stop(self) -> None:
        """SIGTERM, as an operator's restart sends it; waits until the port is closed."""
        if self.process is None:
            return
        self.process.terminate()
        self.process.wait(timeout=START_DEADLINE_S)
        self.process = None


def health(url: str) -> httpx.Response | None:
    """A /healthz answer, or None when the connection failed."""
    try:
        return httpx.get(url, timeout=30)
    except httpx.TransportError:
        return None


def healthy(url: str) -> bool:
    answer = health(url)
    return answer is not None and answer.status_code == 200


@contextmanager
def small_tmpfs(directory: Path, size: str = "4m") -> Iterator[str | None]:
    """Mount a tmpfs of `size` on `directory` for the block; yields None when mounted, else
    why it could not be (not root, no CAP_SYS_ADMIN in a container, no mount binary)."""
    directory.mkdir(parents=True, exist_ok=True)
    binary = shutil.which("mount")
    if binary is None:
        yield "no mount binary"
        return
    mounted = subprocess.run(
        [binary, "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        reason = (mounted.stderr.strip().splitlines() or ["no reason given"])[0]
        yield f"mounting a tmpfs is not permitted here ({reason})"
        return
    try:
        yield None
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False, capture_output=True)


def fill_disk(path: Path) -> int:
    """Write `path` until the file system answers ENOSPC; returns the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as ballast:
        # Smaller writes after big ones take the last blocks, so that even a tiny write fails.
        for size in (65536, 4096, 512, 1):
            while (count := _write_or_full(ballast, size)) is not None:
                written += count
    return written


def _write_or_full(handle: BinaryIO, size: int) -> int | None:
    """Bytes written, or None once the file system is full."""
    try:
        return handle.write(b"\0" * size)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        return None


def temp_files(root: Path) -> list[Path]:
    """Partial writes left anywhere under `root`."""
    return [p for p in root.rglob("*") if p.is_file() and p.name.endswith(".tmp")]


class FullDiskFile(io.FileIO):
    """A temp file on a disk that fills up mid-write: half the bytes land, then ENOSPC."""

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        super().write(chunk[: len(chunk) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
