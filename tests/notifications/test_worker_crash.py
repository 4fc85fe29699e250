"""A `memberhub worker` process killed with SIGKILL while sending loses no notification and
sends none twice, apart from the attempts in flight when it died."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.notifications.models import Notification
from memberhub.notifications.planning import LinkSettings, plan_notifications
from memberhub.settings import Settings
from tests.fakes.smtp_server import SmtpServer
from tests.support import ApiClient

MEMBERHUB = str(Path(sys.executable).with_name("memberhub"))
# Enough that the kill lands mid-run, well after the first rounds and well before the last.
NOTIFICATIONS = 200
CONCURRENCY = 4


@pytest.fixture
def worker_env(database_url: str, tmp_path: Path, db: Database) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERHUB_")}
    env.update(
        MEMBERHUB_DATABASE_URL=database_url,
        MEMBERHUB_DATA_DIR=str(tmp_path / "data"),
        MEMBERHUB_SECRET_KEY="test-secret-key-not-for-production",
        MEMBERHUB_LOG_LEVEL="WARNING",
        MEMBERHUB_WORKER_INTERVAL_SECONDS="0.2",
        MEMBERHUB_WEBHOOK_POLL_SECONDS="0.05",
        # A dead worker's claims are sent by the next one two seconds after they were made.
        MEMBERHUB_NOTIFICATION_LEASE_SECONDS="2",
        MEMBERHUB_NOTIFICATION_CONCURRENCY=str(CONCURRENCY),
        # The test's SMTP server is on loopback, which the outbound policy must allow.
        MEMBERHUB_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",
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


async def test_a_worker_killed_while_sending_loses_none_and_repeats_only_those_in_flight(
    api: ApiClient,
    db: Database,
    settings: Settings,
    smtp: SmtpServer,
    mail: dict[str, Any],
    worker_env: dict[str, str],
    workers: list[subprocess.Popen[bytes]],
) -> None:
    for number in range(NOTIFICATIONS):
        await api.create_member(email=f"member{number}@example.com", consent={"email": True})
    links = LinkSettings(public_url=settings.public_url, secret=settings.resolved_secret_key)
    assert await plan_notifications(db, utcnow(), links) == NOTIFICATIONS
    async with db.transaction(read_only=True) as session:
        expected = set(await session.scalars(select(Notification.public_id)))
    assert len(expected) == NOTIFICATIONS

    start_worker(worker_env, workers)
    await smtp.wait_for(lambda: len(smtp.received()) >= NOTIFICATIONS * 3 // 10, timeout=120)
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait(timeout=10)
    before = Counter(m.reference for m in smtp.received())
    assert sum(before.values()) < NOTIFICATIONS, "the worker finished before it was killed"

    start_worker(worker_env, workers)
    await smtp.wait_for(
        lambda: {m.reference for m in smtp.received()} >= expected,
        timeout=180,
        message="not every notification was sent after the restart",
    )
    # A message can arrive a moment before its worker records it as sent: poll, each look in
    # a transaction of its own (a new snapshot).
    for _ in range(100):
        async with db.transaction(read_only=True) as session:
            unsent = await session.scalar(select(func.count()).where(Notification.status != "sent"))
        if not unsent:
            break
        await asyncio.sleep(0.1)
    assert unsent == 0

    counts = Counter(m.reference for m in smtp.received())
    assert set(counts) == expected
    repeated = [reference for reference, times in counts.items() if times > 1]
    # Only a round in flight at the kill can go out again: sent, not yet recorded.
    assert len(repeated) <= CONCURRENCY, repeated
    assert all(times == 2 for reference, times in counts.items() if reference in repeated)
