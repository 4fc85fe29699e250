"""With OTEL_EXPORTER_OTLP_ENDPOINT set, a request, its SQL statements and its outbound calls
reach the collector (here a local receiver of OTLP/HTTP) as one trace, and so do the
worker's job runs and webhook sends; no key, token, query string or bound value is in what
is exported. Unset, nothing is set up and no tracing code is even loaded."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from memberhub import __version__
from memberhub.app import create_app
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.ops.tracing import RequestSpans, start_tracing
from memberhub.settings import Settings
from memberhub.webhooks.delivery import DeliveryConfig, DeliveryLoop
from memberhub.worker.runner import Worker
from tests.conftest import TEST_SECRET_KEY
from tests.fakes.webhook_receiver import running_receiver
from tests.support import ApiClient
from tests.support_server import bind_local_socket, serving_in_thread

PARTNER_TOKEN = "partner-token-4f9c2a7e1b"
QUERY_SECRET = "query-secret-8d3e"
EMAIL = "ana.tracing@example.com"


def _attributes(pairs: Any) -> dict[str, Any]:
    found = {}
    for pair in pairs:
        assert isinstance(pair, KeyValue)
        kind = pair.value.WhichOneof("value")
        assert kind is not None
        value = getattr(pair.value, kind)
        if kind == "array_value":
            value = [getattr(v, str(v.WhichOneof("value"))) for v in value.values]
        found[pair.key] = value
    return found


@dataclass
class Exported:
    span: Span
    resource: dict[str, Any]

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def attributes(self) -> dict[str, Any]:
        return _attributes(self.span.attributes)


class Collector:
    """Takes OTLP/HTTP trace exports as a collector does: protobuf POSTed to /v1/traces."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def traces(self, request: Request) -> Response:
        assert request.headers["content-type"] == "application/x-protobuf"
        body = await request.body()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        self.bodies.append(body)
        return Response(
            ExportTraceServiceResponse().SerializeToString(), media_type="application/x-protobuf"
        )

    def spans(self) -> list[Exported]:
        found = []
        for body in self.bodies:
            export = ExportTraceServiceRequest.FromString(body)
            for resource_spans in export.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    found += [Exported(span, resource) for span in scope_spans.spans]
        return found

    def raw(self) -> bytes:
        return b"".join(self.bodies)


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, str]]:
    received = Collector()
    app = Starlette(routes=[Route("/v1/traces", received.traces, methods=["POST"])])
    sock, base_url = bind_local_socket()
    async with serving_in_thread(app, sock, name="otlp", lifespan="off"):
        yield received, base_url


@pytest.fixture
async def partner() -> AsyncIterator[tuple[list[Request], str]]:
    """A partner API answering GET /ping to its bearer token."""
    seen: list[Request] = []

    async def ping(request: Request) -> Response:
        seen.append(request)
        authorized = request.headers.get("authorization") == f"Bearer {PARTNER_TOKEN}"
        return Response(status_code=200 if authorized else 401)

    sock, base_url = bind_local_socket()
    app = Starlette(routes=[Route("/ping", ping)])
    async with serving_in_thread(app, sock, name="partner", lifespan="off"):
        yield seen, base_url


def traced(settings: Settings, endpoint: str) -> Settings:
    return settings.model_copy(
        update={"otel_exporter_otlp_endpoint": endpoint, "otel_service_name": "memberhub-test"}
    )


def ancestors(span: Exported, by_id: dict[bytes, Exported]) -> list[Exported]:
    found = []
    parent = by_id.get(span.span.parent_span_id)
    while parent is not None:
        found.append(parent)
        parent = by_id.get(parent.span.parent_span_id)
    return found


def assert_no_secrets(raw: bytes, *secrets: str) -> None:
    for secret in secrets:
        assert secret.encode() not in raw, secret


async def test_a_request_its_statements_and_its_outbound_call_are_one_trace(
    settings: Settings,
    db: Database,
    admin_key: str,
    collector: tuple[Collector, str],
    partner: tuple[list[Request], str],
) -> None:
    received, collector_url = collector
    partner_requests, partner_url = partner
    app = create_app(traced(settings, collector_url), db=db)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {admin_key}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver", headers=headers
        ) as client:
            created = await client.post("/api/v1/members", json={"email": EMAIL})
            assert created.status_code == 201, created.text
            found = await client.get("/api/v1/members", params={"email": EMAIL})
            assert [m["id"] for m in found.json()["data"]] == [created.json()["id"]]
            integration = await client.post(
                "/api/v1/integrations",
                json={
                    "provider": "http",
                    "name": "Partner",
                    "config": {
                        "base_url": partner_url,
                        "auth": "bearer",
                        "test_path": f"/ping?probe={QUERY_SECRET}",
                    },
                    "credentials": {"api_key": PARTNER_TOKEN},
                },
            )
            assert integration.status_code == 201, integration.text
            tested = await client.post(f"/api/v1/integrations/{integration.json()['id']}/test")
            assert tested.json()["ok"] is True, tested.text
    # Leaving the lifespan shut the provider down, which exported every span still waiting.
    spans = received.spans()
    by_id = {s.span.span_id: s for s in spans}
    servers = {s.name: s for s in spans if s.span.kind == Span.SPAN_KIND_SERVER}

    create = servers["POST /api/v1/members"]
    assert create.attributes["http.method"] == "POST"
    assert create.attributes["http.status_code"] == 201
    assert create.attributes["http.route"] == "/api/v1/members"
    assert create.resource["service.name"] == "memberhub-test"
    assert create.resource["service.version"] == __version__
    statements = [
        s for s in spans if "db.statement" in s.attributes and create in ancestors(s, by_id)
    ]
    assert statements, [s.name for s in spans]
    assert all(s.span.trace_id == create.span.trace_id for s in statements)
    assert all(s.span.kind == Span.SPAN_KIND_CLIENT for s in statements)
    assert any(s.span.parent_span_id == create.span.span_id for s in statements)
    # On PostgreSQL the member, its event and its audit entry are one statement (a CTE).
    assert any("INSERT INTO members" in s.attributes["db.statement"] for s in statements)
    assert {s.attributes["db.system"] for s in statements} == {
        "sqlite" if db.is_sqlite else "postgresql"
    }

    listing = servers["GET /api/v1/members"]
    assert listing.attributes["http.status_code"] == 200
    assert "?" not in listing.attributes["http.url"]

    check = servers["POST /api/v1/integrations/{integration_id}/test"]
    [call] = [s for s in spans if s.attributes.get("http.url", "").startswith(partner_url)]
    assert call.span.kind == Span.SPAN_KIND_CLIENT
    assert call.span.trace_id == check.span.trace_id
    assert check in ancestors(call, by_id)
    assert call.attributes["http.method"] == "GET"
    assert call.attributes["http.status_code"] == 200
    assert call.attributes["http.url"] == f"{partner_url}/ping"
    # The partner was told which trace its answer belongs to.
    [ping] = partner_requests
    assert check.span.trace_id.hex() in ping.headers["traceparent"]

    assert_no_secrets(
        received.raw(), admin_key, PARTNER_TOKEN, QUERY_SECRET, EMAIL, "Bearer", TEST_SECRET_KEY
    )
    # Nothing was set globally, and the shared database is no longer traced.
    assert not isinstance(trace.get_tracer_provider(), SdkTracerProvider)
    engines = {db.engine.sync_engine, db.request_engine.sync_engine}
    assert not [p for p in EngineTracer._remove_event_listener_params if p[0]() in engines]


async def test_job_runs_and_webhook_sends_are_traces_and_idle_polling_is_not(
    settings: Settings, db: Database, api: ApiClient, collector: tuple[Collector, str]
) -> None:
    received, collector_url = collector
    tracing = start_tracing(traced(settings, collector_url))
    assert tracing is not None
    tracing.trace_database(db)
    async with running_receiver() as receiver:
        hook = {"url": receiver.url("crm"), "event_types": ["member.*"]}
        endpoint = (await api.post("/api/v1/webhook-endpoints", hook)).json()
        receiver.set_secrets("crm", endpoint["secret"])
        await api.create_member(email=EMAIL)
        try:
            deliveries = DeliveryLoop(
                db,
                DeliveryConfig.from_settings(settings),
                SecretBox(settings.resolved_secret_key),
                worker_id="test-worker",
                tracing=tracing,
            )
            await deliveries.run_until_idle()
            await Worker(db, tracing=tracing).tick(force=True)
        finally:
            await tracing.aclose()
        [delivered] = receiver.received("crm")
    spans = received.spans()
    by_id = {s.span.span_id: s for s in spans}

    [send] = [s for s in spans if s.name == "webhook send"]
    assert send.span.parent_span_id == b""
    assert send.attributes["memberhub.event.type"] == "member.created"
    assert send.attributes["memberhub.webhook_endpoint.id"] == endpoint["id"]
    [post] = [s for s in spans if s.span.parent_span_id == send.span.span_id]
    assert post.span.kind == Span.SPAN_KIND_CLIENT
    assert post.attributes["http.status_code"] == 200
    # A webhook URL's path may be its secret: only where it goes is recorded.
    assert post.attributes["http.url"] == receiver.url("crm").removesuffix("/hooks/crm")

    jobs = {s.attributes["memberhub.job"]: s for s in spans if s.name.startswith("job ")}
    assert {"points.expire", "memberships.advance_statuses"} <= set(jobs)
    expire = jobs["points.expire"]
    assert any(expire in ancestors(s, by_id) for s in spans if "db.statement" in s.attributes)
    # The fan-out, claims, heartbeat and sequencing ran outside any of those: not traced.
    orphans = [
        s for s in spans if s.span.kind == Span.SPAN_KIND_CLIENT and not s.span.parent_span_id
    ]
    assert orphans == []

    assert_no_secrets(received.raw(), endpoint["secret"], delivered.signature, EMAIL)


async def test_without_an_endpoint_nothing_is_set_up(settings: Settings, db: Database) -> None:
    assert settings.otel_exporter_otlp_endpoint is None
    assert start_tracing(settings) is None
    app = create_app(settings, db=db)
    assert app.state.tracing is None
    middleware: list[object] = [m.cls for m in app.user_middleware]
    assert RequestSpans not in middleware
    engines = {db.engine.sync_engine, db.request_engine.sync_engine}
    assert not [p for p in EngineTracer._remove_event_listener_params if p[0]() in engines]


def test_without_an_endpoint_no_tracing_code_is_loaded(tmp_path: Any) -> None:
    """The API, the worker and the CLI import without the SDK, its exporter or any
    instrumentation (FastAPI itself loads the API, which does nothing on its own), and
    without Sentry's SDK when no DSN is set."""
    script = f"""
import sys
from memberhub.app import create_app
from memberhub.cli import app as cli
from memberhub.settings import Settings
from memberhub.worker.runner import Worker

settings = Settings(data_dir={str(tmp_path)!r}, secret_key="k" * 32)
app = create_app(settings)
Worker(app.state.db, settings=settings)
prefixes = (
    "opentelemetry.sdk", "opentelemetry.exporter", "opentelemetry.instrumentation", "sentry_sdk"
)
print(sorted(name for name in sys.modules if name.startswith(prefixes)))
"""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OTEL_", "MEMBERHUB_"))
    }
    ran = subprocess.run(
        [sys.executable, "-c", script],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "[]"
