"""Fakes for the seams, for unit tests of the service pieces without servers.

- `FlakyStateStore` wraps a real store (a SqliteStateStore on a temp file, see `sqlite_state`)
  and makes chosen methods raise for their next N calls: before the call (nothing written) or
  after it (written, then the connection "broke": an ambiguous failure).
- `FakeImageStore` keeps image bytes in a dict, with the same failure switch.
- `FakeEventBus` is the in-process bus whose `publish` can fail; it records what it announced.
- `FakeJobQueue` is an in-memory JobQueue whose `take` blocks until jobs are put (and can
  swallow a cancellation the way redis-py does mid-command).
- `RecordingSleep` and `FakeClock` replace asyncio.sleep and time.monotonic.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from impasto.state.base import QueuedJob, StateStore, Subscription
from impasto.state.events import LocalEventBus
from impasto.state.records import TaskRecord
from impasto.state.sqlite import SqliteStateStore

ErrorFactory = Callable[[], BaseException]


@dataclass
class _Planned:
    make: ErrorFactory
    after: bool


class Faults:
    """Which calls fail next, per method name; counts every call."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._planned: dict[str, deque[_Planned]] = {}
        self._always: dict[str, ErrorFactory] = {}

    def fail(
        self, method: str, error: ErrorFactory, times: int = 1, *, after: bool = False
    ) -> None:
        """The next `times` calls of `method` raise `error()`; with `after`, once the call
        has done its work (it happened, but the caller cannot know)."""
        self._planned.setdefault(method, deque()).extend(
            _Planned(error, after) for _ in range(times)
        )

    def fail_always(self, method: str, error: ErrorFactory) -> None:
        """Every call of `method` raises until `heal`."""
        self._always[method] = error

    def heal(self, method: str | None = None) -> None:
        if method is None:
            self._planned.clear()
            self._always.clear()
        else:
            self._planned.pop(method, None)
            self._always.pop(method, None)

    def before(self, method: str) -> _Planned | None:
        """Count a call; raise now if it fails before doing anything, else return what to
        raise after it (or None)."""
        self.calls[method] += 1
        if method in self._always:
            raise self._always[method]()
        queue = self._planned.get(method)
        if not queue:
            return None
        planned = queue.popleft()
        if not planned.after:
            raise planned.make()
        return planned


class FlakyStateStore:
    """A StateStore that forwards to `inner`, failing the calls `faults` says."""

    def __init__(self, inner: StateStore) -> None:
        self.inner = inner
        self.faults = Faults()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            planned = self.faults.before(name)
            result = await attr(*args, **kwargs)
            if planned is not None:
                raise planned.make()
            return result

        return call

    @property
    def store(self) -> StateStore:
        """This wrapper typed as the seam it stands in for."""
        return cast(StateStore, self)


@asynccontextmanager
async def sqlite_state(path: Path) -> AsyncIterator[FlakyStateStore]:
    """A real SqliteStateStore on `path`, behind the failure switch."""
    inner = SqliteStateStore(path)
    await inner.open()
    try:
        yield FlakyStateStore(inner)
    finally:
        await inner.close()


async def new_task(state: FlakyStateStore, expected: int = 1, model: str | None = None) -> str:
    """An accepted imageInference task of `expected` images, stored past the faults."""
    task_uuid = str(uuid.uuid4())
    await state.inner.create_task(
        TaskRecord(
            task_uuid=task_uuid,
            task_type="imageInference",
            request={"taskType": "imageInference", "taskUUID": task_uuid},
            expected=expected,
            created_at=time.time(),
            model=model,
        )
    )
    return task_uuid


class FakeImageStore:
    """ImageStore in a dict; a failed put leaves nothing, as the seam promises."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.deleted: list[str] = []
        self.faults = Faults()

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        planned = self.faults.before("put")
        self.blobs[key] = data
        if planned is not None:
            raise planned.make()

    async def get(self, key: str) -> bytes | None:
        self.faults.before("get")
        return self.blobs.get(key)

    async def delete(self, key: str) -> None:
        self.faults.before("delete")
        self.deleted.append(key)
        self.blobs.pop(key, None)

    def direct_url(self, key: str, expires_at: float) -> str | None:
        return None


class FakeEventBus:
    """The in-process bus; `publish` goes through the failure switch and is recorded."""

    def __init__(self) -> None:
        self._bus = LocalEventBus()
        self.published: list[str] = []
        self.faults = Faults()

    @property
    def healthy(self) -> bool:
        return True

    async def ping(self) -> None:
        self.faults.before("ping")

    async def publish(self, task_uuid: str) -> None:
        self.faults.before("publish")
        self.published.append(task_uuid)
        await self._bus.publish(task_uuid)

    def subscribe(self, task_uuid: str) -> AbstractAsyncContextManager[Subscription]:
        return self._bus.subscribe(task_uuid)


class SilentSubscription:
    """A subscription that never hears anything (its notifications were lost). Each wait
    moves `clock` on by its whole timeout, as a real wait would, and then runs `on_wait`."""

    def __init__(
        self,
        clock: FakeClock | None = None,
        on_wait: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.waits: list[float | None] = []
        self._clock = clock
        self._on_wait = on_wait

    async def wait(self, timeout: float | None) -> bool:
        self.waits.append(timeout)
        if self._clock is not None and timeout is not None:
            self._clock.advance(timeout)
        if self._on_wait is not None:
            await self._on_wait(len(self.waits))
        await asyncio.sleep(0)
        return False


class FakeJobQueue:
    """JobQueue in memory. `take` returns what is ready, or blocks until something is put
    (whatever `block_s` says); `orphans` is what the next `reclaim` hands over."""

    def __init__(self, *, swallow_cancel: bool = False) -> None:
        self.ready: list[QueuedJob] = []
        self.orphans: list[QueuedJob] = []
        self.touched: list[list[str]] = []
        self.acked: list[QueuedJob] = []
        self.faults = Faults()
        self.swallow_cancel = swallow_cancel
        self.blocked_takes = 0
        self._arrived = asyncio.Event()

    async def ping(self) -> None:
        self.faults.before("ping")

    async def put(self, jobs: Sequence[QueuedJob]) -> None:
        self.faults.before("put")
        self.ready.extend(jobs)
        self._arrived.set()

    async def take(self, airs: Sequence[str], count: int, block_s: float) -> list[QueuedJob]:
        self.faults.before("take")
        while not self.ready:
            self._arrived.clear()
            self.blocked_takes += 1
            try:
                await self._arrived.wait()
            except asyncio.CancelledError:
                if self.swallow_cancel:
                    # redis-py: a cancellation landing mid-command can come back as a
                    # plain empty answer.
                    return []
                raise
            finally:
                self.blocked_takes -= 1
        taken = self.ready[:count]
        del self.ready[:count]
        return taken

    async def reclaim(self, airs: Sequence[str], lease_s: float, count: int) -> list[QueuedJob]:
        self.faults.before("reclaim")
        taken = self.orphans[:count]
        del self.orphans[:count]
        return taken

    async def touch(self, jobs: Sequence[QueuedJob]) -> None:
        self.faults.before("touch")
        self.touched.append(sorted(job.entry_id for job in jobs))

    async def ack(self, job: QueuedJob) -> None:
        self.faults.before("ack")
        self.acked.append(job)

    async def depth(self, air: str) -> int:
        return sum(1 for job in self.ready if job.air == air)

    async def close(self) -> None:
        pass


class RecordingSleep:
    """asyncio.sleep that returns at once (after letting others run) and records its delays."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Let the loop run until `condition()` holds; fail after `timeout_s` of wall time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)
