from __future__ import annotations

from fastapi import APIRouter

from memberhub.auth.dependencies import IntegrationsReader, IntegrationsWriter
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.types import IdPath
from memberhub.search import service
from memberhub.search.schemas import SearchStatusOut

router = APIRouter(
    prefix="/api/v1", tags=["search index"], responses=ERROR_RESPONSES, route_class=UnitOfWorkRoute
)


@router.get("/integrations/{integration_id}/search")
async def search_status(
    integration_id: IdPath, session: DbSession, principal: IntegrationsReader
) -> SearchStatusOut:
    """Where the search-index sync stands: the feed position its indices reflect, what is
    still to send, and the last error."""
    return await service.status(session, principal, integration_id)


@router.post("/integrations/{integration_id}/search/reindex", status_code=202)
async def reindex(
    integration_id: IdPath, session: DbSession, principal: IntegrationsWriter
) -> SearchStatusOut:
    """Rebuild the integration's indices from the database: the worker swaps in indices
    holding exactly the active rewards (and consenting members, when the directory is on)."""
    return await service.request_reindex(session, principal, integration_id)
