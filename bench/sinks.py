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
- raw: calls of the same shape and size (a track per event, an identify per member per
  window of the feed), built in advance and packed into batches under the same limit,
  POSTed one after another with one httpx client and the write key: no database, no
  consent, no bookkeeping.

Rounds alternate which side goes first (ABBA…), after a warm-up round; the median of each
side counts and the load average is printed with the result. Afterwards the fake must hold
every call once (none dropped, none refused); otherwise the bench exits 1. Ratio: sink /
raw events per second (higher is better). The round trips the sink adds per window are
named in the output: one read of the feed, one of the members, one write of the record.

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

import httpx
from sqlalchemy import func, select
from tests.fakes.segment import FakeSegment, running_fake_segment

from bench.common import DEFAULT_POSTGRES_URL, postgres_database, postgres_reachable
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


def raw_batches(members: list[str], count: int, start: int, tag: str) -> list[bytes]:
    """The calls a sink would send for the events, packed into batches under the limit."""
    timestamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    context = {"library": {"name": "memberhub", "version": "1"}}
    calls: list[dict[str, object]] = []
    identified: set[str] = set()
    for number in range(start, start + count):
        if (number - start) % EVENTS_PER_WINDOW == 0:
            identified = set()
        member = members[number % len(members)]
        if member not in identified:
            identified.add(member)
            calls.append(
                {
                    "type": "identify",
                    "userId": member,
                    "traits": {
                        "tier": None,
                        "status": "active",
                        "points_balance": 0,
                        "member_since": timestamp[:10],
                    },
                    "messageId": f"{tag}-{number}-identify",
                    "timestamp": timestamp,
                    "context": context,
                }
            )
        calls.append(
            {
                "type": "track",
                "userId": member,
                "event": "Points Earned",
                "properties": {
                    "transaction_id": f"txn_{number:020d}",
                    "transaction_type": "award",
                    "points": 10 + number % 90,
                    "pending_points": 0,
                    "balance_after": 1_000 + number,
                    "pending_after": 0,
                    "reason": "bench award",
                    "reference_id": f"order-{number}",
                    "amount": None,
                    "currency": None,
                    "expires_at": None,
                    "activates_at": None,
                    "notify": False,
                },
                "messageId": f"{tag}-{number}",
                "timestamp": timestamp,
                "context": context,
            }
        )
    batches: list[bytes] = []
    current: list[bytes] = []
    size = 64
    for call in calls:
        encoded = json.dumps(call, separators=(",", ":")).encode()
        if size + len(encoded) + 1 > MAX_BATCH_BYTES:
            batches.append(b'{"batch":[' + b",".join(current) + b"]}")
            current, size = [], 64
        current.append(encoded)
        size += len(encoded) + 1
    if current:
        batches.append(b'{"batch":[' + b",".join(current) + b"]}")
    return batches


async def time_raw(base_url: str, batches: list[bytes]) -> float:
    auth = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    headers = {"authorization": f"Basic {auth}", "content-type": "application/json"}
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, trust_env=False) as client:
        for body in batches:
            response = await client.post("/v1/batch", content=body, headers=headers)
            if response.status_code != 200:
                raise SystemExit(f"raw: Segment answered {response.status_code}")
    return time.perf_counter() - started


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

                async def sink_side(size: int = size, counted: bool = round_number > 0) -> float:
                    nonlocal emitted
                    await emit_points(db, members, size, emitted)
                    emitted += size
                    before = fake.requests
                    seconds, sent = await time_sink(db, hub, sink_id)
                    if sent != size:
                        problems.append(f"sink: {sent} events sent, {size} expected")
                    if counted:
                        nonlocal sink_requests
                        sink_requests += fake.requests - before
                    return seconds

                async def raw_side(size: int = size, number: int = round_number) -> float:
                    batches = raw_batches(members, size, 0, f"raw{number}")
                    before = fake.requests
                    seconds = await time_raw(fake.url, batches)
                    if number:
                        nonlocal raw_requests
                        raw_requests += fake.requests - before
                    return seconds

                if round_number % 2 == 0:
                    raw_seconds = await raw_side()
                    sink_seconds = await sink_side()
                else:
                    sink_seconds = await sink_side()
                    raw_seconds = await raw_side()
                expected_tracks += 2 * size
                if round_number:
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
        "per window of the feed the sink adds 3 database round trips (feed, members, record)"
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
