"""Per-process caches (`kit/cache.py`): a change through this process is seen at once, and
so is one through another process sharing DATA_DIR, which moves the stamp file."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

from sqlalchemy import text

from memberhub.kit.cache import ProcessCache
from memberhub.kit.db import Database
from tests.support import ApiClient


async def _behind_the_cache(db: Database, statement: str) -> None:
    """A change committed as another process would: not through this app's sessions."""
    async with db.transaction() as session:
        await session.execute(text(statement))


def _moved_by_another_process() -> None:
    assert ProcessCache.stamp_path is not None
    stamp = time.time_ns()
    ProcessCache.stamp_path.touch()
    os.utime(ProcessCache.stamp_path, ns=(stamp, stamp))


async def test_a_change_through_this_process_is_seen_at_once(api: ApiClient) -> None:
    assert (await api.get("/api/v1/program")).json()["earn_points"] == 1
    assert (await api.patch("/api/v1/program", json={"earn_points": 3})).status_code == 200
    assert (await api.get("/api/v1/program")).json()["earn_points"] == 3


async def test_another_process_change_is_seen_once_the_stamp_moves(
    api: ApiClient, db: Database
) -> None:
    assert (await api.patch("/api/v1/program", json={"earn_points": 2})).status_code == 200
    assert (await api.get("/api/v1/program")).json()["earn_points"] == 2
    await _behind_the_cache(db, "UPDATE loyalty_program SET earn_points = 7")
    # Within the TTL, and with no stamp moved (a process on another machine), the cached
    # settings answer: the documented bounded staleness.
    assert (await api.get("/api/v1/program")).json()["earn_points"] == 2
    _moved_by_another_process()
    assert (await api.get("/api/v1/program")).json()["earn_points"] == 7


async def test_a_key_revoked_by_another_process_is_refused_once_the_stamp_moves(
    api: ApiClient, db: Database
) -> None:
    assert (await api.get("/api/v1/members")).status_code == 200
    revoked = datetime.now(UTC).isoformat()
    await _behind_the_cache(db, f"UPDATE api_keys SET revoked_at = '{revoked}'")
    assert (await api.get("/api/v1/members")).status_code == 200  # cached, within the TTL
    _moved_by_another_process()
    assert (await api.get("/api/v1/members")).status_code == 401
