from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Insert, Select, Table, exists, false, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import make_transient_to_detached

from memberhub.audit.service import (
    change_ctes_after,
    change_params,
    diff,
    record_change_now,
    record_write,
)
from memberhub.auth.principal import Principal
from memberhub.events.catalog import MemberCreated, MemberDeleted, MemberUpdated
from memberhub.events.repository import EventRepository
from memberhub.events.sequencer import mark_for_sequencing
from memberhub.events.service import emit
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.db import column_binds, column_values, lock_key_slots, orm_object
from memberhub.kit.errors import Conflict, NotFound, PreconditionFailed, ValidationFailed
from memberhub.kit.ids import new_public_id
from memberhub.members.consent import (
    PURPOSES,
    ConsentSource,
    current_consent,
    record_consent_changes,
)
from memberhub.members.models import Member
from memberhub.members.personal import ERASED, PERSONAL_FIELDS, new_data_key, seal_personal
from memberhub.members.repository import MemberRepository, normalize_email
from memberhub.members.schemas import (
    MAX_CUSTOM_FIELDS,
    MAX_EXTERNAL_IDS,
    Consent,
    MemberCreate,
    MemberOut,
    MemberPatch,
    MembershipState,
)
from memberhub.organisations.models import Organisation
from memberhub.organisations.repository import OrganisationRepository
from memberhub.organisations.service import get_visible as get_visible_organisation

MEMBERS = cast(Table, Member.__table__)


def to_out(member: Member) -> MemberOut:
    return MemberOut(
        id=member.public_id,
        organisation_id=member.organisation.public_id if member.organisation else None,
        email=member.email,
        first_name=member.first_name,
        last_name=member.last_name,
        phone=member.phone,
        date_of_birth=member.date_of_birth,
        status=member.status,
        tier=member.tier,
        consent=Consent(
            email=member.consent_email,
            sms=member.consent_sms,
            analytics=member.consent_analytics,
            profiling=member.consent_profiling,
            crm=member.consent_crm,
            marketing_email=member.consent_marketing_email,
        ),
        custom_fields=dict(member.custom_fields),
        external_ids=dict(member.external_ids),
        membership=MembershipState(
            plan_id=member.plan.public_id if member.plan else None,
            member_since=member.member_since,
            term_ends_at=member.term_ends_at,
            grace_ends_at=member.grace_ends_at,
            cancel_at_period_end=member.cancel_at_period_end,
            payment_status=member.payment_status,
            payment_updated_at=member.payment_updated_at,
        ),
        version=member.version,
        created_at=member.created_at,
        updated_at=member.updated_at,
    )


def etag(member: Member) -> str:
    return f'"{member.version}"'


def snapshot(member: Member) -> dict[str, Any]:
    """The member's writable fields, for audit diffs and change detection."""
    return {
        "email": member.email,
        "first_name": member.first_name,
        "last_name": member.last_name,
        "phone": member.phone,
        "date_of_birth": member.date_of_birth,
        "organisation_id": member.organisation.public_id if member.organisation else None,
        "consent_email": member.consent_email,
        "consent_sms": member.consent_sms,
        "consent_analytics": member.consent_analytics,
        "consent_profiling": member.consent_profiling,
        "consent_crm": member.consent_crm,
        "consent_marketing_email": member.consent_marketing_email,
        "custom_fields": dict(member.custom_fields),
        "external_ids": dict(member.external_ids),
    }


async def get_member(
    session: AsyncSession, principal: Principal, public_id: str, *, for_update: bool = False
) -> Member:
    member = await MemberRepository(session).get_by_public_id(public_id, for_update=for_update)
    return visible_member(principal, public_id, member)


def visible_member(principal: Principal, public_id: str, member: Member | None) -> Member:
    """The member found by `public_id`, if the key may see it; else MEMBER_NOT_FOUND (a member
    out of the key's reach is not told apart from one that does not exist)."""
    if member is None or not principal.can_see_organisation(member.organisation_id):
        raise NotFound(f"Member {public_id} does not exist.", code="MEMBER_NOT_FOUND")
    return member


async def resolve_organisation(
    session: AsyncSession, principal: Principal, public_id: str | None
) -> Organisation | None:
    """The organisation named (which must be within the key's reach), else the key's own."""
    if public_id is not None:
        organisation = await OrganisationRepository(session).get_by_public_id(public_id)
        if organisation is None:
            raise NotFound(f"Organisation {public_id} does not exist.")
        # Placing a member outside the key's organisation is refused, not hidden.
        principal.require_organisation(organisation.id)
        return organisation
    if principal.organisation_id is not None:
        org = await session.get(Organisation, principal.organisation_id)
        assert org is not None
        return org
    return None


async def _ensure_email_free(
    session: AsyncSession, organisation: Organisation | None, email: str, exclude_id: int | None
) -> None:
    # No autoflush: a pending change to this member's email would otherwise be flushed by
    # the query and hit the unique index before the friendly DUPLICATE_EMAIL could be raised.
    with session.no_autoflush:
        taken = await MemberRepository(session).email_taken(
            organisation.id if organisation else None,
            normalize_email(email),
            exclude_id=exclude_id,
        )
    if taken:
        raise Conflict(
            "A member with this email already exists in the organisation.",
            code="DUPLICATE_EMAIL",
            details={"field": "email"},
        )


def consent_source_of(principal: Principal, given: str | None) -> str:
    """Where a change of consent comes from: as the caller says, else the console for a
    staff user and the API for a key."""
    if given is not None:
        return given
    return (
        ConsentSource.CONSOLE if principal.key_public_id.startswith("stf_") else (ConsentSource.API)
    )


async def create_member(
    session: AsyncSession,
    principal: Principal,
    payload: MemberCreate,
    *,
    consent_source: str | None = None,
) -> Member:
    organisation = await resolve_organisation(session, principal, payload.organisation_id)
    now = utcnow()
    row = column_values(
        MEMBERS,
        {
            "public_id": new_public_id("mem"),
            "organisation_id": organisation.id if organisation else None,
            "email": payload.email,
            "email_normalized": normalize_email(payload.email),
            "first_name": payload.first_name,
            "last_name": payload.last_name,
            "phone": payload.phone,
            "date_of_birth": payload.date_of_birth,
            "consent_email": payload.consent.email,
            "consent_sms": payload.consent.sms,
            "consent_analytics": payload.consent.analytics,
            "consent_profiling": payload.consent.profiling,
            "consent_crm": payload.consent.crm,
            "consent_marketing_email": payload.consent.marketing_email,
            # As a patch of nothing: a null value sets nothing.
            "custom_fields": merge_mapping({}, payload.custom_fields, "custom_fields", "member"),
            "external_ids": dict(payload.external_ids),
            "data_key": new_data_key(),
            "created_at": now,
            "updated_at": now,
        },
        "m",
        ("id",),
    )
    change: dict[str, Any] = {
        "organisation_id": row["m_organisation_id"],
        "member_public_id": row["m_public_id"],
        "occurred_at": now,
        "action": "member.create",
        "object_type": "member",
        "object_id": row["m_public_id"],
    }
    member = orm_object(
        Member,
        {name[2:]: value for name, value in row.items()}
        | {"organisation": organisation, "plan": None},
    )
    event = MemberCreated(member=to_out(member))
    changes = seal_personal(diff({}, snapshot(member)), row["m_data_key"], row["m_public_id"])
    dialect = session.get_bind().dialect.name
    # Activities waiting for a member with this email or these external ids.
    email, keys = row["m_email_normalized"], external_keys(member.external_ids)
    waiting = email is not None or bool(keys)
    if dialect == "postgresql":
        if waiting:
            await lock_member_keys(session, email, keys)
        # The member, its event and its audit entry in one statement; on a taken email the
        # insert returns no row, and neither is written. It also tells whether activities
        # wait for the member: almost always none, and then nothing more is asked.
        params = row | change_params(principal.actor, event, changes=changes, **change)
        params |= {"w_email": email, "w_keys": keys}
        created = (
            await session.execute(
                _create_member_on_postgresql(email is not None, bool(keys)), params
            )
        ).first()
        member_id, waiting = created if created is not None else (None, False)
    else:
        member_id = await session.scalar(_insert_member(dialect), row)
    if member_id is None:  # the email's unique index: taken, or just taken by a commit
        raise Conflict(
            "A member with this email already exists in the organisation.",
            code="DUPLICATE_EMAIL",
            details={"field": "email"},
        )
    member.id = member_id
    # The row is written: the object joins the session as if loaded, so later changes in
    # this request are updates (with their version check), never a second insert.
    make_transient_to_detached(member)
    session.add(member)
    if dialect == "postgresql":
        mark_for_sequencing(session)
    else:
        await record_change_now(session, principal.actor, event, changes=changes, **change)
    record_consent_changes(
        session,
        principal.actor,
        member,
        {},
        source=consent_source_of(principal, consent_source),
        occurred_at=now,
        announce=False,
    )
    # Activities waiting for a member with this email or external id match it now. Imported
    # here: activities (and their earning rules) sit above members.
    from memberhub.activities.service import match_waiting_activities

    if waiting:
        await match_waiting_activities(session, principal, member)
    return member


def external_keys(external_ids: dict[str, str]) -> list[str]:
    """A member's external ids as activities name them (`SYSTEM:ID`)."""
    return [f"{system}:{value}" for system, value in external_ids.items()]


MEMBER_KEY_LOCK_SLOTS = 1024


async def lock_member_keys(
    session: AsyncSession, email_normalized: str | None, keys: Sequence[str]
) -> None:
    """Take, until the transaction ends, the locks of an email and external keys
    (`SYSTEM:ID`), in one statement (see `lock_key_slots`). A transaction that looks for a
    member by a key (an activity recorded) and one that gives a member the key (created,
    or changed) take it before they look: one waits for the other's commit and then sees
    its row, so an activity recorded as its member is created is never left unmatched."""
    names = [f"email:{email_normalized}"] if email_normalized else []
    names += [f"external:{key}" for key in keys]
    await lock_key_slots(session, "member-key", names, MEMBER_KEY_LOCK_SLOTS)


@functools.cache
def _insert_member(dialect: str) -> Insert:
    """One statement that inserts a member unless its email is taken in its organisation
    (no row comes back then): no separate check, and no race between a check and the
    insert."""
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    return (
        insert(MEMBERS)
        .values(column_binds(MEMBERS, "m", ("id",)))
        .on_conflict_do_nothing()
        .returning(MEMBERS.c.id)
    )


@functools.cache
def _create_member_on_postgresql(by_email: bool, by_external_key: bool) -> Select[Any]:
    """PostgreSQL: `_insert_member`, and the event and audit entry of the member it inserts
    (none when it inserts none), in one statement; with the member's id, whether unmatched
    activities wait with its email (`w_email`) or external keys (`w_keys`)."""
    from memberhub.activities.repository import ACTIVITIES, waiting_with_keys

    inserted = _insert_member("postgresql").cte("member")
    if by_email or by_external_key:
        condition = waiting_with_keys(by_email, by_external_key, prefix="w_")
        waiting: Any = exists().where(condition).select_from(ACTIVITIES)
    else:
        waiting = false()
    return select(inserted.c.id, waiting.label("waiting")).add_cte(*change_ctes_after(inserted))


def merge_mapping(
    current: dict[str, Any], patch: dict[str, Any], field: str, owner: str
) -> dict[str, Any]:
    """`custom_fields` or `external_ids` with a patch applied (a null value removes a key),
    within the number of keys one record may hold."""
    merged = dict(current)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    limit = MAX_CUSTOM_FIELDS if field == "custom_fields" else MAX_EXTERNAL_IDS
    if len(merged) > limit:
        raise ValidationFailed(
            f"A {owner} holds at most {limit} {field.replace('_', ' ')}.",
            details={"field": field, "limit": limit, "would_have": len(merged)},
        )
    return merged


_ENTITY_TAG = re.compile(r'^"([0-9]{1,12})"$')


def parse_if_match(header: str | None) -> frozenset[int] | None:
    """The versions an If-Match header accepts; None when absent or `*` (any version).

    If-Match compares strongly, so weak tags (W/"3") never match (RFC 9110, 13.1.1).
    """
    if header is None or header.strip() == "*":
        return None
    versions = set()
    for tag in header.split(","):
        match = _ENTITY_TAG.match(tag.strip())
        if match is not None:
            versions.add(int(match.group(1)))
    return frozenset(versions)


async def update_member(
    session: AsyncSession,
    principal: Principal,
    public_id: str,
    payload: MemberPatch,
    *,
    if_match: frozenset[int] | None,
    consent_source: str | None = None,
) -> Member:
    member = await get_member(session, principal, public_id, for_update=True)
    if if_match is not None and member.version not in if_match:
        raise PreconditionFailed(
            "The member was changed since the version given in If-Match."
            if if_match
            # Malformed, weak or not a version: nothing to compare, and the member may well
            # not have changed; say what would match.
            else "If-Match names no version of the member: send its ETag as given, such as "
            f'"{member.version}" with the quotes (weak tags, W/"…", never match).',
            details={"current_version": member.version, "if_match": sorted(if_match)[:10]},
        )
    before = snapshot(member)
    consent_before = current_consent(member)
    fields = payload.model_dump(exclude_unset=True)

    if "organisation_id" in fields:
        target = fields.pop("organisation_id")
        organisation = (
            await get_visible_organisation(session, principal, target) if target else None
        )
        if organisation is None and principal.organisation_id is not None:
            raise Conflict("A key bound to an organisation cannot detach a member from it.")
        member.organisation = organisation
        member.organisation_id = organisation.id if organisation else None
    if "email" in fields:
        email = fields.pop("email")  # never null (MemberPatch)
        member.email = email
        member.email_normalized = normalize_email(email)
    if (
        before["email"] != member.email
        or before["organisation_id"] != snapshot(member)["organisation_id"]
    ):
        assert member.email is not None
        await _ensure_email_free(session, member.organisation, member.email, member.id)
    consent = fields.pop("consent", None) or {}
    for key, value in consent.items():
        if value is not None:
            setattr(member, f"consent_{key}", value)
    for mapping_field in ("custom_fields", "external_ids"):
        patch = fields.pop(mapping_field, None)
        if patch is not None:
            current = getattr(member, mapping_field)
            setattr(member, mapping_field, merge_mapping(current, patch, mapping_field, "member"))
    for field, value in fields.items():
        setattr(member, field, value)

    changes = diff(before, snapshot(member))
    if not changes:
        return member
    if member.data_key is None:  # created before members had keys: from now on
        member.data_key = new_data_key()
    member.updated_at = utcnow()
    await session.flush()
    emit(
        session,
        MemberUpdated(member=to_out(member), changed_fields=sorted(changes)),
        organisation_id=member.organisation_id,
        member_public_id=member.public_id,
    )
    record_consent_changes(
        session,
        principal.actor,
        member,
        consent_before,
        source=consent_source_of(principal, consent_source),
        occurred_at=member.updated_at,
    )
    record_write(
        session,
        principal.actor,
        action="member.update",
        object_type="member",
        object_id=member.public_id,
        changes=seal_personal(changes, member.data_key, member.public_id),
    )
    if changes.keys() & {"email", "external_ids", "organisation_id"}:
        # A key the member gained (an email, a shop's customer id) matches the activities
        # waiting for it, as when a member is created.
        from memberhub.activities.service import match_waiting_activities

        await match_waiting_activities(session, principal, member)
    return member


async def _erase_enrolled_leads(session: AsyncSession, member: Member) -> None:
    """The leads the member was enrolled from held the same personal data: erased from
    them and from their earlier events too."""
    from sqlalchemy.orm import selectinload

    from memberhub.events.catalog import LeadCreated, LeadUpdated
    from memberhub.events.models import Event
    from memberhub.leads.models import Lead
    from memberhub.leads.service import to_out as lead_out

    leads = (
        await session.scalars(
            select(Lead)
            .where(Lead.member_id == member.id)
            .options(selectinload(Lead.organisation), selectinload(Lead.member))
            .with_for_update()
        )
    ).all()
    for lead in leads:
        lead.email = lead.email_normalized = lead.first_name = lead.last_name = None
        lead.phone = None
        lead.custom_fields, lead.external_ids = {}, {}
        # Its audit entries' sealed values can no longer be opened.
        lead.data_key = None
        erased = lead_out(lead).model_dump(mode="json")
        past = await session.scalars(
            select(Event).where(
                Event.type.in_((LeadCreated.event_type, LeadUpdated.event_type)),
                Event.data["lead"]["id"].as_string() == lead.public_id,
            )
        )
        for event in past:
            event.data = {**event.data, "lead": erased}


# How many ids one statement names, when erasure rewrites a member's activity events.
ERASE_IDS_PER_STATEMENT = 500
# What a bulk report row that named an erased member by email names instead.
ERASED_ROW_MEMBER = "erased"


async def _erase_activity_keys(session: AsyncSession, member: Member) -> None:
    """An activity recorded before it matched the member waited with their email (or
    external id) as its key, and its `activity.recorded` event still holds it: erased there.
    Only those that waited (matched after they were recorded) are looked for."""
    from memberhub.activities.models import Activity
    from memberhub.events.catalog import ActivityRecorded
    from memberhub.events.models import Event

    waited = (
        await session.scalars(
            select(Activity.public_id).where(
                Activity.member_id == member.id, Activity.matched_at > Activity.recorded_at
            )
        )
    ).all()
    for start in range(0, len(waited), ERASE_IDS_PER_STATEMENT):
        past = await session.scalars(
            select(Event).where(
                Event.type == ActivityRecorded.event_type,
                Event.data["activity"]["id"]
                .as_string()
                .in_(waited[start : start + ERASE_IDS_PER_STATEMENT]),
            )
        )
        for event in past:
            recorded = event.data["activity"]
            if recorded.get("email") is not None or recorded.get("external_id") is not None:
                erased = {**recorded, "email": None, "external_id": None}
                event.data = {**event.data, "activity": erased}


def jobs_naming_by_email(member: Member) -> Select[int]:
    """The bulk jobs whose rows may name `member` by its email: its organisation's and the
    installation-wide ones (an email is unique only within an organisation: another one's
    jobs are of its members)."""
    from memberhub.bulk.models import BulkJob

    return select(BulkJob.id).where(
        or_(BulkJob.organisation_id.is_(None), BulkJob.organisation_id == member.organisation_id)
    )


async def _erase_bulk_rows(session: AsyncSession, member: Member, email: str | None) -> None:
    """The report rows of bulk awards and member imports name a row's member by the email
    it gave where it had no member id (a failed row), and a dry run keeps its match key:
    erased from the jobs that may name the member by email (`jobs_naming_by_email`)."""
    from memberhub.bulk.models import BulkJobRow

    if not email:
        return
    jobs = jobs_naming_by_email(member)
    await session.execute(
        update(BulkJobRow)
        .where(BulkJobRow.job_id.in_(jobs), func.lower(BulkJobRow.member_id) == email)
        .values(member_id=ERASED_ROW_MEMBER)
    )
    await session.execute(
        update(BulkJobRow)
        .where(BulkJobRow.job_id.in_(jobs), BulkJobRow.match_email == email)
        .values(match_email=None)
    )


async def _erase_crm_copies(
    session: AsyncSession, member: Member, actor: Actor, now: datetime
) -> None:
    """What CRM syncs kept of the member's values: its links' agreed values, the conflicts
    about it (both sides' values; an open one is closed, nothing is left to settle) and the
    changes its sync records show. The property names stay, as in the audit log."""
    from memberhub.crm.models import CrmConflict, CrmLink, SyncRunRecord

    await session.execute(
        update(CrmLink)
        .where(CrmLink.entity_type == "members", CrmLink.entity_id == member.id)
        .values(synced={}, held={})
    )
    about = (CrmConflict.entity_type == "members", CrmConflict.entity_public_id == member.public_id)
    await session.execute(
        update(CrmConflict)
        .where(*about, CrmConflict.status == "open")
        .values(status="resolved", resolution="erased", resolved_by=actor.id, resolved_at=now)
    )
    await session.execute(
        update(CrmConflict).where(*about).values(values={"memberhub": ERASED, "crm": ERASED})
    )
    records = await session.scalars(
        select(SyncRunRecord).where(
            SyncRunRecord.entity_type == "members",
            SyncRunRecord.entity_public_id == member.public_id,
        )
    )
    for record in records:
        record.changes = dict.fromkeys(record.changes or {}, ERASED)


async def delete_member(session: AsyncSession, principal: Principal, public_id: str) -> None:
    """Erase personal data; the row stays so that ledger and audit references hold."""
    member = await get_member(session, principal, public_id, for_update=True)
    now = utcnow()
    consent_before = current_consent(member)
    email = member.email_normalized
    for field in PERSONAL_FIELDS:
        setattr(member, field, {} if field in ("custom_fields", "external_ids") else None)
    member.email_normalized = None
    # What its audit entries hold of it can no longer be read.
    member.data_key = None
    for purpose in PURPOSES:
        setattr(member, f"consent_{purpose}", False)
    member.deleted_at = now
    member.updated_at = now
    await session.flush()
    # Earlier events carried the profile; erase it there too, keeping what happened.
    erased = to_out(member).model_dump(mode="json")
    for past in await EventRepository(session).for_member(
        member.public_id, (MemberCreated.event_type, MemberUpdated.event_type)
    ):
        past.data = {**past.data, "member": erased}
    await _erase_enrolled_leads(session, member)
    await _erase_activity_keys(session, member)
    await _erase_bulk_rows(session, member, email)
    await _erase_crm_copies(session, member, principal.actor, now)
    # Withdrawn before the deletion event, so consumers stop sending before they erase.
    record_consent_changes(
        session,
        principal.actor,
        member,
        consent_before,
        source=ConsentSource.ERASURE,
        occurred_at=now,
    )
    emit(
        session,
        MemberDeleted(
            member_id=member.public_id,
            organisation_id=member.organisation.public_id if member.organisation else None,
            deleted_at=now,
        ),
        organisation_id=member.organisation_id,
        member_public_id=member.public_id,
        occurred_at=now,
    )
    record_write(
        session,
        principal.actor,
        action="member.delete",
        object_type="member",
        object_id=member.public_id,
        changes={"erased_fields": list(PERSONAL_FIELDS), "deleted_at": now.isoformat()},
    )
