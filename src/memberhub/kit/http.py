"""HTTP plumbing: the unit-of-work route, error rendering and the request context."""

from __future__ import annotations

import json
import re
import time
import types
import typing
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from tempfile import SpooledTemporaryFile
from typing import IO, Annotated, Any

import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.params import Form as FormParam
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from memberhub.idempotency import service as idempotency
from memberhub.kit.db import DATABASE_GONE, database_unreachable
from memberhub.kit.errors import MemberhubError, ValidationFailed
from memberhub.ops.tracking import capture_exception

log = structlog.get_logger("memberhub.http")
# The status of a request whose client left before it was read.
CLIENT_CLOSED_REQUEST = 499

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
    try:
        return JSONResponse({"error": body}, status_code=status_code, headers=all_headers)
    except UnicodeEncodeError:
        # An error that repeats the input (a key given twice, an unknown column) may hold
        # a lone surrogate, which has no UTF-8 form: escaped, as JSON allows.
        return _AsciiJSONResponse({"error": body}, status_code=status_code, headers=all_headers)


class _AsciiJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}


def error_doc(description: str) -> dict[str, Any]:
    """An error response for a route's `responses`: its JSON body is an `ErrorBody`. Named
    by reference, not as `model`: FastAPI builds a validator for every response model of
    every route, which was a sixth of the application's import time (paid by each process)
    for bodies no route validates. The OpenAPI description adds the schema itself."""
    return {"description": description, "content": ERROR_CONTENT}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: error_doc(description)
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


async def get_session(request: Request) -> AsyncSession:
    # Async: FastAPI runs a plain function dependency in a thread, a hop per request.
    session: AsyncSession = request.state.session
    return session


# The request's session, in a route signature: `session: DbSession`.
DbSession = Annotated[AsyncSession, Depends(get_session)]


def name_operations(routes: list[Any]) -> None:
    """Short OpenAPI operation ids from the endpoints' names (`create_member` becomes
    `createMember`); two operations with one name are a programming error."""
    named: dict[str, APIRoute] = {}
    for route in routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        first, *rest = route.name.split("_")
        operation_id = first + "".join(part.capitalize() for part in rest)
        other = named.setdefault(operation_id, route)
        if other is not route:
            raise RuntimeError(f"two operations named {operation_id}: {other.path}, {route.path}")
        route.operation_id = operation_id


class PayloadTooLarge(MemberhubError):
    code = "PAYLOAD_TOO_LARGE"
    status_code = 413
    default_message = "The request body is too large."


# A spooled body's first bytes stay in memory; past this it is written to a file.
SPOOL_MEMORY_BYTES = 1024 * 1024


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is larger than {limit:,} bytes.", details={"max_bytes": limit}
    )


def _refuse_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, read as it streams in and refused (413) as soon as it passes
    `limit` bytes, or at once when its Content-Length says it will. It is kept on the
    request, so later reads (FastAPI's) find it."""
    _refuse_declared_length(request, limit)
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise _too_large(limit)
    request._body = bytes(body)  # Starlette's cache of the body
    return request._body


async def spool_body(request: Request, limit: int, directory: Path) -> IO[bytes]:
    """The request's body received into a temporary file, refused (413) as `read_body`
    refuses it. Up to `SPOOL_MEMORY_BYTES` stay in memory; past that the body goes to an
    unnamed file in `directory`, which leaves nothing on disk once closed, or if the
    process dies. The caller closes it; a refused body's file is closed here."""
    _refuse_declared_length(request, limit)
    # Returned open, not closed by a `with`: the endpoint reads it.
    file: SpooledTemporaryFile[bytes] = SpooledTemporaryFile(  # noqa: SIM115
        max_size=SPOOL_MEMORY_BYTES, dir=str(directory)
    )
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            if size > SPOOL_MEMORY_BYTES:
                file.rollover()  # before the write: a large chunk is never copied to memory
            file.write(chunk)
    except BaseException:
        file.close()
        raise
    file.seek(0)
    return file


def body_limit(
    setting: str, *, spool: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give an endpoint (an upload) the body limit in the named setting instead of
    `max_body_bytes`. With `spool`, the body is received into a temporary file
    (`spool_body`) rather than memory, and the endpoint reads it with `spooled_body`."""

    def mark(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        endpoint.body_limit_setting = setting  # type: ignore[attr-defined]
        endpoint.body_spooled = spool  # type: ignore[attr-defined]
        return endpoint

    return mark


def spooled_body(request: Request) -> IO[bytes]:
    """The body of a `body_limit(..., spool=True)` endpoint, from its start."""
    file: IO[bytes] = request.state.spooled_body
    file.seek(0)
    return file


async def received_body(request: Request) -> bytes | IO[bytes]:
    """The body as the route received it: bytes, or the file of a spooled upload."""
    if getattr(request.state, "spooled_body", None) is not None:
        return spooled_body(request)
    return await request.body()


def _query_params(dependant: Dependant) -> list[Any]:
    """The route's query parameters, its dependencies' included."""
    params = list(dependant.query_params)
    for dependency in dependant.dependencies:
        params += _query_params(dependency)
    return params


def _repeatable(annotation: Any) -> bool:
    """A query parameter given as a list, set or tuple (under Optional or Annotated)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _repeatable(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_repeatable(arg) for arg in typing.get_args(annotation))
    return origin in (list, set, frozenset, tuple) or annotation in (list, set, frozenset, tuple)


def _scalar(annotation: Any) -> Any:
    """`bool` or `int` under Optional or Annotated; None for anything else."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _scalar(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        found = {_scalar(arg) for arg in typing.get_args(annotation) if arg is not type(None)}
        return found.pop() if len(found) == 1 else None
    return annotation if annotation in (bool, int) else None


_QUERY_INTEGER = re.compile(r"-?[0-9]{1,19}")


def _mistyped_query(params: Any, typed: dict[str, Any]) -> list[dict[str, Any]]:
    """Query values taken as typed, as body fields are: a boolean is `true` or `false` (in
    any case, as some clients write Python's `True`; not `1`, `yes` or `on`), an integer is
    digits (not `1.0`)."""
    fields = []
    for name, kind in typed.items():
        value = params.get(name)
        if value is None:
            continue
        if kind is bool and value.lower() not in ("true", "false"):
            fields.append(
                {
                    "loc": ["query", name],
                    "message": "Input should be true or false",
                    "type": "bool_parsing",
                }
            )
        elif kind is int and _QUERY_INTEGER.fullmatch(value) is None:
            fields.append(
                {
                    "loc": ["query", name],
                    "message": "Input should be a whole number, in digits",
                    "type": "int_parsing",
                }
            )
    return fields


def _json_declared(request: Request) -> bool:
    content_type = request.headers.get("content-type")
    if content_type is None:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


class DuplicateKeys(ValueError):
    """A JSON object naming a key more than once (`keys`, sorted)."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__(keys)
        self.keys = keys


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An `object_pairs_hook` for `json`: the object, or DuplicateKeys when a key repeats
    (whose first value would quietly lose to the second)."""
    found = dict(pairs)
    if len(found) != len(pairs):
        counted = Counter(key for key, _ in pairs)
        raise DuplicateKeys(sorted(key for key, times in counted.items() if times > 1))
    return found


def _parse_json_once(request: Request, body: bytes) -> None:
    """Parse a JSON body here, refusing an object that names a key twice (whose first
    value would quietly lose to the second), and keep the result where FastAPI looks for
    it, so it is not parsed again. A body that is not JSON is left to FastAPI's error."""
    try:
        request._json = json.loads(body, object_pairs_hook=unique_keys)
    except DuplicateKeys as exc:
        names = ", ".join(key[:50] for key in exc.keys[:10])
        raise ValidationFailed(
            f"The body names a key more than once in an object: {names}.",
            details={
                "fields": [
                    {
                        "loc": ["body", key[:50]],
                        "message": "This key appears more than once in an object",
                        "type": "duplicate_key",
                    }
                    for key in exc.keys[:10]
                ]
            },
        ) from None
    except ValueError:  # not JSON (nor UTF-8): FastAPI answers it as it does
        return
    except RecursionError:
        return


def _authenticates_first(dependant: Dependant) -> bool:
    return any(
        getattr(dependency.call, "authenticates_first", False) or _authenticates_first(dependency)
        for dependency in dependant.dependencies
    )


class CheckedRoute(APIRoute):
    """A route that refuses what it can before reading the body: the API key is checked
    first (an unauthenticated upload is answered 401 without being read), then the body is
    read as it streams in, up to the configured limit (`MAX_BODY_BYTES`, or the endpoint's
    own `body_limit`), into memory or, for a spooled upload, a temporary file closed when
    the endpoint is done."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.authenticates_first = _authenticates_first(self.dependant)
        params = _query_params(self.dependant)
        self.query_names = frozenset(param.alias for param in params)
        # Those that take one value, and those taken as booleans or integers.
        self.single_query_names = frozenset(
            param.alias for param in params if not _repeatable(param.field_info.annotation)
        )
        self.typed_query_names = {
            param.alias: kind
            for param in params
            if (kind := _scalar(param.field_info.annotation)) is not None
        }
        self.body_limit_setting = getattr(self.endpoint, "body_limit_setting", "max_body_bytes")
        # A body FastAPI reads as JSON (a model), not raw bytes a route reads itself (an
        # inbound webhook, whose sender's bytes are taken as sent) nor a form.
        self.reads_json_body = self.body_field is not None and not isinstance(
            self.body_field.field_info, FormParam
        )

    @property
    def spools_body(self) -> bool:
        # Asked while APIRoute's __init__ builds the handler, before ours has run.
        return bool(getattr(self.endpoint, "body_spooled", False))

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        if not self.spools_body:
            return handle

        async def closing_spooled_body(request: Request) -> Response:
            try:
                return await handle(request)
            finally:
                # A request that ends before its endpoint runs (cancelled while it waits for
                # the write slot, say) leaves its file to be closed when it is freed.
                spooled: IO[bytes] | None = getattr(request.state, "spooled_body", None)
                if spooled is not None:
                    spooled.close()

        return closing_spooled_body

    async def check_before_body(self, request: Request) -> None:
        if self.authenticates_first:
            await request.app.state.authenticate_first(request)
        unknown = [name[:50] for name in sorted(set(request.query_params) - self.query_names)]
        if unknown:
            # A misspelt filter must not quietly return everything.
            raise ValidationFailed(
                f"Unknown query parameters: {', '.join(unknown[:10])}.",
                details={"unknown": unknown[:10], "known": sorted(self.query_names)},
            )
        params = request.query_params
        # More values than names: some name is repeated (the usual request has neither).
        repeated = (
            sorted(name for name in self.single_query_names if len(params.getlist(name)) > 1)
            if len(params.multi_items()) > len(params)
            else []
        )
        if repeated:
            # Nor may a second value of a one-value filter quietly replace the first.
            raise ValidationFailed(
                f"Query parameters given more than once: {', '.join(repeated[:10])}; "
                "each takes one value.",
                details={"repeated": repeated[:10]},
            )
        if params and self.typed_query_names:
            mistyped = _mistyped_query(params, self.typed_query_names)
            if mistyped:
                raise ValidationFailed("The request is not valid.", details={"fields": mistyped})
        if request.method not in SAFE_METHODS:
            # Received whole before any transaction: a slow upload holds no write slot.
            settings = request.app.state.settings
            limit = getattr(settings, self.body_limit_setting)
            if self.spools_body:
                # In the data directory: a temporary directory is often held in memory.
                request.state.spooled_body = await spool_body(request, limit, settings.data_dir)
            else:
                body = await read_body(request, limit)
                if body and self.reads_json_body and _json_declared(request):
                    _parse_json_once(request, body)


class UnitOfWorkRoute(CheckedRoute):
    """Runs each request in one transaction: commit on success, roll back otherwise.

    The commit happens before the response is sent, so a client never sees success for a
    change that was not stored. A keyed POST's response is stored in the same transaction.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()

        async def handler(request: Request) -> Response:
            db = request.app.state.db
            read_only = request.method in SAFE_METHODS
            await self.check_before_body(request)
            maker = db.request_read_sessionmaker if read_only else db.request_sessionmaker
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
                # Requests sharing an Idempotency-Key were serialised when it was checked, so
                # storing the response here cannot race another request with the same key.
                pending: idempotency.PendingKey | None = getattr(request.state, "idempotency", None)
                if pending is not None:
                    await idempotency.store(
                        session,
                        pending,
                        response,
                        ttl_hours=request.app.state.settings.idempotency_ttl_hours,
                        box=request.app.state.secret_box,
                    )
                await session.commit()
            return response

        return handler


_UNIQUE_CONSTRAINTS = {
    "uq_members_organisation_email": (
        "DUPLICATE_EMAIL",
        "A member with this email already exists in the organisation.",
    ),
    "uq_organisations_slug": ("DUPLICATE_SLUG", "The slug is taken."),
    "uq_membership_plans_code": ("DUPLICATE_PLAN_CODE", "A plan with this code exists."),
    "uq_tiers_code": ("DUPLICATE_TIER_CODE", "A tier with this code exists."),
    "uq_tiers_rank": ("DUPLICATE_TIER_RANK", "A tier with this rank exists."),
    "uq_rewards_code": ("DUPLICATE_REWARD_CODE", "A reward with this code exists."),
}
# SQLite names a column's unique constraint by its columns, not its name.
_SQLITE_UNIQUE_COLUMNS = {
    "UNIQUE constraint failed: organisations.slug": "uq_organisations_slug",
    "UNIQUE constraint failed: membership_plans.code": "uq_membership_plans_code",
    "UNIQUE constraint failed: tiers.code": "uq_tiers_code",
    "UNIQUE constraint failed: tiers.rank": "uq_tiers_rank",
    "UNIQUE constraint failed: rewards.code": "uq_rewards_code",
}

# Deadlock detected, serialization failure: the transaction was rolled back, and the same
# request again succeeds.
TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})

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


# What FastAPI answers (400) for a body its JSON decoder raised on outright.
_UNPARSABLE_BODY = "There was an error parsing the body"


def validation_fields(exc: RequestValidationError) -> list[dict[str, Any]]:
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


def _internal_error(request: Request) -> Response:
    """A 500: nothing about the cause, but the request id to find it in the logs."""
    request_id = getattr(request.state, "request_id", None)
    return error_response(
        500,
        "INTERNAL_ERROR",
        "An unexpected error occurred.",
        headers={"X-Request-ID": request_id} if request_id else None,
    )


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
            {"fields": validation_fields(exc)},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and exc.detail == _UNPARSABLE_BODY:
            # A body JSON cannot read at all (not UTF-8, nested too deep): the same 422 as
            # a body that is not JSON, naming the body.
            return error_response(
                422,
                "VALIDATION_ERROR",
                "The request is not valid.",
                {
                    "fields": [
                        {
                            "loc": ["body"],
                            "message": "The body is not JSON that can be read: it must be "
                            "UTF-8 and nest objects and arrays at most a few hundred deep.",
                            "type": "json_invalid",
                        }
                    ]
                },
            )
        code = _STATUS_CODES.get(exc.status_code, "ERROR")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ").lower()
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route it met; every route counts.
            from memberhub.kit.methods import allow_header, method_table

            allowed = method_table(request.app).allowed(request.url.path)
            if allowed is not None:
                headers["Allow"] = allow_header(allowed)
        return error_response(exc.status_code, code, message, headers=headers)

    @app.exception_handler(IntegrityError)
    async def _integrity_error(_request: Request, exc: IntegrityError) -> Response:
        # A race that slipped past a service's own check (two requests at once) lands here.
        message = str(exc.orig)
        for columns, constraint in _SQLITE_UNIQUE_COLUMNS.items():
            if message == columns:
                message = constraint
        for constraint, (code, text) in _UNIQUE_CONSTRAINTS.items():
            if constraint in message:
                return error_response(409, code, text)
        log.info("integrity_conflict", error_type=type(exc.orig).__name__)
        return error_response(409, "CONFLICT", "The change conflicts with existing data.")

    @app.exception_handler(DBAPIError)
    async def _database_error(request: Request, exc: DBAPIError) -> Response:
        if exc.connection_invalidated or isinstance(exc, OperationalError):
            log.warning("database_unavailable", error_type=type(exc.orig).__name__)
            return error_response(
                503,
                "SERVICE_UNAVAILABLE",
                "The database is busy or unreachable.",
                retry_after=1,
            )
        sqlstate = str(getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", ""))
        if sqlstate in TRANSIENT_SQLSTATES:
            # PostgreSQL ended the transaction to break a deadlock, or because it could not
            # serialise it: nothing was written, and the same request again will go through.
            log.warning("database_conflict_retry", sqlstate=sqlstate)
            return error_response(
                503,
                "CONCURRENT_UPDATE",
                "The request met a concurrent change and was rolled back; send it again.",
                retry_after=1,
            )
        if isinstance(exc, DataError) or sqlstate.startswith("22"):
            # SQLSTATE class 22: a value the column cannot hold. Schemas should catch these
            # first; this keeps a missed case a client error rather than a crash.
            log.warning("data_exception", sqlstate=sqlstate)
            return error_response(
                422, "VALIDATION_ERROR", "A value is outside what can be stored.", {}
            )
        log.error("database_error", error_type=type(exc.orig).__name__, sqlstate=sqlstate)
        return _internal_error(request)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(_request: Request, _exc: ClientDisconnect) -> Response:
        # The client went away (or sent less body than it announced) before the request
        # was read: nothing failed here, and nobody is left to answer. Logged and counted as
        # 499, as proxies do, not as a server error.
        log.info("client_disconnected")
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(StaleDataError)
    async def _stale(_request: Request, _exc: StaleDataError) -> Response:
        return error_response(
            409,
            "CONCURRENT_MODIFICATION",
            "The object was changed by another request at the same time; retry.",
        )

    async def _database_gone(_request: Request, exc: Exception) -> Response:
        # Not a fault of the request: the database went away.
        log.warning("database_unavailable", error_type=type(exc).__name__)
        return error_response(
            503, "SERVICE_UNAVAILABLE", "The database is busy or unreachable.", retry_after=1
        )

    for gone in DATABASE_GONE:
        app.add_exception_handler(gone, _database_gone)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        if database_unreachable(exc):  # raised as the cause of another exception
            return await _database_gone(request, exc)
        log.exception("unhandled_error", error_type=type(exc).__name__)
        capture_exception(exc)  # a no-op unless SENTRY_DSN started Sentry
        return _internal_error(request)


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
        # Each request runs in its own task and context; the binding ends with it, and stays
        # in place for the error handlers that run outside this middleware.
        structlog.contextvars.clear_contextvars()
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


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            try:
                return str(value.decode("latin-1"))
            except UnicodeDecodeError:
                return None
    return None
