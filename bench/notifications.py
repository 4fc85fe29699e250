"""Emails per second through memberhub's notification sender, as a ratio to a raw aiosmtplib
loop sending the same messages to the same local SMTP server in the same run.

For each backend, on a database the bench creates and removes, each round:

- sender: N queued notifications (rendered, as the planner leaves them) are sent by
  `NotificationSender.send_due` through an `smtp` integration: claimed in batches with a
  lease, sent through the provider and the gateway (rate limit, breaker, metrics, payload
  log) over its pooled sessions, recorded a round at a time; the hub's payload log is
  written too (`drain`), as the worker does after each pass. The clock runs from the first
  claim to the last record.
- raw: the same N messages, each built as the provider builds it (`build_email`) and sent
  by `aiosmtplib.SMTP.send_message`, over as many sessions as the provider keeps
  (MAX_CONNECTIONS), each a plain loop: the floor of what any sender over that client
  can do. Both sides build each message's MIME while the clock runs.

The SMTP server (aiosmtpd, accepting and counting every message) runs in a child process,
so it does not share the measured event loop. The sides alternate which goes first each
round; the medians over the rounds are reported with their ratio (goal: at least 0.5).
Both share the machine with the server (and PostgreSQL), so figures swing with its load:
compare runs made together, and read the printed load average. The server must have
received exactly the messages sent and every notification must be recorded as sent;
otherwise the bench exits 1.

    python -m bench.notifications                   # both backends
    python -m bench.notifications --quick --backend sqlite
    python -m bench.notifications --emails 5000 --rounds 7
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import aiosmtplib
from sqlalchemy import Table, func, insert, select

from bench.common import (
    DEFAULT_POSTGRES_URL,
    REPOSITORY_ROOT,
    backends_named,
    free_port,
    postgres_usable,
    scratch_space,
)
from memberhub.integrations import vault
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.models import Integration
from memberhub.integrations.providers.base import OutgoingMessage
from memberhub.integrations.providers.smtp import SmtpConfig, build_email
from memberhub.kit.clock import utcnow
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.kit.ids import new_public_id, new_public_ids
from memberhub.members.models import Member
from memberhub.notifications.models import Notification, NotificationStatus
from memberhub.notifications.sending import NotificationSender
from memberhub.webhooks.ssrf import UrlPolicy, parse_networks

FULL_EMAILS = 2_000
QUICK_EMAILS = 50
ROUNDS = 5
MAX_CONNECTIONS = 4
CONCURRENCY = 8
SECRET = "bench-secret-key-not-for-production"
FROM = "club@bench.example"
_NOTIFICATIONS = cast(Table, Notification.__table__)
TEXT = (
    "Hello Alex,\n\nYou earned 150 points (Purchase at the club shop). Your balance is 1,230 "
    "points.\n\nOur loyalty program"
)
HTML = "<p>Hello Alex,</p><p>You earned <b>150 points</b>.</p><p>Our loyalty program</p>"


# -- the server (the child process) ----------------------------------------------------------


class CountingHandler:
    """Accepts every message and counts it; `NOOP` answers the count."""

    def __init__(self) -> None:
        self.received = 0

    async def handle_DATA(self, _server: Any, _session: Any, _envelope: Any) -> str:
        self.received += 1
        return "250 Message accepted"

    async def handle_NOOP(self, _server: Any, _session: Any, _envelope: Any, _arg: str) -> str:
        return f"250 {self.received}"


def serve_smtp(port: int) -> None:
    from aiosmtpd.smtp import SMTP

    handler = CountingHandler()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="bench.local"), host="127.0.0.1", port=port
        )
        async with server:
            await server.serve_forever()

    asyncio.run(main())


@contextlib.contextmanager
def running_smtp_server() -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.notifications", "--serve-smtp", str(port)],
        cwd=REPOSITORY_ROOT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the SMTP server exited with status {process.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the SMTP server did not start")
            time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def server_count(port: int) -> int:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await client.connect()
    try:
        response = await client.noop()
        return int(response.message)
    finally:
        await client.quit()


# -- the two sides ---------------------------------------------------------------------------


def outgoing(reference: str, number: int) -> OutgoingMessage:
    return OutgoingMessage(
        channel="email",
        to=f"member{number}@bench.example",
        reference=reference,
        text=TEXT,
        subject="You earned 150 points",
        html=HTML,
    )


async def create_members(db: Database, count: int) -> None:
    """The members the notifications go to, with email consent (the sender checks it)."""
    now = utcnow()
    rows = [
        {
            "public_id": public_id,
            "email": f"member{number}@bench.example",
            "email_normalized": f"member{number}@bench.example",
            "status": "active",
            "consent_email": True,
            "custom_fields": {},
            "external_ids": {},
            "version": 1,
            "created_at": now,
        }
        for number, public_id in enumerate(new_public_ids("mem", count))
    ]
    async with db.transaction() as session:
        await session.execute(insert(Member), rows)


async def queue_notifications(db: Database, round_number: int, count: int) -> list[str]:
    """`count` queued notifications, rendered as the planner leaves them."""
    now = utcnow()
    ids = new_public_ids("ntf", count)
    async with db.transaction(read_only=True) as session:
        found = await session.execute(select(Member.email, Member.id))
        members = {email: member_id for email, member_id in found if email is not None}
    rows: list[dict[str, Any]] = [
        {
            "public_id": public_id,
            "event_public_id": f"evt_bench{round_number}n{number}",
            "message_type": "points_earned",
            "category": "transactional",
            "channel": "email",
            "audience": "member",
            "member_id": members[f"member{number}@bench.example"],
            "organisation_id": None,
            "recipient": f"member{number}@bench.example",
            "recipient_key": f"member{number}@bench.example",
            "locale": None,
            "subject": "You earned 150 points",
            "text": TEXT,
            "html": HTML,
            "headers": {},
            "status": NotificationStatus.QUEUED,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        }
        for number, public_id in enumerate(ids)
    ]
    async with db.transaction() as session:
        await session.execute(insert(_NOTIFICATIONS), rows)
    return ids


async def create_integration(db: Database, box: SecretBox, port: int) -> SmtpConfig:
    config = SmtpConfig(
        host="127.0.0.1",
        port=port,
        security="none",
        from_address=FROM,
        max_connections=MAX_CONNECTIONS,
        # The bench measures the sender, not the client-side limit.
        rate_limit="1000000 per second",
    )
    now = utcnow()
    async with db.transaction() as session:
        session.add(
            Integration(
                public_id=new_public_id("int"),
                provider="smtp",
                name="bench relay",
                config=config.model_dump(mode="json", exclude_none=True),
                credentials=vault.seal(box, {}),
                credential_hints={},
                enabled=True,
                created_at=now,
                updated_at=now,
            )
        )
    return config


async def sender_round(
    db: Database, hub: IntegrationHub, round_number: int, count: int
) -> tuple[float, list[str]]:
    ids = await queue_notifications(db, round_number, count)
    sender = NotificationSender(db, hub, concurrency=CONCURRENCY)
    started = time.perf_counter()
    while await sender.send_due():
        pass
    await hub.drain()
    return count / (time.perf_counter() - started), ids


async def raw_round(config: SmtpConfig, count: int) -> float:
    clients = [
        aiosmtplib.SMTP(hostname=config.host, port=config.port, start_tls=False)
        for _ in range(MAX_CONNECTIONS)
    ]
    for client in clients:
        await client.connect()
    remaining = list(reversed(range(count)))

    async def loop(client: aiosmtplib.SMTP) -> None:
        while remaining:
            number = remaining.pop()
            await client.send_message(build_email(config, outgoing(f"ntf_raw{number}", number)))

    try:
        started = time.perf_counter()
        await asyncio.gather(*(loop(client) for client in clients))
        return count / (time.perf_counter() - started)
    finally:
        for client in clients:
            await client.quit()


@dataclass
class Result:
    backend: str
    sender: list[float]
    raw: list[float]

    def line(self) -> str:
        sender = statistics.median(self.sender)
        raw = statistics.median(self.raw)
        return (
            f"{self.backend:<11} sender {sender:8.1f} emails/s   raw {raw:8.1f} emails/s   "
            f"ratio {sender / raw:.3f}   load {os.getloadavg()[0]:.2f}"
        )


async def bench_backend_run(
    backend: str, url: str, port: int, emails: int, rounds: int
) -> tuple[Result, list[str]]:
    db = Database(url, pool_size=5)
    box = SecretBox(SECRET)
    # The local SMTP server is on loopback: allowed as an installation allows its relay.
    hub = IntegrationHub(
        db, box, UrlPolicy(allowed_networks=parse_networks("127.0.0.0/8"), allow_http=True)
    )
    problems: list[str] = []
    result = Result(backend, [], [])
    try:
        config = await create_integration(db, box, port)
        await create_members(db, emails)
        # Warm-up: sessions opened, statements prepared.
        await sender_round(db, hub, -1, min(20, emails))
        await raw_round(config, min(20, emails))
        before = await server_count(port)
        sent_ids: list[str] = []
        for round_number in range(rounds):
            sides = ("sender", "raw") if round_number % 2 == 0 else ("raw", "sender")
            for side in sides:
                if side == "sender":
                    rate, ids = await sender_round(db, hub, round_number, emails)
                    result.sender.append(rate)
                    sent_ids += ids
                else:
                    result.raw.append(await raw_round(config, emails))
        received = await server_count(port) - before
        if received != 2 * emails * rounds:
            problems.append(f"the server received {received} messages, {2 * emails * rounds} sent")
        async with db.transaction(read_only=True) as session:
            unsent = await session.scalar(
                select(func.count()).where(
                    Notification.public_id.in_(sent_ids),
                    Notification.status != NotificationStatus.SENT,
                )
            )
        if unsent:
            problems.append(f"{unsent} notifications are not recorded as sent")
    finally:
        await hub.aclose()
        await db.dispose()
    return result, problems


def bench_backend(backend: str, pg_url: str, port: int, emails: int, rounds: int) -> list[str]:
    with scratch_space(backend, pg_url) as scratch:
        url = scratch.new("notifications")
        result, problems = asyncio.run(bench_backend_run(backend, url, port, emails, rounds))
        print(result.line(), flush=True)
    return [f"{backend}: {p}" for p in problems]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small numbers, to check it runs")
    parser.add_argument("--emails", type=int, help=f"per round and side (default {FULL_EMAILS})")
    parser.add_argument("--rounds", type=int, help=f"the median counts (default {ROUNDS})")
    parser.add_argument(
        "--backend", choices=("both", "all", "sqlite", "postgresql"), default="both"
    )
    parser.add_argument("--serve-smtp", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_smtp is not None:
        serve_smtp(args.serve_smtp)
        return 0
    emails = args.emails or (QUICK_EMAILS if args.quick else FULL_EMAILS)
    rounds = args.rounds or (1 if args.quick else ROUNDS)
    explicit_pg = os.environ.get("MEMBERHUB_BENCH_POSTGRES_URL")
    pg_url = explicit_pg or os.environ.get("MEMBERHUB_TEST_DATABASE_URL") or DEFAULT_POSTGRES_URL
    print(
        f"notification sender vs a raw aiosmtplib loop ({MAX_CONNECTIONS} sessions) to a local "
        f"SMTP server: {emails} emails per round and side, median of {rounds} round(s); "
        "ratio = sender emails/s / raw (goal >= 0.5)"
    )
    problems: list[str] = []
    with running_smtp_server() as port:
        for backend in backends_named(args.backend):
            if backend == "postgresql":
                required = bool(explicit_pg) or args.backend == "postgresql"
                usable = postgres_usable(pg_url, required=required, label="postgresql ")
                if usable is None:
                    return 1
                if not usable:
                    continue
            problems += bench_backend(backend, pg_url, port, emails, rounds)
    for problem in problems:
        print(f"NOTIFICATION CHECK FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
