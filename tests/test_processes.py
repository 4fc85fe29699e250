"""The service as an operator runs it: `memberhub serve` and `memberhub worker` processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.worker.models import WorkerHeartbeat

MEMBERHUB = str(Path(sys.executable).with_name("memberhub"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def process_env(database_url: str, tmp_path: Path, db: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERHUB_")}
    env.update(
        MEMBERHUB_DATABASE_URL=database_url,
        MEMBERHUB_DATA_DIR=str(tmp_path / "data"),
        MEMBERHUB_WORKER_INTERVAL_SECONDS="0.2",
        MEMBERHUB_LOG_LEVEL="INFO",
    )
    return env


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [MEMBERHUB, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _stop(process: subprocess.Popen[bytes]) -> tuple[int, str]:
    """SIGTERM, as a service manager stops it; the exit code and what it logged."""
    process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, stderr.decode()


@pytest.fixture
def server(process_env: dict[str, str]) -> Iterator[str]:
    port = _free_port()
    process = _start(["serve", "--host", "127.0.0.1", "--port", str(port)], process_env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            _, stderr = process.communicate(timeout=5)
            pytest.fail(f"memberhub serve did not come up: {stderr.decode()[-2000:]}")
        time.sleep(0.1)
    yield base
    exit_code, log = _stop(process)
    # uvicorn re-raises the signal after a graceful shutdown; the lifespan must have run.
    assert exit_code in (0, -signal.SIGTERM)
    assert '"worker_stopped"' in log


def _worker_heartbeat_age(base: str) -> float | None:
    age = httpx.get(f"{base}/health", timeout=5).json()["worker"]["heartbeat_age_seconds"]
    return None if age is None else float(age)


def test_serve_answers_health_and_runs_the_embedded_worker(server: str) -> None:
    deadline = time.monotonic() + 15
    while _worker_heartbeat_age(server) is None:
        assert time.monotonic() < deadline, "the embedded worker never wrote a heartbeat"
        time.sleep(0.2)
    health = httpx.get(f"{server}/health", timeout=5).json()
    assert health["status"] == "ok"
    assert health["worker"]["embedded"] is True
    assert httpx.get(f"{server}/api/v1/members", timeout=5).status_code == 401


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
            pytest.fail(f"the worker never wrote a heartbeat: {worker.communicate()[1]!r}")
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
