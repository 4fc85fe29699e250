"""Activities through the earning rules against the plain earn operation, both over HTTP to
the same `memberhub serve` in the same run.

For each backend, on a scratch database the bench creates and removes (a temporary SQLite
file; a new PostgreSQL database on MEMBERHUB_BENCH_POSTGRES_URL, default
postgresql+asyncpg://postgres@127.0.0.1:5432/postgres), with 50 active earning rules of
the kinds a program keeps (most for other activity types or other attributes, a few that
apply: points per amount with a daily cap, a category bonus, an Nth-booking bonus, and
rules that match the type but not the member's tier or a date window):

- activity: `POST /api/v1/activities`, a `booking.completed` with an amount, a currency and
  a category, recorded and evaluated against the 50 rules, crediting what applies;
- earn: `POST /api/v1/points/earn` of the same amount, at the program's earn rate.

`--clients` concurrent keep-alive connections from the lean load client (`bench.loadgen`),
to distinct members. Each round runs both sides for `--seconds`, alternating which goes
first (ABAB); the medians count. It prints the load average before and after, the
statements each operation sends (counted in-process, BEGIN and COMMIT included), and the
ratio activities / earns (goal: at least 0.7).

    python -m bench.activities                       # both backends
    python -m bench.activities --quick               # a breakage check
    python -m bench.activities --backend postgresql --rounds 7 --seconds 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import event

from bench.common import (
    DEFAULT_POSTGRES_URL,
    Scratch,
    backends_named,
    issue_admin_key,
    postgres_usable,
    scratch_space,
)
from bench.loadgen import LeanPool
from bench.write_path import Operation, Samples, for_seconds, memberhub_serve, seed
from memberhub.kit.clock import utcnow

MEMBERS = 2000
RULES = 50
AMOUNT = 25000
CURRENCY = "MYR"  # the program's currency in a new database


# -- the rules --------------------------------------------------------------------------------


def _on(activity_type: str, *more: dict[str, Any]) -> dict[str, Any]:
    return {"all": [{"field": "activity.type", "op": "eq", "value": activity_type}, *more]}


def _field(name: str, op: str, value: Any) -> dict[str, Any]:
    return {"field": name, "op": op, "value": value}


def applying_rules() -> list[dict[str, Any]]:
    """The rules a bench booking meets (3 credit) or nearly meets (2 stop at the member or
    the date)."""
    since = (utcnow() - timedelta(days=30)).isoformat()
    return [
        {
            "name": "Bookings earn 1 point per 1 MYR",
            "priority": 50,
            "conditions": _on(
                "booking.completed", _field("activity.attributes.amount", "gte", 1000)
            ),
            "effect": {
                "type": "points_per_amount",
                "points": 1,
                "per_amount": 100,
                "currency": CURRENCY,
                "max_points": 5000,
            },
            "caps": {"per_member_per_day": {"awards": 1000}},
        },
        {
            "name": "Spa and dining bookings earn 20 more",
            "priority": 40,
            "conditions": _on(
                "booking.completed",
                _field("activity.attributes.category", "in", ["spa", "dining"]),
                _field("activity.occurred_at", "gte", since),
            ),
            "effect": {"type": "fixed_points", "points": 20},
        },
        {
            "name": "Every 5th booking in a month earns 100",
            "priority": 30,
            "conditions": _on("booking.completed"),
            "effect": {"type": "nth_activity_bonus", "points": 100, "nth": 5, "period": "month"},
        },
        {
            "name": "Gold members earn double on bookings",
            "priority": 60,
            "conditions": _on("booking.completed", _field("member.tier", "eq", "gold")),
            "effect": {"type": "multiplier", "percent": 200, "max_points": 10000},
        },
        {
            "name": "Launch week bookings",
            "priority": 20,
            "conditions": _on(
                "booking.completed",
                _field("activity.occurred_at", "lt", "2020-01-08T00:00:00Z"),
            ),
            "effect": {"type": "fixed_points", "points": 500},
        },
    ]


def other_rules(count: int) -> list[dict[str, Any]]:
    """Rules for what a booking is not: other types, other attributes."""
    kinds = [
        ("event.attended", _field("activity.attributes.cpd_hours", "gte", 1)),
        ("order.paid", _field("activity.attributes.amount", "gte", 5000)),
        ("order.paid", _field("activity.attributes.items.category", "contains", "wine")),
        ("cpd.recorded", _field("activity.attributes.cpd_hours", "gt", 0)),
        ("booking.cancelled", _field("activity.attributes.channel", "eq", "app")),
        ("review.posted", _field("activity.attributes.tags", "contains_any", ["photo", "video"])),
        ("referral.joined", _field("activity.attributes.location", "ne", "test")),
        ("booking.completed", _field("activity.attributes.category", "eq", "golf")),
    ]
    rules = []
    for n in range(count):
        activity_type, condition = kinds[n % len(kinds)]
        rules.append(
            {
                "name": f"Rule {n + 1}: {activity_type}",
                "priority": n % 10,
                "conditions": _on(activity_type, condition),
                "effect": {"type": "fixed_points", "points": 10 + n},
                "caps": {"per_member_per_month": {"awards": 10}},
            }
        )
    return rules


async def create_rules(base_url: str, key: str, count: int) -> int:
    """`count` active rules; how many of them a bench booking meets."""
    applying = applying_rules()
    bodies = applying + other_rules(count - len(applying))
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as client:
        for body in bodies:
            response = await client.post("/api/v1/earning-rules", json=body)
            if response.status_code != 201:
                raise RuntimeError(f"rule: {response.status_code} {response.text[:500]}")
    return len(applying)


# -- the operations ---------------------------------------------------------------------------


def activity_body(member: str, source_id: str) -> dict[str, Any]:
    return {
        "type": "booking.completed",
        "occurred_at": (utcnow() - timedelta(seconds=1)).isoformat(),
        "source": "bench",
        "source_id": source_id,
        "member_id": member,
        "attributes": {"amount": AMOUNT, "currency": CURRENCY, "category": "spa"},
    }


def earn_body(member: str, reference_id: str) -> dict[str, Any]:
    return {
        "member_id": member,
        "amount": AMOUNT,
        "currency": CURRENCY,
        "reference_id": reference_id,
    }


def http_posts(
    pool: LeanPool,
    path: str,
    body: Callable[[str, str], dict[str, Any]],
    members: list[str],
    clients: int,
    tag: str,
) -> Operation:
    """POSTs of `body(member, reference)` to `path`, to distinct members, each expecting 201."""

    async def one(worker: int, n: int) -> None:
        member = members[(n * clients + worker) % len(members)]
        status, content = await pool.post_json(worker, path, body(member, f"{tag}-{worker}-{n}"))
        if status != 201:
            raise RuntimeError(f"POST {path}: {status} {content[:500]!r}")

    return one


def http_activity(pool: LeanPool, members: list[str], clients: int, tag: str) -> Operation:
    return http_posts(pool, "/api/v1/activities", activity_body, members, clients, tag)


def http_earn(pool: LeanPool, members: list[str], clients: int, tag: str) -> Operation:
    return http_posts(pool, "/api/v1/points/earn", earn_body, members, clients, tag)


async def count_statements(url: str, key: str, member: str) -> dict[str, int]:
    """Round trips of one activity and one earn, in-process (BEGIN/COMMIT included), after
    a first of each has filled the caches, as on a running server."""
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
    engine = app.state.db.request_engine.sync_engine
    event.listen(engine, "before_cursor_execute", lambda *args: sent.append("statement"))
    for name in ("begin", "commit", "rollback"):
        event.listen(engine, name, lambda *args, name=name: sent.append(name))
    counts: dict[str, int] = {}
    headers = {"Authorization": f"Bearer {key}"}
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench", headers=headers
        ) as client:
            for label, path, body in (
                ("activity", "/api/v1/activities", activity_body),
                ("earn", "/api/v1/points/earn", earn_body),
            ):
                for _ in range(2):  # the first warms the caches
                    sent.clear()
                    response = await client.post(path, json=body(member, uuid.uuid4().hex))
                    assert response.status_code == 201, response.text
                counts[label] = len(sent)
                if label == "activity":
                    credits = response.json()["activity"]["credits"]
                    counts["credits"] = len(credits)
    finally:
        await app.state.db.dispose()
        shutil.rmtree(data_dir, ignore_errors=True)
    return counts


# -- rounds ----------------------------------------------------------------------------------


async def run_rounds(url: str, key: str, args: argparse.Namespace) -> tuple[Samples, int]:
    seeded = await seed(url, args.members)
    members = seeded.public_ids
    samples = Samples()
    clients, seconds = args.clients, args.seconds
    with memberhub_serve(url) as base_url:
        applying = await create_rules(base_url, key, args.rules)
        pool = LeanPool(base_url, {"Authorization": f"Bearer {key}"}, clients)
        try:
            # Warm both: connections open, caches (rules, program) filled.
            await for_seconds(
                http_activity(pool, members, clients, "warm"), clients, min(seconds, 0.5)
            )
            await for_seconds(http_earn(pool, members, clients, "warm"), clients, min(seconds, 0.5))
            for round_number in range(args.rounds):
                tag = f"r{round_number}"
                activity = http_activity(pool, members, clients, tag)
                earn = http_earn(pool, members, clients, tag)

                async def activity_side(activity: Operation = activity) -> None:
                    samples.add("activity", await for_seconds(activity, clients, seconds))

                async def earn_side(earn: Operation = earn) -> None:
                    samples.add("earn", await for_seconds(earn, clients, seconds))

                first, second = (
                    (activity_side, earn_side)
                    if round_number % 2 == 0
                    else (earn_side, activity_side)
                )
                await first()
                await second()
        finally:
            await pool.close()
    return samples, applying


def report(
    backend: str, samples: Samples, statements: dict[str, int], rules: int, applying: int
) -> str:
    activities, earns = samples.median("activity"), samples.median("earn")
    assert activities is not None
    assert earns is not None
    return (
        f"{backend:<10} activity http {activities:8.1f}/s  earn http {earns:8.1f}/s"
        f"  ratio {activities / earns:.3f}  rules {rules} ({applying} on bookings,"
        f" {statements['credits']} credited)"
        f"  statements {statements['activity']} vs {statements['earn']}"
    )


def bench_backend(backend: str, scratch: Scratch, args: argparse.Namespace) -> str:
    url = scratch.new("activities")
    key = asyncio.run(issue_admin_key(url))
    samples, applying = asyncio.run(run_rounds(url, key, args))
    counted = asyncio.run(seed(url, 1)).public_ids[0]
    statements = asyncio.run(count_statements(url, key, counted))
    return report(backend, samples, statements, args.rules, applying)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short rounds, to check it runs")
    parser.add_argument("--rounds", type=int, help="rounds per side (default 6; quick: 1)")
    parser.add_argument("--seconds", type=float, help="seconds per side (default 5; quick: 0.25)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--members", type=int, default=MEMBERS)
    parser.add_argument("--rules", type=int, default=RULES)
    parser.add_argument(
        "--backend", choices=("all", "sqlite", "postgresql"), default="all", help="default: all"
    )
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 6)
    args.seconds = args.seconds or (0.25 if args.quick else 5.0)
    if args.quick:
        args.members = min(args.members, 200)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    explicit_pg = os.environ.get("MEMBERHUB_BENCH_POSTGRES_URL")
    pg_url = explicit_pg or DEFAULT_POSTGRES_URL
    print(
        f"activities: POST /activities through {args.rules} earning rules vs POST /points/earn,"
        f" both through memberhub serve, {args.clients} clients, median of {args.rounds} rounds"
        f" x {args.seconds:g} s per side, interleaved; goal ratio >= 0.7;"
        f" load average {os.getloadavg()[0]:.2f}",
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
            print(bench_backend(backend, scratch, args), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
