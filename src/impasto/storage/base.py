"""The ImageStore seam."""

from __future__ import annotations

from typing import Protocol


class ImageStore(Protocol):
    """Image bytes by key (`<imageUUID>.<ext>`). Expiry is tracked by the StateStore.

    Every method raises ServiceUnavailable when the storage cannot be used (StorageFull when
    it has no space left), never the storage library's own errors; a failed `put` leaves
    nothing behind under the key.
    """

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store bytes under a key, replacing any earlier ones."""

    async def get(self, key: str) -> bytes | None:
        """The bytes, or None if there is no such key."""

    async def delete(self, key: str) -> None:
        """Remove a key; no error if it is already gone."""

    def direct_url(self, key: str, expires_at: float) -> str | None:
        """A URL clients may fetch the image from directly until `expires_at`, or None to
        serve it through impasto's own /image route (which enforces the TTL exactly)."""
