"""Blobs in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW...): one store for every coordinator replica.

Keys mirror the local folder: ``PREFIX/ab/abcdef…`` for the blob whose 64-hex-digit name starts
``ab``. What aicfl decides: the keys, that ``put`` sends nothing when the blob is already there (a
HEAD first: content-addressed, so an existing object already holds these bytes), that ``put_new``
never overwrites (a conditional PUT, ``If-None-Match: *``), that ``delete_prefix`` lists the keys and
deletes them a thousand at a time, and which errors mean "missing". What
boto3 decides: credentials, region and endpoint resolution (the standard AWS chain), request
signing, retries, connection pooling and checksums. docs/storage.md has the consistency argument.

One boto3 client per store, made from its own session: clients are thread-safe, sessions are not,
and the coordinator calls the store from its request threads and its round driver at once.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from coordinator.blobs import check_name, check_prefix, missing

# S3's bucket naming rules (3-63 characters: lowercase letters, digits, dots, hyphens).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# Error codes that mean "no such object": GET answers NoSuchKey, HEAD only its status.
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
# A conditional PUT that found the key taken (412), or raced another conditional PUT of it (409).
_TAKEN = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})
# Keys per LIST page and per DeleteObjects request: S3's most for both.
PAGE = 1000
# Requests a device upload or a round's end may have in flight at once, per replica.
POOL_CONNECTIONS = 32


class StoreUnavailable(Exception):
    """The bucket cannot be used: it does not exist, the credentials are refused, or the endpoint is down."""


def parse_url(url: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://BUCKET[/PREFIX]``; ``ValueError`` with a line an operator can act on."""
    usage = "such as s3://BUCKET or s3://BUCKET/PREFIX"
    parts = urlsplit(url)
    if "@" in parts.netloc:  # never repeat such a URL: what stands before the @ may be a secret key
        raise ValueError(
            "the blob store URL holds credentials: give only s3://BUCKET/PREFIX and let the credentials"
            " come from the AWS environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, a role)"
        )
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"blob store {url!r} is not an S3 URL {usage}")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError(f"blob store {url!r}: an S3 URL has no query or fragment ({usage})")
    bucket = parts.netloc
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ValueError(
            f"blob store {url!r}: {bucket!r} is not an S3 bucket name (3 to 63 lowercase letters,"
            " digits, dots and hyphens; the endpoint goes in AICFL_S3_ENDPOINT_URL)"
        )
    prefix = parts.path.strip("/")
    if prefix and any(seg in ("", ".", "..") for seg in prefix.split("/")):
        raise ValueError(f"blob store {url!r}: the prefix has an empty, '.' or '..' segment")
    return bucket, prefix


def _config(endpoint_url: str | None, attempts: int) -> Config:
    return Config(
        retries={"mode": "standard", "max_attempts": attempts},
        max_pool_connections=POOL_CONNECTIONS,
        connect_timeout=10,
        read_timeout=60,
        # S3-compatible servers (MinIO, Ceph, moto) answer path-style requests; a virtual-hosted
        # bucket.minio:9000 would need wildcard DNS. AWS itself: botocore's choice.
        s3={"addressing_style": "path"} if endpoint_url else None,
    )


def _code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


class S3BlobStore:
    """Blobs as objects ``PREFIX/ab/abcdef…`` in one bucket (see the module docstring)."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None):
        self.bucket, self.prefix, self.endpoint_url = bucket, prefix.strip("/"), endpoint_url
        self._session = boto3.session.Session()
        self._client: Any = self._session.client(
            "s3", endpoint_url=endpoint_url, config=_config(endpoint_url, attempts=5)
        )

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def where(self) -> str:
        """The endpoint, as an operator would name it."""
        return self.endpoint_url or f"AWS S3 ({self._client.meta.region_name or 'no region set'})"

    def __repr__(self) -> str:
        return f"S3BlobStore({self.url!r} at {self.where})"

    def key(self, name: str) -> str:
        check_name(name)
        return f"{self.prefix}/{name[:2]}/{name}" if self.prefix else f"{name[:2]}/{name}"

    def check(self) -> None:
        """``StoreUnavailable``, in one line naming the bucket and endpoint, unless the bucket answers.

        A client of its own that tries once: a coordinator that cannot reach its store says so at
        once rather than after the retries a running store makes.
        """
        probe = self._session.client(
            "s3", endpoint_url=self.endpoint_url, config=_config(self.endpoint_url, 1)
        )
        try:
            probe.head_bucket(Bucket=self.bucket)
            return
        except ClientError as err:
            code = _code(err)
            if code in ("404", "NoSuchBucket", "NotFound"):
                why = "no such bucket"
            elif code in ("403", "AccessDenied", "Forbidden"):
                why = "access refused (check the AWS credentials and the bucket's policy)"
            else:
                why = f"{code or 'error'}: {err.response.get('Error', {}).get('Message') or err}"
        except NoCredentialsError:
            why = (
                "no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give"
                " the coordinator a role)"
            )
        except EndpointConnectionError:
            why = "cannot connect to the endpoint"
        except BotoCoreError as err:
            why = str(err)
        finally:
            probe.close()
        raise StoreUnavailable(f"S3 bucket {self.bucket!r} at {self.where}: {why}")

    def put(self, data: bytes | memoryview) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.exists(sha):
            self._client.put_object(Bucket=self.bucket, Key=self.key(sha), Body=_body(data))
        return sha

    def put_new(self, name: str, data: bytes | memoryview) -> None:
        """Write ``data`` under ``name`` (64 hex digits) with a conditional PUT: never over another object."""
        try:
            self._client.put_object(Bucket=self.bucket, Key=self.key(name), Body=_body(data), IfNoneMatch="*")
        except ClientError as err:
            if _code(err) in _TAKEN:
                raise FileExistsError(f"blob {name[:12]}… is already in the store") from None
            raise

    def get(self, sha256: str) -> bytes:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self.key(sha256))
        except ClientError as err:
            if _code(err) in _MISSING:
                raise missing(sha256) from None
            raise
        with response["Body"] as body:
            return body.read()  # type: ignore[no-any-return]

    def exists(self, sha256: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self.key(sha256))
        except ClientError as err:
            if _code(err) in _MISSING:
                return False
            raise
        return True

    def delete(self, sha256: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self.key(sha256))  # 204 for a missing key too

    def delete_prefix(self, prefix: str) -> int:
        """List the keys under the prefix and delete them, a page at a time. A conditional PUT is all or
        nothing, so no half-written object is ever left to find."""
        check_prefix(prefix)
        start = f"{self.prefix}/{prefix[:2]}/{prefix}" if self.prefix else f"{prefix[:2]}/{prefix}"
        deleted = 0
        for page in self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=start, PaginationConfig={"PageSize": PAGE}
        ):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            for i in range(0, len(keys), PAGE):
                batch = keys[i : i + PAGE]
                answer = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
                errors = answer.get("Errors", [])
                if errors:
                    first = errors[0]
                    raise RuntimeError(
                        f"S3 bucket {self.bucket!r}: {len(errors)} of {len(batch)} deletions under"
                        f" {start!r} failed, the first {first.get('Key')!r}: {first.get('Code')}"
                        f" {first.get('Message')}"
                    )
                deleted += len(batch)
        return deleted


def _body(data: bytes | memoryview) -> bytes:
    return data if isinstance(data, bytes) else bytes(data)
