"""The loyalty program's settings, and the rules derived from them (earn rate, expiry)."""

from __future__ import annotations

import calendar
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import ValidationError
from sqlalchemy import Table, event, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from memberhub.audit.service import diff, record_write
from memberhub.auth.principal import Principal
from memberhub.kit.cache import ProcessCache, detached
from memberhub.kit.clock import utcnow
from memberhub.kit.errors import ValidationFailed
from memberhub.program.models import ExpiryPolicy, LoyaltyProgram
from memberhub.program.schemas import (
    AlertThresholds,
    ProgramFields,
    ProgramOut,
    ProgramPatch,
    RoleLimits,
    UnmatchedActivityLeads,
    check_expiry_fields,
)

PROGRAM_ID = 1


def _defaults() -> LoyaltyProgram:
    return LoyaltyProgram(
        id=PROGRAM_ID,
        currency="MYR",
        earn_points=1,
        earn_per_amount=200,
        expiry_policy=ExpiryPolicy.NEVER,
        pending_days=0,
        negative_balance_policy="forbid",
        timezone="UTC",
        expiring_notice_days=30,
        point_value_amount=1,
        point_value_points=1,
        role_limits=RoleLimits().model_dump(),
        alert_thresholds=AlertThresholds().model_dump(),
        unmatched_activity_leads=UnmatchedActivityLeads().model_dump(),
        # Never saved: no time of change (set when it is first saved).
        updated_at=None,
    )


_CACHE_KEY = "memberhub.program"


_PROGRAM_CACHE: ProcessCache[int, LoyaltyProgram] = ProcessCache(
    "program", watches=(LoyaltyProgram,)
)


async def get_program(session: AsyncSession) -> LoyaltyProgram:
    """The settings row; before anyone saved settings, the defaults (not stored). Read-only.

    Kept per process (`kit/cache.py`), and once per transaction: a ledger operation asks
    several times.
    """
    cached: LoyaltyProgram | None = session.info.get(_CACHE_KEY)
    if cached is not None:
        return cached

    async def load() -> LoyaltyProgram:
        table = LoyaltyProgram.__table__
        assert isinstance(table, Table)
        row = (await session.execute(select(table).where(table.c.id == PROGRAM_ID))).first()
        return detached(LoyaltyProgram, row) if row is not None else _defaults()

    program = await _PROGRAM_CACHE.get_or_load(session, PROGRAM_ID, load)
    session.info[_CACHE_KEY] = program
    return program


async def program_zone(session: AsyncSession) -> ZoneInfo:
    """The program's time zone: its calendar counts months, days and schedules."""
    return ZoneInfo((await get_program(session)).timezone)


@event.listens_for(Session, "after_transaction_end")
def _forget_program(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None or transaction.nested:
        session.info.pop(_CACHE_KEY, None)


def to_fields(program: LoyaltyProgram) -> ProgramFields:
    return ProgramFields(
        currency=program.currency,
        earn_points=program.earn_points,
        earn_per_amount=program.earn_per_amount,
        expiry_policy=program.expiry_policy,
        expiry_days=program.expiry_days,
        expiry_fixed_month=program.expiry_fixed_month,
        expiry_fixed_day=program.expiry_fixed_day,
        pending_days=program.pending_days,
        negative_balance_policy=program.negative_balance_policy,
        timezone=program.timezone,
        expiring_notice_days=program.expiring_notice_days,
        point_value_amount=program.point_value_amount,
        point_value_points=program.point_value_points,
        role_limits=RoleLimits.model_validate(program.role_limits or {}),
        alert_thresholds=AlertThresholds.model_validate(program.alert_thresholds or {}),
        unmatched_activity_leads=unmatched_activity_leads(program),
    )


def to_out(program: LoyaltyProgram) -> ProgramOut:
    return ProgramOut(**to_fields(program).model_dump(), updated_at=program.updated_at)


def role_limits(program: LoyaltyProgram) -> RoleLimits:
    return RoleLimits.model_validate(program.role_limits or {})


def alert_thresholds(program: LoyaltyProgram) -> AlertThresholds:
    return AlertThresholds.model_validate(program.alert_thresholds or {})


def unmatched_activity_leads(program: LoyaltyProgram) -> UnmatchedActivityLeads:
    return UnmatchedActivityLeads.model_validate(program.unmatched_activity_leads or {})


def makes_lead(program: LoyaltyProgram, source: str) -> bool:
    """Whether an unmatched activity from `source` that carries an email makes a lead."""
    setting = program.unmatched_activity_leads or {}
    if not setting.get("enabled"):
        return False
    sources = setting.get("sources")
    return sources is None or source in sources


_NESTED_PATCHES = frozenset({"role_limits", "alert_thresholds"})


def _merged(stored: Any, sent: Any) -> Any:
    """`sent` over `stored`, object by object: what `sent` leaves out keeps its value."""
    if isinstance(stored, dict) and isinstance(sent, dict):
        return {**stored, **{key: _merged(stored.get(key), value) for key, value in sent.items()}}
    return sent


async def update_program(
    session: AsyncSession, principal: Principal, payload: ProgramPatch
) -> LoyaltyProgram:
    principal.require_installation_wide("Program settings")
    stored = await session.scalar(
        select(LoyaltyProgram).where(LoyaltyProgram.id == PROGRAM_ID).with_for_update()
    )
    program = stored if stored is not None else _defaults()
    before = to_fields(program).model_dump(mode="json")
    merged: dict[str, Any] = {**before}
    for key, value in payload.model_dump(exclude_unset=True, mode="json").items():
        # A PATCH changes only what it sends, within role_limits and alert_thresholds too
        # (one role's one limit); unmatched_activity_leads is set whole, as documented.
        merged[key] = _merged(before[key], value) if key in _NESTED_PATCHES else value
    try:
        fields = check_expiry_fields(ProgramFields.model_validate(merged))
    except (ValidationError, ValueError) as exc:
        message = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise ValidationFailed(f"The settings are not consistent: {message}.") from exc
    after = fields.model_dump(mode="json")
    changes = diff(before, after)
    if not changes and stored is not None:
        return program
    for key, value in after.items():
        setattr(program, key, value)
    program.updated_at = utcnow()
    if stored is None:
        session.add(program)
    await session.flush()
    session.info[_CACHE_KEY] = program
    record_write(
        session,
        principal.actor,
        action="program.update",
        object_type="program",
        object_id="program",
        changes=changes,
    )
    return program


def points_for_amount(program: LoyaltyProgram, amount: int, multiplier_percent: int = 100) -> int:
    """Whole points earned for `amount` minor units, rounded down."""
    return (amount * program.earn_points * multiplier_percent) // (program.earn_per_amount * 100)


def points_value(program: LoyaltyProgram, points: int) -> int:
    """What `points` are worth, in minor units of the program currency (rounded down)."""
    return (points * program.point_value_amount) // program.point_value_points


def _end_of_local_day(day: date, zone: ZoneInfo) -> datetime:
    """The first instant after `day` ends in `zone` (its following local midnight)."""
    return datetime.combine(day + timedelta(days=1), time.min, tzinfo=zone)


def expiry_for(program: LoyaltyProgram, earned_at: datetime) -> datetime | None:
    """When points earned at `earned_at` expire under the program's default policy.

    Day boundaries are the program's time zone: points expire when the last day they are
    valid on ends there.
    """
    zone = ZoneInfo(program.timezone)
    earned_day = earned_at.astimezone(zone).date()
    policy = program.expiry_policy
    if policy == ExpiryPolicy.DAYS_AFTER_EARN:
        return _end_of_local_day(earned_day + timedelta(days=program.expiry_days or 0), zone)
    if policy == ExpiryPolicy.END_OF_MONTH_AFTER_DAYS:
        day = earned_day + timedelta(days=program.expiry_days or 0)
        last = calendar.monthrange(day.year, day.month)[1]
        return _end_of_local_day(day.replace(day=last), zone)
    if policy == ExpiryPolicy.FIXED_DATE:
        month, dom = program.expiry_fixed_month or 12, program.expiry_fixed_day or 31
        year = earned_day.year
        while True:
            last = calendar.monthrange(year, month)[1]
            candidate = date(year, month, min(dom, last))
            if candidate >= earned_day:
                return _end_of_local_day(candidate, zone)
            year += 1
    return None


def activation_for(program: LoyaltyProgram, earned_at: datetime) -> datetime | None:
    """When earned points become spendable; None when they are active at once."""
    if program.pending_days <= 0:
        return None
    return earned_at + timedelta(days=program.pending_days)
