"""The signed-in user's account: password, and the TOTP second factor."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from memberhub.console.pages.auth import limit_attempts
from memberhub.console.session import console_session
from memberhub.console.web import ConsoleDb, ConsoleRoute, SignedIn, SignedInStaff, redirect, render
from memberhub.kit.errors import MemberhubError
from memberhub.staff import service as staff_service

router = APIRouter(prefix="/console/account", route_class=ConsoleRoute, include_in_schema=False)
Secret = Annotated[str, Form(max_length=200)]


def _page(
    request: Request,
    signed_in: SignedIn,
    *,
    error: str | None = None,
    status_code: int = 200,
    enrolment: dict[str, str] | None = None,
) -> Response:
    return render(
        request,
        "account.html",
        {
            "title": "Your account",
            "staff": signed_in.staff,
            "error": error,
            "enrolment": enrolment,
            "has_password": signed_in.staff.password_hash is not None,
        },
        status_code=status_code,
    )


async def _refused(
    request: Request, session: AsyncSession, signed_in: SignedIn, exc: MemberhubError
) -> Response:
    """The page again with the error; a wrong password counts towards the account's lock,
    and the lock signs this session out too."""
    if exc.code == "WRONG_PASSWORD":
        settings = request.app.state.settings
        if await staff_service.record_wrong_password(session, settings, signed_in.staff):
            state = console_session(request)
            state.sign_out()
            state.flash(
                "Too many wrong passwords: the account is locked for a while and every "
                "session of it is signed out."
            )
            return redirect("/console/sign-in")
    return _page(request, signed_in, error=exc.message, status_code=exc.status_code)


@router.get("")
async def account(request: Request, signed_in: SignedInStaff) -> Response:
    return _page(request, signed_in)


@router.post("/password")
async def change_password(
    request: Request,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    current_password: Secret,
    new_password: Secret,
) -> Response:
    await limit_attempts(request, signed_in.staff.email)
    try:
        await staff_service.change_password(
            session, signed_in.staff, current=current_password, new=new_password
        )
    except MemberhubError as exc:
        return await _refused(request, session, signed_in, exc)
    await session.flush()
    # Other sessions of this account end; this one carries on.
    console_session(request).set_version(signed_in.staff.session_version)
    console_session(request).flash("Your password is changed.")
    return redirect("/console/account")


@router.post("/totp")
async def start_totp(request: Request, session: ConsoleDb, signed_in: SignedInStaff) -> Response:
    try:
        secret, uri = staff_service.start_totp(request.app.state.secret_box, signed_in.staff)
    except MemberhubError as exc:
        return _page(request, signed_in, error=exc.message, status_code=exc.status_code)
    await session.flush()
    return _page(request, signed_in, enrolment={"secret": secret, "uri": uri})


@router.post("/totp/confirm")
async def confirm_totp(
    request: Request,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    code: Annotated[str, Form(max_length=20)],
) -> Response:
    box = request.app.state.secret_box
    try:
        staff_service.confirm_totp(session, box, signed_in.staff, code)
    except MemberhubError as exc:
        # The same secret again, to try the next code with.
        pending = staff_service.pending_totp(box, signed_in.staff)
        enrolment = {"secret": pending[0], "uri": pending[1]} if pending is not None else None
        return _page(
            request, signed_in, error=exc.message, status_code=exc.status_code, enrolment=enrolment
        )
    await session.flush()
    console_session(request).set_version(signed_in.staff.session_version)
    console_session(request).flash("Two-factor sign-in is on: you will be asked for a code.")
    return redirect("/console/account")


@router.post("/totp/disable")
async def disable_totp(
    request: Request, session: ConsoleDb, signed_in: SignedInStaff, password: Secret
) -> Response:
    await limit_attempts(request, signed_in.staff.email)
    try:
        staff_service.disable_totp(session, signed_in.staff, password=password)
    except MemberhubError as exc:
        return await _refused(request, session, signed_in, exc)
    await session.flush()
    console_session(request).set_version(signed_in.staff.session_version)
    console_session(request).flash("Two-factor sign-in is off.")
    return redirect("/console/account")
