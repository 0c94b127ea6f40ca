"""Hold many WebSocket sessions against a real impasto server and make them all work.

    .venv/bin/python bench/ws_sessions.py [--sessions 200] [--tasks-per-session 2]

Starts `impasto serve` as a subprocess on a free loopback port (tiny model, a fresh data dir),
so the server's memory can be read from /proc/<pid>/status. Then:

1. memory of the idle server (the model loaded by one warm-up task);
2. N sessions connect and authenticate, and stay open: memory again, per session;
3. all sessions at once submit their tasks (sync imageInference, small images, one step), each
   session one task at a time, and wait for each image on their own socket: tasks/s, latency;
4. baseline: the same tasks through REST (POST /v1 from N concurrent clients, one at a time);
5. every session answers a ping: the sessions were held throughout.

Nothing may be lost: each task must come back with its own image, else the exit status is 1.
`--json` prints the summary as one JSON object instead of the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

MODEL = "impasto:tiny@1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kb(pid: int) -> int:
    """Resident memory of a process, from /proc/<pid>/status (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def task(size: int, steps: int) -> dict[str, Any]:
    return {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": MODEL,
        "positivePrompt": "a lighthouse at dusk",
        "width": size,
        "height": size,
        "steps": steps,
        "outputType": "URL",
    }


@dataclass
class Server:
    """`impasto serve` in a subprocess."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @classmethod
    def start(cls, data_dir: Path, models_cache: Path | None, timeout: float = 180) -> Server:
        port = free_port()
        env = {
            **os.environ,
            "IMPASTO_HOST": "127.0.0.1",
            "IMPASTO_PORT": str(port),
            "IMPASTO_DATA_DIR": str(data_dir),
            "IMPASTO_LOG_LEVEL": "warning",
        }
        if models_cache is not None:
            env["IMPASTO_MODELS_CACHE"] = str(models_cache)
        log = data_dir / "server.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "impasto", "serve"],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        server = cls(process, port, log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited ({process.returncode}):\n{log.read_text()}")
            try:
                if httpx.get(f"{server.base}/healthz", timeout=2).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        server.stop()
        raise RuntimeError(f"server did not start within {timeout:g} s")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    def rss_kb(self) -> int:
        return rss_kb(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)

    def add(self, other: Outcome) -> None:
        self.latencies.extend(other.latencies)
        self.lost.extend(other.lost)


async def recv(ws: ClientConnection, timeout: float) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    return frame


async def open_session(url: str, timeout: float) -> ClientConnection:
    # The server closes idle sockets after 120 s and pings are answered by the library.
    ws = await connect(url, open_timeout=timeout, max_size=None)
    await ws.send(json.dumps([{"taskType": "authentication", "apiKey": "bench"}]))
    reply = await recv(ws, timeout)
    if "connectionSessionUUID" not in reply.get("data", [{}])[0]:
        raise RuntimeError(f"authentication failed: {reply}")
    return ws


async def run_session_tasks(
    ws: ClientConnection, count: int, size: int, steps: int, timeout: float
) -> Outcome:
    """Submit `count` tasks one after the other on one session, each when the previous one's
    image is in (as the REST baseline's clients do); each must come back with its image."""
    outcome = Outcome()
    for _ in range(count):
        one = task(size, steps)
        started = time.monotonic()
        await ws.send(json.dumps([one]))
        deadline = started + timeout
        try:
            while True:
                frame = await recv(ws, max(0.1, deadline - time.monotonic()))
                items = [i for i in frame.get("data", []) if i.get("taskUUID") == one["taskUUID"]]
                errors = [
                    e for e in frame.get("errors", []) if e.get("taskUUID") == one["taskUUID"]
                ]
                if errors:
                    outcome.lost.append(f"{errors[0].get('code')}: {errors[0].get('message')}")
                    break
                if any(item.get("imageURL") for item in items):
                    outcome.latencies.append(time.monotonic() - started)
                    break
        except (TimeoutError, OSError) as exc:
            outcome.lost.append(f"{one['taskUUID']}: {type(exc).__name__}")
    return outcome


async def still_open(ws: ClientConnection, timeout: float) -> bool:
    try:
        await ws.send(json.dumps([{"taskType": "ping", "ping": True}]))
        while True:
            frame = await recv(ws, timeout)
            if frame.get("data", [{}])[0].get("pong") is True:
                return True
    except Exception:
        return False


async def rest_baseline(
    server: Server, clients: int, total: int, size: int, steps: int, timeout: float
) -> tuple[Outcome, float]:
    """The same tasks over REST, `clients` requests in flight at a time."""
    outcome = Outcome()
    queue = [task(size, steps) for _ in range(total)]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            one = queue.pop()
            started = time.monotonic()
            try:
                response = await client.post(f"{server.base}/v1", json=[one])
                items = response.json().get("data", [])
            except (httpx.HTTPError, ValueError) as exc:
                outcome.lost.append(f"{one['taskUUID']}: {type(exc).__name__}")
                continue
            if any(i.get("taskUUID") == one["taskUUID"] and i.get("imageURL") for i in items):
                outcome.latencies.append(time.monotonic() - started)
            else:
                outcome.lost.append(f"{one['taskUUID']}: {response.text[:200]}")

    started = time.monotonic()
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return outcome, time.monotonic() - started


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


async def bench(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    timeout = args.timeout
    warm = await open_session(server.ws_url, timeout)
    warm_outcome = await run_session_tasks(warm, 1, args.size, args.steps, timeout)
    await warm.close()
    if warm_outcome.lost:
        raise RuntimeError(f"warm-up task failed: {warm_outcome.lost}")
    await asyncio.sleep(0.5)  # let the warm-up session's socket close settle
    idle_kb = server.rss_kb()

    connect_started = time.monotonic()
    sockets = await asyncio.gather(
        *(open_session(server.ws_url, timeout) for _ in range(args.sessions))
    )
    connect_s = time.monotonic() - connect_started
    await asyncio.sleep(0.5)
    sessions_kb = server.rss_kb()

    total = args.sessions * args.tasks_per_session
    load_started = time.monotonic()
    outcomes = await asyncio.gather(
        *(
            run_session_tasks(ws, args.tasks_per_session, args.size, args.steps, timeout)
            for ws in sockets
        )
    )
    load_s = time.monotonic() - load_started
    loaded_kb = server.rss_kb()
    ws_outcome = Outcome()
    for one in outcomes:
        ws_outcome.add(one)

    rest_outcome, rest_s = (Outcome(), 0.0)
    if not args.no_baseline:
        rest_outcome, rest_s = await rest_baseline(
            server, args.sessions, total, args.size, args.steps, timeout
        )

    alive = await asyncio.gather(*(still_open(ws, timeout) for ws in sockets))
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)

    def rate(outcome: Outcome, seconds: float) -> float:
        return len(outcome.latencies) / seconds if seconds else float("nan")

    return {
        "sessions": args.sessions,
        "sessions_held": sum(alive),
        "connect_s": round(connect_s, 3),
        "tasks": total,
        "size": args.size,
        "steps": args.steps,
        "ws": {
            "images": len(ws_outcome.latencies),
            "lost": len(ws_outcome.lost),
            "seconds": round(load_s, 3),
            "tasks_per_s": round(rate(ws_outcome, load_s), 2),
            "p50_s": round(percentile(ws_outcome.latencies, 50), 3),
            "p99_s": round(percentile(ws_outcome.latencies, 99), 3),
        },
        "rest": {
            "images": len(rest_outcome.latencies),
            "lost": len(rest_outcome.lost),
            "seconds": round(rest_s, 3),
            "tasks_per_s": round(rate(rest_outcome, rest_s), 2),
            "p50_s": round(percentile(rest_outcome.latencies, 50), 3),
            "p99_s": round(percentile(rest_outcome.latencies, 99), 3),
        }
        if not args.no_baseline
        else None,
        "rss_kb": {"idle": idle_kb, "sessions_open": sessions_kb, "after_load": loaded_kb},
        "kb_per_idle_session": round((sessions_kb - idle_kb) / args.sessions, 1),
        "lost_examples": (ws_outcome.lost + rest_outcome.lost)[:5],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
    }


def print_table(summary: dict[str, Any]) -> None:
    ws, rest, rss = summary["ws"], summary["rest"], summary["rss_kb"]
    print(
        f"impasto WebSocket sessions: {summary['sessions']} sessions, {summary['tasks']} tasks "
        f"({summary['size']}x{summary['size']}, {summary['steps']} step, outputType URL), "
        f"OMP_NUM_THREADS={summary['omp_num_threads']}, {os.cpu_count()} CPUs"
    )
    print(f"  sessions held            {summary['sessions_held']} / {summary['sessions']}")
    print(f"  connect + authenticate   {summary['connect_s']:.2f} s for all")
    print(f"  server RSS idle          {rss['idle'] / 1024:.1f} MiB")
    print(f"  server RSS, sessions     {rss['sessions_open'] / 1024:.1f} MiB")
    print(f"  per idle session         {summary['kb_per_idle_session']:.1f} KB")
    print(f"  server RSS after load    {rss['after_load'] / 1024:.1f} MiB")
    print()
    print(f"  {'':12} {'images':>7} {'lost':>5} {'tasks/s':>8} {'p50 s':>7} {'p99 s':>7}")
    rows = [("WebSocket", ws)] + ([("REST", rest)] if rest else [])
    for name, row in rows:
        print(
            f"  {name:12} {row['images']:>7} {row['lost']:>5} {row['tasks_per_s']:>8.2f} "
            f"{row['p50_s']:>7.3f} {row['p99_s']:>7.3f}"
        )
    if rest and rest["tasks_per_s"]:
        print(f"\n  WebSocket / REST throughput: {ws['tasks_per_s'] / rest['tasks_per_s']:.2f}x")
    if summary["lost_examples"]:
        print(f"\n  LOST: {summary['lost_examples']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--tasks-per-session", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0, help="per wait, seconds")
    parser.add_argument("--no-baseline", action="store_true", help="skip the REST baseline")
    parser.add_argument("--models-cache", type=Path, help="reuse a built tiny model here")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="impasto-bench-") as tmp:
        server = Server.start(Path(tmp) / "data", args.models_cache)
        try:
            summary = asyncio.run(bench(args, server))
        finally:
            server.stop()
    if args.json:
        print(json.dumps(summary))
    else:
        print_table(summary)
    rest = summary["rest"] or {"lost": 0, "images": summary["tasks"]}
    ok = (
        summary["sessions_held"] == summary["sessions"]
        and summary["ws"]["lost"] == 0
        and summary["ws"]["images"] == summary["tasks"]
        and rest["lost"] == 0
        and rest["images"] == summary["tasks"]
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
