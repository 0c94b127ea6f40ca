"""The outbox: webhook POSTs and upload PUTs, persisted in the StateStore until they settle.

Rules (after Cog's webhook sender): explicit connect/read timeouts; retry with exponential
backoff and full jitter on connection errors, timeouts, 408, 429 (honouring Retry-After) and
5xx; never retry other 4xx or a refused address; give up after `max_attempts` or once the
delivery is older than `budget_s`. Delivery is at least once: a crash after a receiver's 2xx
but before it is recorded sends that delivery again after the restart, with the same
`X-Impasto-Delivery` id so receivers can drop the duplicate.

Signing (when a secret is configured): `X-Impasto-Signature: t=<unix seconds>,v1=<hex>` where
`<hex>` is HMAC-SHA256(secret, f"{t}.{raw body}"). Receivers recompute it over the raw body,
compare in constant time, and reject timestamps older than a few minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
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
from impasto.state.base import StateStore
from impasto.state.records import DeliveryKind, DeliveryRecord
from impasto.storage.base import ImageStore

log = logging.getLogger("impasto.outbox")

SIGNATURE_HEADER = "X-Impasto-Signature"
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


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify_signature(secret: str, header: str, body: bytes, tolerance_s: float = 300.0) -> bool:
    """What a receiver does: recompute and compare in constant time, within a time window."""
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body)
    return hmac.compare_digest(expected, header)


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


class Outbox:
    """Sends due deliveries in the background; `wake()` after queuing new ones."""

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
        self._wakeup = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task[None]] = {}

    def wake(self) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        while True:
            try:
                await self._dispatch_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox pass failed; retrying shortly")
                await asyncio.sleep(1.0)
            next_at = await self._state.next_delivery_at()
            timeout = None if next_at is None else max(0.0, next_at - time.time())
            if self._poll_interval_s is not None:
                timeout = min(timeout or self._poll_interval_s, self._poll_interval_s)
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def close(self) -> None:
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _dispatch_due(self) -> None:
        due = await self._state.claim_deliveries(
            time.time(), limit=self._concurrency * 4, lease_s=self._policy.lease_s
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

    async def _deliver(self, delivery: DeliveryRecord) -> None:
        async with self._slots:
            attempt = await self._attempt(delivery)
        attempts = delivery.attempts + 1
        now = time.time()
        if attempt.ok:
            await self._settle(delivery, "done", attempts, None)
            return
        error = attempt.error or {"message": "delivery failed"}
        exhausted = (
            attempts >= self._policy.max_attempts
            or now - delivery.created_at >= self._policy.budget_s
        )
        if not attempt.retryable or exhausted:
            log.warning(
                "%s to %s for task %s failed after %d attempt(s): %s",
                delivery.kind,
                delivery.url,
                delivery.task_uuid,
                attempts,
                error.get("message"),
            )
            await self._settle(delivery, "failed", attempts, error)
            return
        delay = self._policy.delay(attempts, attempt.retry_after)
        await self._state.reschedule_delivery(delivery.delivery_id, attempts, now + delay, error)

    async def _settle(
        self, delivery: DeliveryRecord, status: str, attempts: int, error: dict[str, Any] | None
    ) -> None:
        follow_ups: list[DeliveryRecord] = []
        if delivery.then:
            follow_ups.append(
                new_delivery(
                    "webhook",
                    delivery.task_uuid,
                    delivery.then["url"],
                    delivery.then["payload"],
                    index=delivery.index,
                )
            )
        settled = await self._state.settle_delivery(
            delivery.delivery_id,
            "done" if status == "done" else "failed",
            attempts,
            error,
            follow_ups,
        )
        if settled:
            await self._on_settled(delivery, status == "done")

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
                headers[SIGNATURE_HEADER] = sign(self._secret, int(time.time()), data)
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
        except (OutboundFailed, httpx.TimeoutException, httpx.TransportError) as exc:
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
