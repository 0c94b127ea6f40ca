"""Failures of the Redis service itself, as impasto's errors: one translation shared by the
Redis state store, job queue and event bus. A failure of the service (unreachable, loading,
read-only, out of memory, cannot persist) becomes ServiceUnavailable or StorageFull with a
message naming what failed; errors of our own making pass unchanged."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar
from urllib.parse import urlsplit

from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from impasto.protocol.errors import ServiceUnavailable, StorageFull
from impasto.state.failures import FailureTranslation

T = TypeVar("T")
P = ParamSpec("P")

# Checked in order: the first class that matches names the reason.
_UNAVAILABLE: tuple[tuple[type[BaseException], str], ...] = (
    (redis_errors.BusyLoadingError, "is still loading its data after a restart"),
    (redis_errors.AuthenticationError, "refused the configured credentials"),
    (redis_errors.TimeoutError, "did not answer in time"),
    (redis_errors.ConnectionError, "cannot be reached"),
    (redis_errors.ReadOnlyError, "is a read-only replica"),
    (redis_errors.NoPermissionError, "refused the command (ACL permissions)"),
    (redis_errors.MasterDownError, "is not ready (its primary is down)"),
    (redis_errors.TryAgainError, "is not ready"),
    (OSError, "cannot be reached"),
)


def redis_location(url: str) -> str:
    """`Redis at host:port` for messages: the user name and password of the URL stay out."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"Redis at unix:{parts.path}"
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port or 6379
    except ValueError:
        return f"Redis at {host}"
    return f"Redis at {host}:{port}"


class RedisFailures(FailureTranslation):
    """Re-raises a failure of the Redis service itself as ServiceUnavailable (StorageFull when
    it is out of memory or cannot persist) with a message naming what failed, e.g. "The state
    store (Redis at 127.0.0.1:6379) cannot be reached."; errors of our own making (a bad
    command, WRONGTYPE) and RuntimeError (used before open) pass unchanged."""

    def __init__(self, what: str) -> None:
        self.what = what

    def translate(self, exc: BaseException) -> ServiceUnavailable | None:
        """The error to raise instead of `exc`, or None to let `exc` through."""
        if isinstance(exc, ServiceUnavailable):
            return None
        text = str(exc)
        if isinstance(exc, redis_errors.OutOfMemoryError) or text.startswith("OOM"):
            return StorageFull(self._sentence("is out of memory and refuses writes"))
        if text.startswith("MISCONF"):
            # Redis refuses writes once a snapshot failed, most often for lack of disk space.
            return StorageFull(self._sentence("cannot save its data (is its disk full?)"))
        if isinstance(exc, redis_errors.ResponseError) and text.startswith("BUSY "):
            return ServiceUnavailable(self._sentence("is busy running a script"))
        for kind, reason in _UNAVAILABLE:
            if isinstance(exc, kind):
                return ServiceUnavailable(self._sentence(reason))
        return None

    def unavailable(self, reason: str) -> ServiceUnavailable:
        """A ServiceUnavailable naming the service, for failures detected by our own code."""
        return ServiceUnavailable(self._sentence(reason))

    def _sentence(self, reason: str) -> str:
        return f"{self.what[:1].upper()}{self.what[1:]} {reason}."

    async def ping(self, client: Any, timeout_s: float) -> None:
        """PING within `timeout_s`: a host that drops packets must not hold a health check
        for the client's whole connect-and-retry budget."""
        with self:
            try:
                async with asyncio.timeout(timeout_s):
                    await client.ping()
            except TimeoutError:
                raise self.unavailable(f"did not answer a PING within {timeout_s:g} s") from None


class _Guarded(Protocol):
    _failures: RedisFailures


G = TypeVar("G", bound=_Guarded)


def guarded(
    method: Callable[Concatenate[G, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[G, P], Coroutine[Any, Any, T]]:
    """Run an async method inside its object's RedisFailures, so that no redis-py error about
    the service escapes it."""

    @functools.wraps(method)
    async def wrapper(self: G, /, *args: P.args, **kwargs: P.kwargs) -> T:
        with self._failures:
            return await method(self, *args, **kwargs)

    return wrapper


def reconnecting_retry() -> Retry:
    """What a client does with a connection that broke: try again a couple of times on a
    fresh one. compat: redis-py 8's `from_url` gives pooled connections no retry at all, so
    after a Redis restart the first command on every connection kept from before would fail."""
    return Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.5), 2)
