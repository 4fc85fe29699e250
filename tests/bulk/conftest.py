"""Helpers for the bulk award tests: uploads, running the worker job, reading outcomes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from memberhub.bulk.jobs import process_bulk_awards
from memberhub.bulk.models import BulkJob, BulkJobChunk, BulkJobRow
from memberhub.events.sequencer import run_passes
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from tests.support import ApiClient

BULK = "/api/v1/points/bulk-awards"


def csv_body(*lines: str) -> str:
    return "\n".join(lines) + "\n"


async def upload(
    api: ApiClient,
    body: str | bytes,
    *,
    content_type: str = "text/csv",
    reason: str | None = None,
    expect: int = 202,
) -> dict[str, Any]:
    response = await api.http.post(
        BULK,
        content=body.encode() if isinstance(body, str) else body,
        params={"reason": reason} if reason is not None else None,
        headers={"Authorization": f"Bearer {api.key}", "Content-Type": content_type},
    )
    assert response.status_code == expect, response.text
    return dict(response.json())


async def upload_json(api: ApiClient, document: Any, expect: int = 202) -> dict[str, Any]:
    response = await api.post(BULK, document)
    assert response.status_code == expect, response.text
    return dict(response.json())


async def run_worker(db: Database, now: datetime | None = None) -> int:
    """Run the scheduled job until it finds nothing to do, then sequence its events and
    audit entries as the worker's tick does; the rows it processed."""
    total = 0
    while processed := await process_bulk_awards(db, now or utcnow()):
        total += processed
    await run_passes(db)
    return total


async def get_job(api: ApiClient, job_id: str) -> dict[str, Any]:
    response = await api.get(f"{BULK}/{job_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def outcomes(
    api: ApiClient, job_id: str, outcome: str | None = None, limit: int = 500
) -> list[dict[str, Any]]:
    """Every row outcome of the job, following the cursor."""
    rows: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": limit}
    if outcome is not None:
        params["outcome"] = outcome
    while True:
        response = await api.get(f"{BULK}/{job_id}/rows", params)
        assert response.status_code == 200, response.text
        page = response.json()
        rows.extend(page["data"])
        if not page["pagination"]["has_more"]:
            return rows
        params["cursor"] = page["pagination"]["next_cursor"]


async def balance(api: ApiClient, member_id: str) -> int:
    response = await api.get(f"/api/v1/members/{member_id}/points")
    assert response.status_code == 200, response.text
    return int(response.json()["current_balance"])


async def stored_counts(db: Database) -> tuple[int, int, int]:
    """(jobs, chunks, row outcomes) in the database."""
    async with db.transaction(read_only=True) as session:
        return (
            await session.scalar(select(func.count()).select_from(BulkJob)) or 0,
            await session.scalar(select(func.count()).select_from(BulkJobChunk)) or 0,
            await session.scalar(select(func.count()).select_from(BulkJobRow)) or 0,
        )
