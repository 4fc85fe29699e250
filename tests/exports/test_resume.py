"""A `memberhub worker` killed mid-export: the next worker resumes after the last recorded
part, and the export holds every row exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from memberhub.exports.models import ExportRun
from memberhub.kit.db import Database
from tests.conftest import TEST_SECRET_KEY
from tests.exports.conftest import (
    create_local_integration,
    database_rows,
    parquet_rows,
    seed_transactions,
)
from tests.support import ApiClient

MEMBERHUB = str(Path(sys.executable).with_name("memberhub"))
ROWS = 12_000


@pytest.fixture
def worker_env(database_url: str, tmp_path: Path, db: Database) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERHUB_")}
    env.update(
        MEMBERHUB_DATABASE_URL=database_url,
        MEMBERHUB_DATA_DIR=str(tmp_path / "data"),
        MEMBERHUB_SECRET_KEY=TEST_SECRET_KEY,
        MEMBERHUB_LOG_LEVEL="WARNING",
        MEMBERHUB_WORKER_INTERVAL_SECONDS="0.2",
        # Small parts, so the worker is killed between many of them; a dead worker's run
        # is taken over a second after its last part.
        MEMBERHUB_EXPORT_PART_ROWS="300",
        MEMBERHUB_EXPORT_PAGE_ROWS="100",
        MEMBERHUB_EXPORT_LEASE_SECONDS="1",
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


def _start_worker(env: dict[str, str], started: list[subprocess.Popen[bytes]]) -> None:
    started.append(subprocess.Popen([MEMBERHUB, "worker"], env=env, stdout=subprocess.DEVNULL))


async def _run_state(db: Database) -> ExportRun | None:
    async with db.transaction(read_only=True) as session:
        run: ExportRun | None = await session.scalar(select(ExportRun))
        return run


async def _wait_for(db: Database, done: object, within: float) -> ExportRun:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        run = await _run_state(db)
        if run is not None and done(run):  # type: ignore[operator]
            return run
        await asyncio.sleep(0.02)
    raise AssertionError(f"the export did not get there in time: {await _run_state(db)}")


async def test_a_worker_killed_mid_export_is_resumed_without_gaps_or_duplicates(
    api: ApiClient,
    db: Database,
    tmp_path: Path,
    worker_env: dict[str, str],
    workers: list[subprocess.Popen[bytes]],
) -> None:
    await seed_transactions(db, ROWS)
    directory = tmp_path / "warehouse"
    storage = await create_local_integration(api, directory)
    definition = {
        "name": "Ledger",
        "table": "point_transactions",
        "storage_integration_id": storage,
    }
    export = (await api.post("/api/v1/exports", definition)).json()
    assert (await api.post(f"/api/v1/exports/{export['id']}/runs")).status_code == 202

    _start_worker(worker_env, workers)
    killed_at = await _wait_for(db, lambda run: run.parts >= 3, within=60)
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait(timeout=10)
    interrupted = await _run_state(db)
    assert interrupted is not None
    assert interrupted.status == "running"
    assert interrupted.rows < ROWS, "the worker finished before it was killed"

    _start_worker(worker_env, workers)
    finished = await _wait_for(db, lambda run: run.status == "completed", within=90)

    assert killed_at.parts >= 3
    assert (finished.rows, finished.watermark_to) == (ROWS, ROWS)
    assert finished.manifest_key is not None
    manifest = json.loads((directory / finished.manifest_key).read_text())
    listed = [directory / f["key"] for f in manifest["files"]]
    expected = await database_rows(db)
    assert parquet_rows(listed) == expected
    # The folder itself, read as a warehouse would (every file in the layout), holds each
    # row once: the part being written at the kill was written again under its own keys.
    in_layout = sorted((directory / "point_transactions").glob("dt=*/*.parquet"))
    assert sorted(listed) == in_layout
    assert parquet_rows(in_layout) == expected
