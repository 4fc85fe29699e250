"""Leads: people who may become members, moved along a pipeline and enrolled."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from memberhub.audit.service import diff, record_write
from memberhub.auth.principal import Principal
from memberhub.auth.roles import Scope
from memberhub.events.catalog import EnrollmentCompleted, LeadCreated, LeadUpdated
from memberhub.events.service import emit
from memberhub.kit.clock import utcnow
from memberhub.kit.db import lock_key_slots
from memberhub.kit.errors import Conflict, NotFound, ValidationFailed
from memberhub.kit.ids import new_public_id
from memberhub.kit.types import refusal
from memberhub.leads.models import TRANSITIONS, Lead, LeadStatus
from memberhub.leads.schemas import EnrollmentOut, LeadCreate, LeadEnroll, LeadOut, LeadPatch
from memberhub.members import service as members
from memberhub.members.personal import new_data_key, seal_personal
from memberhub.members.repository import normalize_email, searched_email
from memberhub.members.schemas import MemberCreate
from memberhub.memberships import service as memberships
from memberhub.organisations.models import Organisation
from memberhub.organisations.service import get_visible as get_visible_organisation


class LeadNotFound(NotFound):
    code = "LEAD_NOT_FOUND"


class LeadTransitionRefused(Conflict):
    code = "LEAD_TRANSITION_REFUSED"


@dataclass(frozen=True)
class LeadFilters:
    organisation_ids: frozenset[int] | None = None
    status: str | None = None
    email: str | None = None
    source: str | None = None
    agent_id: str | None = None
    created_from: datetime | None = None
    updated_since: datetime | None = None


def to_out(lead: Lead) -> LeadOut:
    return LeadOut(
        id=lead.public_id,
        organisation_id=lead.organisation.public_id if lead.organisation else None,
        email=lead.email,
        first_name=lead.first_name,
        last_name=lead.last_name,
        phone=lead.phone,
        status=lead.status,
        source=lead.source,
        agent_id=lead.agent_id,
        lost_reason=lead.lost_reason,
        custom_fields=dict(lead.custom_fields),
        external_ids=dict(lead.external_ids),
        member_id=lead.member.public_id if lead.member else None,
        version=lead.version,
        status_changed_at=lead.status_changed_at,
        created_at=lead.created_at,
        updated_at=lead.updated_at,
    )


def snapshot(lead: Lead) -> dict[str, Any]:
    return {
        "email": lead.email,
        "first_name": lead.first_name,
        "last_name": lead.last_name,
        "phone": lead.phone,
        "source": lead.source,
        "agent_id": lead.agent_id,
        "status": lead.status,
        "lost_reason": lead.lost_reason,
        "custom_fields": dict(lead.custom_fields),
        "external_ids": dict(lead.external_ids),
    }


def base_query() -> Select[Lead]:
    return select(Lead).options(selectinload(Lead.organisation), selectinload(Lead.member))


async def get_lead(
    session: AsyncSession, principal: Principal, public_id: str, *, for_update: bool = False
) -> Lead:
    query = base_query().where(Lead.public_id == public_id)
    if for_update:
        query = query.with_for_update()
    lead = await session.scalar(query)
    if lead is None or not principal.can_see_organisation(lead.organisation_id):
        raise LeadNotFound(f"Lead {public_id} does not exist.")
    return lead


async def list_leads(
    session: AsyncSession, filters: LeadFilters, *, after_id: int | None, limit: int
) -> Sequence[Lead]:
    query = base_query().order_by(Lead.id).limit(limit + 1)
    if after_id is not None:
        query = query.where(Lead.id > after_id)
    if filters.organisation_ids is not None:
        query = query.where(Lead.organisation_id.in_(filters.organisation_ids))
    if filters.status is not None:
        query = query.where(Lead.status == filters.status)
    if filters.email is not None:
        query = query.where(Lead.email_normalized == searched_email(filters.email))
    if filters.source is not None:
        query = query.where(Lead.source == filters.source)
    if filters.agent_id is not None:
        query = query.where(Lead.agent_id == filters.agent_id)
    if filters.created_from is not None:
        query = query.where(Lead.created_at >= filters.created_from)
    if filters.updated_since is not None:
        query = query.where(Lead.updated_at >= filters.updated_since)
    return (await session.scalars(query)).all()


def add_lead(
    session: AsyncSession,
    principal: Principal,
    organisation: Organisation | None,
    *,
    action: str,
    now: datetime,
    email: str | None,
    **values: Any,
) -> Lead:
    """A new lead in the session, with its `lead.created` event and audit entry."""
    lead = Lead(
        public_id=new_public_id("led"),
        organisation=organisation,
        organisation_id=organisation.id if organisation else None,
        email=email,
        email_normalized=normalize_email(email) if email else None,
        member=None,
        version=1,
        data_key=new_data_key(),
        status_changed_at=now,
        created_at=now,
        updated_at=now,
        **values,
    )
    session.add(lead)
    emit(session, LeadCreated(lead=to_out(lead)), organisation_id=lead.organisation_id)
    record_write(
        session,
        principal.actor,
        action=action,
        object_type="lead",
        object_id=lead.public_id,
        changes=_sealed(lead, diff({}, snapshot(lead))),
    )
    return lead


def _sealed(lead: Lead, changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` with the lead's personal values sealed with its key (made now for a lead
    from before leads had keys), as a member's are."""
    if lead.data_key is None:
        lead.data_key = new_data_key()
    return seal_personal(changes, lead.data_key, lead.public_id)


async def create_lead(session: AsyncSession, principal: Principal, payload: LeadCreate) -> Lead:
    organisation = await members.resolve_organisation(session, principal, payload.organisation_id)
    lead = add_lead(
        session,
        principal,
        organisation,
        action="lead.create",
        now=utcnow(),
        email=payload.email,
        first_name=payload.first_name,
        last_name=payload.last_name,
        phone=payload.phone,
        source=payload.source,
        agent_id=payload.agent_id,
        status=LeadStatus.NEW,
        custom_fields=members.merge_mapping({}, payload.custom_fields, "custom_fields", "lead"),
        external_ids=dict(payload.external_ids),
    )
    await session.flush()
    return lead


# Leads are matched by email (and by an external id) within an organisation, and nothing
# unique enforces it: a writer that matches or makes leads by a key holds the key's lock
# until its transaction ends. Keys share LEAD_LOCK_SLOTS locks per organisation, so that a
# batch holds at most that many; they are taken in order, so batches never deadlock.
LEAD_LOCK_SLOTS = 256


def email_key(email_normalized: str) -> str:
    return f"email:{email_normalized}"


def external_key(system: str, external_id: str) -> str:
    return f"external:{system}:{external_id}"


async def lock_lead_keys(
    session: AsyncSession, organisation_id: int | None, keys: Iterable[str]
) -> None:
    await lock_key_slots(session, f"lead:{organisation_id or 0}", keys, LEAD_LOCK_SLOTS)


async def lead_for_activity(
    session: AsyncSession,
    principal: Principal,
    organisation: Organisation | None,
    *,
    email: str,
    external_ids: dict[str, str],
    source: str,
    now: datetime,
) -> tuple[int, str]:
    """The lead an unmatched activity with `email` makes, where the program says so
    (`unmatched_activity_leads`): the organisation's oldest lead with that email not yet
    enrolled, left as it is, or else a new one (status new, `source` the activity's, with
    its `lead.created` event and audit entry). Returns the lead's id and public id.

    Activities carrying one email in one organisation make one lead however many arrive at
    once: the email's lock is held until the transaction ends (on SQLite, the write lock).
    """
    email_normalized = normalize_email(email)
    organisation_id = organisation.id if organisation is not None else None
    await lock_lead_keys(session, organisation_id, [email_key(email_normalized)])
    in_organisation = (
        Lead.organisation_id.is_(None)
        if organisation_id is None
        else Lead.organisation_id == organisation_id
    )
    found = (
        await session.execute(
            select(Lead.id, Lead.public_id)
            .where(
                in_organisation,
                Lead.email_normalized == email_normalized,
                Lead.status != LeadStatus.ENROLLED,
            )
            .order_by(Lead.id)
            .limit(1)
        )
    ).first()
    if found is not None:
        return found[0], found[1]
    lead = add_lead(
        session,
        principal,
        organisation,
        action="lead.create",
        now=now,
        email=email,
        status=LeadStatus.NEW,
        source=source,
        custom_fields={},
        external_ids=external_ids,
    )
    await session.flush()
    return lead.id, lead.public_id


def move(lead: Lead, to_status: str) -> None:
    if to_status == lead.status:
        return
    if to_status not in TRANSITIONS[lead.status]:
        raise LeadTransitionRefused(
            f"A {lead.status} lead cannot become {to_status}.",
            details={"from": lead.status, "to": to_status},
        )
    lead.status = to_status


async def update_lead(
    session: AsyncSession, principal: Principal, public_id: str, payload: LeadPatch
) -> Lead:
    lead = await get_lead(session, principal, public_id, for_update=True)
    before = snapshot(lead)
    fields = payload.model_dump(exclude_unset=True)
    if "email" in fields:
        email = fields.pop("email")
        lead.email = email
        lead.email_normalized = normalize_email(email) if email else None
    if "status" in fields:
        move(lead, fields.pop("status"))
    for name in ("custom_fields", "external_ids"):
        patch = fields.pop(name, None)
        if patch is not None:
            setattr(lead, name, members.merge_mapping(getattr(lead, name), patch, name, "lead"))
    for name, value in fields.items():
        setattr(lead, name, value)
    if lead.status != LeadStatus.LOST:
        lead.lost_reason = None
    changes = diff(before, snapshot(lead))
    if not changes:
        return lead
    now = utcnow()
    if "status" in changes:
        lead.status_changed_at = now
    lead.updated_at = now
    await session.flush()
    changed(session, principal, lead, changes)
    return lead


def changed(
    session: AsyncSession, principal: Principal, lead: Lead, changes: dict[str, Any]
) -> None:
    emit(
        session,
        LeadUpdated(lead=to_out(lead), changed_fields=sorted(changes)),
        organisation_id=lead.organisation_id,
    )
    record_write(
        session,
        principal.actor,
        action="lead.update",
        object_type="lead",
        object_id=lead.public_id,
        changes=_sealed(lead, changes),
    )


async def enroll(
    session: AsyncSession, principal: Principal, public_id: str, payload: LeadEnroll
) -> EnrollmentOut:
    """Make the lead a member (joining a plan when one is given), all or nothing. Joining
    a plan needs `memberships:write`, as the join endpoint does."""
    if payload.plan_id is not None:
        principal.require_scope(Scope.MEMBERSHIPS_WRITE)
    lead = await get_lead(session, principal, public_id, for_update=True)
    if lead.status == LeadStatus.ENROLLED:
        raise LeadTransitionRefused(
            "The lead is enrolled already.",
            details={"member_id": lead.member.public_id if lead.member else None},
        )
    if lead.status == LeadStatus.LOST:
        raise LeadTransitionRefused("A lost lead must be reopened (status new) before enrolling.")
    if not lead.email:
        raise ValidationFailed(
            "A lead needs an email to become a member.", details={"field": "email"}
        )
    before = snapshot(lead)
    try:
        profile = MemberCreate(
            email=lead.email,
            first_name=lead.first_name,
            last_name=lead.last_name,
            phone=lead.phone,
            organisation_id=lead.organisation.public_id if lead.organisation else None,
            custom_fields=dict(lead.custom_fields),
            external_ids=dict(lead.external_ids),
        )
    except ValidationError as exc:
        # What a lead may hold and a member may not (an address a member's check refuses):
        # the lead is corrected first.
        raise refusal(exc, "This lead cannot become a member as it is: ") from None
    member = await members.create_member(session, principal, profile)
    plan_id = None
    if payload.plan_id is not None:
        member, _term = await memberships.join(
            session, principal, member.public_id, payload.plan_id, payload.note
        )
        plan_id = member.plan.public_id if member.plan else payload.plan_id
    now = utcnow()
    lead.member = member
    lead.member_id = member.id
    lead.status = LeadStatus.ENROLLED
    lead.status_changed_at = now
    lead.updated_at = now
    await session.flush()
    changes = diff(before, snapshot(lead))
    changed(session, principal, lead, changes)
    emit(
        session,
        EnrollmentCompleted(
            lead_id=lead.public_id,
            member_id=member.public_id,
            organisation_id=lead.organisation.public_id if lead.organisation else None,
            plan_id=plan_id,
            occurred_at=now,
        ),
        organisation_id=lead.organisation_id,
        member_public_id=member.public_id,
        occurred_at=now,
    )
    return EnrollmentOut(lead=to_out(lead), member_id=member.public_id, plan_id=plan_id)


async def visible_organisation_ids(
    session: AsyncSession, principal: Principal, organisation_id: str | None
) -> frozenset[int] | None:
    if organisation_id is None:
        return principal.visible_organisation_ids
    organisation = await get_visible_organisation(session, principal, organisation_id)
    return frozenset({organisation.id})
