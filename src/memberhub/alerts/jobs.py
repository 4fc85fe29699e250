"""The scheduled check of the program-wide rates (seed 004's system alerts)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.alerts import service as alerts
from memberhub.alerts.models import AlertType
from memberhub.analytics.service import PointsRates, points_rates
from memberhub.kit.db import advisory_xact_lock
from memberhub.program import service as program_service

# An arbitrary constant: workers running the check at once take turns, so the second one
# finds the first one's alert instead of colliding on its dedupe key.
_CHECK_RATES_LOCK = 7_320_114_101


def _window_data(rates: PointsRates, rate: float, threshold: float) -> dict[str, object]:
    return {
        "rate_percent": round(rate, 2),
        "threshold_percent": threshold,
        "window_start": rates.window_start.isoformat(),
        "window_end": rates.window_end.isoformat(),
        "outstanding_at_start": rates.outstanding_at_start,
        "credited": rates.credited,
        "redeemed": rates.redeemed,
        "expired": rates.expired,
    }


async def check_rates(session: AsyncSession, now: datetime) -> int:
    """Raise HIGH_EXPIRATION_RATE when the expiration rate of the 30 days up to `now` is
    above the program's threshold, and LOW_REDEMPTION_RATE when the redemption rate is below
    its threshold, over every member. Rates are those of `analytics.service.points_rates`;
    neither is raised when no points were there to redeem. Each alert is raised at most once
    per calendar month (UTC) of `now`. Returns how many alerts were raised."""
    await session.run_sync(advisory_xact_lock, _CHECK_RATES_LOCK)
    thresholds = program_service.alert_thresholds(await program_service.get_program(session))
    rates = await points_rates(session, now)
    month = now.astimezone(UTC).strftime("%Y-%m")
    raised = 0
    expiration = rates.expiration_rate_percent
    if expiration is not None and expiration > thresholds.high_expiration_rate_percent:
        limit = thresholds.high_expiration_rate_percent
        alert = await alerts.raise_alert(
            session,
            AlertType.HIGH_EXPIRATION_RATE,
            member=None,
            dedupe_key=f"{AlertType.HIGH_EXPIRATION_RATE}:{month}",
            message=(
                f"{expiration:.2f}% of the points expired in the last 30 days (threshold {limit}%)."
            ),
            points=rates.expired,
            data=_window_data(rates, expiration, limit),
            now=now,
        )
        raised += alert is not None
    redemption = rates.redemption_rate_percent
    if redemption is not None and redemption < thresholds.low_redemption_rate_percent:
        limit = thresholds.low_redemption_rate_percent
        alert = await alerts.raise_alert(
            session,
            AlertType.LOW_REDEMPTION_RATE,
            member=None,
            dedupe_key=f"{AlertType.LOW_REDEMPTION_RATE}:{month}",
            message=(
                f"Only {redemption:.2f}% of the points were redeemed in the last 30 days "
                f"(threshold {limit}%)."
            ),
            points=rates.redeemed,
            data=_window_data(rates, redemption, limit),
            now=now,
        )
        raised += alert is not None
    return raised
