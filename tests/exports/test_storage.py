"""The storage providers: keys stay inside their directory or prefix, writes are whole."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.models import Integration
from memberhub.integrations.providers import as_storage, get_provider
from memberhub.integrations.providers.base import Connection, ObjectStorage
from memberhub.integrations.providers.local_storage import UnsafeKey
from memberhub.kit.db import Database
from tests.exports.conftest import BUCKET, create_local_integration, create_s3_integration
from tests.support import ApiClient


async def _connection(
    db: Database, hub: IntegrationHub, public_id: str
) -> tuple[ObjectStorage, Connection]:
    from sqlalchemy import select

    async with db.transaction(read_only=True) as session:
        integration = await session.scalar(
            select(Integration).where(Integration.public_id == public_id)
        )
    assert integration is not None
    provider = get_provider(integration.provider)
    assert provider is not None
    storage = as_storage(provider)
    assert storage is not None
    return storage, hub.connection(integration)


@pytest.mark.parametrize(
    "key", ["../outside", "a/../../outside", "/etc/passwd", "a//b", "a\\..\\b", "a/./b", ""]
)
async def test_a_local_key_never_leaves_the_directory(
    api: ApiClient, db: Database, hub: IntegrationHub, tmp_path: Path, key: str
) -> None:
    storage, connection = await _connection(
        db, hub, await create_local_integration(api, tmp_path / "store")
    )
    source = tmp_path / "source.txt"
    source.write_text("data")

    with pytest.raises(UnsafeKey):
        await storage.upload_file(connection, key, source, content_type="text/plain")
    assert not (tmp_path / "outside").exists()


async def test_a_local_upload_is_whole_or_absent(
    api: ApiClient, db: Database, hub: IntegrationHub, tmp_path: Path
) -> None:
    storage, connection = await _connection(
        db, hub, await create_local_integration(api, tmp_path / "store")
    )
    source = tmp_path / "source.txt"
    source.write_text("first")
    await storage.upload_file(connection, "t/a.txt", source, content_type="text/plain")
    source.write_text("second, longer")

    with (
        mock.patch("os.replace", side_effect=OSError("disk full")),
        pytest.raises(OSError, match="disk full"),
    ):
        await storage.upload_file(connection, "t/a.txt", source, content_type="text/plain")

    assert (tmp_path / "store" / "t" / "a.txt").read_text() == "first"
    assert os.listdir(tmp_path / "store" / "t") == ["a.txt"]
    listed = await storage.list_objects(connection, "t/")
    assert [(o.key, o.size) for o in listed] == [("t/a.txt", 5)]
    await storage.delete_object(connection, "t/a.txt")
    await storage.delete_object(connection, "t/a.txt")  # already gone: no error
    with pytest.raises(FileNotFoundError):
        await storage.download_file(connection, "t/a.txt", tmp_path / "back.txt")


async def test_s3_uploads_large_files_in_parts_under_the_prefix(
    api: ApiClient,
    db: Database,
    hub: IntegrationHub,
    s3_endpoint: str,
    s3_bucket: Any,
    tmp_path: Path,
) -> None:
    storage, connection = await _connection(
        db, hub, await create_s3_integration(api, s3_endpoint, prefix="team/exports")
    )
    large = tmp_path / "large.bin"
    large.write_bytes(os.urandom(12 * 1024 * 1024))  # above the 5 MiB threshold

    stored = await storage.upload_file(
        connection, "t/large.bin", large, content_type="application/octet-stream"
    )

    assert stored.size == 12 * 1024 * 1024
    assert stored.etag is not None
    assert stored.etag.endswith("-3")  # a multipart upload's ETag
    head = s3_bucket.head_object(Bucket=BUCKET, Key="team/exports/t/large.bin")
    assert head["ContentLength"] == stored.size
    listed = await storage.list_objects(connection, "t/")
    assert [o.key for o in listed] == ["t/large.bin"]
    back = tmp_path / "back.bin"
    await storage.download_file(connection, "t/large.bin", back)
    assert back.read_bytes() == large.read_bytes()
    with pytest.raises(FileNotFoundError):
        await storage.download_file(connection, "t/missing.bin", tmp_path / "none")


async def test_s3_connection_check_tells_good_from_bad_credentials(
    api: ApiClient, s3_endpoint: str, s3_bucket: Any
) -> None:
    integration = await create_s3_integration(api, s3_endpoint)
    good = await api.post(f"/api/v1/integrations/{integration}/test")
    assert good.json()["ok"] is True, good.text

    missing = await api.patch(
        f"/api/v1/integrations/{integration}",
        {
            "config": {
                "bucket": "no-such-bucket",
                "endpoint_url": s3_endpoint,
                "path_style": True,
            }
        },
    )
    assert missing.status_code == 200
    bad = (await api.post(f"/api/v1/integrations/{integration}/test")).json()
    assert bad["ok"] is False
    assert "no-such-bucket" in bad["message"]


async def test_s3_credentials_are_never_shown(api: ApiClient, s3_endpoint: str) -> None:
    integration = await create_s3_integration(api, s3_endpoint)
    shown = (await api.get(f"/api/v1/integrations/{integration}")).json()
    assert shown["credentials"]["secret_access_key"].startswith("…")
    assert "exports-test-secret" not in str(shown)


@pytest.mark.parametrize("path_style", [True, False])
async def test_s3_requests_go_only_where_the_url_policy_lets_them(
    monkeypatch: pytest.MonkeyPatch, s3_endpoint: str, path_style: bool
) -> None:
    """The AWS SDK connects by itself: each request's host is checked before it is sent,
    the bucket's own host name included (virtual-host addressing), which no saved URL
    names: a wildcard record pointing it inside is refused, not reached."""
    from urllib.parse import urlsplit

    from memberhub.integrations.gateway import Gateway, GatewayPolicy
    from memberhub.integrations.providers import s3 as s3_provider
    from memberhub.integrations.providers.base import ConnectionFailed
    from memberhub.webhooks import ssrf

    port = urlsplit(s3_endpoint).port
    real_lookup = ssrf._lookup

    def lookup(host: str, port: int) -> list[str]:
        if host == "store.example.net":
            return ["93.184.216.34"]  # the endpoint itself: a public address
        if host.endswith(".store.example.net"):
            return ["127.0.0.1"]  # the bucket's name, under a wildcard record
        return real_lookup(host, port)

    monkeypatch.setattr(ssrf, "_lookup", lookup)
    config = s3_provider.S3Config(
        bucket=BUCKET,
        endpoint_url=f"http://store.example.net:{port}" if not path_style else s3_endpoint,
        path_style=path_style,
    )
    gateway = Gateway("int_policy", "https://unused.example", policy=GatewayPolicy(rate_limit=None))
    try:
        connection = Connection(
            integration_id="int_policy",
            config=config,
            credentials={"access_key_id": "testing", "secret_access_key": "testing"},
            gateway=gateway,
            url_policy=ssrf.UrlPolicy(allow_http=True, allowed_networks=()),
        )
        with pytest.raises(ConnectionFailed, match="address is refused"):
            await s3_provider.S3().check_connection(connection)
    finally:
        s3_provider._clients.clear()
        await gateway.aclose()
