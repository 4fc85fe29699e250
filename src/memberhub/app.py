"""The application factory."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from memberhub import __version__
from memberhub.activities.routes import router as activities_router
from memberhub.alerts.routes import router as alerts_router
from memberhub.analytics.routes import router as analytics_router
from memberhub.approvals.routes import router as approvals_router
from memberhub.audit.chain import ChainKey, database_key
from memberhub.audit.chain import session_info as chain_session_info
from memberhub.audit.routes import router as audit_router
from memberhub.auth.dependencies import authenticate_first
from memberhub.auth.ratelimit import RateLimiter
from memberhub.auth.routes import router as api_keys_router
from memberhub.bulk.routes import imports_router as member_imports_router
from memberhub.bulk.routes import router as bulk_router
from memberhub.console.install import install_console
from memberhub.crm.routes import router as crm_router
from memberhub.earning_rules.routes import router as earning_rules_router
from memberhub.events.routes import router as events_router
from memberhub.exports.routes import router as exports_router
from memberhub.finance.routes import outbound as finance_outbound_router
from memberhub.finance.routes import router as finance_router
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.routes import outbound as integrations_outbound_router
from memberhub.integrations.routes import public as integrations_public_router
from memberhub.integrations.routes import router as integrations_router
from memberhub.kit.cache import STAMP_FILE, ProcessCache
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.kit.http import RequestContextMiddleware, install_error_handlers, name_operations
from memberhub.kit.logging import configure_logging
from memberhub.kit.methods import MethodsMiddleware
from memberhub.kit.openapi import install_openapi
from memberhub.leads.routes import external as leads_external_router
from memberhub.leads.routes import router as leads_router
from memberhub.marketing.routes import router as marketing_router
from memberhub.members.routes import router as members_router
from memberhub.memberships.routes import router as memberships_router
from memberhub.notifications.routes import public as notifications_public_router
from memberhub.notifications.routes import router as notifications_router
from memberhub.ops.docs import install_docs
from memberhub.ops.metrics import Metrics
from memberhub.ops.routes import router as ops_router
from memberhub.ops.serving import SERVE_WORKER_ENV
from memberhub.ops.tracing import start_tracing
from memberhub.ops.tracking import configure_error_tracking
from memberhub.organisations.routes import router as organisations_router
from memberhub.points.routes import router as points_router
from memberhub.program.routes import router as program_router
from memberhub.rewards.routes import router as rewards_router
from memberhub.search.routes import router as search_router
from memberhub.settings import Settings
from memberhub.sinks.routes import outbound as sinks_outbound_router
from memberhub.sinks.routes import router as sinks_router
from memberhub.staff.passwords import decoy_hash
from memberhub.staff.routes import router as staff_router
from memberhub.tiers.routes import router as tiers_router
from memberhub.webhooks.routes import router as webhooks_router
from memberhub.webhooks.ssrf import UrlPolicy
from memberhub.worker.election import run_when_elected
from memberhub.worker.runner import Worker

CALL_LOG_DRAIN_SECONDS = 2.0
log = structlog.get_logger("memberhub.app")


def serve_app() -> FastAPI:
    """The application of each process of `memberhub serve --processes N` (N > 1): settings
    from the environment, and the embedded worker in whichever process wins the election."""
    embedded = os.environ.get(SERVE_WORKER_ENV) == "1"
    settings = Settings()
    configure_error_tracking(settings)
    return create_app(settings, embedded_worker=embedded, elect_worker=embedded)


def create_app(
    settings: Settings | None = None,
    *,
    embedded_worker: bool = False,
    elect_worker: bool = False,
    db: Database | None = None,
) -> FastAPI:
    """The API; with `embedded_worker`, the worker runs in this process too (with
    `elect_worker`, only while this process holds the worker lock in DATA_DIR). `db`: a
    database (and its pool) to share instead of opening one; its owner disposes of it."""
    settings = settings or Settings()
    configure_logging(settings.log_level, json=settings.log_json)
    # The SQLite database, the generated secret key, the worker lock, the cache stamp.
    settings.ensure_data_dir()
    owns_db = db is None
    # The database's sessions carry the audit chain's key, for the sequencer to seal with.
    chain_key = ChainKey(settings.resolved_secret_key)
    if db is None:
        db = Database(
            settings.resolved_database_url,
            pool_size=settings.database_pool_size,
            session_info=chain_session_info(chain_key),
        )
    elif (shared_key := database_key(db)) is None or shared_key.seal != chain_key.seal:
        raise ValueError("`db` must be opened with the audit chain key of `settings`")
    ProcessCache.configure(settings.cache_ttl_seconds, settings.data_dir / STAMP_FILE)
    tracing = start_tracing(settings)
    if tracing is not None:
        tracing.trace_database(db)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = None
        # Before the first sign-in, so that it takes no longer than those that follow.
        decoy_hash()
        drainer = asyncio.create_task(_drain_call_log(app.state.integrations, stop))
        pool_sampler = asyncio.create_task(app.state.metrics.sample_pools_until(stop))
        if embedded_worker:
            worker = Worker(
                db,
                interval_seconds=settings.worker_interval_seconds,
                settings=settings,
                metrics=app.state.metrics,
                hub=app.state.integrations,
                tracing=tracing,
            )
            if elect_worker:
                task = asyncio.create_task(
                    run_when_elected(settings.data_dir, worker.run_forever, stop)
                )
            else:
                task = asyncio.create_task(worker.run_forever(stop))
        try:
            yield
        finally:
            stop.set()
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            with contextlib.suppress(asyncio.CancelledError):
                await drainer
            with contextlib.suppress(asyncio.CancelledError):
                await pool_sampler
            await app.state.integrations.aclose()
            if owns_db:
                await db.dispose()
            if tracing is not None:
                await tracing.aclose()
            app.state.metrics.close()

    app = FastAPI(
        title="memberhub",
        version=__version__,
        summary="Members, memberships and loyalty, with an integration hub.",
        lifespan=lifespan,
        # Both default pages load their assets from a CDN: /docs is served from a package.
        docs_url=None,
        redoc_url=None,
    )
    install_docs(app)
    app.state.settings = settings
    app.state.db = db
    app.state.metrics = Metrics()
    app.state.metrics.watch_pools(db)
    app.state.secret_box = SecretBox(settings.resolved_secret_key)
    app.state.integrations = IntegrationHub(
        db,
        app.state.secret_box,
        UrlPolicy.from_settings(settings),
        registry=app.state.metrics.registry,
        tracing=tracing,
    )
    app.state.rate_limiter = RateLimiter(settings.rate_limit, settings.redis_url)
    app.state.authenticate_first = authenticate_first
    app.state.embedded_worker = embedded_worker
    app.add_middleware(MethodsMiddleware)
    app.add_middleware(RequestContextMiddleware)
    app.state.tracing = tracing
    if tracing is not None:
        tracing.instrument_app(app)  # the outermost: the span covers the others' work
    install_error_handlers(app)
    for router in (
        organisations_router,
        members_router,
        memberships_router,
        program_router,
        points_router,
        bulk_router,
        member_imports_router,
        tiers_router,
        rewards_router,
        activities_router,
        earning_rules_router,
        approvals_router,
        alerts_router,
        notifications_router,
        notifications_public_router,
        analytics_router,
        events_router,
        webhooks_router,
        integrations_router,
        integrations_outbound_router,
        integrations_public_router,
        exports_router,
        leads_router,
        crm_router,
        search_router,
        marketing_router,
        sinks_router,
        sinks_outbound_router,
        finance_router,
        finance_outbound_router,
        leads_external_router,
        audit_router,
        staff_router,
        api_keys_router,
        ops_router,
    ):
        # The routers' own routes, built once at import: `include_router` would build an
        # application's copy of every route on its first requests (about half a second).
        app.router.routes.extend(router.routes)
    install_console(app)
    name_operations(app.router.routes)
    install_openapi(app)
    return app


async def _drain_call_log(hub: IntegrationHub, stop: asyncio.Event) -> None:
    """Write the payload log every few seconds, and once more on shutdown."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=CALL_LOG_DRAIN_SECONDS)
        try:
            await hub.drain()
        except Exception:
            log.exception("call_log_drain_failed")
