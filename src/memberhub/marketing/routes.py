from __future__ import annotations

from fastapi import APIRouter, Response

from memberhub.auth.dependencies import IntegrationsReader, IntegrationsWriter
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.types import IdPath
from memberhub.marketing import service
from memberhub.marketing.schemas import (
    MarketingDryRunOut,
    MarketingStatusOut,
    MarketingSyncRequest,
)

router = APIRouter(
    prefix="/api/v1",
    tags=["marketing lists"],
    responses=ERROR_RESPONSES,
    route_class=UnitOfWorkRoute,
)


@router.get("/integrations/{integration_id}/marketing")
async def marketing_status(
    integration_id: IdPath, session: DbSession, principal: IntegrationsReader
) -> MarketingStatusOut:
    """Where the audience sync stands: the feed position it reflects, members by status at
    the vendor, segments, journey firings, the last run's calls and the last error."""
    return await service.status(session, principal, integration_id)


@router.post(
    "/integrations/{integration_id}/marketing/sync",
    status_code=202,
    responses={200: {"model": MarketingDryRunOut, "description": "The dry run's plan."}},
)
async def marketing_sync(
    integration_id: IdPath,
    body: MarketingSyncRequest,
    session: DbSession,
    principal: IntegrationsWriter,
    response: Response,
) -> MarketingStatusOut | MarketingDryRunOut:
    """Ask the worker for a run (`full`: compare every member, not only recent changes), or,
    with `dry_run`, answer 200 with what a run would send now: member writes, the calls they
    take, segment changes. A dry run sends and records nothing."""
    result = await service.request_sync(session, principal, integration_id, body)
    if isinstance(result, MarketingDryRunOut):
        response.status_code = 200
    return result
