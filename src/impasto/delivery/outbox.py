"""The outbox: webhook POSTs and upload PUTs, persisted in the StateStore until they settle.

Rules (after Cog's webhook sender): explicit connect/read timeouts; retry with exponential
backoff and full jitter on connection errors, timeouts, 408, 429 (honouring Retry-After) and
5xx; never retry other 4xx or a refused address; give up after `max_attempts` or once the
delivery is older than `budget_s`. Delivery is at least once: a crash after a receiver's 2xx
but before it is recorded sends that delivery again after the restart, with the same
`X-Impasto-Delivery` id so receivers can drop the duplicate. An error of our own during an
attempt (image store, state store, a bug) counts as a failed, retryable attempt; when even that
cannot be recorded, the claim's lease lapses and the delivery is taken again later.
Webhooks are signed when a secret is configured (delivery/signing.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from impasto.delivery.outbound import OutboundClient, OutboundFailed, OutboundRefused
from impasto.delivery.redact import describe_error, redact_url, redacted_traceback
from impasto.delivery.signing import SIGNATURE_HEADER, sign
from impasto.protocol.errors import ServiceUnavailable
from impasto.state.base import StateStore
from impasto.state.records import DeliveryKind, DeliveryRecord
from impasto.storage.base import ImageStore

log = logging.getLogger("impasto.outbox")

# Waits between tries to record an attempt's outcome while the state store is unavailable.
RECORD_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)
DELIVERY_HEADER = "X-Impasto-Delivery"


@dataclass(frozen=True)
class RetryPolicy:
    """How hard the outbox tries. The defaults ride out a receiver restart of several minutes."""

    max_attempts: int = 12
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0
    budget_s: float = 30 * 60.0
    connect_timeout_s: float = 5.0
    webhook_read_timeout_s: float = 30.0
    upload_read_timeout_s: float = 120.0
    # How long a claimed delivery is hidden from other nodes: longer than one attempt can take.
    lease_s: float = 300.0

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        """Wait before attempt number `attempts + 1`; full jitter over the exponential."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** max(0, attempts - 1))
        delay = random.uniform(ceiling / 2, ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_delay_s))
        return delay


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    if value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    return None


@dataclass(frozen=True)
class Attempt:
    """What one try came to."""

    ok: bool
    retryable: bool
    error: dict[str, Any] | None = None
    retry_after: float | None = None


SettledCallback = Callable[[DeliveryRecord, bool], Awaitable[None]]

# Backoff of the loop itself while the state store fails: 1 s, 2 s, 4 s, ... at most 30 s.
PASS_RETRY_BASE_S = 1.0
PASS_RETRY_MAX_S = 30.0


class Outbox:
    """Sends due deliveries in the background; `wake()` after queuing new ones.

    `last_pass_at` (on the `monotonic` clock) is when the loop last finished a pass, failed or
    not; passes happen at least every `idle_poll_s`, so a supervisor that sees it older than a
    few of those knows the loop is dead or stuck (`alive()`). `consecutive_failures` counts
    passes in a row that failed (the state store is down)."""

    def __init__(
        self,
        state: StateStore,
        images: ImageStore,
        client: OutboundClient,
        *,
        policy: RetryPolicy,
        secret: str | None,
        on_settled: SettledCallback,
        concurrency: int = 16,
        poll_interval_s: float | None = None,
        idle_poll_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        wakeup: asyncio.Event | None = None,
    ) -> None:
        self._state = state
        self._images = images
        self._client = client
        self._policy = policy
        self._secret = secret
        self._on_settled = on_settled
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._poll_interval_s = poll_interval_s
        self._idle_poll_s = idle_poll_s
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        # Given when others must wake the outbox before it exists (setting it is `wake()`).
        self._wakeup = wakeup or asyncio.Event()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self.last_pass_at: float | None = None
        self.consecutive_failures = 0

    def wake(self) -> None:
        self._wakeup.set()

    def alive(self, max_age_s: float | None = None) -> bool:
        """Whether the loop finished a pass within `max_age_s` (default: three idle polls)."""
        if self.last_pass_at is None:
            return False
        limit = 3 * self._idle_poll_s if max_age_s is None else max_age_s
        return self._monotonic() - self.last_pass_at <= limit

    async def run(self) -> None:
        """Deliver until cancelled: no error but cancellation ends this loop."""
        while True:
            try:
                await self._pass()
            except Exception as exc:
                self.consecutive_failures += 1
                delay = min(
                    PASS_RETRY_MAX_S, PASS_RETRY_BASE_S * 2 ** (self.consecutive_failures - 1)
                )
                log.warning("outbox pass failed (%s); retrying in %g s", describe_error(exc), delay)
                log.debug("outbox pass failure: %s", redacted_traceback(exc))
                self.last_pass_at = self._monotonic()
                await self._sleep(delay)

    async def _pass(self) -> None:
        # Cleared before looking, so a wake() while this pass runs is not lost.
        self._wakeup.clear()
        await self._dispatch_due()
        next_at = await self._state.next_delivery_at()
        self.consecutive_failures = 0
        self.last_pass_at = self._monotonic()
        timeout = self._idle_poll_s
        if next_at is not None:
            timeout = min(timeout, max(0.0, next_at - self._clock()))
        if self._poll_interval_s is not None:
            timeout = min(timeout, self._poll_interval_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def close(self) -> None:
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _dispatch_due(self) -> None:
        due = await self._state.claim_deliveries(
            self._clock(), limit=self._concurrency * 4, lease_s=self._policy.lease_s
        )
        for delivery in due:
            if delivery.delivery_id in self._in_flight:
                continue
            task = asyncio.create_task(self._deliver(delivery))
            self._in_flight[delivery.delivery_id] = task
            task.add_done_callback(functools.partial(self._done, delivery.delivery_id))

    def _done(self, key: str, _task: asyncio.Task[None]) -> None:
        self._in_flight.pop(key, None)
        # A finished attempt may have queued follow-ups or a sooner retry.
        self._wakeup.set()

    def _unexpected(self, delivery: DeliveryRecord, exc: Exception, during: str) -> Attempt:
        """An error of ours (image store, state store, a bug) counts as a failed attempt."""
        log.warning(
            "%s to %s for task %s: unexpected error %s (%s)",
            delivery.kind,
            redact_url(delivery.url),
            delivery.task_uuid,
            during,
            describe_error(exc),
        )
        log.debug("unexpected delivery error: %s", redacted_traceback(exc))
        # No exception text: it may carry the URL with its token, and it reaches the client.
        message = f"internal error {during} ({type(exc).__name__})"
        return Attempt(ok=False, retryable=True, error={"message": message})

    def _verdict(self, delivery: DeliveryRecord, attempts: int, attempt: Attempt) -> str | None:
        """The status to settle the delivery with, or None to try again later."""
        if attempt.ok:
            return "done"
        exhausted = (
            attempts >= self._policy.max_attempts
            or self._clock() - delivery.created_at >= self._policy.budget_s
        )
        return "failed" if exhausted or not attempt.retryable else None

    async def _deliver(self, delivery: DeliveryRecord) -> None:
        attempts = delivery.attempts + 1
        try:
            async with self._slots:
                attempt = await self._attempt(delivery)
        except Exception as exc:
            attempt = self._unexpected(delivery, exc, "while sending")
        verdict = self._verdict(delivery, attempts, attempt)
        failure: Exception | None = None
        # A state store that is briefly away (a Redis restart) is waited for here: left to the
        # claim's lease, a delivered webhook would be sent again minutes later.
        for delay in (*RECORD_RETRY_DELAYS_S, None):
            try:
                await self._record(delivery, attempts, attempt, verdict)
                return
            except ServiceUnavailable as exc:
                failure = exc
            except Exception as exc:
                failure = exc
                break
            if delay is not None:
                await self._sleep(delay)
        assert failure is not None
        if verdict is not None:
            # Settling failed: count that as a failed attempt, so it cannot repeat forever.
            attempt = self._unexpected(delivery, failure, "while recording the outcome")
            if self._verdict(delivery, attempts, attempt) is None:
                try:
                    await self._record(delivery, attempts, attempt, None)
                    return
                except Exception as exc:
                    failure = exc
        # The state store is down: the claim's lease lapses and the delivery is taken again.
        log.warning(
            "%s to %s for task %s: could not record attempt %d (%s); retried after its lease",
            delivery.kind,
            redact_url(delivery.url),
            delivery.task_uuid,
            attempts,
            describe_error(failure),
        )

    async def _record(
        self, delivery: DeliveryRecord, attempts: int, attempt: Attempt, verdict: str | None
    ) -> None:
        error = None if attempt.ok else (attempt.error or {"message": "delivery failed"})
        if verdict is None:
            assert error is not None
            delay = self._policy.delay(attempts, attempt.retry_after)
            await self._state.reschedule_delivery(
                delivery.delivery_id, attempts, self._clock() + delay, error
            )
            return
        if verdict == "failed":
            log.warning(
                "%s to %s for task %s failed after %d attempt(s): %s",
                delivery.kind,
                redact_url(delivery.url),
                delivery.task_uuid,
                attempts,
                (error or {}).get("message"),
            )
        await self._settle(delivery, verdict, attempts, error)

    async def _settle(
        self, delivery: DeliveryRecord, status: str, attempts: int, error: dict[str, Any] | None
    ) -> None:
        follow_ups: list[DeliveryRecord] = []
        if delivery.then:
            url, payload = delivery.then.get("url"), delivery.then.get("payload")
            if isinstance(url, str) and isinstance(payload, str):
                follow_ups.append(
                    new_delivery("webhook", delivery.task_uuid, url, payload, index=delivery.index)
                )
            else:
                log.warning("delivery %s has a malformed follow-up; dropped", delivery.delivery_id)
        settled = await self._state.settle_delivery(
            delivery.delivery_id,
            "done" if status == "done" else "failed",
            attempts,
            error,
            follow_ups,
        )
        if not settled:
            return
        try:
            await self._on_settled(delivery, status == "done")
        except Exception as exc:
            # The delivery is settled for good; retrying it would not run this again.
            log.warning(
                "%s for task %s settled, but handling that failed (%s)",
                delivery.kind,
                delivery.task_uuid,
                describe_error(exc),
            )

    async def _attempt(self, delivery: DeliveryRecord) -> Attempt:
        headers = {DELIVERY_HEADER: delivery.delivery_id, "Content-Type": delivery.content_type}
        if delivery.kind == "upload":
            data = await self._images.get(delivery.payload)
            if data is None:
                return Attempt(
                    ok=False, retryable=False, error={"message": "the image is no longer stored"}
                )
            method, read_timeout = "PUT", self._policy.upload_read_timeout_s
        else:
            data = delivery.payload.encode()
            method, read_timeout = "POST", self._policy.webhook_read_timeout_s
            if self._secret:
                headers[SIGNATURE_HEADER] = sign(self._secret, int(self._clock()), data)
        timeout = httpx.Timeout(read_timeout, connect=self._policy.connect_timeout_s)
        try:
            response = await self._client.request(
                method,
                delivery.url,
                content=data,
                headers=headers,
                timeout=timeout,
                follow_redirects=delivery.kind == "upload",
            )
        except OutboundRefused as exc:
            return Attempt(ok=False, retryable=False, error={"message": f"refused: {exc}"})
        except (OutboundFailed, httpx.RequestError) as exc:
            kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
            return Attempt(
                ok=False,
                retryable=True,
                error={"message": f"connection {kind}: {type(exc).__name__}"},
            )
        status = response.status_code
        if 200 <= status < 300:
            return Attempt(ok=True, retryable=False)
        retryable = status in (408, 425, 429) or status >= 500
        return Attempt(
            ok=False,
            retryable=retryable,
            error={"message": f"receiver answered HTTP {status}", "status": status},
            retry_after=_retry_after(response) if status in (429, 503) else None,
        )


def new_delivery(
    kind: DeliveryKind,
    task_uuid: str,
    url: str,
    payload: str,
    *,
    index: int | None = None,
    content_type: str = "application/json",
    then: dict[str, Any] | None = None,
) -> DeliveryRecord:
    """A delivery due now. Webhooks carry their JSON body; uploads the image's storage key."""
    now = time.time()
    return DeliveryRecord(
        delivery_id=str(uuid.uuid4()),
        task_uuid=task_uuid,
        index=index,
        kind=kind,
        url=url,
        payload=payload,
        content_type=content_type,
        created_at=now,
        next_attempt_at=now,
        then=then,
    )
