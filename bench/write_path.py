"""The write path against the database itself: HTTP awards and member creates through
`memberhub serve` (embedded worker, default logging), against the same essential writes sent
raw, measured in the same run.

For each backend, on scratch databases the bench creates and removes (a temporary SQLite
file; new PostgreSQL databases on MEMBERHUB_BENCH_POSTGRES_URL, default
postgresql+asyncpg://postgres@127.0.0.1:5432/postgres):

- http: `memberhub serve` in a child process, `--clients` concurrent keep-alive connections
  from a lean HTTP/1.1 load client (`bench.loadgen`: a client library would take a
  millisecond of the machine's CPU per request away from the server) sending
  `POST /api/v1/points/award` (to distinct members) or `POST /api/v1/members`;
- raw: the same rows written with nothing in between, on a copy of the same database:
  bare asyncpg (no pool, no pre-ping; BEGIN, resolve and lock the member and its account,
  insert the transaction and its batch, add to the account, insert the event and the audit
  entry, COMMIT; for a member: take its email's advisory lock, insert it, look up the unmatched
  activities waiting for its email, insert the event and the audit entry) from as many
  connections, and pgbench running the
  award's statements; on SQLite the standard library's sqlite3 with the same WAL and
  synchronous=NORMAL settings, one writer.

Each round runs every side for `--seconds`, alternating which goes first (ABAB, then BABA);
the medians count. It prints the load average before and after, the statements each HTTP
operation sends (counted in-process, BEGIN and COMMIT included), and ratios http / raw; for
PostgreSQL awards also each side with one client, so that the HTTP side's scaling from one
client to `--clients` reads beside the bare driver's and pgbench's on the same machine; on
Linux also the HTTP side's CPU per operation (server, PostgreSQL, load client) and how the
API processes spent the time: running, runnable but waiting for a core, or sleeping (on the
database, a lock or the client) — see `bench.cpu`.

    python -m bench.write_path                       # both backends
    python -m bench.write_path --quick               # a breakage check
    python -m bench.write_path --backend postgresql --rounds 7 --seconds 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from sqlalchemy import event, insert
from sqlalchemy.engine import make_url

from bench.common import (
    DEFAULT_POSTGRES_URL,
    Scratch,
    asyncpg_dsn,
    backends_named,
    free_port,
    issue_admin_key,
    postgres_usable,
    scratch_space,
    wait_until_ready,
)
from bench.cpu import CpuMeter, Usage
from bench.loadgen import LeanPool
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.kit.ids import new_public_id
from memberhub.models import Base

MEMBERS = 2000
AWARD_POINTS = 10
TABLES = Base.metadata.tables


# -- seeding ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    member_ids: list[int]
    public_ids: list[str]


async def seed(url: str, count: int) -> Seeded:
    """`count` active members, each with a points account."""
    db = Database(url, pool_size=1)
    now = utcnow()
    tag = uuid.uuid4().hex[:8]
    rows: list[dict[str, Any]] = [
        {
            "public_id": new_public_id("mem"),
            "organisation_id": None,
            "email": f"seed-{tag}-{n}@bench.example",
            "email_normalized": f"seed-{tag}-{n}@bench.example",
            "first_name": "Seed",
            "status": "active",
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
        for n in range(count)
    ]
    try:
        async with db.transaction() as session:
            members = TABLES["members"]
            inserted = await session.execute(
                insert(members).returning(members.c.id, members.c.public_id), rows
            )
            pairs = sorted((row.id, row.public_id) for row in inserted)
            await session.execute(
                insert(TABLES["point_accounts"]),
                [{"member_id": member_id, "updated_at": now} for member_id, _ in pairs],
            )
    finally:
        await db.dispose()
    return Seeded([p[0] for p in pairs], [p[1] for p in pairs])


# -- statements per operation ---------------------------------------------------------------


async def count_statements(url: str, key: str, seeded: Seeded) -> dict[str, int]:
    """Round trips of one award and one member create, in-process (BEGIN/COMMIT included)."""
    from memberhub.app import create_app
    from memberhub.settings import Settings

    data_dir = Path(tempfile.mkdtemp(prefix="memberhub-bench-count-"))
    settings = Settings(
        database_url=url,
        data_dir=data_dir,
        secret_key="bench-secret-key-not-for-production",
        env="test",
        log_level="WARNING",
    )
    app = create_app(settings)
    sent: list[str] = []
    engine = app.state.db.request_engine.sync_engine  # what requests use
    event.listen(engine, "before_cursor_execute", lambda *args: sent.append("statement"))
    for name in ("begin", "commit", "rollback"):
        event.listen(engine, name, lambda *args, name=name: sent.append(name))
    counts: dict[str, int] = {}
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://bench", headers=headers
        ) as client:
            member = seeded.public_ids[-1]
            body = {"member_id": member, "points": 1, "reason": "count"}
            for label, send in (
                ("award", lambda: client.post("/api/v1/points/award", json=body)),
                (
                    "member create",
                    lambda: client.post(
                        "/api/v1/members", json={"email": f"{uuid.uuid4().hex}@bench.example"}
                    ),
                ),
            ):
                await send()  # warm: caches filled, as on a running server
                sent.clear()
                response = await send()
                assert response.status_code == 201, response.text
                counts[label] = len(sent)
    finally:
        await app.state.db.dispose()
        shutil.rmtree(data_dir, ignore_errors=True)
    return counts


# -- the server -------------------------------------------------------------------------------


@contextlib.contextmanager
def memberhub_serve(url: str, pids: list[int] | None = None) -> Iterator[str]:
    """`memberhub serve` (embedded worker, default settings but the database) in a child
    (whose pid is appended to `pids`)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="memberhub-bench-serve-") as data_dir:
        env = {
            **os.environ,
            "MEMBERHUB_DATABASE_URL": url,
            "MEMBERHUB_DATA_DIR": data_dir,
            "MEMBERHUB_SECRET_KEY": "bench-secret-key-not-for-production",
        }
        command = [sys.executable, "-c", "from memberhub.cli import app; app()", "serve"]
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,  # the default JSON request log is written, not kept
            stderr=subprocess.DEVNULL,
        )
        base_url = f"http://127.0.0.1:{port}"
        if pids is not None:
            pids.append(process.pid)
        try:
            wait_until_ready(process, base_url)
            yield base_url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- load -------------------------------------------------------------------------------------

Operation = Callable[[int, int], Awaitable[None]]


async def for_seconds(
    operation: Operation, clients: int, seconds: float, usage: tuple[CpuMeter, Usage] | None = None
) -> float:
    """Operations per second from `clients` loops, each calling operation(client, n)."""
    deadline = time.perf_counter() + seconds
    done = [0] * clients

    async def loop(client: int) -> None:
        n = 0
        while time.perf_counter() < deadline:
            await operation(client, n)
            n += 1
        done[client] = n

    before = usage[0].sample() if usage is not None else None
    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for client in range(clients):
            group.create_task(loop(client))
    elapsed = time.perf_counter() - started
    if usage is not None:
        usage[1].add(before, usage[0].sample(), sum(done))
    return sum(done) / elapsed


def http_award(pool: LeanPool, members: list[str], clients: int) -> Operation:
    async def one(worker: int, n: int) -> None:
        member = members[(n * clients + worker) % len(members)]
        body = {"member_id": member, "points": AWARD_POINTS, "reason": "bench"}
        status, content = await pool.post_json(worker, "/api/v1/points/award", body)
        if status != 201:
            raise RuntimeError(f"award: {status} {content[:500]!r}")

    return one


def http_member_create(pool: LeanPool, tag: str) -> Operation:
    async def one(worker: int, n: int) -> None:
        body = {"email": f"{tag}-{worker}-{n}@bench.example", "first_name": "Bench"}
        status, content = await pool.post_json(worker, "/api/v1/members", body)
        if status != 201:
            raise RuntimeError(f"member create: {status} {content[:500]!r}")

    return one


# The essential writes of an award and of a member create, as plain SQL for each driver.
AWARD_SQL = (
    "SELECT a.member_id, a.current FROM point_accounts a JOIN members m ON m.id = a.member_id"
    " WHERE m.public_id = {p1} FOR NO KEY UPDATE OF m, a",
    "INSERT INTO point_transactions (public_id, member_id, type, points, pending_points,"
    " balance_after, pending_after, reason, details, actor, occurred_at)"
    " VALUES ({p1}, {p2}, 'award', {p3}, 0, {p4}, 0, 'bench', {p5}, 'system:bench', {p6})"
    " RETURNING id",
    "INSERT INTO point_batches (public_id, member_id, status, source, initial, remaining,"
    " expired_points, recovered_points, reversed_points, cancelled_points, transaction_id,"
    " created_at) VALUES ({p1}, {p2}, 'active', 'award', {p3}, {p3}, 0, 0, 0, 0, {p4}, {p5})",
    "UPDATE point_accounts SET current = current + {p1}, lifetime_earned = lifetime_earned +"
    " {p1}, last_activity_at = {p2}, updated_at = {p2} WHERE member_id = {p3}",
    "INSERT INTO events (public_id, type, version, occurred_at, member_public_id, data)"
    " VALUES ({p1}, 'points.earned', 1, {p2}, {p3}, {p4})",
    "INSERT INTO audit_log (occurred_at, actor, action, object_type, object_id, changes)"
    " VALUES ({p1}, 'system:bench', 'points.award', 'member', {p2}, {p3})",
)
# A new member takes the unmatched activities waiting for its email (issue 18): a read the
# operation must make, so the raw side makes it too (the bench's members have no external
# ids, so the email is the only key; none is found).
MATCH_SQL = (
    "SELECT id FROM activities WHERE member_id IS NULL AND email_normalized = {p1}"
    " ORDER BY id LIMIT 100"
)
# ...and takes its email's lock first, so that an activity recorded at the same moment
# either sees the member or is seen by it (PostgreSQL).
KEY_LOCK_SQL = "SELECT pg_advisory_xact_lock($1)"
MEMBER_SQL = (
    "INSERT INTO members (public_id, email, email_normalized, first_name, status,"
    " consent_email, consent_sms, consent_analytics, consent_profiling, custom_fields,"
    " external_ids, cancel_at_period_end, version, created_at, updated_at) VALUES"
    " ({p1}, {p2}, {p2}, 'Bench', 'pending', false, false, false, false, {p3}, {p3}, false, 1,"
    " {p4}, {p4})",
    "INSERT INTO events (public_id, type, version, occurred_at, member_public_id, data)"
    " VALUES ({p1}, 'member.created', 1, {p2}, {p3}, {p4})",
    "INSERT INTO audit_log (occurred_at, actor, action, object_type, object_id, changes)"
    " VALUES ({p1}, 'system:bench', 'member.create', 'member', {p2}, {p3})",
)


def _pg(sql: str) -> str:
    return sql.format(**{f"p{n}": f"${n}" for n in range(1, 8)})


def _lite(sql: str) -> str:
    return sql.replace("FOR NO KEY UPDATE OF m, a", "").format(
        **{f"p{n}": f":p{n}" for n in range(1, 8)}
    )


class RawPostgres:
    """Bare asyncpg connections (no pool, no pre-ping), one per client."""

    def __init__(self, url: str, clients: int) -> None:
        self.dsn = asyncpg_dsn(url)
        self.clients = clients
        self.connections: list[Any] = []

    async def __aenter__(self) -> RawPostgres:
        self.connections = [await asyncpg.connect(self.dsn) for _ in range(self.clients)]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        for connection in self.connections:
            await connection.close()

    def award(self, members: list[str]) -> Operation:
        lock, txn, batch, account, evt, audit = (_pg(s) for s in AWARD_SQL)

        async def one(worker: int, n: int) -> None:
            member = members[(n * self.clients + worker) % len(members)]
            conn = self.connections[worker]
            now = utcnow()
            details = json.dumps({"points": AWARD_POINTS})
            async with conn.transaction():
                member_id, current = await conn.fetchrow(lock, member)
                txn_id = await conn.fetchval(
                    txn,
                    new_public_id("txn"),
                    member_id,
                    AWARD_POINTS,
                    current + AWARD_POINTS,
                    details,
                    now,
                )
                await conn.execute(
                    batch, new_public_id("pbt"), member_id, AWARD_POINTS, txn_id, now
                )
                await conn.execute(account, AWARD_POINTS, now, member_id)
                await conn.execute(evt, new_public_id("evt"), now, member, details)
                await conn.execute(audit, now, member, details)

        return one

    def member_create(self, tag: str) -> Operation:
        member, evt, audit = (_pg(s) for s in MEMBER_SQL)
        match = _pg(MATCH_SQL) + " FOR UPDATE"

        async def one(worker: int, n: int) -> None:
            conn = self.connections[worker]
            public_id, now = new_public_id("mem"), utcnow()
            email = f"{tag}-{worker}-{n}@bench.example"
            key_lock = int.from_bytes(hashlib.sha256(email.encode()).digest()[:8], "big") >> 1
            async with conn.transaction():
                await conn.execute(KEY_LOCK_SQL, key_lock)
                await conn.execute(member, public_id, email, "{}", now)
                await conn.fetch(match, email)
                await conn.execute(evt, new_public_id("evt"), now, public_id, "{}")
                await conn.execute(audit, now, public_id, "{}")

        return one


PGBENCH_AWARD = """\\set n random(1, {members})
BEGIN;
SELECT a.member_id, a.current FROM point_accounts a JOIN members m ON m.id = a.member_id
  WHERE m.public_id = 'pgb' || :n FOR NO KEY UPDATE OF m, a \\gset
INSERT INTO point_transactions (public_id, member_id, type, points, pending_points,
  balance_after, pending_after, reason, details, actor, occurred_at)
  VALUES (md5(random()::text), :member_id, 'award', 10, 0, :current + 10, 0, 'bench',
  '{{"points": 10}}', 'system:bench', now()) RETURNING id AS txn_id \\gset
INSERT INTO point_batches (public_id, member_id, status, source, initial, remaining,
  expired_points, recovered_points, reversed_points, cancelled_points, transaction_id,
  created_at) VALUES (md5(random()::text), :member_id, 'active', 'award', 10, 10, 0, 0, 0, 0,
  :txn_id, now());
UPDATE point_accounts SET current = current + 10, lifetime_earned = lifetime_earned + 10,
  last_activity_at = now(), updated_at = now() WHERE member_id = :member_id;
INSERT INTO events (public_id, type, version, occurred_at, member_public_id, data)
  VALUES (md5(random()::text), 'points.earned', 1, now(), 'pgb' || :n, '{{"points": 10}}');
INSERT INTO audit_log (occurred_at, actor, action, object_type, object_id, changes)
  VALUES (now(), 'system:bench', 'points.award', 'member', 'pgb' || :n, '{{"points": 10}}');
COMMIT;
"""


def pgbench_awards(url: str, clients: int, seconds: float, members: int) -> float | None:
    """Awards per second from pgbench running the same statements (None without pgbench)."""
    pgbench = shutil.which("pgbench")
    if pgbench is None:
        return None
    parsed = make_url(url)
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
        script.write(PGBENCH_AWARD.format(members=members))
    try:
        command = [
            pgbench,
            "-n",
            "-c",
            str(clients),
            "-j",
            str(min(clients, os.cpu_count() or 1)),
            "-T",
            str(max(1, round(seconds))),
            "-f",
            script.name,
            "-h",
            parsed.host or "127.0.0.1",
            "-p",
            str(parsed.port or 5432),
            "-U",
            parsed.username or "postgres",
            parsed.database or "postgres",
        ]
        env = {**os.environ, "PGPASSWORD": parsed.password or ""}
        output = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    finally:
        os.unlink(script.name)
    for line in output.stdout.splitlines():
        if line.startswith("tps = "):
            return float(line.split()[2])
    raise RuntimeError(f"pgbench printed no tps: {output.stdout} {output.stderr}")


async def name_pgbench_members(url: str, seeded: Seeded) -> None:
    """pgbench picks members as 'pgb<n>': give the raw copy's members those public ids."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.executemany(
            "UPDATE members SET public_id = $1 WHERE id = $2",
            [(f"pgb{n + 1}", member_id) for n, member_id in enumerate(seeded.member_ids)],
        )
    finally:
        await conn.close()


class RawSqlite:
    """The standard library's sqlite3 with the application's settings: WAL,
    synchronous=NORMAL, one writer at a time."""

    def __init__(self, url: str) -> None:
        path = make_url(url).database
        assert path is not None
        self.connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=NORMAL")
        self.connection.execute("PRAGMA foreign_keys=ON")

    def close(self) -> None:
        self.connection.close()

    def awards_for(self, seconds: float, members: list[str]) -> float:
        lock, txn, batch, account, evt, audit = (_lite(s) for s in AWARD_SQL)
        db = self.connection
        done = 0
        started = time.perf_counter()
        deadline = started + seconds
        details = json.dumps({"points": AWARD_POINTS})
        while time.perf_counter() < deadline:
            member = members[done % len(members)]
            now = utcnow().replace(tzinfo=None).isoformat(sep=" ")
            db.execute("BEGIN IMMEDIATE")
            member_id, current = db.execute(lock, {"p1": member}).fetchone()
            params = {"p1": new_public_id("txn"), "p2": member_id, "p3": AWARD_POINTS}
            params |= {"p4": current + AWARD_POINTS, "p5": details, "p6": now}
            txn_id = db.execute(txn, params).fetchone()[0]
            batch_params = {"p1": new_public_id("pbt"), "p2": member_id, "p3": AWARD_POINTS}
            db.execute(batch, batch_params | {"p4": txn_id, "p5": now})
            db.execute(account, {"p1": AWARD_POINTS, "p2": now, "p3": member_id})
            evt_params = {"p1": new_public_id("evt"), "p2": now, "p3": member, "p4": details}
            db.execute(evt, evt_params)
            db.execute(audit, {"p1": now, "p2": member, "p3": details})
            db.execute("COMMIT")
            done += 1
        return done / (time.perf_counter() - started)

    def member_creates_for(self, seconds: float, tag: str) -> float:
        member, evt, audit = (_lite(s) for s in MEMBER_SQL)
        match = _lite(MATCH_SQL)
        db = self.connection
        done = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            public_id = new_public_id("mem")
            now = utcnow().replace(tzinfo=None).isoformat(sep=" ")
            params = {"p1": public_id, "p2": f"{tag}-{done}@bench.example", "p3": "{}"}
            db.execute("BEGIN IMMEDIATE")
            db.execute(member, params | {"p4": now})
            db.execute(match, {"p1": params["p2"]}).fetchall()
            evt_params = {"p1": new_public_id("evt"), "p2": now, "p3": public_id, "p4": "{}"}
            db.execute(evt, evt_params)
            db.execute(audit, {"p1": now, "p2": public_id, "p3": "{}"})
            db.execute("COMMIT")
            done += 1
        return done / (time.perf_counter() - started)


# -- rounds ----------------------------------------------------------------------------------


@dataclass
class Samples:
    rates: dict[str, list[float]] = field(default_factory=dict)
    # CPU of the HTTP side's loads, summed over the rounds (Linux only).
    cpu: dict[str, Usage] = field(default_factory=dict)

    def usage(self, meter: CpuMeter, name: str) -> tuple[CpuMeter, Usage]:
        return meter, self.cpu.setdefault(name, Usage())

    def add(self, name: str, value: float | None) -> None:
        if value is not None:
            self.rates.setdefault(name, []).append(value)

    def median(self, name: str) -> float | None:
        values = self.rates.get(name)
        return statistics.median(values) if values else None


async def run_rounds(
    backend: str, http_url: str, raw_url: str, key: str, args: argparse.Namespace
) -> Samples:
    http_seeded = await seed(http_url, args.members)
    raw_seeded = await seed(raw_url, args.members)
    samples = Samples()
    clients, seconds = args.clients, args.seconds
    raw_pg = RawPostgres(raw_url, clients) if backend == "postgresql" else None
    raw_lite = RawSqlite(raw_url) if backend == "sqlite" else None
    if raw_pg is not None:
        await name_pgbench_members(raw_url, raw_seeded)
        await raw_pg.__aenter__()
    headers = {"Authorization": f"Bearer {key}"}
    pids: list[int] = []
    try:
        with memberhub_serve(http_url, pids) as base_url:
            meter = CpuMeter(pids[0])
            client = LeanPool(base_url, headers, clients)
            try:
                award = http_award(client, http_seeded.public_ids, clients)
                await for_seconds(award, clients, min(seconds, 1.0))  # warm
                raw_members = [f"pgb{n + 1}" for n in range(args.members)]
                for round_number in range(args.rounds):

                    async def http_side(round_number: int = round_number) -> None:
                        for name, operation, load in (
                            ("award http", award, clients),
                            ("award http 1 client", award, 1),
                            (
                                "create http",
                                http_member_create(client, f"h{round_number}"),
                                clients,
                            ),
                        ):
                            usage = samples.usage(meter, name)
                            samples.add(name, await for_seconds(operation, load, seconds, usage))

                    async def raw_side(round_number: int = round_number) -> None:
                        if raw_pg is not None:
                            raw_award = raw_pg.award(raw_members)
                            samples.add("award raw", await for_seconds(raw_award, clients, seconds))
                            samples.add(
                                "award raw 1 client", await for_seconds(raw_award, 1, seconds)
                            )
                            create = raw_pg.member_create(f"r{round_number}")
                            samples.add("create raw", await for_seconds(create, clients, seconds))
                            samples.add(
                                "award pgbench",
                                await asyncio.to_thread(
                                    pgbench_awards, raw_url, clients, seconds, args.members
                                ),
                            )
                            samples.add(
                                "award pgbench 1 client",
                                await asyncio.to_thread(
                                    pgbench_awards, raw_url, 1, seconds, args.members
                                ),
                            )
                        else:
                            assert raw_lite is not None
                            members = raw_seeded.public_ids
                            samples.add("award raw", raw_lite.awards_for(seconds, members))
                            samples.add(
                                "create raw",
                                raw_lite.member_creates_for(seconds, f"r{round_number}"),
                            )

                    first, second = (
                        (http_side, raw_side) if round_number % 2 == 0 else (raw_side, http_side)
                    )
                    await first()
                    await second()
            finally:
                await client.close()
    finally:
        if raw_pg is not None:
            await raw_pg.__aexit__()
        if raw_lite is not None:
            raw_lite.close()
    return samples


def report(backend: str, samples: Samples, statements: dict[str, int]) -> list[str]:
    lines = []

    def ratio(top: str, bottom: str) -> str:
        a, b = samples.median(top), samples.median(bottom)
        if a is None or b is None:
            return "n/a"
        return f"{a / b:.3f}"

    def rate(name: str) -> str:
        value = samples.median(name)
        return "n/a" if value is None else f"{value:8.1f}/s"

    lines.append(
        f"{backend:<10} award   http {rate('award http')}  raw {rate('award raw')}"
        f"  ratio {ratio('award http', 'award raw')}"
        f"  statements {statements['award']}"
    )
    if samples.median("award pgbench") is not None:
        lines.append(
            f"{backend:<10} award   http {rate('award http')}  pgbench {rate('award pgbench')}"
            f"  ratio {ratio('award http', 'award pgbench')}"
        )
        lines.append(
            f"{backend:<10} award   1 client: http {rate('award http 1 client')}"
            f"  raw {rate('award raw 1 client')}"
            f"  http scaling {ratio('award http', 'award http 1 client')}x"
            f"  raw scaling {ratio('award raw', 'award raw 1 client')}x"
            f"  pgbench scaling {ratio('award pgbench', 'award pgbench 1 client')}x"
        )
    lines.append(
        f"{backend:<10} create  http {rate('create http')}  raw {rate('create raw')}"
        f"  ratio {ratio('create http', 'create raw')}"
        f"  statements {statements['member create']}"
    )
    for name, usage in samples.cpu.items():
        line = usage.describe(name)
        if line is not None:
            lines.append(f"{backend:<10} {line}")
    return lines


def bench_backend(backend: str, scratch: Scratch, args: argparse.Namespace) -> list[str]:
    http_url = scratch.new("http")
    raw_url = scratch.copy("http", "raw")  # migrated alike, without migrating again
    key = asyncio.run(issue_admin_key(http_url))
    seeded = asyncio.run(seed(http_url, 1))
    statements = asyncio.run(count_statements(http_url, key, seeded))
    samples = asyncio.run(run_rounds(backend, http_url, raw_url, key, args))
    return report(backend, samples, statements)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short rounds, to check it runs")
    parser.add_argument("--rounds", type=int, help="rounds per side (default 5; quick: 1)")
    parser.add_argument("--seconds", type=float, help="seconds per side (default 5; quick: 0.25)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--members", type=int, default=MEMBERS)
    parser.add_argument(
        "--backend", choices=("all", "sqlite", "postgresql"), default="all", help="default: all"
    )
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.seconds = args.seconds or (0.25 if args.quick else 5.0)
    if args.quick:
        args.members = min(args.members, 200)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    explicit_pg = os.environ.get("MEMBERHUB_BENCH_POSTGRES_URL")
    pg_url = explicit_pg or DEFAULT_POSTGRES_URL
    print(
        f"write path: HTTP through memberhub serve vs the raw driver, {args.clients} clients, "
        f"median of {args.rounds} rounds x {args.seconds:g} s per side, interleaved; "
        f"load average {os.getloadavg()[0]:.2f}",
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
            for line in bench_backend(backend, scratch, args):
                print(line, flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
