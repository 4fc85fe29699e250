"""Points KPIs (seed 004) and customer lifetime value (seed 000), from the ledger tables.

Definitions, shared by the KPIs and the scheduled rate alerts:

- Liability at a moment: the sum of members' positive current balances (`outstanding`)
  plus their pending points. Now it is read from the accounts; at an earlier moment from
  each member's last transaction at or before it.
- The rates window is the 30 days before its end: transactions with
  `end - 30 days < occurred_at <= end`.
- `credited`: net points (current and pending) of earn, award and recover transactions in
  the window, minus what reversals of earns took back in it.
- `redeemed`: points of redeem transactions in the window net of redeem refunds (floored at
  0); `expired`: points of expire transactions in the window.
- Rates: `redeemed` (or `expired`) ÷ (liability at the window start + `credited`) x 100;
  None when that denominator is not positive (nothing could have been redeemed).
- Transfers move points between members and count neither as credits nor as redemptions;
  deductions are staff corrections, not redemptions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from fractions import Fraction

from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.analytics.repository import AnalyticsRepository, Liability
from memberhub.analytics.schemas import Kpis, MemberClv, PointsLiability, RatesWindow
from memberhub.members.models import Member
from memberhub.points.models import TxnType
from memberhub.program import service as program_service

RATES_WINDOW = timedelta(days=30)
# CLV tenure is counted in 30-day months, and never less than one month.
DAYS_PER_MONTH = 30

CREDIT_TYPES = (TxnType.EARN, TxnType.AWARD, TxnType.RECOVER, TxnType.REVERSE)
REDEMPTION_TYPES = (TxnType.REDEEM, TxnType.REDEEM_REFUND)
EXPIRY_TYPES = (TxnType.EXPIRE,)


@dataclass(frozen=True)
class PointsRates:
    """Redemption and expiration over the 30 days up to `window_end`."""

    window_start: datetime
    window_end: datetime
    outstanding_at_start: int  # the liability (positive balances + pending) at window_start
    credited: int
    redeemed: int
    expired: int

    @property
    def base(self) -> int:
        """The points that were there to be redeemed or to expire during the window."""
        return self.outstanding_at_start + self.credited

    def _percent(self, points: int) -> float | None:
        return points * 100 / self.base if self.base > 0 else None

    @property
    def redemption_rate_percent(self) -> float | None:
        return self._percent(self.redeemed)

    @property
    def expiration_rate_percent(self) -> float | None:
        return self._percent(self.expired)


async def points_rates(
    session: AsyncSession,
    window_end: datetime,
    organisation_ids: frozenset[int] | None = None,
    *,
    opening: Liability | None = None,
) -> PointsRates:
    """The redemption and expiration rates over the 30 days up to `window_end`, for the
    members of `organisation_ids` (None: every member). See the module docstring.
    `opening`, the liability at the window's start, is read unless given."""
    start = window_end - RATES_WINDOW
    repo = AnalyticsRepository(session)
    if opening is None:
        opening = await repo.liability_at(start, organisation_ids)
    moved = await repo.movements(
        start, window_end, CREDIT_TYPES + REDEMPTION_TYPES + EXPIRY_TYPES, organisation_ids
    )
    return PointsRates(
        window_start=start,
        window_end=window_end,
        outstanding_at_start=opening.total,
        credited=sum(moved.get(t, 0) for t in CREDIT_TYPES),
        redeemed=max(0, -sum(moved.get(t, 0) for t in REDEMPTION_TYPES)),
        expired=-sum(moved.get(t, 0) for t in EXPIRY_TYPES),
    )


def _rounded(value: float | None, digits: int = 2) -> float | None:
    return round(value, digits) if value is not None else None


async def kpis(
    session: AsyncSession,
    organisation_ids: frozenset[int] | None,
    *,
    as_of: datetime | None,
    now: datetime,
    known: Mapping[datetime, Liability] | None = None,
) -> Kpis:
    """Seed 004's points KPIs at `as_of` (default now) for the members of
    `organisation_ids` (None: every member). `known` holds liabilities already read from
    the log (`liability_at_many`), by moment: they are not read again."""
    end = as_of or now
    known = known or {}
    program = await program_service.get_program(session)
    repo = AnalyticsRepository(session)
    if as_of is None:
        liability = await repo.liability_now(organisation_ids)
    else:
        liability = known.get(end) or await repo.liability_at(end, organisation_ids)
    rates = await points_rates(
        session, end, organisation_ids, opening=known.get(end - RATES_WINDOW)
    )
    # The liability 30 days earlier is the one the rates window opens with.
    earlier = rates.outstanding_at_start
    growth = (liability.total - earlier) * 100 / earlier if earlier > 0 else None
    return Kpis(
        as_of=end,
        currency=program.currency,
        members_count=await repo.members_count(end, organisation_ids),
        points_liability=PointsLiability(
            total_outstanding=liability.outstanding,
            pending=liability.pending,
            total=liability.total,
            value=program_service.points_value(program, liability.total),
            currency=program.currency,
        ),
        liability_30d_ago=earlier,
        monthly_growth_percent=_rounded(growth),
        redemption_cost_30d=program_service.points_value(program, rates.redeemed),
        redemption_rate_percent=_rounded(rates.redemption_rate_percent),
        expiration_rate_percent=_rounded(rates.expiration_rate_percent),
        active_points_users=liability.holders,
        average_balance=_rounded(
            liability.outstanding / liability.holders if liability.holders else None
        ),
        window=RatesWindow(
            start=rates.window_start,
            end=rates.window_end,
            outstanding_at_start=rates.outstanding_at_start,
            credited=rates.credited,
            redeemed=rates.redeemed,
            expired=rates.expired,
        ),
    )


def month_ends(now: datetime, months: int, zone: tzinfo = UTC) -> list[datetime]:
    """The last moments of the `months - 1` whole months before `now`'s month, oldest first,
    then `now` itself (the month so far); months as `zone` counts them (a month ends at its
    last local midnight's eve, whatever daylight saving does), answered in UTC."""
    start_of_month = now.astimezone(zone).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    ends = []
    for _ in range(months - 1):
        ends.append(start_of_month.astimezone(UTC) - timedelta(microseconds=1))
        start_of_month = (start_of_month - timedelta(days=1)).replace(day=1)
    return [*reversed(ends), now]


async def kpis_series(
    session: AsyncSession,
    organisation_ids: frozenset[int] | None,
    *,
    months: int,
    now: datetime,
    earliest: datetime,
) -> list[Kpis]:
    """The KPIs at the end of each of the last `months` months of the program's time zone
    (see `month_ends`; the last one is now, read as `kpis` reads it without `as_of`),
    leaving out moments before `earliest`. Each point is exactly what `kpis` answers for
    that moment; the liabilities at every month end and 30 days before each are read from
    the log in one statement."""
    zone = await program_service.program_zone(session)
    ends = [end for end in month_ends(now, months, zone) if end >= earliest]
    moments = [end for end in ends if end != now] + [end - RATES_WINDOW for end in ends]
    known = await AnalyticsRepository(session).liability_at_many(moments, organisation_ids)
    return [
        await kpis(
            session, organisation_ids, as_of=None if end == now else end, now=now, known=known
        )
        for end in ends
    ]


def _money(value: Fraction) -> int:
    """A non-negative amount to the nearest minor unit, halves rounded up."""
    return math.floor(value + Fraction(1, 2))


async def member_clv(
    session: AsyncSession, member: Member, *, months: int, now: datetime
) -> MemberClv:
    """Seed 000's calculateMemberCLV, from the member's earn transactions.

    Orders are earn transactions not reversed in full; spend is their recorded purchase
    `amount` (awards and other credits are not spend). Tenure runs from `member_since`, else
    the member's creation, to now, in whole days ÷ 30, at least one month. The projection is
    average order value x orders per month x `months`, computed exactly and rounded once.
    """
    program = await program_service.get_program(session)
    totals = await AnalyticsRepository(session).order_totals(member.id, program.currency)
    since = member.member_since or member.created_at
    tenure = max(Fraction(max(0, (now - since).days), DAYS_PER_MONTH), Fraction(1))
    orders = totals.order_count
    order_value = Fraction(totals.spend, orders) if orders else Fraction(0)
    per_month = orders / tenure
    points_based = (
        _money(Fraction(totals.earned_points * program.earn_per_amount, program.earn_points))
        if program.earn_points > 0
        else None
    )
    return MemberClv(
        member_id=member.public_id,
        currency=program.currency,
        tier=member.tier,
        months=months,
        total_spend=totals.spend,
        points_based_spend=points_based,
        earned_points=totals.earned_points,
        order_count=orders,
        avg_order_value=_money(order_value),
        tenure_months=round(float(tenure), 4),
        avg_orders_per_month=round(float(per_month), 4),
        projected_clv=_money(order_value * per_month * months),
    )
