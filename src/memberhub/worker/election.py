"""One embedded worker among the processes of `memberhub serve --processes N`.

The processes share DATA_DIR. Whichever holds an exclusive lock on `worker.lock` there runs
the worker; the others stand by and try again every `retry_seconds`, so when the holder
exits (or is killed: the kernel drops the lock with the process) another takes over. When
the whole service stops, every process is told at once, and one told to stop never takes the
worker over: the holder releasing the lock as it stops is not a failure to recover from.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

log = structlog.get_logger("memberhub.worker")

LOCK_FILE = "worker.lock"
RETRY_SECONDS = 1.0

# Set once this process has been told to stop (see `stand_down`).
_standing_down = threading.Event()


def stand_down() -> None:
    """This process is stopping: from now on it takes no worker lock it does not hold.

    Called from the signal handler, before the process's own shutdown (which is what stops
    `run_when_elected`): a stopping holder can release the lock before a stopping standby
    has stopped, and the standby would otherwise start a worker only to stop it again."""
    _standing_down.set()


async def run_when_elected(
    data_dir: Path,
    run: Callable[[asyncio.Event], Awaitable[None]],
    stop: asyncio.Event,
    *,
    retry_seconds: float = RETRY_SECONDS,
) -> None:
    """Call `run(stop)` once this process holds the worker lock; return when stopped."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        standing_by = False
        while not stop.is_set() and not _standing_down.is_set():
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not standing_by:
                    log.info("worker_standby", pid=os.getpid())
                    standing_by = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=retry_seconds)
                continue
            if _standing_down.is_set():
                return
            await run(stop)
            return
    finally:
        os.close(fd)  # and with it the lock
