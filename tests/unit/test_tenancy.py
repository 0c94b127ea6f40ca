"""Keys, limits and quotas with fakes: the KeyDirectory (operator and managed keys, refresh,
revocation callbacks, failed-authentication throttling per address), the token buckets and
slots of MemoryRateLimiter, and the QuotaGate's decisions, all on an injected clock."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from impasto.protocol.errors import AuthError, InvalidParameter, PermissionDenied, RateLimited
from impasto.state.records import TaskRecord
from impasto.tenancy.directory import KeyDirectory
from impasto.tenancy.keys import (
    ANONYMOUS,
    ApiKey,
    KeyNotFound,
    Limits,
    Principal,
    digest_of,
    new_secret,
    operator_principal,
)
from impasto.tenancy.limits import Bucket, MemoryRateLimiter, refilled, wait_for
from impasto.tenancy.quotas import QuotaGate
from tests.fakes import FakeClock


class MemoryKeys:
    """A KeyStore in a dict; counts lookups by digest."""

    def __init__(self) -> None:
        self.keys: dict[str, ApiKey] = {}
        self.lookups = 0

    async def create_key(self, key: ApiKey) -> None:
        self.keys[key.key_id] = key

    async def key_by_digest(self, digest: str) -> ApiKey | None:
        self.lookups += 1
        return next((k for k in self.keys.values() if k.digest == digest), None)

    async def list_keys(self) -> list[ApiKey]:
        return sorted(self.keys.values(), key=lambda k: k.created_at)

    async def revoke_key(self, name_or_id: str, at: float) -> list[ApiKey]:
        found = [
            k
            for k in self.keys.values()
            if name_or_id in (k.key_id, k.name) and k.revoked_at is None
        ]
        if not found:
            raise KeyNotFound(name_or_id)
        for key in found:
            self.keys[key.key_id] = replace(key, revoked_at=at)
        return found


def managed(name: str, now: float, **limits: Any) -> tuple[str, ApiKey]:
    secret = new_secret()
    key = ApiKey(
        key_id=f"key_{name}",
        name=name,
        digest=digest_of(secret),
        hint=secret[:8],
        created_at=now,
        limits=Limits(**limits),
    )
    return secret, key


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- keys ---------------------------------------------------------------------------------


def test_a_new_secret_is_long_random_and_only_its_digest_names_it() -> None:
    a, b = new_secret(), new_secret()
    assert a != b
    assert a.startswith("imp_")
    assert len(a) >= 40
    assert digest_of(a) == digest_of(a) != digest_of(b)
    assert a not in digest_of(a)


def test_operator_keys_have_no_limits_and_a_stable_id() -> None:
    p = operator_principal("op-secret")
    assert p.operator
    assert p.name == "operator"
    assert p.owner == digest_of("op-secret")
    assert p.key_id == operator_principal("op-secret").key_id
    assert p.limits == Limits()


def test_key_status_follows_revocation_and_expiry() -> None:
    _, key = managed("a", 100.0)
    assert key.status(100.0) == "active"
    expiring = replace(key, expires_at=200.0)
    assert expiring.active(199.9)
    assert expiring.status(200.0) == "expired"
    assert replace(key, revoked_at=150.0).status(120.0) == "revoked"


# --- directory ----------------------------------------------------------------------------


def test_open_only_without_operator_or_managed_keys() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        store = MemoryKeys()
        directory = KeyDirectory([], store, MemoryRateLimiter(), clock=clock)
        await directory.refresh()
        assert directory.open
        assert await directory.authenticate(None) is ANONYMOUS
        _, key = managed("a", clock.now)
        await store.create_key(key)
        await directory.refresh()
        assert not directory.open
        with pytest.raises(AuthError) as missing:
            await directory.authenticate(None)
        assert missing.value.code == "missingApiKey"

    run(scenario())


def test_managed_and_operator_keys_authenticate_to_their_principals() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        store = MemoryKeys()
        secret, key = managed("team-a", clock.now, tasks_per_minute=5)
        await store.create_key(key)
        directory = KeyDirectory(["op"], store, MemoryRateLimiter(), clock=clock)
        await directory.refresh()
        principal = await directory.authenticate(secret)
        assert principal == Principal(
            key_id="key_team-a", name="team-a", owner=key.digest, limits=key.limits
        )
        assert (await directory.authenticate("op")).operator
        with pytest.raises(AuthError) as wrong:
            await directory.authenticate("imp_nope")
        assert wrong.value.code == "invalidApiKey"

    run(scenario())


def test_a_key_made_after_the_last_refresh_works_at_once_with_one_lookup() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        store = MemoryKeys()
        directory = KeyDirectory(["op"], store, MemoryRateLimiter(), clock=clock)
        await directory.refresh()
        secret, key = managed("late", clock.now)
        await store.create_key(key)
        assert (await directory.authenticate(secret)).name == "late"
        assert (await directory.authenticate(secret)).name == "late"
        assert store.lookups == 1

    run(scenario())


def test_revoked_and_expired_keys_are_refused_and_reported_once_at_refresh() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        store = MemoryKeys()
        secret_a, key_a = managed("a", clock.now)
        secret_b, key_b = managed("b", clock.now)
        await store.create_key(key_a)
        await store.create_key(replace(key_b, expires_at=clock.now + 60))
        directory = KeyDirectory([], store, MemoryRateLimiter(), clock=clock)
        gone: list[str] = []
        directory.on_revoked(gone.append)
        await directory.refresh()
        principal_a = await directory.authenticate(secret_a)
        await store.revoke_key("a", clock.now)
        # Until the refresh this node does not know; after it, the connection's principal is
        # refused too.
        assert directory.recheck(principal_a) == principal_a
        await directory.refresh()
        assert gone == [key_a.digest]
        with pytest.raises(AuthError, match="revoked"):
            directory.recheck(principal_a)
        with pytest.raises(AuthError, match="revoked"):
            await directory.authenticate(secret_a)
        clock.advance(61)
        with pytest.raises(AuthError, match="expired"):
            await directory.authenticate(secret_b)
        await directory.refresh()
        assert gone == [key_a.digest, key_b.digest]
        await directory.refresh()
        assert len(gone) == 2
        # No key is usable any more, and the server stays closed: revoking the last key
        # must not let everyone in.
        assert not directory.open
        with pytest.raises(AuthError):
            await directory.authenticate(None)
        with pytest.raises(AuthError):
            await directory.authenticate(secret_a)

    run(scenario())


def test_failed_authentications_are_throttled_per_address_even_for_the_right_key() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        directory = KeyDirectory(
            ["right"], None, MemoryRateLimiter(), failures_per_minute=3, clock=clock
        )
        for _ in range(3):
            with pytest.raises(AuthError):
                await directory.authenticate("wrong", "10.0.0.1")
        with pytest.raises(RateLimited) as throttled:
            await directory.authenticate("right", "10.0.0.1")
        assert throttled.value.http_status == 429
        assert throttled.value.retry_after_s == 20
        # Another address, and successes, are not affected.
        assert (await directory.authenticate("right", "10.0.0.2")).operator
        clock.advance(20)
        assert (await directory.authenticate("right", "10.0.0.1")).operator
        with pytest.raises(AuthError):
            await directory.authenticate("wrong", "10.0.0.1")
        with pytest.raises(RateLimited):
            await directory.authenticate("wrong", "10.0.0.1")

    run(scenario())


def test_throttling_off_with_zero_failures_per_minute() -> None:
    async def scenario() -> None:
        directory = KeyDirectory(["right"], None, MemoryRateLimiter(), failures_per_minute=0)
        for _ in range(50):
            with pytest.raises(AuthError):
                await directory.authenticate("wrong", "10.0.0.1")
        assert (await directory.authenticate("right", "10.0.0.1")).operator

    run(scenario())


# --- token buckets and slots --------------------------------------------------------------


def test_bucket_arithmetic() -> None:
    assert refilled(0.0, 100.0, 60, 101.0) == 1.0
    assert refilled(59.5, 100.0, 60, 200.0) == 60.0
    assert wait_for(0.0, 1, 60) == 1.0
    assert wait_for(1.0, 3, 6) == 20.0
    assert wait_for(5.0, 3, 6) == 0.0


def test_buckets_burst_then_refill_and_take_all_or_nothing() -> None:
    async def scenario() -> None:
        limiter = MemoryRateLimiter()
        tasks, images = Bucket("tasks", 3), Bucket("images", 4, 3)
        assert await limiter.take([tasks, images], 0.0) == 0.0
        # images has 1 left: refused, and tasks keeps its 2.
        assert await limiter.take([tasks, images], 0.0) == pytest.approx(30.0)
        assert await limiter.take([tasks], 0.0) == 0.0
        assert await limiter.take([tasks], 0.0) == 0.0
        assert await limiter.take([tasks], 0.0) == pytest.approx(20.0)
        assert await limiter.peek(tasks, 0.0) == pytest.approx(20.0)
        assert await limiter.peek(tasks, 20.0) == 0.0
        assert await limiter.take([tasks], 20.0) == 0.0

    run(scenario())


def test_slots_hold_up_to_the_limit_and_free_on_release() -> None:
    async def scenario() -> None:
        limiter = MemoryRateLimiter()
        assert await limiter.acquire_slot("g", "a", 2, 1.0)
        assert await limiter.acquire_slot("g", "b", 2, 2.0)
        assert not await limiter.acquire_slot("g", "c", 2, 3.0)
        assert await limiter.acquire_slot("g", "a", 2, 4.0)
        assert await limiter.slot_members("g") == {"a": 1.0, "b": 2.0}
        await limiter.release_slots("g", ["a"])
        assert await limiter.acquire_slot("g", "c", 2, 5.0)

    run(scenario())


def test_the_bucket_table_forgets_refilled_buckets_when_full() -> None:
    async def scenario() -> None:
        limiter = MemoryRateLimiter(max_buckets=10)
        for n in range(10):
            await limiter.take([Bucket(f"authfail:{n}", 5)], 0.0)
        await limiter.take([Bucket("new", 5)], 61.0)
        assert len(limiter._buckets) == 1

    run(scenario())


# --- quota gate ---------------------------------------------------------------------------


class Tasks:
    """The one StateStore method the gate reads: get_task."""

    def __init__(self) -> None:
        self.tasks: dict[str, TaskRecord] = {}

    def add(self, task_uuid: str, status: str = "processing") -> None:
        self.tasks[task_uuid] = TaskRecord(
            task_uuid,
            "imageInference",
            {},
            1,
            0.0,
            status=status,  # type: ignore[arg-type]
        )

    async def get_task(self, task_uuid: str) -> TaskRecord | None:
        return self.tasks.get(task_uuid)


def gate(clock: FakeClock, tasks: Tasks) -> QuotaGate:
    return QuotaGate(MemoryRateLimiter(), tasks, clock=clock)  # type: ignore[arg-type]


def principal(**limits: Any) -> Principal:
    return Principal(key_id="key_a", name="a", owner="d" * 64, limits=Limits(**limits))


async def accept(quotas: QuotaGate, who: Principal, tasks: Tasks, uuid: str, n: int = 1) -> None:
    async with quotas.admitted_inference(who, uuid, "impasto:tiny@1", n):
        tasks.add(uuid)


def test_tasks_per_minute_refuses_the_next_with_when_to_retry() -> None:
    async def scenario() -> None:
        clock, tasks = FakeClock(), Tasks()
        quotas = gate(clock, tasks)
        who = principal(tasks_per_minute=2)
        await accept(quotas, who, tasks, "t1")
        await quotas.admit_work(who)
        with pytest.raises(RateLimited) as over:
            await accept(quotas, who, tasks, "t3")
        assert over.value.code == "rateLimitExceeded"
        assert over.value.retry_after_s == 30
        assert "t3" not in tasks.tasks
        clock.advance(30)
        await accept(quotas, who, tasks, "t3")

    run(scenario())


def test_images_per_minute_counts_number_results_and_refuses_a_task_that_never_fits() -> None:
    async def scenario() -> None:
        clock, tasks = FakeClock(), Tasks()
        quotas = gate(clock, tasks)
        who = principal(images_per_minute=4)
        await accept(quotas, who, tasks, "t1", 3)
        with pytest.raises(RateLimited) as over:
            await accept(quotas, who, tasks, "t2", 2)
        assert over.value.retry_after_s == 15
        with pytest.raises(InvalidParameter) as too_large:
            await accept(quotas, who, tasks, "t3", 5)
        assert too_large.value.code == "inferenceRateLimitRequestTooLarge"
        assert too_large.value.parameter == "numberResults"

    run(scenario())


def test_concurrency_frees_slots_of_finished_tasks_and_of_failed_acceptances() -> None:
    async def scenario() -> None:
        clock, tasks = FakeClock(), Tasks()
        quotas = gate(clock, tasks)
        who = principal(max_concurrent=1)
        await accept(quotas, who, tasks, "t1")
        with pytest.raises(RateLimited, match="at once"):
            await accept(quotas, who, tasks, "t2")
        tasks.add("t1", "success")
        await accept(quotas, who, tasks, "t2")
        # An acceptance that fails (a bad input, say) gives its slot back at once.
        tasks.add("t2", "error")
        with pytest.raises(ValueError, match="invalid task"):
            async with quotas.admitted_inference(who, "t3", "impasto:tiny@1", 1):
                raise ValueError("invalid task")
        await accept(quotas, who, tasks, "t4")

    run(scenario())


def test_a_slot_of_a_task_being_accepted_is_kept_for_the_grace_period() -> None:
    async def scenario() -> None:
        clock, tasks = FakeClock(), Tasks()
        limiter = MemoryRateLimiter()
        quotas = QuotaGate(limiter, tasks, clock=clock, slot_grace_s=30)  # type: ignore[arg-type]
        who = principal(max_concurrent=1)
        # Held by an acceptance on another node whose task is not stored yet.
        await limiter.acquire_slot("running:key_a", "elsewhere", 1, clock.now)
        with pytest.raises(RateLimited):
            await accept(quotas, who, tasks, "t1")
        clock.advance(31)
        await accept(quotas, who, tasks, "t1")

    run(scenario())


def test_a_key_limited_to_models_gets_permission_denied_for_others() -> None:
    async def scenario() -> None:
        clock, tasks = FakeClock(), Tasks()
        quotas = gate(clock, tasks)
        who = principal(models=("impasto:tiny@1",))
        await accept(quotas, who, tasks, "t1")
        with pytest.raises(PermissionDenied) as denied:
            async with quotas.admitted_inference(who, "t2", "runway:4@1", 1):
                pass
        assert denied.value.http_status == 403
        assert denied.value.parameter == "model"

    run(scenario())


def test_unlimited_principals_pass_without_touching_the_limiter() -> None:
    async def scenario() -> None:
        clock, tasks = FakeClock(), Tasks()
        limiter = MemoryRateLimiter()
        quotas = QuotaGate(limiter, tasks, clock=clock)  # type: ignore[arg-type]
        for n in range(100):
            await accept(quotas, ANONYMOUS, tasks, f"t{n}", 4)
            await quotas.admit_work(ANONYMOUS)
        assert limiter._buckets == {}
        assert limiter._slots == {}

    run(scenario())
