"""Events forwarded to Segment per second by an event sink, as a ratio to a raw batched
httpx loop measured in the same run.

On a fresh database (a temporary SQLite file, or a new PostgreSQL database with
`--backend postgresql`) with M members who consent to analytics and a Segment integration
pointed at the Segment fake of `tests/fakes` (uvicorn in a thread of this process):

- sink: N `points.earned` events committed to the outbox, then worker passes of
  `run_event_sinks` until the sink's position reaches the feed's end: each window read in
  commit order, members and consent read, identify and track calls built and packed into
  `/v1/batch` requests under 500 KB, sent through the integration's gateway, the window
  recorded with its delivery log row. The clock runs from the first pass to the last.
- raw: what a developer would write without memberhub, over the same events: read the
  round's part of the feed a window at a time with the bare driver (stdlib `sqlite3`, or
  asyncpg), and the window's members' traits in one more query; build the same identify
  (first event of a member in a window) and track calls (the event's plain values as
  properties), pack them into `/v1/batch` bodies under the same limit and POST them one
  after another with one httpx client and the write key. No consent check, no position,
  no delivery log, no retries; reads and POSTs do not overlap. Its `messageId`s carry a
  `raw<round>-` prefix, so the fake keeps both sides' calls.

The events of a round are committed (untimed) before either side runs;
rounds alternate which side goes first (ABBA…), after a warm-up round; the median of each
side counts and the load average is printed with the result. Afterwards the fake must hold
every call once (none dropped, none refused); otherwise the bench exits 1. Ratio: sink /
raw events per second (higher is better). The round trips the sink adds per window are
named in the output: one read of the feed, one of the members, one write of the record
(the raw side has the first two).

    python -m bench.sinks                  # 20,000 events a round, SQLite
    python -m bench.sinks --quick          # a breakage check: small numbers
    python -m bench.sinks --backend postgresql --events 50000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select
from tests.fakes.segment import FakeSegment, running_fake_segment

from bench.common import (
    DEFAULT_POSTGRES_URL,
    BareReader,
    postgres_database,
    postgres_reachable,
)
from memberhub.auth.principal import Principal
from memberhub.events.catalog import PointsEarned
from memberhub.events.models import Event
from memberhub.events.sequencer import run_passes
from memberhub.events.service import emit_many
from memberhub.integrations import service as integrations
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.providers.segment import MAX_BATCH_BYTES
from memberhub.integrations.schemas import IntegrationCreate
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.kit.ids import new_public_id
from memberhub.kit.migrate import upgrade_async
from memberhub.members.models import Member, MemberStatus
from memberhub.settings import Settings
from memberhub.sinks import service as sinks
from memberhub.sinks.forwarding import EVENTS_PER_WINDOW, run_event_sinks
from memberhub.sinks.models import EventSink
from memberhub.sinks.schemas import SinkCreate
from memberhub.webhooks.ssrf import UrlPolicy

WRITE_KEY = "bench-segment-write-key"
FULL = (1_000, 20_000)  # members, events a round
QUICK = (50, 600)
ROUNDS = 3
PASS_LIMIT = 10_000


@dataclass(frozen=True)
class Result:
    backend: str
    events: int
    sink_per_second: float
    raw_per_second: float
    sink_requests: int
    raw_requests: int

    @property
    def ratio(self) -> float:
        return self.sink_per_second / self.raw_per_second

    def line(self) -> str:
        return (
            f"{self.backend:<11} {self.events} events   sink {self.sink_per_second:9.1f} events/s"
            f" ({self.sink_requests} requests)   raw {self.raw_per_second:9.1f} events/s"
            f" ({self.raw_requests} requests)   ratio {self.ratio:.3f}"
            f"   load {os.getloadavg()[0]:.2f}"
        )


async def seed_members(db: Database, count: int) -> list[str]:
    now = utcnow()
    ids = [f"mem_sinkbench{n:07d}" for n in range(count)]
    async with db.transaction() as session:
        session.add_all(
            Member(
                public_id=public_id,
                email=f"{public_id}@example.com",
                email_normalized=f"{public_id}@example.com",
                status=MemberStatus.ACTIVE,
                consent_analytics=True,
                custom_fields={},
                external_ids={},
                version=1,
                created_at=now,
                updated_at=now,
            )
            for public_id in ids
        )
    return ids


async def emit_points(db: Database, members: list[str], count: int, start: int) -> None:
    now = utcnow()
    events = []
    for number in range(start, start + count):
        member = members[number % len(members)]
        data = PointsEarned(
            member_id=member,
            transaction_id=new_public_id("txn"),
            transaction_type="award",
            points=10 + number % 90,
            pending_points=0,
            balance_after=1_000 + number,
            pending_after=0,
            reason="bench award",
            reference_id=f"order-{number}",
            occurred_at=now,
        )
        events.append((data, None, member))
    async with db.transaction() as session:
        await emit_many(session, events, occurred_at=now)
    await run_passes(db)


async def time_sink(db: Database, hub: IntegrationHub, sink_id: int) -> tuple[float, int]:
    """Seconds of worker passes until the sink has reached the feed's end; events sent."""
    async with db.transaction(read_only=True) as session:
        latest = int(await session.scalar(select(func.max(Event.position))) or 0)
    sent = 0
    started = time.perf_counter()
    for _ in range(PASS_LIMIT):
        sent += await run_event_sinks(db, hub, utcnow())
        async with db.transaction(read_only=True, short=True) as session:
            position = await session.scalar(
                select(EventSink.event_position).where(EventSink.id == sink_id)
            )
        if position is not None and position >= latest:
            return time.perf_counter() - started, sent
    raise SystemExit("the sink did not catch up")


RAW_EVENTS = (
    "SELECT position, public_id, type, occurred_at, member_public_id, data FROM events"
    " WHERE position > {0} AND position <= {1} ORDER BY position LIMIT {2}"
)
RAW_MEMBERS = (
    "SELECT m.public_id, m.tier, m.status, m.member_since, m.created_at, a.current"
    " FROM members m LEFT JOIN point_accounts a ON a.member_id = m.id"
    " WHERE m.public_id IN ({0})"
)
RAW_NAMES = {"points.earned": "Points Earned"}
RAW_LEFT_OUT = frozenset({"member_id", "organisation_id", "member", "occurred_at"})
RAW_PLAIN = (str, int, float, bool, type(None))
RAW_CONTEXT = {"library": {"name": "memberhub", "version": "1"}}
Row = tuple[Any, ...]


class RawReader(BareReader):
    """The feed and the members read with the bare driver: stdlib sqlite3 or asyncpg."""

    async def members(self, public_ids: list[str]) -> list[Row]:
        if self.sqlite is not None:
            marks = ",".join("?" * len(public_ids))
            return self.sqlite.execute(RAW_MEMBERS.format(marks), public_ids).fetchall()
        assert self.pg is not None
        query = RAW_MEMBERS.replace("IN ({0})", "= ANY($1::text[])")
        return [tuple(row) for row in await self.pg.fetch(query, public_ids)]


def moment(value: Any) -> datetime:
    if isinstance(value, str):  # SQLite keeps UTC as text
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def raw_calls(events: list[Row], members: list[Row], tag: str) -> list[dict[str, Any]]:
    """The identify and track calls a sink would send for a window of the feed."""
    traits: dict[str, dict[str, Any]] = {}
    for public_id, tier, status, since, created, current in members:
        joined = moment(since or created)
        traits[public_id] = {
            "tier": tier,
            "status": status,
            "points_balance": current or 0,
            "member_since": joined.date().isoformat(),
        }
    stamps: dict[Any, str] = {}
    identified: set[str] = set()
    calls: list[dict[str, Any]] = []
    for _position, public_id, type_, occurred_at, member, data in events:
        stamp = stamps.get(occurred_at)
        if stamp is None:
            stamp = moment(occurred_at).isoformat(timespec="milliseconds")
            stamp = stamps[occurred_at] = stamp.replace("+00:00", "Z")
        if member not in identified:
            identified.add(member)
            calls.append(
                {
                    "type": "identify",
                    "userId": member,
                    "traits": traits[member],
                    "messageId": f"{tag}-{public_id}-identify",
                    "timestamp": stamp,
                    "context": RAW_CONTEXT,
                }
            )
        values = json.loads(data) if isinstance(data, str) else data
        calls.append(
            {
                "type": "track",
                "userId": member,
                "event": RAW_NAMES[type_],
                "properties": {
                    key: value
                    for key, value in values.items()
                    if isinstance(value, RAW_PLAIN) and key not in RAW_LEFT_OUT
                },
                "messageId": f"{tag}-{public_id}",
                "timestamp": stamp,
                "context": RAW_CONTEXT,
            }
        )
    return calls


def pack(calls: list[dict[str, Any]]) -> list[bytes]:
    """The calls packed into `/v1/batch` bodies under Segment's limit."""
    encode = json.JSONEncoder(separators=(",", ":")).encode
    batches: list[bytes] = []
    current: list[bytes] = []
    size = 64

    def close() -> None:
        sent_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        batches.append(
            b'{"batch":[' + b",".join(current) + b'],"sentAt":"' + sent_at.encode() + b'"}'
        )

    for call in calls:
        encoded = encode(call).encode()
        if size + len(encoded) + 1 > MAX_BATCH_BYTES:
            close()
            current, size = [], 64
        current.append(encoded)
        size += len(encoded) + 1
    if current:
        close()
    return batches


async def time_raw(
    url: str, base_url: str, first: int, last: int, tag: str
) -> tuple[float, int, int]:
    """Seconds to read the feed from `first` to `last`, a window at a time, and POST its
    calls; events and requests sent."""
    auth = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    headers = {"authorization": f"Basic {auth}", "content-type": "application/json"}
    events = requests = 0
    async with RawReader(url) as reader:
        started = time.perf_counter()
        async with httpx.AsyncClient(base_url=base_url, trust_env=False) as client:
            position = first
            while position < last:
                window = await reader.rows(RAW_EVENTS, position, last, EVENTS_PER_WINDOW)
                if not window:
                    break
                members = await reader.members(sorted({row[4] for row in window}))
                for body in pack(raw_calls(window, members, tag)):
                    response = await client.post("/v1/batch", content=body, headers=headers)
                    if response.status_code != 200:
                        raise SystemExit(f"raw: Segment answered {response.status_code}")
                    requests += 1
                events += len(window)
                position = int(window[-1][0])
        return time.perf_counter() - started, events, requests


async def feed_end(db: Database) -> int:
    async with db.transaction(read_only=True) as session:
        return int(await session.scalar(select(func.max(Event.position))) or 0)


async def bench(backend: str, url: str, members_count: int, events: int, rounds: int) -> Result:
    await upgrade_async(url)
    db = Database(url, pool_size=5)
    settings = Settings(
        database_url=url,
        secret_key="bench-secret-key",
        webhook_allowed_networks="127.0.0.0/8",
        webhook_allow_http=True,
    )
    hub = IntegrationHub(
        db, SecretBox(settings.resolved_secret_key), UrlPolicy.from_settings(settings)
    )
    principal = Principal.system(Actor.system("bench"))
    problems: list[str] = []
    try:
        async with running_fake_segment(WRITE_KEY) as fake:
            async with db.transaction() as session:
                integration = await integrations.create_integration(
                    session,
                    principal,
                    IntegrationCreate.model_validate(
                        {
                            "provider": "segment",
                            "name": "Segment",
                            "config": {"base_url": fake.url, "rate_limit": "100000 per second"},
                            "credentials": {"write_key": WRITE_KEY},
                        }
                    ),
                    box=hub.box,
                    policy=hub.url_policy,
                )
            members = await seed_members(db, members_count)
            async with db.transaction() as session:
                created = await sinks.create_sink(
                    session,
                    principal,
                    SinkCreate(
                        integration_id=integration.public_id,
                        name="bench",
                        event_types=["points.earned"],
                    ),
                )
                sink_id = await session.scalar(
                    select(EventSink.id).where(EventSink.public_id == created.id)
                )
            assert sink_id is not None
            sink_rates: list[float] = []
            raw_rates: list[float] = []
            sink_requests = raw_requests = 0
            emitted = 0
            expected_tracks = 0
            for round_number in range(rounds + 1):  # round 0 warms up
                size = events if round_number else min(events, 2 * EVENTS_PER_WINDOW)
                counted = round_number > 0
                first = await feed_end(db)
                await emit_points(db, members, size, emitted)
                emitted += size
                last = await feed_end(db)

                async def sink_side(size: int = size, counted: bool = counted) -> float:
                    before = fake.requests
                    seconds, sent = await time_sink(db, hub, sink_id)
                    if sent != size:
                        problems.append(f"sink: {sent} events sent, {size} expected")
                    if counted:
                        nonlocal sink_requests
                        sink_requests += fake.requests - before
                    return seconds

                async def raw_side(
                    size: int = size,
                    first: int = first,
                    last: int = last,
                    number: int = round_number,
                ) -> float:
                    seconds, sent, requests = await time_raw(
                        url, fake.url, first, last, f"raw{number}"
                    )
                    if sent != size:
                        problems.append(f"raw: {sent} events sent, {size} expected")
                    if number:
                        nonlocal raw_requests
                        raw_requests += requests
                    return seconds

                if round_number % 2 == 0:
                    raw_seconds = await raw_side()
                    sink_seconds = await sink_side()
                else:
                    sink_seconds = await sink_side()
                    raw_seconds = await raw_side()
                expected_tracks += 2 * size
                if counted:
                    sink_rates.append(size / sink_seconds)
                    raw_rates.append(size / raw_seconds)
            problems += check_fake(fake, expected_tracks)
    finally:
        await hub.aclose()
        await db.dispose()
    if problems:
        for problem in problems:
            print(f"SINK CHECK FAILED: {problem}", file=sys.stderr)
        raise SystemExit(1)
    return Result(
        backend,
        events,
        statistics.median(sink_rates),
        statistics.median(raw_rates),
        sink_requests,
        raw_requests,
    )


def check_fake(fake: FakeSegment, expected_tracks: int) -> list[str]:
    problems = []
    tracks = len(fake.tracks())
    if tracks != expected_tracks:
        problems.append(f"the fake holds {tracks} track calls, {expected_tracks} expected")
    if fake.dropped:
        problems.append(f"the fake dropped {len(fake.dropped)} calls: {fake.dropped[0][1]}")
    if fake.duplicates:
        problems.append(f"the fake saw {fake.duplicates} duplicate calls")
    return problems


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small numbers, to check it runs")
    parser.add_argument("--events", type=int, help=f"events a round (default {FULL[1]})")
    parser.add_argument("--members", type=int, help=f"members (default {FULL[0]})")
    parser.add_argument("--rounds", type=int, help=f"rounds a side (default {ROUNDS})")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    members, events = QUICK if args.quick else FULL
    members = args.members or members
    events = args.events or events
    rounds = args.rounds or (1 if args.quick else ROUNDS)
    print(
        f"events forwarded to the Segment fake by an event sink vs a raw batched httpx loop: "
        f"{events} events a round over {members} members, median of {rounds} round(s); "
        "per window of the feed both sides read the feed and the members, and the sink also "
        "records the window (one more database round trip)"
    )
    if args.backend == "postgresql":
        pg_url = (
            os.environ.get("MEMBERHUB_BENCH_POSTGRES_URL")
            or os.environ.get("MEMBERHUB_TEST_DATABASE_URL")
            or DEFAULT_POSTGRES_URL
        )
        problem = postgres_reachable(pg_url)
        if problem is not None:
            print(f"postgresql: {problem}", file=sys.stderr)
            return 1
        with postgres_database(pg_url) as url:
            result = asyncio.run(bench("postgresql", url, members, events, rounds))
    else:
        with tempfile.TemporaryDirectory(prefix="memberhub-bench-") as directory:
            url = f"sqlite+aiosqlite:///{Path(directory) / 'sinks.db'}"
            result = asyncio.run(bench("sqlite", url, members, events, rounds))
    print(result.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
