"""The blob store setting: ``s3://BUCKET[/PREFIX]`` is read into a bucket and a prefix, and every other
value is refused with a message that names the mistake (and never repeats a secret)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.blobs import LocalBlobStore, open_blob_store
from coordinator.s3blobs import parse_url
from server.settings import ServerSettings


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://aicfl", "aicfl", ""),
        ("s3://aicfl/", "aicfl", ""),
        ("s3://aicfl-blobs.eu/prod/coordinator/", "aicfl-blobs.eu", "prod/coordinator"),
        ("s3://abc//x", "abc", "x"),
    ],
)
def test_an_s3_url_names_a_bucket_and_a_prefix(url: str, bucket: str, prefix: str) -> None:
    assert parse_url(url) == (bucket, prefix)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/srv/blobs", "blob store '/srv/blobs' is not an S3 URL such as s3://BUCKET or s3://BUCKET/PREFIX"),
        ("file:///srv/blobs", "is not an S3 URL"),
        ("s3:///prefix", "is not an S3 URL"),
        ("https://s3.amazonaws.com/aicfl", "is not an S3 URL"),
        ("s3://My_Bucket/x", "'My_Bucket' is not an S3 bucket name"),
        ("s3://ab", "'ab' is not an S3 bucket name"),
        ("s3://a..b", "'a..b' is not an S3 bucket name"),
        ("s3://minio:9000/aicfl", "the endpoint goes in AICFL_S3_ENDPOINT_URL"),
        ("s3://aicfl/x?versionId=1", "an S3 URL has no query or fragment"),
        ("s3://aicfl/x#frag", "an S3 URL has no query or fragment"),
        ("s3://aicfl/a/../b", "the prefix has an empty, '.' or '..' segment"),
        ("s3://aicfl/a//b", "the prefix has an empty, '.' or '..' segment"),
    ],
)
def test_anything_else_is_refused_with_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match="^blob store ") as refused:
        parse_url(url)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_url_with_credentials_is_refused_without_repeating_them() -> None:
    with pytest.raises(ValueError, match="holds credentials") as refused:
        parse_url("s3://AKIAEXAMPLE:wJalrXUtnFEMI@aicfl/x")
    assert "wJalrXUtnFEMI" not in str(refused.value) and "AKIAEXAMPLE" not in str(refused.value)


def test_no_setting_or_an_empty_one_is_the_local_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AICFL_BLOB_STORE", "")
    monkeypatch.setenv("AICFL_S3_ENDPOINT_URL", " ")
    settings = ServerSettings(data_dir=tmp_path)
    assert settings.blob_store is None and settings.s3_endpoint_url is None
    store = open_blob_store(settings.blob_store, local_root=tmp_path / "blobs")
    assert isinstance(store, LocalBlobStore) and store.root == tmp_path / "blobs"
