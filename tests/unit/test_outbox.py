"""The outbox over fakes: a StateStore holding only what the Outbox calls, an ImageStore of
bytes, and receivers as httpx.MockTransport handlers (loopback allowed). Time is injected: a
test moves the clock and wakes the outbox instead of waiting for a retry to fall due."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
import pytest

from impasto.delivery.outbound import OutboundClient, OutboundGuard
from impasto.delivery.outbox import DELIVERY_HEADER, Outbox, RetryPolicy, new_delivery
from impasto.protocol.errors import ServiceUnavailable
from impasto.state.base import StateStore
from impasto.state.records import DeliveryRecord, DeliveryStatus
from impasto.storage.base import ImageStore

HOOK = "http://127.0.0.1:9/hook?token=s3cr3t"
UPLOAD = "http://127.0.0.1:9/bucket/a.png?X-Amz-Signature=deadbeef"
WAIT_S = 5.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class StoreDown(RuntimeError):
    pass


class FakeState:
    """Deliveries in a dict; `fail[name]` makes the next calls of that method raise."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.rows: dict[str, DeliveryRecord] = {}
        self.fail: dict[str, int] = {}
        self.calls: list[str] = []
        self.changed = asyncio.Event()
        # What a failing call raises: a bug-like error, or the stores' ServiceUnavailable.
        self.raises: type[Exception] = StoreDown

    def _called(self, name: str) -> None:
        self.calls.append(name)
        self.changed.set()
        if self.fail.get(name, 0) > 0:
            self.fail[name] -= 1
            raise self.raises(f"state store unreachable at redis://:hunter2@10.0.0.5 ({name})")

    def add(self, delivery: DeliveryRecord) -> DeliveryRecord:
        delivery = dataclasses.replace(
            delivery, created_at=self.clock.now, next_attempt_at=self.clock.now
        )
        self.rows[delivery.delivery_id] = delivery
        return delivery

    async def claim_deliveries(
        self, now: float, limit: int, lease_s: float
    ) -> list[DeliveryRecord]:
        self._called("claim_deliveries")
        due = [
            row
            for row in self.rows.values()
            if row.status == "pending" and row.next_attempt_at <= now
        ][:limit]
        for row in due:
            self.rows[row.delivery_id] = dataclasses.replace(row, next_attempt_at=now + lease_s)
        return due

    async def next_delivery_at(self) -> float | None:
        self._called("next_delivery_at")
        pending = [row.next_attempt_at for row in self.rows.values() if row.status == "pending"]
        return min(pending, default=None)

    async def reschedule_delivery(
        self, delivery_id: str, attempts: int, next_attempt_at: float, error: dict[str, Any]
    ) -> None:
        self._called("reschedule_delivery")
        row = self.rows[delivery_id]
        if row.status == "pending":
            self.rows[delivery_id] = dataclasses.replace(
                row, attempts=attempts, next_attempt_at=next_attempt_at, last_error=error
            )

    async def settle_delivery(
        self,
        delivery_id: str,
        status: DeliveryStatus,
        attempts: int,
        error: dict[str, Any] | None,
        follow_ups: Sequence[DeliveryRecord] = (),
    ) -> bool:
        self._called("settle_delivery")
        row = self.rows[delivery_id]
        if row.status != "pending":
            return False
        self.rows[delivery_id] = dataclasses.replace(
            row, status=status, attempts=attempts, last_error=error
        )
        for follow_up in follow_ups:
            self.add(follow_up)
        return True


class FakeImages:
    def __init__(self, data: dict[str, bytes], broken: int = 0) -> None:
        self.data = data
        self.broken = broken

    async def get(self, key: str) -> bytes | None:
        if self.broken > 0:
            self.broken -= 1
            raise OSError(f"cannot read {key} for {UPLOAD}")
        return self.data.get(key)


Handler = Callable[[httpx.Request], httpx.Response]


class Harness:
    def __init__(
        self,
        handler: Handler,
        images: FakeImages,
        policy: RetryPolicy,
        wakeup: asyncio.Event | None = None,
    ) -> None:
        self.clock = Clock(1_000_000.0)
        self.monotonic = Clock(50.0)
        self.state = FakeState(self.clock)
        self.requests: list[httpx.Request] = []
        self.settled: list[tuple[str, bool]] = []
        self.sleeps: list[float] = []

        def record(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            return handler(request)

        async def resolve(host: str, port: int) -> list[str]:
            return ["127.0.0.1"]

        guard = OutboundGuard(allow_private_networks=True, resolver=resolve)
        self.client = OutboundClient(
            guard, httpx.AsyncClient(transport=httpx.MockTransport(record))
        )

        async def on_settled(delivery: DeliveryRecord, ok: bool) -> None:
            self.settled.append((delivery.delivery_id, ok))
            self.state.changed.set()

        async def sleep(delay: float) -> None:
            self.sleeps.append(delay)
            await asyncio.sleep(0)

        self.outbox = Outbox(
            cast(StateStore, self.state),
            cast(ImageStore, images),
            self.client,
            policy=policy,
            secret=None,
            on_settled=on_settled,
            clock=self.clock,
            monotonic=self.monotonic,
            sleep=sleep,
            wakeup=wakeup,
        )

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait (on the fake store's change event) until `predicate` holds."""
        async with asyncio.timeout(WAIT_S):
            while not predicate():
                self.state.changed.clear()
                await self.state.changed.wait()

    def row(self, delivery: DeliveryRecord) -> DeliveryRecord:
        return self.state.rows[delivery.delivery_id]

    def fall_due(self, delivery: DeliveryRecord) -> None:
        self.clock.now = self.row(delivery).next_attempt_at + 0.001
        self.outbox.wake()


@asynccontextmanager
async def running(
    handler: Handler,
    images: FakeImages | None = None,
    policy: RetryPolicy | None = None,
    wakeup: asyncio.Event | None = None,
) -> AsyncIterator[Harness]:
    policy = policy or RetryPolicy(max_attempts=3)
    harness = Harness(handler, images or FakeImages({}), policy, wakeup)
    task = asyncio.create_task(harness.outbox.run())
    try:
        yield harness
        assert not task.done(), "the outbox loop ended"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await harness.outbox.close()
        await harness.client.aclose()


def answer(status: int) -> Handler:
    return lambda request: httpx.Response(status)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def webhook(url: str = HOOK) -> DeliveryRecord:
    return new_delivery("webhook", "task-1", url, '{"data": []}')


def test_the_loop_survives_state_store_errors_and_backs_off() -> None:
    async def main() -> None:
        async with running(answer(204)) as h:
            h.state.fail["next_delivery_at"] = 3
            await h.until(lambda: h.state.calls.count("next_delivery_at") >= 4)
            assert h.sleeps == [1.0, 2.0, 4.0]
            delivery = h.state.add(webhook())
            h.outbox.wake()
            await h.until(lambda: h.row(delivery).status == "done")
            assert h.outbox.consecutive_failures == 0
            h.state.fail["claim_deliveries"] = 1
            h.outbox.wake()
            await h.until(lambda: h.sleeps[-1:] == [1.0])

    run(main)


def test_last_pass_at_tells_a_live_loop_from_a_dead_one() -> None:
    async def main() -> None:
        async with running(answer(204)) as h:
            assert not h.outbox.alive()
            await h.until(lambda: h.outbox.last_pass_at is not None)
            assert h.outbox.last_pass_at == 50.0
            assert h.outbox.alive()
            h.monotonic.now += 3 * 30.0 + 1
            assert not h.outbox.alive()
            assert h.outbox.alive(max_age_s=1000.0)

    run(main)


def test_an_unexpected_error_in_an_attempt_counts_as_a_retryable_failed_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="impasto.outbox")

    async def main() -> None:
        images = FakeImages({"a.png": b"png"}, broken=2)
        async with running(answer(200), images, RetryPolicy(max_attempts=2)) as h:
            delivery = h.state.add(new_delivery("upload", "task-1", UPLOAD, "a.png"))
            h.outbox.wake()
            await h.until(lambda: h.row(delivery).attempts == 1)
            row = h.row(delivery)
            assert row.status == "pending"
            assert row.last_error == {"message": "internal error while sending (OSError)"}
            assert row.next_attempt_at > h.clock.now
            h.fall_due(delivery)
            await h.until(lambda: h.row(delivery).status == "failed")
            assert h.row(delivery).attempts == 2
            assert h.settled == [(delivery.delivery_id, False)]
            assert h.requests == []

    run(main)
    assert "X-Amz-Signature" not in caplog.text
    assert "deadbeef" not in caplog.text
    assert "http://127.0.0.1:9/bucket/a.png?…" in caplog.text


def test_a_failure_to_settle_is_counted_and_the_delivery_sent_again() -> None:
    async def main() -> None:
        async with running(answer(204)) as h:
            h.state.fail["settle_delivery"] = 1
            delivery = h.state.add(webhook())
            h.outbox.wake()
            await h.until(lambda: h.row(delivery).attempts == 1)
            assert h.row(delivery).last_error == {
                "message": "internal error while recording the outcome (StoreDown)"
            }
            h.fall_due(delivery)
            await h.until(lambda: h.row(delivery).status == "done")
            assert h.row(delivery).attempts == 2
            assert h.settled == [(delivery.delivery_id, True)]
            # The receiver saw it twice, with one delivery id to drop the duplicate by.
            assert [r.headers[DELIVERY_HEADER] for r in h.requests] == [delivery.delivery_id] * 2

    run(main)


def test_a_failure_to_reschedule_lets_the_lease_lapse(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with running(answer(503)) as h:
            h.state.fail["reschedule_delivery"] = 1
            delivery = h.state.add(webhook())
            h.outbox.wake()
            await h.until(lambda: "reschedule_delivery" in h.state.calls)
            await h.until(lambda: "retried after its lease" in caplog.text)
            row = h.row(delivery)
            assert (row.status, row.attempts) == ("pending", 0)
            assert row.next_attempt_at == delivery.created_at + RetryPolicy().lease_s
            h.fall_due(delivery)
            await h.until(lambda: h.row(delivery).attempts == 1)
            assert h.row(delivery).last_error == {
                "message": "receiver answered HTTP 503",
                "status": 503,
            }
            assert len(h.requests) == 2

    run(main)
    assert "hunter2" not in caplog.text


def test_a_state_store_briefly_away_is_waited_for_instead_of_sending_again() -> None:
    async def main() -> None:
        async with running(answer(204)) as h:
            h.state.raises = ServiceUnavailable
            h.state.fail["settle_delivery"] = 2
            delivery = h.state.add(webhook())
            h.outbox.wake()
            await h.until(lambda: h.row(delivery).status == "done")
            assert h.row(delivery).attempts == 1
            assert len(h.requests) == 1  # recorded once the store was back: not sent again
            assert h.sleeps[:2] == [0.5, 1.0]

    run(main)


def test_a_failing_settled_callback_is_logged_and_does_not_unsettle_the_delivery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with running(answer(204)) as h:
            calls: list[bool] = []

            async def broken(delivery: DeliveryRecord, ok: bool) -> None:
                calls.append(ok)
                h.state.changed.set()
                raise RuntimeError("task store down")

            h.outbox._on_settled = broken
            delivery = h.state.add(webhook())
            h.outbox.wake()
            await h.until(lambda: calls == [True])
            assert h.row(delivery).status == "done"
            assert "reschedule_delivery" not in h.state.calls

    run(main)
    assert "settled, but handling that failed (RuntimeError: task store down)" in caplog.text


def test_outbox_log_lines_carry_no_query_strings(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with running(answer(400)) as h:
            delivery = h.state.add(webhook())
            h.outbox.wake()
            await h.until(lambda: h.row(delivery).status == "failed")

    run(main)
    assert "s3cr3t" not in caplog.text
    assert "webhook to http://127.0.0.1:9/hook?… for task task-1 failed" in caplog.text


def test_a_webhook_to_an_idn_host_is_delivered_with_an_ascii_host_header() -> None:
    async def main() -> None:
        async with running(answer(204)) as h:
            delivery = h.state.add(webhook("http://bücher.example/hook"))
            h.outbox.wake()
            await h.until(lambda: h.row(delivery).status == "done")
            assert h.requests[0].headers["host"] == "xn--bcher-kva.example"

    run(main)


def test_an_outbox_can_be_woken_through_an_event_made_before_it() -> None:
    async def main() -> None:
        wakeup = asyncio.Event()
        async with running(answer(204), wakeup=wakeup) as h:
            await h.until(lambda: "next_delivery_at" in h.state.calls)
            delivery = h.state.add(webhook())
            wakeup.set()
            await h.until(lambda: h.row(delivery).status == "done")

    run(main)
