"""Cron schedules, read in the program's time zone."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from croniter import croniter

MAX_FIELDS = 5


def validated(expression: str) -> str:
    """The expression, normalised; ValueError unless it is a five-field cron expression."""
    normalised = " ".join(expression.split())
    if len(normalised.split(" ")) != MAX_FIELDS or not croniter.is_valid(normalised):
        raise ValueError(
            f"{expression!r} is not a cron expression of five fields (minute hour "
            "day-of-month month day-of-week)"
        )
    return normalised


def next_run(expression: str, after: datetime, timezone: str) -> datetime:
    """The first time after `after` the expression names, in `timezone`; returned in UTC."""
    local = after.astimezone(ZoneInfo(timezone))
    following = croniter(expression, local).get_next(datetime)
    assert isinstance(following, datetime)
    return following.astimezone(UTC)
