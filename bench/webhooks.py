"""Webhook delivery throughput, as a ratio to a raw httpx loop measured in the same run.

For each backend, on databases the bench creates and removes (temporary SQLite files; new
PostgreSQL databases on MEMBERHUB_BENCH_POSTGRES_URL, else MEMBERHUB_TEST_DATABASE_URL, else
postgresql+asyncpg://postgres@127.0.0.1:5432/postgres), and for 1 endpoint and for 10:

- loop: `points.earned` events committed to the outbox, undispatched, then the worker's
  `DeliveryLoop.run` (default settings: 64 deliveries in flight, 8 per endpoint) fanning
  them out to every endpoint, claiming, signing (Standard Webhooks), POSTing and recording
  each attempt. The clock stops when every attempt row of the round is committed (a probe
  counts them every 50 ms, through the bare driver so that it costs the loop's process
  little), so the figure is deliveries sent, signed and recorded per second.
- raw: the same bodies (built by `DeliveryLoop.payload`) POSTed to the same URLs as the loop
  sends them, without signing and without a database: straight through httpx's transport
  (no client), one connection per sender, 8 senders per endpoint, at most 64 in flight.

The receiver is a bare ASGI app under uvicorn in a child process (`python -m bench.webhooks
--serve-receiver PORT`), so it does not share the measured event loop; it answers 200 and
counts. Each of 3 rounds (median counted) sends N fresh events to every endpoint on both
sides, after a warm-up round; the sides alternate which goes first (ABBA…), and the load
average is printed with each result. Afterwards every delivery must have succeeded with one
attempt, and the receiver must have seen each signed POST once; otherwise the bench exits 1.

Ratio: loop / raw deliveries per second (higher is better; 1.0 would mean the outbox,
signing and bookkeeping cost nothing over bare POSTs sent the same way). Both sides share a
machine with the receiver (and PostgreSQL), so figures swing with its load: compare runs
made together, and read the printed load average.

    python -m bench.webhooks                    # both backends
    python -m bench.webhooks --quick            # a breakage check: small numbers
    python -m bench.webhooks --backend postgresql --events 20000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
from sqlalchemy import func, select

from bench.common import (
    DEFAULT_POSTGRES_URL,
    BareReader,
    backends_named,
    free_port,
    postgres_usable,
    running_child,
    scratch_space,
    serve_asgi,
)
from memberhub.events.catalog import PointsEarned
from memberhub.events.models import Event
from memberhub.events.service import emit_many
from memberhub.kit.clock import utcnow
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.kit.ids import new_public_id
from memberhub.ops.metrics import Metrics
from memberhub.settings import Settings
from memberhub.webhooks.delivery import Claimed, DeliveryConfig, DeliveryLoop, EndpointState
from memberhub.webhooks.models import (
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from memberhub.webhooks.signing import new_secret
from memberhub.webhooks.ssrf import UrlPolicy, check_url, verifying_context

# (endpoints, events per round): each event goes to every endpoint.
FULL_CASES = ((1, 5_000), (10, 1_000))
QUICK_CASES = ((1, 100), (10, 20))
ROUNDS = 3
SECRET_KEY = "bench-secret-key-not-for-production"
# The standalone worker's pool (`memberhub worker`).
WORKER_POOL_SIZE = 2
# How often the bench looks for the last attempt row; the clock stops within this much.
PROBE_INTERVAL = 0.05
DELIVERY_TIMEOUT = 600.0


# -- the receiver (the child process) --------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class CountingReceiver:
    """Answers 200 to every `POST /hooks/{n}` and counts them, signed ones apart;
    `GET /count` tells the counts, `GET /health` that it is up."""

    def __init__(self) -> None:
        self.received = 0
        self.signed = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "POST" and scope["path"].startswith("/hooks/"):
            while (await receive()).get("more_body", False):
                pass
            self.received += 1
            if any(name == b"webhook-signature" for name, _ in scope["headers"]):
                self.signed += 1
            await _reply(send, 200, b"ok")
        elif scope["method"] == "GET" and scope["path"] == "/count":
            counts = {"received": self.received, "signed": self.signed}
            await _reply(send, 200, json.dumps(counts).encode())
        elif scope["method"] == "GET" and scope["path"] == "/health":
            await _reply(send, 200, b"ok")
        else:
            await _reply(send, 404, b"not found")


async def _reply(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def running_receiver() -> Iterator[str]:
    """The receiver in a child process; yields its base URL."""
    port = free_port()
    with running_child(["bench.webhooks", "--serve-receiver", str(port)], port) as base_url:
        yield base_url


@dataclass(frozen=True)
class ReceiverCounts:
    received: int
    signed: int


async def receiver_counts(client: httpx.AsyncClient, base_url: str) -> ReceiverCounts:
    response = await client.get(f"{base_url}/count")
    response.raise_for_status()
    counts = response.json()
    return ReceiverCounts(received=counts["received"], signed=counts["signed"])


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    backend: str
    endpoints: int
    events: int
    loop_per_second: float
    raw_per_second: float

    @property
    def ratio(self) -> float:
        return self.loop_per_second / self.raw_per_second

    def line(self) -> str:
        endpoints = f"{self.endpoints} endpoint" + ("s" if self.endpoints != 1 else "")
        return (
            f"{self.backend:<11} {endpoints:<12} loop {self.loop_per_second:8.1f} deliveries/s"
            f"   raw {self.raw_per_second:8.1f} posts/s   ratio {self.ratio:.3f}"
            f"   load {os.getloadavg()[0]:.2f}"
        )


# -- setup -----------------------------------------------------------------------------------


def bench_settings(url: str) -> Settings:
    """The worker's settings, allowed to deliver to the receiver on the loopback interface."""
    return Settings(
        database_url=url,
        secret_key=SECRET_KEY,
        redis_url=None,
        log_level="WARNING",
        webhook_allowed_networks="127.0.0.0/8",
        webhook_allow_http=True,
    )


async def create_endpoints(db: Database, settings: Settings, urls: Sequence[str]) -> None:
    """Endpoints subscribed to every event, with encrypted secrets, as the API stores them."""
    policy = UrlPolicy.from_settings(settings)
    for url in urls:
        await check_url(url, policy)
    box = SecretBox(settings.resolved_secret_key)
    now = utcnow()
    async with db.transaction() as session:
        session.add_all(
            WebhookEndpoint(
                public_id=new_public_id("whk"),
                url=url,
                description="bench",
                event_types={"types": ["*"]},
                ordered=False,
                rate_limit=None,
                enabled=True,
                secret=box.encrypt(new_secret()),
                after_position=0,
                created_at=now,
                updated_at=now,
            )
            for url in urls
        )


def points_earned(number: int, now: datetime) -> PointsEarned:
    return PointsEarned(
        member_id=f"mem_bench{number:08d}",
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


async def emit_events(db: Database, count: int) -> None:
    """`count` committed, undispatched outbox events, as a job emitting them would leave them."""
    now = utcnow()
    events = [
        (points_earned(number, now), None, f"mem_bench{number:08d}") for number in range(count)
    ]
    async with db.transaction() as session:
        await emit_many(session, events, occurred_at=now)


async def undispatched_bodies(db: Database, loop: DeliveryLoop) -> list[str]:
    """The bodies the loop will send for the events not yet dispatched, built by the loop."""
    async with db.transaction(read_only=True) as session:
        rows = (
            await session.execute(
                select(Event.public_id, Event.type, Event.version, Event.occurred_at, Event.data)
                .where(Event.dispatched_at.is_(None))
                .order_by(Event.position)
            )
        ).all()
    endpoint = EndpointState(id=0, public_id="", url="", ordered=False, rate_limit=None)
    return [
        loop.payload(
            Claimed(
                delivery_id=0,
                endpoint=endpoint,
                token="",
                attempt_number=1,
                schedule_index=0,
                event_public_id=row.public_id,
                event_type=row.type,
                event_version=row.version,
                occurred_at=row.occurred_at,
                data=row.data,
            )
        )
        for row in rows
    ]


# -- the two sides ---------------------------------------------------------------------------


def delivery_loop(db: Database, settings: Settings) -> DeliveryLoop:
    """The loop as `memberhub worker` builds it."""
    return DeliveryLoop(
        db,
        DeliveryConfig.from_settings(settings),
        SecretBox(settings.resolved_secret_key),
        worker_id="bench",
        metrics=Metrics(),
    )


async def last_attempt_id(probe: Database) -> int:
    async with probe.transaction(read_only=True, short=True) as session:
        return int(await session.scalar(select(func.max(WebhookAttempt.id))) or 0)


class AttemptCounter(BareReader):
    """Counts committed attempt rows for the clock, through the bare driver on a connection
    of its own: the probe runs in the measured process every PROBE_INTERVAL, so it should
    cost the loop's side as little as it can (a session and a transaction through
    SQLAlchemy each time cost it several percent of its CPU)."""

    QUERY = "SELECT count(*) FROM webhook_attempts WHERE id > {0}"

    async def recorded(self, after_id: int) -> int:
        """Attempt rows committed with an id above `after_id`: a range of the primary key, so
        the probe costs the database as little at the last round as at the first."""
        ((count,),) = await self.rows(self.QUERY, after_id)
        return int(count)


async def time_loop(db: Database, probe: Database, settings: Settings, deliveries: int) -> float:
    """Seconds from starting the loop until `deliveries` more attempt rows are committed."""
    loop = delivery_loop(db, settings)
    stop = asyncio.Event()
    before = await last_attempt_id(probe)
    async with AttemptCounter(probe.url) as counter:
        started = time.perf_counter()
        running = asyncio.create_task(loop.run(stop))
        try:
            while await counter.recorded(before) < deliveries:
                if running.done():
                    running.result()
                    raise RuntimeError("the delivery loop stopped early")
                if time.perf_counter() - started > DELIVERY_TIMEOUT:
                    raise TimeoutError(f"deliveries unfinished after {DELIVERY_TIMEOUT:.0f}s")
                await asyncio.sleep(PROBE_INTERVAL)
            return time.perf_counter() - started
        finally:
            stop.set()
            await running


async def time_raw(urls: Sequence[str], bodies: Sequence[str], config: DeliveryConfig) -> float:
    """Seconds to POST every body to every endpoint URL, as the loop sends: through httpx's
    transport (no client), one connection per sender, `endpoint_concurrency` senders per
    endpoint and at most `concurrency` POSTs in flight overall; each response read and
    closed. Its connections are opened within the time, as the loop's (a new one each
    round) are."""
    headers = {"content-type": "application/json", "accept-encoding": "identity"}
    overall = asyncio.Semaphore(config.concurrency)
    timeouts = httpx.Timeout(60).as_dict()

    async def post(transport: httpx.AsyncBaseTransport, url: httpx.URL, body: str) -> None:
        request = httpx.Request(
            "POST", url, headers=headers, content=body.encode(), extensions={"timeout": timeouts}
        )
        response = await transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        if response.status_code != 200:
            raise RuntimeError(f"POST {url}: {response.status_code}")

    async def sender(
        transport: httpx.AsyncBaseTransport, url: httpx.URL, pending: Iterator[str]
    ) -> None:
        for body in pending:  # shared by the endpoint's senders: each body is taken once
            async with overall:
                await post(transport, url, body)

    started = time.perf_counter()
    async with contextlib.AsyncExitStack() as stack:
        senders = []
        for endpoint_url in urls:
            for _ in range(config.endpoint_concurrency):
                transport = await stack.enter_async_context(
                    httpx.AsyncHTTPTransport(
                        verify=verifying_context(),  # as the loop: the CA bundle read once
                        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                    )
                )
                senders.append((transport, httpx.URL(endpoint_url)))
        async with asyncio.TaskGroup() as group:
            pending_by_url = {endpoint_url: iter(bodies) for endpoint_url in urls}
            for transport, parsed in senders:
                group.create_task(sender(transport, parsed, pending_by_url[str(parsed)]))
        return time.perf_counter() - started


# -- one case --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    endpoints: int
    events: int
    rounds: int


async def bench_case(
    backend: str, url: str, receiver_url: str, case: Case
) -> tuple[Result, list[str]]:
    """The medians of both sides, and the problems found."""
    settings = bench_settings(url)
    config = DeliveryConfig.from_settings(settings)
    urls = [f"{receiver_url}/hooks/{number}" for number in range(case.endpoints)]
    db = Database(url, pool_size=WORKER_POOL_SIZE)
    probe = Database(url, pool_size=1)
    problems: list[str] = []
    loop_rates: list[float] = []
    raw_rates: list[float] = []
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(db.dispose)
        stack.push_async_callback(probe.dispose)
        counter = await stack.enter_async_context(httpx.AsyncClient(trust_env=False))
        await create_endpoints(db, settings, urls)
        delivered = 0
        # The warm-up round (index 0) is not counted.
        for round_number in range(case.rounds + 1):
            events = case.events if round_number else min(case.events, 2 * config.concurrency)
            deliveries = events * case.endpoints
            await emit_events(db, events)
            bodies = await undispatched_bodies(db, delivery_loop(db, settings))

            async def raw_side(bodies: list[str] = bodies, deliveries: int = deliveries) -> float:
                before = await receiver_counts(counter, receiver_url)
                seconds = await time_raw(urls, bodies, config)
                after = await receiver_counts(counter, receiver_url)
                if after.received - before.received != deliveries:
                    problems.append(f"raw: {after.received - before.received} POSTs received")
                return seconds

            async def loop_side(deliveries: int = deliveries) -> float:
                before = await receiver_counts(counter, receiver_url)
                seconds = await time_loop(db, probe, settings, deliveries)
                after = await receiver_counts(counter, receiver_url)
                if after.signed - before.signed != deliveries:
                    problems.append(
                        f"loop: {after.signed - before.signed} signed POSTs received, "
                        f"{deliveries} expected"
                    )
                return seconds

            # ABBA: each side goes first in every other round.
            if round_number % 2 == 0:
                raw_seconds = await raw_side()
                loop_seconds = await loop_side()
            else:
                loop_seconds = await loop_side()
                raw_seconds = await raw_side()
            delivered += deliveries
            if round_number:
                raw_rates.append(deliveries / raw_seconds)
                loop_rates.append(deliveries / loop_seconds)
        problems += await delivery_problems(probe, delivered)
    result = Result(
        backend=backend,
        endpoints=case.endpoints,
        events=case.events,
        loop_per_second=statistics.median(loop_rates),
        raw_per_second=statistics.median(raw_rates),
    )
    return result, problems


async def delivery_problems(probe: Database, expected: int) -> list[str]:
    """Every delivery succeeded at its first attempt, and every event was dispatched."""
    async with probe.transaction(read_only=True) as session:
        rows = await session.execute(
            select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
        )
        by_status = {status: int(count) for status, count in rows}
        attempts = await session.scalar(select(func.count(WebhookAttempt.id)))
        failed_attempts = await session.scalar(
            select(func.count(WebhookAttempt.id)).where(WebhookAttempt.succeeded.is_(False))
        )
        undispatched = await session.scalar(
            select(func.count(Event.id)).where(Event.dispatched_at.is_(None))
        )
    problems = []
    if by_status != {DeliveryStatus.SUCCEEDED: expected}:
        problems.append(f"deliveries by status {by_status}, {expected} succeeded expected")
    if attempts != expected or failed_attempts:
        problems.append(f"{attempts} attempts ({failed_attempts} failed), {expected} expected")
    if undispatched:
        problems.append(f"{undispatched} events never dispatched")
    return problems


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small numbers, to check it runs")
    parser.add_argument(
        "--events",
        type=int,
        help="events per round for one endpoint; a tenth of it for ten "
        f"(default {FULL_CASES[0][1]})",
    )
    parser.add_argument(
        "--rounds", type=int, help=f"rounds per side, the median counts (default {ROUNDS})"
    )
    parser.add_argument(
        "--backend",
        choices=("both", "all", "sqlite", "postgresql"),
        default="both",
        help="default: both",
    )
    parser.add_argument("--serve-receiver", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def cases_from(args: argparse.Namespace) -> list[Case]:
    rounds = args.rounds or (1 if args.quick else ROUNDS)
    if args.events is not None:
        sizes: Sequence[tuple[int, int]] = ((1, args.events), (10, max(1, args.events // 10)))
    else:
        sizes = QUICK_CASES if args.quick else FULL_CASES
    return [Case(endpoints=endpoints, events=events, rounds=rounds) for endpoints, events in sizes]


def bench_backend(backend: str, pg_url: str, receiver_url: str, cases: Sequence[Case]) -> list[str]:
    problems: list[str] = []
    with scratch_space(backend, pg_url) as scratch:
        for case in cases:
            url = scratch.new(f"webhooks_{case.endpoints}")
            result, found = asyncio.run(bench_case(backend, url, receiver_url, case))
            print(result.line(), flush=True)
            problems += [f"{backend}, {case.endpoints} endpoint(s): {p}" for p in found]
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_receiver is not None:
        serve_asgi(CountingReceiver(), args.serve_receiver)
        return 0
    cases = cases_from(args)
    explicit_pg = os.environ.get("MEMBERHUB_BENCH_POSTGRES_URL")
    pg_url = explicit_pg or os.environ.get("MEMBERHUB_TEST_DATABASE_URL") or DEFAULT_POSTGRES_URL
    print(
        "webhook deliveries (signed, attempt recorded) vs raw httpx POSTs to a local receiver: "
        + ", ".join(f"{c.events} events x {c.endpoints} endpoint(s)" for c in cases)
        + f", median of {cases[0].rounds} round(s)"
    )
    problems: list[str] = []
    with running_receiver() as receiver_url:
        for backend in backends_named(args.backend):
            if backend == "postgresql":
                required = bool(explicit_pg) or args.backend == "postgresql"
                usable = postgres_usable(pg_url, required=required, label="postgresql ")
                if usable is None:
                    return 1
                if not usable:
                    continue
            problems += bench_backend(backend, pg_url, receiver_url, cases)
    for problem in problems:
        print(f"WEBHOOK CHECK FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
