"""The utility engine: runs upscale, background-removal, caption and prompt-enhance requests
on their models, one request per model at a time (each model has one device thread), loading
each model on its first request and keeping it for the next."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from impasto.backends.utility.base import UtilityModel, UtilityOutput, UtilityRequest
from impasto.protocol.errors import ImpastoError, InferenceError

log = logging.getLogger("impasto.utility")

# AIR (of the entry that runs it) -> the model, built but not loaded yet.
UtilityLoader = Callable[[str], Awaitable[UtilityModel]]


class UtilityEngine:
    """Holds the utility models of this process."""

    def __init__(self, load: UtilityLoader) -> None:
        self._load = load
        self._models: dict[str, UtilityModel] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._closed = False

    async def run(self, air: str, request: UtilityRequest) -> UtilityOutput:
        """Run `request` on the model `air`; a failure is an ImpastoError for the task."""
        if self._closed:
            raise InferenceError("The server is shutting down.")
        lock = self._locks.setdefault(air, asyncio.Lock())
        async with lock:
            model = self._models.get(air)
            if model is None:
                model = await self._load(air)
                self._models[air] = model
            try:
                return await model.run(request)
            except ImpastoError:
                raise
            except Exception as exc:
                log.exception("utility model %s failed", air)
                raise InferenceError(f"Model {air} failed: {type(exc).__name__}.") from exc

    def loaded(self) -> list[str]:
        return sorted(self._models)

    async def close(self) -> None:
        self._closed = True
        models, self._models = list(self._models.values()), {}
        for model in models:
            try:
                await model.close()
            except Exception:
                log.exception("closing a utility model failed")
