"""Leads in bulk, as CRMs exchange them: an import with a result per record, and an
export streamed a page at a time."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, or_
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.service import diff
from memberhub.auth.principal import Principal
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.kit.errors import MemberhubError
from memberhub.kit.spreadsheet import csv_cell
from memberhub.leads import service
from memberhub.leads.models import Lead, LeadStatus
from memberhub.leads.schemas import ImportResult, LeadImport, LeadImportOut, LeadImportRecord
from memberhub.leads.service import email_key, external_key, lock_lead_keys
from memberhub.members.repository import normalize_email
from memberhub.members.service import merge_mapping, resolve_organisation
from memberhub.organisations.models import Organisation

EXPORT_PAGE = 1000
# Bound query parameters per IN list (SQLite allows 32,766 in all).
LOOKUP_CHUNK = 500
EXPORT_COLUMNS = (
    "id",
    "organisation_id",
    "email",
    "first_name",
    "last_name",
    "phone",
    "status",
    "source",
    "agent_id",
    "member_id",
    "external_ids",
    "custom_fields",
    "created_at",
    "updated_at",
)


def _errors(exc: ValidationError) -> list[dict[str, str]]:
    return [
        {"field": ".".join(str(part) for part in error["loc"]) or "record", "message": error["msg"]}
        for error in exc.errors(include_url=False)
    ]


async def _existing(
    session: AsyncSession,
    organisation_id: int | None,
    system: str,
    external_ids: Sequence[str],
    emails: Sequence[str],
) -> list[Lead]:
    """The organisation's leads carrying one of these external ids or emails."""
    found: dict[int, Lead] = {}
    external = Lead.external_ids[system].as_string()
    same_org = func.coalesce(Lead.organisation_id, 0) == (organisation_id or 0)
    for start in range(0, max(len(external_ids), len(emails)), LOOKUP_CHUNK):
        ids = external_ids[start : start + LOOKUP_CHUNK]
        addresses = emails[start : start + LOOKUP_CHUNK]
        conditions = []
        if ids:
            conditions.append(external.in_(ids))
        if addresses:
            conditions.append(Lead.email_normalized.in_(addresses))
        if not conditions:
            continue
        query = service.base_query().where(same_org, or_(*conditions)).order_by(Lead.id)
        for lead in await session.scalars(query):
            found[lead.id] = lead
    return sorted(found.values(), key=lambda lead: lead.id)


def _changes_for(record: LeadImportRecord) -> dict[str, Any]:
    fields = record.model_dump(exclude_unset=True, exclude={"external_id", "custom_fields"})
    return {name: value for name, value in fields.items() if value is not None}


async def import_leads(
    session: AsyncSession, principal: Principal, payload: LeadImport
) -> LeadImportOut:
    """Create or update each valid record; report every record. Matching is by the lead's
    external id in `payload.source`, then by email (case-insensitive)."""
    organisation = await resolve_organisation(session, principal, payload.organisation_id)
    organisation_id = organisation.id if organisation else None
    system = payload.source
    results: list[ImportResult | None] = [None] * len(payload.leads)
    valid: list[tuple[int, LeadImportRecord]] = []
    for index, raw in enumerate(payload.leads):
        try:
            record = LeadImportRecord.model_validate(raw)
        except ValidationError as exc:
            results[index] = ImportResult(index=index, outcome="failed", errors=_errors(exc))
            continue
        if record.external_id is None and record.email is None:
            results[index] = ImportResult(
                index=index,
                outcome="failed",
                errors=[{"field": "record", "message": "needs an external_id or an email"}],
            )
            continue
        valid.append((index, record))

    # Another import (or an activity's lead) at once must not make a second lead of a key.
    await lock_lead_keys(
        session,
        organisation_id,
        [email_key(normalize_email(r.email)) for _, r in valid if r.email]
        + [external_key(system, r.external_id) for _, r in valid if r.external_id],
    )
    existing = await _existing(
        session,
        organisation_id,
        system,
        sorted({r.external_id for _, r in valid if r.external_id}),
        sorted({normalize_email(r.email) for _, r in valid if r.email}),
    )
    by_external = {
        str(known.external_ids[system]): known for known in existing if system in known.external_ids
    }
    by_email: dict[str, Lead] = {}
    for known in existing:
        if known.email_normalized:
            by_email.setdefault(known.email_normalized, known)

    now = utcnow()
    for index, record in valid:
        lead: Lead | None = by_external.get(record.external_id) if record.external_id else None
        if lead is None and record.email:
            lead = by_email.get(normalize_email(record.email))
            if lead is not None and record.external_id and lead.external_ids.get(system):
                # Another record of that system holds this email: a lead of its own.
                lead = None
        previous_email = lead.email_normalized if lead is not None else None
        try:
            if lead is None:
                lead = _create(session, principal, organisation, system, record, now)
                outcome = "created"
            else:
                outcome = _update(session, principal, lead, system, record, now)
        except MemberhubError as exc:
            results[index] = ImportResult(
                index=index,
                outcome="failed",
                lead_id=lead.public_id if lead else None,
                errors=[{"field": "record", "message": exc.message}],
            )
            continue
        if record.external_id:
            by_external[record.external_id] = lead
        if previous_email != lead.email_normalized and by_email.get(previous_email or "") is lead:
            del by_email[previous_email or ""]  # the lead no longer has that email
        if lead.email_normalized:
            by_email[lead.email_normalized] = lead
        results[index] = ImportResult(index=index, outcome=outcome, lead_id=lead.public_id)
    await session.flush()
    done = [result for result in results if result is not None]
    counts = {outcome: 0 for outcome in ("created", "updated", "unchanged", "failed")}
    for result in done:
        counts[result.outcome] += 1
    return LeadImportOut(results=done, **counts)


def _create(
    session: AsyncSession,
    principal: Principal,
    organisation: Organisation | None,
    system: str,
    record: LeadImportRecord,
    now: datetime,
) -> Lead:
    return service.add_lead(
        session,
        principal,
        organisation,
        action="lead.import",
        now=now,
        email=record.email,
        first_name=record.first_name,
        last_name=record.last_name,
        phone=record.phone,
        source=record.source or system,
        agent_id=record.agent_id,
        status=record.status or LeadStatus.NEW,
        # As a PATCH would: a null value sets nothing.
        custom_fields={k: v for k, v in (record.custom_fields or {}).items() if v is not None},
        external_ids={system: record.external_id} if record.external_id else {},
    )


def _update(
    session: AsyncSession,
    principal: Principal,
    lead: Lead,
    system: str,
    record: LeadImportRecord,
    now: datetime,
) -> str:
    before = service.snapshot(lead)
    fields = _changes_for(record)
    # As a PATCH merges them (a null value removes a key, within the limit); checked, as a
    # refused move is, before anything changes, so a refused record changes nothing.
    custom = (
        merge_mapping(lead.custom_fields, record.custom_fields, "custom_fields", "lead")
        if record.custom_fields
        else None
    )
    status = fields.pop("status", None)
    if status is not None:
        service.move(lead, status)
    if "email" in fields:
        lead.email = fields["email"]
        lead.email_normalized = normalize_email(fields.pop("email"))
    for name, value in fields.items():
        setattr(lead, name, value)
    if custom is not None:
        lead.custom_fields = custom
    if record.external_id and lead.external_ids.get(system) != record.external_id:
        lead.external_ids = {**lead.external_ids, system: record.external_id}
    changes = diff(before, service.snapshot(lead))
    if not changes:
        return "unchanged"
    if "status" in changes:
        lead.status_changed_at = now
    lead.updated_at = now
    service.changed(session, principal, lead, changes)
    return "updated"


async def export_lines(
    db: Database,
    organisation_ids: frozenset[int] | None,
    status: str | None,
    created_from: datetime | None,
    fmt: str,
) -> AsyncIterator[str]:
    """The leads as CSV or as `{"leads": [...]}`, a page at a time, each in a short read."""
    filters = service.LeadFilters(
        organisation_ids=organisation_ids, status=status, created_from=created_from
    )
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if fmt == "csv":
        writer.writerow(EXPORT_COLUMNS)
        yield buffer.getvalue()
    else:
        yield '{"leads": ['
    after: int | None = None
    first = True
    while True:
        async with db.transaction(read_only=True) as session:
            rows = await service.list_leads(session, filters, after_id=after, limit=EXPORT_PAGE)
            page = [service.to_out(lead) for lead in rows[:EXPORT_PAGE]]
        buffer.seek(0)
        buffer.truncate()
        for lead in page:
            if fmt == "csv":
                writer.writerow(
                    (
                        lead.id,
                        lead.organisation_id or "",
                        csv_cell(lead.email),
                        csv_cell(lead.first_name),
                        csv_cell(lead.last_name),
                        csv_cell(lead.phone),
                        lead.status,
                        csv_cell(lead.source),
                        csv_cell(lead.agent_id),
                        lead.member_id or "",
                        csv_cell(json.dumps(lead.external_ids) if lead.external_ids else None),
                        csv_cell(json.dumps(lead.custom_fields) if lead.custom_fields else None),
                        lead.created_at.isoformat(),
                        lead.updated_at.isoformat(),
                    )
                )
            else:
                buffer.write(("" if first else ",") + lead.model_dump_json())
            first = False
        yield buffer.getvalue()
        if len(rows) <= EXPORT_PAGE:
            break
        after = rows[EXPORT_PAGE - 1].id
    if fmt != "csv":
        yield "]}"
