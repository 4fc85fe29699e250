from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse

from memberhub.auth.dependencies import PointsBulkWriter
from memberhub.bulk import service
from memberhub.bulk.models import BulkJobStatus, RowOutcome
from memberhub.bulk.repository import BulkRepository
from memberhub.bulk.schemas import UPLOAD_OPENAPI, BulkJobOut, BulkRowOut
from memberhub.bulk.upload import MAX_ROWS
from memberhub.kit.http import (
    ERROR_RESPONSES,
    DbSession,
    ErrorBody,
    UnitOfWorkRoute,
    body_limit,
    spooled_body,
)
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import IdPath

router = APIRouter(
    prefix="/api/v1", tags=["bulk awards"], route_class=UnitOfWorkRoute, responses=ERROR_RESPONSES
)

Pages = Annotated[PageParams, Depends(page_params)]
OutcomeFilter = Annotated[
    str | None,
    Query(
        pattern=f"^({RowOutcome.APPLIED}|{RowOutcome.DUPLICATE}|{RowOutcome.FAILED})$",
        description="Only rows with this outcome.",
    ),
]
StatusFilter = Annotated[
    str | None,
    Query(
        pattern=(
            f"^({BulkJobStatus.QUEUED}|{BulkJobStatus.RUNNING}|"
            f"{BulkJobStatus.COMPLETED}|{BulkJobStatus.FAILED})$"
        )
    ),
]
UPLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorBody, "description": f"More than {MAX_ROWS:,} rows, or too many bytes"},
    415: {"model": ErrorBody, "description": "Neither text/csv nor application/json"},
}


class CsvResponse(StreamingResponse):
    media_type = "text/csv"


# A route answering CSV would document its error responses as CSV too; they are JSON.
REPORT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "One line per processed row, after a header line.",
        "content": {"text/csv": {"schema": {"type": "string"}}},
    },
    **{
        status: {
            "description": response["description"],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        }
        for status, response in ERROR_RESPONSES.items()
    },
}


@router.post(
    "/points/bulk-awards",
    status_code=202,
    openapi_extra=UPLOAD_OPENAPI,
    responses=UPLOAD_RESPONSES,
)
@body_limit("bulk_upload_max_bytes", spool=True)
async def create_bulk_award(
    request: Request,
    response: Response,
    session: DbSession,
    principal: PointsBulkWriter,
    reason: Annotated[
        str | None,
        Query(max_length=1000, description="The reason for rows that give none."),
    ] = None,
) -> BulkJobOut:
    """Queue points awards for many members: a CSV file with a header row (`member_id` or
    `email`, `points`, and optionally `reason`, `reference_id`, `expires_at`) or JSON
    `{"reason": ..., "rows": [...]}`. The upload's structure is checked (422 with the line
    otherwise, and nothing is stored); the rows are applied by the worker. Follow the job at
    `links.self`; each row's outcome is in `links.rows`."""
    job = await service.create_bulk_award(
        session,
        principal,
        media_type=request.headers.get("content-type", ""),
        # Received into a temporary file before the transaction, within its limit.
        body=spooled_body(request),
        default_reason=reason,
    )
    out = service.job_out(job)
    response.headers["Location"] = out.links.self
    return out


@router.get("/points/bulk-awards")
async def list_bulk_awards(
    session: DbSession, principal: PointsBulkWriter, page: Pages, status: StatusFilter = None
) -> Page[BulkJobOut]:
    """Bulk award jobs, newest first."""
    jobs = await BulkRepository(session).list_jobs(
        organisation_ids=principal.visible_organisation_ids,
        status=status,
        before_id=page.after_id,
        limit=page.limit,
    )
    items, pagination = build_page(jobs, page.limit)
    return Page(data=[service.job_out(job) for job in items], pagination=pagination)


@router.get("/points/bulk-awards/{job_id}")
async def get_bulk_award(
    job_id: IdPath, session: DbSession, principal: PointsBulkWriter
) -> BulkJobOut:
    """The job's status, counts per outcome, progress and timestamps."""
    return service.job_out(await service.get_job(session, principal, job_id))


@router.get("/points/bulk-awards/{job_id}/rows")
async def list_bulk_award_rows(
    job_id: IdPath,
    session: DbSession,
    principal: PointsBulkWriter,
    page: Pages,
    outcome: OutcomeFilter = None,
) -> Page[BulkRowOut]:
    """The outcome of each processed row, in row order."""
    job = await service.get_job(session, principal, job_id)
    rows = await BulkRepository(session).list_rows(
        job.id, outcome=outcome, after_row=page.after_id, limit=page.limit
    )
    items, pagination = build_page(rows, page.limit, key="row_number")
    return Page(data=[service.row_out(row) for row in items], pagination=pagination)


@router.get(
    "/points/bulk-awards/{job_id}/rows.csv",
    response_class=CsvResponse,
    responses=REPORT_RESPONSES,
)
async def bulk_award_report(
    job_id: IdPath,
    request: Request,
    session: DbSession,
    principal: PointsBulkWriter,
    outcome: OutcomeFilter = None,
) -> CsvResponse:
    """The whole outcome report as CSV (columns as in `rows`), streamed."""
    job = await service.get_job(session, principal, job_id)
    return CsvResponse(
        service.report_lines(request.app.state.db, job.id, outcome),
        headers={"Content-Disposition": f'attachment; filename="{job.public_id}-rows.csv"'},
    )
