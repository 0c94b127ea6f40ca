"""LocalImageStore: image files in a directory of the data dir, served by the API.

A write goes to a temp file in `<root>/.tmp/`, is fsynced, then renamed into place, so a reader
never sees half an image. A failed write removes its temp file; a crash can still leave one,
so opening the store removes temp files older than an hour (younger ones may belong to another
process writing into the same directory right now). Failures of the file system raise
StorageFull (no space, quota) or ServiceUnavailable (anything else), never a bare OSError;
their messages name no path, which is the server's business, not the client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from impasto.protocol.errors import ServiceUnavailable, StorageFull

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Keys never start with a dot, so this directory can never be an image's fan-out directory.
TEMP_DIR = ".tmp"
STALE_TEMP_S = 3600.0
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})

Opener = Callable[[Path], BinaryIO]


def _open_new(path: Path) -> BinaryIO:
    return open(path, "xb")


def storage_error(exc: OSError, action: str) -> ServiceUnavailable:
    """StorageFull for a full disk or quota, ServiceUnavailable for any other OSError."""
    if exc.errno in _NO_SPACE:
        return StorageFull("The image storage is full: no space left to store images.")
    reason = exc.strerror or type(exc).__name__
    return ServiceUnavailable(f"The image storage cannot {action} images ({reason}).")


class LocalImageStore:
    """ImageStore on the local file system; writes are atomic (temp file, then rename).

    `opener` creates a temp file for writing (tests inject a failing one); `clock` dates
    stale temp files.
    """

    def __init__(
        self,
        root: Path,
        *,
        opener: Opener = _open_new,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._root = root
        self._temp = root / TEMP_DIR
        self._opener = opener
        self._clock = clock
        root.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temp_files()

    def _path(self, key: str) -> Path:
        # Keys are ours (UUID + extension), but a path never leaves the root whatever happens.
        if not _KEY.match(key) or ".." in key:
            raise ValueError(f"invalid image key {key!r}")
        # Two levels of fan-out keep directories small with millions of images.
        return self._root / key[:2] / key

    def remove_stale_temp_files(self, older_than_s: float = STALE_TEMP_S) -> int:
        """Delete temp files a crashed write left behind; returns how many. One directory
        is listed, however many images the store holds."""
        cutoff = self._clock() - older_than_s
        removed = 0
        # Housekeeping: a directory it cannot list or a file it cannot remove must not stop
        # the server; the writes themselves report what is wrong.
        try:
            entries = list(os.scandir(self._temp))
        except OSError:
            return 0
        for entry in entries:
            if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
                continue
            # Gone meanwhile: another process cleaned it up or renamed it into place.
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        return removed

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        await asyncio.to_thread(self.put_now, key, data, content_type)

    def put_now(self, key: str, data: bytes, content_type: str) -> None:
        """`put` in the calling thread: the encoder's thread writes what it just encoded,
        without a hop through another thread."""
        path = self._path(key)
        try:
            self._write(path, data)
        except OSError as exc:
            raise storage_error(exc, "store") from exc

    def _write(self, path: Path, data: bytes) -> None:
        self._temp.mkdir(exist_ok=True)
        # Unique per write: two writes of one key (a re-run racing the first) never share it.
        tmp = self._temp / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with self._opener(tmp) as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
        except BaseException:
            # Whatever failed (a full disk mid-write, a quota, the rename), no half image
            # stays behind to fill the disk further; the first error is the one to report.
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise

    async def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise storage_error(exc, "read") from exc

    def direct_url(self, key: str, expires_at: float) -> str | None:
        return None

    async def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(path.unlink, True)
        except OSError as exc:
            raise storage_error(exc, "delete") from exc
