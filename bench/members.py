"""Member-create throughput over HTTP, as a ratio to raw SQL inserts measured in the same run.

For each backend, on a database the bench creates and removes (a temporary SQLite file; a
new PostgreSQL database on MEMBERHUB_BENCH_POSTGRES_URL, default
postgresql+asyncpg://postgres@127.0.0.1:5432/postgres):

- raw: N member rows, each one INSERT statement in its own transaction (SQLAlchemy Core, no
  ORM, the app's engine settings), from 8 concurrent connections;
- http: the real application under uvicorn in a child process, and 8 concurrent clients
  sending N `POST /api/v1/members` with an admin key, each of which authenticates, checks the
  email, stores the member, its event and its audit entry, and commits.

Both sides are warmed up, then each runs 3 rounds of N (500) and counts the median. Per
backend it prints http creates/s, raw inserts/s and their ratio (http / raw: higher is
better; 1.0 would mean the API cost nothing over bare inserts).

    python -m bench.members                 # both backends
    python -m bench.members --quick         # a breakage check: one round of 40
    python -m bench.members --backend sqlite --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import insert
from sqlalchemy.engine import make_url

from bench.common import (
    DEFAULT_POSTGRES_URL,
    issue_admin_key,
    pg_execute,
    postgres_reachable,
    running_server,
)
from memberhub.kit.clock import utcnow
from memberhub.kit.db import create_engine
from memberhub.kit.ids import new_public_id
from memberhub.kit.migrate import upgrade
from memberhub.members.models import Member, MemberStatus

CONCURRENCY = 8
FULL_ROWS = 500
QUICK_ROWS = 40
ROUNDS = 3


@dataclass(frozen=True)
class Result:
    backend: str
    rows: int
    http_per_second: float
    raw_per_second: float

    @property
    def ratio(self) -> float:
        return self.http_per_second / self.raw_per_second

    def line(self) -> str:
        return (
            f"{self.backend:<11} http {self.http_per_second:8.1f} creates/s   "
            f"raw {self.raw_per_second:8.1f} inserts/s   ratio {self.ratio:.3f}"
        )


# -- databases ----------------------------------------------------------------------------


@contextlib.contextmanager
def sqlite_database() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="memberhub-bench-") as directory:
        yield f"sqlite+aiosqlite:///{Path(directory) / 'bench.db'}"


@contextlib.contextmanager
def postgres_database(server_url: str) -> Iterator[str]:
    name = f"memberhub_bench_{uuid.uuid4().hex[:12]}"
    asyncio.run(pg_execute(server_url, f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(pg_execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# -- load -----------------------------------------------------------------------------------


Create = Callable[[str, int], Awaitable[None]]


async def rate(create: Create, prefix: str, rows: int, concurrency: int) -> float:
    """Rows per second for `create(prefix, i)`, i in range(rows), from `concurrency` workers."""
    indexes = iter(range(rows))

    async def worker() -> None:
        for index in indexes:  # shared: each index is taken by exactly one worker
            await create(prefix, index)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())
    return rows / (time.perf_counter() - started)


async def median_rate(create: Create, side: str, rows: int, concurrency: int, rounds: int) -> float:
    """Warm up, then the median rate of `rounds` runs of `rows` creates (unique emails)."""
    await rate(create, f"{side}-warm-", concurrency * 2, concurrency)
    rates = [await rate(create, f"{side}{n}-", rows, concurrency) for n in range(rounds)]
    return statistics.median(rates)


def member_row(email: str) -> dict[str, Any]:
    """Every column the API stores for a new member with an email and a first name."""
    now = utcnow()
    return {
        "public_id": new_public_id("mem"),
        "organisation_id": None,
        "email": email,
        "email_normalized": email.lower(),
        "first_name": "Bench",
        "status": MemberStatus.PENDING,
        "consent_email": False,
        "consent_sms": False,
        "consent_analytics": False,
        "consent_profiling": False,
        "custom_fields": {},
        "external_ids": {},
        "cancel_at_period_end": False,
        "version": 1,
        "created_at": now,
        "updated_at": now,
    }


async def measure_raw(url: str, rows: int, concurrency: int, rounds: int) -> float:
    engine = create_engine(url, pool_size=concurrency)
    statement = insert(Member.metadata.tables["members"])

    async def one(prefix: str, index: int) -> None:
        async with engine.begin() as conn:
            await conn.execute(statement, member_row(f"{prefix}{index}@bench.example"))

    try:
        return await median_rate(one, "raw", rows, concurrency, rounds)
    finally:
        await engine.dispose()


async def measure_http(base_url: str, key: str, rows: int, concurrency: int, rounds: int) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=60
    ) as client:

        async def one(prefix: str, index: int) -> None:
            body = {"email": f"{prefix}{index}@bench.example", "first_name": "Bench"}
            response = await client.post("/api/v1/members", json=body)
            if response.status_code != 201:
                raise RuntimeError(f"POST /api/v1/members: {response.status_code} {response.text}")

        return await median_rate(one, "http", rows, concurrency, rounds)


# -- main -----------------------------------------------------------------------------------


def bench_backend(backend: str, url: str, rows: int, concurrency: int, rounds: int) -> Result:
    upgrade(url)
    key = asyncio.run(issue_admin_key(url))
    raw = asyncio.run(measure_raw(url, rows, concurrency, rounds))
    with running_server(url) as base_url:
        http = asyncio.run(measure_http(base_url, key, rows, concurrency, rounds))
    return Result(backend=backend, rows=rows, http_per_second=http, raw_per_second=raw)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS} rows, to check it runs")
    parser.add_argument("--requests", type=int, help=f"rows per side (default {FULL_ROWS})")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument(
        "--rounds", type=int, help=f"runs per side, the median counts (default {ROUNDS}; quick: 1)"
    )
    parser.add_argument(
        "--backend", choices=("all", "sqlite", "postgresql"), default="all", help="default: all"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = args.requests or (QUICK_ROWS if args.quick else FULL_ROWS)
    rounds = args.rounds or (1 if args.quick else ROUNDS)
    explicit_pg = os.environ.get("MEMBERHUB_BENCH_POSTGRES_URL")
    pg_url = explicit_pg or DEFAULT_POSTGRES_URL
    print(
        f"member create: HTTP vs raw SQL inserts, {args.concurrency} concurrent clients, "
        f"median of {rounds} x {rows} rows per side"
    )
    if args.backend in ("all", "sqlite"):
        with sqlite_database() as url:
            result = bench_backend("sqlite", url, rows, args.concurrency, rounds)
            print(result.line(), flush=True)
    if args.backend in ("all", "postgresql"):
        problem = postgres_reachable(pg_url)
        if problem is not None:
            if explicit_pg or args.backend == "postgresql":
                print(f"postgresql unreachable at {pg_url}: {problem}", file=sys.stderr)
                return 1
            print(f"postgresql  skipped: unreachable at {pg_url} ({problem})")
            return 0
        with postgres_database(pg_url) as url:
            print(
                bench_backend("postgresql", url, rows, args.concurrency, rounds).line(), flush=True
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
