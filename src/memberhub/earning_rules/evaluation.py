"""Evaluating an activity against the earning rules: what each rule would do.

`evaluate` only reads. Recording an activity (`activities/service.py`) calls it with the
member's point account locked and `lock=True`, then writes what it returned; simulation
calls the same function without locks and writes nothing. So a simulation answers what
the recording would do, given the same rules and history.

Rules run in priority order (higher first, then creation order). A rule whose conditions
hold applies its effect, cut by its caps; one that stops processing ends the evaluation
there. Caps count the rule's earlier awards (`earning_rule_awards`): per member they are
exact under concurrency because the member's account row is locked first; a rule with an
`overall` cap has its row locked too (in id order), which serialises that rule alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.activities.repository import ActivityRepository
from memberhub.earning_rules import conditions
from memberhub.earning_rules.models import EarningRule
from memberhub.earning_rules.repository import EarningRuleRepository
from memberhub.earning_rules.schemas import (
    EFFECT,
    CapLimit,
    Caps,
    Effect,
    ExtendExpiry,
    FixedPoints,
    Multiplier,
    NthActivityBonus,
    PointsPerAmount,
)
from memberhub.kit.cache import ProcessCache
from memberhub.points.models import PointBatch
from memberhub.points.repository import PointsRepository
from memberhub.points.service import extension_moves
from memberhub.program import service as program_service
from memberhub.program.models import LoyaltyProgram

# The caps in the order they are checked; the first that cuts names the cut.
CAP_NAMES = ("per_member_per_day", "per_member_per_month", "overall")


@dataclass(frozen=True)
class CompiledRule:
    id: int
    public_id: str
    name: str
    version: int
    priority: int
    stop_processing: bool
    condition: conditions.Node
    effect: Effect
    caps: Caps

    @property
    def effect_type(self) -> str:
        return self.effect.type

    @property
    def has_overall_cap(self) -> bool:
        return self.caps.overall is not None


@dataclass(frozen=True)
class ActivityRef:
    """The activity being evaluated: `id` None when it is not recorded (a simulation)."""

    id: int | None
    member_id: int
    type: str
    occurred_at: datetime


@dataclass(frozen=True)
class Outcome:
    """What one rule whose conditions held does for the activity."""

    rule: CompiledRule
    points: int
    computed_points: int
    capped_by: str | None = None
    extension: tuple[tuple[PointBatch, datetime], ...] = field(default=())

    @property
    def applies(self) -> bool:
        """It credits points or moves an expiry: a ledger write and an award."""
        return self.points > 0 or bool(self.extension)


# ---------------------------------------------------------------- loading


def compile_rule(rule: EarningRule, organisation_ids: dict[str, int]) -> CompiledRule:
    return CompiledRule(
        id=rule.id,
        public_id=rule.public_id,
        name=rule.name,
        version=rule.version,
        priority=rule.priority,
        stop_processing=rule.stop_processing,
        condition=conditions.compile_tree(rule.conditions, organisation_ids),
        effect=EFFECT.validate_python(rule.effect),
        caps=Caps.model_validate(rule.caps),
    )


_RULES_CACHE: ProcessCache[str, tuple[CompiledRule, ...]] = ProcessCache(
    "earning_rules", watches=(EarningRule,)
)


async def active_rules(session: AsyncSession) -> tuple[CompiledRule, ...]:
    """The rules activities are evaluated against, compiled, in evaluation order. Kept per
    process like the program's settings (`kit/cache.py`)."""

    async def load() -> tuple[CompiledRule, ...]:
        repo = EarningRuleRepository(session)
        rows = await repo.evaluated()
        named: set[str] = set()
        for row in rows:
            named |= conditions.check(row.conditions)[1]
        organisation_ids = await repo.organisation_ids(named)
        compiled = [compile_rule(row, organisation_ids) for row in rows]
        return tuple(sorted(compiled, key=lambda rule: (-rule.priority, rule.id)))

    return await _RULES_CACHE.get_or_load(session, "active", load)


# ---------------------------------------------------------------- periods


def period_bounds(
    moment: datetime, period: str, zone: ZoneInfo
) -> tuple[datetime | None, datetime | None]:
    """The [start, end) in UTC of the day, week (from Monday), month or year in `zone`
    that holds `moment`; (None, None) for all time."""
    if period == "all_time":
        return None, None
    day = moment.astimezone(zone).date()
    if period == "day":
        first, after = day, day + timedelta(days=1)
    elif period == "week":
        first = day - timedelta(days=day.weekday())
        after = first + timedelta(days=7)
    elif period == "month":
        first = day.replace(day=1)
        after = date(day.year + (day.month == 12), day.month % 12 + 1, 1)
    else:
        first, after = day.replace(month=1, day=1), date(day.year + 1, 1, 1)
    return _local_midnight(first, zone), _local_midnight(after, zone)


def _local_midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time.min, tzinfo=zone).astimezone(UTC)


# ---------------------------------------------------------------- evaluation


async def evaluate(
    session: AsyncSession,
    rules: Sequence[CompiledRule],
    facts: conditions.Facts,
    activity: ActivityRef,
    attributes: dict[str, Any],
    *,
    lock: bool,
) -> list[Outcome]:
    """What each rule whose conditions hold would do for the activity, in order. Reads
    only; with `lock`, locks what the writes that follow depend on (the overall-capped
    rules' rows, the batches an extension moves). The caller holds the member's account
    locked when it means to write."""
    reached = []
    for rule in rules:
        if rule.condition.holds(facts):
            reached.append(rule)
            if rule.stop_processing:
                break
    if not reached:
        return []
    if lock:
        await EarningRuleRepository(session).lock(r.id for r in reached if r.has_overall_cap)
    program = await program_service.get_program(session)
    zone = ZoneInfo(program.timezone)
    outcomes = []
    earned = 0
    for rule in reached:
        computed = await _points_of(session, rule, activity, attributes, earned, zone)
        moves: list[tuple[PointBatch, datetime]] = []
        if isinstance(rule.effect, ExtendExpiry):
            moves = await _extension(session, rule.effect, activity, program, zone, lock=lock)
        if computed == 0 and not moves:
            outcomes.append(Outcome(rule, 0, 0))
            continue
        points, capped_by = await _within_caps(session, rule, activity, computed, zone)
        if capped_by is not None and points == 0:
            moves = []
        outcomes.append(Outcome(rule, points, computed, capped_by, tuple(moves)))
        earned += points
    return outcomes


async def _points_of(
    session: AsyncSession,
    rule: CompiledRule,
    activity: ActivityRef,
    attributes: dict[str, Any],
    earned: int,
    zone: ZoneInfo,
) -> int:
    """What the rule's effect credits before caps; `earned`: what earlier rules credited."""
    effect = rule.effect
    if isinstance(effect, FixedPoints):
        return effect.points
    if isinstance(effect, PointsPerAmount):
        amount = attributes.get("amount")
        if amount is None or attributes.get("currency") != effect.currency:
            return 0
        points = (amount // effect.per_amount) * effect.points
        return min(points, cast(int, effect.max_points))
    if isinstance(effect, Multiplier):
        extra = earned * (effect.percent - 100) // 100
        return min(extra, cast(int, effect.max_points))
    if isinstance(effect, NthActivityBonus):
        # Counted as recorded: the member's activities of the type in the activity's period
        # so far, whatever order they occurred in, against the bonuses the rule already paid
        # there. So a bonus is paid once for every nth (once in all without `repeat`), also
        # when activities arrive out of order or are matched to the member later; and only
        # on an nth: not on those that follow a bonus a cap cut, nor on every activity
        # after a new rule finds earlier ones it paid nothing for.
        start, end = period_bounds(activity.occurred_at, effect.period, zone)
        count = await ActivityRepository(session).count_in_period(
            activity.member_id, activity.type, start=start, end=end
        )
        if activity.id is None:
            count += 1  # the activity itself, were it recorded
        paid, _ = await EarningRuleRepository(session).award_usage(
            rule.id, member_id=activity.member_id, start=start, end=end
        )
        nth = count % effect.nth == 0 and (effect.repeat or count == effect.nth)
        due = count // effect.nth if effect.repeat else min(count // effect.nth, 1)
        return effect.points if nth and due > paid else 0
    return 0


async def _extension(
    session: AsyncSession,
    effect: ExtendExpiry,
    activity: ActivityRef,
    program: LoyaltyProgram,
    zone: ZoneInfo,
    *,
    lock: bool,
) -> list[tuple[PointBatch, datetime]]:
    """The member's batches the effect moves, with their new expiry. Only points still
    valid when the activity occurred are extended."""
    batches = await PointsRepository(session).extendable_batches(
        activity.member_id, valid_at=activity.occurred_at, lock=lock
    )
    if effect.mode == "add":
        days = timedelta(days=cast(int, effect.days))
        return extension_moves(batches, lambda b: _later(b.expires_at, days))
    if effect.days is not None:
        day = activity.occurred_at.astimezone(zone).date() + timedelta(days=effect.days)
        renewed: datetime | None = _local_midnight(day + timedelta(days=1), zone)
    else:
        renewed = program_service.expiry_for(program, activity.occurred_at)
    return extension_moves(batches, lambda _batch: renewed)


def _later(expires_at: datetime | None, days: timedelta) -> datetime | None:
    """`days` after an expiry; one too near the end of the calendar stays where it is."""
    if expires_at is None:
        return None
    try:
        return expires_at + days
    except OverflowError:
        return expires_at


async def _within_caps(
    session: AsyncSession, rule: CompiledRule, activity: ActivityRef, points: int, zone: ZoneInfo
) -> tuple[int, str | None]:
    """`points` cut to what the rule's caps leave, and the first cap that cut them. A cap
    whose awards are used up leaves nothing, an extension included."""
    repo = EarningRuleRepository(session)
    capped_by = None
    for name in CAP_NAMES:
        limit: CapLimit | None = getattr(rule.caps, name)
        if limit is None:
            continue
        if name == "overall":
            awards, credited = await repo.award_usage(rule.id, member_id=None)
        else:
            period = "day" if name == "per_member_per_day" else "month"
            start, end = period_bounds(activity.occurred_at, period, zone)
            awards, credited = await repo.award_usage(
                rule.id, member_id=activity.member_id, start=start, end=end
            )
        if limit.awards is not None and awards >= limit.awards:
            return 0, capped_by or name
        if limit.points is not None and limit.points - credited < points:
            points = max(0, limit.points - credited)
            capped_by = capped_by or name
    return points, capped_by
