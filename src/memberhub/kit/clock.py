"""Time is UTC and timezone-aware everywhere."""

from __future__ import annotations

import calendar
import math
from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def add_months(moment: datetime, months: int, *, anchor_day: int | None = None) -> datetime:
    """Calendar months; the day is clamped to the target month (31 Jan + 1 month = 28/29 Feb).
    `anchor_day`: the day to land on instead of `moment`'s (still clamped), so that a date
    already clamped finds its day again (29 Feb + 1 month, anchored on the 31st = 31 Mar)."""
    month_index = moment.month - 1 + months
    year = moment.year + month_index // 12
    month = month_index % 12 + 1
    day = min(anchor_day or moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def days_until(moment: datetime, now: datetime) -> int:
    """Whole days from `now` until `moment`, a part of a day counting as one ("in 10 days"
    for 9 days and 23 hours), never below 0."""
    seconds = (moment - now).total_seconds()
    return max(0, math.ceil(seconds / 86400))
