"""What every console page uses: the route class (one transaction per request, the CSRF
check), the signed-in staff user, rendering, and HTML error pages."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit
from zoneinfo import ZoneInfo

import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import RedirectResponse, Response
from starlette.types import Message

from memberhub.auth.principal import Principal
from memberhub.console.navigation import visible_navigation
from memberhub.console.session import console_session, is_console_path, session_digest
from memberhub.kit.actor import Actor
from memberhub.kit.errors import Forbidden, MemberhubError, Unauthorized
from memberhub.kit.http import SAFE_METHODS, read_body, spool_body, validation_fields
from memberhub.staff import service as staff_service
from memberhub.staff.models import StaffUser
from memberhub.staff.repository import StaffRepository

log = structlog.get_logger("memberhub.console")

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


def last_day(expires_at: datetime, zone: str) -> str:
    """The last day points expiring at `expires_at` can still be used, in the program's
    time zone: an expiry at a day's first moment leaves them the day before (the form's
    "new expiry date" is that day)."""
    try:
        local = expires_at.astimezone(ZoneInfo(zone))
    except OverflowError:  # past the calendar's end there (9999-12-31 east of UTC)
        local = expires_at
    return (local - timedelta(microseconds=1)).date().isoformat()


templates.env.filters["last_day"] = last_day
CSRF_FIELD = "csrf_token"


class SignInRequired(Unauthorized):
    code = "SIGN_IN_REQUIRED"
    default_message = "Sign in to continue."


class CsrfRefused(Forbidden):
    code = "CSRF_FAILED"
    default_message = (
        "The form is out of date or was not sent from the console; reload the page and try again."
    )


async def _check_csrf(request: Request) -> None:
    form = await request.form()
    sent = form.get(CSRF_FIELD)
    expected = console_session(request).data.get("csrf")
    if (
        not isinstance(sent, str)
        or not isinstance(expected, str)
        or not hmac.compare_digest(sent.encode(), expected.encode())
    ):
        raise CsrfRefused()


# A file upload form: one file, a few fields beside it.
UPLOAD_MAX_FILES = 1
UPLOAD_MAX_FIELDS = 20
_REPLAY_BYTES = 64 * 1024


async def _received_upload(request: Request, limit_setting: str) -> Request:
    """An upload page's request (`kit.http.body_limit(..., spool=True)` on the page): refused
    before a byte is read unless someone is signed in, then received as the API receives an
    upload (`spool_body`: within the setting's limit, into a temporary file in DATA_DIR,
    before any transaction), and its multipart form parsed from that file (Starlette keeps
    the file part in memory up to 1 MiB, then in a file of the system's temporary
    directory). The returned request reads the spooled body, which is
    `request.state.spooled_body`, closed by the route."""
    if console_session(request).staff_id is None:
        raise SignInRequired()
    settings = request.app.state.settings
    spooled = await spool_body(request, getattr(settings, limit_setting), settings.data_dir)
    request.state.spooled_body = spooled

    async def replay() -> Message:
        chunk = spooled.read(_REPLAY_BYTES)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunk)}

    received = Request(request.scope, replay)
    # Parsed (and cached on the request) now, with the upload's bounds; FastAPI and the
    # CSRF check read the same form.
    await received.form(max_files=UPLOAD_MAX_FILES, max_fields=UPLOAD_MAX_FIELDS)
    return received


class ConsoleRoute(APIRoute):
    """A console page: the form's body is read within MAX_BODY_BYTES (an upload page's within
    its own limit, see `_received_upload`) and its CSRF token checked before anything else;
    then the page runs in one transaction, committed when it returns (a page may answer 401
    and still store a failed sign-in) and rolled back when it raises."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()

        writes_on_get = getattr(self.endpoint, "writes_on_get", False)
        upload_limit: str | None = getattr(self.endpoint, "body_limit_setting", None)

        async def handler(request: Request) -> Response:
            try:
                return await handle(request)
            finally:
                spooled = getattr(request.state, "spooled_body", None)
                if spooled is not None:
                    spooled.close()

        async def handle(request: Request) -> Response:
            read_only = request.method in SAFE_METHODS and not writes_on_get
            state = console_session(request)
            if state.ended is not None:
                # The session expired with this request: ended for every copy of the
                # cookie, whatever the page. A form sent now (sign-out included) carries the
                # token that went with the session: it is asked to sign in, not refused as
                # out of date.
                await _record_expired(request, state.ended)
                state.ended = None
                if request.method not in SAFE_METHODS:
                    raise SignInRequired()
            if request.method not in SAFE_METHODS:
                if upload_limit is None:
                    await read_body(request, request.app.state.settings.max_body_bytes)
                else:
                    request = await _received_upload(request, upload_limit)
                await _check_csrf(request)
            db = request.app.state.db
            maker = db.request_read_sessionmaker if read_only else db.request_sessionmaker
            async with db.writer_slot(read_only=read_only), maker() as session:
                request.state.session = session
                try:
                    response = await original(request)
                except BaseException:
                    await session.rollback()
                    raise
                if read_only:
                    await session.rollback()
                else:
                    await session.commit()
            return response

        return handler


def writes_on_get(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """A GET page that writes (the SSO callback): its transaction is committed."""
    endpoint.writes_on_get = True  # type: ignore[attr-defined]
    return endpoint


def db_session(request: Request) -> AsyncSession:
    session: AsyncSession = request.state.session
    return session


ConsoleDb = Annotated[AsyncSession, Depends(db_session)]


@dataclass(frozen=True)
class SignedIn:
    """The staff user of the request and the Principal they act as (actor `stf_…`)."""

    staff: StaffUser
    principal: Principal


async def signed_in_staff(request: Request) -> SignedIn:
    session = db_session(request)
    state = console_session(request)  # an expired one was recorded as ended (ConsoleRoute)
    if state.staff_id is None:
        raise SignInRequired()
    staff = await StaffRepository(session).get_by_public_id(state.staff_id)
    if (
        staff is None
        or not staff.active
        or staff.session_version != state.version
        or state.session_id is None
        or await staff_service.session_ended(session, session_digest(state.session_id))
    ):
        state.sign_out()
        raise SignInRequired()
    state.touch(int(time.time()))
    principal = await staff_service.principal_for(
        session,
        staff,
        request_id=getattr(request.state, "request_id", None),
        client_ip=request.client.host if request.client else None,
    )
    request.state.console_principal = principal
    return SignedIn(staff=staff, principal=principal)


async def _record_expired(request: Request, ended: tuple[str, str, int]) -> None:
    """Record a session that expired by its cookie as ended, in a transaction of its own
    (a page's may be read-only, or rolled back as it asks to sign in)."""
    async with request.app.state.db.transaction() as session:
        await end_console_session(request, session, ended)


async def end_console_session(
    request: Request, session: AsyncSession, signed_in_as: tuple[str, str, int]
) -> None:
    """Record the session (staff id, session id, signed in at) as ended until its cookie
    would have expired: a copy of the cookie signs no one in."""
    staff_id, session_id, signed_in_at = signed_in_as
    staff = await StaffRepository(session).get_by_public_id(staff_id)
    if staff is None:
        return
    lifetime = timedelta(hours=request.app.state.settings.console_session_hours)
    await staff_service.end_session(
        session,
        Actor(
            id="console",
            request_id=getattr(request.state, "request_id", None),
            client_ip=request.client.host if request.client else None,
        ),
        staff,
        session_digest(session_id),
        expires_at=datetime.fromtimestamp(signed_in_at, UTC) + lifetime,
    )


SignedInStaff = Annotated[SignedIn, Depends(signed_in_staff)]


def render(
    request: Request,
    template: str,
    context: dict[str, Any] | None = None,
    *,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    state = console_session(request)
    principal: Principal | None = getattr(request.state, "console_principal", None)
    csrf = state.csrf_token
    full = {
        "csrf_token": csrf,
        "csrf_field": lambda: Markup(
            f'<input type="hidden" name="{CSRF_FIELD}" value="{escape(csrf)}">'
        ),
        "navigation": visible_navigation(principal) if principal else [],
        "current_path": request.url.path,
        "flash": state.take_flash(),
        "signed_in": principal is not None,
        "actor_id": principal.key_public_id if principal else None,
        **(context or {}),
    }
    return templates.TemplateResponse(
        request, template, full, status_code=status_code, headers=headers
    )


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a console path, never another site."""
    if (
        value
        and value.startswith("/console")
        and not value.startswith("//")
        and "\\" not in value
        and value.isprintable()
        and len(value) <= 500
    ):
        return value
    return "/console"


_TITLES = {
    400: "Bad request",
    401: "Sign in required",
    403: "Not allowed",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Too large",
    422: "Check the form",
    429: "Too many attempts",
    500: "Something went wrong",
}


def _console_aware(
    handler: Callable[[Request, Any], Coroutine[Any, Any, Response]] | Callable[..., Any],
) -> Callable[[Request, Exception], Coroutine[Any, Any, Response]]:
    async def handle(request: Request, exc: Exception) -> Response:
        if not is_console_path(request.url.path):
            answered: Response = await handler(request, exc)
            return answered
        if isinstance(exc, SignInRequired):
            # Back to the page asked for after signing in again; for a form sent (its
            # action answers no GET), to the page it was sent from.
            if request.method in ("GET", "HEAD"):
                target = request.url.path
                if request.url.query:
                    target += "?" + request.url.query
            else:
                target = _form_page(request) or "/console"
            return redirect("/console/sign-in?next=" + quote(safe_next(target), safe=""))
        answered = await handler(request, exc)
        status = answered.status_code
        if isinstance(exc, MemberhubError):
            message = exc.message
        elif isinstance(exc, RequestValidationError):
            message = "Go back and check " + "; ".join(_invalid_fields(exc)) + "."
        elif status == 422:
            message = "Some of the fields are not valid; go back and check them."
        elif status >= 500:
            message = "An unexpected error occurred; it has been logged."
        else:
            message = _TITLES.get(status, "The request could not be completed.")
        headers = {
            k: v for k, v in answered.headers.items() if k.lower() in {"retry-after", "allow"}
        }
        return render(
            request,
            "error.html",
            {
                "title": _TITLES.get(status, "Error"),
                "message": message,
                "status": status,
                "back": _form_page(request),
            },
            status_code=status,
            headers=headers,
        )

    return handle


def _form_page(request: Request) -> str | None:
    """The console page a refused form was sent from (its Referer, this site's only), to
    go back to; None for anything else."""
    if request.method in ("GET", "HEAD"):
        return None
    referer = request.headers.get("referer")
    if not referer:
        return None
    sent_from = urlsplit(referer)
    if sent_from.netloc and sent_from.netloc != request.url.netloc:
        return None
    page = sent_from.path + (f"?{sent_from.query}" if sent_from.query else "")
    return page if safe_next(page) == page else None


def _invalid_fields(exc: RequestValidationError) -> list[str]:
    """Each field the form got wrong, by its name, with what is wrong ("rate_limit: String
    should have at most 50 characters"); the location's kind (form, query) left out."""
    named = []
    for error in validation_fields(exc):
        where = [part for part in error["loc"] if part not in ("body", "query", "path")]
        entry = f"{'.'.join(where) or 'the form'}: {error['message'] or 'not valid'}"
        if entry not in named:
            named.append(entry)
    return named[:10]


def install_html_errors(app: FastAPI) -> None:
    """Console pages get HTML error pages; the API keeps its JSON error shape."""
    for key, handler in list(app.exception_handlers.items()):
        app.exception_handlers[key] = _console_aware(handler)
