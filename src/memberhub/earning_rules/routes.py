from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response, status

from memberhub.activities.schemas import ActivityIn
from memberhub.activities.service import simulate_activity
from memberhub.auth.dependencies import EarningRulesReader, EarningRulesWriter
from memberhub.earning_rules import service
from memberhub.earning_rules.repository import EarningRuleRepository
from memberhub.earning_rules.schemas import (
    RuleCreate,
    RuleOut,
    RulePatch,
    RuleVersionOut,
    SimulationOut,
)
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import IdPath

router = APIRouter(
    prefix="/api/v1", tags=["earning rules"], route_class=UnitOfWorkRoute, responses=ERROR_RESPONSES
)


@router.post("/earning-rules", status_code=status.HTTP_201_CREATED)
async def create_earning_rule(
    payload: RuleCreate, response: Response, session: DbSession, principal: EarningRulesWriter
) -> RuleOut:
    """Define a rule (keys bound to no organisation). It is checked as a whole: a condition
    on an unknown field or with a value of the wrong type, an unknown organisation, an
    unbounded effect or a cap that cannot apply is a 422 naming the path of each problem,
    and nothing is saved. Saved as version 1."""
    rule = await service.create_rule(session, principal, payload)
    response.headers["Location"] = f"/api/v1/earning-rules/{rule.public_id}"
    return service.to_out(rule)


@router.get("/earning-rules")
async def list_earning_rules(
    session: DbSession,
    principal: EarningRulesReader,
    page: Annotated[PageParams, Depends(page_params)],
    active: bool | None = None,
    archived: bool = False,
) -> Page[RuleOut]:
    """Rules, oldest first; archived ones only with `archived=true`."""
    rows = await EarningRuleRepository(session).list(
        active=active, archived=archived, after_id=page.after_id, limit=page.limit
    )
    items, pagination = build_page(rows, page.limit)
    return Page(data=[service.to_out(rule) for rule in items], pagination=pagination)


# Declared before /earning-rules/{rule_id}.
@router.post("/earning-rules/simulate")
async def simulate_earning_rules(
    payload: ActivityIn, session: DbSession, principal: EarningRulesReader
) -> SimulationOut:
    """Evaluate an activity (the body `POST /activities` takes) against the active rules
    and answer what each rule whose conditions hold would credit, after its caps, without
    writing anything. Recording the same activity now would credit exactly that."""
    return await simulate_activity(session, principal, payload)


@router.get("/earning-rules/{rule_id}")
async def get_earning_rule(
    rule_id: IdPath, session: DbSession, principal: EarningRulesReader
) -> RuleOut:
    """One rule, at its current version."""
    return service.to_out(await service.get_rule(session, rule_id))


@router.patch("/earning-rules/{rule_id}")
async def update_earning_rule(
    rule_id: IdPath, payload: RulePatch, session: DbSession, principal: EarningRulesWriter
) -> RuleOut:
    """Change a rule; it is checked again as a whole, and any change saves a new version
    (activities evaluated from then on name it). 409 EARNING_RULE_ARCHIVED."""
    return service.to_out(await service.update_rule(session, principal, rule_id, payload))


@router.delete("/earning-rules/{rule_id}", status_code=status.HTTP_204_NO_CONTENT)
async def archive_earning_rule(
    rule_id: IdPath, session: DbSession, principal: EarningRulesWriter
) -> None:
    """Archive a rule: it is never evaluated again, and stays readable with its versions
    (the transactions it produced name it)."""
    await service.archive_rule(session, principal, rule_id)


@router.get("/earning-rules/{rule_id}/versions")
async def list_earning_rule_versions(
    rule_id: IdPath,
    session: DbSession,
    principal: EarningRulesReader,
    page: Annotated[PageParams, Depends(page_params)],
) -> Page[RuleVersionOut]:
    """Every saved version of the rule, oldest first."""
    rule = await service.get_rule(session, rule_id)
    rows = await service.versions_page(session, rule, after_id=page.after_id, limit=page.limit)
    items, pagination = build_page(rows, page.limit)
    return Page(data=[service.version_out(rule, v) for v in items], pagination=pagination)
