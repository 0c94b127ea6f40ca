"""ScriptedRedis: what every store on Redis shares: a connection pool that reconnects, Lua
scripts registered at `open()`, failures of the service as ServiceUnavailable naming the
store (RedisFailures), a bounded `ping()`, and `close()`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry

from impasto.state.redis_errors import (
    RedisFailures,
    guarded,
    reconnecting_retry,
    redis_location,
)


class ScriptedRedis:
    """Base of the Redis stores; subclasses name their Lua scripts in SCRIPTS."""

    SCRIPTS: ClassVar[Mapping[str, str]] = {}

    def __init__(
        self,
        url: str,
        what: str,
        *,
        retry: Retry | None = None,
        ping_timeout_s: float = 2.0,
    ) -> None:
        self._url = url
        self._retry = retry if retry is not None else reconnecting_retry()
        self._ping_timeout_s = ping_timeout_s
        self._failures = RedisFailures(f"{what} ({redis_location(url)})")
        self._client: Any = None
        self._scripts: dict[str, Any] = {}

    @guarded
    async def open(self) -> None:
        """Connect, and fail now rather than at the first request if Redis is unreachable."""
        options: dict[str, Any] = {"retry": self._retry}
        client = Redis.from_url(self._url, decode_responses=True, **options)
        try:
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        self._client = client
        self._scripts = {
            name: client.register_script(source) for name, source in self.SCRIPTS.items()
        }

    @property
    def _redis(self) -> Any:
        if self._client is None:
            raise RuntimeError(f"{type(self).__name__} used before open()")
        return self._client

    async def ping(self) -> None:
        """Raise ServiceUnavailable unless Redis answers a PING in time."""
        await self._failures.ping(self._redis, self._ping_timeout_s)

    async def _script(self, name: str, keys: list[str], args: Sequence[str | int | float]) -> Any:
        redis = self._redis  # raises before open(), like every other method
        return await self._scripts[name](keys=keys, args=list(args), client=redis)

    async def close(self) -> None:
        """Close the connection pool."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
