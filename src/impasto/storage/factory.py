"""Choose the ImageStore from a storage URL: a directory (plain path or file://) or an S3 bucket
(s3://bucket/prefix). boto3 is imported only when a bucket is asked for: it is the
`distributed` extra, and a one-process install does without it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

from impasto.storage.base import ImageStore
from impasto.storage.local import LocalImageStore


class ManagedImageStore(ImageStore, Protocol):
    """An ImageStore with the start-up check and shutdown that the runtime drives."""

    async def check(self) -> None:
        """Raise with a message naming the storage if it cannot be used."""

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""


class CheckedLocalImageStore(LocalImageStore):
    """LocalImageStore with the ManagedImageStore lifecycle, so that the runtime treats a
    directory and a bucket alike."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.root = root

    async def check(self) -> None:
        """The directory exists and this process may write to it."""
        if not await asyncio.to_thread(os.access, self.root, os.W_OK | os.X_OK):
            raise PermissionError(f"image directory {self.root} is not writable")

    async def close(self) -> None:
        """Nothing to release."""


class S3Options(Protocol):
    """The S3 fields of Settings (IMPASTO_S3_*); any object with them will do."""

    @property
    def s3_endpoint_url(self) -> str | None: ...
    @property
    def s3_region(self) -> str | None: ...
    @property
    def s3_access_key_id(self) -> str | None: ...
    @property
    def s3_secret_access_key(self) -> SecretStr | None: ...
    @property
    def s3_url_mode(self) -> str: ...
    @property
    def s3_public_base_url(self) -> str | None: ...


class StorageSettings(S3Options, Protocol):
    """The storage fields of Settings: IMPASTO_STORAGE and the default images directory."""

    @property
    def storage(self) -> str | None: ...
    @property
    def images_dir(self) -> Path: ...


def local_path_from_url(url: str) -> Path | None:
    """The directory of a plain path or file:// URL; None for any other scheme."""
    parts = urlsplit(url)
    if parts.scheme.lower() == "file":
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise ValueError(f"file storage URL {url!r} must be file:///absolute/path")
        if not parts.path:
            raise ValueError(f"file storage URL {url!r} names no directory")
        return Path(unquote(parts.path))
    # A one-letter "scheme" is a Windows drive (C:\images), still a plain path.
    if parts.scheme and len(parts.scheme) > 1:
        return None
    return Path(url).expanduser()


def image_store_from_url(url: str | Path, options: S3Options | None = None) -> ManagedImageStore:
    """LocalImageStore for a path or file:// URL; S3ImageStore for s3://bucket/prefix with the
    endpoint, region, keys and URL mode from `options` (a Settings object, typically)."""
    if isinstance(url, Path):
        return CheckedLocalImageStore(url)
    url = url.strip()
    if not url:
        raise ValueError("empty storage URL")
    if urlsplit(url).scheme.lower() == "s3":
        try:
            from impasto.storage.s3 import S3ImageStore, S3Location, parse_url_mode
        except ImportError as exc:  # boto3 missing
            raise ValueError(
                f"storage {url!r} needs boto3: pip install 'impasto[distributed]' ({exc})"
            ) from exc
        location = S3Location.parse(url)
        if options is None:
            return S3ImageStore(location)
        secret = options.s3_secret_access_key
        return S3ImageStore(
            location,
            endpoint_url=options.s3_endpoint_url or None,
            region=options.s3_region or None,
            access_key_id=options.s3_access_key_id or None,
            secret_access_key=secret.get_secret_value() if secret is not None else None,
            url_mode=parse_url_mode(options.s3_url_mode),
            public_base_url=options.s3_public_base_url or None,
        )
    path = local_path_from_url(url)
    if path is None:
        raise ValueError(
            f"unsupported storage URL {url!r}: use s3://bucket/prefix, file:///dir or a directory"
        )
    return CheckedLocalImageStore(path)


def image_store_for(settings: StorageSettings) -> ManagedImageStore:
    """The store IMPASTO_STORAGE names, or the images directory of the data dir."""
    return image_store_from_url(settings.storage or settings.images_dir, settings)


@asynccontextmanager
async def open_image_store(settings: StorageSettings) -> AsyncIterator[ImageStore]:
    """Build the store, check a bucket is reachable (failing start-up with a message naming
    it), and close its connections on the way out."""
    store = image_store_for(settings)
    await store.check()
    try:
        yield store
    finally:
        await store.close()
