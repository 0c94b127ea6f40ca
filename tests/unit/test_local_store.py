"""LocalImageStore when the file system fails: a full disk or quota is StorageFull, anything
else ServiceUnavailable, and a failed write leaves no temp file; temp files a crash left
behind are removed when the store opens, once they are old enough to be nobody's."""

from __future__ import annotations

import asyncio
import errno
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest

from impasto.protocol.errors import ServiceUnavailable, StorageFull
from impasto.storage.local import TEMP_DIR, LocalImageStore

KEY = "0f8e2a1c-9b7d-4c3e-8a5f-6d4b2c1e0a9f.png"
DATA = b"\x89PNG" + b"\0" * 4096
NOW = 1_800_000_000.0


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


class FillingUpFile(io.BufferedWriter):
    """A real file on disk that takes `room` bytes, then fails like a full disk would."""

    def __init__(self, path: Path, room: int, error: int) -> None:
        super().__init__(io.FileIO(path, "xb"))
        self.room = room
        self.error = error

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if len(data) > self.room:
            super().write(bytes(data)[: self.room])
            super().flush()
            raise OSError(self.error, os.strerror(self.error))
        self.room -= len(data)
        return super().write(data)


def filling_up(room: int, error: int = errno.ENOSPC) -> Callable[[Path], BinaryIO]:
    return lambda path: FillingUpFile(path, room, error)


def put(store: LocalImageStore, key: str = KEY, data: bytes = DATA) -> None:
    asyncio.run(store.put(key, data, "image/png"))


def get(store: LocalImageStore, key: str = KEY) -> bytes | None:
    return asyncio.run(store.get(key))


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_mid_write_raises_storage_full_and_leaves_no_temp_file(
    tmp_path: Path, error: int
) -> None:
    store = LocalImageStore(tmp_path, opener=filling_up(room=1000, error=error))
    with pytest.raises(StorageFull) as caught:
        put(store)
    assert caught.value.code == "storageFull"
    assert caught.value.http_status == 503
    assert str(tmp_path) not in caught.value.message
    assert files_under(tmp_path) == []
    assert get(store) is None


def test_a_failed_fsync_raises_storage_full_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Delayed allocation: the write is accepted into the page cache, the disk says no at fsync.
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    store = LocalImageStore(tmp_path)
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StorageFull):
        put(store)
    assert files_under(tmp_path) == []


def test_a_failed_rename_raises_service_unavailable_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(src: str | Path, dst: str | Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    store = LocalImageStore(tmp_path)
    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(ServiceUnavailable) as caught:
        put(store)
    assert not isinstance(caught.value, StorageFull)
    assert caught.value.message == "The image storage cannot store images (Input/output error)."
    assert files_under(tmp_path) == []


def test_a_write_that_is_refused_raises_service_unavailable(tmp_path: Path) -> None:
    def refused(path: Path) -> BinaryIO:
        raise PermissionError(errno.EACCES, "Permission denied")

    store = LocalImageStore(tmp_path, opener=refused)
    with pytest.raises(ServiceUnavailable, match="Permission denied") as caught:
        put(store)
    assert caught.value.code == "serviceUnavailable"
    assert files_under(tmp_path) == []


def test_a_write_that_fails_for_another_reason_leaves_no_temp_file_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    store = LocalImageStore(tmp_path)
    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        put(store)
    assert files_under(tmp_path) == []


def test_after_a_full_disk_the_next_write_succeeds_once_there_is_room(tmp_path: Path) -> None:
    room = {"bytes": 100}
    store = LocalImageStore(
        tmp_path, opener=lambda path: FillingUpFile(path, room["bytes"], errno.ENOSPC)
    )
    with pytest.raises(StorageFull):
        put(store)
    room["bytes"] = len(DATA)
    put(store)
    assert get(store) == DATA
    assert files_under(tmp_path) == [f"{KEY[:2]}/{KEY}"]


def test_a_read_that_fails_raises_service_unavailable(tmp_path: Path) -> None:
    store = LocalImageStore(tmp_path)
    # A directory where the image should be: reading it fails with an OSError other than
    # "not found".
    (tmp_path / KEY[:2] / KEY).mkdir(parents=True)
    with pytest.raises(ServiceUnavailable, match="cannot read"):
        get(store)


def test_reads_writes_and_deletes_leave_only_the_image(tmp_path: Path) -> None:
    store = LocalImageStore(tmp_path)
    put(store)
    put(store, data=b"replaced")
    assert get(store) == b"replaced"
    assert files_under(tmp_path) == [f"{KEY[:2]}/{KEY}"]
    asyncio.run(store.delete(KEY))
    asyncio.run(store.delete(KEY))
    assert get(store) is None
    assert files_under(tmp_path) == []


def _temp_file(root: Path, name: str, age_s: float) -> Path:
    path = root / TEMP_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"partial")
    os.utime(path, (NOW - age_s, NOW - age_s))
    return path


def test_opening_the_store_removes_temp_files_older_than_an_hour_only(tmp_path: Path) -> None:
    crashed = _temp_file(tmp_path, f".{KEY}.4242.abcd1234.tmp", age_s=3601)
    in_flight = _temp_file(tmp_path, f".{KEY}.4343.ef567890.tmp", age_s=60)
    not_ours = _temp_file(tmp_path, "notes.txt", age_s=10 * 3600)
    image = tmp_path / KEY[:2] / KEY
    image.parent.mkdir()
    image.write_bytes(DATA)
    os.utime(image, (NOW - 10 * 3600, NOW - 10 * 3600))

    store = LocalImageStore(tmp_path, clock=lambda: NOW)

    assert (crashed.exists(), in_flight.exists(), not_ours.exists()) == (False, True, True)
    assert get(store) == DATA
    assert store.remove_stale_temp_files() == 0
    # An hour later, the write that was in flight then is stale too.
    LocalImageStore(tmp_path, clock=lambda: NOW + 3600)
    assert (in_flight.exists(), not_ours.exists()) == (False, True)


def test_a_store_on_a_fresh_directory_opens_without_a_temp_directory(tmp_path: Path) -> None:
    root = tmp_path / "images"
    store = LocalImageStore(root)
    assert store.remove_stale_temp_files() == 0
    assert list(root.iterdir()) == []
