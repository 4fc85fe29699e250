"""Analytics: seed 004's points KPIs for the staff user's organisations, and charts of the
liability and active points users at each month end, drawn on the server. The figures are
those of `GET /api/v1/analytics/kpis` and `GET /api/v1/analytics/kpis/series`: the same
service calls with the same scope and organisation visibility."""

from __future__ import annotations

from datetime import tzinfo
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from memberhub.analytics import service
from memberhub.analytics.routes import EARLIEST_AS_OF
from memberhub.analytics.schemas import Kpis
from memberhub.auth.roles import Scope
from memberhub.console.charts import ChartPoint, line_chart
from memberhub.console.web import ConsoleDb, ConsoleRoute, SignedInStaff, render
from memberhub.kit.clock import utcnow
from memberhub.kit.money import minor_unit_digits
from memberhub.program import service as program_service

router = APIRouter(prefix="/console/analytics", route_class=ConsoleRoute, include_in_schema=False)
DEFAULT_MONTHS = 12
MONTH_CHOICES = (3, 6, 12, 24)


def money(amount: int, currency: str) -> str:
    """Minor units as the currency writes them: 123456 MYR is `MYR 1,234.56`."""
    digits = minor_unit_digits(currency)
    return f"{currency} {Decimal(amount).scaleb(-digits):,.{digits}f}"


def _month_label(point: Kpis, last: bool, zone: tzinfo) -> str:
    return "Now" if last else point.as_of.astimezone(zone).strftime("%b %Y")


@router.get("")
async def dashboard(
    request: Request,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    months: Annotated[int, Query(ge=2, le=24)] = DEFAULT_MONTHS,
) -> Response:
    principal = signed_in.principal
    principal.require_scope(Scope.ANALYTICS_READ)
    now = utcnow()
    series = await service.kpis_series(
        session,
        principal.visible_organisation_ids,
        months=months,
        now=now,
        earliest=EARLIEST_AS_OF,
    )
    # The series ends with the KPIs now: what `GET /api/v1/analytics/kpis` answers.
    current = series[-1]
    zone = await program_service.program_zone(session)
    labels = [_month_label(p, i == len(series) - 1, zone) for i, p in enumerate(series)]
    liability_chart = line_chart(
        chart_id="liability-chart",
        title="Points liability at each month end",
        x_label="Month end",
        y_label="Points",
        points=[
            ChartPoint(label, p.points_liability.total)
            for label, p in zip(labels, series, strict=True)
        ],
    )
    users_chart = line_chart(
        chart_id="users-chart",
        title="Active points users at each month end",
        x_label="Month end",
        y_label="Members",
        whole_numbers=True,
        points=[
            ChartPoint(label, p.active_points_users)
            for label, p in zip(labels, series, strict=True)
        ],
    )
    return render(
        request,
        "analytics.html",
        {
            "title": "Analytics",
            "kpis": current,
            "months": months,
            # A number typed into the address is offered too, so the form shows what is drawn.
            "month_choices": sorted({*MONTH_CHOICES, months}),
            "liability_value": money(
                current.points_liability.value, current.points_liability.currency
            ),
            "redemption_cost": money(current.redemption_cost_30d, current.currency),
            "liability_chart": liability_chart,
            "users_chart": users_chart,
        },
    )
