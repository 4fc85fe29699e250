from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import duckdb
import pytest
from moto.server import ThreadedMotoServer
from sqlalchemy import func, insert, select

from memberhub.exports.jobs import ExportConfig
from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.members.models import Member
from memberhub.points.models import PointTransaction
from memberhub.settings import Settings
from memberhub.webhooks.ssrf import UrlPolicy
from tests.conftest import TEST_SECRET_KEY
from tests.support import ApiClient

BUCKET = "memberhub-exports"
ACCESS_KEY = "AKIAEXPORTSTESTKEY01"
SECRET_KEY = "exports-test-secret-access-key-0123456789"
DAY_ONE = datetime(2026, 11, 30, 22, 0, tzinfo=UTC)
SMALL = ExportConfig(part_rows=1000, page_rows=250, lease=timedelta(seconds=60))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A local S3 server (moto's server mode), for the whole test process."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Iterator[Any]:
    """An empty bucket; the client to look into it."""
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )
    client.create_bucket(Bucket=BUCKET)
    yield client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=item["Key"])
    client.delete_bucket(Bucket=BUCKET)


@pytest.fixture
async def hub(db: Database, settings: Settings) -> AsyncIterator[IntegrationHub]:
    integrations = IntegrationHub(db, SecretBox(TEST_SECRET_KEY), UrlPolicy.from_settings(settings))
    yield integrations
    await integrations.aclose()


async def create_s3_integration(api: ApiClient, endpoint: str, *, prefix: str = "warehouse") -> str:
    response = await api.post(
        "/api/v1/integrations",
        {
            "provider": "s3",
            "name": "Warehouse bucket",
            "config": {
                "bucket": BUCKET,
                "prefix": prefix,
                "endpoint_url": endpoint,
                "path_style": True,
                "multipart_threshold_mb": 5,
            },
            "credentials": {"access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY},
        },
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def create_local_integration(api: ApiClient, directory: Path) -> str:
    response = await api.post(
        "/api/v1/integrations",
        {"provider": "local_storage", "name": "Local", "config": {"directory": str(directory)}},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def seed_transactions(
    db: Database, count: int, *, members: int = 50, start: datetime = DAY_ONE
) -> None:
    """`count` ledger rows spread over `members` members, a few minutes apart (so they
    span several dates), written directly: the exporter reads rows, not operations."""
    async with db.transaction() as session:
        existing = await session.scalar(select(func.count()).select_from(Member))
        if not existing:
            await session.execute(
                insert(Member),
                [{"public_id": f"mem_seed{i:06d}", "status": "active"} for i in range(members)],
            )
        member_ids = list(await session.scalars(select(Member.id).order_by(Member.id)))
        first = int(await session.scalar(select(func.count()).select_from(PointTransaction)) or 0)
    batch = 20_000
    for offset in range(0, count, batch):
        rows = []
        for n in range(first + offset, first + min(count, offset + batch)):
            rows.append(
                {
                    "public_id": f"txn_seed{n:08d}",
                    "member_id": member_ids[n % len(member_ids)],
                    "type": "earn" if n % 3 else "redeem",
                    "points": (n % 97) + 1 if n % 3 else -((n % 13) + 1),
                    "balance_after": n,
                    "reason": f"seed {n}" if n % 2 else None,
                    "details": {"n": n, "tag": "seed"},
                    "actor": "test",
                    "occurred_at": start + timedelta(minutes=n),
                }
            )
        async with db.transaction() as session:
            await session.execute(insert(PointTransaction), rows)


async def database_rows(db: Database) -> list[tuple[Any, ...]]:
    async with db.transaction(read_only=True) as session:
        rows = await session.execute(
            select(
                PointTransaction.id,
                PointTransaction.public_id,
                PointTransaction.member_id,
                PointTransaction.points,
                PointTransaction.reason,
                PointTransaction.details,
                PointTransaction.occurred_at,
            ).order_by(PointTransaction.id)
        )
        return [tuple(row) for row in rows]


def parquet_rows(paths: list[Path]) -> list[tuple[Any, ...]]:
    """The same columns, read back by DuckDB from the exported files."""
    if not paths:
        return []
    connection = duckdb.connect()
    try:
        connection.execute("SET TimeZone = 'UTC'")
        listed = ", ".join(f"'{p}'" for p in paths)
        rows = connection.execute(
            "SELECT id, public_id, member_id, points, reason, details,"
            " CAST(occurred_at AS TIMESTAMP)"
            f" FROM read_parquet([{listed}]) ORDER BY id"
        ).fetchall()
    finally:
        connection.close()
    import json

    return [(*row[:5], json.loads(row[5]), row[6].replace(tzinfo=UTC)) for row in rows]
