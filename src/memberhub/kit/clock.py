"""Time is UTC and timezone-aware everywhere."""

from __future__ import annotations

import calendar
import math
from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def add_months(moment: datetime, months: int) -> datetime:
    """Calendar months; the day is clamped to the target month (31 Jan + 1 month = 28/29 Feb)."""
    month_index = moment.month - 1 + months
    year = moment.year + month_index // 12
    month = month_index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def days_until(moment: datetime, now: datetime) -> int:
    """Whole days from `now` until `moment`, a part of a day counting as one ("in 10 days"
    for 9 days and 23 hours), never below 0."""
    seconds = (moment - now).total_seconds()
    return max(0, math.ceil(seconds / 86400))
