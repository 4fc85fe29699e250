"""Bulk points awards: an upload becomes a queued job of chunks, applied by the worker.

The request only checks the upload's structure and stores its rows, a chunk of rows per
record; nothing is awarded until the worker takes the job. The worker applies one chunk per
transaction, every row through `points.service.award_points` with a reference id (the row's
own, or `<job id>:<row number>`), so running a chunk again after a crash awards nothing twice:
a row whose reference was already applied is reported as a duplicate. A row that fails
(unknown member, bad points, no reason, expiry in the past, a ledger refusal) is rolled back
to its savepoint and reported with the reason; the rest of its chunk is applied.

Only admins hold the bulk scope, so role award limits (which bind support agents and
managers) do not apply; an admin key bound to an organisation still awards only to members
of that organisation and its chapters.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import IO, Any

from sqlalchemy import delete
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.service import record_write
from memberhub.auth.principal import Principal
from memberhub.bulk import member_import
from memberhub.bulk.member_import import MEMBER_IMPORTS_PATH, ImportOptions, open_member_upload
from memberhub.bulk.models import (
    BulkJob,
    BulkJobChunk,
    BulkJobRow,
    BulkJobStatus,
    BulkOperation,
    RowOutcome,
)
from memberhub.bulk.repository import BulkRepository
from memberhub.bulk.schemas import (
    BulkJobLinks,
    BulkJobOut,
    BulkRowOut,
    ImportRowOut,
    MemberImportOut,
)
from memberhub.bulk.upload import Upload, open_upload, report_text
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.kit.errors import MemberhubError, NotFound, ValidationFailed
from memberhub.kit.ids import new_public_id
from memberhub.kit.spreadsheet import csv_cell
from memberhub.members.models import Member
from memberhub.members.repository import normalize_email
from memberhub.members.service import resolve_organisation
from memberhub.memberships.service import get_plan
from memberhub.organisations.repository import OrganisationRepository
from memberhub.points import service as points
from memberhub.points.schemas import MAX_POINTS

# Rows per chunk, and so per worker transaction. A chunk's transaction holds the accounts of
# its members (and on SQLite the write lock) until it commits: a few seconds at most.
CHUNK_ROWS = 500
# Chunks are written to the database a few at a time, so an upload's rows are never all
# held as chunk records at once.
CHUNKS_PER_INSERT = 10
LEASE = timedelta(seconds=60)
MAX_TEXT = 1000
BULK_AWARDS_PATH = "/api/v1/points/bulk-awards"

_PUBLIC_ID = re.compile(r"[a-z]{2,4}_[0-9a-z]{1,40}")
_REFERENCE_ID = re.compile(r"[\x21-\x7e]{1,200}")
_POINTS = re.compile(r"[0-9]{1,13}")
# One encoder for every row of an upload (json.dumps with options builds one per call).
_encode_row = json.JSONEncoder(separators=(",", ":")).encode


class BulkJobNotFound(NotFound):
    code = "BULK_JOB_NOT_FOUND"


class RowRejected(ValidationFailed):
    """A row that cannot be applied; the message goes into the row's outcome."""


# ---------------------------------------------------------------- upload


def _storable(value: str) -> bool:
    """Text both databases can hold: no NUL, and valid Unicode (no lone surrogates)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _checked_reason(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RowRejected(f"{field} must be text.")
    value = value.strip()
    if not value:
        raise RowRejected(f"{field} must not be empty.")
    if len(value) > MAX_TEXT or not _storable(value):
        raise RowRejected(f"{field} must be at most {MAX_TEXT} characters of plain text.")
    return value


def _default_reason(from_query: str | None, from_body: str | None) -> str | None:
    if from_query is not None and from_body is not None and from_query != from_body:
        raise ValidationFailed(
            "Give the default reason once: in the query or in the body.",
            details={"field": "reason"},
        )
    given = from_body if from_body is not None else from_query
    if given is None:
        return None
    try:
        return _checked_reason(given, "reason")
    except RowRejected as exc:
        raise ValidationFailed(exc.message, details={"field": "reason"}) from exc


async def create_bulk_award(
    session: AsyncSession,
    principal: Principal,
    *,
    media_type: str,
    body: IO[bytes],
    default_reason: str | None,
    now: datetime | None = None,
    chunk_rows: int | None = None,
) -> BulkJob:
    """Check the upload's structure and store its rows as a queued job; awards nothing."""
    now = now or utcnow()
    chunk_rows = chunk_rows or CHUNK_ROWS
    upload = open_upload(media_type, body)
    job = BulkJob(
        public_id=new_public_id("blk"),
        status=BulkJobStatus.QUEUED,
        created_by=principal.key_public_id,
        organisation_id=principal.organisation_id,
        created_at=now,
    )
    session.add(job)
    await session.flush()
    job.total_rows = await _store_chunks(session, job, upload, chunk_rows)
    job.default_reason = _default_reason(default_reason, upload.default_reason)
    record_write(
        session,
        principal.actor,
        action="points.bulk_award.create",
        object_type="bulk_job",
        object_id=job.public_id,
        changes={"total_rows": job.total_rows, "default_reason": job.default_reason},
    )
    await session.flush()
    return job


async def create_member_import(
    session: AsyncSession,
    principal: Principal,
    *,
    media_type: str,
    body: IO[bytes],
    options: ImportOptions,
    dry_run: bool,
    now: datetime | None = None,
    chunk_rows: int | None = None,
) -> BulkJob:
    """Check the upload's structure and the options, and store the rows as a queued member
    import; changes nothing else."""
    now = now or utcnow()
    if options.organisation_id is not None:
        await resolve_organisation(session, principal, options.organisation_id)
    if options.plan_id is not None:
        await get_plan(session, principal, options.plan_id)
    upload = open_member_upload(media_type, body, options.mapping)
    job = BulkJob(
        public_id=new_public_id("imp"),
        operation=BulkOperation.MEMBER_IMPORT,
        status=BulkJobStatus.QUEUED,
        options=options.model_dump(mode="json"),
        dry_run=dry_run,
        created_by=principal.key_public_id,
        organisation_id=principal.organisation_id,
        created_at=now,
    )
    session.add(job)
    await session.flush()
    job.total_rows = await _store_chunks(session, job, upload, chunk_rows or CHUNK_ROWS)
    record_write(
        session,
        principal.actor,
        action="members.import.create",
        object_type="bulk_job",
        object_id=job.public_id,
        changes={"total_rows": job.total_rows, "dry_run": dry_run, **(job.options or {})},
    )
    await session.flush()
    return job


async def _store_chunks(
    session: AsyncSession, job: BulkJob, upload: Upload, chunk_rows: int
) -> int:
    """Store the upload's rows as the job's chunks, a few chunks per statement; the count."""
    repo = BulkRepository(session)
    pending: list[dict[str, Any]] = []
    lines: list[str] = []
    sequence = 0
    for row in upload.rows():
        lines.append(_encode_row(row))
        if len(lines) == chunk_rows:
            pending.append(_chunk(job.id, sequence, sequence * chunk_rows + 1, lines))
            sequence += 1
            lines = []
            if len(pending) == CHUNKS_PER_INSERT:
                await repo.insert_chunks(pending)
                pending = []
    if lines:
        pending.append(_chunk(job.id, sequence, sequence * chunk_rows + 1, lines))
    if pending:
        await repo.insert_chunks(pending)
    return upload.row_count


def _chunk(job_id: int, sequence: int, first_row: int, lines: list[str]) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "sequence": sequence,
        "first_row": first_row,
        "row_count": len(lines),
        "rows": "\n".join(lines),
    }


# ---------------------------------------------------------------- reading


async def get_job(
    session: AsyncSession,
    principal: Principal,
    public_id: str,
    operation: str = BulkOperation.AWARD,
) -> BulkJob:
    job = await BulkRepository(session).job_by_public_id(public_id)
    if (
        job is None
        or job.operation != operation
        or (
            principal.visible_organisation_ids is not None
            and job.organisation_id not in principal.visible_organisation_ids
        )
    ):
        what = "Member import" if operation == BulkOperation.MEMBER_IMPORT else "Bulk job"
        raise BulkJobNotFound(f"{what} {public_id} does not exist.")
    return job


def job_path(job: BulkJob) -> str:
    base = MEMBER_IMPORTS_PATH if job.operation == BulkOperation.MEMBER_IMPORT else BULK_AWARDS_PATH
    return f"{base}/{job.public_id}"


def job_out(job: BulkJob) -> BulkJobOut:
    path = job_path(job)
    progress = 100.0 * job.processed_rows / job.total_rows if job.total_rows else 100.0
    return BulkJobOut(
        id=job.public_id,
        status=job.status,
        total_rows=job.total_rows,
        processed_rows=job.processed_rows,
        applied_rows=job.applied_rows,
        duplicate_rows=job.duplicate_rows,
        failed_rows=job.failed_rows,
        progress_percent=round(progress, 2),
        default_reason=job.default_reason,
        created_by=job.created_by,
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        links=BulkJobLinks(self=path, rows=f"{path}/rows", report_csv=f"{path}/rows.csv"),
    )


def import_out(job: BulkJob) -> MemberImportOut:
    out = job_out(job)
    return MemberImportOut(
        **out.model_dump(exclude={"default_reason", "applied_rows", "duplicate_rows"}),
        dry_run=job.dry_run,
        options=job.options or {},
        changed_rows=job.applied_rows,
        unchanged_rows=job.duplicate_rows,
    )


def import_row_out(row: BulkJobRow) -> ImportRowOut:
    return ImportRowOut(
        row_number=row.row_number,
        action=row.action,
        member_id=row.member_id,
        opening_points=row.points,
        transaction_id=row.transaction_id,
        error=row.error,
    )


def row_out(row: BulkJobRow) -> BulkRowOut:
    return BulkRowOut(
        row_number=row.row_number,
        outcome=row.outcome,
        member_id=row.member_id,
        points=row.points,
        reference_id=row.reference_id,
        transaction_id=row.transaction_id,
        error=row.error,
    )


# ---------------------------------------------------------------- processing


@dataclass(frozen=True)
class ChunkResult:
    rows: int
    finished: bool
    lease: datetime | None


@dataclass(frozen=True)
class AwardRow:
    member: Member
    points: int
    reason: str
    reference_id: str
    expires_at: datetime | None


def _points(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and _POINTS.fullmatch(value.strip()):
        value = int(value)
    return value if isinstance(value, int) and 1 <= value <= MAX_POINTS else None


def _reference_id(raw: dict[str, Any], job: BulkJob, row_number: int) -> str:
    value = raw.get("reference_id")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and value.strip():
        value = value.strip()
        if not _REFERENCE_ID.fullmatch(value):
            raise RowRejected(
                "reference_id must be 1 to 200 printable ASCII characters without spaces."
            )
        return value
    if value is not None and not isinstance(value, str):
        raise RowRejected("reference_id must be text.")
    return f"{job.public_id}:{row_number}"


def _expires_at(value: Any, now: datetime) -> datetime | None:
    if _blank(value):
        return None
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        moment = datetime.fromisoformat(value.strip())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        moment = moment.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise RowRejected(
            "expires_at must be an ISO 8601 date-time, e.g. 2031-01-01T00:00:00Z."
        ) from exc
    if moment <= now:
        raise RowRejected("expires_at must be in the future.")
    return moment


_MEMBER_FIELDS = ("member_id", "email")


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _member_ref(raw: dict[str, Any]) -> tuple[str, str] | None:
    """("member_id" | "email", the value given), stripped; None when neither is usable."""
    given = [(field, raw[field]) for field in _MEMBER_FIELDS if not _blank(raw.get(field))]
    if len(given) != 1 or not isinstance(given[0][1], str):
        return None
    return given[0][0], given[0][1].strip()


class _Members:
    """The members a chunk names, found with one query per kind of reference."""

    def __init__(self, by_public_id: dict[str, Member], by_email: dict[str, list[Member]]) -> None:
        self.by_public_id = by_public_id
        self.by_email = by_email

    @classmethod
    async def load(
        cls, session: AsyncSession, rows: list[dict[str, Any]], visible: frozenset[int] | None
    ) -> _Members:
        public_ids: set[str] = set()
        emails: set[str] = set()
        for raw in rows:
            ref = _member_ref(raw)
            if ref is None or not _storable(ref[1]):
                continue
            if ref[0] == "member_id" and _PUBLIC_ID.fullmatch(ref[1]):
                public_ids.add(ref[1])
            elif ref[0] == "email" and len(ref[1]) <= 320:
                emails.add(normalize_email(ref[1]))
        repo = BulkRepository(session)
        return cls(
            await repo.members_by_public_id(public_ids, visible),
            await repo.members_by_email(emails, visible),
        )

    def find(self, raw: dict[str, Any]) -> Member:
        ref = _member_ref(raw)
        if ref is None:
            given = [field for field in _MEMBER_FIELDS if not _blank(raw.get(field))]
            if len(given) == 2:
                raise RowRejected("Give member_id or email, not both.")
            if not given:
                raise RowRejected("Give member_id or email.")
            raise RowRejected(f"{given[0]} must be text.")
        field, value = ref
        if field == "member_id":
            member = self.by_public_id.get(value)
            if member is None:
                raise RowRejected(f"Member {report_text(value, 64)} does not exist.")
            return member
        matches = self.by_email.get(normalize_email(value), []) if _storable(value) else []
        if not matches:
            raise RowRejected(f"No member has the email {report_text(value, 320)}.")
        if len(matches) > 1:
            raise RowRejected(
                f"{len(matches)} members have the email {report_text(value, 320)}; give member_id."
            )
        return matches[0]


def _award_row(
    raw: dict[str, Any], row_number: int, job: BulkJob, members: _Members, now: datetime
) -> AwardRow:
    member = members.find(raw)
    points_given = _points(raw.get("points"))
    if points_given is None:
        raise RowRejected(f"points must be a whole number from 1 to {MAX_POINTS}.")
    if not _blank(raw.get("reason")):
        reason = _checked_reason(raw["reason"], "reason")
    elif job.default_reason is not None:
        reason = job.default_reason
    else:
        raise RowRejected("reason is required: give it in the row or as the default reason.")
    return AwardRow(
        member=member,
        points=points_given,
        reason=reason,
        reference_id=_reference_id(raw, job, row_number),
        expires_at=_expires_at(raw.get("expires_at"), now),
    )


def _outcome_record(
    job: BulkJob, row_number: int, raw: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    reference = raw.get("reference_id")
    return {
        "job_id": job.id,
        "row_number": row_number,
        "member_id": report_text(raw.get("member_id", raw.get("email")), 320),
        "points": _points(raw.get("points")),
        "reference_id": report_text(reference, 200) if reference not in (None, "") else None,
        "transaction_id": None,
        "error": None,
        **fields,
    }


async def _apply_row(
    session: AsyncSession,
    actor: Actor,
    job: BulkJob,
    row_number: int,
    raw: dict[str, Any],
    members: _Members,
    now: datetime,
) -> dict[str, Any]:
    member: Member | None = None
    try:
        row = _award_row(raw, row_number, job, members, now)
        member = row.member
        # A savepoint per row: a failing row's writes (and its pending events and audit
        # entries) are undone while the rest of the chunk stays.
        async with session.begin_nested():
            result = await points.award_points(
                session,
                actor,
                row.member,
                points=row.points,
                reason=row.reason,
                reference_id=row.reference_id,
                expires_at=row.expires_at,
                now=now,
            )
    except (MemberhubError, DataError, IntegrityError) as exc:
        if member is not None and sa_inspect(member).expired_attributes:
            # The savepoint's rollback expired what the row had changed; reload it for the
            # member's next row.
            await session.refresh(member)
        message = (
            exc.message if isinstance(exc, MemberhubError) else "The award could not be stored."
        )
        return _outcome_record(
            job, row_number, raw, outcome=RowOutcome.FAILED, error=message[:MAX_TEXT]
        )
    return _outcome_record(
        job,
        row_number,
        raw,
        outcome=RowOutcome.DUPLICATE if result.replayed else RowOutcome.APPLIED,
        # The member credited, also for a row that named it by email.
        member_id=row.member.public_id,
        reference_id=row.reference_id,
        transaction_id=result.transaction.public_id,
    )


async def claim_job(session: AsyncSession, now: datetime) -> tuple[int, datetime] | None:
    """Take the next waiting job for `LEASE`: (job row id, lease end), or None."""
    job = await BulkRepository(session).claim_next_job(now)
    if job is None:
        return None
    job.status = BulkJobStatus.RUNNING
    job.started_at = job.started_at or now
    job.lease_expires_at = now + LEASE
    return job.id, job.lease_expires_at


async def _held_job(session: AsyncSession, job_id: int, lease: datetime) -> BulkJob | None:
    """The job, locked, if this worker's lease on it still holds."""
    job = await BulkRepository(session).lock_job(job_id)
    if job is None or job.status != BulkJobStatus.RUNNING or job.lease_expires_at != lease:
        return None
    return job


async def apply_next_chunk(
    session: AsyncSession, job_id: int, lease: datetime, now: datetime
) -> ChunkResult | None:
    """Apply the job's next unprocessed chunk; None if the lease was lost to another worker.

    Rows that already have an outcome (the chunk ran before and is run again) are skipped,
    so the job's counts stay exact.
    """
    repo = BulkRepository(session)
    job = await _held_job(session, job_id, lease)
    if job is None:
        return None
    chunk = await repo.next_chunk(job.id)
    if chunk is None:
        await _finish(session, job, now)
        return ChunkResult(rows=0, finished=True, lease=None)
    records = await _apply_chunk(session, job, chunk, now)
    await repo.insert_rows(records)
    chunk.processed_at = now
    job.processed_rows += len(records)
    for record in records:
        if record["outcome"] == RowOutcome.APPLIED:
            job.applied_rows += 1
        elif record["outcome"] == RowOutcome.DUPLICATE:
            job.duplicate_rows += 1
        else:
            job.failed_rows += 1
    if await repo.has_unprocessed_chunks(job.id):
        job.lease_expires_at = now + LEASE
        return ChunkResult(rows=len(records), finished=False, lease=job.lease_expires_at)
    await _finish(session, job, now)
    return ChunkResult(rows=len(records), finished=True, lease=None)


async def _apply_chunk(
    session: AsyncSession, job: BulkJob, chunk: BulkJobChunk, now: datetime
) -> list[dict[str, Any]]:
    last_row = chunk.first_row + chunk.row_count - 1
    done = await BulkRepository(session).recorded_rows(job.id, chunk.first_row, last_row)
    rows = [
        (row_number, json.loads(line))
        for row_number, line in enumerate(chunk.rows.split("\n"), start=chunk.first_row)
        if row_number not in done
    ]
    # The uploading key's reach: its organisation and chapters (None: everything).
    visible = (
        await OrganisationRepository(session).subtree_ids(job.organisation_id)
        if job.organisation_id is not None
        else None
    )
    if job.operation == BulkOperation.MEMBER_IMPORT:
        return await member_import.apply_chunk(session, job, rows, visible, now)
    members = await _Members.load(session, [raw for _, raw in rows], visible)
    actor = Actor(id=job.created_by)
    return [
        await _apply_row(session, actor, job, row_number, raw, members, now)
        for row_number, raw in rows
    ]


async def _finish(session: AsyncSession, job: BulkJob, now: datetime) -> None:
    job.status = BulkJobStatus.COMPLETED
    job.finished_at = now
    job.lease_expires_at = None
    await _forget_upload(session, job)


async def _forget_upload(session: AsyncSession, job: BulkJob) -> None:
    """The uploaded rows (personal data, for an import) once the job is done with them: the
    report keeps each row's outcome."""
    await session.execute(delete(BulkJobChunk).where(BulkJobChunk.job_id == job.id))


async def release_job(session: AsyncSession, job_id: int, lease: datetime) -> None:
    """Give the job back unfinished, for the next run of any worker to continue."""
    job = await _held_job(session, job_id, lease)
    if job is not None:
        job.lease_expires_at = None


async def fail_job(
    session: AsyncSession, job_id: int, lease: datetime, message: str, now: datetime
) -> None:
    """Stop the job for good; the rows applied so far stay applied."""
    job = await _held_job(session, job_id, lease)
    if job is not None:
        job.status = BulkJobStatus.FAILED
        job.error = message[:MAX_TEXT]
        job.finished_at = now
        job.lease_expires_at = None
        await _forget_upload(session, job)


# ---------------------------------------------------------------- report

REPORT_COLUMNS = (
    "row_number",
    "outcome",
    "member_id",
    "points",
    "reference_id",
    "transaction_id",
    "error",
)
REPORT_PAGE = 1000


def _award_report_row(row: BulkJobRow) -> tuple[Any, ...]:
    return (
        row.row_number,
        row.outcome,
        csv_cell(row.member_id),
        "" if row.points is None else row.points,
        csv_cell(row.reference_id),
        row.transaction_id or "",
        csv_cell(row.error),
    )


def _import_report_row(row: BulkJobRow) -> tuple[Any, ...]:
    return (
        row.row_number,
        row.action or "failed",
        csv_cell(row.member_id),
        "" if row.points is None else row.points,
        row.transaction_id or "",
        csv_cell(row.error),
    )


async def _report(
    db: Database,
    job_id: int,
    outcome: str | None,
    columns: tuple[str, ...],
    cells: Callable[[BulkJobRow], tuple[Any, ...]],
) -> AsyncIterator[str]:
    """A job's row outcomes as CSV, a page at a time, each page in a short read."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    after: int | None = None
    while True:
        async with db.transaction(read_only=True) as session:
            rows = await BulkRepository(session).list_rows(
                job_id, outcome=outcome, after_row=after, limit=REPORT_PAGE
            )
        for row in rows[:REPORT_PAGE]:
            writer.writerow(cells(row))
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        if len(rows) <= REPORT_PAGE:
            return
        after = rows[REPORT_PAGE - 1].row_number


def report_lines(db: Database, job_id: int, outcome: str | None) -> AsyncIterator[str]:
    """A bulk award's row outcomes as CSV."""
    return _report(db, job_id, outcome, REPORT_COLUMNS, _award_report_row)


IMPORT_REPORT_COLUMNS = (
    "row_number",
    "action",
    "member_id",
    "opening_points",
    "transaction_id",
    "error",
)


def import_report_lines(db: Database, job_id: int, failed_only: bool) -> AsyncIterator[str]:
    """A member import's row outcomes as CSV."""
    outcome = RowOutcome.FAILED if failed_only else None
    return _report(db, job_id, outcome, IMPORT_REPORT_COLUMNS, _import_report_row)
