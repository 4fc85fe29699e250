"""Integrations: seed 003's integration dashboard (connected integrations, last sync,
pending updates, today's activity, errors, performance, open incidents), and a page per
integration with its health, its sync runs and their records, its open conflicts (settled
from the page) and a form that starts a sync.

Every figure comes from the service calls behind `GET /api/v1/sync/status`,
`/api/v1/external/sync/status`, `/api/v1/external/sync/activity`,
`/api/v1/integrations/{id}/health`, `.../runs`, `.../conflicts` and
`/api/v1/sync-runs/{id}/records`, with their scopes and organisation visibility; the forms
call what `POST /api/v1/integrations/{id}/sync` and `POST /api/v1/crm-conflicts/{id}/resolve`
call. Credentials are never shown, nor the integration's settings (they may hold
addresses and names that are nobody's business on a dashboard): only which credentials are
set.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Query, Request
from starlette.responses import Response

from memberhub.auth.principal import Principal
from memberhub.auth.roles import Scope
from memberhub.console.session import console_session
from memberhub.console.web import ConsoleDb, ConsoleRoute, SignedInStaff, redirect, render
from memberhub.crm import service as crm_service
from memberhub.crm import sync
from memberhub.integrations import service
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.schemas import HealthOut
from memberhub.kit.clock import utcnow
from memberhub.kit.types import IdPath

router = APIRouter(
    prefix="/console/integrations", route_class=ConsoleRoute, include_in_schema=False
)
RECENT_RUNS = 20
OPEN_CONFLICTS = 50
RUN_RECORDS = 100


def _hub(request: Request) -> IntegrationHub:
    hub: IntegrationHub = request.app.state.integrations
    return hub


def start_of_day(moment: datetime) -> datetime:
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def overall_success_rate(healths: list[HealthOut]) -> float | None:
    """The share of all integrations' calls in the window that succeeded, as each
    integration's `success_rate` counts it."""
    calls = sum(h.calls for h in healths)
    return round(100.0 * sum(h.succeeded for h in healths) / calls, 2) if calls else None


def average_uptime(healths: list[HealthOut]) -> float | None:
    """The mean of the integrations' 30-day uptimes, each integration counting once."""
    known = [h.uptime_percent for h in healths if h.uptime_percent is not None]
    return round(sum(known) / len(known), 3) if known else None


@router.get("")
async def dashboard(request: Request, session: ConsoleDb, signed_in: SignedInStaff) -> Response:
    principal = signed_in.principal
    principal.require_scope(Scope.INTEGRATIONS_READ)
    status = await service.sync_status(session, principal)
    crm_status = await crm_service.external_status(session, principal)
    activity = await crm_service.activity(session, principal, since=start_of_day(utcnow()))
    # The integrations the status lists (those the principal sees), read at once; one
    # added meanwhile is listed without its health.
    visible = await service.list_integrations(
        session, principal, after_id=None, limit=len(status.integrations)
    )
    healths: dict[str, HealthOut] = {
        integration.public_id: await service.health(session, integration, hub=_hub(request))
        for integration in visible
    }
    return render(
        request,
        "integrations.html",
        {
            "title": "Integrations",
            "status": status,
            "crm": crm_status,
            "activity": activity,
            "healths": healths,
            "success_rate": overall_success_rate(list(healths.values())),
            "uptime": average_uptime(list(healths.values())),
            "open_incidents": [i for i in status.integrations if i.open_incident_since],
        },
    )


async def _crm_view(
    session: ConsoleDb, principal: Principal, integration_id: str
) -> dict[str, Any]:
    """Runs and open conflicts of a CRM integration, as its API routes list them."""
    integration, _ = await crm_service.crm_integration(session, principal, integration_id)
    runs = await crm_service.list_runs(session, integration, after_id=None, limit=RECENT_RUNS)
    conflicts = await crm_service.list_conflicts(
        session, integration, status="open", after_id=None, limit=OPEN_CONFLICTS
    )
    return {
        "runs": [crm_service.run_out(r, integration_id) for r in runs[:RECENT_RUNS]],
        "more_runs": len(runs) > RECENT_RUNS,
        "conflicts": [
            crm_service.conflict_out(c, integration_id) for c in conflicts[:OPEN_CONFLICTS]
        ],
        "more_conflicts": len(conflicts) > OPEN_CONFLICTS,
    }


@router.get("/{integration_id}")
async def integration_page(
    request: Request, integration_id: IdPath, session: ConsoleDb, signed_in: SignedInStaff
) -> Response:
    principal = signed_in.principal
    principal.require_scope(Scope.INTEGRATIONS_READ)
    integration = await service.get_integration(session, principal, integration_id)
    health = await service.health(session, integration, hub=_hub(request))
    is_crm = sync.crm_of(integration) is not None
    context: dict[str, Any] = {
        "title": integration.name,
        "integration": integration,
        "credential_names": sorted(integration.credential_hints),
        "health": health,
        "is_crm": is_crm,
        "can_write": Scope.INTEGRATIONS_WRITE in principal.scopes,
    }
    if is_crm:
        context.update(await _crm_view(session, principal, integration_id))
    return render(request, "integration.html", context)


@router.get("/{integration_id}/runs/{run_id}")
async def run_page(
    request: Request,
    integration_id: IdPath,
    run_id: IdPath,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    outcome: Annotated[
        str | None, Query(pattern="^(created|updated|failed|conflict)?$", max_length=10)
    ] = None,
) -> Response:
    """One run and what it did to each record (as `GET /api/v1/sync-runs/{id}/records`)."""
    principal = signed_in.principal
    principal.require_scope(Scope.INTEGRATIONS_READ)
    run, integration = await crm_service.get_run(session, principal, run_id)
    if integration.public_id != integration_id:
        raise crm_service.SyncRunNotFound(f"Sync run {run_id} does not exist.")
    outcome = outcome or None  # the form's "all"
    rows = await crm_service.list_records(
        session, run, outcome=outcome, after_id=None, limit=RUN_RECORDS
    )
    return render(
        request,
        "sync_run.html",
        {
            "title": f"Sync run {run.public_id}",
            "integration": integration,
            "run": crm_service.run_out(run, integration.public_id),
            "records": [crm_service.record_out(r) for r in rows[:RUN_RECORDS]],
            "more_records": len(rows) > RUN_RECORDS,
            "outcome": outcome,
        },
    )


@router.post("/{integration_id}/sync")
async def start_sync(
    request: Request,
    integration_id: IdPath,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    mode: Annotated[Literal["push", "pull"], Form()],
    dry_run: Annotated[Literal["on"] | None, Form()] = None,
) -> Response:
    """As `POST /api/v1/integrations/{id}/sync`: queues the run for the worker."""
    principal = signed_in.principal
    principal.require_scope(Scope.INTEGRATIONS_WRITE)
    run = await crm_service.start_run(
        session, principal, integration_id, mode=mode, dry_run=dry_run == "on"
    )
    kind = "dry run" if run.dry_run else "run"
    console_session(request).flash(f"Queued a {mode} {kind} ({run.public_id}).")
    return redirect(f"/console/integrations/{integration_id}")


@router.post("/conflicts/{conflict_id}/resolve")
async def resolve_conflict(
    request: Request,
    conflict_id: IdPath,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    keep: Annotated[Literal["memberhub", "crm"], Form()],
) -> Response:
    """As `POST /api/v1/crm-conflicts/{id}/resolve`."""
    principal = signed_in.principal
    principal.require_scope(Scope.INTEGRATIONS_WRITE)
    conflict, integration = await crm_service.resolve_conflict(
        session, principal, conflict_id, keep=keep
    )
    side = "memberhub's" if keep == "memberhub" else "the CRM's"
    console_session(request).flash(
        f"Conflict {conflict.public_id} resolved: kept {side} {conflict.field}."
    )
    return redirect(f"/console/integrations/{integration.public_id}")
