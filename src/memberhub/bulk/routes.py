from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from memberhub.auth.dependencies import PointsBulkWriter
from memberhub.bulk import service
from memberhub.bulk.member_import import ImportOptions
from memberhub.bulk.models import BulkJobStatus, BulkOperation, RowOutcome
from memberhub.bulk.repository import BulkRepository
from memberhub.bulk.schemas import (
    MEMBER_IMPORT_OPENAPI,
    UPLOAD_OPENAPI,
    BulkJobOut,
    BulkRowOut,
    ImportRowOut,
    MemberImportOut,
)
from memberhub.bulk.upload import MAX_ROWS
from memberhub.kit.errors import ValidationFailed
from memberhub.kit.http import (
    ERROR_RESPONSES,
    DbSession,
    DuplicateKeys,
    UnitOfWorkRoute,
    body_limit,
    error_doc,
    spooled_body,
    unique_keys,
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
    413: error_doc(f"More than {MAX_ROWS:,} rows, or too many bytes"),
    415: error_doc("Neither text/csv nor application/json"),
}


class CsvResponse(StreamingResponse):
    media_type = "text/csv"


# The errors of a route answering CSV are JSON all the same (ERROR_RESPONSES says so).
REPORT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "One line per processed row, after a header line.",
        "content": {"text/csv": {"schema": {"type": "string"}}},
    },
    **ERROR_RESPONSES,
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


# ---------------------------------------------------------------- member imports

imports_router = APIRouter(
    prefix="/api/v1/imports/members",
    tags=["member imports"],
    route_class=UnitOfWorkRoute,
    responses=ERROR_RESPONSES,
)
IMPORT_UPLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    **UPLOAD_RESPONSES,
    415: error_doc("Neither text/csv nor application/x-ndjson"),
}


def _import_options(
    match_by: str, organisation_id: str | None, plan_id: str | None, mapping: str | None
) -> ImportOptions:
    try:
        parsed_mapping = json.loads(mapping, object_pairs_hook=unique_keys) if mapping else {}
    except DuplicateKeys as exc:
        raise ValidationFailed(
            f"mapping names a column twice: {exc}.",
            details={"field": "mapping", "type": "duplicate_key"},
        ) from None
    except (ValueError, RecursionError):
        raise ValidationFailed(
            'mapping must be a JSON object such as {"E-mail": "email"}.',
            details={"field": "mapping"},
        ) from None
    try:
        return ImportOptions.model_validate(
            {
                "match_by": match_by,
                "organisation_id": organisation_id,
                "plan_id": plan_id,
                "mapping": parsed_mapping,
            }
        )
    except ValidationError as exc:
        raise ValidationFailed(
            "The import's options are not valid.",
            details={
                "fields": [
                    {
                        "loc": ["query", *(str(part) for part in error["loc"])],
                        "message": error["msg"],
                        "type": error["type"],
                    }
                    for error in exc.errors()
                ]
            },
        ) from None


@imports_router.post(
    "", status_code=202, openapi_extra=MEMBER_IMPORT_OPENAPI, responses=IMPORT_UPLOAD_RESPONSES
)
@body_limit("bulk_upload_max_bytes", spool=True)
async def create_member_import(
    request: Request,
    response: Response,
    session: DbSession,
    principal: PointsBulkWriter,
    dry_run: Annotated[
        bool, Query(description="Check and report every row, then roll all of it back.")
    ] = False,
    match_by: Annotated[
        str,
        Query(
            pattern="^(email|external_id)$",
            description="How a row finds its member: by email within its organisation, or by "
            "the row's external_id (SYSTEM:ID).",
        ),
    ] = "email",
    organisation_id: Annotated[
        str | None, Query(max_length=45, description="For rows that give none.")
    ] = None,
    plan_id: Annotated[
        str | None,
        Query(max_length=45, description="The plan members join, for rows that give none."),
    ] = None,
    mapping: Annotated[
        str | None,
        Query(
            max_length=20000,
            description='The file\'s column for each field, as JSON: {"E-mail": "email"}.',
        ),
    ] = None,
) -> MemberImportOut:
    """Import members from CSV or JSON Lines: create new ones, update matched ones, join a
    plan, and give opening points balances. The upload's structure and the options are
    checked now (422 with the line otherwise, nothing stored); the worker applies the rows.
    Re-running the same file changes nothing. Follow the job at `links.self`."""
    options = _import_options(match_by, organisation_id, plan_id, mapping)
    job = await service.create_member_import(
        session,
        principal,
        media_type=request.headers.get("content-type", ""),
        body=spooled_body(request),
        options=options,
        dry_run=dry_run,
    )
    out = service.import_out(job)
    response.headers["Location"] = out.links.self
    return out


@imports_router.get("")
async def list_member_imports(
    session: DbSession, principal: PointsBulkWriter, page: Pages, status: StatusFilter = None
) -> Page[MemberImportOut]:
    """Member imports, newest first."""
    jobs = await BulkRepository(session).list_jobs(
        organisation_ids=principal.visible_organisation_ids,
        status=status,
        before_id=page.after_id,
        limit=page.limit,
        operation=BulkOperation.MEMBER_IMPORT,
    )
    items, pagination = build_page(jobs, page.limit)
    return Page(data=[service.import_out(job) for job in items], pagination=pagination)


@imports_router.get("/{import_id}")
async def get_member_import(
    import_id: IdPath, session: DbSession, principal: PointsBulkWriter
) -> MemberImportOut:
    """The import's status, counts and progress."""
    job = await service.get_job(session, principal, import_id, BulkOperation.MEMBER_IMPORT)
    return service.import_out(job)


@imports_router.get("/{import_id}/rows")
async def list_member_import_rows(
    import_id: IdPath,
    session: DbSession,
    principal: PointsBulkWriter,
    page: Pages,
    failed: Annotated[bool, Query(description="Only the rows that were refused.")] = False,
) -> Page[ImportRowOut]:
    """What each processed row did (or would do, in a dry run), in row order."""
    job = await service.get_job(session, principal, import_id, BulkOperation.MEMBER_IMPORT)
    rows = await BulkRepository(session).list_rows(
        job.id,
        outcome=RowOutcome.FAILED if failed else None,
        after_row=page.after_id,
        limit=page.limit,
    )
    items, pagination = build_page(rows, page.limit, key="row_number")
    return Page(data=[service.import_row_out(row) for row in items], pagination=pagination)


@imports_router.get("/{import_id}/rows.csv", response_class=CsvResponse, responses=REPORT_RESPONSES)
async def member_import_report(
    import_id: IdPath,
    request: Request,
    session: DbSession,
    principal: PointsBulkWriter,
    failed: Annotated[bool, Query(description="Only the rows that were refused.")] = False,
) -> CsvResponse:
    """The whole report as CSV (columns as in `rows`), streamed."""
    job = await service.get_job(session, principal, import_id, BulkOperation.MEMBER_IMPORT)
    return CsvResponse(
        service.import_report_lines(request.app.state.db, job.id, failed),
        headers={"Content-Disposition": f'attachment; filename="{job.public_id}-rows.csv"'},
    )
