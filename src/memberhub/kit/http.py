"""HTTP plumbing: the unit-of-work route, error rendering and the request context."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from memberhub.idempotency import service as idempotency
from memberhub.kit.errors import MemberhubError

log = structlog.get_logger("memberhub.http")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict[str, Any]
    retry_after: int | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_response(
    status_code: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    *,
    retry_after: int | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message, "details": details or {}}
    all_headers = dict(headers or {})
    if retry_after is not None:
        body["retry_after"] = retry_after
        all_headers["Retry-After"] = str(retry_after)
    return JSONResponse({"error": body}, status_code=status_code, headers=all_headers)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (400, "Bad request"),
        (401, "Missing, invalid or revoked API key"),
        (403, "Outside the key's role, scopes or organisation"),
        (404, "Not found"),
        (409, "Conflict with the current state"),
        (422, "Validation error"),
        (429, "Rate limited"),
    )
}


def get_session(request: Request) -> AsyncSession:
    session: AsyncSession = request.state.session
    return session


class UnitOfWorkRoute(APIRoute):
    """Runs each request in one transaction: commit on success, roll back otherwise.

    The commit happens before the response is sent, so a client never sees success for a
    change that was not stored. A keyed POST's response is stored in the same transaction.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()

        async def handler(request: Request) -> Response:
            db = request.app.state.db
            read_only = request.method in SAFE_METHODS
            maker = db.read_sessionmaker if read_only else db.sessionmaker
            async with db.writer_slot(read_only=read_only), maker() as session:
                request.state.session = session
                try:
                    response = await original(request)
                except idempotency.IdempotentReplay as replayed:
                    await session.rollback()
                    return replayed.response
                except BaseException:
                    await session.rollback()
                    raise
                if read_only or response.status_code >= 400:
                    await session.rollback()
                    return response
                pending: idempotency.PendingKey | None = getattr(request.state, "idempotency", None)
                if pending is not None:
                    await idempotency.store(
                        session,
                        pending,
                        response,
                        ttl_hours=request.app.state.settings.idempotency_ttl_hours,
                    )
                try:
                    await session.commit()
                except IntegrityError:
                    await session.rollback()
                    if pending is None:
                        raise
                    # A concurrent request with the same key committed first.
                    return await _replay_winner(request, pending)
            return response

        return handler


async def _replay_winner(request: Request, pending: idempotency.PendingKey) -> Response:
    from memberhub.kit.errors import Conflict, IdempotencyKeyReused

    async with request.app.state.db.transaction(read_only=True) as session:
        record = await idempotency.find(session, pending.api_key_id, pending.key)
    if record is None:
        raise Conflict("The request conflicted with a concurrent change; retry it.")
    if record.request_fingerprint != pending.fingerprint:
        raise IdempotencyKeyReused()
    return idempotency.replay(record)


_STATUS_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    406: "NOT_ACCEPTABLE",
    409: "CONFLICT",
    412: "PRECONDITION_FAILED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "VALIDATION_ERROR",
    429: "RATE_LIMITED",
}


def _validation_fields(exc: RequestValidationError) -> list[dict[str, Any]]:
    fields = []
    for error in exc.errors():
        fields.append(
            {
                "loc": [str(part) for part in error.get("loc", ())],
                "message": str(error.get("msg", "")),
                "type": str(error.get("type", "")),
            }
        )
    return fields


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MemberhubError)
    async def _memberhub_error(_request: Request, exc: MemberhubError) -> Response:
        return error_response(
            exc.status_code,
            exc.code,
            exc.message,
            exc.details,
            retry_after=exc.retry_after,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> Response:
        return error_response(
            422,
            "VALIDATION_ERROR",
            "The request is not valid.",
            {"fields": _validation_fields(exc)},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        code = _STATUS_CODES.get(exc.status_code, "ERROR")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ").lower()
        return error_response(exc.status_code, code, message, headers=dict(exc.headers or {}))

    @app.exception_handler(IntegrityError)
    async def _integrity_error(_request: Request, exc: IntegrityError) -> Response:
        log.info("integrity_conflict", error=str(exc.orig)[:200])
        return error_response(
            409, "CONFLICT", "The change conflicts with existing data (a duplicate?)."
        )

    @app.exception_handler(DataError)
    async def _data_error(_request: Request, exc: DataError) -> Response:
        log.info("data_error", error=str(exc.orig)[:200])
        return error_response(422, "VALIDATION_ERROR", "A value is outside what can be stored.", {})

    @app.exception_handler(StaleDataError)
    async def _stale(_request: Request, _exc: StaleDataError) -> Response:
        return error_response(
            409,
            "CONCURRENT_MODIFICATION",
            "The object was changed by another request at the same time; retry.",
        )

    @app.exception_handler(OperationalError)
    async def _operational(_request: Request, exc: OperationalError) -> Response:
        log.warning("database_unavailable", error=str(exc.orig)[:200])
        return error_response(
            503, "SERVICE_UNAVAILABLE", "The database is busy or unreachable.", retry_after=1
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> Response:
        log.exception("unhandled_error", error_type=type(exc).__name__)
        return error_response(500, "INTERNAL_ERROR", "An unexpected error occurred.")


class RequestContextMiddleware:
    """Gives each request an id, binds it to the logs, and records request metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            metrics = getattr(scope.get("app"), "state", None)
            recorder = getattr(metrics, "metrics", None) if metrics is not None else None
            if recorder is not None:
                recorder.observe_request(
                    scope["method"], template, status_holder["status"], elapsed
                )
            log.info(
                "request",
                method=scope["method"],
                path=template,
                status=status_holder["status"],
                duration_ms=round(elapsed * 1000, 2),
            )
            structlog.contextvars.clear_contextvars()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            try:
                return str(value.decode("latin-1"))
            except UnicodeDecodeError:
                return None
    return None
