"""Storage URLs and settings → the right ImageStore; no server is contacted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import ValidationError

from impasto.settings import Settings
from impasto.storage.factory import (
    CheckedLocalImageStore,
    image_store_for,
    image_store_from_url,
    local_path_from_url,
)
from impasto.storage.s3 import S3ImageStore, S3Location


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://images", "images", ""),
        ("s3://images/", "images", ""),
        ("s3://images/renders", "images", "renders/"),
        ("s3://images/renders/v1/", "images", "renders/v1/"),
        ("s3://images//renders//v1", "images", "renders/v1/"),
        ("S3://my.bucket-2/a", "my.bucket-2", "a/"),
    ],
)
def test_s3_url_gives_bucket_and_prefix(url: str, bucket: str, prefix: str) -> None:
    assert S3Location.parse(url) == S3Location(bucket, prefix)


@pytest.mark.parametrize(
    "url",
    [
        "s3://",
        "s3:///prefix",
        "s3://b",
        "s3://bucket?region=eu-west-1",
        "s3://bucket#frag",
        "s3://key:secret@bucket",
        "s3://minio:9000/bucket",
        "s3://bucket/a/../b",
        "s3://bad bucket/x",
        "http://bucket/x",
    ],
)
def test_malformed_s3_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="s3"):
        S3Location.parse(url)


def test_plain_path_and_file_url_give_a_directory(tmp_path: Path) -> None:
    assert local_path_from_url(str(tmp_path / "a")) == tmp_path / "a"
    assert local_path_from_url(f"file://{tmp_path}/b%20c") == tmp_path / "b c"
    assert local_path_from_url(f"file://localhost{tmp_path}/d") == tmp_path / "d"
    assert local_path_from_url("relative/images") == Path("relative/images")
    assert local_path_from_url("s3://bucket") is None

    store = image_store_from_url(f"file://{tmp_path}/e")
    assert isinstance(store, CheckedLocalImageStore)
    assert store.root == tmp_path / "e"
    assert (tmp_path / "e").is_dir()
    asyncio.run(store.check())


@pytest.mark.parametrize("url", ["file://otherhost/images", "file://", "file:///x?y=1"])
def test_remote_or_empty_file_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="file storage URL"):
        local_path_from_url(url)


@pytest.mark.parametrize("url", ["redis://localhost/0", "gs://bucket", "https://x.test/img", " "])
def test_unsupported_storage_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="storage URL"):
        image_store_from_url(url)


def test_s3_url_gives_a_proxy_bucket_store_by_default() -> None:
    store = image_store_from_url("s3://images/out")
    assert isinstance(store, S3ImageStore)
    assert store.location == S3Location("images", "out/")
    assert store.url_mode == "proxy"
    assert store.object_key("abc.png") == "out/abc.png"


def test_s3_store_options_are_checked() -> None:
    with pytest.raises(ValueError, match="public_base_url"):
        S3ImageStore("s3://images", url_mode="public")
    with pytest.raises(ValueError, match="both"):
        S3ImageStore("s3://images", access_key_id="key")
    with pytest.raises(ValueError, match="proxy, presigned, public"):
        S3ImageStore("s3://images", url_mode="signed")  # type: ignore[arg-type]


def test_s3_client_has_bounded_timeouts_and_standard_retries() -> None:
    store = S3ImageStore("s3://images", connect_timeout_s=3, read_timeout_s=30, max_attempts=4)
    config = store._client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (3, 30)
    assert config.retries == {"mode": "standard", "total_max_attempts": 4}


def test_settings_without_storage_use_the_data_dir(tmp_path: Path) -> None:
    store = image_store_for(Settings(data_dir=tmp_path))
    assert isinstance(store, CheckedLocalImageStore)
    assert store.root == tmp_path / "images"


def test_settings_from_environment_give_an_s3_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("IMPASTO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("IMPASTO_STORAGE", "s3://team-images/impasto")
    monkeypatch.setenv("IMPASTO_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("IMPASTO_S3_REGION", "eu-west-1")
    monkeypatch.setenv("IMPASTO_S3_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("IMPASTO_S3_SECRET_ACCESS_KEY", "very-secret")
    monkeypatch.setenv("IMPASTO_S3_URL_MODE", "public")
    monkeypatch.setenv("IMPASTO_S3_PUBLIC_BASE_URL", "https://cdn.example.com")
    settings = Settings()
    assert "very-secret" not in repr(settings)

    store = image_store_for(settings)

    assert isinstance(store, S3ImageStore)
    assert store.location == S3Location("team-images", "impasto/")
    assert store.url_mode == "public"
    assert store.direct_url("abc.png", 0) == "https://cdn.example.com/impasto/abc.png"
    assert store._client.meta.region_name == "eu-west-1"


def test_unknown_url_mode_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMPASTO_S3_URL_MODE", "signed")
    with pytest.raises(ValidationError, match="s3_url_mode"):
        Settings()
