"""A `memberhub worker` process killed with SIGKILL in the middle of booking twenty
checkouts, with a fifth of Xero's answers 500 or 429: a second worker finishes the work,
and Xero holds exactly twenty contacts, invoices and payments."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select, update

from memberhub.finance.models import EntryStatus, FinanceEntry
from memberhub.integrations.inbound import process_inbound
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from tests.conftest import TEST_SECRET_KEY
from tests.fakes.xero import FakeXero
from tests.finance.conftest import checkout_event, connected_xero
from tests.integrations.conftest import create_stripe_integration, send
from tests.support import ApiClient

MEMBERHUB = str(Path(sys.executable).with_name("memberhub"))
# Enough that the kill lands mid-run with work on both sides of it; each booking waits out
# the real retry backoffs of its faulted calls, so more only makes the test slower.
CHECKOUTS = 20


@pytest.fixture
def worker_env(database_url: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERHUB_")}
    env.update(
        MEMBERHUB_DATABASE_URL=database_url,
        MEMBERHUB_DATA_DIR=str(tmp_path / "data"),
        MEMBERHUB_SECRET_KEY=TEST_SECRET_KEY,
        MEMBERHUB_LOG_LEVEL="WARNING",
        MEMBERHUB_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",
        MEMBERHUB_WEBHOOK_ALLOW_HTTP="true",
        MEMBERHUB_WORKER_INTERVAL_SECONDS="0.2",
    )
    return env


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def start_worker(env: dict[str, str], started: list[subprocess.Popen[bytes]]) -> None:
    started.append(
        subprocess.Popen(
            [MEMBERHUB, "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    )


async def wait_for(check: Callable[[], Awaitable[bool]], *, seconds: int, message: str) -> None:
    for _ in range(seconds * 10):
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(message)


async def count_done(db: Database) -> int:
    async with db.transaction(read_only=True) as session:
        return int(
            await session.scalar(
                select(func.count()).where(FinanceEntry.status == EntryStatus.DONE)
            )
            or 0
        )


async def test_a_worker_killed_mid_run_books_nothing_twice_and_nothing_is_lost(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    xero: FakeXero,
    worker_env: dict[str, str],
    workers: list[subprocess.Popen[bytes]],
) -> None:
    plan = await api.create_plan(price_amount=1800, currency="GBP")
    stripe = await create_stripe_integration(api)
    await connected_xero(api, http, xero, plan)
    members = [await api.create_member() for _ in range(CHECKOUTS)]
    for member in members:
        assert (await send(http, stripe["id"], checkout_event(member, plan))).status_code == 200
    # The payments are applied (and their finance entries written); Xero is not called yet.
    assert await process_inbound(db, utcnow()) == CHECKOUTS
    xero.set_faults(0.2, retry_after=0)
    xero.latency = 0.01

    start_worker(worker_env, workers)

    async def some_booked() -> bool:
        return len(xero.payments) >= CHECKOUTS // 4

    await wait_for(some_booked, seconds=120, message="the first worker booked nothing")
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait(timeout=10)
    assert len(xero.payments) < CHECKOUTS, "the first worker finished before it was killed"

    # The dead worker's claim holds an entry for its lease (five minutes); let it run out.
    async with db.transaction() as session:
        await session.execute(
            update(FinanceEntry)
            .where(FinanceEntry.status == EntryStatus.PENDING)
            .values(next_attempt_at=utcnow())
        )
    start_worker(worker_env, workers)

    async def all_booked() -> bool:
        return await count_done(db) == CHECKOUTS

    await wait_for(all_booked, seconds=240, message="not every checkout was booked")
    assert len(xero.contacts) == CHECKOUTS
    assert len(xero.invoices) == CHECKOUTS
    assert len(xero.payments) == CHECKOUTS
    assert {i["Status"] for i in xero.invoices} == {"PAID"}
    assert xero.count("POST", "/api.xro/2.0/", status=500) > 0
