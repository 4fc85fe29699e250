"""API keys (admins): the list, a new key (its role, scopes, organisation and rate limit),
and revoking. The same service functions and checks as `/api/v1/api-keys`: `api_keys:read`
to look, `api_keys:write` to issue or revoke, and an organisation-bound admin hands out
keys only within their own organisations.

A new key's secret is shown on the page that answers the form, once: it is never put in
the session cookie (no flash), never logged, and only its digest is stored."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from memberhub.auth import service
from memberhub.auth.models import ApiKey
from memberhub.auth.principal import Principal
from memberhub.auth.repository import ApiKeyRepository
from memberhub.auth.roles import ROLE_SCOPES, Role, Scope
from memberhub.console.pages.staff import organisation_choices
from memberhub.console.session import console_session
from memberhub.console.web import ConsoleDb, ConsoleRoute, SignedInStaff, redirect, render
from memberhub.kit.errors import MemberhubError, ValidationFailed
from memberhub.kit.pagination import build_page, cursor_after_id
from memberhub.kit.types import IdPath, Name
from memberhub.organisations.repository import OrganisationRepository

router = APIRouter(prefix="/console/keys", route_class=ConsoleRoute, include_in_schema=False)
PAGE_SIZE = 50
ROLES = tuple(role.value for role in Role)
Cursor = Annotated[str | None, Query(max_length=512)]


async def _rows(session: AsyncSession, api_keys: list[ApiKey]) -> list[dict[str, Any]]:
    organisations = await OrganisationRepository(session).public_ids(
        {k.organisation_id for k in api_keys if k.organisation_id is not None}
    )
    return [
        {
            "key": k,
            "scopes": k.scopes.get("scopes"),
            "organisation_id": organisations.get(k.organisation_id)
            if k.organisation_id is not None
            else None,
        }
        for k in api_keys
    ]


async def _list_page(
    request: Request,
    session: AsyncSession,
    principal: Principal,
    *,
    cursor: str | None = None,
    error: str | None = None,
    form: dict[str, Any] | None = None,
    status_code: int = 200,
) -> Response:
    rows = await ApiKeyRepository(session).list(
        organisation_ids=principal.visible_organisation_ids,
        after_id=cursor_after_id(cursor),
        limit=PAGE_SIZE,
    )
    items, pagination = build_page(rows, PAGE_SIZE)
    return render(
        request,
        "keys.html",
        {
            "title": "API keys",
            "rows": await _rows(session, items),
            "roles": ROLES,
            "role_scopes": {role.value: {s.value for s in ROLE_SCOPES[role]} for role in Role},
            "all_scopes": [s.value for s in Scope],
            "organisations": await organisation_choices(session, principal),
            "next_cursor": pagination.next_cursor,
            "error": error,
            "form": form or {},
            "can_write": Scope.API_KEYS_WRITE in principal.scopes,
        },
        status_code=status_code,
    )


@router.get("")
async def list_keys(
    request: Request, session: ConsoleDb, signed_in: SignedInStaff, cursor: Cursor = None
) -> Response:
    signed_in.principal.require_scope(Scope.API_KEYS_READ)
    return await _list_page(request, session, signed_in.principal, cursor=cursor)


@router.post("")
async def create_key(
    request: Request,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    name: Annotated[Name, Form()],
    role: Annotated[str, Form(pattern="^(" + "|".join(ROLES) + ")$")],
    scopes: Annotated[list[str] | None, Form()] = None,
    organisation_id: Annotated[
        str | None, Form(pattern=r"^[a-z]{2,4}_[0-9a-z]{1,40}$", max_length=45)
    ] = None,
    rate_limit: Annotated[str | None, Form(max_length=50, pattern=r"^[^\x00]*$")] = None,
) -> Response:
    """As `POST /api/v1/api-keys`. No scope ticked: every scope of the role."""
    principal = signed_in.principal
    principal.require_scope(Scope.API_KEYS_WRITE)
    chosen = [s for s in scopes or [] if s]
    try:
        if len(chosen) > len(Scope):
            raise ValidationFailed("Too many scopes.", details={"field": "scopes"})
        await service.require_grantable(
            session, principal, organisation_id or None, role=Role(role), scopes=chosen or None
        )
        issued = await service.create_api_key(
            session,
            principal.actor,
            name=name,
            role=Role(role),
            scopes=chosen or None,
            organisation_public_id=organisation_id or None,
            rate_limit=(rate_limit or "").strip() or None,
        )
    except MemberhubError as exc:
        await session.rollback()
        form = {
            "name": name,
            "role": role,
            "scopes": chosen,
            "organisation_id": organisation_id or "",
            "rate_limit": rate_limit or "",
        }
        return await _list_page(
            request,
            session,
            principal,
            error=exc.message,
            form=form,
            status_code=exc.status_code,
        )
    row = (await _rows(session, [issued.api_key]))[0]
    return render(
        request,
        "key_created.html",
        {"title": "API key created", **row, "secret": issued.secret},
        status_code=201,
    )


@router.post("/{key_id}/revoke")
async def revoke_key(
    request: Request, key_id: IdPath, session: ConsoleDb, signed_in: SignedInStaff
) -> Response:
    """As `POST /api/v1/api-keys/{id}/revoke`: the key is refused from now on."""
    principal = signed_in.principal
    principal.require_scope(Scope.API_KEYS_WRITE)
    api_key = await service.revoke_api_key(session, principal.actor, key_id, principal=principal)
    console_session(request).flash(f"API key {api_key.public_id} ({api_key.name}) revoked.")
    return redirect("/console/keys")
