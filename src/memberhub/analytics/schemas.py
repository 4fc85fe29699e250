from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class PointsLiability(BaseModel):
    total_outstanding: int = Field(description="Sum of members' positive current balances.")
    pending: int = Field(description="Points earned but not yet spendable.")
    total: int = Field(description="total_outstanding + pending.")
    value: int = Field(description="What `total` is worth, in minor units (rounded down).")
    currency: str


class RatesWindow(BaseModel):
    """The figures behind the rates: the 30 days up to `end`."""

    start: datetime
    end: datetime
    outstanding_at_start: int = Field(description="The liability total at `start`.")
    credited: int = Field(description="Earned, awarded and recovered, net of earn reversals.")
    redeemed: int = Field(description="Redeemed, net of redeem refunds.")
    expired: int


class Kpis(BaseModel):
    as_of: datetime
    currency: str
    members_count: int = Field(description="Members that existed at `as_of`.")
    points_liability: PointsLiability
    liability_30d_ago: int = Field(description="The liability total 30 days before `as_of`.")
    monthly_growth_percent: float | None = Field(
        description="Liability change over 30 days; null when it was 0 then."
    )
    redemption_cost_30d: int = Field(description="Value of the points redeemed in the window.")
    redemption_rate_percent: float | None = Field(
        description="redeemed ÷ (outstanding_at_start + credited) x 100; null when 0 points."
    )
    expiration_rate_percent: float | None = Field(
        description="expired ÷ (outstanding_at_start + credited) x 100; null when 0 points."
    )
    active_points_users: int = Field(description="Members with a positive current balance.")
    average_balance: float | None = Field(
        description="total_outstanding ÷ active_points_users; null without any."
    )
    window: RatesWindow


class KpisSeries(BaseModel):
    """The KPIs at the end of each month, oldest first; the last point is now."""

    months: int
    points: list[Kpis]


class MemberClv(BaseModel):
    member_id: str
    currency: str
    tier: str | None
    months: int = Field(description="The projection horizon.")
    total_spend: int = Field(description="Sum of the purchase amounts of the member's orders.")
    points_based_spend: int | None = Field(
        description="Points earned by the orders converted back at the program's earn rate; "
        "null when the program earns no points."
    )
    earned_points: int
    order_count: int = Field(description="Earn transactions, less those reversed in full.")
    avg_order_value: int
    tenure_months: float = Field(description="Whole days as a member ÷ 30, at least 1.")
    avg_orders_per_month: float
    projected_clv: int = Field(description="avg_order_value x avg_orders_per_month x months.")
