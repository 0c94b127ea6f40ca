"""The KeyDirectory: who a presented API key is, and which of its keys were revoked.

Operator keys come from IMPASTO_API_KEYS; managed keys from the KeyStore, which `impasto keys`
(another process, maybe on another machine) writes. Every node keeps the managed keys in
memory and reloads them every `refresh_s`: a key's limits, its revocation and its expiry reach
a node within that time, and authentication costs no round trip. A key this node has not seen
yet (made a moment ago) is looked up once by its digest.

The server is open (no key needed, tasks belong to nobody) only while there are neither
operator keys nor managed keys: making the first key closes it, and revoking every key does
not open it again.

Failed authentications are throttled per client address (a token bucket of
`failures_per_minute` on the shared RateLimiter): past it, every attempt from that address,
right or wrong, gets a 429 until the bucket refills, so keys cannot be tried at speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Callable, Sequence

from impasto.protocol.errors import AuthError, RateLimited
from impasto.tenancy.keys import (
    ANONYMOUS,
    ApiKey,
    KeyStore,
    Principal,
    digest_of,
    operator_principal,
)
from impasto.tenancy.limits import Bucket, RateLimiter

log = logging.getLogger("impasto.keys")

Clock = Callable[[], float]
# Told the owner digest of every key that stopped being usable (revoked or expired).
RevokedCallback = Callable[[str], object]


def principal_of(key: ApiKey) -> Principal:
    return Principal(key_id=key.key_id, name=key.name, owner=key.digest, limits=key.limits)


class KeyDirectory:
    """Authenticates keys against operator keys and the managed keys of a KeyStore."""

    def __init__(
        self,
        operator_keys: Sequence[str],
        store: KeyStore | None = None,
        limiter: RateLimiter | None = None,
        *,
        failures_per_minute: int = 10,
        refresh_s: float = 2.0,
        clock: Clock = time.time,
    ) -> None:
        self._operators = [(k.encode(), operator_principal(k)) for k in operator_keys]
        self._store = store
        self._limiter = limiter
        self._failures_per_minute = failures_per_minute
        self._refresh_s = refresh_s
        self._clock = clock
        self._keys: dict[str, ApiKey] = {}
        self._usable: set[str] = set()
        self._on_revoked: list[RevokedCallback] = []

    @property
    def open(self) -> bool:
        """No key is needed: there are no operator keys and no managed key was ever made
        (revoking or outliving the last one does not open the server)."""
        return not self._operators and not self._keys

    def on_revoked(self, callback: RevokedCallback) -> None:
        self._on_revoked.append(callback)

    async def refresh(self) -> None:
        """Reload the managed keys; tell the callbacks about keys no longer usable."""
        if self._store is None:
            return
        keys = await self._store.list_keys()
        now = self._clock()
        usable = {k.digest for k in keys if k.active(now)}
        gone = self._usable - usable
        self._keys = {k.digest: k for k in keys}
        self._usable = usable
        for owner in gone:
            for callback in self._on_revoked:
                try:
                    callback(owner)
                except Exception:
                    log.exception("revocation callback failed")

    async def run(self) -> None:
        """Refresh every `refresh_s`; a store that is away is tried again at the next turn."""
        while True:
            await asyncio.sleep(self._refresh_s)
            with contextlib.suppress(Exception):
                await self.refresh()

    async def authenticate(self, secret: str | None, client: str | None = None) -> Principal:
        """The principal of `secret`; AuthError if it is missing or not a usable key,
        RateLimited while `client` has failed too often."""
        if self.open:
            return ANONYMOUS
        bucket = self._failure_bucket(client)
        if bucket is not None and self._limiter is not None:
            wait = await self._limiter.peek(bucket, self._clock())
            if wait > 0:
                raise RateLimited(
                    f"Too many failed authentications from this address; retry in "
                    f"{max(1, round(wait))} s.",
                    retry_after_s=wait,
                    parameter="apiKey",
                    task_type="authentication",
                )
        try:
            return await self._identify(secret)
        except AuthError:
            if bucket is not None and self._limiter is not None:
                await self._limiter.take([bucket], self._clock())
            raise

    def _failure_bucket(self, client: str | None) -> Bucket | None:
        if not client or self._failures_per_minute <= 0:
            return None
        return Bucket(f"authfail:{client}", self._failures_per_minute)

    async def _identify(self, secret: str | None) -> Principal:
        if not secret:
            raise AuthError(
                "An API key is required: send Authorization: Bearer <key> or an authentication "
                "task first.",
                code="missingApiKey",
                parameter="apiKey",
                task_type="authentication",
            )
        given = secret.encode()
        # Compare against every operator key so the time taken does not tell which one
        # nearly matched.
        found: Principal | None = None
        for candidate, principal in self._operators:
            if hmac.compare_digest(given, candidate):
                found = principal
        if found is not None:
            return found
        digest = digest_of(secret)
        key = self._keys.get(digest)
        if key is None and self._store is not None:
            key = await self._store.key_by_digest(digest)
            if key is not None:
                self._keys[digest] = key
                if key.active(self._clock()):
                    self._usable.add(digest)
        if key is None:
            raise AuthError("Invalid API key.", parameter="apiKey", task_type="authentication")
        return self._usable_principal(key)

    def _usable_principal(self, key: ApiKey) -> Principal:
        status = key.status(self._clock())
        if status != "active":
            raise AuthError(
                f"This API key was {status} ({key.name}).",
                parameter="apiKey",
                task_type="authentication",
            )
        return principal_of(key)

    def recheck(self, principal: Principal) -> Principal:
        """The principal as this node knows it now (new limits), for a connection that
        authenticated earlier; AuthError if its key was revoked or expired meanwhile."""
        if principal.anonymous or principal.operator:
            return principal
        key = self._keys.get(principal.owner)
        if key is None:
            return principal
        return self._usable_principal(key)

    def name_of(self, owner: str) -> str | None:
        key = self._keys.get(owner)
        return key.name if key is not None else None
