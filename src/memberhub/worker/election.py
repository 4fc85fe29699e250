"""One embedded worker among the processes of `memberhub serve --processes N`.

The processes share DATA_DIR. Whichever holds an exclusive lock on `worker.lock` there runs
the worker; the others stand by and try again every `retry_seconds`, so when the holder
exits (or is killed: the kernel drops the lock with the process) another takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

log = structlog.get_logger("memberhub.worker")

LOCK_FILE = "worker.lock"
RETRY_SECONDS = 1.0


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
        while not stop.is_set():
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not standing_by:
                    log.info("worker_standby", pid=os.getpid())
                    standing_by = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=retry_seconds)
                continue
            await run(stop)
            return
    finally:
        os.close(fd)  # and with it the lock
