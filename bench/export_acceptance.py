"""An incremental Parquet export of the ledger to a local S3 server, checked row for row.

Seeds the point transactions (1,000,000 by default), starts a local S3 server (moto's
server mode, in this process), and runs an incremental Parquet export to it in a child
process that does nothing else, whose peak RSS is reported (goal: under 300 MB). The
files the run's manifest names are then downloaded and read back with DuckDB and compared
with the database row for row, streamed in id order on both sides (id, public id, member,
type, points, reason, details, time). A second run, with nothing new, must write an empty
manifest. Exits non-zero when any check fails.

    python -m bench.export_acceptance [--rows 1000000] [--backend sqlite|postgresql|all]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import boto3
import duckdb
from moto.server import ThreadedMotoServer
from sqlalchemy import select
from sqlalchemy.engine import make_url

from bench.common import (
    DEFAULT_POSTGRES_URL,
    asyncpg_dsn,
    backends_named,
    postgres_usable,
    scratch_space,
)
from bench.exports import child_peak_rss, create_export, memberhub_export, seed
from memberhub.exports.models import ExportMode, ExportRun
from memberhub.kit.db import Database

BUCKET = "memberhub-acceptance"
PREFIX = "warehouse"
ACCESS_KEY = "AKIAACCEPTANCE000001"
SECRET_KEY = "acceptance-run-secret-access-key-000001"
RSS_GOAL_MB = 300
CHUNK = 50_000
COLUMNS = "id, public_id, member_id, type, points, reason, details, occurred_at"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _utc(value: datetime | str) -> datetime:
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _normal(row: tuple[Any, ...]) -> tuple[Any, ...]:
    *head, details, occurred = row
    parsed = json.loads(details) if isinstance(details, str) else details
    return (*head, parsed, _utc(occurred))


def _sqlite_rows(url: str) -> Iterator[tuple[Any, ...]]:
    database = make_url(url).database
    assert database is not None
    connection = sqlite3.connect(database)
    try:
        cursor = connection.execute(f"SELECT {COLUMNS} FROM point_transactions ORDER BY id")
        while rows := cursor.fetchmany(CHUNK):
            for row in rows:
                yield _normal(row)
    finally:
        connection.close()


async def _postgres_rows(url: str) -> list[tuple[Any, ...]]:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        selected = COLUMNS.replace("details", "details::text")
        rows = await connection.fetch(f"SELECT {selected} FROM point_transactions ORDER BY id")
        return [_normal(tuple(row)) for row in rows]
    finally:
        await connection.close()


def _exported_rows(paths: list[Path]) -> Iterator[tuple[Any, ...]]:
    if not paths:
        return
    connection = duckdb.connect()
    try:
        connection.execute("SET TimeZone = 'UTC'")
        listed = ", ".join(f"'{p}'" for p in paths)
        cursor = connection.execute(
            "SELECT id, public_id, member_id, type, points, reason, details,"
            f" CAST(occurred_at AS TIMESTAMP) FROM read_parquet([{listed}]) ORDER BY id"
        )
        while rows := cursor.fetchmany(CHUNK):
            for row in rows:
                yield _normal(row)
    finally:
        connection.close()


async def _last_run(url: str) -> ExportRun:
    db = Database(url, pool_size=1)
    try:
        async with db.transaction(read_only=True) as session:
            run = await session.scalar(select(ExportRun).order_by(ExportRun.id.desc()).limit(1))
            assert run is not None
            session.expunge(run)
            return run
    finally:
        await db.dispose()


def _manifest(client: Any, key: str) -> dict[str, Any]:
    body = client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")["Body"].read()
    manifest: dict[str, Any] = json.loads(body)
    return manifest


def _compare(expected: Iterator[tuple[Any, ...]], exported: Iterator[tuple[Any, ...]]) -> int:
    """Rows compared; raises at the first difference, or when one side has more rows."""
    count = 0
    missing = object()
    while True:
        ours = next(expected, missing)
        theirs = next(exported, missing)
        if ours is missing and theirs is missing:
            return count
        if ours != theirs:
            raise SystemExit(f"row {count + 1} differs: database {ours!r} exported {theirs!r}")
        count += 1


def run_backend(backend: str, url: str, rows: int, client: Any, endpoint: str) -> list[str]:
    failures: list[str] = []
    began = time.perf_counter()
    asyncio.run(seed(url, rows))
    print(f"  {backend}: seeded {rows:,} rows in {time.perf_counter() - began:.0f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="memberhub-export-acceptance-") as scratch:
        export_id = asyncio.run(
            create_export(
                url,
                Path(scratch),
                provider="s3",
                config={
                    "bucket": BUCKET,
                    "prefix": PREFIX,
                    "endpoint_url": endpoint,
                    "path_style": True,
                    "multipart_threshold_mb": 5,
                    "multipart_chunk_mb": 5,
                },
                credentials={"access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY},
                mode=ExportMode.INCREMENTAL,
            )
        )
        began = time.perf_counter()
        peak_kib = child_peak_rss(url, export_id)
        elapsed = time.perf_counter() - began
        run = asyncio.run(_last_run(url))
        assert run.manifest_key is not None
        manifest = _manifest(client, run.manifest_key)
        print(
            f"  {backend}: exported {run.rows:,} rows in {len(manifest['files'])} files,"
            f" {elapsed:.0f} s, peak rss {peak_kib / 1024:.0f} MB (goal < {RSS_GOAL_MB} MB)",
            flush=True,
        )
        if run.rows != rows or manifest["rows"] != rows:
            failures.append(f"{backend}: run rows {run.rows}, manifest {manifest['rows']}")
        if peak_kib / 1024 >= RSS_GOAL_MB:
            failures.append(f"{backend}: peak rss {peak_kib / 1024:.0f} MB")

        files = Path(scratch) / "files"
        files.mkdir()
        paths = []
        for number, listed in enumerate(manifest["files"]):
            path = files / f"{number:05d}.parquet"
            client.download_file(BUCKET, f"{PREFIX}/{listed['key']}", str(path))
            paths.append(path)
        began = time.perf_counter()
        if backend == "sqlite":
            expected: Iterator[tuple[Any, ...]] = _sqlite_rows(url)
        else:
            expected = iter(asyncio.run(_postgres_rows(url)))
        compared = _compare(expected, _exported_rows(paths))
        print(
            f"  {backend}: DuckDB read back {compared:,} rows, equal to the database row for"
            f" row ({time.perf_counter() - began:.0f} s)",
            flush=True,
        )
        if compared != rows:
            failures.append(f"{backend}: compared {compared} rows")

        asyncio.run(memberhub_export(url, export_id))
        second = asyncio.run(_last_run(url))
        assert second.manifest_key is not None
        assert second.id != run.id
        empty = _manifest(client, second.manifest_key)
        print(
            f"  {backend}: second run: {second.rows} rows, manifest rows {empty['rows']},"
            f" files {empty['files']}",
            flush=True,
        )
        if (second.rows, empty["rows"], empty["files"]) != (0, 0, []):
            failures.append(f"{backend}: the second run was not empty")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--backend", choices=("all", "sqlite", "postgresql"), default="all")
    args = parser.parse_args(argv)
    explicit_pg = os.environ.get("MEMBERHUB_BENCH_POSTGRES_URL")
    pg_url = explicit_pg or DEFAULT_POSTGRES_URL
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the S3 server's request log
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )
    print(
        f"export acceptance: {args.rows:,} point transactions, incremental Parquet to a local"
        f" S3 server; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    failures: list[str] = []
    try:
        for backend in backends_named(args.backend):
            if backend == "postgresql":
                required = bool(explicit_pg) or args.backend == "postgresql"
                usable = postgres_usable(pg_url, required=required)
                if usable is None:
                    return 1
                if not usable:
                    continue
            client.create_bucket(Bucket=BUCKET)
            try:
                with scratch_space(backend, pg_url) as scratch:
                    failures += run_backend(
                        backend, scratch.new("acceptance"), args.rows, client, endpoint
                    )
            finally:
                for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
                    for item in page.get("Contents", []):
                        client.delete_object(Bucket=BUCKET, Key=item["Key"])
                client.delete_bucket(Bucket=BUCKET)
    finally:
        server.stop()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
