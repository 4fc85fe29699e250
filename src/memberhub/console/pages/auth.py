"""Signing in (password, then a TOTP code when enrolled; or single sign-on) and out."""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import APIRouter, Form, Query, Request
from starlette.responses import Response

from memberhub.console.oidc import OidcClient, SsoFailed
from memberhub.console.session import console_session
from memberhub.console.web import (
    ConsoleDb,
    ConsoleRoute,
    end_console_session,
    redirect,
    render,
    safe_next,
    writes_on_get,
)
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.staff import service as staff_service
from memberhub.staff.repository import StaffRepository
from memberhub.staff.service import SignInResult

log = structlog.get_logger("memberhub.console.auth")

router = APIRouter(prefix="/console", route_class=ConsoleRoute, include_in_schema=False)

SECOND_FACTOR = "second_factor"
SSO = "sso"
Email = Annotated[str, Form(max_length=320)]
Secret = Annotated[str, Form(max_length=200)]
Next = Annotated[str | None, Form(max_length=500)]
NEXT_QUERY = Query(max_length=500, alias="next")


def _actor(request: Request) -> Actor:
    return Actor(
        id="console",
        request_id=getattr(request.state, "request_id", None),
        client_ip=request.client.host if request.client else None,
    )


def _oidc(request: Request) -> OidcClient | None:
    settings = request.app.state.settings
    if not settings.oidc_enabled:
        return None
    client: OidcClient | None = getattr(request.app.state, "oidc_client", None)
    if client is None:
        client = request.app.state.oidc_client = OidcClient(settings)
    return client


async def limit_attempts(request: Request, account: str | None) -> None:
    """Sign-in attempts are counted per client address and per account (429 past either)."""
    limiter = request.app.state.rate_limiter
    limit = request.app.state.settings.sign_in_rate_limit
    address = request.client.host if request.client else "unknown"
    await limiter.hit(address, limit, namespace="console-sign-in-ip")
    if account:
        await limiter.hit(account.strip().lower()[:320], limit, namespace="console-sign-in-account")


def _sign_in_page(
    request: Request,
    *,
    error: str | None = None,
    status_code: int = 200,
    next_url: str = "/console",
    email: str = "",
) -> Response:
    return render(
        request,
        "sign_in.html",
        {
            "title": "Sign in",
            "error": error,
            "email": email,
            "next_url": next_url,
            "sso_enabled": request.app.state.settings.oidc_enabled,
            "expired": console_session(request).take_expired(),
        },
        status_code=status_code,
    )


@router.get("/sign-in")
async def sign_in_form(
    request: Request, next_url: Annotated[str | None, NEXT_QUERY] = None
) -> Response:
    if console_session(request).staff_id is not None:
        return redirect(safe_next(next_url))
    return _sign_in_page(request, next_url=safe_next(next_url))


@router.post("/sign-in")
async def sign_in(
    request: Request,
    session: ConsoleDb,
    email: Email,
    password: Secret,
    next_url: Annotated[str | None, Form(max_length=500, alias="next")] = None,
) -> Response:
    await limit_attempts(request, email)
    settings = request.app.state.settings
    target = safe_next(next_url)
    outcome = await staff_service.check_password(
        session, settings, _actor(request), email=email, password=password
    )
    state = console_session(request)
    if outcome.result in (SignInResult.LOCKED, SignInResult.INVALID) or outcome.staff is None:
        # One answer for an unknown email, a wrong password and a locked account: which
        # emails have accounts is not for anyone who asks to learn.
        return _sign_in_page(
            request,
            error="The email or password is not right. After "
            f"{settings.staff_lockout_attempts} wrong passwords an account is locked for "
            f"{settings.staff_lockout_minutes} minutes (an administrator can unlock it).",
            status_code=401,
            next_url=target,
            email=email,
        )
    staff = outcome.staff
    if outcome.result is SignInResult.NEEDS_SECOND_FACTOR:
        state.put_pending(SECOND_FACTOR, {"stf": staff.public_id, "next": target})
        return redirect("/console/sign-in/code")
    staff_service.record_sign_in(session, _actor(request), staff, "password")
    await session.flush()
    state.sign_in(staff.public_id, staff.session_version)
    return redirect(target)


@router.get("/sign-in/code")
async def second_factor_form(request: Request) -> Response:
    if console_session(request).peek_pending(SECOND_FACTOR) is None:
        return redirect("/console/sign-in")
    return render(request, "sign_in_code.html", {"title": "Enter your code"})


@router.post("/sign-in/code")
async def second_factor(
    request: Request, session: ConsoleDb, code: Annotated[str, Form(max_length=20)]
) -> Response:
    state = console_session(request)
    pending = state.peek_pending(SECOND_FACTOR)
    staff = None
    if pending is not None and isinstance(pending.get("stf"), str):
        staff = await StaffRepository(session).get_by_public_id(pending["stf"])
    if staff is None:
        state.take_pending(SECOND_FACTOR)
        state.flash("The sign-in took too long; start again.")
        return redirect("/console/sign-in")
    await limit_attempts(request, staff.email)
    outcome = await staff_service.check_second_factor(
        session,
        request.app.state.settings,
        request.app.state.secret_box,
        _actor(request),
        staff,
        code,
    )
    if outcome.result is not SignInResult.SIGNED_IN:
        locked = outcome.result is SignInResult.LOCKED
        if locked:
            state.take_pending(SECOND_FACTOR)
        return render(
            request,
            "sign_in_code.html",
            {
                "title": "Enter your code",
                "error": "This account is locked after too many failed attempts."
                if locked
                else "The code is not right; try the current one.",
            },
            status_code=403 if locked else 401,
        )
    state.take_pending(SECOND_FACTOR)
    staff_service.record_sign_in(session, _actor(request), staff, "password+totp")
    await session.flush()
    state.sign_in(staff.public_id, staff.session_version)
    return redirect(safe_next(pending.get("next") if pending else None))


@router.post("/sign-out")
async def sign_out(request: Request, session: ConsoleDb) -> Response:
    """End the session: the browser forgets its cookie, and the session is recorded as
    ended, so a copy of the cookie kept elsewhere signs no one in either."""
    state = console_session(request)
    if state.signed_in_as is not None:
        await end_console_session(request, session, state.signed_in_as)
    state.sign_out()
    state.flash("You are signed out.")
    return redirect("/console/sign-in")


@router.get("/auth/sso")
async def sso_start(
    request: Request, next_url: Annotated[str | None, NEXT_QUERY] = None
) -> Response:
    client = _oidc(request)
    if client is None:
        return _sign_in_page(request, error="Single sign-on is not configured.", status_code=404)
    await limit_attempts(request, None)
    started = await client.start()
    console_session(request).put_pending(
        SSO,
        {
            "state": started.state,
            "nonce": started.nonce,
            "verifier": started.code_verifier,
            "next": safe_next(next_url),
        },
    )
    return redirect(started.url)


@router.get("/auth/callback")
@writes_on_get
async def sso_callback(
    request: Request,
    session: ConsoleDb,
    code: Annotated[str | None, Query(max_length=2000)] = None,
    state: Annotated[str | None, Query(max_length=500)] = None,
    error: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    client = _oidc(request)
    pending = console_session(request).take_pending(SSO)
    if client is None or pending is None or error is not None or not code or not state:
        raise SsoFailed()
    if state != pending.get("state"):
        raise SsoFailed()
    identity = await client.finish(
        code=code, code_verifier=str(pending.get("verifier")), nonce=str(pending.get("nonce"))
    )
    staff = await staff_service.staff_for_sso(
        session, request.app.state.settings, _actor(request), identity.email
    )
    if staff is None:
        log.info("sso_email_not_allowed")
        raise SsoFailed("No active staff account matches your email address.")
    if staff_service.is_locked(staff, utcnow()):
        # The lock holds whatever is tried meanwhile: single sign-on neither passes it nor
        # lifts it. The provider proved who this is, so the answer may say why.
        log.info("sso_account_locked")
        raise SsoFailed(
            "This account is locked after repeated failed sign-ins; try again later, or ask "
            "an admin to unlock it."
        )
    staff_service.record_sign_in(session, _actor(request), staff, "oidc")
    await session.flush()
    console_session(request).sign_in(staff.public_id, staff.session_version)
    return redirect(safe_next(pending.get("next")))
