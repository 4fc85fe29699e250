"""The election of one embedded worker among the processes of `memberhub serve`."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from memberhub.worker import election


class _Candidate:
    """One process's part in the election: runs `run_when_elected` until its stop."""

    def __init__(self, data_dir: Path) -> None:
        self.stop = asyncio.Event()
        self.running = asyncio.Event()
        self.task = asyncio.create_task(
            election.run_when_elected(data_dir, self._run, self.stop, retry_seconds=0.01)
        )

    async def _run(self, stop: asyncio.Event) -> None:
        self.running.set()
        await stop.wait()


@pytest.fixture(autouse=True)
def _not_standing_down(monkeypatch: pytest.MonkeyPatch) -> None:
    # The flag is the process's: each test starts as a process that was never told to stop.
    monkeypatch.setattr(election, "_standing_down", threading.Event())


async def _holder_and_standby(data_dir: Path) -> tuple[_Candidate, _Candidate]:
    holder = _Candidate(data_dir)
    await asyncio.wait_for(holder.running.wait(), timeout=5)
    standby = _Candidate(data_dir)
    # Several tries at the lock, every one refused.
    for _ in range(5):
        await asyncio.sleep(0.01)
    assert not standby.running.is_set()
    return holder, standby


async def test_a_standby_takes_the_worker_over_when_its_holder_exits(tmp_path: Path) -> None:
    holder, standby = await _holder_and_standby(tmp_path)
    holder.stop.set()
    await asyncio.wait_for(holder.task, timeout=5)
    await asyncio.wait_for(standby.running.wait(), timeout=5)
    standby.stop.set()
    await asyncio.wait_for(standby.task, timeout=5)


async def test_a_process_told_to_stop_never_takes_the_worker_over(tmp_path: Path) -> None:
    holder, standby = await _holder_and_standby(tmp_path)
    # The service stops: every process is told at once, and the holder releases the lock
    # before the standby's own shutdown has come to stopping its election.
    election.stand_down()
    holder.stop.set()
    await asyncio.wait_for(holder.task, timeout=5)
    await asyncio.wait_for(standby.task, timeout=5)
    assert not standby.running.is_set()
