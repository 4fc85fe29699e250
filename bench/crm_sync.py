"""Requests a CRM sync makes, against the least its vendor's batch size allows.

For each CRM (HubSpot, Salesforce, Pipedrive and a custom REST CRM), against its stateful
fake from `tests/fakes` (served by uvicorn in a thread of this process) and a fresh
database with N members:

1. full push to an empty CRM: requests received by the vendor ÷ ceil(N ÷ batch size), and
   records pushed per second (the push run's wall time, database work included);
2. 1% of the members changed, then a push: requests ÷ ceil(N/100 ÷ batch size);
3. nothing changed, then a push: requests (the least possible is 0).

Batch sizes are the vendors' own limits: HubSpot 100 (batch upsert/update), Salesforce 200
(sObject Collections upsert), Pipedrive and the custom CRM 1 (no batch write). A ratio of
1.00 means no request was wasted. New records must not duplicate what the CRM already has:
HubSpot's upsert matches by email itself; Salesforce's matches only on our id, so each
batch of new records is looked up by email first (one query), and its least is two
requests a batch of new records; Pipedrive and the custom CRM read a listing of their
records once per push (within the 1% rounding for N of a few hundred or more).

Every run must complete with no failed record, and the CRM must end with exactly N
records; otherwise the bench exits 1.

    python -m bench.crm_sync                   # 10,000 members, SQLite
    python -m bench.crm_sync --quick           # a breakage check: small numbers
    python -m bench.crm_sync --members 20000 --backend postgresql
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import update
from tests.crm.conftest import running_crm, seed_members

from bench.common import DEFAULT_POSTGRES_URL, postgres_database, postgres_reachable
from memberhub.auth.principal import Principal
from memberhub.crm import sync
from memberhub.crm.models import SyncRun
from memberhub.integrations import service
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.models import Integration
from memberhub.integrations.schemas import IntegrationCreate
from memberhub.kit.actor import Actor
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.kit.migrate import upgrade_async
from memberhub.members.models import Member
from memberhub.settings import Settings
from memberhub.webhooks.ssrf import UrlPolicy

FULL_MEMBERS = 10_000
QUICK_MEMBERS = 300
PROVIDERS = ("hubspot", "salesforce", "pipedrive", "custom_crm")
BATCH = {"hubspot": 100, "salesforce": 200, "pipedrive": 1, "custom_crm": 1}


@dataclass
class Result:
    provider: str
    members: int
    full_requests: int
    full_seconds: float
    changed: int
    changed_requests: int
    unchanged_requests: int

    def minimum(self, records: int, *, new: bool) -> int:
        batches = math.ceil(records / BATCH[self.provider])
        # A batch of new records is looked up by email before Salesforce's upsert.
        return 2 * batches if new and self.provider == "salesforce" else batches

    def line(self) -> str:
        full_min = self.minimum(self.members, new=True)
        changed_min = self.minimum(self.changed, new=False)
        return (
            f"{self.provider:<11} full push: {self.full_requests:>6} requests / {full_min:>6} "
            f"minimum = {self.full_requests / full_min:.2f}   "
            f"1% changed: {self.changed_requests:>4} / {changed_min:>4} = "
            f"{self.changed_requests / changed_min:.2f}   "
            f"unchanged: {self.unchanged_requests} requests   "
            f"{self.members / self.full_seconds:,.0f} records/s"
        )


@contextlib.contextmanager
def database_url(backend: str, pg_url: str) -> Iterator[str]:
    if backend == "postgresql":
        with postgres_database(pg_url) as url:
            yield url
        return
    with tempfile.TemporaryDirectory(prefix="memberhub-bench-") as directory:
        yield f"sqlite+aiosqlite:///{Path(directory) / 'bench.db'}"


async def push(db: Database, hub: IntegrationHub, integration: Integration) -> SyncRun:
    async with db.transaction() as session:
        run = sync.new_run(
            integration, mode="push", trigger="manual", dry_run=False, requested_by="bench"
        )
        session.add(run)
        await session.flush()
        run_id = run.id
    finished = await sync.execute(db, hub, run_id)
    if finished is None or finished.status != "completed" or finished.failed:
        raise SystemExit(f"the push did not complete cleanly: {finished and finished.error}")
    return finished


async def bench_provider(name: str, members: int, url: str) -> Result:
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
    try:
        async with running_crm(name) as crm:
            body = crm.integration_body(pull=False)
            async with db.transaction() as session:
                integration = await service.create_integration(
                    session,
                    Principal.system(Actor.system("bench")),
                    IntegrationCreate.model_validate(body),
                    box=hub.box,
                    policy=hub.url_policy,
                )
            public_ids = await seed_members(db, members)

            before = crm.fake.count_all()
            started = time.perf_counter()
            await push(db, hub, integration)
            full_seconds = time.perf_counter() - started
            full_requests = crm.fake.count_all() - before
            if len(crm.records()) != members:
                raise SystemExit(f"{name} holds {len(crm.records())} records, not {members}")

            changed = public_ids[::100]
            async with db.transaction() as session:
                await session.execute(
                    update(Member).where(Member.public_id.in_(changed)).values(first_name="Changed")
                )
            before = crm.fake.count_all()
            await push(db, hub, integration)
            changed_requests = crm.fake.count_all() - before

            before = crm.fake.count_all()
            await push(db, hub, integration)
            unchanged_requests = crm.fake.count_all() - before
    finally:
        await hub.aclose()
        await db.dispose()
    return Result(
        name,
        members,
        full_requests,
        full_seconds,
        len(changed),
        changed_requests,
        unchanged_requests,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_MEMBERS} members, to check it runs"
    )
    parser.add_argument("--members", type=int, help=f"members (default {FULL_MEMBERS})")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--provider", choices=PROVIDERS, action="append")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    members = args.members or (QUICK_MEMBERS if args.quick else FULL_MEMBERS)
    if args.backend == "postgresql" and (problem := postgres_reachable(args.postgres_url)):
        print(f"PostgreSQL is not reachable: {problem}", file=sys.stderr)
        return 1
    print(f"CRM sync of {members:,} members ({args.backend}); requests ÷ the least possible")
    for name in args.provider or PROVIDERS:
        with database_url(args.backend, args.postgres_url) as url:
            result = asyncio.run(bench_provider(name, members, url))
        print(result.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
