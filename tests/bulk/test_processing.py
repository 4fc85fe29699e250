"""Applying a bulk award: each row's outcome, chunk by chunk, safe to run again."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete, func, select, update

from memberhub.audit.models import AuditEntry
from memberhub.audit.service import verify_chain
from memberhub.bulk import service as bulk_service
from memberhub.bulk.jobs import process_bulk_awards
from memberhub.bulk.models import BulkJob, BulkJobChunk, BulkJobRow
from memberhub.events.models import Event
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.kit.errors import Conflict
from memberhub.points import service as points_service
from memberhub.points.models import PointBatch, PointTransaction
from memberhub.worker.runner import JOBS, Worker
from tests.bulk.conftest import (
    BULK,
    balance,
    csv_body,
    get_job,
    outcomes,
    run_worker,
    upload,
)
from tests.support import ApiClient

HEADER = "member_id,email,points,reason,reference_id,expires_at"


async def _job_row(db: Database, public_id: str) -> BulkJob:
    async with db.transaction(read_only=True) as session:
        job = await session.scalar(select(BulkJob).where(BulkJob.public_id == public_id))
    assert job is not None
    return job


async def _ledger_size(db: Database) -> tuple[int, int]:
    async with db.transaction(read_only=True) as session:
        txns = await session.scalar(select(func.count()).select_from(PointTransaction))
        batches = await session.scalar(select(func.count()).select_from(PointBatch))
    return txns or 0, batches or 0


async def test_each_row_gets_an_outcome_and_only_valid_rows_are_awarded(
    api: ApiClient, db: Database
) -> None:
    ana = await api.create_member()
    bob = await api.create_member(email="Bob@Example.com")
    gone = await api.create_member()
    assert (await api.delete(f"/api/v1/members/{gone['id']}")).status_code == 204
    job = await upload(
        api,
        csv_body(
            HEADER,
            f"{ana['id']},,100,Welcome,,",
            ",BOB@example.COM,40,Referral,ref-bob,",
            "mem_unknown0000,,10,Welcome,,",
            f"{ana['id']},,abc,Welcome,,",
            f"{ana['id']},,0,Welcome,,",
            f"{ana['id']},,1000000000001,Welcome,,",
            f"{ana['id']},,12.5,Welcome,,",
            f"{ana['id']},,5,,,",
            f"{ana['id']},,5,Welcome,,2020-01-01T00:00:00Z",
            f"{ana['id']},,5,Welcome,,next tuesday",
            ",bob@example.com,40,Referral,ref-bob,",
            f"{ana['id']},,41,Referral,ref-bob,",
            f"{gone['id']},,5,Welcome,,",
            f"{ana['id']},bob@example.com,5,Welcome,,",
            f"{ana['id']},,5,Welcome,has space,",
        ),
    )
    assert await run_worker(db) == 15
    rows = await outcomes(api, job["id"])
    assert [(row["row_number"], row["outcome"], row["error"]) for row in rows] == [
        (1, "applied", None),
        (2, "applied", None),
        (3, "failed", "Member mem_unknown0000 does not exist."),
        (4, "failed", "points must be a whole number from 1 to 1000000000000."),
        (5, "failed", "points must be a whole number from 1 to 1000000000000."),
        (6, "failed", "points must be a whole number from 1 to 1000000000000."),
        (7, "failed", "points must be a whole number from 1 to 1000000000000."),
        (8, "failed", "reason is required: give it in the row or as the default reason."),
        (9, "failed", "expires_at must be in the future."),
        (10, "failed", "expires_at must be an ISO 8601 date-time, e.g. 2031-01-01T00:00:00Z."),
        (11, "duplicate", None),
        (12, "failed", "reference_id 'ref-bob' was used for another award."),
        (13, "failed", f"Member {gone['id']} does not exist."),
        (14, "failed", "Give member_id or email, not both."),
        (15, "failed", "reference_id must be 1 to 200 printable ASCII characters without spaces."),
    ]
    first, second, duplicate = rows[0], rows[1], rows[10]
    assert (first["member_id"], first["points"]) == (ana["id"], 100)
    assert first["reference_id"] == f"{job['id']}:1"
    assert first["transaction_id"].startswith("txn_")
    # Named by email, reported by the member credited; a failed row keeps what it gave.
    assert (second["member_id"], second["reference_id"]) == (bob["id"], "ref-bob")
    assert rows[11]["member_id"] == ana["id"]
    assert duplicate["transaction_id"] == second["transaction_id"]
    assert await balance(api, ana["id"]) == 100
    assert await balance(api, bob["id"]) == 40
    done = await get_job(api, job["id"])
    assert done["status"] == "completed"
    assert (done["processed_rows"], done["applied_rows"], done["duplicate_rows"]) == (15, 2, 1)
    assert (done["failed_rows"], done["progress_percent"]) == (12, 100.0)
    assert done["started_at"] is not None
    assert done["finished_at"] is not None


async def test_a_reference_applied_before_the_job_is_a_duplicate(
    api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    award = {"member_id": member["id"], "points": 30, "reason": "Desk", "reference_id": "r-1"}
    earlier = await api.post("/api/v1/points/award", award)
    assert earlier.status_code == 201, earlier.text
    job = await upload(api, csv_body(HEADER, f"{member['id']},,30,Desk,r-1,"))
    await run_worker(db)
    (row,) = await outcomes(api, job["id"])
    assert row["outcome"] == "duplicate"
    assert row["transaction_id"] == earlier.json()["transaction"]["id"]
    assert await balance(api, member["id"]) == 30


async def test_rows_are_awarded_as_the_uploading_key_with_their_events_and_audit(
    api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    expires = "2099-06-30T00:00:00+00:00"
    job = await upload(
        api,
        csv_body(HEADER, f"{member['id']},,25,Gala,,{expires}", f"{member['id']},,5,Gala,,"),
    )
    await run_worker(db)
    async with db.transaction(read_only=True) as session:
        actors = (
            await session.scalars(
                select(AuditEntry.actor).where(AuditEntry.action == "points.award")
            )
        ).all()
        batch = await session.scalar(select(PointBatch).where(PointBatch.initial == 25))
        earned = await session.scalar(
            select(func.count()).where(Event.type == "points.earned", Event.position.is_not(None))
        )
    assert actors == [job["created_by"], job["created_by"]]
    assert batch is not None
    assert batch.expires_at == datetime.fromisoformat(expires)
    assert earned == 2


async def test_a_row_failing_inside_the_ledger_is_undone_and_its_chunk_still_commits(
    api: ApiClient, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    member = await api.create_member()
    other = await api.create_member()
    after_change = points_service.tiers.after_ledger_change

    async def refuse_at_23(*args: Any) -> None:
        # Fails after the award wrote its transaction, batch, event and audit entry.
        account = args[3]
        if account.current == 23:
            raise Conflict("Refused for the test.")
        await after_change(*args)

    monkeypatch.setattr(points_service.tiers, "after_ledger_change", refuse_at_23)
    job = await upload(
        api,
        csv_body(
            HEADER,
            f"{member['id']},,10,A,,",
            f"{member['id']},,13,B,,",
            f"{other['id']},,4,C,,",
            f"{member['id']},,7,D,,",
        ),
    )
    await run_worker(db)
    rows = await outcomes(api, job["id"])
    assert [(row["outcome"], row["error"]) for row in rows] == [
        ("applied", None),
        ("failed", "Refused for the test."),
        ("applied", None),
        ("applied", None),
    ]
    assert await balance(api, member["id"]) == 17
    assert await balance(api, other["id"]) == 4
    assert await _ledger_size(db) == (3, 3)
    async with db.transaction(read_only=True) as session:
        events = (
            await session.scalars(
                select(Event.position).where(Event.type == "points.earned").order_by(Event.id)
            )
        ).all()
        awards = await session.scalar(
            select(func.count()).where(AuditEntry.action == "points.award")
        )
        chain = await verify_chain(session)
    assert len(events) == 3
    assert None not in events
    assert awards == 3
    assert chain.intact


async def test_rows_are_checked_against_the_time_the_job_runs(api: ApiClient, db: Database) -> None:
    member = await api.create_member()
    job = await upload(
        api,
        csv_body(
            HEADER,
            f"{member['id']},,5,Early,,2040-01-01T00:00:00Z",
            f"{member['id']},,6,Late,,2060-01-01T00:00:00Z",
        ),
    )
    later = datetime(2050, 1, 1, tzinfo=utcnow().tzinfo)
    await run_worker(db, now=later)
    rows = await outcomes(api, job["id"])
    assert [row["outcome"] for row in rows] == ["failed", "applied"]
    assert rows[0]["error"] == "expires_at must be in the future."
    stored = await _job_row(db, job["id"])
    assert stored.started_at is not None
    assert stored.finished_at is not None
    assert later <= stored.started_at <= stored.finished_at < later + timedelta(minutes=5)


async def test_progress_counts_follow_the_chunks(
    api: ApiClient, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk_service, "CHUNK_ROWS", 2)
    member = await api.create_member()
    job = await upload(
        api,
        csv_body(HEADER, *(f"{member['id']},,{n},Step,," for n in (1, 2, 3, 4, 0))),
    )
    now = utcnow()
    async with db.transaction() as session:
        claim = await bulk_service.claim_job(session, now)
    assert claim is not None
    job_id, lease = claim
    running = await get_job(api, job["id"])
    assert (running["status"], running["progress_percent"]) == ("running", 0.0)
    seen = []
    for _ in range(3):
        async with db.transaction() as session:
            step = await bulk_service.apply_next_chunk(session, job_id, lease, now)
        assert step is not None
        lease = step.lease or lease
        state = await get_job(api, job["id"])
        seen.append(
            (
                state["status"],
                state["processed_rows"],
                state["applied_rows"],
                state["failed_rows"],
                state["progress_percent"],
            )
        )
    assert seen == [
        ("running", 2, 2, 0, 40.0),
        ("running", 4, 4, 0, 80.0),
        ("completed", 5, 4, 1, 100.0),
    ]
    assert await balance(api, member["id"]) == 10


def _keep_uploads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash is staged on a finished job, whose uploaded rows would be gone; a real one
    happens before the job finishes, while they are still there."""

    async def keep(*_: object) -> None:
        return None

    monkeypatch.setattr(bulk_service, "_forget_upload", keep)


async def _crash_chunk(db: Database, job_public_id: str, sequence: int, now: datetime) -> None:
    """Put a job back as a worker that died during chunk `sequence` would have left it."""
    async with db.transaction() as session:
        job = await session.scalar(select(BulkJob).where(BulkJob.public_id == job_public_id))
        assert job is not None
        await session.execute(
            update(BulkJobChunk)
            .where(BulkJobChunk.job_id == job.id, BulkJobChunk.sequence >= sequence)
            .values(processed_at=None)
        )
        job.status = "running"
        job.finished_at = None
        job.lease_expires_at = now - timedelta(seconds=1)


async def test_running_a_chunk_again_after_a_crash_applies_nothing_twice(
    api: ApiClient, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk_service, "CHUNK_ROWS", 2)
    _keep_uploads(monkeypatch)
    members = [await api.create_member() for _ in range(3)]
    lines = [f"{members[n % 3]['id']},,{10 + n},Bonus,," for n in range(5)]
    job = await upload(api, csv_body(HEADER, *lines))
    await run_worker(db)
    balances = [await balance(api, m["id"]) for m in members]
    before = (await outcomes(api, job["id"]), await get_job(api, job["id"]))
    ledger = await _ledger_size(db)
    now = utcnow()
    await _crash_chunk(db, job["id"], 1, now)
    assert await run_worker(db, now) == 0
    after = (await outcomes(api, job["id"]), await get_job(api, job["id"]))
    assert [await balance(api, m["id"]) for m in members] == balances
    assert await _ledger_size(db) == ledger
    assert after[0] == before[0]
    assert after[1]["status"] == "completed"
    counts = ("processed_rows", "applied_rows", "duplicate_rows", "failed_rows")
    assert [after[1][key] for key in counts] == [before[1][key] for key in counts] == [5, 5, 0, 0]


async def test_rows_whose_outcomes_were_lost_are_replayed_as_duplicates(
    api: ApiClient, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk_service, "CHUNK_ROWS", 2)
    _keep_uploads(monkeypatch)
    member = await api.create_member()
    lines = [f"{member['id']},,{10 + n},Bonus,," for n in range(5)]
    job = await upload(api, csv_body(HEADER, *lines))
    await run_worker(db)
    ledger = await _ledger_size(db)
    now = utcnow()
    await _crash_chunk(db, job["id"], 1, now)
    async with db.transaction() as session:
        stored = await session.scalar(select(BulkJob).where(BulkJob.public_id == job["id"]))
        assert stored is not None
        await session.execute(
            delete(BulkJobRow).where(BulkJobRow.job_id == stored.id, BulkJobRow.row_number >= 3)
        )
        stored.processed_rows = stored.applied_rows = 2
    assert await run_worker(db, now) == 3
    rows = await outcomes(api, job["id"])
    assert [row["outcome"] for row in rows] == ["applied"] * 2 + ["duplicate"] * 3
    assert [row["reference_id"] for row in rows] == [f"{job['id']}:{n}" for n in range(1, 6)]
    assert await balance(api, member["id"]) == sum(range(10, 15))
    assert await _ledger_size(db) == ledger
    done = await get_job(api, job["id"])
    assert (done["processed_rows"], done["applied_rows"], done["duplicate_rows"]) == (5, 2, 3)


async def test_a_job_under_a_live_lease_is_left_to_its_worker(
    api: ApiClient, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk_service, "CHUNK_ROWS", 1)
    member = await api.create_member()
    await upload(api, csv_body(HEADER, f"{member['id']},,1,A,,", f"{member['id']},,2,B,,"))
    now = utcnow()
    async with db.transaction() as session:
        first = await bulk_service.claim_job(session, now)
    assert first is not None
    async with db.transaction() as session:
        assert await bulk_service.claim_job(session, now + timedelta(seconds=59)) is None
    async with db.transaction() as session:
        second = await bulk_service.claim_job(session, now + timedelta(seconds=61))
    assert second is not None
    assert second[0] == first[0]
    # The first worker, back after its lease ran out, must not carry on.
    async with db.transaction() as session:
        stale = await bulk_service.apply_next_chunk(session, *first, now + timedelta(seconds=62))
    assert stale is None
    assert await balance(api, member["id"]) == 0
    async with db.transaction() as session:
        step = await bulk_service.apply_next_chunk(session, *second, now + timedelta(seconds=62))
    assert step is not None
    assert step.rows == 1


async def test_an_unexpected_error_fails_the_job_and_keeps_the_chunks_applied(
    api: ApiClient, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk_service, "CHUNK_ROWS", 2)
    award = points_service.award_points

    async def broken_on_3(*args: Any, **kwargs: Any) -> points_service.LedgerResult:
        if kwargs["points"] == 3:
            raise RuntimeError("disk on fire")
        return await award(*args, **kwargs)

    monkeypatch.setattr(bulk_service.points, "award_points", broken_on_3)
    member = await api.create_member()
    job = await upload(api, csv_body(HEADER, *(f"{member['id']},,{n},X,," for n in (1, 2, 3, 4))))
    with pytest.raises(RuntimeError):
        await process_bulk_awards(db, utcnow())
    failed = await get_job(api, job["id"])
    assert failed["status"] == "failed"
    assert failed["error"] == "Processing stopped by an unexpected error (RuntimeError)."
    assert (failed["processed_rows"], failed["applied_rows"]) == (2, 2)
    assert await balance(api, member["id"]) == 3
    assert await run_worker(db) == 0


async def test_a_run_past_its_time_budget_hands_the_job_back_to_continue_later(
    api: ApiClient, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk_service, "CHUNK_ROWS", 2)
    member = await api.create_member()
    job = await upload(api, csv_body(HEADER, *(f"{member['id']},,1,X,," for _ in range(5))))
    now = utcnow()
    assert await process_bulk_awards(db, now, time_budget=timedelta(0)) == 2
    paused = await _job_row(db, job["id"])
    assert (paused.status, paused.processed_rows, paused.lease_expires_at) == ("running", 2, None)
    assert await process_bulk_awards(db, now, time_budget=timedelta(0)) == 2
    assert await process_bulk_awards(db, now, time_budget=timedelta(0)) == 1
    assert (await get_job(api, job["id"]))["status"] == "completed"
    assert await balance(api, member["id"]) == 5


async def test_a_20000_row_csv_is_processed_to_the_last_row(api: ApiClient, db: Database) -> None:
    """Every row, across many chunks, gets exactly one outcome. One row in 50 is a real award
    (each is a full ledger write); the others name no member, so the file stays quick to run
    while every chunk still mixes applied and failed rows."""
    members = [await api.create_member() for _ in range(8)]
    lines = [
        f"{members[n % 8]['id']},,{n},Anniversary,,"
        if n % 50 == 0
        else f"mem_missing{n},,{n},Anniversary,,"
        for n in range(1, 20_001)
    ]
    job = await upload(api, csv_body(HEADER, *lines))
    assert job["total_rows"] == 20_000
    async with db.transaction(read_only=True) as session:
        chunks = await session.scalar(select(func.count()).select_from(BulkJobChunk))
    assert chunks == 20_000 // bulk_service.CHUNK_ROWS
    assert await run_worker(db) == 20_000
    done = await get_job(api, job["id"])
    assert (done["status"], done["processed_rows"], done["progress_percent"]) == (
        "completed",
        20_000,
        100.0,
    )
    assert (done["applied_rows"], done["failed_rows"], done["duplicate_rows"]) == (400, 19_600, 0)
    async with db.transaction(read_only=True) as session:
        chunks = await session.scalar(select(func.count()).select_from(BulkJobChunk))
        numbers = (
            await session.execute(
                select(
                    func.count(),
                    func.count(func.distinct(BulkJobRow.row_number)),
                    func.min(BulkJobRow.row_number),
                    func.max(BulkJobRow.row_number),
                )
            )
        ).one()
    assert chunks == 0  # the uploaded rows go once the job is done
    assert tuple(numbers) == (20_000, 20_000, 1, 20_000)
    total = sum([await balance(api, m["id"]) for m in members])
    assert total == sum(range(50, 20_001, 50))
    report = await api.get(f"{BULK}/{job['id']}/rows.csv")
    assert report.status_code == 200
    assert len(report.text.splitlines()) == 20_001


async def test_the_worker_applies_bulk_awards_on_its_schedule(api: ApiClient, db: Database) -> None:
    (scheduled,) = [job for job in JOBS if job.name == "bulk.process_awards"]
    assert scheduled.every_seconds == 5.0
    member = await api.create_member()
    job = await upload(api, csv_body(HEADER, f"{member['id']},,7,Tick,,", "mem_nobody0,,1,X,,"))
    results = await Worker(db).tick(force=True)
    assert results["bulk.process_awards"] == 2
    assert (await get_job(api, job["id"]))["status"] == "completed"
    assert await balance(api, member["id"]) == 7
