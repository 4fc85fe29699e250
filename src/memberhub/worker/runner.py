"""The worker: a heartbeat plus the scheduled jobs, each in its own transaction."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, time, timedelta

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.alerts.jobs import check_rates
from memberhub.bulk.jobs import process_bulk_awards
from memberhub.crm.jobs import run_crm_sync
from memberhub.events.sequencer import SequencerLoop, run_passes
from memberhub.exports.jobs import ExportConfig, process_exports
from memberhub.finance.booking import book_due_entries
from memberhub.finance.reconciliation import run_due_reconciliations
from memberhub.idempotency.service import purge_expired
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.inbound import process_inbound
from memberhub.integrations.service import purge_call_log
from memberhub.kit.clock import utcnow
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.marketing.sync import run_marketing_sync
from memberhub.memberships.jobs import advance_membership_statuses
from memberhub.notifications.jobs import announce_renewals_due
from memberhub.notifications.planning import LinkSettings, plan_notifications
from memberhub.notifications.sending import NotificationSender
from memberhub.ops.metrics import Metrics
from memberhub.ops.retention import purge_expired_history
from memberhub.ops.tracing import Tracing, work_span
from memberhub.points.jobs import activate_pending_points, expire_points, notify_expiring_points
from memberhub.search.sync import run_search_sync
from memberhub.settings import Settings
from memberhub.sinks.forwarding import run_event_sinks
from memberhub.tiers.jobs import run_review as review_tiers
from memberhub.webhooks.delivery import DeliveryConfig, DeliveryLoop
from memberhub.webhooks.ssrf import UrlPolicy
from memberhub.worker import heartbeat
from memberhub.worker.daily import claim_daily_run

log = structlog.get_logger("memberhub.worker")

JobFunction = Callable[[AsyncSession, datetime], Awaitable[int]]
ChunkedJobFunction = Callable[[Database, datetime], Awaitable[int]]


@dataclass(frozen=True)
class Job:
    """A scheduled job: `run` gets one transaction, or, for `chunked` jobs that work through
    large sets, the database to open one transaction per chunk."""

    name: str
    every_seconds: float
    run: JobFunction | None = None
    chunked: ChunkedJobFunction | None = None
    # Once a day at DAILY_JOBS_AT in the program's time zone (looked at every_seconds apart).
    daily: bool = False


async def _purge_idempotency(session: AsyncSession, _now: datetime) -> int:
    return await purge_expired(session)


async def _process_inbound(db: Database, now: datetime) -> int:
    return await process_inbound(db, now)


DEFAULT_CALL_LOG_RETENTION_DAYS = 14.0
DEFAULT_RETENTION_DAYS = 90.0
DEFAULT_NOTIFICATION_RETENTION_DAYS = 180.0
DEFAULT_DAILY_AT = time(3, 0)


# Every scheduled job, declared in one place (and the payload log's purge, which needs the
# retention setting, added by the Worker).
JOBS: tuple[Job, ...] = (
    # Every tick: providers' webhooks wait at most one worker interval.
    Job("integrations.process_inbound", 0.0, chunked=_process_inbound),
    Job("memberships.advance_statuses", 60.0, advance_membership_statuses),
    Job("points.activate_pending", 60.0, activate_pending_points),
    Job("points.expire", 300.0, chunked=expire_points),
    Job("points.notify_expiring", 3600.0, notify_expiring_points),
    Job("bulk.process_awards", 5.0, chunked=process_bulk_awards),
    Job("tiers.review", 60.0, chunked=review_tiers, daily=True),
    Job("alerts.check_rates", 60.0, check_rates, daily=True),
    Job("notifications.renewal_due", 3600.0, announce_renewals_due, daily=True),
    Job("idempotency.purge_expired", 3600.0, _purge_idempotency),
)


async def run_job(db: Database, job: Job, now: datetime) -> int:
    if job.chunked is not None:
        return await job.chunked(db, now)
    assert job.run is not None
    async with db.transaction() as session:
        return await job.run(session, now)


class Worker:
    """Scheduled jobs every `interval_seconds`, and, when given its settings, the webhook
    delivery loop beside them."""

    def __init__(
        self,
        db: Database,
        *,
        interval_seconds: float = 5.0,
        settings: Settings | None = None,
        metrics: Metrics | None = None,
        hub: IntegrationHub | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        """`tracing`: each job run and each webhook send is a trace."""
        self.db = db
        self.tracing = tracing
        self.metrics = metrics
        self.interval_seconds = interval_seconds
        self.daily_at = settings.daily_jobs_time if settings is not None else DEFAULT_DAILY_AT
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.started_at = utcnow()
        self._last_run: dict[str, float] = {}
        retention = timedelta(
            days=settings.integration_log_retention_days
            if settings is not None
            else DEFAULT_CALL_LOG_RETENTION_DAYS
        )

        history = timedelta(
            days=settings.retention_days if settings is not None else DEFAULT_RETENTION_DAYS
        )
        sent_notifications = timedelta(
            days=settings.notification_retention_days
            if settings is not None
            else DEFAULT_NOTIFICATION_RETENTION_DAYS
        )

        async def purge_calls(session: AsyncSession, now: datetime) -> int:
            return await purge_call_log(session, older_than=now - retention)

        async def purge_history(db: Database, now: datetime) -> int:
            deleted = await purge_expired_history(
                db, older_than=now - history, notifications_older_than=now - sent_notifications
            )
            if any(deleted.values()):
                log.info("history_purged", **deleted)
            return sum(deleted.values())

        jobs = [
            *JOBS,
            Job("integrations.purge_call_log", 3600.0, purge_calls),
            Job("retention.purge_history", 3600.0, chunked=purge_history),
        ]
        # Outbound calls need a hub: the app's for the embedded worker, else one of its own.
        self._own_hub = hub is None and settings is not None
        if hub is None and settings is not None:
            hub = IntegrationHub(
                db,
                SecretBox(settings.resolved_secret_key),
                UrlPolicy.from_settings(settings),
                registry=metrics.registry if metrics is not None else None,
                tracing=tracing,
            )
        self.hub = hub
        if hub is not None:

            async def sync_crms(db: Database, now: datetime) -> int:
                try:
                    return await run_crm_sync(db, hub, now)
                finally:
                    if self._own_hub:
                        await hub.drain()

            # Every tick: changes reach the CRM one coalescing period after they settle.
            jobs.insert(1, Job("crm.sync", 0.0, chunked=sync_crms))

            async def sync_search_indices(db: Database, now: datetime) -> int:
                try:
                    return await run_search_sync(db, hub, now)
                finally:
                    if self._own_hub:
                        await hub.drain()

            # Every tick: a change is searchable one worker interval after its commit.
            jobs.insert(2, Job("search.sync", 0.0, chunked=sync_search_indices))

            async def forward_to_sinks(db: Database, now: datetime) -> int:
                try:
                    return await run_event_sinks(db, hub, now)
                finally:
                    if self._own_hub:
                        await hub.drain()

            # Every tick: an event reaches analytics one worker interval after its commit.
            jobs.insert(3, Job("sinks.forward", 0.0, chunked=forward_to_sinks))

            async def book_finance(db: Database, now: datetime) -> int:
                try:
                    return await book_due_entries(db, hub, now)
                finally:
                    if self._own_hub:
                        await hub.drain()

            async def reconcile(db: Database, now: datetime) -> int:
                return await run_due_reconciliations(db, hub, now)

            # Every tick: a payment is booked one worker interval after it was applied.
            jobs.insert(3, Job("finance.book_entries", 0.0, chunked=book_finance))
            jobs.insert(4, Job("finance.reconcile", 5.0, chunked=reconcile))
            export_config = (
                ExportConfig(
                    part_rows=settings.export_part_rows,
                    page_rows=settings.export_page_rows,
                    lease=timedelta(seconds=settings.export_lease_seconds),
                )
                if settings is not None
                else ExportConfig()
            )

            async def run_exports(db: Database, now: datetime) -> int:
                # Queues scheduled runs and writes queued ones, a part per transaction.
                return await process_exports(db, hub, now, export_config)

            jobs.append(Job("exports.run", 5.0, chunked=run_exports))

            async def sync_marketing_lists(db: Database, now: datetime) -> int:
                try:
                    return await run_marketing_sync(db, hub, now)
                finally:
                    if self._own_hub:
                        await hub.drain()

            # Every tick, after the jobs that change tiers and announce expiring points: a
            # change reaches the audience (and its journeys) in the pass that made it.
            jobs.append(Job("marketing.sync", 0.0, chunked=sync_marketing_lists))

            async def process_inbound_reading(db: Database, now: datetime) -> int:
                # Some providers' webhooks name what to read from the vendor (Eventbrite).
                try:
                    return await process_inbound(db, now, hub)
                finally:
                    if self._own_hub:
                        await hub.drain()

            jobs = [
                Job(job.name, job.every_seconds, chunked=process_inbound_reading)
                if job.name == "integrations.process_inbound"
                else job
                for job in jobs
            ]
        if settings is not None:
            links = LinkSettings(
                public_url=settings.public_url, secret=settings.resolved_secret_key
            )

            async def plan(db: Database, now: datetime) -> int:
                return await plan_notifications(db, now, links)

            # Last, after the jobs whose events they tell people about.
            jobs.append(Job("notifications.plan", 0.0, chunked=plan))
            if hub is not None:
                sender = NotificationSender(
                    db,
                    hub,
                    lease_seconds=settings.notification_lease_seconds,
                    concurrency=settings.notification_concurrency,
                )

                async def send(_db: Database, now: datetime) -> int:
                    try:
                        return await sender.send_due(now)
                    finally:
                        if self._own_hub:
                            await hub.drain()

                jobs.append(Job("notifications.send", 0.0, chunked=send))
        self.jobs = tuple(jobs)
        self.sequencer = SequencerLoop(
            db,
            interval_seconds=settings.sequencer_interval_seconds if settings is not None else 0.05,
        )
        self.deliveries = (
            DeliveryLoop(
                db,
                DeliveryConfig.from_settings(settings),
                SecretBox(settings.resolved_secret_key),
                worker_id=self.worker_id,
                metrics=metrics,
                tracing=tracing,
            )
            if settings is not None
            else None
        )

    async def tick(self, *, force: bool = False, now: datetime | None = None) -> dict[str, int]:
        """Beat, then run each job that is due (or all of them with force); `now` stands in
        for the clock in tests of daily jobs."""
        async with self.db.transaction() as session:
            await heartbeat.beat(session, self.worker_id, self.started_at)
        # Jobs reading the event feed see everything committed before the tick.
        await run_passes(self.db, wait=False)
        loop = asyncio.get_running_loop()
        results: dict[str, int] = {}
        for job in self.jobs:
            last = self._last_run.get(job.name)
            if not force and last is not None and loop.time() - last < job.every_seconds:
                continue
            self._last_run[job.name] = loop.time()
            started = now or utcnow()
            began = loop.time()
            try:
                if (
                    job.daily
                    and not force
                    and not await claim_daily_run(self.db, job.name, started, self.daily_at)
                ):
                    continue
                with work_span(self.tracing, f"job {job.name}", {"memberhub.job": job.name}):
                    results[job.name] = await run_job(self.db, job, started)
            except Exception:
                log.exception("job_failed", job=job.name)
                self._observe(job, loop.time() - began, succeeded=False)
                continue
            self._observe(job, loop.time() - began, succeeded=True)
            if results[job.name]:
                log.info("job_done", job=job.name, affected=results[job.name])
        # And the jobs' own events and audit entries, without waiting for the sequencer loop.
        await run_passes(self.db, wait=False)
        await self.db.checkpoint()
        return results

    def _observe(self, job: Job, seconds: float, *, succeeded: bool) -> None:
        if self.metrics is not None:
            self.metrics.observe_job(job.name, seconds, succeeded=succeeded)

    async def run_forever(self, stop: asyncio.Event) -> None:
        log.info("worker_started", worker_id=self.worker_id)
        sequencer = asyncio.create_task(self.sequencer.run(stop))
        deliveries = (
            asyncio.create_task(self.deliveries.run(stop)) if self.deliveries is not None else None
        )
        try:
            await self._run_jobs(stop)
        finally:
            if deliveries is not None:
                await deliveries
            await sequencer
            if self._own_hub and self.hub is not None:
                await self.hub.drain()
                await self.hub.aclose()
        log.info("worker_stopped", worker_id=self.worker_id)

    async def _run_jobs(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:
                log.exception("worker_tick_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval_seconds)
