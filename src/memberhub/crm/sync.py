"""Running syncs: push members and leads to a CRM, pull the CRM's changes back.

Push reads a page of records and their links in one short transaction, sends what changed
(outside any transaction, batched to the vendor's limits), then records the outcome in a
second transaction. Pull reads the CRM's changes page by page, each page applied in one
transaction with a savepoint per record, so one bad record never fails a run.

What each side last agreed on is kept per field (`CrmLink.synced`): a change on one side
only is simply taken; a change on both sides consults the conflict policy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
import structlog
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.auth.principal import Principal
from memberhub.crm.mapping import (
    EntityType,
    ObjectSync,
    SyncSettings,
    comparable,
    desired_properties,
    email_target,
    inbound_value,
    like_local,
    outbound_value,
    pulled_properties,
    pulls,
    same,
)
from memberhub.crm.models import (
    ConflictStatus,
    CrmConflict,
    CrmLink,
    CrmSyncState,
    RunStatus,
    SyncRun,
    SyncRunRecord,
)
from memberhub.crm.values import EntityValues, entity_ids_query, find_by_email, load_values
from memberhub.crm.values import scope_ids as load_scope
from memberhub.integrations.gateway import CircuitOpen, GatewayError
from memberhub.integrations.hub import IntegrationHub, parse_config
from memberhub.integrations.models import Integration
from memberhub.integrations.providers import get_provider
from memberhub.integrations.providers.base import (
    CRM,
    Capability,
    Connection,
    ContactRecord,
    CrmError,
    CrmRefusedEverything,
    RemoteRecord,
    WriteResult,
    aware_time,
)
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.kit.errors import MemberhubError
from memberhub.kit.ids import new_public_id

log = structlog.get_logger("memberhub.crm")

PAGE = 1000
LEASE = timedelta(minutes=15)
RETRY_BASE_SECONDS = 30.0
RETRY_MAX_SECONDS = 6 * 3600.0
WRITTEN_KEPT_PER_FIELD = 8
ERROR_CHARS = 1000
# Rows per multi-row insert: well under SQLite's limit of bound parameters.
LINK_INSERT_CHUNK = 1000


class NotACrm(MemberhubError):
    code = "INTEGRATION_NOT_A_CRM"
    status_code = 409


def crm_of(integration: Integration) -> tuple[CRM, SyncSettings] | None:
    """The integration's CRM capability and sync settings; None if it is not a CRM."""
    provider = get_provider(integration.provider)
    if provider is None or Capability.CRM not in provider.capabilities:
        return None
    if not isinstance(provider, CRM):
        return None
    config = parse_config(provider, integration.config)
    sync = getattr(config, "sync", None)
    if not isinstance(sync, SyncSettings):
        return None
    return provider, sync


def value_hash(value: Any) -> str:
    return hashlib.sha256(comparable(value).encode("utf-8")).hexdigest()[:16]


def _retry_at(now: datetime, failures: int) -> datetime:
    delay = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** max(0, failures - 1))
    return now + timedelta(seconds=delay)


def _principal(integration: Integration) -> Principal:
    return Principal.system(Actor.system(f"integration:{integration.public_id}"))


@dataclass
class Counts:
    created: int = 0
    updated: int = 0
    skipped: int = 0
    failed: int = 0
    conflicts: int = 0
    requests: int = 0
    records: list[SyncRunRecord] = field(default_factory=list)

    def add(
        self,
        outcome: str,
        entity: EntityType | None,
        public_id: str | None,
        external_id: str | None,
        *,
        changes: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        if outcome == "skipped":
            self.skipped += 1
            return
        counter = "conflicts" if outcome == "conflict" else outcome
        setattr(self, counter, getattr(self, counter) + 1)
        self.records.append(
            SyncRunRecord(
                entity_type=entity,
                entity_public_id=public_id,
                external_id=external_id,
                outcome=outcome,
                changes=changes or {},
                error=error[:ERROR_CHARS] if error else None,
            )
        )


@dataclass(frozen=True)
class Context:
    integration: Integration
    crm: CRM
    settings: SyncSettings
    # None when applying a webhook's changes, which makes no call.
    connection: Connection | None
    scope: frozenset[int] | None
    # Per CRM object, what a push has read of the CRM's records (see `_match_unlinked`).
    indexes: dict[str, _CrmIndex] = field(default_factory=dict)

    @property
    def vendor(self) -> Connection:
        assert self.connection is not None
        return self.connection


# ---------------------------------------------------------------- push


@dataclass
class _CrmIndex:
    """The emails of the records a CRM holds, read in pages during one push.

    A CRM without a batch write by key (Pipedrive, the custom CRM) is asked whether it has a
    record's email before the record is created, so nothing is created twice. One search per
    new record would double the requests of a first push; instead the push lists the CRM's
    records, reading at most one page per new record it has to place so far, and once the
    listing is complete creates the rest without asking. Until then, or if listing fails,
    the provider searches as before, so a push never costs more than it did.
    """

    by_email: dict[str, str] = field(default_factory=dict)
    # Each listed record's addresses, its primary first.
    emails_of: dict[str, tuple[str, ...]] = field(default_factory=dict)
    next_page: str | None = None
    pages_read: int = 0
    budget: int = 0
    complete: bool = False
    failed: bool = False


async def _match_unlinked(
    ctx: Context, counts: Counts, object_name: str, records: list[ContactRecord]
) -> list[ContactRecord]:
    """The records, those not yet linked given the CRM's id from the index when it has
    their email, or marked absent when the complete index does not."""
    unlinked = [r for r in records if r.external_id is None and r.email]
    lists_all = getattr(ctx.crm, "lists_all_records", None)
    if not unlinked or lists_all is None or not lists_all(ctx.vendor):
        return records
    index = ctx.indexes.setdefault(object_name, _CrmIndex())
    index.budget += len(unlinked)
    while not index.complete and not index.failed and index.pages_read < index.budget:
        try:
            page = await ctx.crm.changed_contacts(
                ctx.vendor, object_name, since=None, page=index.next_page, properties=()
            )
        except (CrmError, GatewayError, CircuitOpen, httpx.HTTPError) as exc:
            log.info("crm_index_unavailable", integration=ctx.integration.public_id, error=str(exc))
            index.failed = True
            break
        counts.requests += 1
        index.pages_read += 1
        for remote in page.records:
            addresses = tuple(a for a in (remote.email, *remote.other_emails) if a)
            index.emails_of[remote.external_id] = addresses
            for address in addresses:
                index.by_email.setdefault(address.lower(), remote.external_id)
        index.next_page = page.next_page
        index.complete = page.next_page is None
    matched = []
    for record in records:
        if record.external_id is None and record.email:
            found = index.by_email.get(record.email.lower())
            if found is not None:
                record = dataclasses.replace(
                    record, external_id=found, crm_emails=index.emails_of.get(found)
                )
            elif index.complete:
                record = dataclasses.replace(record, absent=True)
        matched.append(record)
    return matched


def _remember_created(
    ctx: Context, object_name: str, records: list[ContactRecord], results: dict[str, WriteResult]
) -> None:
    index = ctx.indexes.get(object_name)
    if index is None:
        return
    for record in records:
        result = results.get(record.key)
        if record.email and result is not None and result.external_id and result.created:
            index.by_email.setdefault(record.email.lower(), result.external_id)


@dataclass
class _Planned:
    entity_id: int
    values: EntityValues
    record: ContactRecord
    read_at: datetime


@dataclass
class _Plan:
    """A page's records to send, and those with pending changes that need nothing sent."""

    planned: list[_Planned]
    settled: list[int]
    read_at: datetime


async def _plan_page(
    db: Database,
    ctx: Context,
    run: SyncRun,
    counts: Counts,
    entity: EntityType,
    spec: ObjectSync,
    entity_ids: Sequence[int],
) -> _Plan:
    # Before the read: a change marked after this moment is not in what is sent.
    read_at = utcnow()
    async with db.transaction(read_only=True) as session:
        # Members without crm consent are left out: nothing about them is sent, and a
        # pending change of theirs settles as nothing to send.
        found = await load_values(
            session, entity, entity_ids, ctx.scope, purpose=ctx.crm.consent_purpose
        )
        links = {
            link.entity_id: link
            for link in await session.scalars(
                select(CrmLink).where(
                    CrmLink.integration_id == ctx.integration.id,
                    CrmLink.entity_type == entity,
                    CrmLink.entity_id.in_(entity_ids),
                )
            )
        }
    plan = _Plan([], [], read_at)
    for entity_id in entity_ids:
        values = found.get(entity_id)
        link = links.get(entity_id)
        if values is None:
            if link is not None and link.pending_at is not None:
                plan.settled.append(entity_id)  # deleted or out of scope: nothing to send
            continue
        desired = desired_properties(entity, spec, values.values)
        held = link.held if link is not None else {}
        if link is not None and link.external_id is not None:
            changes = {
                name: value
                for name, value in desired.items()
                if name not in held and not same(value, link.synced.get(name))
            }
            if not changes:
                counts.add("skipped", entity, values.public_id, link.external_id)
                if link.pending_at is not None:
                    plan.settled.append(entity_id)
                continue
        else:
            changes = {
                name: value
                for name, value in desired.items()
                if name not in held and value not in (None, "")
            }
        record = ContactRecord(
            key=values.public_id,
            email=values.email,
            properties=changes,
            external_id=link.external_id if link is not None else None,
        )
        if run.dry_run:
            counts.add(
                "updated" if record.external_id else "created",
                entity,
                values.public_id,
                record.external_id,
                changes=dict(changes),
            )
            continue
        plan.planned.append(_Planned(entity_id, values, record, read_at))
    return plan


async def _send(
    ctx: Context, counts: Counts, object_name: str, records: list[ContactRecord]
) -> dict[str, WriteResult]:
    """Write the records in the CRM's batches, several batches at once up to its
    concurrency; a batch refused as a whole is split to find the records at fault."""
    records = await _match_unlinked(ctx, counts, object_name, records)
    results: dict[str, WriteResult] = {}
    semaphore = asyncio.Semaphore(max(1, ctx.crm.concurrency))

    async def write(batch: list[ContactRecord]) -> None:
        async with semaphore:
            try:
                counts.requests += 1
                answers = await ctx.crm.upsert_contacts(ctx.vendor, object_name, batch)
            except CrmRefusedEverything as exc:
                answers = [WriteResult(r.key, None, error=str(exc)) for r in batch]
            except CrmError as exc:
                if len(batch) == 1:
                    answers = [WriteResult(batch[0].key, None, error=str(exc))]
                else:
                    middle = len(batch) // 2
                    semaphore.release()
                    try:
                        await asyncio.gather(write(batch[:middle]), write(batch[middle:]))
                    finally:
                        await semaphore.acquire()
                    return
            except (GatewayError, CircuitOpen, httpx.HTTPError) as exc:
                answers = [
                    WriteResult(r.key, None, error=f"{type(exc).__name__}: {exc}") for r in batch
                ]
            except Exception as exc:  # an answer not understood: the batch's records fail
                log.exception("crm_write_not_understood", integration=ctx.integration.public_id)
                answers = [
                    WriteResult(r.key, None, error=f"the CRM's answer was not understood: {exc}")
                    for r in batch
                ]
        for answer in answers:
            if answer.error is None and not answer.external_id:
                answer = WriteResult(answer.key, None, error="the CRM's answer gave no record id")
            results[answer.key] = answer

    size = max(1, ctx.crm.batch_size)
    batches = _batches(records, size)
    await asyncio.gather(*(write(batch) for batch in batches))
    _remember_created(ctx, object_name, records, results)
    return results


def _batches(records: list[ContactRecord], size: int) -> list[list[ContactRecord]]:
    """Batches of at most `size`, never two records with one email in a batch (a CRM
    matching by email refuses duplicates within one request)."""
    batches: list[list[ContactRecord]] = []
    current: list[ContactRecord] = []
    emails: set[str] = set()
    deferred: list[ContactRecord] = []
    for record in records:
        email = (record.email or "").lower()
        if email and email in emails:
            deferred.append(record)
            continue
        current.append(record)
        if email:
            emails.add(email)
        if len(current) == size:
            batches.append(current)
            current, emails = [], set()
    if current:
        batches.append(current)
    if deferred:
        batches.extend(_batches(deferred, size))
    return batches


async def _record_push(
    db: Database,
    ctx: Context,
    counts: Counts,
    entity: EntityType,
    planned: list[_Planned],
    results: dict[str, WriteResult],
    settled: Sequence[int] = (),
    read_at: datetime | None = None,
) -> None:
    async with db.transaction() as session:
        links = await ensure_links(
            session, ctx.integration.id, entity, [item.entity_id for item in planned]
        )
        if settled:
            links.update(
                {
                    link.entity_id: link
                    for link in await session.scalars(
                        select(CrmLink)
                        .where(
                            CrmLink.integration_id == ctx.integration.id,
                            CrmLink.entity_type == entity,
                            CrmLink.entity_id.in_(settled),
                        )
                        .with_for_update()
                        .execution_options(populate_existing=True)
                    )
                }
            )
        now = utcnow()
        ttl = timedelta(seconds=ctx.settings.echo_ttl_seconds)
        for entity_id in settled:
            link = links.get(entity_id)
            if (
                link is not None
                and link.pending_at is not None
                and read_at is not None
                and link.pending_at <= read_at
            ):
                _settle(link)
        for item in planned:
            result = results.get(item.record.key) or WriteResult(
                item.record.key, None, error="the CRM gave no answer for this record"
            )
            link = links[item.entity_id]
            if result.error is not None:
                link.failures = (link.failures or 0) + 1
                link.last_error = result.error[:ERROR_CHARS]
                link.next_attempt_at = _retry_at(now, link.failures)
                if link.pending_at is None:
                    link.pending_at = link.pending_since = now
                counts.add(
                    "failed",
                    entity,
                    item.values.public_id,
                    link.external_id,
                    changes=dict(item.record.properties),
                    error=result.error,
                )
                continue
            # As the CRM says: a record it already had (matched by email) is updated.
            created = result.created
            if result.external_id:
                link.external_id = result.external_id
            link.synced = {**link.synced, **item.record.properties}
            written = dict(link.written) if link.written_until and link.written_until > now else {}
            for name, value in item.record.properties.items():
                kept = [*written.get(name, []), value_hash(value)]
                written[name] = kept[-WRITTEN_KEPT_PER_FIELD:]
            link.written = written
            link.written_until = now + ttl
            link.synced_at = now
            if link.pending_at is None or link.pending_at <= item.read_at:
                _settle(link)
            counts.add(
                "created" if created else "updated",
                entity,
                item.values.public_id,
                link.external_id,
                changes=dict(item.record.properties),
            )


async def ensure_links(
    session: AsyncSession, integration_id: int, entity: EntityType, entity_ids: Sequence[int]
) -> dict[int, CrmLink]:
    """The links of these records, created where missing, locked. Another worker creating
    the same link meanwhile is no error (DO NOTHING): both then lock the one row."""
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    for start in range(0, len(entity_ids), LINK_INSERT_CHUNK):
        chunk = entity_ids[start : start + LINK_INSERT_CHUNK]
        await session.execute(
            insert(CrmLink)
            .values(
                [
                    {
                        "integration_id": integration_id,
                        "entity_type": entity,
                        "entity_id": entity_id,
                        "synced": {},
                        "written": {},
                        "held": {},
                        "failures": 0,
                    }
                    for entity_id in chunk
                ]
            )
            .on_conflict_do_nothing(index_elements=["integration_id", "entity_type", "entity_id"])
        )
    return {
        link.entity_id: link
        for link in await session.scalars(
            select(CrmLink)
            .where(
                CrmLink.integration_id == integration_id,
                CrmLink.entity_type == entity,
                CrmLink.entity_id.in_(entity_ids),
            )
            .order_by(CrmLink.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    }


def _settle(link: CrmLink) -> None:
    link.pending_at = None
    link.pending_since = None
    link.failures = 0
    link.last_error = None
    link.next_attempt_at = None


async def push(db: Database, ctx: Context, run: SyncRun, counts: Counts, *, full: bool) -> None:
    """Send changes: every record (full), or the records with changes due."""
    flush_at = max(1, ctx.crm.batch_size) * max(1, ctx.crm.concurrency)
    for entity, spec in ctx.settings.objects():
        buffer: list[_Planned] = []
        after = 0
        while True:
            now = utcnow()
            async with db.transaction(read_only=True) as session:
                if full:
                    ids = list(
                        await session.scalars(
                            entity_ids_query(
                                entity,
                                ctx.scope,
                                after_id=after,
                                limit=PAGE,
                                purpose=ctx.crm.consent_purpose,
                            )
                        )
                    )
                    after = ids[-1] if ids else after
                else:
                    rows = (
                        await session.execute(
                            select(CrmLink.id, CrmLink.entity_id)
                            .where(*_due(ctx, entity, now), CrmLink.id > after)
                            .order_by(CrmLink.id)
                            .limit(PAGE)
                        )
                    ).all()
                    ids = [row.entity_id for row in rows]
                    after = rows[-1].id if rows else after
            if not ids:
                break
            plan = await _plan_page(db, ctx, run, counts, entity, spec, ids)
            if plan.settled:
                await _record_push(db, ctx, counts, entity, [], {}, plan.settled, plan.read_at)
            buffer.extend(plan.planned)
            # Records are sent in full batches, gathered across pages when few change.
            if len(buffer) >= flush_at:
                await _flush(db, ctx, counts, entity, spec, buffer)
                buffer = []
            await _progress(db, run, counts)
        if buffer:
            await _flush(db, ctx, counts, entity, spec, buffer)
            await _progress(db, run, counts)


async def _flush(
    db: Database,
    ctx: Context,
    counts: Counts,
    entity: EntityType,
    spec: ObjectSync,
    planned: list[_Planned],
) -> None:
    results = await _send(ctx, counts, spec.object, [item.record for item in planned])
    await _record_push(db, ctx, counts, entity, planned, results)


def _due(ctx: Context, entity: EntityType, now: datetime) -> list[Any]:
    quiet = now - timedelta(seconds=ctx.settings.coalesce_seconds)
    overdue = now - timedelta(seconds=ctx.settings.max_delay_seconds)
    return [
        CrmLink.integration_id == ctx.integration.id,
        CrmLink.entity_type == entity,
        CrmLink.pending_at.is_not(None),
        (CrmLink.pending_at <= quiet) | (CrmLink.pending_since <= overdue),
        CrmLink.next_attempt_at.is_(None) | (CrmLink.next_attempt_at <= now),
    ]


async def has_due_changes(session: AsyncSession, ctx: Context, now: datetime) -> bool:
    for entity, _spec in ctx.settings.objects():
        found = await session.scalar(select(CrmLink.id).where(*_due(ctx, entity, now)).limit(1))
        if found is not None:
            return True
    return False


# ---------------------------------------------------------------- pull


@dataclass(frozen=True)
class _Group:
    """The mappings that read one CRM object (members and leads may share one)."""

    object_name: str
    specs: list[tuple[EntityType, ObjectSync]]

    def properties(self) -> list[str]:
        names: list[str] = []
        for entity, spec in self.specs:
            for name in [email_target(spec), *pulled_properties(entity, spec)]:
                if name not in names:
                    names.append(name)
        return names


def _groups(settings: SyncSettings) -> list[_Group]:
    groups: dict[str, _Group] = {}
    for entity, spec in settings.objects():
        groups.setdefault(spec.object, _Group(spec.object, [])).specs.append((entity, spec))
    return list(groups.values())


async def pull(db: Database, ctx: Context, run: SyncRun, counts: Counts) -> dict[str, Any]:
    """Take the CRM's changes since each object's watermark; return the new watermarks."""
    async with db.transaction(read_only=True) as session:
        state = await session.get(CrmSyncState, ctx.integration.id)
        watermarks = dict(state.watermarks) if state is not None else {}
    run.cursor_before = dict(watermarks)
    lookback = timedelta(seconds=ctx.settings.pull_lookback_seconds)
    for group in _groups(ctx.settings):
        mark = aware_time(watermarks.get(group.object_name))
        since = mark - lookback if mark is not None else None
        page: str | None = None
        newest = mark
        while True:
            counts.requests += 1
            changes = await ctx.crm.changed_contacts(
                ctx.vendor,
                group.object_name,
                since=since,
                page=page,
                properties=group.properties(),
            )
            await apply_remote_records(db, ctx, group, changes.records, counts, dry_run=run.dry_run)
            for record in changes.records:
                if record.modified_at is not None and (
                    newest is None or record.modified_at > newest
                ):
                    newest = record.modified_at
            await _progress(db, run, counts)
            if changes.next_page is None:
                break
            page = changes.next_page
        if newest is not None:
            watermarks[group.object_name] = newest.isoformat()
    return watermarks


async def apply_remote_records(
    db: Database,
    ctx: Context,
    group: _Group,
    records: Sequence[RemoteRecord],
    counts: Counts,
    *,
    dry_run: bool,
) -> None:
    if not records:
        return
    async with db.transaction() as session:
        await apply_in_session(session, ctx, group, records, counts, dry_run=dry_run)


async def apply_in_session(
    session: AsyncSession,
    ctx: Context,
    group: _Group,
    records: Sequence[RemoteRecord],
    counts: Counts,
    *,
    dry_run: bool,
    create_leads: bool = True,
) -> None:
    entity_types = [entity for entity, _ in group.specs]
    links: dict[str, list[CrmLink]] = {}
    for link in await session.scalars(
        select(CrmLink)
        .where(
            CrmLink.integration_id == ctx.integration.id,
            CrmLink.entity_type.in_(entity_types),
            CrmLink.external_id.in_({r.external_id for r in records}),
        )
        .order_by(CrmLink.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ):
        assert link.external_id is not None
        links.setdefault(link.external_id, []).append(link)
    seen: set[str] = set()
    for record in records:
        if record.external_id in seen:
            counts.add("skipped", None, None, record.external_id)
            continue
        seen.add(record.external_id)
        try:
            async with session.begin_nested():
                await _apply_one(
                    session,
                    ctx,
                    group,
                    record,
                    links.get(record.external_id, []),
                    counts,
                    dry_run=dry_run,
                    create_leads=create_leads,
                )
        except (MemberhubError, ValueError, TypeError, SQLAlchemyError) as exc:
            # The record's savepoint is rolled back; the others go on.
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            counts.add("failed", None, None, record.external_id[:100], error=message)


async def _apply_one(
    session: AsyncSession,
    ctx: Context,
    group: _Group,
    record: RemoteRecord,
    links: list[CrmLink],
    counts: Counts,
    *,
    dry_run: bool,
    create_leads: bool,
) -> None:
    now = utcnow()
    specs = dict(group.specs)
    link = next((c for entity in specs for c in links if c.entity_type == entity), None)
    if link is not None and (
        _nothing_new(link, record, now) or _older(record, link.remote_modified_at)
    ):
        # Nothing new, or news older than what was taken already (a retried webhook).
        counts.add("skipped", None, None, record.external_id)
        return
    created = False
    if link is None and record.email:
        for candidate in specs:
            match = await find_by_email(session, candidate, record.email, ctx.scope)
            if match is None:
                continue
            existing = await session.scalar(
                select(CrmLink).where(
                    CrmLink.integration_id == ctx.integration.id,
                    CrmLink.entity_type == candidate,
                    CrmLink.entity_id == match[0],
                )
            )
            if existing is not None and existing.external_id not in (None, record.external_id):
                continue  # that record is another CRM record's; this one stays unmatched
            if dry_run:
                counts.add("updated", candidate, match[1], record.external_id, changes={})
                return
            link = existing or CrmLink(
                integration_id=ctx.integration.id,
                entity_type=candidate,
                entity_id=match[0],
                synced={},
                written={},
                held={},
                failures=0,
            )
            link.external_id = record.external_id
            session.add(link)
            break
    if link is None:
        if (
            "leads" not in specs
            or not create_leads
            or not ctx.settings.pull_creates_leads
            or not record.email
        ):
            counts.add("skipped", None, None, record.external_id)
            return
        if dry_run:
            counts.add(
                "created", "leads", None, record.external_id, changes=dict(record.properties)
            )
            return
        link = await _create_lead(session, ctx, specs["leads"], record)
        created = True
    kind: EntityType = "members" if link.entity_type == "members" else "leads"
    entity = kind
    spec = specs[entity]
    found = await load_values(session, entity, [link.entity_id], ctx.scope)
    values = found.get(link.entity_id)
    if values is None:
        counts.add("skipped", entity, None, record.external_id)
        return
    taken, kept, conflicts = _decide(ctx, entity, spec, link, values, record, now)
    if not dry_run:
        await _refresh_held(session, link, spec, record)
    if dry_run:
        if taken or conflicts:
            counts.add(
                "conflict" if conflicts and not taken else "updated",
                entity,
                values.public_id,
                record.external_id,
                changes={t: record.properties.get(t) for t in taken},
            )
        else:
            counts.add("skipped", entity, values.public_id, record.external_id)
        return
    patch: dict[str, Any] = {}
    custom: dict[str, Any] = {}
    for name in taken:
        field_map = next(f for f in spec.fields if f.target == name)
        value = like_local(
            inbound_value(field_map, record.properties.get(name)),
            values.values.get(field_map.source),
        )
        if field_map.source.startswith("custom."):
            custom[field_map.source.removeprefix("custom.")] = value
        else:
            patch[field_map.source] = value
    if custom:
        patch["custom_fields"] = custom
    changed_locally = False
    if patch and not created:
        changed_locally = await update_entity(session, ctx.integration, entity, values, patch)
    synced = dict(link.synced)
    for name in taken:
        synced[name] = record.properties.get(name)
    link.synced = synced
    if record.modified_at is not None and not _older(record, link.remote_modified_at):
        link.remote_modified_at = record.modified_at
    if kept and link.pending_at is None:
        link.pending_at = link.pending_since = now  # our value goes back to the CRM
    for conflict in conflicts:
        conflict.link_id = link.id
        session.add(conflict)
        await session.flush()
        link.held = {**link.held, conflict.property: conflict.public_id}
    if created:
        counts.add("created", entity, values.public_id, record.external_id, changes=patch)
    elif conflicts:
        counts.add(
            "conflict",
            entity,
            values.public_id,
            record.external_id,
            changes={c.property: c.values for c in conflicts},
        )
    elif changed_locally:
        counts.add("updated", entity, values.public_id, record.external_id, changes=patch)
    else:
        counts.add("skipped", entity, values.public_id, record.external_id)


def _older(record: RemoteRecord, taken_at: datetime | None) -> bool:
    return record.modified_at is not None and taken_at is not None and record.modified_at < taken_at


def _nothing_new(link: CrmLink, record: RemoteRecord, now: datetime) -> bool:
    """Every value read is what both sides last agreed on, or our own write coming back:
    the common case after a push, decided without reading the record here."""
    echoes = link.written if link.written_until is not None and link.written_until > now else {}
    return all(
        same(value, link.synced.get(name)) or value_hash(value) in echoes.get(name, ())
        for name, value in record.properties.items()
    )


async def _refresh_held(
    session: AsyncSession, link: CrmLink, spec: ObjectSync, record: RemoteRecord
) -> None:
    """A property held for review that the CRM changed again: its open conflict shows the
    CRM's newest value, which `keep: crm` then takes (not the one first seen)."""
    for field_map in spec.fields:
        conflict_id = link.held.get(field_map.target)
        if conflict_id is None or field_map.target not in record.properties:
            continue
        remote = record.properties[field_map.target]
        conflict = await session.scalar(
            select(CrmConflict).where(
                CrmConflict.public_id == conflict_id, CrmConflict.status == ConflictStatus.OPEN
            )
        )
        if conflict is not None and not same(conflict.values.get("crm"), remote):
            conflict.values = {**conflict.values, "crm": remote}
            conflict.crm_modified_at = record.modified_at


def _decide(
    ctx: Context,
    entity: EntityType,
    spec: ObjectSync,
    link: CrmLink,
    values: EntityValues,
    record: RemoteRecord,
    now: datetime,
) -> tuple[list[str], list[str], list[CrmConflict]]:
    """Per pulled field: take the CRM's value, keep ours, or hold it for review."""
    taken: list[str] = []
    kept: list[str] = []
    conflicts: list[CrmConflict] = []
    echoes = link.written if link.written_until is not None and link.written_until > now else {}
    for field_map in spec.fields:
        name = field_map.target
        if not pulls(entity, field_map) or name not in record.properties or name in link.held:
            continue
        remote = record.properties[name]
        previous = link.synced.get(name)
        if same(remote, previous):
            continue
        if value_hash(remote) in echoes.get(name, ()):
            continue  # our own write coming back
        ours = outbound_value(field_map, values.values.get(field_map.source))
        if same(ours, remote):
            taken.append(name)  # both sides agree already: only the record of it changes
            continue
        if same(ours, previous) or (name not in link.synced and link.external_id is None):
            taken.append(name)
            continue
        policy = ctx.settings.policy_for(field_map)
        if policy == "crm_wins":
            taken.append(name)
        elif policy == "memberhub_wins":
            kept.append(name)
        elif policy == "newest":
            remote_at = record.modified_at
            if remote_at is not None and remote_at > values.updated_at:
                taken.append(name)
            else:
                kept.append(name)
        else:
            conflicts.append(
                CrmConflict(
                    public_id=new_public_id("cfl"),
                    integration_id=ctx.integration.id,
                    entity_type=entity,
                    entity_public_id=values.public_id,
                    external_id=record.external_id,
                    field=field_map.source,
                    property=name,
                    values={"memberhub": ours, "crm": remote},
                    crm_modified_at=record.modified_at,
                    created_at=now,
                )
            )
    return taken, kept, conflicts


async def update_entity(
    session: AsyncSession,
    integration: Integration,
    entity: EntityType,
    values: EntityValues,
    patch: dict[str, Any],
) -> bool:
    """Apply values taken from the CRM through the member or lead service (events, audit);
    True when something changed."""
    principal = _principal(integration)
    if entity == "members":
        from memberhub.members.schemas import MemberPatch
        from memberhub.members.service import update_member

        member = await update_member(
            session,
            principal,
            values.public_id,
            MemberPatch(**patch),
            if_match=None,
            consent_source="crm",
        )
        return member.updated_at != values.updated_at
    from memberhub.leads.schemas import LeadPatch
    from memberhub.leads.service import update_lead

    lead = await update_lead(session, principal, values.public_id, LeadPatch(**patch))
    return lead.updated_at != values.updated_at


async def _create_lead(
    session: AsyncSession, ctx: Context, spec: ObjectSync, record: RemoteRecord
) -> CrmLink:
    from memberhub.leads.schemas import LeadCreate
    from memberhub.leads.service import create_lead

    fields: dict[str, Any] = {}
    custom: dict[str, Any] = {}
    synced: dict[str, Any] = {}
    status: tuple[str, Any] | None = None
    for field_map in spec.fields:
        if not pulls("leads", field_map) or field_map.target not in record.properties:
            continue
        value = inbound_value(field_map, record.properties[field_map.target])
        if field_map.source == "status":
            status = (field_map.target, value)  # a lead starts new; moved below
            continue
        synced[field_map.target] = record.properties[field_map.target]
        if value is None:
            continue
        if field_map.source.startswith("custom."):
            custom[field_map.source.removeprefix("custom.")] = value
        else:
            fields[field_map.source] = value
    fields.setdefault("email", record.email)
    fields.setdefault("source", ctx.integration.provider)
    organisation = None
    if ctx.integration.organisation_id is not None:
        from memberhub.organisations.models import Organisation

        organisation = await session.get(Organisation, ctx.integration.organisation_id)
    payload = LeadCreate(
        **fields,
        custom_fields=custom,
        external_ids={ctx.integration.provider: record.external_id},
        organisation_id=organisation.public_id if organisation is not None else None,
    )
    lead = await create_lead(session, _principal(ctx.integration), payload)
    await session.flush()
    if status is not None and status[1] not in (None, "new"):
        from memberhub.leads.schemas import LeadPatch
        from memberhub.leads.service import update_lead

        try:
            async with session.begin_nested():
                await update_lead(
                    session,
                    _principal(ctx.integration),
                    lead.public_id,
                    LeadPatch(status=status[1]),
                )
            synced[status[0]] = record.properties[status[0]]
        except (MemberhubError, ValueError):
            pass  # not a move a new lead can make: the CRM gets this lead's status back
    elif status is not None:
        synced[status[0]] = record.properties[status[0]]
    link = CrmLink(
        integration_id=ctx.integration.id,
        entity_type="leads",
        entity_id=lead.id,
        external_id=record.external_id,
        synced=synced,
        written={},
        held={},
        failures=0,
    )
    session.add(link)
    await session.flush()
    return link


async def apply_webhook(
    session: AsyncSession, integration: Integration, changes: Sequence[tuple[str, RemoteRecord]]
) -> dict[str, int]:
    """Apply the changes a CRM's webhook carried, in the inbound event's transaction."""
    found = crm_of(integration)
    counts = Counts()
    if found is None or not found[1].pull:
        return {"skipped": len(changes)}
    crm, settings = found
    ctx = Context(
        integration, crm, settings, None, await load_scope(session, integration.organisation_id)
    )
    for group in _groups(settings):
        records = [record for name, record in changes if name == group.object_name]
        # A webhook names a record the CRM already had: it never creates a lead.
        await apply_in_session(
            session, ctx, group, records, counts, dry_run=False, create_leads=False
        )
    return {
        "updated": counts.updated,
        "skipped": counts.skipped,
        "failed": counts.failed,
        "conflicts": counts.conflicts,
    }


# ---------------------------------------------------------------- runs


async def _progress(db: Database, run: SyncRun, counts: Counts) -> None:
    """Write the run's counts and new per-record outcomes so far, and extend its lease."""
    records, counts.records = counts.records, []
    async with db.transaction() as session:
        for record in records:
            record.run_id = run.id
            session.add(record)
        await session.execute(
            update(SyncRun)
            .where(SyncRun.id == run.id)
            .values(
                created=counts.created,
                updated=counts.updated,
                skipped=counts.skipped,
                failed=counts.failed,
                conflicts=counts.conflicts,
                requests=counts.requests,
            )
        )
        await session.execute(
            update(CrmSyncState)
            .where(CrmSyncState.integration_id == run.integration_id)
            .values(lease_until=utcnow() + LEASE)
        )


async def context_for(
    db: Database, hub: IntegrationHub, integration: Integration
) -> Context | None:
    found = crm_of(integration)
    if found is None:
        return None
    crm, settings = found
    async with db.transaction(read_only=True) as session:
        scope = await load_scope(session, integration.organisation_id)
    return Context(integration, crm, settings, hub.connection(integration), scope)


async def execute(db: Database, hub: IntegrationHub, run_id: int) -> SyncRun | None:
    """Run a queued run to its end, holding the integration's lease; None when another
    run holds it (the run stays queued)."""
    now = utcnow()
    async with db.transaction() as session:
        run = await session.get(SyncRun, run_id, with_for_update=True)
        if run is None or run.status != RunStatus.QUEUED:
            return None
        integration = await session.get(Integration, run.integration_id)
        assert integration is not None
        state = await ensure_state(session, integration.id)
        if state.active_run_id is not None and state.lease_until and state.lease_until > now:
            return None
        if state.active_run_id is not None:
            # Its worker stopped mid-run and its lease ran out: what it did is recorded.
            await session.execute(
                update(SyncRun)
                .where(SyncRun.id == state.active_run_id, SyncRun.status == RunStatus.RUNNING)
                .values(
                    status=RunStatus.FAILED,
                    error="abandoned: its worker stopped before it finished",
                    finished_at=now,
                )
            )
        state.active_run_id = run.id
        state.lease_until = now + LEASE
        run.status = RunStatus.RUNNING
        run.started_at = now
    counts = Counts()
    error: str | None = None
    watermarks: dict[str, Any] | None = None
    try:
        ctx = await context_for(db, hub, integration)
        if ctx is None:
            raise NotACrm(f"Integration {integration.public_id} is not a CRM.")
        if run.mode == "push":
            await push(db, ctx, run, counts, full=run.trigger != "changes")
        else:
            watermarks = await pull(db, ctx, run, counts)
    except Exception as exc:  # the run fails; what it did so far stays recorded
        log.exception("sync_run_failed", run=run.public_id)
        error = f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]
    await _progress(db, run, counts)
    async with db.transaction() as session:
        stored = await session.get(SyncRun, run.id, with_for_update=True)
        assert stored is not None
        finished = utcnow()
        if stored.status != RunStatus.RUNNING:
            return stored  # another worker took over after its lease ran out
        stored.status = RunStatus.FAILED if error else RunStatus.COMPLETED
        stored.error = error
        stored.finished_at = finished
        state = await ensure_state(session, integration.id)
        if watermarks is not None and not run.dry_run:
            stored.cursor_before = run.cursor_before
            stored.cursor_after = watermarks
            state.watermarks = watermarks
        elif run.mode == "pull":
            stored.cursor_before = run.cursor_before
            stored.cursor_after = run.cursor_before
        if run.mode == "pull" and run.trigger == "schedule":
            state.last_pull_at = finished
        if run.mode == "push" and run.trigger == "schedule":
            state.last_full_push_at = finished
        if state.active_run_id == run.id:
            state.active_run_id = None
            state.lease_until = None
        return stored


async def ensure_state(session: AsyncSession, integration_id: int) -> CrmSyncState:
    state = await session.get(CrmSyncState, integration_id, with_for_update=True)
    if state is None:
        from sqlalchemy import func

        from memberhub.events.models import Event

        position = await session.scalar(select(func.max(Event.position)))
        state = CrmSyncState(
            integration_id=integration_id, event_position=position or 0, watermarks={}
        )
        session.add(state)
        await session.flush()
    return state


def new_run(
    integration: Integration, *, mode: str, trigger: str, dry_run: bool, requested_by: str
) -> SyncRun:
    return SyncRun(
        public_id=new_public_id("syr"),
        integration_id=integration.id,
        mode=mode,
        trigger=trigger,
        dry_run=dry_run,
        status=RunStatus.QUEUED,
        created=0,
        updated=0,
        skipped=0,
        failed=0,
        conflicts=0,
        requests=0,
        cursor_before={},
        cursor_after={},
        requested_by=requested_by,
        created_at=utcnow(),
    )
