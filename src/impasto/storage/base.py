"""The ImageStore seam."""

from __future__ import annotations

from typing import Protocol


class ImageStore(Protocol):
    """Image bytes by key (`<imageUUID>.<ext>`). Expiry is tracked by the StateStore."""

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store bytes under a key, replacing any earlier ones."""

    async def get(self, key: str) -> bytes | None:
        """The bytes, or None if there is no such key."""

    async def delete(self, key: str) -> None:
        """Remove a key; no error if it is already gone."""
