"""Exports: rows per second written to Parquet by memberhub's exporter vs a raw loop.

The exporter (`exports/jobs.py`: pages by keyset, Arrow batches, a Parquet file per date
per part, uploaded to a local-directory storage integration, each part recorded) against
a raw database-to-pyarrow loop in the same run: the same keyset query through the driver
itself (sqlite3, asyncpg), the same page size, written with pyarrow to one file. Rounds
interleave, each a full export of the table; the medians are compared. The peak RSS is
that of a child process running one export alone.

    python -m bench.exports [--rows 1000000] [--backend sqlite|postgresql|all] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import JSON, func, insert, select, text
from sqlalchemy.engine import make_url

from bench.common import (
    DEFAULT_POSTGRES_URL,
    asyncpg_dsn,
    backends_named,
    postgres_usable,
    scratch_space,
)
from memberhub.exports.jobs import ExportConfig, process_exports
from memberhub.exports.models import Export, ExportMode, ExportRun, RunStatus
from memberhub.exports.service import queue_run
from memberhub.exports.tables import TABLES, TIMESTAMP, arrow_schema, columns
from memberhub.integrations import vault
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.models import Integration
from memberhub.kit.clock import utcnow
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.members.models import Member
from memberhub.webhooks.ssrf import UrlPolicy, parse_networks

SECRET = "bench-secret-key-not-for-production-0123456789"
ROWS = 200_000
PAGE_ROWS = 10_000
PART_ROWS = 250_000
MEMBERS = 1000
START = datetime(2026, 1, 1, tzinfo=UTC)
SPEC = TABLES["point_transactions"]
CHILD_FLAG = "--child-export"


async def seed(url: str, rows: int) -> None:
    db = Database(url, pool_size=2)
    try:
        async with db.transaction() as session:
            await session.execute(
                insert(Member),
                [{"public_id": f"mem_bench{i:06d}", "status": "active"} for i in range(MEMBERS)],
            )
            first_member = int(await session.scalar(select(func.min(Member.id))) or 0)
            if db.is_sqlite:
                details = '\'{"n": \' || n || \', "source": "bench"}\''
                occurred = "strftime('%Y-%m-%d %H:%M:%f', :start, '+' || (n * 7) || ' seconds')"
                start: Any = START.strftime("%Y-%m-%d %H:%M:%S")
            else:
                details = 'CAST(\'{"n": \' || n || \', "source": "bench"}\' AS jsonb)'
                occurred = "CAST(:start AS timestamptz) + n * interval '7 seconds'"
                start = START
            await session.execute(
                text(
                    "INSERT INTO point_transactions (public_id, member_id, type, points,"
                    " pending_points, balance_after, pending_after, reason, details, actor,"
                    " occurred_at)"
                    " WITH RECURSIVE seq(n) AS ("
                    "  SELECT CAST(1 AS BIGINT) UNION ALL SELECT n + 1 FROM seq WHERE n < :rows"
                    " )"
                    " SELECT 'txn_bench' || CAST(n AS TEXT), :member + n % :members,"
                    "  CASE WHEN n % 4 = 0 THEN 'redeem' ELSE 'earn' END,"
                    "  CASE WHEN n % 4 = 0 THEN -(n % 50 + 1) ELSE n % 200 + 1 END,"
                    "  0, n, 0, 'purchase ' || CAST(n AS TEXT), "
                    f"  {details}, 'bench', {occurred}"
                    " FROM seq"
                ),
                {"rows": rows, "member": first_member, "members": MEMBERS, "start": start},
            )
    finally:
        await db.dispose()


async def create_export(
    url: str,
    directory: Path,
    *,
    provider: str = "local_storage",
    config: dict[str, Any] | None = None,
    credentials: dict[str, Any] | None = None,
    mode: str = ExportMode.FULL,
) -> int:
    """An export of the ledger to a storage integration (a local directory by default)."""
    db = Database(url, pool_size=2)
    try:
        async with db.transaction() as session:
            now = utcnow()
            integration = Integration(
                public_id="int_bench",
                provider=provider,
                name="Bench storage",
                config=config if config is not None else {"directory": str(directory)},
                credentials=vault.seal(SecretBox(SECRET), credentials or {}),
                credential_hints={},
                enabled=True,
                created_at=now,
                updated_at=now,
            )
            session.add(integration)
            await session.flush()
            export = Export(
                public_id="exp_bench",
                name="Ledger",
                table_name=SPEC.name,
                format="parquet",
                mode=mode,
                storage_integration_id=integration.id,
                runs_started=0,
                created_by="bench",
                created_at=now,
                updated_at=now,
            )
            session.add(export)
            await session.flush()
            return export.id
    finally:
        await db.dispose()


async def memberhub_export(url: str, export_id: int) -> float:
    """One full run through the exporter; seconds."""
    db = Database(url, pool_size=4)
    # The bench's stores are on this machine (a directory, or a local S3 server).
    local = UrlPolicy(allowed_networks=parse_networks("127.0.0.0/8"), allow_http=True)
    hub = IntegrationHub(db, SecretBox(SECRET), local)
    config = ExportConfig(part_rows=PART_ROWS, page_rows=PAGE_ROWS, time_budget=timedelta(hours=1))
    try:
        async with db.transaction() as session:
            export = await session.get(Export, export_id)
            assert export is not None
            run = queue_run(session, export, trigger="manual", now=utcnow())
            await session.flush()
            run_id = run.id
        began = time.perf_counter()
        await process_exports(db, hub, utcnow(), config)
        elapsed = time.perf_counter() - began
        async with db.transaction(read_only=True) as session:
            finished = await session.get(ExportRun, run_id)
            assert finished is not None
            assert finished.status == RunStatus.COMPLETED, finished.error
        return elapsed
    finally:
        await hub.aclose()
        await db.dispose()


def _raw_columns(postgres: bool) -> str:
    names = []
    for column in columns(SPEC):
        if isinstance(column.type, JSON) and postgres:
            names.append(f"{column.name}::text")
        else:
            names.append(column.name)
    return ", ".join(names)


def _raw_batch(schema: pa.Schema, rows: list[Any]) -> pa.RecordBatch:
    arrays = []
    for index, values in enumerate(zip(*rows, strict=True)):
        field = schema.field(index)
        if field.type == TIMESTAMP and isinstance(values[0], str):
            arrays.append(pa.array(values, pa.string()).cast(pa.timestamp("us")).cast(TIMESTAMP))
        else:
            arrays.append(pa.array(values, field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def raw_sqlite(url: str, path: Path) -> float:
    database = make_url(url).database
    assert database is not None
    schema = arrow_schema(SPEC)
    began = time.perf_counter()
    connection = sqlite3.connect(database)
    query = (
        f"SELECT {_raw_columns(False)} FROM point_transactions"
        " WHERE id > ? AND id <= ? ORDER BY id LIMIT ?"
    )
    try:
        upto = connection.execute("SELECT max(id) FROM point_transactions").fetchone()[0]
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            after = 0
            while True:
                rows = connection.execute(query, (after, upto, PAGE_ROWS)).fetchall()
                if not rows:
                    break
                writer.write_batch(_raw_batch(schema, rows))
                after = rows[-1][0]
    finally:
        connection.close()
    return time.perf_counter() - began


async def raw_postgres(url: str, path: Path) -> float:
    schema = arrow_schema(SPEC)
    began = time.perf_counter()
    connection = await asyncpg.connect(asyncpg_dsn(url))
    query = (
        f"SELECT {_raw_columns(True)} FROM point_transactions"
        " WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3"
    )
    try:
        upto = await connection.fetchval("SELECT max(id) FROM point_transactions")
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            after = 0
            while True:
                rows = await connection.fetch(query, after, upto, PAGE_ROWS)
                if not rows:
                    break
                writer.write_batch(_raw_batch(schema, [tuple(r) for r in rows]))
                after = rows[-1][0]
    finally:
        await connection.close()
    return time.perf_counter() - began


def own_peak_rss_kib() -> int:
    """This process's peak RSS since it started its program. Linux's `ru_maxrss` carries
    the forking parent's size over the exec, so the memory map's own high-water mark
    (VmHWM) is read where there is one."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child_peak_rss(url: str, export_id: int) -> int:
    """Peak RSS (KiB) of a process that runs one export and nothing else."""
    completed = subprocess.run(
        [sys.executable, "-m", "bench.exports", CHILD_FLAG, url, str(export_id)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(completed.stdout.strip().splitlines()[-1])


def bench_backend(backend: str, url: str, args: argparse.Namespace) -> str:
    asyncio.run(seed(url, args.rows))
    with tempfile.TemporaryDirectory(prefix="memberhub-bench-exports-") as scratch:
        directory = Path(scratch)
        export_id = asyncio.run(create_export(url, directory / "store"))
        ours: list[float] = []
        raw: list[float] = []
        for round_number in range(args.rounds):
            ours.append(asyncio.run(memberhub_export(url, export_id)))
            target = directory / f"raw-{round_number}.parquet"
            if backend == "sqlite":
                raw.append(raw_sqlite(url, target))
            else:
                raw.append(asyncio.run(raw_postgres(url, target)))
            target.unlink()
        peak = child_peak_rss(url, export_id)
    ours_rate = args.rows / statistics.median(ours)
    raw_rate = args.rows / statistics.median(raw)
    return (
        f"{backend:<10} parquet  memberhub {ours_rate:10,.0f} rows/s  raw {raw_rate:10,.0f} rows/s"
        f"  ratio {ours_rate / raw_rate:.3f}  rows {args.rows}  peak rss {peak / 1024:.0f} MB"
        f"  load {os.getloadavg()[0]:.2f}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a small table, to check it runs")
    parser.add_argument("--rows", type=int, help=f"rows exported (default {ROWS:,}; quick: 5,000)")
    parser.add_argument("--rounds", type=int, help="rounds per side (default 3; quick: 1)")
    parser.add_argument(
        "--backend", choices=("all", "sqlite", "postgresql"), default="all", help="default: all"
    )
    args = parser.parse_args(argv)
    args.rows = args.rows or (5_000 if args.quick else ROWS)
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD_FLAG]:
        asyncio.run(memberhub_export(argv[1], int(argv[2])))
        print(own_peak_rss_kib())
        return 0
    args = parse_args(argv)
    explicit_pg = os.environ.get("MEMBERHUB_BENCH_POSTGRES_URL")
    pg_url = explicit_pg or DEFAULT_POSTGRES_URL
    print(
        f"exports: point_transactions to Parquet, memberhub's exporter vs a raw"
        f" database-to-pyarrow loop, pages of {PAGE_ROWS:,}, median of {args.rounds} rounds"
        f" per side, interleaved; goal ratio >= 0.7; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    for backend in backends_named(args.backend):
        if backend == "postgresql":
            required = bool(explicit_pg) or args.backend == "postgresql"
            usable = postgres_usable(pg_url, required=required)
            if usable is None:
                return 1
            if not usable:
                continue
        with scratch_space(backend, pg_url) as scratch:
            print(bench_backend(backend, scratch.new("exports"), args), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
