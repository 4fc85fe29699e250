"""Activities: recording what members did, matching them to members, and crediting what the
earning rules say, in one transaction.

Recording takes its locks in one order: the member's point account (when the activity
fits a member; read with the member in one statement when `member_id` names it), the
activity's unique source id (its insert: a concurrent repeat waits for it, then finds it
and returns it as a replay), then, during evaluation, the rows of rules with an overall cap
and the batches an extension moves. Matching a waiting activity later locks its row, then
the account. The account lock serialises one member's activities, so caps
per member are exact however many arrive at once; members never wait for each other except
on a rule with an overall cap. Each ledger write takes a reference derived from the
activity and the rule (`activity:<act_…>:<erl_…>`): the activity is evaluated once (it is
recorded once; an unmatched one is matched once, its row locked), and the reference's
unique index makes a second credit impossible anyway. The earns of one activity are written
in one ledger pass with the activity's event and audit entry (`_apply_rules`, `_announce`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import make_transient_to_detached

from memberhub.activities.matching import (
    MemberKey,
    find_member,
    require_within,
    scope_organisations,
)
from memberhub.activities.models import Activity, ActivityStatus, MatchedBy
from memberhub.activities.repository import ActivityRepository, ListedActivity
from memberhub.activities.schemas import ActivityIn, ActivityOut, CreditOut
from memberhub.audit.service import audit_row, record_change_now
from memberhub.auth.principal import Principal
from memberhub.earning_rules.conditions import Facts
from memberhub.earning_rules.evaluation import ActivityRef, Outcome, active_rules, evaluate
from memberhub.earning_rules.models import RuleAward
from memberhub.earning_rules.schemas import SimulatedRule, SimulationOut
from memberhub.events.catalog import ActivityMatched, ActivityRecorded, EventData
from memberhub.events.service import event_row
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.db import column_values, orm_object
from memberhub.kit.errors import Conflict, MemberhubError, NotFound, ValidationFailed
from memberhub.kit.ids import new_public_id
from memberhub.leads.models import Lead
from memberhub.leads.service import lead_for_activity
from memberhub.members.models import Member
from memberhub.members.repository import normalize_email
from memberhub.members.service import (
    external_keys,
    get_member,
    lock_member_keys,
    resolve_organisation,
)
from memberhub.organisations.models import Organisation
from memberhub.points import service as points
from memberhub.points.models import PointAccount, PointTransaction
from memberhub.points.repository import PointsRepository
from memberhub.program import service as program_service

ACTIVITIES = cast(Table, Activity.__table__)
RULE_AWARDS = cast(Table, RuleAward.__table__)
# A source's clock may run a little ahead of ours; an activity further in the future is
# refused (it would open windows and extend expiries from a time not yet come).
CLOCK_SKEW = timedelta(minutes=5)
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
# Waiting activities matched in the transaction that creates their member; more stay
# unmatched until `POST /activities/{id}/match`.
MATCH_BATCH = 100


class ActivityNotFound(NotFound):
    code = "ACTIVITY_NOT_FOUND"
    default_message = "The activity does not exist."


@dataclass
class Recorded:
    activity: ActivityOut
    replayed: bool = False


# ---------------------------------------------------------------- recording


def _check_time(occurred_at: datetime, now: datetime) -> None:
    if not EARLIEST <= occurred_at <= now + CLOCK_SKEW:
        raise ValidationFailed(
            "occurred_at must be after 1970 and not in the future.",
            details={
                "fields": [
                    {
                        "loc": ["body", "occurred_at"],
                        "path": "$.occurred_at",
                        "message": "must be after 1970 and not in the future",
                        "type": "out_of_range",
                    }
                ]
            },
        )


async def _member_for(
    session: AsyncSession,
    principal: Principal,
    payload: ActivityIn,
    organisation_id: int | None,
    *,
    lock: bool,
) -> tuple[Member | None, str | None, PointAccount | None]:
    """The activity's member, how it was found, and, with `lock`, the member's point
    account, locked (read with the member in one statement when `member_id` names it)."""
    if payload.member_id is not None:
        if lock:
            member, account = await points.member_and_account(session, principal, payload.member_id)
        else:
            member, account = await get_member(session, principal, payload.member_id), None
        await require_within(session, member, organisation_id)
        return member, MatchedBy.MEMBER_ID, account
    organisations = await scope_organisations(session, organisation_id, principal)
    key = _key_of(payload)
    # Before looking: a member being given this key meanwhile is seen once it commits.
    await lock_member_keys(
        session, key.email_normalized, [key.external_key] if key.external_key else []
    )
    found, matched_by = await find_member(session, key, organisations)
    if found is None or not lock:
        return found, matched_by, None
    return found, matched_by, await PointsRepository(session).lock_account(found.id)


def _key_of(payload: ActivityIn) -> MemberKey:
    email = normalize_email(payload.email) if payload.email is not None else None
    return MemberKey(email, payload.external_id)


def _facts(
    activity_type: str,
    source: str,
    occurred_at: datetime,
    attributes: dict[str, Any],
    member: Member,
) -> Facts:
    return Facts(
        activity_type=activity_type,
        source=source,
        occurred_at=occurred_at,
        attributes=attributes,
        member_tier=member.tier,
        member_status=member.status,
        member_organisation_id=member.organisation_id,
    )


async def record_activity(
    session: AsyncSession,
    principal: Principal,
    payload: ActivityIn,
    *,
    now: datetime | None = None,
) -> Recorded:
    """Record an activity and, when it matches a member, apply the earning rules to it, in
    the caller's transaction.

    This is the one way in for every source. A connector (an Eventbrite check-in, a Shopify
    order, a mapped inbound webhook) builds an `ActivityIn` with its own `source` and the
    vendor's id as `source_id`, and calls this with its integration's principal (whose
    organisation scopes the source id and the members it may match). A repeat of a
    source id in the same organisation (a retried webhook, a re-import) returns the first
    activity with `replayed` and credits nothing again. An activity whose key fits no
    member is kept unmatched, and matched (and evaluated) when a member with that email or
    external id is created.

    Raises MEMBER_NOT_FOUND for a `member_id` the principal cannot see, and
    VALIDATION_ERROR for an `occurred_at` in the future; nothing is written then.
    """
    now = now or utcnow()
    _check_time(payload.occurred_at, now)
    organisation = await resolve_organisation(session, principal, payload.organisation_id)
    organisation_id = organisation.id if organisation is not None else None
    repo = ActivityRepository(session)
    try:
        member, matched_by, account = await _member_for(
            session, principal, payload, organisation_id, lock=True
        )
    except MemberhubError:
        # A repeat is a replay whatever became of its member since (erased, moved to
        # another organisation): a vendor retrying its webhook must not be refused.
        if (replayed := await _replay(session, repo, organisation_id, payload)) is not None:
            return replayed
        raise
    key = _key_of(payload)
    values = {
        "public_id": new_public_id("act"),
        "organisation_id": organisation_id,
        "source_scope": organisation_id or 0,
        "source": payload.source,
        "source_id": payload.source_id,
        "type": payload.type,
        "occurred_at": payload.occurred_at,
        "member_id": member.id if member is not None else None,
        "matched_by": matched_by,
        "matched_at": now if member is not None else None,
        # The key is kept only while the activity waits for its member.
        "email_normalized": key.email_normalized if member is None else None,
        "external_key": key.external_key if member is None else None,
        "attributes": payload.attributes.model_dump(mode="json", exclude_none=True),
        "actor": principal.actor.id,
        "recorded_at": now,
    }
    activity_id = await repo.insert(column_values(ACTIVITIES, values, "a", ("id",)))
    if activity_id is None:
        replayed = await _replay(session, repo, organisation_id, payload)
        assert replayed is not None, "the source id's row conflicted, so it exists"
        return replayed
    activity = orm_object(Activity, {"id": activity_id, **values})
    # Written already: the object joins the session as if loaded (later changes update it).
    make_transient_to_detached(activity)
    session.add(activity)
    credits: list[CreditOut] = []
    evaluated = None
    lead_public_id = None
    if member is not None:
        evaluated = await _apply_rules(session, principal.actor, activity, member, now, account)
        credits = evaluated.credits
    elif payload.email is not None and await _makes_lead(
        session, principal, payload, key, organisation_id
    ):
        activity.lead_id, lead_public_id = await lead_for_activity(
            session,
            principal,
            organisation,
            email=payload.email,
            external_ids=dict([key.external_key.split(":", 1)]) if key.external_key else {},
            source=payload.source,
            now=now,
        )
    out = to_out(
        activity,
        member_public_id=member.public_id if member is not None else None,
        organisation_public_id=organisation.public_id if organisation is not None else None,
        credits=credits,
        lead_public_id=lead_public_id,
    )
    await _announce(
        session,
        principal.actor,
        evaluated,
        ActivityRecorded(activity=out),
        organisation_id=member.organisation_id if member is not None else organisation_id,
        member_public_id=out.member_id,
        occurred_at=now,
        action="activity.record",
        object_id=activity.public_id,
        changes={
            "type": activity.type,
            "source": activity.source,
            "source_id": activity.source_id,
            "member_id": out.member_id,
            "lead_id": lead_public_id,
            "points": sum(credit.points for credit in credits),
        },
    )
    return Recorded(out)


async def _makes_lead(
    session: AsyncSession,
    principal: Principal,
    payload: ActivityIn,
    key: MemberKey,
    organisation_id: int | None,
) -> bool:
    """Whether an unmatched activity makes a lead: the program says so for its source, and
    no member of its scope has its email or external id (a key that fits two members is
    ambiguous: those people are members already)."""
    program = await program_service.get_program(session)
    if not program_service.makes_lead(program, payload.source):
        return False
    organisations = await scope_organisations(session, organisation_id, principal)
    repo = ActivityRepository(session)
    if key.external_key is not None:
        system, _, value = key.external_key.partition(":")
        if await repo.members_by_external_id(system, value, organisations):
            return False
    assert key.email_normalized is not None
    return not await repo.members_by_email(key.email_normalized, organisations)


@dataclass
class _Evaluated:
    """What the rules did for a matched activity: its credits, and, when they are earns
    written in one pass, that pass and its awards, still to write with the activity's own
    event and audit entry (`_announce`)."""

    credits: list[CreditOut]
    earn_pass: points.EarnPass | None = None
    awards: list[dict[str, Any]] = field(default_factory=list)


async def _apply_rules(
    session: AsyncSession,
    actor: Actor,
    activity: Activity,
    member: Member,
    now: datetime,
    account: PointAccount | None = None,
) -> _Evaluated:
    """Evaluate the rules for a matched activity and plan or write what they do: each
    applying rule one ledger transaction (an earn, or an extend) naming the rule and its
    version, and an award row its caps count. The member's account is locked first (unless
    the caller holds it, `account`); its last activity time is set even when no rule
    applies.

    Earns alone (the usual case) are planned as one pass (`points.plan_rule_earns`) that
    `_announce` writes with the activity's event: one statement on PostgreSQL, a few on
    SQLite, however many rules credit. An extension, or points that would pay a deficit,
    are written here one rule at a time."""
    if account is None:
        account = await PointsRepository(session).lock_account(member.id)
    outcomes = await evaluate(
        session,
        await active_rules(session),
        _facts(activity.type, activity.source, activity.occurred_at, activity.attributes, member),
        ActivityRef(activity.id, member.id, activity.type, activity.occurred_at),
        activity.attributes,
        lock=True,
    )
    applying = [outcome for outcome in outcomes if outcome.applies]
    earn_pass = None
    if applying and all(outcome.points > 0 for outcome in applying):
        earn_pass = points.plan_rule_earns(
            await program_service.get_program(session),
            actor,
            member,
            account,
            [_rule_earn(activity, outcome) for outcome in applying],
            now=now,
        )
    if earn_pass is not None:
        transactions = earn_pass.transactions
        return _Evaluated(
            credits=[
                _credit_out(outcome, txn.public_id)
                for outcome, txn in zip(applying, transactions, strict=True)
            ],
            earn_pass=earn_pass,
            awards=[_award(activity, member, outcome, None, now) for outcome in applying],
        )
    credits = []
    awards = []
    for outcome in applying:
        txn = await _write(session, actor, activity, member, account, outcome, now)
        if txn.id is None:
            await session.flush()
        awards.append(_award(activity, member, outcome, txn.id, now))
        credits.append(_credit_out(outcome, txn.public_id))
    if awards:
        await session.execute(insert(RuleAward), awards)
    if account.last_activity_at is None or account.last_activity_at < now:
        account.last_activity_at = now
    return _Evaluated(credits)


def _award(
    activity: Activity, member: Member, outcome: Outcome, transaction_id: int | None, now: datetime
) -> dict[str, Any]:
    rule = outcome.rule
    return {
        "rule_id": rule.id,
        "rule_version": rule.version,
        "member_id": member.id,
        "activity_id": activity.id,
        "transaction_id": transaction_id,
        "effect": rule.effect_type,
        "points": outcome.points,
        "occurred_at": activity.occurred_at,
        "created_at": now,
    }


def _credit_out(outcome: Outcome, transaction_id: str) -> CreditOut:
    rule = outcome.rule
    return CreditOut(
        rule_id=rule.public_id,
        rule_version=rule.version,
        effect=rule.effect_type,
        points=outcome.points,
        transaction_id=transaction_id,
    )


def _reference(activity: Activity, outcome: Outcome) -> str:
    return f"activity:{activity.public_id}:{outcome.rule.public_id}"


def _details(activity: Activity, outcome: Outcome) -> dict[str, Any]:
    rule = outcome.rule
    details: dict[str, Any] = {
        "activity_id": activity.public_id,
        "rule_id": rule.public_id,
        "rule_version": rule.version,
        "effect": rule.effect_type,
    }
    if outcome.points > 0 and outcome.capped_by is not None:
        details["capped_by"] = outcome.capped_by
    return details


def _rule_earn(activity: Activity, outcome: Outcome) -> points.RuleEarn:
    return points.RuleEarn(
        points=outcome.points,
        reference_id=_reference(activity, outcome),
        reason=outcome.rule.name,
        amount=activity.attributes.get("amount"),
        currency=activity.attributes.get("currency"),
        details=_details(activity, outcome),
    )


async def _announce(
    session: AsyncSession,
    actor: Actor,
    evaluated: _Evaluated | None,
    event: EventData,
    *,
    organisation_id: int | None,
    member_public_id: str | None,
    occurred_at: datetime,
    action: str,
    object_id: str,
    changes: dict[str, Any],
) -> None:
    """The activity's event and audit entry, written with its earns when they wait as one
    pass, else on their own."""
    if evaluated is None or evaluated.earn_pass is None:
        await record_change_now(
            session,
            actor,
            event,
            organisation_id=organisation_id,
            member_public_id=member_public_id,
            occurred_at=occurred_at,
            action=action,
            object_type="activity",
            object_id=object_id,
            changes=changes,
        )
        return
    await evaluated.earn_pass.write(
        session,
        events=[event_row(event, organisation_id, member_public_id, occurred_at)],
        audits=[audit_row(actor, action, "activity", object_id, changes)],
        linked=(RULE_AWARDS, evaluated.awards),
    )


async def _write(
    session: AsyncSession,
    actor: Actor,
    activity: Activity,
    member: Member,
    account: PointAccount,
    outcome: Outcome,
    now: datetime,
) -> PointTransaction:
    """The ledger write of one applying rule on its own: its points as an earn, or its
    extension."""
    if outcome.points > 0:
        earn = _rule_earn(activity, outcome)
        result = await points.earn_by_rule(
            session,
            actor,
            member,
            account,
            points=earn.points,
            reference_id=earn.reference_id,
            reason=earn.reason,
            amount=earn.amount,
            currency=earn.currency,
            details=earn.details,
            now=now,
        )
    else:
        result = await points.extend_batches(
            session,
            actor,
            member,
            account,
            outcome.extension,
            reason=outcome.rule.name,
            reference_id=_reference(activity, outcome),
            details=_details(activity, outcome),
            now=now,
        )
    return result.transaction


# ---------------------------------------------------------------- matching later


async def get_activity(
    session: AsyncSession, principal: Principal, public_id: str
) -> ListedActivity:
    """The activity, if the key may see it: one of its organisations, or of its member's."""
    listed = await ActivityRepository(session).listed(public_id)
    if listed is None or not (
        principal.can_see_organisation(listed.activity.organisation_id)
        or (
            listed.member_public_id is not None
            and principal.can_see_organisation(listed.member_organisation_id)
        )
    ):
        raise ActivityNotFound(f"Activity {public_id} does not exist.")
    return listed


async def match_activity(
    session: AsyncSession,
    principal: Principal,
    public_id: str,
    *,
    member_public_id: str | None,
    now: datetime | None = None,
) -> ActivityOut:
    """Match an unmatched activity: to the member named (who must belong to the activity's
    organisation), or by its key again. The rules are evaluated for it then, in this
    transaction. 409 ACTIVITY_ALREADY_MATCHED, or NO_MATCHING_MEMBER when its key still
    fits no single member."""
    now = now or utcnow()
    await get_activity(session, principal, public_id)
    activity = await ActivityRepository(session).get_by_public_id(public_id, for_update=True)
    assert activity is not None
    if activity.member_id is not None:
        raise Conflict(f"Activity {public_id} is matched already.", code="ACTIVITY_ALREADY_MATCHED")
    if member_public_id is not None:
        member = await get_member(session, principal, member_public_id)
        await require_within(session, member, activity.organisation_id)
        matched_by: str | None = MatchedBy.MANUAL
    else:
        organisations = await scope_organisations(session, activity.organisation_id)
        found, matched_by = await find_member(session, MemberKey.of(activity), organisations)
        if found is None or not principal.can_see_organisation(found.organisation_id):
            raise Conflict(
                f"No single member has the key of activity {public_id} yet.",
                code="NO_MATCHING_MEMBER",
            )
        member = found
    assert matched_by is not None
    return await _attach(session, principal.actor, activity, member, matched_by, now)


async def match_waiting_activities(
    session: AsyncSession, principal: Principal, member: Member
) -> None:
    """Match the unmatched activities waiting for a new member's email or external ids
    (the member's creation calls this, in its transaction), evaluating the rules for each.
    An activity matches only if the member is the one its key now fits in its scope."""
    keys = external_keys(member.external_ids)
    await lock_member_keys(session, member.email_normalized, keys)
    repo = ActivityRepository(session)
    now = utcnow()
    scopes: dict[int | None, frozenset[int] | None] = {}
    after_id = 0
    while True:  # every one of them, a batch at a time
        waiting = await repo.unmatched_with_keys(
            member.email_normalized, keys, limit=MATCH_BATCH, after_id=after_id
        )
        for activity in waiting:
            if activity.organisation_id not in scopes:
                scopes[activity.organisation_id] = await scope_organisations(
                    session, activity.organisation_id
                )
            organisations = scopes[activity.organisation_id]
            if organisations is not None and member.organisation_id not in organisations:
                continue
            found, matched_by = await find_member(session, MemberKey.of(activity), organisations)
            if found is not None and found.id == member.id and matched_by is not None:
                await _attach(session, principal.actor, activity, member, matched_by, now)
        if len(waiting) < MATCH_BATCH:
            return
        after_id = waiting[-1].id


async def _attach(
    session: AsyncSession,
    actor: Actor,
    activity: Activity,
    member: Member,
    matched_by: str,
    now: datetime,
) -> ActivityOut:
    activity.member_id = member.id
    activity.matched_by = matched_by
    activity.matched_at = now
    activity.email_normalized = None
    activity.external_key = None
    await session.flush()
    evaluated = await _apply_rules(session, actor, activity, member, now)
    credits = evaluated.credits
    organisation = (
        await session.get(Organisation, activity.organisation_id)
        if activity.organisation_id is not None
        else None
    )
    lead = await session.get(Lead, activity.lead_id) if activity.lead_id is not None else None
    out = to_out(
        activity,
        member_public_id=member.public_id,
        organisation_public_id=organisation.public_id if organisation is not None else None,
        credits=credits,
        lead_public_id=lead.public_id if lead is not None else None,
    )
    await _announce(
        session,
        actor,
        evaluated,
        ActivityMatched(activity=out),
        organisation_id=member.organisation_id,
        member_public_id=member.public_id,
        occurred_at=now,
        action="activity.match",
        object_id=activity.public_id,
        changes={
            "member_id": member.public_id,
            "matched_by": matched_by,
            "points": sum(credit.points for credit in credits),
        },
    )
    return out


# ---------------------------------------------------------------- simulation


async def _replay(
    session: AsyncSession,
    repo: ActivityRepository,
    organisation_id: int | None,
    payload: ActivityIn,
) -> Recorded | None:
    """The activity recorded first with `payload`'s source id, as a replay; None if none."""
    existing = await repo.by_source(organisation_id or 0, payload.source, payload.source_id)
    if existing is None:
        return None
    listed = await repo.listed(existing.public_id)
    assert listed is not None
    return Recorded((await activities_out(session, [listed]))[0], replayed=True)


async def simulate_activity(
    session: AsyncSession,
    principal: Principal,
    payload: ActivityIn,
    *,
    now: datetime | None = None,
) -> SimulationOut:
    """What recording `payload` now would credit, rule by rule, without writing anything:
    the same matching and the same evaluation as `record_activity`, with no locks."""
    now = now or utcnow()
    _check_time(payload.occurred_at, now)
    organisation = await resolve_organisation(session, principal, payload.organisation_id)
    organisation_id = organisation.id if organisation is not None else None
    existing = await ActivityRepository(session).by_source(
        organisation_id or 0, payload.source, payload.source_id
    )
    try:
        member, matched_by, _ = await _member_for(
            session, principal, payload, organisation_id, lock=False
        )
    except MemberhubError:
        if existing is None:
            raise
        # A replay, whatever became of its member since: recording it would credit nothing.
        member, matched_by = None, None
    result = SimulationOut(
        member_id=member.public_id if member is not None else None,
        matched_by=matched_by,
        replay_of=existing.public_id if existing is not None else None,
        rules=[],
        total_points=0,
    )
    if member is None or existing is not None:
        return result
    attributes = payload.attributes.model_dump(mode="json", exclude_none=True)
    outcomes = await evaluate(
        session,
        await active_rules(session),
        _facts(payload.type, payload.source, payload.occurred_at, attributes, member),
        ActivityRef(None, member.id, payload.type, payload.occurred_at),
        attributes,
        lock=False,
    )
    result.rules = [
        SimulatedRule(
            rule_id=outcome.rule.public_id,
            rule_version=outcome.rule.version,
            name=outcome.rule.name,
            effect=outcome.rule.effect_type,
            points=outcome.points,
            computed_points=outcome.computed_points,
            capped_by=outcome.capped_by,
            extended_batches=len(outcome.extension),
        )
        for outcome in outcomes
    ]
    result.total_points = sum(outcome.points for outcome in outcomes)
    return result


# ---------------------------------------------------------------- output


def to_out(
    activity: Activity,
    *,
    member_public_id: str | None,
    organisation_public_id: str | None,
    credits: Sequence[CreditOut],
    lead_public_id: str | None = None,
) -> ActivityOut:
    return ActivityOut(
        id=activity.public_id,
        type=activity.type,
        occurred_at=activity.occurred_at,
        source=activity.source,
        source_id=activity.source_id,
        organisation_id=organisation_public_id,
        member_id=member_public_id,
        status=ActivityStatus.MATCHED if activity.member_id else ActivityStatus.UNMATCHED,
        matched_by=activity.matched_by,
        matched_at=activity.matched_at,
        email=activity.email_normalized,
        external_id=activity.external_key,
        attributes=dict(activity.attributes),
        credits=list(credits),
        lead_id=lead_public_id,
        recorded_at=activity.recorded_at,
    )


async def activities_out(
    session: AsyncSession, rows: Sequence[ListedActivity]
) -> list[ActivityOut]:
    credits = await ActivityRepository(session).credits_for(row.id for row in rows)
    return [
        to_out(
            row.activity,
            member_public_id=row.member_public_id,
            organisation_public_id=row.organisation_public_id,
            lead_public_id=row.lead_public_id,
            credits=[
                CreditOut(
                    rule_id=rule_id,
                    rule_version=version,
                    effect=effect,
                    points=points_,
                    transaction_id=txn,
                )
                for rule_id, version, effect, points_, txn in credits.get(row.id, [])
            ],
        )
        for row in rows
    ]
