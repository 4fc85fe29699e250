"""Bulk awards: upload a CSV of awards, follow the job the worker applies, and download its
per-row report. As `/api/v1/points/bulk-awards`: the `points:bulk` scope, the same service
(the upload's structure checked, nothing stored when it is refused) and the same
organisation reach; the upload is received as the API receives one (within
BULK_UPLOAD_MAX_BYTES, into a temporary file before the transaction)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from starlette.responses import Response

from memberhub.auth.roles import Scope
from memberhub.bulk import service
from memberhub.bulk.models import BulkJobStatus, RowOutcome
from memberhub.bulk.repository import BulkRepository
from memberhub.bulk.routes import CsvResponse
from memberhub.bulk.upload import CSV_MEDIA_TYPE
from memberhub.console.session import console_session
from memberhub.console.web import ConsoleDb, ConsoleRoute, SignedInStaff, redirect, render
from memberhub.kit.errors import ValidationFailed
from memberhub.kit.http import body_limit
from memberhub.kit.pagination import build_page, cursor_after_id
from memberhub.kit.types import IdPath

router = APIRouter(prefix="/console/bulk-awards", route_class=ConsoleRoute, include_in_schema=False)

JOBS_PER_PAGE = 25
FAILED_ROWS_SHOWN = 20
# While the worker has the job, the page asks the browser to reload it (a Refresh header:
# no script).
REFRESH_SECONDS = 5
Cursor = Annotated[str | None, Query(max_length=512)]
StatusFilter = Annotated[
    str | None,
    Query(
        pattern=(
            f"^({BulkJobStatus.QUEUED}|{BulkJobStatus.RUNNING}|"
            f"{BulkJobStatus.COMPLETED}|{BulkJobStatus.FAILED})$"
        )
    ),
]
# What browsers and spreadsheets call a CSV file; anything else is refused before reading.
CSV_PART_TYPES = frozenset(
    {
        "",
        CSV_MEDIA_TYPE,
        "text/plain",
        "application/csv",
        "application/vnd.ms-excel",
        "application/octet-stream",
    }
)


class NotACsvFile(ValidationFailed):
    code = "NOT_A_CSV_FILE"
    default_message = "Choose a CSV file (a header row, then one award per line)."


@router.get("")
async def list_jobs(
    request: Request,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    cursor: Cursor = None,
    status: StatusFilter = None,
) -> Response:
    """As `GET /api/v1/points/bulk-awards`: newest first, with the upload form."""
    principal = signed_in.principal
    principal.require_scope(Scope.POINTS_BULK)
    jobs = await BulkRepository(session).list_jobs(
        organisation_ids=principal.visible_organisation_ids,
        status=status,
        before_id=cursor_after_id(cursor),
        limit=JOBS_PER_PAGE,
    )
    items, pagination = build_page(jobs, JOBS_PER_PAGE)
    return render(
        request,
        "bulk_awards.html",
        {
            "title": "Bulk awards",
            "jobs": [service.job_out(job) for job in items],
            "next_cursor": pagination.next_cursor,
            "status": status,
            "statuses": (
                BulkJobStatus.QUEUED,
                BulkJobStatus.RUNNING,
                BulkJobStatus.COMPLETED,
                BulkJobStatus.FAILED,
            ),
        },
    )


@router.post("")
@body_limit("bulk_upload_max_bytes", spool=True)
async def upload(
    request: Request,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    file: Annotated[UploadFile | None, File()] = None,
    reason: Annotated[str, Form(max_length=1000)] = "",
) -> Response:
    """As `POST /api/v1/points/bulk-awards` with a CSV body, acting as the staff user."""
    principal = signed_in.principal
    principal.require_scope(Scope.POINTS_BULK)
    if file is None or not file.filename:
        raise NotACsvFile("Choose a CSV file to upload.", details={"field": "file"})
    part_type = (file.content_type or "").split(";", 1)[0].strip().lower()
    if part_type not in CSV_PART_TYPES and not file.filename.lower().endswith(".csv"):
        raise NotACsvFile(details={"field": "file", "content_type": part_type[:100]})
    job = await service.create_bulk_award(
        session,
        principal,
        media_type=CSV_MEDIA_TYPE,
        body=file.file,
        default_reason=reason.strip() or None,
    )
    console_session(request).flash(
        f"Bulk award {job.public_id} queued with {job.total_rows:,} rows."
    )
    return redirect(f"/console/bulk-awards/{job.public_id}")


@router.get("/{job_id}")
async def job_page(
    request: Request, job_id: IdPath, session: ConsoleDb, signed_in: SignedInStaff
) -> Response:
    """As `GET /api/v1/points/bulk-awards/{id}`, with the first failed rows."""
    principal = signed_in.principal
    principal.require_scope(Scope.POINTS_BULK)
    job = await service.get_job(session, principal, job_id)
    failed = await BulkRepository(session).list_rows(
        job.id, outcome=RowOutcome.FAILED, after_row=None, limit=FAILED_ROWS_SHOWN
    )
    running = job.status in (BulkJobStatus.QUEUED, BulkJobStatus.RUNNING)
    return render(
        request,
        "bulk_award.html",
        {
            "title": f"Bulk award {job.public_id}",
            "job": service.job_out(job),
            "failed_rows": [service.row_out(row) for row in failed[:FAILED_ROWS_SHOWN]],
            "more_failed": len(failed) > FAILED_ROWS_SHOWN,
            "running": running,
            "refresh_seconds": REFRESH_SECONDS,
        },
        headers={"Refresh": str(REFRESH_SECONDS)} if running else None,
    )


@router.get("/{job_id}/rows.csv")
async def report(
    request: Request, job_id: IdPath, session: ConsoleDb, signed_in: SignedInStaff
) -> Response:
    """The report of `GET /api/v1/points/bulk-awards/{id}/rows.csv`, streamed."""
    principal = signed_in.principal
    principal.require_scope(Scope.POINTS_BULK)
    job = await service.get_job(session, principal, job_id)
    return CsvResponse(
        service.report_lines(request.app.state.db, job.id, None),
        headers={"Content-Disposition": f'attachment; filename="{job.public_id}-rows.csv"'},
    )
