"""A member's data export (the right of access, GDPR article 15): everything memberhub holds
about one member, as one JSON document.

"Everything" is found from the schema rather than listed by hand: every table with a
foreign key to `members` contributes the member's rows, so a table added later is in the
export without anyone remembering to add it. Besides those, the records that name the
member by public id rather than by key: the events about the member, the audit entries of
changes to the member and to the leads it was enrolled from, the member's links to CRM
records, the CRM conflicts and sync records about it, the rows of bulk reports that named
it (by id or email), and the suppressions of its addresses (`NAMED_TABLES`; a test holds
every column that can name a member to that list).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Column, Table, and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

import memberhub.models  # noqa: F401 - every table in the metadata, for the foreign-key walk
from memberhub.audit.models import AuditEntry
from memberhub.audit.service import record_write
from memberhub.auth.principal import Principal
from memberhub.bulk.models import BulkJobRow
from memberhub.crm.models import CrmConflict, CrmLink, SyncRunRecord
from memberhub.events.catalog import LeadCreated, LeadUpdated
from memberhub.events.models import Event
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base
from memberhub.leads.models import Lead
from memberhub.members.consent import current_consent
from memberhub.members.models import MEMBER_ID_PREFIX, Member
from memberhub.members.personal import open_personal
from memberhub.members.service import get_member, jobs_naming_by_email, to_out
from memberhub.notifications.models import Suppression
from memberhub.notifications.schemas import normalise_address

FORMAT_VERSION = 1
# Columns never exported: keys (a lead's `data_key` opens its sealed audit entries).
KEYS = frozenset({"data_key"})
_MEMBERS = "members"


def _member_keyed_columns() -> list[tuple[Table, Sequence[Column[Any]]]]:
    """Each table with a foreign key to members.id, with the columns that hold it."""
    found: list[tuple[Table, Sequence[Column[Any]]]] = []
    for table in Base.metadata.sorted_tables:
        if table.name == _MEMBERS:
            continue
        columns = [
            fk.parent
            for fk in table.foreign_keys
            if fk.column.table.name == _MEMBERS and fk.column.name == "id"
        ]
        if columns:
            found.append((table, columns))
    return found


def _plain(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes | memoryview):
        return base64.b64encode(bytes(value)).decode()
    return value


def _row(row: Any, skip: frozenset[str]) -> dict[str, Any]:
    return {key: _plain(value) for key, value in row._mapping.items() if key not in skip}


class MemberDataRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def rows_keyed_by(
        self, table: Table, columns: Sequence[Column[Any]], member_id: int
    ) -> list[dict[str, Any]]:
        condition = columns[0] == member_id
        for column in columns[1:]:
            condition = condition | (column == member_id)
        query = select(table).where(condition)
        if "id" in table.c:
            query = query.order_by(table.c.id)
        skip = frozenset(column.name for column in columns) | KEYS
        return [_row(row, skip) for row in await self.session.execute(query)]

    async def events(self, member: Member) -> list[dict[str, Any]]:
        """The events about the member, and those of the leads it was enrolled from (a
        lead's events carry what was recorded of the person before: name, email, phone)."""
        leads = list(
            await self.session.scalars(select(Lead.public_id).where(Lead.member_id == member.id))
        )
        about = Event.member_public_id == member.public_id
        if leads:
            about = or_(
                about,
                and_(
                    Event.type.in_((LeadCreated.event_type, LeadUpdated.event_type)),
                    Event.data["lead"]["id"].as_string().in_(leads),
                ),
            )
        events = await self.session.scalars(select(Event).where(about).order_by(Event.id))
        return [
            {
                "id": event.public_id,
                "type": event.type,
                "occurred_at": _plain(event.occurred_at),
                "data": event.data,
            }
            for event in events
        ]

    async def audit_entries(self, member: Member) -> list[dict[str, Any]]:
        """The audit entries of changes to the member and to the leads it was enrolled
        from (what was recorded of the person before), each opened with its object's key."""
        keys = {("member", member.public_id): member.data_key}
        leads = await self.session.execute(
            select(Lead.public_id, Lead.data_key).where(Lead.member_id == member.id)
        )
        keys |= {("lead", public_id): data_key for public_id, data_key in leads}
        entries = await self.session.scalars(
            select(AuditEntry)
            .where(
                or_(
                    *(
                        and_(AuditEntry.object_type == kind, AuditEntry.object_id == public_id)
                        for kind, public_id in keys
                    )
                )
            )
            .order_by(AuditEntry.id)
        )
        return [
            {
                "object_type": entry.object_type,
                "object_id": entry.object_id,
                "occurred_at": _plain(entry.occurred_at),
                "actor": entry.actor,
                "action": entry.action,
                "changes": open_personal(
                    entry.changes, keys[(entry.object_type, entry.object_id)], entry.object_id
                ),
                "client_ip": entry.client_ip,
            }
            for entry in entries
        ]

    async def crm_links(self, member_id: int) -> list[dict[str, Any]]:
        links = await self.session.execute(
            select(CrmLink.__table__).where(
                CrmLink.entity_type == "members", CrmLink.entity_id == member_id
            )
        )
        return [_row(row, frozenset({"entity_type", "entity_id"})) for row in links]

    async def named_rows(self, member: Member) -> dict[str, list[dict[str, Any]]]:
        """The rows of `NAMED_TABLES` about the member, by table."""
        crm = {
            "crm_conflicts": CrmConflict.__table__,
            "crm_sync_run_records": SyncRunRecord.__table__,
        }
        found: dict[str, list[dict[str, Any]]] = {}
        for name, table in crm.items():
            query = (
                select(table)
                .where(table.c.entity_type == "members")
                .where(table.c.entity_public_id == member.public_id)
                .order_by(table.c.id)
            )
            found[name] = [_row(row, frozenset()) for row in await self.session.execute(query)]
        rows = BulkJobRow.__table__
        named = [rows.c.member_id == member.public_id]
        if member.email_normalized:
            # By the email a row gave: only in the jobs of the member's organisation and the
            # installation-wide ones (an email is unique only within an organisation), and
            # never a row another member's id names.
            email = member.email_normalized
            named.append(
                and_(
                    rows.c.job_id.in_(jobs_naming_by_email(member)),
                    or_(
                        func.lower(rows.c.member_id) == email,
                        func.lower(rows.c.match_email) == email,
                    ),
                    or_(
                        rows.c.member_id.is_(None),
                        ~rows.c.member_id.startswith(MEMBER_ID_PREFIX),
                    ),
                )
            )
        query = select(rows).where(or_(*named)).order_by(rows.c.id)
        found["bulk_job_rows"] = [
            _row(row, frozenset()) for row in await self.session.execute(query)
        ]
        addresses = [
            (channel, normalise_address(channel, address))
            for channel, address in (("email", member.email), ("sms", member.phone))
            if address
        ]
        if addresses:
            suppressions = Suppression.__table__
            query = (
                select(suppressions)
                .where(
                    or_(
                        *(
                            (suppressions.c.channel == channel)
                            & (suppressions.c.address == address)
                            for channel, address in addresses
                        )
                    )
                )
                .order_by(suppressions.c.id)
            )
            found["notification_suppressions"] = [
                _row(row, frozenset()) for row in await self.session.execute(query)
            ]
        return {name: held for name, held in found.items() if held}


# Tables that name a member other than by a foreign key to members.id (see `named_rows`,
# and the events, audit entries and CRM links read on their own).
NAMED_TABLES = frozenset(
    {
        "events",
        "audit_log",
        "crm_links",
        "crm_conflicts",
        "crm_sync_run_records",
        "bulk_job_rows",
        "notification_suppressions",
    }
)


async def export_member_data(
    session: AsyncSession, principal: Principal, public_id: str
) -> dict[str, Any]:
    """The member's data export (record it with `record_export`)."""
    member: Member = await get_member(session, principal, public_id)
    repository = MemberDataRepository(session)
    held: dict[str, list[dict[str, Any]]] = {}
    for table, columns in _member_keyed_columns():
        rows = await repository.rows_keyed_by(table, columns, member.id)
        if rows:
            held[table.name] = rows
    links = await repository.crm_links(member.id)
    if links:
        held["crm_links"] = links
    held.update(await repository.named_rows(member))
    exported_at = utcnow()
    document = {
        "format": "memberhub-member-export",
        "version": FORMAT_VERSION,
        "exported_at": exported_at.isoformat(),
        "member": to_out(member).model_dump(mode="json"),
        "consent": current_consent(member),
        "records": held,
        "events": await repository.events(member),
        "audit_log": await repository.audit_entries(member),
    }
    return document


def record_export(session: AsyncSession, principal: Principal, document: dict[str, Any]) -> None:
    """The audit entry of an export: who took a copy of whose data, and when. Written in
    its own transaction, as the export itself is a read."""
    record_write(
        session,
        principal.actor,
        action="member.export",
        object_type="member",
        object_id=document["member"]["id"],
        changes={"exported_at": document["exported_at"], "tables": sorted(document["records"])},
    )
