"""OpenTelemetry traces (`OTEL_EXPORTER_OTLP_ENDPOINT`): a trace per request, per job run and
per webhook send, with a span for each SQL statement and each outbound HTTP call made on its
behalf, exported over OTLP/HTTP.

Off unless an endpoint is set, and free when off: `start_tracing` returns None, nothing is
instrumented and the SDK, the exporter and the instrumentations are never imported (this
module imports them only once tracing starts; the API alone is already loaded by FastAPI).

Nothing is set globally: the tracer provider lives on the app (or the worker) and is handed
to each instrumentation, so a process may build several apps and none leaks into another.

What spans carry, and what they never do: a request span has the method, the route template
(its name, `POST /api/v1/members`), the status, the path and the client's address and user
agent, never the query string, the body or another header; a SQL span has the statement
with its placeholders, never the bound values; an outbound span has the method, host and
status, with the path for connectors' calls but not for webhook sends (a webhook URL's path
is often its secret), and never the query string.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import httpx
from opentelemetry import trace
from opentelemetry.metrics import NoOpMeterProvider
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from memberhub import __version__
from memberhub.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.context import Context
    from opentelemetry.instrumentation.httpx import RequestInfo
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import Sampler, SamplingResult
    from opentelemetry.trace import Link, SpanKind
    from opentelemetry.trace.span import TraceState
    from opentelemetry.util.types import Attributes
    from sqlalchemy.engine import Engine

    from memberhub.kit.db import Database

# Header values are never recorded unless the standard OTEL_INSTRUMENTATION_HTTP_CAPTURE_
# HEADERS_* variables ask for some; these are redacted even then.
SECRET_HEADERS = ("authorization", "cookie", "set-cookie", "x-api-key", "proxy-authorization")
_SECRET_HEADER_ATTRIBUTES = frozenset(
    f"http.request.header.{name.replace('-', '_')}" for name in SECRET_HEADERS
)
# A statement of a bulk insert runs to many kilobytes of placeholders.
MAX_ATTRIBUTE_LENGTH = 4096
_HIDDEN_QUERY = "memberhub.query_string"


def start_tracing(settings: Settings) -> Tracing | None:
    """A tracer provider exporting to `OTEL_EXPORTER_OTLP_ENDPOINT`; None when it is unset."""
    if not settings.otel_exporter_otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    resource = Resource.create(
        {
            "service.name": settings.otel_service_name,
            "service.version": __version__,
            "deployment.environment.name": str(settings.env),
        }
    )
    provider = TracerProvider(
        resource=resource,
        sampler=ParentBased(_work_roots(TraceIdRatioBased(settings.otel_traces_sample_ratio))),
        span_limits=SpanLimits(max_span_attribute_length=MAX_ATTRIBUTE_LENGTH),
    )
    endpoint = settings.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return Tracing(provider)


def _work_roots(ratio: Sampler) -> Sampler:
    """`ratio` for spans that start a trace, except SQL statements and outbound calls: made
    outside a request, a job run or a webhook send (the worker's polling, the sequencer), they
    would be a trace each, many a second, and are not recorded."""
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
    from opentelemetry.trace import SpanKind

    class WorkRoots(Sampler):
        def should_sample(
            self,
            parent_context: Context | None,
            trace_id: int,
            name: str,
            kind: SpanKind | None = None,
            attributes: Attributes = None,
            links: Sequence[Link] | None = None,
            trace_state: TraceState | None = None,
        ) -> SamplingResult:
            if kind is SpanKind.CLIENT:
                return SamplingResult(Decision.DROP)
            return ratio.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )

        def get_description(self) -> str:
            return f"WorkRoots{{{ratio.get_description()}}}"

    return WorkRoots()


class Tracing:
    """This process's tracer provider, and the instrumentations it was given to."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("memberhub", __version__)
        self._engines: list[Engine] = []

    def instrument_app(self, app: FastAPI) -> None:
        """A server span around each request; call after adding every other middleware, so
        that it is the outermost and the others' work is inside the span."""
        app.add_middleware(RequestSpans, tracer_provider=self.provider)

    def trace_database(self, db: Database) -> None:
        """A span for each statement `db` runs (its request engine's too, on SQLite)."""
        from opentelemetry.instrumentation.sqlalchemy import __version__ as version
        from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer

        tracer = self.provider.get_tracer("opentelemetry.instrumentation.sqlalchemy", version)
        # It also counts pool connections, as a metric: only traces are exported.
        connections = NoOpMeterProvider().get_meter("memberhub").create_up_down_counter("pool")
        for engine in {db.engine.sync_engine, db.request_engine.sync_engine}:
            if engine not in self._engines:
                EngineTracer(tracer, engine, connections, enable_commenter=False)
                self._engines.append(engine)

    def traced_transport(
        self, transport: httpx.AsyncBaseTransport, *, show_path: bool
    ) -> httpx.AsyncBaseTransport:
        """`transport` with a client span around each call. `show_path`: the span's URL has
        the path (a vendor's API); otherwise only scheme, host and port (a webhook's)."""
        from opentelemetry.instrumentation.httpx import AsyncOpenTelemetryTransport

        async def scrub(span: trace.Span, request: RequestInfo) -> None:
            _scrub_client_span(span, request, show_path=show_path)

        return AsyncOpenTelemetryTransport(
            transport,
            tracer_provider=self.provider,
            meter_provider=NoOpMeterProvider(),
            request_hook=scrub,
        )

    def span(
        self, name: str, attributes: Mapping[str, str | int] | None = None
    ) -> AbstractContextManager[trace.Span]:
        """A unit of work outside requests (a job run, a webhook send): a trace of its own."""
        return self.tracer.start_as_current_span(name, attributes=attributes)

    async def aclose(self) -> None:
        """Stop tracing the databases, then export what is left (in a thread: it waits for
        the collector)."""
        self._untrace_databases()
        await asyncio.to_thread(self.provider.shutdown)

    def _untrace_databases(self) -> None:
        """Remove the statement listeners from the engines, which may outlive this provider
        (a database shared by several apps)."""
        from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
        from sqlalchemy import event

        # The instrumentation keeps every listener it adds in one list, and offers only to
        # remove them all; these are ours.
        registered = EngineTracer._remove_event_listener_params
        for entry in list(registered):
            target_ref, identifier, listener = entry
            target = target_ref()
            if target is not None and any(target is engine for engine in self._engines):
                event.remove(target, identifier, listener)
                registered.remove(entry)
        self._engines.clear()


def work_span(
    tracing: Tracing | None, name: str, attributes: Mapping[str, str | int] | None = None
) -> AbstractContextManager[object]:
    """`tracing.span(...)`, or nothing when tracing is off."""
    if tracing is None:
        return nullcontext()
    return tracing.span(name, attributes)


def _scrub_client_span(span: trace.Span, request: RequestInfo, *, show_path: bool) -> None:
    url = httpx.URL(str(request.url))
    shown = f"{url.scheme}://{url.netloc.decode('ascii')}" + (url.path if show_path else "")
    # The URL attribute's name depends on the semantic conventions in force
    # (OTEL_SEMCONV_STABILITY_OPT_IN): replace whichever was recorded.
    recorded: Mapping[str, Any] = getattr(span, "attributes", None) or {}
    for key, value in list(recorded.items()):
        if key in ("http.url", "url.full"):
            span.set_attribute(key, shown)
        elif key in _SECRET_HEADER_ATTRIBUTES:
            span.set_attribute(key, ["[REDACTED]"] * len(value))


class RequestSpans:
    """The server span of each HTTP request, from OpenTelemetry's ASGI middleware, named
    after the route template once routing has found the route (`POST /api/v1/members`; only
    the method when none matched).

    The query string is kept out of the middleware's sight (it would record it in the URL)
    and given back to the application underneath."""

    def __init__(self, app: ASGIApp, *, tracer_provider: TracerProvider) -> None:
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        self.downstream = app
        # Kept as `app`, where middleware keep what they wrap: FastAPI's own telemetry looks
        # there, and stands down when it finds this one.
        self.app = OpenTelemetryMiddleware(
            self._with_query,
            default_span_details=_method_only,
            tracer_provider=tracer_provider,
            meter_provider=NoOpMeterProvider(),
            exclude_spans=["receive", "send"],
            http_capture_headers_sanitize_fields=list(SECRET_HEADERS),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.downstream(scope, receive, send)
            return
        scope[_HIDDEN_QUERY] = scope.get("query_string", b"")
        scope["query_string"] = b""
        await self.app(scope, receive, send)

    async def _with_query(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["query_string"] = scope.pop(_HIDDEN_QUERY)
        span = trace.get_current_span()
        named = False

        def name_by_route() -> None:
            nonlocal named
            named = True
            template = getattr(scope.get("route"), "path_format", None)
            if isinstance(template, str):
                span.update_name(f"{_method_only(scope)[0]} {template}")
                span.set_attribute("http.route", template)

        async def send_naming(message: Message) -> None:
            # Before the response starts: the middleware ends the span with its last byte.
            if not named and message["type"] == "http.response.start":
                name_by_route()
            await send(message)

        try:
            await self.downstream(scope, receive, send_naming)
        except BaseException:
            if not named:
                name_by_route()
            raise


def _method_only(scope: Scope) -> tuple[str, dict[str, Any]]:
    from opentelemetry.util.http import sanitize_method

    method = sanitize_method(str(scope.get("method", "")).strip())
    return ("HTTP" if method in ("", "_OTHER") else method), {}
