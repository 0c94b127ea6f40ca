"""The load generator of bench/server_overhead.py: the same asyncio clients for every server
(`run_level`), what each level's clients saw (`LevelResult`), and the servers as the clients
see them (`cog_target` for Cog and cog-like, `impasto_target`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.harness import PROMPT, logger

log = logger("server_overhead")
QUALITY = 95  # the JPEG quality of every image, in both parts and on every server
DONE, REFUSED = "done", "refused"
REQUEST_TIMEOUT_S = 600.0


# -- statistics ----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of few samples is their maximum)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


@dataclass
class LevelResult:
    """One server at one concurrency: what the clients saw, and the CPU it took."""

    part: str
    server: str
    clients: int
    requests: int
    done: int = 0
    refused: int = 0
    errors: int = 0
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    server_cpu_s: float | None = None
    client_cpu_s: float = 0.0
    error_samples: list[str] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return self.done / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def p50_s(self) -> float | None:
        return statistics.median(self.latencies_s) if self.latencies_s else None

    @property
    def p99_s(self) -> float | None:
        return percentile(self.latencies_s, 99) if self.latencies_s else None

    def record(self) -> dict[str, Any]:
        def rounded(value: float | None, digits: int = 5) -> float | None:
            return None if value is None else round(value, digits)

        cpu_per_request = (
            self.server_cpu_s / self.done if self.server_cpu_s is not None and self.done else None
        )
        return {
            "part": self.part,
            "server": self.server,
            "clients": self.clients,
            "requests": self.requests,
            "done": self.done,
            "refused": self.refused,
            "errors": self.errors,
            "wall_s": rounded(self.wall_s, 4),
            "per_s": rounded(self.per_s, 4),
            "p50_s": rounded(self.p50_s),
            "p99_s": rounded(self.p99_s),
            "mean_s": rounded(statistics.fmean(self.latencies_s) if self.latencies_s else None),
            "server_cpu_s": rounded(self.server_cpu_s, 4),
            "server_cpu_ms_per_request": rounded(
                None if cpu_per_request is None else cpu_per_request * 1000, 3
            ),
            "client_cpu_ms_per_request": rounded(
                self.client_cpu_s / self.done * 1000 if self.done else None, 3
            ),
            "error_samples": self.error_samples,
            "latencies_s": [round(value, 5) for value in self.latencies_s],
        }


def tree_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process and its live descendants (Cog's predictor runs in
    a worker subprocess), from /proc; None where there is no /proc."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        stats: dict[int, tuple[int, float]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                text = (entry / "stat").read_text()
                fields = text[text.rindex(")") + 2 :].split()
                stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])))
    except (OSError, ValueError):
        return None
    if pid not in stats:
        return None
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, _) in stats.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(stats[p][1] for p in tree) / ticks


# -- the load generator: the same for every server -----------------------------------------------


@dataclass(frozen=True)
class Target:
    """A server as the clients see it: where to post, what, and how to read the reply."""

    name: str
    url: str
    body: Callable[[int], Any]  # request number -> JSON body
    verdict: Callable[[httpx.Response], str]  # DONE, REFUSED, or what went wrong
    pid: int | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """How a client waits before it posts a refused request again."""

    first_s: float = 0.005
    max_s: float = 0.1


async def _run_level(
    connections: list[httpx.AsyncClient],
    target: Target,
    result: LevelResult,
    retry: RetryPolicy,
    first: int,
) -> None:
    claimed = 0

    async def one_client(client: httpx.AsyncClient) -> None:
        nonlocal claimed
        while claimed < result.requests:
            body = target.body(first + claimed)
            claimed += 1
            begin = time.perf_counter()
            delay = retry.first_s
            while True:
                try:
                    verdict = target.verdict(await client.post(target.url, json=body))
                except httpx.HTTPError as exc:
                    verdict = f"{type(exc).__name__}: {exc}"
                if verdict != REFUSED:
                    break
                result.refused += 1
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, retry.max_s)
            if verdict == DONE:
                result.latencies_s.append(time.perf_counter() - begin)
                result.done += 1
            else:
                result.errors += 1
                if len(result.error_samples) < 5:
                    result.error_samples.append(verdict[:300])

    cpu_before = tree_cpu_s(target.pid) if target.pid else None
    client_before = time.process_time()
    begin = time.perf_counter()
    await asyncio.gather(*(one_client(client) for client in connections))
    result.wall_s = time.perf_counter() - begin
    result.client_cpu_s = time.process_time() - client_before
    cpu_after = tree_cpu_s(target.pid) if target.pid else None
    if cpu_before is not None and cpu_after is not None:
        result.server_cpu_s = cpu_after - cpu_before


async def _warm_and_measure(
    target: Target, part: str, clients: int, requests: int, retry: RetryPolicy
) -> LevelResult:
    # One client (one keep-alive connection) per simulated user: a pool shared by 64 users cost
    # the load generator ~17 ms of CPU per request, starving the servers on a small machine.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with contextlib.AsyncExitStack() as stack:
        connections = [
            await stack.enter_async_context(
                httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits)
            )
            for _ in range(clients)
        ]
        # Unmeasured: opens the connections and runs this concurrency's batch shapes once.
        warmup = LevelResult(part=part, server=target.name, clients=clients, requests=clients)
        await _run_level(connections, target, warmup, retry, 10_000_000)
        result = LevelResult(part=part, server=target.name, clients=clients, requests=requests)
        await _run_level(connections, target, result, retry, 0)
        result.errors += warmup.errors
        result.error_samples += warmup.error_samples
        return result


def run_level(
    target: Target, part: str, clients: int, requests: int, retry: RetryPolicy
) -> LevelResult:
    """`clients` concurrent clients: an unmeasured round of `clients` requests, then `requests`
    measured ones on the same connections."""
    result = asyncio.run(_warm_and_measure(target, part, clients, requests, retry))
    log(
        f"{part}: {target.name} x{clients}: {result.per_s:.2f}/s, "
        f"{result.refused} refused, {result.errors} errors"
    )
    return result


def cog_target(base: str, name: str, pid: int | None) -> Target:
    def verdict(response: httpx.Response) -> str:
        if response.status_code == 409:
            return REFUSED
        if response.status_code != 200:
            return f"HTTP {response.status_code}: {response.text[:200]}"
        try:
            body = response.json()
        except ValueError:
            return f"not JSON: {response.text[:200]}"
        if not isinstance(body, dict) or body.get("status") != "succeeded":
            return f"not succeeded: {response.text[:200]}"
        if not str(body.get("output")).startswith("data:image/jpeg;base64,"):
            return f"not a JPEG data URI: {response.text[:200]}"
        return DONE

    return Target(
        name, f"{base}/predictions", lambda _: {"input": {"prompt": PROMPT}}, verdict, pid
    )


IMPASTO_OUTPUT_FIELDS = {
    "URL": "imageURL",
    "dataURI": "imageDataURI",
    "base64Data": "imageBase64Data",
}


def impasto_target(
    base: str, pid: int | None, task: dict[str, Any], output_type: str, name: str = "impasto"
) -> Target:
    wanted = IMPASTO_OUTPUT_FIELDS[output_type]

    def body(number: int) -> Any:
        return [
            {
                "taskType": "imageInference",
                "taskUUID": str(uuid.uuid4()),
                "positivePrompt": PROMPT,
                "seed": 1000 + number,
                "numberResults": 1,
                "outputType": output_type,
                "outputFormat": "JPG",
                "outputQuality": QUALITY,
                **task,
            }
        ]

    def verdict(response: httpx.Response) -> str:
        if response.status_code in (429, 503):
            return REFUSED
        try:
            document = response.json()
        except ValueError:
            document = {}
        items = (document.get("data") or []) if isinstance(document, dict) else []
        if response.status_code != 200 or "errors" in document or not items:
            return f"HTTP {response.status_code}: {response.text[:200]}"
        if wanted not in items[0]:
            return f"no {wanted}: {response.text[:200]}"
        return DONE

    return Target(name, f"{base}/v1", body, verdict, pid)
