"""LocalImageStore: image files in a directory of the data dir, served by the API."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class LocalImageStore:
    """ImageStore on the local file system; writes are atomic (temp file, then rename)."""

    def __init__(self, root: Path) -> None:
        self._root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        # Keys are ours (UUID + extension), but a path never leaves the root whatever happens.
        if not _KEY.match(key) or ".." in key:
            raise ValueError(f"invalid image key {key!r}")
        # Two levels of fan-out keep directories small with millions of images.
        return self._root / key[:2] / key

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        await asyncio.to_thread(self._write, self._path(key), data)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    async def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None

    def direct_url(self, key: str, expires_at: float) -> str | None:
        return None

    async def delete(self, key: str) -> None:
        path = self._path(key)
        await asyncio.to_thread(path.unlink, True)
