"""S3ImageStore: image bytes in an S3-compatible bucket (AWS S3, MinIO, Cloudflare R2, …).

Every boto3 call runs in a worker thread (`asyncio.to_thread`) on one client created up front;
boto3 clients are thread-safe, sessions are not, so the session is used once, here, and dropped.
boto3 is untyped: `Any` stays inside this module, the class exposes typed methods only.

Three ways for clients to get the bytes (`url_mode`):

- `proxy` (default): `direct_url` is None, impasto serves `/image/<key>` from the bucket and
  answers 404 the second the TTL has passed.
- `presigned`: a presigned GET URL valid until `min(expires_at, now + 7 days)` (SigV4's limit).
  After that S3 answers 403 (AccessDenied, "Request has expired"), not 404.
- `public`: `public_base_url` + the object key, for a bucket (or CDN in front of it) that is
  publicly readable. Expiry is then only as exact as the sweeper's interval and the bucket's
  lifecycle rule: the object stays readable until one of them deletes it.

A failed call raises S3ImageStoreError, a ServiceUnavailable (S3StorageFull, a StorageFull,
when the server says it is out of space): the client gets a 503 whose message names the bucket
and what failed, in our words, never the server's raw text nor the endpoint's credentials.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from impasto.protocol.errors import ServiceUnavailable, StorageFull

UrlMode = Literal["proxy", "presigned", "public"]
URL_MODES: tuple[UrlMode, ...] = ("proxy", "presigned", "public")

# SigV4 presigned URLs live at most 7 days; S3 refuses a longer X-Amz-Expires.
PRESIGN_MAX_S = 7 * 24 * 3600

# The same keys as LocalImageStore's (`<imageUUID>.<ext>`): nothing that could read as a path
# segment (`..`, `/`) once appended to a prefix or a public base URL.
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Lenient on purpose: legacy us-east-1 buckets and S3-compatible servers allow more than
# today's AWS rules; the server itself is the judge, this only catches a malformed URL.
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_MISSING_KEY = frozenset({"NoSuchKey", "404", "NotFound"})
_MISSING_BUCKET = frozenset({"NoSuchBucket"})
_DENIED = frozenset({"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId"})
# MinIO says XMinioStorageFull; WebDAV-style servers and gateways answer 507.
_FULL = frozenset({"XMinioStorageFull", "StorageFull", "InsufficientStorage", "507"})
_BUSY = frozenset({"SlowDown", "ServiceUnavailable", "503", "RequestTimeout", "InternalError"})


def parse_url_mode(value: str) -> UrlMode:
    """The URL mode a setting names; ValueError for anything but proxy, presigned or public."""
    for mode in URL_MODES:
        if value == mode:
            return mode
    raise ValueError(f"S3 URL mode must be one of {', '.join(URL_MODES)}, not {value!r}")


class S3ImageStoreError(ServiceUnavailable):
    """An S3 call failed (unreachable endpoint, missing bucket, denied access, …): the image
    storage cannot be used. The message names the bucket and what was being done."""


class S3StorageFull(S3ImageStoreError, StorageFull):
    """The S3-compatible server has no space left for the object."""


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix ("" or ending in "/"), parsed from `s3://bucket/prefix`."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """Parse `s3://bucket[/prefix]`; raise ValueError on anything else."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "s3":
            raise ValueError(f"not an s3:// URL: {url!r}")
        if parts.query or parts.fragment or "@" in parts.netloc or ":" in parts.netloc:
            raise ValueError(
                f"s3 storage URL {url!r} takes only a bucket and a prefix "
                "(s3://bucket/prefix); the endpoint, region and keys are separate settings"
            )
        if not _BUCKET.match(parts.netloc):
            raise ValueError(f"s3 storage URL {url!r} does not name a valid bucket")
        segments = [segment for segment in parts.path.split("/") if segment]
        if any(segment in (".", "..") for segment in segments):
            raise ValueError(f"s3 storage URL {url!r} has a '.' or '..' prefix segment")
        prefix = "/".join(segments)
        return cls(parts.netloc, f"{prefix}/" if prefix else "")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


class S3ImageStore:
    """ImageStore on an S3-compatible bucket; keys are `<prefix><imageUUID>.<ext>`.

    `endpoint_url` points at MinIO, R2 or another S3-compatible server (None: AWS). Without
    `access_key_id`/`secret_access_key` boto3's default chain finds credentials. `url_mode`
    and `public_base_url` choose what `direct_url` returns (see the module docstring).
    Call `check()` once at start-up; `close()` at shutdown.
    """

    def __init__(
        self,
        location: S3Location | str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        url_mode: UrlMode = "proxy",
        public_base_url: str | None = None,
        cache_control: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        max_attempts: int = 3,
        max_pool_connections: int = 32,
    ) -> None:
        self.location = S3Location.parse(location) if isinstance(location, str) else location
        url_mode = parse_url_mode(url_mode)
        if url_mode == "public" and not public_base_url:
            raise ValueError("url_mode 'public' needs public_base_url (IMPASTO_S3_PUBLIC_BASE_URL)")
        if (access_key_id is None) != (secret_access_key is None):
            raise ValueError("give both the S3 access key id and the secret access key, or neither")
        self.url_mode: UrlMode = url_mode
        self._endpoint_url = endpoint_url
        self._endpoint_shown = _without_userinfo(endpoint_url) if endpoint_url else None
        self._public_base_url = public_base_url.rstrip("/") if public_base_url else None
        if cache_control is None:
            # Public objects may sit in a CDN; otherwise only the client that fetched an image
            # keeps it, and for an hour at most, so a cache outlives the TTL by little.
            cache_control = (
                "public, max-age=3600" if url_mode == "public" else "private, max-age=3600"
            )
        self._cache_control = cache_control
        config = Config(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            # Bounded retries with backoff on throttling, 5xx and connection errors;
            # `total_max_attempts` counts the first try (botocore's `max_attempts` does not).
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            # The event loop's default executor runs up to 32 threads; one connection each
            # keeps urllib3 from discarding connections under concurrent puts.
            max_pool_connections=max_pool_connections,
            signature_version="s3v4",
            # MinIO and most self-hosted endpoints serve path-style URLs only (no wildcard DNS
            # for bucket.host); on AWS itself botocore's choice (virtual-hosted) is the right one.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            # Checksums only where S3 requires them: several S3-compatible servers reject or
            # mishandle the CRC trailers that boto3 ≥ 1.36 sends by default.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # Explicit keys when given; otherwise boto3's default chain (environment, profile,
        # instance role). No I/O here: credentials are resolved on the first call (check()).
        session = boto3.session.Session(
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region,
        )
        self._client: Any = session.client("s3", endpoint_url=endpoint_url, config=config)

    @property
    def bucket(self) -> str:
        """The bucket's name."""
        return self.location.bucket

    def object_key(self, key: str) -> str:
        """The bucket key of an image key: the prefix, then the key."""
        if not _KEY.match(key) or ".." in key:
            raise ValueError(f"invalid image key {key!r}")
        return self.location.prefix + key

    def _where(self) -> str:
        return f"bucket {self.bucket!r}" + (
            f" at {self._endpoint_shown}" if self._endpoint_shown else ""
        )

    def _error(self, action: str, exc: Exception) -> S3ImageStoreError:
        code = _error_code(exc)
        message = f"S3 {action} on {self._where()} failed"
        if code in _FULL:
            return S3StorageFull(f"{message}: the storage has no space left")
        if code in _MISSING_BUCKET or (action == "check" and code in _MISSING_KEY):
            reason = "the bucket does not exist"
        elif code in _DENIED:
            reason = "access denied (check the S3 credentials and the bucket policy)"
        elif isinstance(exc, BotoConnectionError):
            reason = "could not connect to the endpoint"
        elif isinstance(exc, HTTPClientError):
            reason = "the endpoint closed the connection or did not answer in time"
        elif isinstance(exc, NoCredentialsError):
            reason = "no S3 credentials were found"
        elif code in _BUSY:
            reason = f"the storage is busy or failing ({code})"
        elif code:
            reason = f"the storage answered {code}"
        else:
            reason = type(exc).__name__
        return S3ImageStoreError(f"{message}: {reason}")

    async def check(self) -> None:
        """HEAD the bucket, so that a missing bucket, bad credentials or an unreachable
        endpoint stop the server at start-up instead of failing the first task."""
        try:
            await asyncio.to_thread(self._client.head_bucket, Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise self._error("check", exc) from exc

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store bytes under a key with their Content-Type, replacing any earlier ones."""
        object_key = self.object_key(key)
        try:
            await asyncio.to_thread(
                self._client.put_object,
                Bucket=self.bucket,
                Key=object_key,
                Body=data,
                ContentType=content_type,
                CacheControl=self._cache_control,
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(f"put of {object_key!r}", exc) from exc

    async def get(self, key: str) -> bytes | None:
        """The bytes, or None if there is no such key."""
        object_key = self.object_key(key)
        try:
            return await asyncio.to_thread(self._read, object_key)
        except (ClientError, BotoCoreError) as exc:
            if _error_code(exc) in _MISSING_KEY:
                return None
            raise self._error(f"get of {object_key!r}", exc) from exc

    def _read(self, object_key: str) -> bytes:
        response = self._client.get_object(Bucket=self.bucket, Key=object_key)
        body = response["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()

    async def delete(self, key: str) -> None:
        """Remove a key; no error if it is already gone."""
        object_key = self.object_key(key)
        try:
            # S3 answers 204 for a missing key too; some compatible servers say NoSuchKey.
            await asyncio.to_thread(self._client.delete_object, Bucket=self.bucket, Key=object_key)
        except (ClientError, BotoCoreError) as exc:
            if _error_code(exc) in _MISSING_KEY:
                return
            raise self._error(f"delete of {object_key!r}", exc) from exc

    def direct_url(self, key: str, expires_at: float) -> str | None:
        """A presigned or public URL per `url_mode`, or None (proxy mode, or a presigned URL
        whose TTL has already run out: impasto's /image route then answers 404)."""
        object_key = self.object_key(key)
        if self.url_mode == "public":
            assert self._public_base_url is not None
            return f"{self._public_base_url}/{quote(object_key, safe='/')}"
        if self.url_mode == "presigned":
            # Rounded down so the URL never outlives the image's TTL.
            expires_in = min(int(expires_at - time.time()), PRESIGN_MAX_S)
            if expires_in <= 0:
                return None
            # Signing is local, no request. The credentials were resolved by check() in a
            # thread; only a refresh of expiring role credentials could happen here.
            url: str = self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": object_key},
                ExpiresIn=expires_in,
            )
            return url
        return None

    async def close(self) -> None:
        """Close the client's connection pool."""
        await asyncio.to_thread(self._client.close)

    def __repr__(self) -> str:
        return f"S3ImageStore({str(self.location)!r}, url_mode={self.url_mode!r})"


def _without_userinfo(url: str) -> str:
    """The URL without `user:password@`, fit for a message."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()


def _error_code(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        error: Any = exc.response.get("Error", {})
        return str(error.get("Code", ""))
    return ""
