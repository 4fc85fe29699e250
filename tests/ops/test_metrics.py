"""Metrics: with several processes, any of them reports the sum of all; the pools, the
processes' resources and the scheduled jobs are reported."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from prometheus_client import values as prometheus_values
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.kit.db import Database
from memberhub.ops.metrics import MULTIPROCESS_ENV, Metrics, multiprocess_directory
from memberhub.worker.runner import Job, Worker
from tests.ops.exposition import pids, sample_value

REQUEST = {"method": "GET", "route": "/api/v1/members", "status": "200"}


@pytest.fixture
def multiprocess_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv(MULTIPROCESS_ENV, str(tmp_path))
    yield tmp_path
    prometheus_values.close_all_multiprocess_files()


def metrics_of_process(pid: int, monkeypatch: pytest.MonkeyPatch) -> Metrics:
    """`Metrics` as process `pid` builds it in multiprocess mode. prometheus_client picks its
    value class when imported; this one keeps values in the files of `pid` (as its own tests
    do), so that one test process stands for several. Record with it before the next."""
    value_class = prometheus_values.MultiProcessValue(lambda: pid)
    monkeypatch.setattr(prometheus_values, "ValueClass", value_class)
    return Metrics()


def test_every_process_reports_the_sum_of_the_processes_writing_to_one_directory(
    multiprocess_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = metrics_of_process(other.pid, monkeypatch)
        for _ in range(2):
            theirs.observe_request("GET", "/api/v1/members", 200, 0.02)
        theirs.observe_job("points.expire", 0.5, succeeded=True)
        ours = metrics_of_process(os.getpid(), monkeypatch)
        for _ in range(3):
            ours.observe_request("GET", "/api/v1/members", 200, 0.02)
        ours.observe_job("points.expire", 0.5, succeeded=False)

        for scraper in (ours, theirs):
            text = scraper.latest().decode()
            assert sample_value(text, "memberhub_http_requests_total", **REQUEST) == 5
            assert sample_value(text, "memberhub_http_request_duration_seconds_count") == 5
            runs = "memberhub_job_runs_total"
            assert sample_value(text, runs, job="points.expire", outcome="success") == 1
            assert sample_value(text, runs, job="points.expire", outcome="failure") == 1
            last_success = "memberhub_job_last_success_timestamp_seconds"
            assert sample_value(text, last_success, job="points.expire") > 0
            assert sample_value(text, "memberhub_processes") == 2
            both = {str(os.getpid()), str(other.pid)}
            assert pids(text, "memberhub_process_resident_memory_bytes") == both
            assert pids(text, "memberhub_process_cpu_seconds_total") == both
    finally:
        other.kill()
        other.wait()

    # Killed, it could not mark itself dead: the next scrape does. Its counts remain.
    text = ours.latest().decode()
    assert sample_value(text, "memberhub_processes") == 1
    assert pids(text, "memberhub_process_resident_memory_bytes") == {str(os.getpid())}
    assert sample_value(text, "memberhub_http_requests_total", **REQUEST) == 5


def test_a_process_leaving_stops_counting_in_the_live_gauges(
    multiprocess_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    leaving = metrics_of_process(os.getppid(), monkeypatch)
    leaving.observe_request("GET", "/api/v1/members", 200, 0.02)
    staying = metrics_of_process(os.getpid(), monkeypatch)
    assert sample_value(staying.latest().decode(), "memberhub_processes") == 2

    leaving.close()

    text = staying.latest().decode()
    assert sample_value(text, "memberhub_processes") == 1
    assert sample_value(text, "memberhub_http_requests_total", **REQUEST) == 1


def test_serve_gives_several_processes_a_new_directory_and_removes_it_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(MULTIPROCESS_ENV, raising=False)
    with multiprocess_directory(processes=1):
        assert MULTIPROCESS_ENV not in os.environ
    with multiprocess_directory(processes=2):
        directory = Path(os.environ[MULTIPROCESS_ENV])
        assert list(directory.iterdir()) == []
    assert MULTIPROCESS_ENV not in os.environ
    assert not directory.exists()


def test_serve_empties_the_directory_it_is_given_of_an_earlier_runs_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MULTIPROCESS_ENV, str(tmp_path))
    (tmp_path / "counter_1234.db").write_bytes(b"an earlier run")
    (tmp_path / "README").write_text("not ours")
    with multiprocess_directory(processes=1):
        assert sorted(path.name for path in tmp_path.iterdir()) == ["README"]
    assert os.environ[MULTIPROCESS_ENV] == str(tmp_path)


async def test_metrics_report_the_database_pools_and_this_process(
    http: httpx.AsyncClient, db: Database
) -> None:
    response = await http.get("/metrics")
    assert response.status_code == 200
    text = response.text

    assert sample_value(text, "memberhub_db_pool_size", pool="main") > 0
    assert sample_value(text, "memberhub_db_pool_checked_out", pool="main") >= 0
    assert sample_value(text, "memberhub_db_pool_overflow", pool="main") >= 0
    if db.is_sqlite:
        assert sample_value(text, "memberhub_db_pool_size", pool="requests") > 0
    assert sample_value(text, "memberhub_processes") == 1
    pid = str(os.getpid())
    assert sample_value(text, "memberhub_process_cpu_seconds_total", pid=pid) > 0
    assert sample_value(text, "memberhub_process_resident_memory_bytes", pid=pid) > 0
    assert sample_value(text, "memberhub_process_open_fds", pid=pid) > 0


async def test_the_worker_counts_job_runs_failures_durations_and_last_success(
    db: Database,
) -> None:
    async def succeeds(_session: AsyncSession, _now: datetime) -> int:
        return 1

    async def fails(_session: AsyncSession, _now: datetime) -> int:
        raise RuntimeError("the job broke")

    metrics = Metrics()
    worker = Worker(db, metrics=metrics)
    worker.jobs = (Job("test.succeeds", 60.0, succeeds), Job("test.fails", 60.0, fails))
    started = time.time()

    for _ in range(2):
        await worker.tick(force=True)

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    runs = "memberhub_job_runs_total"
    assert value(runs, job="test.succeeds", outcome="success") == 2
    assert value(runs, job="test.fails", outcome="failure") == 2
    assert value(runs, job="test.fails", outcome="success") is None
    assert value("memberhub_job_duration_seconds_count", job="test.succeeds") == 2
    assert value("memberhub_job_duration_seconds_count", job="test.fails") == 2
    last_success = value("memberhub_job_last_success_timestamp_seconds", job="test.succeeds")
    assert last_success is not None
    assert last_success >= started
    assert value("memberhub_job_last_success_timestamp_seconds", job="test.fails") is None
