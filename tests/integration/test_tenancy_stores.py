"""One TenancyStore contract and one RateLimiter contract, each run against every
implementation: SqliteTenancyStore on a file and RedisTenancyStore on a real redis-server;
MemoryRateLimiter and RedisRateLimiter (each Redis test on its own key prefix).

What a user of keys, usage and limits can observe must not depend on where they are kept: keys
read back as written, one active key per name, revoking, usage counted once per (task, index)
and summed exactly, and the buckets' and slots' arithmetic. The Redis ones are also shared:
a second store or limiter on the same prefix (another API node) sees the first one's state.
The clock is the `now` argument throughout: nothing sleeps."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from impasto.protocol.errors import ServiceUnavailable
from impasto.tenancy.keys import (
    ApiKey,
    KeyNotFound,
    Limits,
    UsageRecord,
    UsageTotals,
    digest_of,
    new_secret,
)
from impasto.tenancy.limits import Bucket, MemoryRateLimiter, refilled, wait_for
from impasto.tenancy.redis_limits import BUCKET_TTL_MS, SLOT_TTL_S, RedisRateLimiter
from impasto.tenancy.redis_store import RedisTenancyStore
from impasto.tenancy.sqlite_store import SqliteTenancyStore
from tests.services import RedisServer

T = TypeVar("T")
Store = SqliteTenancyStore | RedisTenancyStore
Limiter = MemoryRateLimiter | RedisRateLimiter

T0 = 1_700_000_000.25


def _prefix() -> str:
    # A fresh prefix per test: no flush, so nothing else on the server is disturbed.
    return f"test-{uuid.uuid4().hex[:12]}"


@dataclass
class StoreBackend:
    """Makes stores that share one backing (a file, or a server and a prefix)."""

    name: str
    make: Callable[[], Store]
    server: RedisServer | None = None
    prefix: str = ""

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[Store]:
        store = self.make()
        await store.open()
        try:
            yield store
        finally:
            await store.close()

    def run(self, body: Callable[[Store], Awaitable[T]]) -> T:
        async def main() -> T:
            async with self.opened() as store:
                return await body(store)

        return asyncio.run(main())


@pytest.fixture(params=["sqlite", "redis"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> StoreBackend:
    if request.param == "sqlite":
        path = tmp_path / "state.sqlite"
        return StoreBackend("sqlite", lambda: SqliteTenancyStore(path))
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = _prefix()
    return StoreBackend("redis", lambda: RedisTenancyStore(server.url, prefix), server, prefix)


def api_key(name: str = "alice", created_at: float = T0, **changes: Any) -> ApiKey:
    secret = new_secret()
    values: dict[str, Any] = {
        "key_id": f"key_{uuid.uuid4().hex[:12]}",
        "name": name,
        "digest": digest_of(secret),
        "hint": secret[:8],
        "created_at": created_at,
    }
    values.update(changes)
    return ApiKey(**values)


def usage(
    task_uuid: str,
    index: int = 0,
    *,
    key: ApiKey,
    model: str = "impasto:tiny@1",
    width: int = 512,
    height: int = 512,
    cost: float = 0.0013,
    at: float = T0,
) -> UsageRecord:
    return UsageRecord(task_uuid, index, key.key_id, key.name, model, width, height, cost, at)


# -- keys ---------------------------------------------------------------------------------------


def test_keys_read_back_as_written_by_digest_and_listed_oldest_first(
    stores: StoreBackend,
) -> None:
    full = api_key(
        "ünïcode: büro ✓",
        created_at=T0 + 0.1,
        limits=Limits(
            tasks_per_minute=30,
            images_per_minute=120,
            max_concurrent=4,
            models=("impasto:tiny@1", "civitai:101@202"),
        ),
        expires_at=T0 + 86_400.5,
    )
    bare = api_key("bob", created_at=T0)
    # Same created_at as `bare`: ties go by key id.
    tie_a = api_key("carol", created_at=T0 + 0.1, key_id="key_0000aaaa")
    tie_z = api_key("dave", created_at=T0 + 0.1, key_id="key_zzzz0000")

    async def body(store: Store) -> tuple[list[ApiKey | None], list[ApiKey], ApiKey | None]:
        for key in (full, tie_z, bare, tie_a):
            await store.create_key(key)
        found = [await store.key_by_digest(k.digest) for k in (full, bare)]
        return found, await store.list_keys(), await store.key_by_digest(digest_of("imp_nope"))

    found, listed, unknown = stores.run(body)
    assert found == [full, bare]
    assert found[0] is not None
    assert found[0].limits.models == ("impasto:tiny@1", "civitai:101@202")
    ordered = sorted([full, tie_a, tie_z], key=lambda k: k.key_id)
    assert listed == [bare, *ordered]
    assert unknown is None


def test_a_new_store_lists_nothing(stores: StoreBackend) -> None:
    async def body(store: Store) -> tuple[list[ApiKey], list[UsageTotals]]:
        return await store.list_keys(), await store.usage_totals()

    assert stores.run(body) == ([], [])


def test_a_second_store_on_the_same_backing_sees_the_first_ones_keys_and_usage(
    stores: StoreBackend,
) -> None:
    key = api_key("shared")

    async def body() -> tuple[ApiKey | None, list[ApiKey], list[UsageTotals], list[ApiKey]]:
        async with stores.opened() as first, stores.opened() as second:
            await first.create_key(key)
            await first.record_usage([usage("task-1", key=key)])
            seen = await second.key_by_digest(key.digest)
            listed = await second.list_keys()
            totals = await second.usage_totals()
            # What the second one revokes, the first one sees revoked.
            await second.revoke_key("shared", T0 + 5)
            return seen, listed, totals, await first.list_keys()

    seen, listed, totals, after = asyncio.run(body())
    assert seen == key
    assert listed == [key]
    assert [(t.key_id, t.images) for t in totals] == [(key.key_id, 1)]
    assert after == [replace(key, revoked_at=T0 + 5)]


def test_of_concurrent_creations_of_one_name_on_two_stores_one_wins(
    stores: StoreBackend,
) -> None:
    keys = [api_key("race", created_at=T0 + i) for i in range(8)]

    async def body() -> tuple[list[BaseException | None], list[ApiKey]]:
        async with stores.opened() as first, stores.opened() as second:
            outcomes = await asyncio.gather(
                *((first if i % 2 else second).create_key(k) for i, k in enumerate(keys)),
                return_exceptions=True,
            )
            return list(outcomes), await first.list_keys()

    outcomes, listed = asyncio.run(body())
    assert sum(o is None for o in outcomes) == 1
    assert all(isinstance(o, ValueError) for o in outcomes if o is not None)
    assert listed == [keys[outcomes.index(None)]]


def test_usage_recorded_by_two_stores_at_once_is_counted_once(stores: StoreBackend) -> None:
    key = api_key("race")
    records = [usage(f"task-{i}", i % 3, key=key, at=T0 + i) for i in range(30)]

    async def body() -> list[UsageTotals]:
        async with stores.opened() as first, stores.opened() as second:
            await asyncio.gather(
                first.record_usage(records),
                second.record_usage(records[::-1]),
                first.record_usage(records[10:20]),
            )
            return await second.usage_totals()

    (total,) = asyncio.run(body())
    assert (total.images, total.pixels) == (30, 30 * 512 * 512)
    assert total.cost == pytest.approx(0.039, abs=1e-12)


def test_an_active_name_is_refused_and_the_first_key_kept(stores: StoreBackend) -> None:
    first = api_key("ci")
    second = api_key("ci", created_at=T0 + 10)

    async def body(store: Store) -> tuple[list[ApiKey], ApiKey | None]:
        await store.create_key(first)
        with pytest.raises(ValueError, match="already named 'ci'"):
            await store.create_key(second)
        return await store.list_keys(), await store.key_by_digest(second.digest)

    assert stores.run(body) == ([first], None)


def test_a_name_is_free_again_once_its_key_is_revoked(stores: StoreBackend) -> None:
    old = api_key("ci")
    new = api_key("ci", created_at=T0 + 10)

    async def body(store: Store) -> list[ApiKey]:
        await store.create_key(old)
        await store.revoke_key("ci", T0 + 5)
        await store.create_key(new)
        return await store.list_keys()

    assert stores.run(body) == [replace(old, revoked_at=T0 + 5), new]


def test_a_name_is_free_again_once_its_key_has_expired(stores: StoreBackend) -> None:
    old = api_key("ci", expires_at=T0 + 100)
    too_early = api_key("ci", created_at=T0 + 99.5)
    at_expiry = api_key("ci", created_at=T0 + 100)

    async def body(store: Store) -> list[ApiKey]:
        await store.create_key(old)
        # Still active a moment before it expires...
        with pytest.raises(ValueError, match="already named"):
            await store.create_key(too_early)
        # ...and expired at expires_at itself (ApiKey.active: now < expires_at).
        await store.create_key(at_expiry)
        # The new key has no expiry: the name is taken again.
        with pytest.raises(ValueError, match="already named"):
            await store.create_key(api_key("ci", created_at=T0 + 1000))
        return await store.list_keys()

    assert stores.run(body) == [old, at_expiry]


def test_other_names_do_not_block_a_name(stores: StoreBackend) -> None:
    keys = [api_key("ci"), api_key("ci-2"), api_key("CI")]

    async def body(store: Store) -> list[ApiKey]:
        for key in keys:
            await store.create_key(key)
        return await store.list_keys()

    assert sorted(stores.run(body), key=lambda k: k.key_id) == sorted(keys, key=lambda k: k.key_id)


def test_revoke_by_name_revokes_every_unrevoked_key_of_that_name(stores: StoreBackend) -> None:
    expired = api_key("ci", expires_at=T0 + 50)
    current = api_key("ci", created_at=T0 + 60)
    other = api_key("other", created_at=T0 + 1)

    async def body(store: Store) -> tuple[list[ApiKey], list[ApiKey], ApiKey | None]:
        for key in (expired, current, other):
            await store.create_key(key)
        revoked = await store.revoke_key("ci", T0 + 70)
        return revoked, await store.list_keys(), await store.key_by_digest(current.digest)

    revoked, listed, looked_up = stores.run(body)
    gone = [replace(expired, revoked_at=T0 + 70), replace(current, revoked_at=T0 + 70)]
    assert sorted(revoked, key=lambda k: k.created_at) == gone
    assert listed == [gone[0], other, gone[1]]
    # A revoked key is still found by its digest (so that it can be refused by name).
    assert looked_up == gone[1]
    assert looked_up is not None
    assert looked_up.status(T0 + 70) == "revoked"


def test_revoke_by_id_revokes_that_key_only(stores: StoreBackend) -> None:
    target = api_key("ci", expires_at=T0 + 50)
    sibling = api_key("ci", created_at=T0 + 60)

    async def body(store: Store) -> tuple[list[ApiKey], list[ApiKey]]:
        await store.create_key(target)
        await store.create_key(sibling)
        return await store.revoke_key(target.key_id, T0 + 70), await store.list_keys()

    revoked, listed = stores.run(body)
    assert revoked == [replace(target, revoked_at=T0 + 70)]
    assert listed == [replace(target, revoked_at=T0 + 70), sibling]


def test_revoking_an_unknown_or_already_revoked_key_raises_key_not_found(
    stores: StoreBackend,
) -> None:
    key = api_key("ci")

    async def body(store: Store) -> list[ApiKey]:
        with pytest.raises(KeyNotFound):
            await store.revoke_key("nobody", T0)
        await store.create_key(key)
        await store.revoke_key(key.key_id, T0 + 1)
        with pytest.raises(KeyNotFound):
            await store.revoke_key(key.key_id, T0 + 2)
        with pytest.raises(KeyNotFound):
            await store.revoke_key("ci", T0 + 2)
        return await store.list_keys()

    # The second revocation changed nothing: revoked_at is still the first one's.
    assert stores.run(body) == [replace(key, revoked_at=T0 + 1)]


# -- usage --------------------------------------------------------------------------------------


def test_usage_is_counted_once_per_task_and_index(stores: StoreBackend) -> None:
    key = api_key("ci")

    async def body(store: Store) -> list[UsageTotals]:
        await store.create_key(key)
        await store.record_usage([])
        first = [usage("task-1", 0, key=key), usage("task-1", 1, key=key, at=T0 + 1)]
        await store.record_usage(first)
        # Again (a retried report), in the same batch twice, and with other values: ignored.
        await store.record_usage(first)
        await store.record_usage(
            [
                usage("task-2", 0, key=key, at=T0 + 2),
                usage("task-2", 0, key=key, at=T0 + 2),
                usage("task-1", 0, key=key, cost=9.0, width=1, height=1, at=T0 + 9),
            ]
        )
        return await store.usage_totals()

    assert stores.run(body) == [
        UsageTotals(
            key_id=key.key_id,
            key_name="ci",
            model="impasto:tiny@1",
            images=3,
            # Rounded like SQLite's (to 10 places): 3 x 0.0013 reads back as 0.0039 exactly.
            cost=0.0039,
            pixels=3 * 512 * 512,
            first_at=T0,
            last_at=T0 + 2,
        )
    ]


def test_usage_totals_are_per_key_and_model_by_name_then_model(stores: StoreBackend) -> None:
    zoe = api_key("zoe")
    amy = api_key("amy")
    flux, tiny = "impasto:flux@1", "impasto:tiny@1"
    records = [
        usage("t1", 0, key=zoe, model=tiny, cost=0.0013, width=64, height=64, at=T0 + 3),
        usage("t1", 1, key=zoe, model=tiny, cost=0.0013, width=64, height=64, at=T0 + 1),
        usage("t2", 0, key=zoe, model=flux, cost=0.0107, width=1024, height=768, at=T0 + 2),
        usage("t3", 0, key=amy, model=tiny, cost=0.0001, width=512, height=256, at=T0 + 4),
        usage("t3", 1, key=amy, model=tiny, cost=0.0002, width=512, height=256, at=T0 + 5),
        usage("t3", 2, key=amy, model=tiny, cost=0.0, width=512, height=256, at=T0 + 6),
    ]

    async def body(store: Store) -> list[UsageTotals]:
        await store.record_usage(records)
        return await store.usage_totals()

    totals = stores.run(body)
    assert [(t.key_name, t.model) for t in totals] == [("amy", tiny), ("zoe", flux), ("zoe", tiny)]
    assert [(t.key_id, t.images, t.pixels) for t in totals] == [
        (amy.key_id, 3, 3 * 512 * 256),
        (zoe.key_id, 1, 1024 * 768),
        (zoe.key_id, 2, 2 * 64 * 64),
    ]
    # Summed as exactly as a float allows, then rounded (0.0001 + 0.0002 is not 0.0003).
    assert [t.cost for t in totals] == [0.0003, 0.0107, 0.0026]
    assert [(t.first_at, t.last_at) for t in totals] == [
        (T0 + 4, T0 + 6),
        (T0 + 2, T0 + 2),
        (T0 + 1, T0 + 3),
    ]


def test_many_small_costs_sum_to_their_exact_total(stores: StoreBackend) -> None:
    key = api_key("bulk")
    records = [usage(f"task-{i}", i % 4, key=key, cost=0.0013, at=T0 + i) for i in range(1200)]

    async def body(store: Store) -> list[UsageTotals]:
        await store.record_usage(records)
        return await store.usage_totals()

    (total,) = stores.run(body)
    assert total.images == 1200
    assert total.cost == pytest.approx(1.56, abs=1e-9)
    assert round(total.cost, 6) == 1.56
    assert (total.first_at, total.last_at) == (T0, T0 + 1199)


def test_usage_totals_only_of_the_keys_asked_for(stores: StoreBackend) -> None:
    a, b, c = api_key("a"), api_key("b"), api_key("c")

    async def body(store: Store) -> list[list[str]]:
        await store.record_usage(
            [usage("t1", key=a), usage("t2", key=b), usage("t3", key=c), usage("t4", key=c)]
        )
        asked = [
            await store.usage_totals(key_ids=[c.key_id, a.key_id]),
            await store.usage_totals(key_ids=[b.key_id]),
            await store.usage_totals(key_ids=["key_unknown"]),
            await store.usage_totals(key_ids=()),
        ]
        return [[f"{t.key_name}:{t.images}" for t in totals] for totals in asked]

    assert stores.run(body) == [["a:1", "c:2"], ["b:1"], [], ["a:1", "b:1", "c:2"]]


def test_usage_totals_since_count_records_at_or_after_it(stores: StoreBackend) -> None:
    a, b = api_key("a"), api_key("b")
    records = [
        usage("t1", key=a, at=T0),
        usage("t2", key=a, at=T0 + 10),
        usage("t3", key=a, at=T0 + 20, cost=0.5),
        usage("t4", key=b, at=T0 + 5),
    ]

    async def body(store: Store) -> list[list[tuple[str, int, float, float | None]]]:
        await store.record_usage(records)
        asked = [
            await store.usage_totals(since=T0 + 10),
            await store.usage_totals(since=T0 + 10.5, key_ids=[a.key_id]),
            await store.usage_totals(since=T0 + 21),
            await store.usage_totals(since=T0 - 1),
        ]
        return [[(t.key_name, t.images, t.cost, t.first_at) for t in totals] for totals in asked]

    assert stores.run(body) == [
        [("a", 2, 0.5013, T0 + 10)],
        [("a", 1, 0.5, T0 + 20)],
        [],
        [("a", 3, 0.5026, T0), ("b", 1, 0.0013, T0 + 5)],
    ]


def test_task_usage_reads_one_tasks_records_by_index(stores: StoreBackend) -> None:
    key, other = api_key("ci"), api_key("other")
    task = "caef146d-3ef7-49eb-9c06-b17c9181aa00"
    records = [
        usage(task, 10, key=key, cost=0.0107, width=1024, height=768, at=T0 + 3),
        usage(task, 2, key=key, model="impasto:flux@1", cost=0.0, at=T0 + 1),
        usage(task, 0, key=key, cost=0.0013, at=T0 + 2),
        usage("another-task", 0, key=other, at=T0),
    ]

    async def body(store: Store) -> list[list[UsageRecord]]:
        await store.record_usage(records)
        await store.record_usage([replace(records[0], cost=5.0)])  # ignored: recorded already
        return [await store.task_usage(task), await store.task_usage("unknown-task")]

    mine, unknown = stores.run(body)
    assert mine == [records[2], records[1], records[0]]
    assert all(isinstance(r.cost, float) and isinstance(r.at, float) for r in mine)
    assert unknown == []


# -- Redis specifics ----------------------------------------------------------------------------


def test_redis_keeps_tenancy_under_its_prefix(redis_server: RedisServer) -> None:
    prefix = _prefix()
    key = api_key("ci")

    async def body() -> None:
        store = RedisTenancyStore(redis_server.url, prefix)
        await store.open()
        try:
            await store.create_key(key)
            await store.record_usage([usage("t1", key=key)])
        finally:
            await store.close()

    asyncio.run(body())
    admin = redis.Redis(port=redis_server.port, decode_responses=True)
    try:
        written = sorted(admin.scan_iter(f"{prefix}:*"))
    finally:
        admin.close()
    assert written == sorted(
        [
            f"{prefix}:tenancy:key:{key.key_id}",
            f"{prefix}:tenancy:keys",
            f"{prefix}:tenancy:digest:{key.digest}",
            f"{prefix}:tenancy:name:ci",
            f"{prefix}:tenancy:usage:task:t1",
            f"{prefix}:tenancy:usage:by-key:{key.key_id}",
            f"{prefix}:tenancy:usage:keys",
        ]
    )


def test_redis_refuses_a_stored_key_id_or_digest_and_writes_nothing(
    redis_server: RedisServer,
) -> None:
    key = api_key("ci")

    async def body() -> list[ApiKey]:
        store = RedisTenancyStore(redis_server.url, _prefix())
        await store.open()
        try:
            await store.create_key(key)
            with pytest.raises(ValueError, match="id"):
                await store.create_key(api_key("other", key_id=key.key_id))
            with pytest.raises(ValueError, match="digest"):
                await store.create_key(api_key("another", digest=key.digest))
            return await store.list_keys()
        finally:
            await store.close()

    assert asyncio.run(body()) == [key]


def _unreachable_url() -> str:
    with socket.socket() as sock:  # a port nothing listens on once it is closed
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    return f"redis://127.0.0.1:{port}/0"


def test_redis_stores_that_cannot_reach_redis_raise_service_unavailable() -> None:
    url = _unreachable_url()

    async def body() -> None:
        store = RedisTenancyStore(url, retry=Retry(NoBackoff(), 0))
        with pytest.raises(ServiceUnavailable, match=r"key store .* cannot be reached"):
            await store.open()
        limiter = RedisRateLimiter(url, retry=Retry(NoBackoff(), 0))
        with pytest.raises(ServiceUnavailable, match=r"rate limiter .* cannot be reached"):
            await limiter.open()

    asyncio.run(body())


def test_redis_stores_used_before_open_raise_runtime_error(redis_server: RedisServer) -> None:
    async def body() -> None:
        with pytest.raises(RuntimeError, match="before open"):
            await RedisTenancyStore(redis_server.url, _prefix()).list_keys()
        with pytest.raises(RuntimeError, match="before open"):
            await RedisRateLimiter(redis_server.url, _prefix()).slot_members("g")

    asyncio.run(body())


# -- rate limits --------------------------------------------------------------------------------


@dataclass
class LimiterBackend:
    """Makes limiters: a MemoryRateLimiter, or RedisRateLimiters on one server and prefix."""

    name: str
    server: RedisServer | None = None
    prefix: str = ""

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[Limiter]:
        if self.server is None:
            yield MemoryRateLimiter()
            return
        limiter = RedisRateLimiter(self.server.url, self.prefix)
        await limiter.open()
        try:
            yield limiter
        finally:
            await limiter.close()

    def run(self, body: Callable[[Limiter], Awaitable[T]]) -> T:
        async def main() -> T:
            async with self.opened() as limiter:
                return await body(limiter)

        return asyncio.run(main())


@pytest.fixture(params=["memory", "redis"])
def limiters(request: pytest.FixtureRequest) -> LimiterBackend:
    if request.param == "memory":
        return LimiterBackend("memory")
    return LimiterBackend("redis", request.getfixturevalue("redis_server"), _prefix())


def test_a_bucket_of_three_a_minute_gives_three_then_one_every_twenty_seconds(
    limiters: LimiterBackend,
) -> None:
    bucket = [Bucket("key:tasks", per_minute=3)]

    async def body(limiter: Limiter) -> list[float]:
        return [
            await limiter.take(bucket, T0),
            await limiter.take(bucket, T0),
            await limiter.take(bucket, T0),
            await limiter.take(bucket, T0),
            await limiter.take(bucket, T0 + 10),
            await limiter.take(bucket, T0 + 20),
            await limiter.take(bucket, T0 + 20),
        ]

    waits = limiters.run(body)
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3] == pytest.approx(20.0)
    assert waits[4] == pytest.approx(10.0)
    assert waits[5] == 0.0
    assert waits[6] == pytest.approx(20.0)


def test_a_take_is_all_or_nothing_across_buckets(limiters: LimiterBackend) -> None:
    tasks = Bucket("key:tasks", per_minute=10)
    images = Bucket("key:images", per_minute=4, cost=4)

    async def body(limiter: Limiter) -> list[float]:
        waits = [await limiter.take([tasks, images], T0)]
        # The images bucket is empty: refused, and the tasks bucket keeps its 9 tokens...
        waits.append(await limiter.take([tasks, images], T0))
        waits.append(await limiter.take([tasks, images], T0))
        # ...all of which it still gives, alone.
        waits += [await limiter.take([Bucket("key:tasks", 10, cost=9)], T0)]
        waits.append(await limiter.take([Bucket("key:tasks", 10)], T0))
        return waits

    assert limiters.run(body) == [0.0, 60.0, 60.0, 0.0, 6.0]


def test_the_wait_is_that_of_the_slowest_bucket(limiters: LimiterBackend) -> None:
    fast = Bucket("fast", per_minute=60)
    slow = Bucket("slow", per_minute=2)

    async def body(limiter: Limiter) -> list[float]:
        emptied = await limiter.take([Bucket("fast", 60, cost=60), Bucket("slow", 2, cost=2)], T0)
        return [emptied, await limiter.take([fast, slow], T0), await limiter.take([fast], T0)]

    # Both empty: fast has a token in 1 s, slow in 30 s; fast alone, in 1 s.
    assert limiters.run(body) == [0.0, 30.0, 1.0]


def test_a_cost_above_the_tokens_waits_for_what_is_missing(limiters: LimiterBackend) -> None:
    async def body(limiter: Limiter) -> list[float]:
        return [
            await limiter.take([Bucket("images", 60, cost=50)], T0),  # 10 left
            await limiter.take([Bucket("images", 60, cost=30)], T0),  # 20 missing: 20 s
            await limiter.take([Bucket("images", 60, cost=30)], T0 + 5),  # 15 missing
            await limiter.take([Bucket("images", 60, cost=30)], T0 + 20),  # 30 there
            # More than a bucket ever holds: the wait never reaches 0.
            await limiter.take([Bucket("huge", 6, cost=9)], T0),
            await limiter.take([Bucket("huge", 6, cost=9)], T0 + 3600),
        ]

    assert limiters.run(body) == [0.0, 20.0, 15.0, 0.0, 30.0, 30.0]


def test_levels_follow_refilled_and_wait_for_to_the_last_bit(limiters: LimiterBackend) -> None:
    """Odd rates and times: the Redis script's doubles are exactly those of limits.py."""
    steps = [(7, 1, 0.0), (7, 3, 0.123), (7, 4, 1.7), (7, 2, 2.9), (7, 5, 3.01), (7, 1, 9.99)]
    steps += [(13, 13, 10.0), (13, 1, 10.333333), (13, 2, 14.1), (13, 3, 17.77)]

    def expected() -> list[float]:
        tokens, updated_at, waits = 0.0, None, []
        for per_minute, cost, offset in steps:
            now = T0 + offset
            level = (
                refilled(tokens, updated_at, per_minute, now)
                if updated_at is not None
                else float(per_minute)
            )
            wait = wait_for(level, cost, per_minute)
            if wait == 0.0:
                tokens, updated_at = level - cost, now
            waits.append(wait)
        return waits

    async def body(limiter: Limiter) -> list[float]:
        return [await limiter.take([Bucket("odd", p, c)], T0 + o) for p, c, o in steps]

    got = limiters.run(body)
    assert got == expected()
    assert any(0.0 < w != round(w, 3) for w in got)  # the steps do exercise fractions


def test_peek_tells_the_wait_of_one_bucket_and_takes_nothing(limiters: LimiterBackend) -> None:
    async def body(limiter: Limiter) -> list[float]:
        seen = [await limiter.peek(Bucket("auth", 3), T0)]  # never taken from: full
        for _ in range(3):
            await limiter.take([Bucket("auth", 3)], T0 + 0.1)
        seen += [
            await limiter.peek(Bucket("auth", 3), T0 + 0.1),
            await limiter.peek(Bucket("auth", 3), T0 + 0.1),  # peeking took nothing
            await limiter.peek(Bucket("auth", 3), T0 + 13.37),
            await limiter.peek(Bucket("auth", 3, cost=2), T0 + 13.37),
            await limiter.peek(Bucket("auth", 3), T0 + 20.1),
            await limiter.take([Bucket("auth", 3)], T0 + 20.1),
            await limiter.peek(Bucket("auth", 3, cost=4), T0 + 90),  # more than it holds
        ]
        return seen

    level = refilled(0.0, T0 + 0.1, 3, T0 + 13.37)
    assert limiters.run(body) == [
        0.0,
        20.0,
        20.0,
        wait_for(level, 1, 3),
        wait_for(level, 2, 3),
        0.0,
        0.0,
        20.0,
    ]


def test_a_bucket_taken_from_a_minute_ago_is_full_again(limiters: LimiterBackend) -> None:
    async def body(limiter: Limiter) -> list[float]:
        empty = await limiter.take([Bucket("b", 5, cost=5)], T0)
        return [empty, await limiter.take([Bucket("b", 5, cost=5)], T0 + 60)]

    assert limiters.run(body) == [0.0, 0.0]


def test_a_clock_that_goes_back_refills_nothing(limiters: LimiterBackend) -> None:
    async def body(limiter: Limiter) -> list[float]:
        await limiter.take([Bucket("b", 6, cost=6)], T0)
        return [await limiter.take([Bucket("b", 6)], T0 - 30)]

    assert limiters.run(body) == [10.0]


def test_an_empty_take_is_granted(limiters: LimiterBackend) -> None:
    async def body(limiter: Limiter) -> float:
        return await limiter.take([], T0)

    assert limiters.run(body) == 0.0


def test_slots_hold_up_to_the_limit(limiters: LimiterBackend) -> None:
    async def body(limiter: Limiter) -> list[Any]:
        seen: list[Any] = [
            await limiter.acquire_slot("key:a", "task-1", 2, T0),
            await limiter.acquire_slot("key:a", "task-2", 2, T0 + 1.5),
            await limiter.acquire_slot("key:a", "task-3", 2, T0 + 2),
            # A member holding one gets True again, and keeps its first time.
            await limiter.acquire_slot("key:a", "task-1", 2, T0 + 3),
            # Another group is another count.
            await limiter.acquire_slot("key:b", "task-3", 1, T0 + 3),
            await limiter.slot_members("key:a"),
        ]
        await limiter.release_slots("key:a", ["task-1", "task-unknown"])
        seen += [
            await limiter.acquire_slot("key:a", "task-3", 2, T0 + 4),
            await limiter.acquire_slot("key:a", "task-4", 2, T0 + 5),
            await limiter.slot_members("key:a"),
        ]
        await limiter.release_slots("key:a", [])
        await limiter.release_slots("key:a", ["task-2", "task-3"])
        seen += [
            await limiter.slot_members("key:a"),
            await limiter.slot_members("key:b"),
            await limiter.slot_members("key:never"),
        ]
        return seen

    assert limiters.run(body) == [
        True,
        True,
        False,
        True,
        True,
        {"task-1": T0, "task-2": T0 + 1.5},
        True,
        False,
        {"task-2": T0 + 1.5, "task-3": T0 + 4},
        {},
        {"task-3": T0 + 3},
        {},
    ]


def test_a_limit_of_zero_holds_nothing(limiters: LimiterBackend) -> None:
    async def body(limiter: Limiter) -> tuple[bool, dict[str, float]]:
        return await limiter.acquire_slot("g", "m", 0, T0), await limiter.slot_members("g")

    assert limiters.run(body) == (False, {})


# -- rate limits shared by API nodes (Redis) ----------------------------------------------------


def test_two_redis_limiters_on_one_prefix_share_buckets_and_slots(
    redis_server: RedisServer,
) -> None:
    prefix = _prefix()
    bucket = [Bucket("key:tasks", per_minute=3)]

    async def body() -> list[Any]:
        node_a = RedisRateLimiter(redis_server.url, prefix)
        node_b = RedisRateLimiter(redis_server.url, prefix)
        elsewhere = RedisRateLimiter(redis_server.url, _prefix())
        for limiter in (node_a, node_b, elsewhere):
            await limiter.open()
        try:
            return [
                await node_a.take(bucket, T0),
                await node_b.take(bucket, T0),
                await node_a.take(bucket, T0),
                await node_b.take(bucket, T0),
                await elsewhere.take(bucket, T0),  # another deployment: its own buckets
                await node_a.acquire_slot("key:a", "task-1", 1, T0),
                await node_b.acquire_slot("key:a", "task-2", 1, T0),
                await node_b.slot_members("key:a"),
            ]
        finally:
            for limiter in (node_a, node_b, elsewhere):
                await limiter.close()

    assert asyncio.run(body()) == [0.0, 0.0, 0.0, 20.0, 0.0, True, False, {"task-1": T0}]


def test_redis_limits_expire_and_stay_under_their_prefix(redis_server: RedisServer) -> None:
    prefix = _prefix()

    async def body() -> None:
        limiter = RedisRateLimiter(redis_server.url, prefix)
        await limiter.open()
        try:
            await limiter.take([Bucket("key:tasks", 3), Bucket("key:images", 3)], T0)
            await limiter.take([Bucket("refused", 1, cost=2)], T0)
            await limiter.acquire_slot("key:a", "task-1", 2, T0)
        finally:
            await limiter.close()

    asyncio.run(body())
    admin = redis.Redis(port=redis_server.port, decode_responses=True)
    try:
        written = sorted(admin.scan_iter(f"{prefix}:*"))
        ttls = {key: admin.pttl(key) for key in written}
        tokens = admin.hget(f"{prefix}:limits:bucket:key:tasks", "tokens")
    finally:
        admin.close()
    buckets = [f"{prefix}:limits:bucket:key:images", f"{prefix}:limits:bucket:key:tasks"]
    slots = f"{prefix}:limits:slots:key:a"
    # A refused take stores nothing; the others expire once they would be full anyway.
    assert written == [*buckets, slots]
    assert all(BUCKET_TTL_MS - 5_000 < ttls[key] <= BUCKET_TTL_MS for key in buckets)
    assert BUCKET_TTL_MS > 60_000
    assert SLOT_TTL_S * 1000 - 5_000 < ttls[slots] <= SLOT_TTL_S * 1000
    assert tokens is not None
    assert float(tokens) == 2.0
