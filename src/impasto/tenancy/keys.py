"""API keys as the server keeps them, and the seams that store them and their usage.

A key is shown once, when it is made; the store keeps its SHA-256 digest. Keys are 256-bit
random tokens, so a fast digest is enough: there is no dictionary to try against it, and the
digest is what every task already records as its owner.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

KEY_PREFIX = "imp_"


def new_secret() -> str:
    """A new API key: `imp_` and 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest_of(secret: str) -> str:
    """What is stored of a key, and what its tasks record as their owner."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Limits:
    """What one key may do; None is no limit."""

    tasks_per_minute: int | None = None
    images_per_minute: int | None = None
    max_concurrent: int | None = None
    # AIRs this key may run; empty: every model.
    models: tuple[str, ...] = ()

    def allows_model(self, air: str) -> bool:
        return not self.models or air in self.models


@dataclass(frozen=True)
class ApiKey:
    """A managed key (never its secret)."""

    key_id: str
    name: str
    digest: str
    # The first characters of the secret, to tell keys apart in listings.
    hint: str
    created_at: float
    limits: Limits = field(default_factory=Limits)
    expires_at: float | None = None
    revoked_at: float | None = None

    def active(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"


@dataclass(frozen=True)
class Principal:
    """Who sent a request: a managed key, an operator key from settings, or nobody (an open
    server)."""

    key_id: str
    name: str
    # The key's digest: the owner recorded on its tasks. Empty for nobody.
    owner: str
    limits: Limits = field(default_factory=Limits)
    operator: bool = False

    @property
    def anonymous(self) -> bool:
        return not self.owner


ANONYMOUS = Principal(key_id="", name="(open)", owner="")
# `impasto generate` running the server's handlers in its own process: the machine's operator.
LOCAL = Principal(key_id="local", name="(local)", owner="", operator=True)


def operator_principal(secret: str) -> Principal:
    """A key from IMPASTO_API_KEYS: no limits, named `operator`."""
    digest = digest_of(secret)
    return Principal(key_id=f"op_{digest[:12]}", name="operator", owner=digest, operator=True)


@dataclass(frozen=True)
class UsageRecord:
    """One finished image: who made it, with what, and what it cost."""

    task_uuid: str
    index: int
    key_id: str
    key_name: str
    model: str
    width: int
    height: int
    cost: float
    at: float


@dataclass(frozen=True)
class UsageTotals:
    """Usage summed over one key and one model."""

    key_id: str
    key_name: str
    model: str
    images: int
    cost: float
    pixels: int
    first_at: float | None
    last_at: float | None


class KeyNotFound(LookupError):
    """No key by that name or id."""


class KeyStore(Protocol):
    """Managed keys, shared by every node (SQLite file or Redis).

    Every method raises ServiceUnavailable when the backing service cannot be used."""

    async def create_key(self, key: ApiKey) -> None:
        """Store a new key; ValueError if a key of that name is active."""

    async def key_by_digest(self, digest: str) -> ApiKey | None:
        """The key with that digest (active or not), or None."""

    async def list_keys(self) -> list[ApiKey]:
        """Every key, oldest first."""

    async def revoke_key(self, name_or_id: str, at: float) -> list[ApiKey]:
        """Revoke the keys of that name (or the key of that id) not revoked yet, expired ones
        too; KeyNotFound if there are none."""


class UsageLedger(Protocol):
    """Finished images, recorded once each (a (task, index) is recorded at most once)."""

    async def record_usage(self, records: Sequence[UsageRecord]) -> None:
        """Add records; ones already recorded are ignored."""

    async def usage_totals(
        self, *, key_ids: Sequence[str] = (), since: float | None = None
    ) -> list[UsageTotals]:
        """Totals per key and model (only these keys, if given), over records at or after
        `since`, by key name then model."""

    async def task_usage(self, task_uuid: str) -> list[UsageRecord]:
        """The records of one task, by index."""


class TenancyStore(KeyStore, UsageLedger, Protocol):
    """Keys and usage in one place."""

    async def close(self) -> None:
        """Release connections."""
