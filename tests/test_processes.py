"""The service as an operator runs it: `memberhub serve` and `memberhub worker` processes."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import select

from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.worker.models import WorkerHeartbeat
from tests.ops.exposition import pids, sample_value, sample_values

MEMBERHUB = str(Path(sys.executable).with_name("memberhub"))


@functools.cache
def _client() -> httpx.Client:
    """One client for every request of these tests: `httpx.get` builds a client, and with it
    a TLS context from the CA bundle (tens of milliseconds of CPU, taken from the service
    starting beside it), on every call. Without keep-alive, each request opens a connection
    of its own, which the kernel hands to either `serve` process."""
    return httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), trust_env=False)


def _get(url: str, **kwargs: Any) -> httpx.Response:
    return _client().get(url, **kwargs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Service(subprocess.Popen[bytes]):
    """A `memberhub` process whose output goes to a file, never to a pipe: a pipe nobody
    reads fills after 64 KiB of request logs, and the service then stops answering."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        # Open as long as the process object lives: read after the process has exited.
        self.output = tempfile.TemporaryFile()  # noqa: SIM115
        super().__init__([MEMBERHUB, *args], env=env, stdout=self.output, stderr=subprocess.STDOUT)

    def logged(self) -> str:
        """Everything the process has written so far (stdout and stderr, interleaved)."""
        self.output.seek(0)
        return self.output.read().decode(errors="replace")


def _start(args: list[str], env: dict[str, str]) -> _Service:
    return _Service(args, env)


def _stop(process: _Service) -> tuple[int, str]:
    """SIGTERM, as a service manager stops it; the exit code and what it logged."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, process.logged()


def _wait_for_health(base: str, process: _Service) -> None:
    # Generous: a fully loaded two-core machine can take that long to start two processes.
    deadline = time.monotonic() + 90
    while True:
        try:
            if _get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=20)
            pytest.fail(f"memberhub serve did not come up: {process.logged()[-2000:]}")
        time.sleep(0.1)


@pytest.fixture
def server(process_env: dict[str, str]) -> Iterator[str]:
    port = _free_port()
    process = _start(["serve", "--host", "127.0.0.1", "--port", str(port)], process_env)
    base = f"http://127.0.0.1:{port}"
    _wait_for_health(base, process)
    yield base
    exit_code, log = _stop(process)
    # uvicorn re-raises the signal after a graceful shutdown; the lifespan must have run.
    assert exit_code in (0, -signal.SIGTERM)
    assert '"worker_stopped"' in log


def _worker_heartbeat_age(base: str) -> float | None:
    age = _get(f"{base}/health", timeout=5).json()["worker"]["heartbeat_age_seconds"]
    return None if age is None else float(age)


def test_serve_answers_health_and_runs_the_embedded_worker(server: str) -> None:
    deadline = time.monotonic() + 15
    while _worker_heartbeat_age(server) is None:
        assert time.monotonic() < deadline, "the embedded worker never wrote a heartbeat"
        time.sleep(0.2)
    health = _get(f"{server}/health", timeout=5).json()
    assert health["status"] == "ok"
    assert health["worker"]["embedded"] is True
    assert _get(f"{server}/api/v1/members", timeout=5).status_code == 401


def _heartbeat_ids(database_url: str) -> set[str]:
    async def read() -> set[str]:
        db = Database(database_url, pool_size=1)
        try:
            async with db.transaction(read_only=True) as session:
                return set((await session.scalars(select(WorkerHeartbeat.worker_id))).all())
        finally:
            await db.dispose()

    return asyncio.run(read())


def test_worker_process_beats_and_stops_cleanly_on_sigterm(
    process_env: dict[str, str], database_url: str
) -> None:
    worker = _start(["worker"], process_env)
    deadline = time.monotonic() + 15
    while not any(w.endswith(f":{worker.pid}") for w in _heartbeat_ids(database_url)):
        if worker.poll() is not None or time.monotonic() > deadline:
            worker.kill()
            worker.wait(timeout=20)
            pytest.fail(f"the worker never wrote a heartbeat: {worker.logged()[-2000:]}")
        time.sleep(0.2)
    exit_code, log = _stop(worker)
    assert exit_code == 0
    assert '"worker_stopped"' in log


def test_secret_key_is_generated_once_into_the_data_dir(tmp_path: Path) -> None:
    first = Settings(data_dir=tmp_path, secret_key=None).resolved_secret_key
    key_file = tmp_path / "secret_key"
    assert key_file.read_text() == first
    assert key_file.stat().st_mode & 0o077 == 0
    assert Settings(data_dir=tmp_path, secret_key=None).resolved_secret_key == first
    assert Settings(data_dir=tmp_path, secret_key="configured").resolved_secret_key == "configured"


def test_serve_with_two_processes_runs_one_worker_and_shares_changes_at_once(
    process_env: dict[str, str], database_url: str, admin_key: str
) -> None:
    port = _free_port()
    process = _start(
        ["serve", "--host", "127.0.0.1", "--port", str(port), "--processes", "2"], process_env
    )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {admin_key}"}
    try:
        _wait_for_health(base, process)
        # One process wins the worker lock; the other stands by.
        deadline = time.monotonic() + 15
        while not _heartbeat_ids(database_url):
            assert time.monotonic() < deadline, "no process ran the embedded worker"
            time.sleep(0.2)
        # A change answered by one process is what the next request sees, whichever process
        # takes it (a new connection each time, so both processes answer some).
        for earn_points in range(2, 12):
            with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
                changed = client.patch("/api/v1/program", json={"earn_points": earn_points})
                assert changed.status_code == 200, changed.text
            with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
                assert client.get("/api/v1/program").json()["earn_points"] == earn_points
        # Events written through either process are sequenced by the one worker.
        with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
            for n in range(6):
                created = client.post("/api/v1/members", json={"email": f"p{n}@example.com"})
                assert created.status_code == 201, created.text
            deadline = time.monotonic() + 10
            while True:
                feed = client.get("/api/v1/events", params={"type": "member.created"}).json()
                if len(feed["data"]) == 6:
                    break
                assert time.monotonic() < deadline, feed
                time.sleep(0.1)
    finally:
        exit_code, log = _stop(process)
    assert exit_code in (0, -signal.SIGTERM)
    assert len(_heartbeat_ids(database_url)) == 1
    assert log.count('"worker_started"') == 1
    assert '"worker_standby"' in log


def _answered_by_process(metrics_dir: Path, route: str) -> dict[str, float]:
    """Requests to `route` each process has answered, read from its own file."""
    return {
        path.stem.removeprefix("counter_"): sum(
            sample.value
            for family in MultiProcessCollector.merge([str(path)])
            for sample in family.samples
            if sample.name == "memberhub_http_requests_total" and sample.labels["route"] == route
        )
        for path in metrics_dir.glob("counter_*.db")
    }


def _both_answered(metrics_dir: Path, route: str, *, at_least: int) -> bool:
    answered = _answered_by_process(metrics_dir, route).values()
    return len([count for count in answered if count >= at_least]) == 2


def test_metrics_of_serve_with_two_processes_count_the_requests_of_both(
    process_env: dict[str, str], admin_key: str, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    # A file of an earlier run, which serve must clear.
    (metrics_dir / "counter_1.db").write_bytes(b"stale")
    port = _free_port()
    process = _start(
        ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        {**process_env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
    )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {admin_key}"}
    program = {"method": "GET", "route": "/api/v1/program", "status": "200"}
    scrapes: list[str] = []

    def scrape() -> str:
        response = _get(f"{base}/metrics", timeout=10)
        assert response.status_code == 200, response.text
        scrapes.append(response.text)
        return response.text

    try:
        _wait_for_health(base, process)
        # A new connection each time; the kernel hands each to either process: go on until
        # both have answered some.
        sent = 0
        while sent < 20 or not _both_answered(metrics_dir, "/api/v1/program", at_least=1):
            assert sent < 500, "one process answered every request"
            response = _get(f"{base}/api/v1/program", headers=headers, timeout=10)
            assert response.status_code == 200, response.text
            sent += 1
        # The last request is counted once its response has gone: wait for that, once.
        deadline = time.monotonic() + 5
        while sample_values(scrape(), "memberhub_http_requests_total", **program) != [sent]:
            assert time.monotonic() < deadline, scrapes[-1]
            time.sleep(0.05)
        counted_from = len(scrapes) - 1
        # Scrapes answered by both processes.
        while len(scrapes) < 8 or not _both_answered(metrics_dir, "/metrics", at_least=2):
            assert len(scrapes) < 500, "one process answered every scrape"
            scrape()
        # The embedded worker's jobs, run by one process, are reported by either.
        deadline = time.monotonic() + 15
        while not sample_values(scrape(), "memberhub_job_runs_total", outcome="success"):
            assert time.monotonic() < deadline, "no job run reported"
            time.sleep(0.1)
    finally:
        exit_code, _ = _stop(process)
    assert exit_code in (0, -signal.SIGTERM)

    for scraped_before, text in enumerate(scrapes[counted_from:], start=counted_from):
        assert sample_value(text, "memberhub_http_requests_total", **program) == sent
        # A scrape is counted once answered: the one just before may not be yet.
        metrics = {"method": "GET", "route": "/metrics", "status": "200"}
        scrapes_counted = sum(sample_values(text, "memberhub_http_requests_total", **metrics))
        assert scraped_before - 1 <= scrapes_counted <= scraped_before
        assert sample_value(text, "memberhub_processes") == 2
        assert len(pids(text, "memberhub_process_cpu_seconds_total")) == 2
        assert len(pids(text, "memberhub_process_resident_memory_bytes")) == 2
        assert len(pids(text, "memberhub_process_open_fds")) == 2
        assert sample_value(text, "memberhub_db_pool_size", pool="main") > 0
        assert sample_values(text, "memberhub_db_pool_checked_out", pool="main")


async def _requests_on_connections_opened_at_once(
    base: str, headers: dict[str, str], *, connections: int, requests: int
) -> None:
    """`connections` keep-alive connections, opened together (as a pool or a proxy opens
    them), each then sending `requests` requests one after another."""
    clients = [
        httpx.AsyncClient(
            base_url=base,
            headers=headers,
            timeout=10,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )
        for _ in range(connections)
    ]

    async def requests_on(client: httpx.AsyncClient) -> None:
        for _ in range(requests):
            response = await client.get("/api/v1/program")
            assert response.status_code == 200, response.text

    try:
        await asyncio.gather(*(requests_on(client) for client in clients))
    finally:
        for client in clients:
            await client.aclose()


def test_serve_hands_connections_opened_at_once_evenly_to_its_processes(
    process_env: dict[str, str], admin_key: str, tmp_path: Path
) -> None:
    """With one shared listening socket, the first process to wake takes every connection
    waiting; here each of the two serves half of eight connections opened together."""
    metrics_dir = tmp_path / "metrics"
    port = _free_port()
    process = _start(
        ["serve", "--host", "127.0.0.1", "--port", str(port), "--processes", "2"],
        {
            **process_env,
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "MEMBERHUB_LOG_LEVEL": "WARNING",
        },
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(base, process)
        # Until both processes are serving (the first may start well before the second).
        deadline = time.monotonic() + 30
        while not _both_answered(metrics_dir, "/health", at_least=1):
            assert time.monotonic() < deadline, "the second process did not start"
            assert _get(f"{base}/health", timeout=10).status_code == 200
        headers = {"Authorization": f"Bearer {admin_key}"}
        asyncio.run(
            _requests_on_connections_opened_at_once(base, headers, connections=8, requests=10)
        )
        # Counted once each response has gone: wait for the last few.
        deadline = time.monotonic() + 5
        while True:
            answered = _answered_by_process(metrics_dir, "/api/v1/program")
            if sum(answered.values()) >= 80:
                break
            assert time.monotonic() < deadline, answered
            time.sleep(0.05)
    finally:
        exit_code, log = _stop(process)
    assert exit_code == 0, log[-2000:]
    assert sorted(answered.values()) == [40, 40], answered


def test_serve_starts_a_process_again_when_one_dies(
    process_env: dict[str, str], admin_key: str
) -> None:
    port = _free_port()
    process = _start(
        ["serve", "--host", "127.0.0.1", "--port", str(port), "--processes", "2"],
        {**process_env, "MEMBERHUB_LOG_LEVEL": "WARNING"},
    )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {admin_key}"}
    try:
        _wait_for_health(base, process)
        children = _children(process.pid)
        assert len(children) == 2, children
        os.kill(children[0], signal.SIGKILL)
        # Once the parent has seen it go (a connection handed to it as it died is lost with
        # it), the other process answers, and a new one takes the dead one's place.
        deadline = time.monotonic() + 30
        while children[0] in _children(process.pid):
            assert time.monotonic() < deadline, "the dead process was not reaped"
            time.sleep(0.05)
        while True:
            response = _get(f"{base}/api/v1/program", headers=headers, timeout=10)
            assert response.status_code == 200, response.text
            now = _children(process.pid)
            if len(now) == 2 and children[0] not in now:
                break
            assert time.monotonic() < deadline, now
            time.sleep(0.1)
        # Connections go to the new process too.
        asyncio.run(
            _requests_on_connections_opened_at_once(base, headers, connections=4, requests=2)
        )
    finally:
        exit_code, log = _stop(process)
    assert exit_code == 0
    assert '"api_process_died"' in log


def _children(pid: int) -> list[int]:
    """The API processes of a `serve`: the children of the fork server it starts them from
    (multiprocessing's resource tracker, its other child, is not one)."""
    found = []
    for child in _direct_children(pid):
        if b"forkserver" in Path(f"/proc/{child}/cmdline").read_bytes():
            found.extend(_direct_children(child))
    return sorted(found)


def _direct_children(pid: int) -> list[int]:
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]
