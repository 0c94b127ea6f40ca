"""S3ImageStore against moto's S3 server on loopback (a real HTTP server, not moto's in-process
mock): bytes, content types, prefixes, the three URL modes, a missing bucket, concurrency."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, urlsplit

import boto3
import botocore.auth
import httpx
import pytest

from impasto.settings import Settings
from impasto.storage.factory import image_store_for, open_image_store
from impasto.storage.s3 import PRESIGN_MAX_S, S3ImageStore, S3ImageStoreError
from tests.conftest import free_port
from tests.services import S3Server

REGION = "us-east-1"
KEYS = {"access_key_id": "testing", "secret_access_key": "testing"}


@pytest.fixture
def admin(s3_server: S3Server) -> Any:
    """A plain boto3 client, to set up buckets and look at them behind the store's back."""
    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def bucket(admin: Any) -> str:
    """A fresh bucket per test, so that listings see only this test's objects."""
    name = f"impasto-{uuid.uuid4().hex[:12]}"
    admin.create_bucket(Bucket=name)
    return name


@pytest.fixture
def make_store(s3_server: S3Server) -> Iterator[Any]:
    stores: list[S3ImageStore] = []

    def make(url: str, **options: Any) -> S3ImageStore:
        store = S3ImageStore(
            url, endpoint_url=s3_server.endpoint, region=REGION, **{**KEYS, **options}
        )
        stores.append(store)
        return store

    yield make
    for store in stores:
        asyncio.run(store.close())


def key() -> str:
    return f"{uuid.uuid4()}.png"


def test_put_get_round_trip_keeps_content_type(make_store: Any, bucket: str, admin: Any) -> None:
    store = make_store(f"s3://{bucket}")
    name = key()

    async def scenario() -> bytes | None:
        await store.put(name, b"\x89PNG fake", "image/png")
        return await store.get(name)

    assert asyncio.run(scenario()) == b"\x89PNG fake"
    head = admin.head_object(Bucket=bucket, Key=name)
    assert head["ContentType"] == "image/png"
    assert head["CacheControl"] == "private, max-age=3600"


def test_put_replaces_earlier_bytes(make_store: Any, bucket: str) -> None:
    store = make_store(f"s3://{bucket}")
    name = key()

    async def scenario() -> bytes | None:
        await store.put(name, b"first", "image/png")
        await store.put(name, b"second", "image/png")
        return await store.get(name)

    assert asyncio.run(scenario()) == b"second"


def test_get_of_missing_key_returns_none(make_store: Any, bucket: str) -> None:
    store = make_store(f"s3://{bucket}/some/prefix")
    assert asyncio.run(store.get(key())) is None


def test_delete_is_idempotent(make_store: Any, bucket: str) -> None:
    store = make_store(f"s3://{bucket}")
    name = key()

    async def scenario() -> bytes | None:
        await store.put(name, b"bytes", "image/webp")
        await store.delete(name)
        await store.delete(name)
        await store.delete(key())
        return await store.get(name)

    assert asyncio.run(scenario()) is None


def test_keys_live_under_the_prefix(make_store: Any, bucket: str, admin: Any) -> None:
    prefixed = make_store(f"s3://{bucket}/renders/v1/")
    bare = make_store(f"s3://{bucket}")
    first, second = key(), key()

    async def scenario() -> None:
        await prefixed.put(first, b"a", "image/png")
        await bare.put(second, b"b", "image/png")

    asyncio.run(scenario())
    listed = {item["Key"] for item in admin.list_objects_v2(Bucket=bucket)["Contents"]}
    assert listed == {f"renders/v1/{first}", second}
    # The prefix is part of the store's namespace: the bare store does not see the other key.
    assert asyncio.run(bare.get(first)) is None


def test_presigned_url_serves_image_with_its_content_type(make_store: Any, bucket: str) -> None:
    store = make_store(f"s3://{bucket}/out", url_mode="presigned")
    name = key()
    asyncio.run(store.put(name, b"webp bytes", "image/webp"))

    url = store.direct_url(name, time.time() + 600)

    assert url is not None
    assert urlsplit(url).path == f"/{bucket}/out/{name}"
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == b"webp bytes"
    assert response.headers["content-type"] == "image/webp"


def test_presigned_url_expires_with_the_image(make_store: Any, bucket: str) -> None:
    store = make_store(f"s3://{bucket}", url_mode="presigned")
    name = key()

    before = time.time()
    url = store.direct_url(name, before + 600.9)
    after = time.time()
    assert url is not None
    expires_in = int(parse_qs(urlsplit(url).query)["X-Amz-Expires"][0])
    # Rounded down: the URL never outlives the image.
    assert int(600.9 - (after - before)) <= expires_in <= 600

    # SigV4 caps a presigned URL at 7 days; a longer TTL gets the longest URL S3 accepts.
    long_url = store.direct_url(name, time.time() + 30 * 24 * 3600)
    assert long_url is not None
    assert parse_qs(urlsplit(long_url).query)["X-Amz-Expires"] == [str(PRESIGN_MAX_S)]


def test_presigned_url_of_expired_image_falls_back_to_proxy(make_store: Any, bucket: str) -> None:
    # No URL that would be refused anyway: impasto's /image route answers the exact 404.
    store = make_store(f"s3://{bucket}", url_mode="presigned")
    assert store.direct_url(key(), time.time() - 1) is None
    assert store.direct_url(key(), time.time() + 0.5) is None


def test_moto_does_not_enforce_presigned_expiry(make_store: Any, bucket: str) -> None:
    """Pins the test server's behaviour, not ours: real S3 answers 403 (AccessDenied, "Request
    has expired") for this URL; moto 5 serves it. If this fails, moto started enforcing
    expiry: assert the 403 here instead."""
    store = make_store(f"s3://{bucket}", url_mode="presigned")
    name = key()
    asyncio.run(store.put(name, b"old", "image/png"))
    two_hours_ago = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) - datetime.timedelta(
        hours=2
    )
    # Signed (X-Amz-Date) two hours ago for at most 60 s: long expired.
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=two_hours_ago):
        url = store.direct_url(name, time.time() + 60)
    assert url is not None
    assert int(parse_qs(urlsplit(url).query)["X-Amz-Expires"][0]) <= 60

    assert httpx.get(url).status_code == 200


def test_public_url_is_base_url_and_object_key(make_store: Any, bucket: str) -> None:
    store = make_store(
        f"s3://{bucket}/img", url_mode="public", public_base_url="https://cdn.example.com/"
    )
    name = key()
    assert store.direct_url(name, time.time() + 60) == f"https://cdn.example.com/img/{name}"
    # Public URLs do not expire by themselves; the sweeper or a lifecycle rule removes objects.
    assert store.direct_url(name, time.time() - 60) == f"https://cdn.example.com/img/{name}"


def test_public_url_fetches_once_the_bucket_is_public(
    make_store: Any, bucket: str, s3_server: S3Server, admin: Any
) -> None:
    # Public mode needs a bucket (or prefix) readable by anyone: moto, like S3, answers 403
    # to an anonymous GET until a policy grants it.
    store = make_store(
        f"s3://{bucket}/img",
        url_mode="public",
        public_base_url=f"{s3_server.endpoint}/{bucket}",
    )
    name = key()
    asyncio.run(store.put(name, b"public bytes", "image/jpeg"))
    url = store.direct_url(name, time.time() + 60)
    assert url is not None
    assert httpx.get(url).status_code == 403
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{bucket}/img/*",
            }
        ],
    }
    admin.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))

    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == b"public bytes"
    assert response.headers["content-type"] == "image/jpeg"


def test_public_mode_objects_allow_shared_caches(make_store: Any, bucket: str, admin: Any) -> None:
    store = make_store(f"s3://{bucket}", url_mode="public", public_base_url="https://x.test")
    name = key()
    asyncio.run(store.put(name, b"x", "image/png"))
    assert admin.head_object(Bucket=bucket, Key=name)["CacheControl"] == "public, max-age=3600"


def test_proxy_mode_has_no_direct_url(make_store: Any, bucket: str) -> None:
    store = make_store(f"s3://{bucket}")
    assert store.url_mode == "proxy"
    assert store.direct_url(key(), time.time() + 600) is None


def test_check_passes_for_an_existing_bucket(make_store: Any, bucket: str) -> None:
    asyncio.run(make_store(f"s3://{bucket}/prefix").check())


def test_missing_bucket_fails_check_naming_the_bucket(make_store: Any) -> None:
    store = make_store("s3://no-such-bucket-here/prefix")
    with pytest.raises(S3ImageStoreError, match=r"'no-such-bucket-here'.*does not exist"):
        asyncio.run(store.check())
    # Without the check, the first write says the same instead of a raw botocore error.
    with pytest.raises(S3ImageStoreError, match=r"'no-such-bucket-here'.*does not exist"):
        asyncio.run(store.put(key(), b"x", "image/png"))


def test_unreachable_endpoint_fails_check() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = S3ImageStore(
        "s3://some-bucket",
        endpoint_url=endpoint,
        region=REGION,
        connect_timeout_s=2,
        max_attempts=1,
        **KEYS,
    )
    with pytest.raises(S3ImageStoreError, match=f"'some-bucket' at {endpoint}.*connect"):
        asyncio.run(store.check())
    asyncio.run(store.close())


def test_invalid_key_is_refused(make_store: Any, bucket: str) -> None:
    store = make_store(f"s3://{bucket}/prefix")
    for bad in ("../escape.png", "a/b.png", "", ".hidden"):
        with pytest.raises(ValueError, match="invalid image key"):
            asyncio.run(store.get(bad))


def test_concurrent_puts_then_gets_are_intact(make_store: Any, bucket: str) -> None:
    store = make_store(f"s3://{bucket}/many")
    payloads = {key(): os.urandom(64 * 1024 + index) for index in range(20)}

    async def scenario() -> list[bytes | None]:
        await asyncio.gather(
            *(store.put(name, data, "image/png") for name, data in payloads.items())
        )
        return list(await asyncio.gather(*(store.get(name) for name in payloads)))

    assert asyncio.run(scenario()) == list(payloads.values())


def test_settings_build_a_checked_bucket_store(
    bucket: str, s3_server: S3Server, tmp_path: Any
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        storage=f"s3://{bucket}/from-settings",
        s3_endpoint_url=s3_server.endpoint,
        s3_region=REGION,
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
        s3_url_mode="presigned",
    )
    assert isinstance(image_store_for(settings), S3ImageStore)
    name = key()

    async def scenario() -> tuple[bytes | None, str | None]:
        async with open_image_store(settings) as store:
            await store.put(name, b"via settings", "image/png")
            return await store.get(name), store.direct_url(name, time.time() + 60)

    data, url = asyncio.run(scenario())
    assert data == b"via settings"
    assert url is not None
    assert httpx.get(url).content == b"via settings"


def test_settings_with_missing_bucket_fail_at_open(s3_server: S3Server, tmp_path: Any) -> None:
    settings = Settings(
        data_dir=tmp_path,
        storage="s3://never-created-bucket",
        s3_endpoint_url=s3_server.endpoint,
        s3_region=REGION,
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
    )

    async def scenario() -> None:
        async with open_image_store(settings):
            pytest.fail("opened a store on a missing bucket")

    with pytest.raises(S3ImageStoreError, match="never-created-bucket"):
        asyncio.run(scenario())
