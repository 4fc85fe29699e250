"""`memberhub worker` processes delivering: killed mid-run, and two side by side."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import distinct, func, select

from memberhub.kit.db import Database
from memberhub.webhooks.models import WebhookAttempt
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.support import ApiClient
from tests.webhooks.conftest import create_endpoint, emit_alerts

MEMBERHUB = str(Path(sys.executable).with_name("memberhub"))


@pytest.fixture
def worker_env(database_url: str, tmp_path: Path, db: Database) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERHUB_")}
    env.update(
        MEMBERHUB_DATABASE_URL=database_url,
        MEMBERHUB_DATA_DIR=str(tmp_path / "data"),
        MEMBERHUB_SECRET_KEY="test-secret-key-not-for-production",
        MEMBERHUB_LOG_LEVEL="WARNING",
        MEMBERHUB_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",
        MEMBERHUB_WEBHOOK_ALLOW_HTTP="true",
        MEMBERHUB_WEBHOOK_POLL_SECONDS="0.05",
        # A dead worker's claims are taken over after 2 + 5 seconds.
        MEMBERHUB_WEBHOOK_TIMEOUT_SECONDS="2",
        MEMBERHUB_WEBHOOK_LEASE_SECONDS="1",
    )
    return env


@pytest.fixture
def workers(worker_env: dict[str, str]) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def start_worker(env: dict[str, str], started: list[subprocess.Popen[bytes]]) -> None:
    process = subprocess.Popen(
        [MEMBERHUB, "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    started.append(process)


async def test_a_worker_killed_mid_run_loses_nothing(
    api: ApiClient,
    db: Database,
    receiver: WebhookReceiver,
    worker_env: dict[str, str],
    workers: list[subprocess.Popen[bytes]],
) -> None:
    endpoint = await create_endpoint(api, receiver.url("crash"))
    receiver.set_secrets("crash", endpoint["secret"])
    # Enough that the kill lands with deliveries on both sides of it.
    sent = await emit_alerts(db, 400)

    start_worker(worker_env, workers)
    await receiver.wait_for(lambda: len(receiver.received("crash")) >= 150, timeout=60)
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait(timeout=10)
    delivered_before = len(set(receiver.successful_ids("crash")))
    assert delivered_before < len(sent), "the first worker finished before it was killed"

    start_worker(worker_env, workers)
    await receiver.wait_for(
        lambda: set(receiver.successful_ids("crash")) >= set(sent),
        timeout=120,
        message="not every event reached the receiver after the restart",
    )

    received = receiver.received("crash")
    assert {r.webhook_id for r in received} == set(sent)
    assert all(r.verified for r in received)


async def test_two_workers_share_the_work_without_delivering_twice(
    api: ApiClient,
    db: Database,
    receiver: WebhookReceiver,
    worker_env: dict[str, str],
    workers: list[subprocess.Popen[bytes]],
    is_postgres: bool,
) -> None:
    if not is_postgres:
        pytest.skip("several workers share deliveries on PostgreSQL (SKIP LOCKED)")
    await create_endpoint(api, receiver.url("shared"))
    # Enough that both workers claim many batches while the other holds some.
    sent = await emit_alerts(db, 3_000)

    start_worker(worker_env, workers)
    start_worker(worker_env, workers)
    await receiver.wait_for(
        lambda: len(receiver.received("shared")) >= len(sent),
        timeout=240,
        message="not every event was delivered",
    )

    assert all(process.poll() is None for process in workers), "a worker died"
    counts = Counter(r.webhook_id for r in receiver.received("shared"))
    assert set(counts) == set(sent)
    assert [event for event, n in counts.items() if n > 1] == []
    # Both workers took part.
    async with db.transaction() as session:
        per_worker = await session.scalar(select(func.count(distinct(WebhookAttempt.worker))))
    assert per_worker == 2
