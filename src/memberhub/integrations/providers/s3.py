"""Amazon S3 and S3-compatible stores (MinIO, Cloudflare R2, Backblaze B2, Wasabi, …).

The AWS SDK (boto3) is synchronous: each call runs in a worker thread. Files above
`multipart_threshold_mb` go up as a multipart upload in `multipart_chunk_mb` parts; the SDK
aborts the upload when a part fails for good, so a half-written object never becomes
visible (S3 shows an object only once its upload completes).

Calls do not pass through the HTTP gateway (the SDK has its own client, retries and
signing): the endpoint URL is checked against the outbound URL policy when the integration
is saved, and the SDK's standard retry mode retries throttling and 5xx answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar
from urllib.parse import urlsplit

from pydantic import Field, StringConstraints

from memberhub.integrations.providers.base import (
    BaseConfig,
    BaseCredentials,
    Capability,
    Connection,
    ConnectionFailed,
    Provider,
    StoredObject,
)
from memberhub.integrations.providers.local_storage import safe_parts
from memberhub.webhooks.ssrf import DestinationRefused, UrlPolicy, check_destination_now

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

BucketName = Annotated[
    str, StringConstraints(strip_whitespace=True, pattern=r"^[a-z0-9][a-z0-9.\-_]{1,254}$")
]
Prefix = Annotated[str, StringConstraints(strip_whitespace=True, max_length=512)]
Region = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^[a-z0-9\-]{1,50}$")]
Url = Annotated[
    str, StringConstraints(strip_whitespace=True, max_length=2048, pattern=r"^https?://\S+$")
]
Secret = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]

MB = 1024 * 1024
# The SDK's own retries (throttling, 5xx, connection errors), with its standard backoff.
MAX_ATTEMPTS = 5
CONNECT_TIMEOUT_SECONDS = 10
READ_TIMEOUT_SECONDS = 60


class S3Config(BaseConfig):
    bucket: BucketName
    prefix: Prefix = Field(
        default="", description="Keys are written below it, e.g. `memberhub/exports`."
    )
    region: Region = Field(default="us-east-1")
    endpoint_url: Url | None = Field(
        default=None,
        description="The endpoint of an S3-compatible store; AWS's regional endpoint when unset.",
    )
    path_style: bool = Field(
        default=False,
        description="Address the bucket in the path (`https://host/bucket/key`) rather than "
        "as a host name; most S3-compatible stores need it.",
    )
    multipart_threshold_mb: int = Field(
        default=64, ge=5, le=5 * 1024, description="Files larger than this go up in parts."
    )
    multipart_chunk_mb: int = Field(default=16, ge=5, le=5 * 1024, description="Part size.")


class S3Credentials(BaseCredentials):
    access_key_id: Secret
    secret_access_key: Secret


_clients: dict[str, S3Client] = {}
_clients_lock = threading.Lock()


def _client(connection: Connection) -> S3Client:
    """One SDK client per integration and settings (clients are thread-safe)."""
    import boto3
    from botocore.config import Config

    config = connection.config
    assert isinstance(config, S3Config)
    access_key = str(connection.credentials.get("access_key_id", ""))
    secret = str(connection.credentials.get("secret_access_key", ""))
    policy = connection.url_policy
    fingerprint = hashlib.sha256(
        "\x00".join(
            (
                connection.integration_id,
                config.endpoint_url or "",
                config.region,
                str(config.path_style),
                access_key,
                secret,
                repr(policy.allowed_networks) if policy is not None else "",
            )
        ).encode()
    ).hexdigest()
    with _clients_lock:
        client = _clients.get(fingerprint)
        if client is None:
            client = boto3.session.Session().client(
                "s3",
                region_name=config.region,
                endpoint_url=config.endpoint_url,
                aws_access_key_id=access_key,
                aws_secret_access_key=secret,
                config=Config(
                    s3={"addressing_style": "path" if config.path_style else "virtual"},
                    retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
                    connect_timeout=CONNECT_TIMEOUT_SECONDS,
                    read_timeout=READ_TIMEOUT_SECONDS,
                ),
            )
            if policy is not None:
                client.meta.events.register("before-send.s3", _destination_guard(policy))
            _clients[fingerprint] = client
    return client


def _destination_guard(policy: UrlPolicy) -> Callable[..., None]:
    """Checks each request's host (the endpoint's, or the bucket's own host name in
    virtual-host addressing, which the saved URL does not name) against the URL policy
    just before the SDK sends it, as other connectors' connections are."""

    def guard(request: Any, **_kwargs: Any) -> None:
        parts = urlsplit(request.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        check_destination_now(parts.hostname or "", port, policy)

    return guard


def _settings(connection: Connection) -> S3Config:
    config = connection.config
    assert isinstance(config, S3Config)
    return config


def _full_key(config: S3Config, key: str) -> str:
    safe_parts(key)
    prefix = config.prefix.strip("/")
    return f"{prefix}/{key}" if prefix else key


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class S3(Provider):
    name = "s3"
    title = "Amazon S3 (and S3-compatible stores)"
    capabilities: ClassVar = frozenset({Capability.STORAGE})
    config_model = S3Config
    credentials_model = S3Credentials

    async def check_connection(self, connection: Connection) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        config = _settings(connection)
        client = _client(connection)
        try:
            await asyncio.to_thread(client.head_bucket, Bucket=config.bucket)
        except ClientError as exc:
            code = _error_code(exc)
            raise ConnectionFailed(
                f"The bucket {config.bucket!r} refused the credentials or does not exist "
                f"({code or 'error'})."
            ) from None
        except BotoCoreError as exc:
            raise ConnectionFailed(f"The store could not be reached: {exc}") from None
        except DestinationRefused as exc:
            raise ConnectionFailed(f"The store's address is refused: {exc}") from None
        return f"The bucket {config.bucket!r} is reachable with these credentials."

    async def upload_file(
        self, connection: Connection, key: str, path: Path, *, content_type: str
    ) -> StoredObject:
        from boto3.s3.transfer import TransferConfig

        config = _settings(connection)
        client = _client(connection)
        full_key = _full_key(config, key)
        transfer = TransferConfig(
            multipart_threshold=config.multipart_threshold_mb * MB,
            multipart_chunksize=config.multipart_chunk_mb * MB,
            max_concurrency=4,
        )

        def upload() -> StoredObject:
            client.upload_file(
                str(path),
                config.bucket,
                full_key,
                ExtraArgs={"ContentType": content_type},
                Config=transfer,
            )
            head = client.head_object(Bucket=config.bucket, Key=full_key)
            return StoredObject(
                key=key, size=int(head["ContentLength"]), etag=head.get("ETag", "").strip('"')
            )

        return await asyncio.to_thread(upload)

    async def download_file(self, connection: Connection, key: str, path: Path) -> None:
        from botocore.exceptions import ClientError

        config = _settings(connection)
        client = _client(connection)
        try:
            await asyncio.to_thread(
                client.download_file, config.bucket, _full_key(config, key), str(path)
            )
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(key) from None
            raise

    async def list_objects(self, connection: Connection, prefix: str) -> list[StoredObject]:
        config = _settings(connection)
        client = _client(connection)
        safe_parts(prefix, allow_empty=True)
        base = config.prefix.strip("/")
        base = f"{base}/" if base else ""

        def listing() -> list[StoredObject]:
            found = []
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=config.bucket, Prefix=base + prefix):
                for item in page.get("Contents", []):
                    found.append(
                        StoredObject(
                            key=item["Key"][len(base) :],
                            size=int(item["Size"]),
                            etag=item.get("ETag", "").strip('"') or None,
                        )
                    )
            return sorted(found, key=lambda stored: stored.key)

        return await asyncio.to_thread(listing)

    async def delete_object(self, connection: Connection, key: str) -> None:
        config = _settings(connection)
        client = _client(connection)
        await asyncio.to_thread(
            client.delete_object, Bucket=config.bucket, Key=_full_key(config, key)
        )
