"""Staff accounts (admins): the list, a new account, an account's role, organisation and
active flag, and ending a lockout. The same service functions and checks as
`/api/v1/staff`: `staff:read` to look, `staff:write` to change, and an organisation-bound
admin reaches and hands out only their own organisations.

A generated first password is shown on the page that answers the form, once; it is never
put in the session cookie (no flash) and never logged."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from memberhub.auth.principal import Principal
from memberhub.auth.roles import Scope
from memberhub.console.session import console_session
from memberhub.console.web import ConsoleDb, ConsoleRoute, SignedInStaff, redirect, render
from memberhub.kit.clock import utcnow
from memberhub.kit.errors import MemberhubError
from memberhub.kit.pagination import build_page, cursor_after_id
from memberhub.kit.types import IdPath, Name
from memberhub.organisations.repository import OrganisationRepository
from memberhub.staff import service
from memberhub.staff.models import StaffUser
from memberhub.staff.repository import StaffRepository

router = APIRouter(prefix="/console/staff", route_class=ConsoleRoute, include_in_schema=False)
PAGE_SIZE = 50
ROLES = tuple(role.value for role in service.STAFF_ROLES)
RoleField = Annotated[str, Form(pattern="^(" + "|".join(ROLES) + ")$")]
# Empty: installation-wide.
OrganisationField = Annotated[
    str | None, Form(alias="organisation_id", pattern=r"^[a-z]{2,4}_[0-9a-z]{1,40}$")
]
Cursor = Annotated[str | None, Query(max_length=512)]
# Suggested in the organisation fields (any visible organisation id may still be typed).
ORGANISATION_CHOICES = 200


async def organisation_choices(
    session: AsyncSession, principal: Principal
) -> list[tuple[str, str]]:
    """(public id, name) of the organisations the user may hand access to, for a datalist."""
    if Scope.ORGANISATIONS_READ not in principal.scopes:
        return []
    rows = await OrganisationRepository(session).list(
        visible_ids=principal.visible_organisation_ids,
        parent_id=None,
        after_id=None,
        limit=ORGANISATION_CHOICES,
    )
    return [(o.public_id, o.name) for o in rows[:ORGANISATION_CHOICES]]


async def _rows(session: AsyncSession, staff: list[StaffUser]) -> list[dict[str, Any]]:
    organisations = await OrganisationRepository(session).public_ids(
        {s.organisation_id for s in staff if s.organisation_id is not None}
    )
    now = utcnow()
    return [
        {
            "staff": s,
            "organisation_id": organisations.get(s.organisation_id)
            if s.organisation_id is not None
            else None,
            "locked": service.is_locked(s, now),
        }
        for s in staff
    ]


async def _list_page(
    request: Request,
    session: AsyncSession,
    principal: Principal,
    *,
    cursor: str | None = None,
    error: str | None = None,
    form: dict[str, str] | None = None,
    status_code: int = 200,
) -> Response:
    rows = await StaffRepository(session).list(
        organisation_ids=principal.visible_organisation_ids,
        after_id=cursor_after_id(cursor),
        limit=PAGE_SIZE,
    )
    items, pagination = build_page(rows, PAGE_SIZE)
    return render(
        request,
        "staff.html",
        {
            "title": "Staff",
            "rows": await _rows(session, items),
            "roles": ROLES,
            "organisations": await organisation_choices(session, principal),
            "next_cursor": pagination.next_cursor,
            "error": error,
            "form": form or {},
            "can_write": Scope.STAFF_WRITE in principal.scopes,
        },
        status_code=status_code,
    )


@router.get("")
async def list_staff(
    request: Request, session: ConsoleDb, signed_in: SignedInStaff, cursor: Cursor = None
) -> Response:
    signed_in.principal.require_scope(Scope.STAFF_READ)
    return await _list_page(request, session, signed_in.principal, cursor=cursor)


@router.post("")
async def create_staff(
    request: Request,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    email: Annotated[str, Form(min_length=3, max_length=320)],
    name: Annotated[Name, Form()],
    role: RoleField,
    organisation_id: OrganisationField = None,
    password: Annotated[str | None, Form(min_length=12, max_length=200)] = None,
) -> Response:
    """As `POST /api/v1/staff`."""
    principal = signed_in.principal
    principal.require_scope(Scope.STAFF_WRITE)
    try:
        created = await service.create_staff(
            session,
            principal,
            email=email,
            name=name,
            role=role,
            organisation_public_id=organisation_id or None,
            password=password or None,
        )
    except MemberhubError as exc:
        await session.rollback()
        form = {"email": email, "name": name, "role": role, "organisation_id": organisation_id}
        return await _list_page(
            request,
            session,
            principal,
            error=exc.message,
            form={k: v or "" for k, v in form.items()},
            status_code=exc.status_code,
        )
    if created.one_time_password is None:
        console_session(request).flash(f"Staff account {created.staff.email} created.")
        return redirect(f"/console/staff/{created.staff.public_id}")
    return render(
        request,
        "staff_created.html",
        {
            "title": "Staff account created",
            "staff": created.staff,
            "one_time_password": created.one_time_password,
        },
        status_code=201,
    )


async def _detail(
    request: Request,
    session: AsyncSession,
    principal: Principal,
    staff: StaffUser,
    *,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    row = (await _rows(session, [staff]))[0]
    return render(
        request,
        "staff_member.html",
        {
            "title": f"Staff {staff.email}",
            **row,
            "roles": ROLES,
            "organisations": await organisation_choices(session, principal),
            "error": error,
            "can_write": Scope.STAFF_WRITE in principal.scopes,
            "is_self": staff.public_id == principal.key_public_id,
        },
        status_code=status_code,
    )


@router.get("/{staff_id}")
async def detail(
    request: Request, staff_id: IdPath, session: ConsoleDb, signed_in: SignedInStaff
) -> Response:
    principal = signed_in.principal
    principal.require_scope(Scope.STAFF_READ)
    staff = await service.get_staff(session, principal, staff_id)
    return await _detail(request, session, principal, staff)


@router.post("/{staff_id}")
async def update_staff(
    request: Request,
    staff_id: IdPath,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    name: Annotated[Name, Form()],
    role: RoleField,
    organisation_id: OrganisationField = None,
    active: Annotated[bool, Form()] = False,
) -> Response:
    """As `PATCH /api/v1/staff/{id}` with every field given: the form shows them all, so an
    empty organisation makes the account installation-wide and an unticked box deactivates
    it. A change of access ends the account's sessions (this one carries on when it is the
    signed-in user's own)."""
    principal = signed_in.principal
    principal.require_scope(Scope.STAFF_WRITE)
    try:
        staff = await service.update_staff(
            session,
            principal,
            staff_id,
            name=name,
            role=role,
            active=active,
            move_organisation=True,
            organisation_public_id=organisation_id or None,
        )
    except MemberhubError as exc:
        await session.rollback()
        staff = await service.get_staff(session, principal, staff_id)
        return await _detail(
            request, session, principal, staff, error=exc.message, status_code=exc.status_code
        )
    await session.flush()
    if staff.public_id == signed_in.staff.public_id:
        console_session(request).set_version(staff.session_version)
    console_session(request).flash(f"Staff account {staff.email} saved.")
    return redirect(f"/console/staff/{staff.public_id}")


@router.post("/{staff_id}/unlock")
async def unlock_staff(
    request: Request, staff_id: IdPath, session: ConsoleDb, signed_in: SignedInStaff
) -> Response:
    """As `POST /api/v1/staff/{id}/unlock`."""
    principal = signed_in.principal
    principal.require_scope(Scope.STAFF_WRITE)
    staff = await service.unlock_staff(session, principal, staff_id)
    console_session(request).flash(f"Staff account {staff.email} can sign in again.")
    return redirect(f"/console/staff/{staff.public_id}")
